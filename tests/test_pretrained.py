"""The model shipped inside the package works right after install, with no --model."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from malaria_cells import load_model, predict
from malaria_cells.cli import main
from malaria_cells import runtimes
from malaria_cells.runtimes import DEFAULT_MODEL, DEFAULT_MODEL_ONNX, default_model_path

from conftest import make_cell

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="no model shipped in this checkout")


def test_shipped_model_carries_its_metadata():
    model = load_model()
    metadata = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    assert model.threshold == pytest.approx(metadata["threshold"])
    assert model.image_size == metadata["image_size"]
    assert {"recipe", "validation", "data", "versions"} <= set(model.info)
    assert DEFAULT_MODEL.stat().st_size < 2_000_000


def test_predict_without_model_flag(tmp_path, capsys):
    Image.fromarray(make_cell(True, np.random.default_rng(0), 100)).save(tmp_path / "cell.png")
    assert main(["predict", str(tmp_path / "cell.png"), "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == str(default_model_path())
    assert main(["info"]) == 0
    assert "threshold" in capsys.readouterr().out


@pytest.mark.skipif(not DEFAULT_MODEL_ONNX.is_file(), reason="no ONNX copy shipped in this checkout")
def test_the_onnx_copy_runs_by_default_and_scores_as_the_keras_original():
    fast, original = load_model(), load_model(DEFAULT_MODEL)
    assert fast.path == str(DEFAULT_MODEL_ONNX) and fast.runtime.startswith("onnxruntime")
    assert original.runtime.startswith("TensorFlow")
    assert fast.threshold == original.threshold and fast.info == original.info
    rng = np.random.default_rng(0)
    cells = np.stack([make_cell(i % 2 == 0, rng, fast.image_size) for i in range(32)])
    assert np.allclose(fast.probability(cells), original.probability(cells), atol=1e-5)


def test_a_stale_onnx_copy_is_not_used(tmp_path, monkeypatch):
    # A retuned or retrained .keras model shipped without a new copy: the copy would use the old threshold.
    for path in (DEFAULT_MODEL, DEFAULT_MODEL.with_suffix(".json")):
        shutil.copy(path, tmp_path / path.name)
    keras_copy, onnx_copy = tmp_path / DEFAULT_MODEL.name, tmp_path / DEFAULT_MODEL_ONNX.name
    monkeypatch.setattr(runtimes, "DEFAULT_MODEL", keras_copy)
    monkeypatch.setattr(runtimes, "DEFAULT_MODEL_ONNX", onnx_copy)
    assert default_model_path() == keras_copy  # no copy at all
    metadata = json.loads(keras_copy.with_suffix(".json").read_text())
    onnx_copy.write_bytes(b"onnx")
    sidecar = tmp_path / (onnx_copy.name + ".json")
    sidecar.write_text(json.dumps({"threshold": metadata["threshold"], "info": {"trained_at": metadata["trained_at"]}}))
    assert default_model_path() == onnx_copy
    assert default_model_path(fast_start=False) == keras_copy
    sidecar.write_text(json.dumps({"threshold": 0.5, "info": {"trained_at": metadata["trained_at"]}}))
    assert default_model_path() == keras_copy
    monkeypatch.setenv("MALARIA_CELLS_MODEL", str(tmp_path / "mine.keras"))
    assert default_model_path() == tmp_path / "mine.keras"


@pytest.mark.skipif(not DEFAULT_MODEL_ONNX.is_file(), reason="no ONNX copy shipped in this checkout")
def test_predict_with_the_onnx_copy_never_imports_tensorflow(tmp_path):
    Image.fromarray(make_cell(True, np.random.default_rng(0), 100)).save(tmp_path / "cell.png")
    script = ("import sys; from malaria_cells.cli import main; "
              f"status = main(['predict', {str(tmp_path / 'cell.png')!r}]); "
              "sys.exit(status or ('tensorflow' in sys.modules and 'tensorflow was imported'))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Parasitized" in done.stdout or "Uninfected" in done.stdout


def test_shipped_model_on_real_cells(shared_data):
    # Cells the model was trained on: a smoke test that the packaged file works, not a score.
    parasitized = sorted((shared_data / "Parasitized").glob("*.png"))[:100]
    uninfected = sorted((shared_data / "Uninfected").glob("*.png"))[:100]
    results = predict(parasitized + uninfected)
    called = np.array([r.parasitized for r in results])
    assert called[:100].mean() > 0.9 and called[100:].mean() < 0.2


def test_every_real_cell_crop_passes_the_single_cell_check(shared_data):
    # crops of touching cells hold a neighbour's piece beside their own cell
    from malaria_cells.crop_check import check_cell_crop
    from malaria_cells.images import decode

    files = sorted(shared_data.rglob("*.png"))
    assert len(files) > 15_000
    refused = {f.name: reason for f in files if (reason := check_cell_crop(decode(f.read_bytes())))}
    assert not refused, refused
