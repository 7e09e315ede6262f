"""Making a field model, on synthetic fields with IML-style ground truth (seconds, not hours)."""

import json

import numpy as np
import pytest
from PIL import Image

from malaria_cells import MalariaCellsError, load_model
from malaria_cells.fields import FieldFigures, Screener
from malaria_cells.fields.training import FieldCrops, Recipe, cross_validate, cut_crops, final_model, main

from conftest import make_field

RADIUS = 22


def _annotate(name, cells, stage="ring"):
    return {"image_name": name, "objects": [
        {"type": stage if infected else "red blood cell",
         "bbox": {"x": x - RADIUS, "y": y - RADIUS, "w": 2 * RADIUS, "h": 2 * RADIUS}} for x, y, infected in cells]}


@pytest.fixture(scope="module")
def fields(tmp_path_factory):
    """Six training fields (infected cells marked "ring") and one healthy field that only checks."""
    root = tmp_path_factory.mktemp("training-fields")
    for folder, seeds in (("train", range(6)), ("check", [50])):
        (root / folder).mkdir()
        entries = []
        for seed in seeds:
            infected = () if folder == "check" else tuple(range(seed % 3, 63, 9))
            image, cells = make_field(np.random.default_rng(seed), infected=infected)
            name = f"F{seed:03d}.png"
            Image.fromarray(image).save(root / folder / name)
            entries.append(_annotate(name, cells))
        (root / folder / "annotations.json").write_text(json.dumps(entries))
    return root


@pytest.fixture(scope="module")
def crops(fields):
    return cut_crops([fields / "train"], [fields / "check"], log=lambda line: None)


def test_crops_are_labelled_by_the_ground_truth(crops):
    assert len(crops.records) == 7 and [r["check"] for r in crops.records] == [False] * 6 + [True]
    infected = sum(r["n_true_parasitized"] for r in crops.records)
    assert infected > 30 and (crops.labels == 1).sum() >= infected - 2
    assert set(crops.stages[crops.labels == 1]) == {"ring"}
    assert crops.crops.shape[1:] == (64, 64, 3) and len(crops.crops) == len(crops.labels) == len(crops.field)
    assert crops.block_of(3) == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}
    with pytest.raises(MalariaCellsError, match="cannot make 7 blocks"):
        crops.block_of(7)


def test_crops_round_trip_through_the_work_folder(crops, tmp_path):
    crops.save(tmp_path)
    again = FieldCrops.load(tmp_path)
    assert np.array_equal(again.crops, crops.crops) and again.records == crops.records
    with pytest.raises(MalariaCellsError, match="run the crops step"):
        FieldCrops.load(tmp_path / "empty")


@pytest.fixture(scope="module")
def made(crops, tmp_path_factory):
    """A field model made by the cv and final steps on the synthetic fields: (recipe, nested
    report rows, fold probabilities, final model, its work folder)."""
    tmp_path = tmp_path_factory.mktemp("made")
    recipe = Recipe(epochs=1, blocks=3, specks=50, max_fpr=0.02, oversample=2, augment="shifts")
    nested = cross_validate(crops, None, recipe, tmp_path, log=lambda line: None)
    probabilities = [np.load(tmp_path / f"fold{k}-probability.npy") for k in range(3)]
    model = final_model(crops, None, recipe, probabilities)
    model.save(tmp_path / "field-model.keras")
    return recipe, nested, probabilities, model, tmp_path


def test_nested_cross_validation_and_the_final_model_carry_honest_figures(crops, made):
    recipe, nested, probabilities, model, tmp_path = made
    report = next(row for row in nested if row["max_fpr"] == recipe.max_fpr)
    assert report["fields"] == 6 and len(report["folds"]) == 3
    assert report["found_of_annotated_infected"][1] == sum(r["n_true_parasitized"] for r in crops.records[:6])
    # at a threshold chosen to call at most 2% of the other blocks' uninfected cells, each block's own
    # false alarms stay of that order (a block of about 120 uninfected cells: a few at most)
    assert report["false_positive_rate"] <= 0.06 and report["healthy_fields_false_positive_rate"] is not None
    assert sum(fold["threshold"] > 0 for fold in report["folds"]) == 3
    figures = FieldFigures.from_model(model)
    assert model.threshold == figures.threshold and figures.recipe["blocks"] == 3
    assert figures.stain_reference == crops.stain_reference and len(crops.stain_reference) == 3
    assert figures.plasma_reference == crops.plasma_reference and len(crops.plasma_reference) == 3
    # the threshold calls at most max_fpr of the out-of-fold uninfected cells
    oof = np.concatenate([p[np.isin(crops.field, [f for f, b in crops.block_of(3).items() if b == k])]
                          for k, p in enumerate(probabilities)])
    labels = np.concatenate([crops.labels[np.isin(crops.field, [f for f, b in crops.block_of(3).items() if b == k])]
                             for k in range(3)])
    assert (oof[labels == 0] >= figures.threshold).mean() <= recipe.max_fpr
    assert figures.specificity == pytest.approx(1 - (oof[labels == 0] >= figures.threshold).mean())
    screener = Screener(load_model(tmp_path / "field-model.keras"))
    assert screener.figures == figures and screener.threshold == figures.threshold


def test_a_shipped_field_model_carries_its_shift_suite_figures(made, cell_dataset, tmp_path):
    pytest.importorskip("tf2onnx")
    from malaria_cells.fields.training import ship

    made = made[-1] / "field-model.keras"
    row = {"name": "blur_1.5", "iml": {"infected_found_pct": 40.0}, "all": {"false_positive_rate_pct": 0.1, "f1": 0.9,
                                                                          "parasitemia_mae_points": 0.5},
           "nih_call": {"call": "negative"}, "unread_fields": 0, "passed": False}
    report = {"command": "python benchmarks/shift_suite.py --model field-model.keras", "model": str(made),
              "fields": {"iml": 6, "nih": 1}, "conditions": [row], "morphology": [], "failed": ["blur_1.5"]}
    (tmp_path / "suite.json").write_text(json.dumps(report))
    ship(made, cell_dataset, to=tmp_path / "out", shift_suite=tmp_path / "suite.json")
    for shipped in ("malaria-cells-fields.keras", "malaria-cells-fields.onnx"):
        carried = FieldFigures.from_model(load_model(tmp_path / "out" / shipped)).shift_suite
        assert carried["conditions"]["blur_1.5"] == {
            "infected_found_pct": 40.0, "false_positive_rate_pct": 0.1, "parasitemia_mae_points": 0.5,
            "detection_f1": 0.9, "unread_fields": 0, "healthy_call": "negative", "floor": False}
        assert carried["failed"] == ["blur_1.5"] and carried["fields"] == {"iml": 6, "nih": 1}
    (tmp_path / "other.json").write_text(json.dumps({**report, "model": "/elsewhere/another.keras"}))
    with pytest.raises(MalariaCellsError, match="reports model"):
        ship(made, cell_dataset, to=tmp_path / "out2", shift_suite=tmp_path / "other.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(MalariaCellsError, match="not a report"):
        ship(made, cell_dataset, to=tmp_path / "out2", shift_suite=tmp_path / "list.json")


def test_consistency_training_fits_both_views_and_is_refused_where_it_cannot_run(crops):
    from malaria_cells.fields.training import finetune
    from malaria_cells.runtimes import DEFAULT_MODEL

    x, y = crops.crops[:96], (crops.labels[:96] == 1).astype(np.float32)
    base = load_model(DEFAULT_MODEL).keras_model.get_weights()
    model = finetune(x, y, Recipe(epochs=1, consistency=1.0))
    trained = model.keras_model.get_weights()
    assert len(trained) == len(base) and any(not np.allclose(a, b) for a, b in zip(trained, base))
    assert np.isfinite(model.probability(x[:8])).all()
    with pytest.raises(MalariaCellsError, match="consistency must be a number >= 0"):
        Recipe(consistency=-1.0)
    with pytest.raises(MalariaCellsError, match="without a strategy"):
        finetune(x, y, Recipe(epochs=1, consistency=1.0), strategy=object())


def test_the_command_line_steps_and_their_one_line_errors(fields, tmp_path, capsys):
    assert main(["crops", "--fields", str(fields / "train"), "--check", str(fields / "check"),
                 "--work", str(tmp_path)]) == 0
    assert (tmp_path / "field_crops.npz").is_file()
    assert len(json.loads((tmp_path / "fields.json").read_text())["fields"]) == 7
    assert main(["final", "--work", str(tmp_path), "--blocks", "3"]) == 2
    assert "run the cv step" in capsys.readouterr().err
    assert main(["cv", "--work", str(tmp_path), "--max-fpr", "2"]) == 2
    assert "max_fpr must be in [0, 1]" in capsys.readouterr().err
    assert main(["all", "--work", str(tmp_path)]) == 2
    assert "all needs --fields" in capsys.readouterr().err
    assert main(["crops", "--fields", str(fields / "train"), "--work", str(tmp_path), "--strategy", "mirrored"]) == 2
    assert "give it to cv or final" in capsys.readouterr().err


def test_two_worker_processes_cross_validate_as_one_process_does(crops, made, tmp_path):
    """``cv --strategy multi-worker``: two local workers (TF_CONFIG) train each fold together, only
    the chief writes, and the out-of-fold scores rank cells as the single process's do."""
    import os
    import subprocess
    import sys

    from sklearn.metrics import roc_auc_score

    from conftest import free_ports

    recipe, _, one_process, _, _ = made
    crops.save(tmp_path)
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
    flags = ["--epochs", str(recipe.epochs), "--blocks", str(recipe.blocks), "--specks", str(recipe.specks),
             "--max-fpr", str(recipe.max_fpr), "--oversample", str(recipe.oversample), "--augment", recipe.augment]
    workers = [subprocess.Popen([sys.executable, "-m", "malaria_cells.fields.training", "cv", "--work", str(tmp_path),
                                 "--strategy", "multi-worker", *flags],
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": "",
                                     "TF_CONFIG": json.dumps({"cluster": cluster,
                                                              "task": {"type": "worker", "index": index}})},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for index in range(2)]
    try:
        outputs = [worker.communicate(timeout=600) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert [worker.returncode for worker in workers] == [0, 0], outputs[1][1][-2000:]
    chief, other = (out for out, _ in outputs)
    assert '"max_fpr"' in chief and '"max_fpr"' not in other  # the nested report, printed by the chief alone
    two_workers = [np.load(tmp_path / f"fold{k}-probability.npy") for k in range(recipe.blocks)]
    block_of = crops.block_of(recipe.blocks)

    def out_of_fold_auc(probabilities):
        held = np.array([probabilities[block_of[f]][i] if f in block_of else -1
                         for i, f in enumerate(crops.field)])
        known = (held >= 0) & (crops.labels >= 0)
        return roc_auc_score(crops.labels[known], held[known])

    # the random streams under a strategy are not the default path's: as far apart as two seeds
    assert out_of_fold_auc(two_workers) == pytest.approx(out_of_fold_auc(one_process), abs=0.05)
    assert out_of_fold_auc(two_workers) > 0.9
