import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from malaria_cells import MalariaCellsError, iter_predictions, load_model, predict
from malaria_cells.images import preprocess

from conftest import make_cell


def test_predict_labels_synthetic_cells(trained_run, tmp_path):
    rng = np.random.default_rng(42)
    for i in range(6):
        Image.fromarray(make_cell(i % 2 == 0, rng, 60)).save(tmp_path / f"{i}.png")
    results = predict(tmp_path, trained_run["model_path"])
    assert [Path(r.path).name for r in results] == [f"{i}.png" for i in range(6)]
    assert sum(r.parasitized == (int(Path(r.path).stem) % 2 == 0) for r in results) >= 5


def test_bad_files_are_reported_and_skipped(trained_run, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(make_cell(True, rng)).save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "Thumbs.db").write_bytes(b"junk")
    skipped = []
    results = list(iter_predictions([tmp_path, tmp_path / "nope.png"], trained_run["model_path"], skipped=skipped))
    assert [Path(r.path).name for r in results] == ["good.png"]
    assert {Path(p).name: why for p, why in skipped} == {
        "Thumbs.db": "not an image file", "empty.jpg": "empty file", "nope.png": "no such file or folder",
        "corrupt.png": "corrupt PNG (no image header)"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict(tmp_path, trained_run["model_path"])
    assert "skipped 3 files" in str(caught[0].message)


def test_threshold_override_changes_labels(trained_run, tmp_path):
    Image.fromarray(make_cell(False, np.random.default_rng(1))).save(tmp_path / "c.png")
    assert predict(tmp_path, trained_run["model_path"], threshold=0.0)[0].parasitized
    assert not predict(tmp_path, trained_run["model_path"], threshold=1.0)[0].parasitized
    with pytest.raises(MalariaCellsError, match="between 0 and 1"):
        predict(tmp_path, trained_run["model_path"], threshold=1.5)


def test_api_scores_arrays_like_files(trained_run, tmp_path):
    model = load_model(trained_run["model_path"])
    cell = make_cell(True, np.random.default_rng(3), 50)
    Image.fromarray(cell).save(tmp_path / "x.png")
    image = preprocess((tmp_path / "x.png").read_bytes(), model.image_size)
    assert model.probability(image)[0] == pytest.approx(predict(tmp_path / "x.png", model)[0].probability, abs=1e-6)


def test_load_model_errors_are_one_line(tmp_path):
    with pytest.raises(MalariaCellsError, match="model file not found"):
        load_model(tmp_path / "missing.keras")
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    with pytest.raises(MalariaCellsError, match="cannot load model") as error:
        load_model(tmp_path / "broken.keras")
    assert "\n" not in str(error.value)
    (tmp_path / "model.h5").write_bytes(b"x")
    with pytest.raises(MalariaCellsError, match="unsupported model format"):
        load_model(tmp_path / "model.h5")


def test_tta_is_invariant_to_rotating_and_mirroring_the_cell(trained_run):
    model = load_model(trained_run["model_path"])
    image = make_cell(True, np.random.default_rng(5), model.image_size).astype(np.float32)
    variants = np.stack([image, np.rot90(image), np.fliplr(image), np.rot90(image, 3)])
    with_tta = model.probability(variants, tta=True)
    assert np.allclose(with_tta, with_tta[0], atol=1e-5)
    views = np.stack([np.rot90(image, k) for k in range(4)] + [np.fliplr(np.rot90(image, k)) for k in range(4)])
    assert with_tta[0] == pytest.approx(model.probability(views).mean(), abs=1e-5)


def test_scores_are_the_networks_for_uint8_and_float_cells(trained_run):
    model = load_model(trained_run["model_path"])  # its network runs with batch norms fused
    cells = np.stack([make_cell(i % 2 == 0, np.random.default_rng(i), model.image_size) for i in range(6)])
    expected = model.keras_model.predict(cells.astype(np.float32), verbose=0).ravel()
    assert np.allclose(model.probability(cells), expected, atol=1e-5)
    assert np.allclose(model.probability(cells.astype(np.float64)), expected, atol=1e-5)


def test_models_scored_ahead_on_threads_keep_file_order_and_skips(trained_run, tmp_path):
    pytest.importorskip("tf2onnx")
    from malaria_cells.export import export_model

    rng = np.random.default_rng(7)
    for i in range(11):
        Image.fromarray(make_cell(i % 3 == 0, rng, 40 + i)).save(tmp_path / f"{i:02d}.png")
    (tmp_path / "05b.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    onnx = load_model(export_model(trained_run["model_path"], tmp_path.parent / f"{tmp_path.name}.onnx", format="onnx"))
    assert onnx.parallel_batches  # the path under test
    keras = load_model(trained_run["model_path"])
    ahead_skipped, skipped = [], []
    ahead = list(iter_predictions([tmp_path], onnx, batch_size=2, skipped=ahead_skipped))
    in_turn = list(iter_predictions([tmp_path], keras, batch_size=2, skipped=skipped))
    assert [r.path for r in ahead] == [r.path for r in in_turn] == sorted(str(p) for p in tmp_path.glob("[0-9]*.png")
                                                                         if p.name != "05b.png")
    np.testing.assert_allclose([r.probability for r in ahead], [r.probability for r in in_turn], atol=1e-5)
    assert ahead_skipped == skipped == [(str(tmp_path / "05b.png"), "corrupt PNG (no image header)")]


def test_predict_proba_has_scikit_learns_shape_and_class_order(trained_run):
    model = load_model(trained_run["model_path"])
    cells = np.random.default_rng(0).integers(0, 256, (5, model.image_size, model.image_size, 3), dtype=np.uint8)
    proba = model.predict_proba(cells)
    assert proba.shape == (5, 2) and list(model.classes_) == ["Uninfected", "Parasitized"]
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert np.allclose(proba[:, 1], model.probability(cells))
    assert model.predict(cells).tolist() == (proba[:, 1] >= model.threshold).astype(int).tolist()
    with pytest.raises(MalariaCellsError, match="shape"):
        model.predict_proba(cells[:, :10])
