"""The floors on the real shared fields (skipped where ../shared/data/fields is absent)."""

from pathlib import Path

import pytest

from malaria_cells.fields import screen

FIELDS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fields"
pytestmark = pytest.mark.skipif(not FIELDS.is_dir(), reason="../shared/data/fields is not available")


@pytest.fixture(scope="module")
def screened():
    return {"nih": screen(FIELDS / "nih" / "239C12NThinF", truth=True),
            "iml": screen(FIELDS / "iml", truth=True)}


def test_every_red_cell_is_found_on_the_nih_photographs(screened):
    result = screened["nih"]
    assert len(result.fields) == 4 and all(f.width == 5312 and f.height == 2988 for f in result.fields)
    assert result.summary.truth["f1"] >= 0.95, result.summary.truth
    assert all(f.truth["f1"] >= 0.95 for f in result.fields)
    assert all(f.quality["ok"] for f in result.fields)


def test_every_red_cell_is_found_on_the_iml_fields(screened):
    result = screened["iml"]
    assert len(result.fields) == 115
    assert result.summary.truth["f1"] >= 0.90, result.summary.truth
    # nearly every annotated infected cell is found (before classification)
    stages = result.summary.truth["stages"]
    assert sum(s["detected"] for s in stages.values()) >= 0.9 * sum(s["n"] for s in stages.values()), stages


def test_the_healthy_patient_is_called_negative_with_few_false_alarms(screened):
    summary = screened["nih"].summary
    assert summary.call == "negative", summary
    assert summary.parasitemia <= 0.005, summary


def test_the_field_models_onnx_copy_labels_shared_field_cells_as_its_keras_file():
    # screen runs the ONNX copy by default; it must count exactly what the .keras file counts
    import numpy as np

    from malaria_cells.fields import Screener
    from malaria_cells.images import read_file
    from malaria_cells.runtimes import FIELD_MODEL, load_model

    onnx = Screener(FIELD_MODEL.with_suffix(".onnx"))
    keras = Screener(FIELD_MODEL)
    assert onnx.threshold == keras.threshold and onnx.figures == keras.figures
    paths = sorted((FIELDS / "iml").glob("*.JPG"))[::10]
    crops = np.concatenate([onnx.screen_image(read_file(p), keep_crops=True)[1] for p in paths])
    assert len(crops) > 1000
    from_onnx, from_keras = onnx.score(crops), keras.score(crops)
    np.testing.assert_allclose(from_onnx, from_keras, atol=1e-4)
    assert np.array_equal(from_onnx >= onnx.threshold, from_keras >= keras.threshold)
