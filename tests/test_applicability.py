"""What a field must look like to be read: each unreadable kind of image is listed with its
reason, never counted, and its sample is ``review``."""

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from malaria_cells import MalariaCellsError
from malaria_cells.fields import FieldFigures, Screener, render
from malaria_cells.fields.applicability import ApplicabilityLimits

from conftest import make_field
from test_fields import PurpleDotClassifier

FIGURES = FieldFigures(threshold=0.5, sensitivity=0.9, specificity=0.995)


def _field(seed=0, **kwargs):
    return make_field(np.random.default_rng(seed), size=(1100, 900), rows=9, cols=12, infected=(5, 30, 60), **kwargs)[0]


def _png(image):
    return cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))[1].tobytes()


def _grayscale(image):
    return np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)


def _shrunk(image, factor=8):
    return cv2.resize(image, None, fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA)


def _noise(image):
    return np.random.default_rng(0).integers(0, 256, image.shape, dtype=np.uint8)


def _landscape(image):
    """A photograph of something else: sky, a green hill, a red roof and a dark window."""
    height, width = image.shape[:2]
    picture = np.zeros((height, width, 3), np.uint8)
    picture[:] = np.linspace([90, 150, 235], [170, 210, 250], height)[:, None, :]
    cv2.ellipse(picture, (width // 3, height), (width // 2, height // 2), 0, 180, 360, (60, 140, 50), -1)
    for k in range(12):
        cv2.rectangle(picture, (60 + 80 * k, height // 2 + 20), (110 + 80 * k, height // 2 + 70), (170, 40, 30), -1)
        cv2.circle(picture, (85 + 80 * k, height // 2 + 100), 12, (30, 30, 40), -1)
    return picture


@pytest.mark.parametrize("shift, flag, words", [
    (_grayscale, "grayscale", "grayscale image"),
    (_shrunk, "magnification", "too small to see parasites"),
    (_noise, None, None),
    (_landscape, None, None),
])
def test_an_unreadable_field_is_listed_with_its_reason_and_not_counted(shift, flag, words):
    screener = Screener(PurpleDotClassifier(FIGURES))
    item = screener.screen_image(_png(shift(_field())), path="f.png")
    assert not item.quality["ok"] and not item.quality["applicable"], item.quality
    assert item.n_cells == 0 and item.n_parasitized == 0 and item.parasitemia is None and item.cells == []
    if flag:
        assert flag in item.quality["flags"] and any(words in r for r in item.quality["reasons"]), item.quality
    else:  # noise and a landscape fail as no red cells, or as objects not coloured like stained cells
        assert set(item.quality["flags"]) & {"no_cells", "not_a_smear", "magnification"}, item.quality


def test_a_clean_field_is_readable_and_its_measures_are_reported():
    item = Screener(PurpleDotClassifier(FIGURES)).screen_image(_png(_field()), path="f.png")
    assert item.quality["applicable"] and item.quality["ok"] and item.quality["flags"] == []
    checks = item.quality["checks"]
    assert 40 < checks["cell_diameter"] < 50 and checks["colour"] > 20
    assert all(v > 0 for v in checks["density"]) and checks["green_red"] > 1.1
    assert item.n_cells > 90 and item.n_parasitized == 3


@pytest.mark.parametrize("kind", ["target", "hypochromic"])
def test_pale_centred_cells_do_not_make_a_normally_stained_field_read_pale(kind):
    from malaria_cells.shifts import make_morphology_field

    image, cells = make_morphology_field(kind, np.random.default_rng(3))
    item = Screener(PurpleDotClassifier(FIGURES)).screen_image(_png(image), path="f.png")
    assert "stain" not in item.quality["flags"], item.quality
    counted = np.zeros(len(cells), int)
    for found in item.cells:
        inside = [cell.distance(found.x, found.y) <= 1.0 for cell in cells]
        assert any(inside), (found.x, found.y)  # no fragment counted
        counted[int(np.argmax(inside))] += 1
    assert (counted == 1).all(), counted


def test_a_sample_of_unreadable_fields_is_review_with_the_reasons_everywhere(tmp_path):
    for k, shift in enumerate((_grayscale, _grayscale, _shrunk)):
        Image.fromarray(shift(_field(k))).save(tmp_path / f"f{k}.png")
    result = Screener(PurpleDotClassifier(FIGURES)).screen(tmp_path)
    summary = result.summary
    assert summary.call == "review" and summary.n_cells == 0 and summary.parasitemia is None
    assert "3 of 3 fields not read (2 grayscale, 1 at an unsupported magnification)" in summary.reasons
    table = render(result, "table")
    assert "REVIEW" in table and "not read" in table and "grayscale" in table
    data = json.loads(render(result, "json"))
    assert data["fields"][0]["quality"]["flags"] == ["grayscale"]
    assert any("grayscale image" in r for r in data["fields"][0]["quality"]["reasons"])


def test_the_same_field_twice_is_counted_once(tmp_path):
    image = _field(3)
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(image).save(tmp_path / "a-again.jpg", quality=80)  # re-saved: the same field
    Image.fromarray(_field(4)).save(tmp_path / "b.png")
    result = Screener(PurpleDotClassifier(FIGURES)).screen(tmp_path)
    by_name = {f.path.rsplit("/", 1)[-1]: f for f in result.fields}
    duplicate = by_name["a.png"] if by_name["a-again.jpg"].quality["applicable"] else by_name["a-again.jpg"]
    assert duplicate.quality["flags"] == ["duplicate"] and duplicate.n_cells == 0
    assert "the same field as" in duplicate.quality["reasons"][-1]
    assert result.summary.n_cells == by_name["b.png"].n_cells + max(by_name["a.png"].n_cells, by_name["a-again.jpg"].n_cells)


def test_limits_are_parameters_and_validated():
    with pytest.raises(MalariaCellsError, match="below its maximum"):
        ApplicabilityLimits(min_cell_diameter=50, max_cell_diameter=40)
    strict = Screener(PurpleDotClassifier(FIGURES), applicability=ApplicabilityLimits(min_cell_diameter=60))
    item = strict.screen_image(_png(_field()))
    assert item.quality["flags"] == ["magnification"] and "at least 60 px" in item.quality["reasons"][-1]


def test_two_fields_through_one_fixed_eyepiece_are_not_taken_for_the_same_field(tmp_path):
    # the black surround and its edge are the same in every photograph from a fixed mount
    for k in range(2):
        Image.fromarray(make_field(np.random.default_rng(40 + k), size=(1100, 900), rows=9, cols=12,
                                   surround=True)[0]).save(tmp_path / f"f{k}.png")
    result = Screener(PurpleDotClassifier(FIGURES)).screen(tmp_path)
    assert all("duplicate" not in f.quality.get("flags", []) for f in result.fields)


def test_an_under_exposed_field_and_a_tiny_image_are_refused_with_a_reason(tmp_path):
    dark = (_field().astype(np.float32) * 0.15).astype(np.uint8)
    item = Screener(PurpleDotClassifier(FIGURES)).screen_image(_png(dark))
    assert "exposure" in item.quality["flags"] and item.n_cells == 0, item.quality
    (tmp_path / "tiny.png").write_bytes(_png(np.full((3, 3, 3), 200, np.uint8)))
    result = Screener(PurpleDotClassifier(FIGURES)).screen(tmp_path / "tiny.png")
    assert result.fields == [] and "image too small (3x3 pixels" in result.skipped[0][1]


def test_a_field_not_read_lists_its_reasons_in_the_table():
    screener = Screener(PurpleDotClassifier(FIGURES))
    result = screener.screen_samples([("s", [("gray.png", lambda: _png(_grayscale(_field())))])])
    table = render(result, "table")
    assert "gray.png" in table and "grayscale image (no colour" in table


def test_an_over_exposed_field_is_read_until_the_glare_hides_its_cells():
    from malaria_cells.shifts import exposure

    screener = Screener(PurpleDotClassifier(FIGURES))
    bright = screener.screen_image(_png(exposure(_field(), 1.6)))  # plasma white, cells still stained
    assert bright.quality["applicable"] and bright.quality["checks"]["blown_channels"] == 3 and bright.n_cells > 0
    for factor in (2.5, 3.5):  # the cells fade into the glare: the light, not the slide, is to blame
        item = screener.screen_image(_png(exposure(_field(), factor)))
        assert item.quality["flags"] == ["exposure"] and item.n_cells == 0, item.quality
        assert item.quality["reasons"][-1].startswith("over-exposed (the plasma is blown out in 3 of 3 channels")
