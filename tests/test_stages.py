"""The life-stage model, on synthetic cells (seconds); the shipped model's figures; the real crops where present."""

import json
from pathlib import Path

import numpy as np
import pytest

from malaria_cells import MalariaCellsError
from malaria_cells.fields.stages import (STAGE_MODEL, STAGES, StageFigures, StageRecipe, cross_validate,
                                         load_field_crops, load_stage_model, main, stage_set, train_stage_model)

REAL_CROPS = Path("/tmp/W3/field_crops.npz")
REAL_FIELDS = Path("/tmp/W4/fields.json")
QUICK = StageRecipe(blocks=4, c_grid=(0.1, 1.0))


def _cell(rng, blob: int, side: int = 64) -> np.ndarray:
    """A pink disc on black with a dark purple blob of radius ``blob`` somewhere inside it."""
    y, x = np.mgrid[:side, :side]
    radius = side / 2 - 3 + rng.uniform(-2, 1)
    cell = (x - side / 2) ** 2 + (y - side / 2) ** 2 < radius ** 2
    image = np.zeros((side, side, 3), np.float32)
    image[cell] = np.array([225, 160, 170]) + rng.normal(0, 6, (cell.sum(), 3))
    angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(0, max(0.0, radius - blob - 4))
    cy, cx = side / 2 + distance * np.sin(angle), side / 2 + distance * np.cos(angle)
    image[((x - cx) ** 2 + (y - cy) ** 2 < blob ** 2) & cell] = [95, 40, 120]
    return np.clip(image, 0, 255).astype(np.uint8)


def _synthetic(n_per_stage=10, seed=0):
    """Rings with a small blob, gametocytes with a large one, in 4 groups."""
    rng = np.random.default_rng(seed)
    stages = np.array(["ring", "gametocyte"] * n_per_stage)
    crops = np.stack([_cell(rng, 3 if stage == "ring" else 13) for stage in stages])
    return crops, stages, (np.arange(len(stages)) // 2) % 4


@pytest.fixture(scope="module")
def synthetic():
    return _synthetic()


@pytest.fixture(scope="module")
def trained(synthetic):
    figures = cross_validate(*synthetic, recipe=QUICK)
    return train_stage_model(*synthetic, recipe=QUICK, figures=figures), figures


def test_leave_block_out_separates_small_from_large_blobs(trained):
    _, figures = trained
    assert figures.accuracy > 0.8, figures.table()
    assert figures.support == {"ring": 10, "trophozoite": 0, "schizont": 0, "gametocyte": 10}
    assert [sum(row) for row in figures.confusion] == [10, 0, 0, 10]
    assert set(figures.too_rare) == {"trophozoite", "schizont"}
    assert figures.recall["trophozoite"] is None
    assert "ring" in figures.table() and "too rare" in figures.table()


def test_predict_gives_stage_names_and_probabilities(trained):
    model, _ = trained
    crops, stages, _ = _synthetic(n_per_stage=4, seed=1)
    names, probability = model.predict(crops)
    assert names.shape == probability.shape == (8,)
    assert set(names) <= set(STAGES)
    assert ((probability > 0) & (probability <= 1)).all()
    assert (names == stages).mean() > 0.7
    table = model.predict_proba(crops)
    assert table.shape == (8, 4) and np.allclose(table.sum(axis=1), 1, atol=1e-5)
    assert np.allclose(table.max(axis=1), probability)
    assert (table[:, [1, 2]] == 0).all()  # stages it never saw are never called


def test_the_model_carries_its_preprocessing_and_figures_through_a_file(trained, tmp_path):
    model, figures = trained
    model.save(tmp_path / "stages.keras")
    loaded = load_stage_model(tmp_path / "stages.keras")
    assert loaded.figures == figures
    sidecar = json.loads((tmp_path / "stages.json").read_text())
    assert sidecar["file"] == "stages.keras" and StageFigures.from_info(sidecar) == figures
    crops = _synthetic(n_per_stage=2, seed=2)[0]
    assert np.allclose(loaded.predict_proba(crops), model.predict_proba(crops), atol=1e-6)
    # the same cells turned and mirrored: the same stage probabilities
    assert np.allclose(loaded.predict_proba(np.rot90(crops, 1, axes=(1, 2))[:, :, ::-1]),
                       loaded.predict_proba(crops), atol=1e-4)
    assert np.allclose(loaded.predict_proba(crops.astype(np.float32)), loaded.predict_proba(crops), atol=1e-6)


def test_empty_crops_give_empty_answers(trained):
    model, _ = trained
    for empty in (np.zeros((0, 64, 64, 3), np.uint8), []):
        names, probability = model.predict(empty)
        assert names.shape == probability.shape == (0,)
        assert model.predict_proba(empty).shape == (0, 4)


@pytest.mark.parametrize("crops", [np.zeros((2, 32, 32, 3), np.uint8), np.zeros((2, 64, 64), np.uint8),
                                   np.zeros((64, 64, 3), np.uint8), np.zeros((2, 64, 48, 3), np.uint8),
                                   np.full((1, 64, 64, 3), np.nan, np.float32), np.full((1, 64, 64, 3), 300.0),
                                   np.full((1, 64, 64, 3), "a")])
def test_malformed_crops_are_refused(trained, crops):
    model, _ = trained
    with pytest.raises(MalariaCellsError):
        model.predict(crops)


def test_malformed_training_input_and_recipes_are_refused(synthetic):
    crops, stages, groups = synthetic
    for bad in (dict(stages=np.array(["ring", "merozoite"] * 10)), dict(stages=stages[:-1]),
                dict(groups=np.zeros(len(stages), int)), dict(crops=crops[:0], stages=stages[:0], groups=groups[:0]),
                dict(stages=np.array(["ring"] * len(stages))),
                dict(groups=(stages == "ring").astype(int))):  # each block's others hold one stage
        arguments = {"crops": crops, "stages": stages, "groups": groups, **bad}
        with pytest.raises(MalariaCellsError):
            cross_validate(**arguments, recipe=QUICK)
    for settings in (dict(blocks=1), dict(c_grid=()), dict(c_grid=(0.0,)), dict(max_class_weight=0.5),
                     dict(min_support=0)):
        with pytest.raises(MalariaCellsError):
            StageRecipe(**settings)


def test_malformed_figures_are_refused(trained):
    info = trained[1].to_info()
    for change in (dict(recall={**info["recall"], "ring": 1.5}), dict(confusion=[[0] * 4] * 4),
                   dict(too_rare=["merozoite"]), dict(support={"ring": 1})):
        with pytest.raises(MalariaCellsError):
            StageFigures.from_info({"stages": {**info, **change}})
    with pytest.raises(MalariaCellsError):
        StageFigures.from_info({"stages": {"recall": {}}})
    assert StageFigures.from_info({}) is None


def test_missing_model_and_command_line_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(MalariaCellsError):
        load_stage_model(tmp_path / "none.keras")
    (tmp_path / "bad.keras").write_bytes(b"not a model")
    with pytest.raises(MalariaCellsError):
        load_stage_model(tmp_path / "bad.keras")
    assert main(["train", "--crops", str(tmp_path / "none.npz"), "--fields", str(tmp_path / "none.json"),
                 "--out", str(tmp_path / "m.keras")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and error.count("\n") == 1


@pytest.mark.skipif(not STAGE_MODEL.is_file(), reason="no stage model shipped in this checkout")
def test_the_shipped_model_loads_with_its_leave_slide_out_figures():
    model = load_stage_model()
    figures = model.figures
    assert figures is not None and model.image_size == 64
    assert "schizont" in figures.too_rare and figures.support["schizont"] < figures.min_support
    assert sum(figures.support.values()) == sum(map(sum, figures.confusion)) > 100
    assert "leave-block-out" in figures.chosen_on
    sidecar = json.loads(STAGE_MODEL.with_suffix(".json").read_text())
    assert StageFigures.from_info(sidecar) == figures and sidecar["file"] == STAGE_MODEL.name
    assert STAGE_MODEL.stat().st_size < 1_500_000
    names, probability = model.predict(np.zeros((3, 64, 64, 3), np.uint8))
    assert set(names) <= set(STAGES) and ((probability > 0) & (probability <= 1)).all()


def test_a_screen_with_stages_pickles_as_dask_sends_it_between_processes():
    """Metadata read from a Keras layer comes back in Keras's tracking types, which do not
    unpickle: a screen with staged cells must still travel from a Dask worker to its client."""
    import pickle

    from malaria_cells.fields import Screener

    examples = Path(__file__).resolve().parents[1] / "src" / "malaria_cells" / "examples" / "fields"
    screener = Screener()
    result = screener.screen(examples)
    assert any(cell.stage for field in result.fields for cell in field.cells)
    again = pickle.loads(pickle.dumps(result))
    assert again.to_dict() == result.to_dict()
    assert pickle.loads(pickle.dumps(screener.classifier.info)) == screener.classifier.info


@pytest.mark.skipif(not (REAL_CROPS.is_file() and REAL_FIELDS.is_file()), reason="the IML field crops are not here")
@pytest.mark.skipif(not STAGE_MODEL.is_file(), reason="no stage model shipped in this checkout")
def test_the_real_staged_cells_and_the_shipped_model_on_them():
    crops, stages, blocks = stage_set(load_field_crops(REAL_CROPS, REAL_FIELDS), 5)
    counts = {stage: int((stages == stage).sum()) for stage in STAGES}
    assert counts == load_stage_model().figures.support
    assert sorted(set(blocks)) == [0, 1, 2, 3, 4]
    names, _ = load_stage_model().predict(crops)
    assert (names == stages).mean() > 0.7  # the cells it was trained on
