import json

import numpy as np
import pytest

from malaria_cells import MalariaCellsError, evaluate, load_model, predict
from malaria_cells.cli import main
from malaria_cells.datasets import list_cell_images
from malaria_cells.pipeline import read_images
from malaria_cells.export import check_parity, export_model
from malaria_cells.runtimes import sidecar_path


@pytest.fixture(scope="module")
def calibration(cell_dataset):
    files = list_cell_images(cell_dataset)
    return read_images(files.paths[::3], 32)[0]


@pytest.fixture(scope="module")
def probe(cell_dataset):
    files = list_cell_images(cell_dataset)
    return read_images(files.paths[:40], 32)[0]


@pytest.mark.parametrize("fmt, quantize, tolerance", [
    ("tflite", "none", 1e-5), ("tflite", "float16", 5e-3), ("tflite", "int8", 0.1),
    ("onnx", "none", 1e-5), ("onnx", "int8", 0.15),
])
def test_exports_carry_threshold_and_size_and_predict_alike(trained_run, tmp_path, calibration, probe,
                                                            fmt, quantize, tolerance):
    reference = load_model(trained_run["model_path"])
    out = export_model(reference, tmp_path / f"m.{fmt}", format=fmt, quantize=quantize,
                       calibration_images=calibration)
    metadata = json.loads(sidecar_path(out).read_text())
    assert metadata["threshold"] == pytest.approx(reference.threshold)
    exported = load_model(out)
    assert exported.image_size == 32 and exported.threshold == pytest.approx(reference.threshold)
    difference = np.abs(exported.probability(probe) - reference.probability(probe))
    assert np.mean(difference) < tolerance
    if fmt == "onnx":  # the metadata is embedded too: the file alone is enough
        sidecar_path(out).unlink()
        assert load_model(out).threshold == pytest.approx(reference.threshold)


def test_saved_model_export(trained_run, tmp_path, probe):
    import tensorflow as tf

    out = export_model(trained_run["model_path"], tmp_path / "sm", format="saved_model")
    served = tf.saved_model.load(str(out))
    scores = served.serve(tf.constant(probe, tf.float32)).numpy().ravel()
    assert np.allclose(scores, load_model(trained_run["model_path"]).probability(probe), atol=1e-5)
    assert json.loads(sidecar_path(out).read_text())["image_size"] == 32


def test_predict_evaluate_and_parity_accept_exports(trained_run, tmp_path, cell_dataset):
    out = export_model(trained_run["model_path"], tmp_path / "m.tflite", format="tflite")
    keras_rows = predict(cell_dataset / "Parasitized", trained_run["model_path"])
    lite_rows = predict(cell_dataset / "Parasitized", out)
    assert [r.label for r in keras_rows] == [r.label for r in lite_rows]
    assert evaluate(out, cell_dataset, resamples=0)["n"] == 192
    parity = check_parity(trained_run["model_path"], out, cell_dataset)
    assert parity["agreement"] == 1.0 and parity["accuracy_difference_points"] == 0


def test_info_describes_an_export(trained_run, tmp_path, capsys):
    from malaria_cells.cli import main

    out = export_model(trained_run["model_path"], tmp_path / "m.tflite", format="tflite")
    capsys.readouterr()
    assert main(["info", "--model", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == str(out) and summary["parameters"] is None
    assert summary["runtime"] == "LiteRT" or "TFLite" in summary["runtime"]
    assert summary["threshold"] == pytest.approx(load_model(trained_run["model_path"]).threshold)


def test_int8_tflite_keeps_the_sigmoid_in_float(trained_run, tmp_path, calibration, probe):
    # A quantized sigmoid can only output multiples of 1/256: too coarse near a low threshold.
    out = export_model(trained_run["model_path"], tmp_path / "m.tflite", quantize="int8",
                       calibration_images=calibration)
    scores = load_model(out).probability(probe).astype(np.float64)
    off_grid = np.abs(scores * 256 - np.round(scores * 256)) > 1e-3
    assert off_grid.mean() > 0.5


def test_cli_export_with_check(trained_run, tmp_path, cell_dataset, capsys):
    out = tmp_path / "m.onnx"
    status = main(["export", "--model", trained_run["model_path"], "--format", "onnx", "--out", str(out),
                   "--check", str(cell_dataset)])
    assert status == 0 and "passed" in capsys.readouterr().out
    assert main(["export", "--model", trained_run["model_path"], "--format", "onnx", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["predict", str(cell_dataset / "Uninfected"), "--model", str(out), "--format", "csv"]) == 0


def test_bad_export_requests(trained_run, tmp_path):
    with pytest.raises(MalariaCellsError, match="calibration"):
        export_model(trained_run["model_path"], tmp_path / "m.tflite", quantize="int8")
    with pytest.raises(MalariaCellsError, match="tflite only"):
        export_model(trained_run["model_path"], tmp_path / "m.onnx", format="onnx", quantize="float16")
    (tmp_path / "bad.tflite").write_bytes(b"nonsense")
    with pytest.raises(MalariaCellsError, match="cannot load TFLite model"):
        load_model(tmp_path / "bad.tflite")


def test_train_and_retune_leave_an_onnx_copy_that_labels_alike(trained_run, tmp_path, probe):
    import shutil

    from malaria_cells import retune

    pytest.importorskip("tf2onnx")
    copy = load_model(trained_run["onnx_path"])
    original = load_model(trained_run["model_path"])
    assert copy.runtime.startswith("onnxruntime") and copy.threshold == original.threshold
    assert np.array_equal(copy.probability(probe) >= copy.threshold, original.probability(probe) >= original.threshold)
    run = tmp_path / "run"
    shutil.copytree(trained_run["run_dir"], run)
    result = retune(run, target_sensitivity=1.0, min_specificity=0.0)
    assert result["onnx_path"] == str(run / "model.onnx")
    assert load_model(run / "model.onnx").threshold == load_model(run / "model.keras").threshold == result["threshold"]


def test_an_onnx_copy_that_disagrees_or_cannot_be_made_is_not_left(trained_run, tmp_path, probe, monkeypatch):
    import shutil
    import sys

    from malaria_cells.export import write_onnx_copy
    from malaria_cells.runtimes import OnnxClassifier

    pytest.importorskip("tf2onnx")
    run = tmp_path / "run"
    shutil.copytree(trained_run["run_dir"], run)
    assert (run / "model.onnx").is_file()
    keras_labels = load_model(run / "model.keras").probability(probe) >= trained_run["threshold"]
    flipped = (~keras_labels).astype(np.float32)  # every label the other way
    monkeypatch.setattr(OnnxClassifier, "probability", lambda self, images, **kw: flipped)
    assert write_onnx_copy(run / "model.keras", probe) is None
    assert not (run / "model.onnx").exists() and not (run / "model.onnx.json").exists()
    monkeypatch.undo()
    assert write_onnx_copy(run / "model.keras", probe, scores=flipped) is None  # given scores are what it checks
    keras_scores = load_model(run / "model.keras").probability(probe)
    assert write_onnx_copy(run / "model.keras", probe, scores=keras_scores) == run / "model.onnx"
    assert write_onnx_copy(run / "model.keras", probe) == run / "model.onnx"
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # not installed: the stale copy goes too
    assert write_onnx_copy(run / "model.keras", probe) is None and not (run / "model.onnx").exists()


@pytest.mark.parametrize("hidden, quantize", [("sympy", "int8"), ("tf2onnx", "none"), ("onnx", "int8")])
def test_a_missing_export_package_is_one_line_naming_it_and_the_install(trained_run, cell_dataset, tmp_path,
                                                                        calibration, capsys, monkeypatch,
                                                                        hidden, quantize):
    import sys

    monkeypatch.setitem(sys.modules, hidden, None)  # as if not installed: `import` raises ImportError
    with pytest.raises(MalariaCellsError, match=rf"needs the Python package {hidden}, .*"
                                                r"pip install 'malaria-cells\[export\]'"):
        export_model(trained_run["model_path"], tmp_path / "m.onnx", format="onnx", quantize=quantize,
                     calibration_images=calibration)
    assert not (tmp_path / "m.onnx").exists()
    argv = ["export", "--model", trained_run["model_path"], "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
            "--quantize", quantize] + (["--calibration", str(cell_dataset)] if quantize == "int8" else [])
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert hidden in err and "pip install 'malaria-cells[export]'" in err
