import json

import numpy as np
import pytest
from PIL import Image

from malaria_cells import MalariaCellsError
from malaria_cells.fields import RULE_OUT, call_sample, screen

from conftest import encode, make_field


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """Two samples of synthetic fields: one with infected cells, one healthy."""
    root = tmp_path_factory.mktemp("fields")
    for name, infected in (("infected", (2, 9, 17, 30, 41)), ("healthy", ())):
        (root / name).mkdir()
        for k in range(2):
            image, _ = make_field(np.random.default_rng(k + 10 * len(infected)), infected=infected)
            Image.fromarray(image).save(root / name / f"field{k}.jpg", quality=92)
    return root


def test_screen_counts_every_cell_and_reports_per_field_and_sample(sample):
    result = screen([sample / "infected", sample / "healthy"])
    assert [s.name for s in result.samples] == ["infected", "healthy"]
    assert len(result.fields) == 4 and result.summary.name == "all"
    for item in result.fields:
        assert 55 <= item.n_cells <= 68, item.n_cells  # 63 cells drawn
        assert item.frame == "stored" and (item.width, item.height) == (900, 700)
        assert item.parasitemia == item.n_parasitized / item.n_cells
        low, high = item.parasitemia_ci
        assert low <= item.parasitemia <= high
        for cell in item.cells:
            x0, y0, x1, y1 = cell.bbox
            assert x0 <= cell.x <= x1 and y0 <= cell.y <= y1
            assert cell.label in ("Parasitized", "Uninfected") and 0 <= cell.probability <= 1
    assert result.summary.n_cells == sum(f.n_cells for f in result.fields)
    # two fields of 63 cells are too few for a call either way
    assert all(s.call == "review" and "cells counted" in s.reasons[0] for s in result.samples)


def test_the_json_form_has_the_documented_keys(sample):
    data = json.loads(json.dumps(screen(sample / "healthy").to_dict(), default=float))
    assert set(data) >= {"fields", "summary"} and "samples" not in data
    field = data["fields"][0]
    assert set(field) >= {"path", "width", "height", "frame", "quality", "n_cells", "n_parasitized", "parasitemia",
                          "parasitemia_ci", "cells"}
    assert set(field["cells"][0]) == {"x", "y", "bbox", "probability", "label", "stage", "stage_probability"}
    assert field["sample"] == "healthy"
    assert set(data["summary"]) >= {"fields", "n_cells", "n_parasitized", "parasitemia", "parasitemia_ci", "call",
                                    "density", "stages", "metadata"}


def test_bad_files_are_skipped_and_reported(sample, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    result = screen([sample / "healthy" / "field0.jpg", tmp_path / "broken.jpg", tmp_path / "missing.jpg"])
    assert len(result.fields) == 1
    assert {p for p, _ in result.skipped} == {str(tmp_path / "broken.jpg"), str(tmp_path / "missing.jpg")}


def test_exif_orientation_leaves_coordinates_in_the_stored_grid(tmp_path):
    image, cells = make_field(np.random.default_rng(3))
    exif = Image.Exif()
    exif[0x0112] = 8
    (tmp_path / "turned.jpg").write_bytes(encode(image, "JPEG", exif=exif.tobytes(), quality=92))
    item = screen(tmp_path / "turned.jpg").fields[0]
    assert (item.width, item.height) == (900, 700) and item.frame == "stored"
    found = np.array([[c.x, c.y] for c in item.cells])
    nearest = [np.min(np.hypot(*(found - [x, y]).T)) for x, y, _ in cells]
    assert np.median(nearest) < 3


@pytest.mark.parametrize("n_parasitized, n_cells, call", [
    (3, 1100, "negative"),      # a healthy patient's scattered false alarms
    (12, 1100, "positive"),     # 1% parasitemia
    (60, 1100, "positive"),
    (2, 150, "review"),         # too few cells to say
    (6, 1100, "review"),        # borderline
])
def test_the_call_rule(n_parasitized, n_cells, call):
    outcome, reasons = call_sample(n_parasitized, n_cells, false_positive_rate=0.003)
    assert outcome == call and reasons


def test_negative_needs_enough_cells_to_rule_out_the_floor():
    assert call_sample(0, 250, false_positive_rate=0.003)[0] == "review"  # 0 of 250: upper bound 1.5%
    assert call_sample(0, 1000, false_positive_rate=0.003)[0] == "negative"
    # the rule-out level is what the negative call's upper bound is held to
    upper_400 = call_sample(0, 400, false_positive_rate=0.003, corrected=None)
    assert upper_400[0] == "negative" and f"below {RULE_OUT:.0%}" in upper_400[1][0]


def test_low_quality_fields_make_the_sample_review():
    assert call_sample(0, 1000, false_positive_rate=0.003, good_fields=1, fields=3)[0] == "review"


def test_corrected_parasitemia_uses_the_field_figures(sample, trained_run):
    from malaria_cells import load_model
    from malaria_cells.fields import screen_image

    model = load_model(trained_run["model_path"])
    model.info = {**model.info, "field": {"threshold": 0.5, "sensitivity": 0.8, "specificity": 0.99}}
    item = screen_image((sample / "infected" / "field0.jpg").read_bytes(), model)
    raw = item.n_parasitized / item.n_cells
    assert item.corrected["parasitemia"] == pytest.approx(max(0.0, (raw - 0.01) / 0.79))
    assert item.corrected["sensitivity"] == 0.8


def test_counting_scores_average_the_eight_views_of_cells_past_the_gate(trained_run):
    from malaria_cells import load_model
    from malaria_cells.fields import counting_probability

    model = load_model(trained_run["model_path"])
    crops = np.random.default_rng(0).integers(0, 256, (12, model.image_size, model.image_size, 3), dtype=np.uint8)
    plain, views = model.probability(crops), model.probability(crops, tta=True)
    assert not np.allclose(plain, views)
    np.testing.assert_allclose(counting_probability(model, crops, tta_gate=1.0), plain, rtol=1e-6)
    np.testing.assert_allclose(counting_probability(model, crops, tta_gate=0.0), views, rtol=1e-6)
    gate = float(np.median(plain))
    model.info = {**model.info, "field": {"threshold": 0.5, "sensitivity": 0.8, "specificity": 0.99, "tta_gate": gate}}
    np.testing.assert_allclose(counting_probability(model, crops), np.where(plain >= gate, views, plain), rtol=1e-6)


def test_a_threshold_out_of_range_is_a_clear_error(sample):
    with pytest.raises(MalariaCellsError, match="threshold"):
        screen(sample / "healthy", threshold=1.5)
