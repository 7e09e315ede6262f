"""The model shipped inside the package works right after install, with no --model."""

import json

import numpy as np
import pytest
from PIL import Image

from malaria_cells import load_model, predict
from malaria_cells.cli import main
from malaria_cells.inference import DEFAULT_MODEL

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
    assert result["model"] == str(DEFAULT_MODEL)
    assert main(["info"]) == 0
    assert "threshold" in capsys.readouterr().out


def test_shipped_model_on_real_cells(shared_data):
    # Cells the model was trained on: a smoke test that the packaged file works, not a score.
    parasitized = sorted((shared_data / "Parasitized").glob("*.png"))[:100]
    uninfected = sorted((shared_data / "Uninfected").glob("*.png"))[:100]
    results = predict(parasitized + uninfected)
    called = np.array([r.parasitized for r in results])
    assert called[:100].mean() > 0.9 and called[100:].mean() < 0.2
