"""The screening core through its public API: a Screener composed of swappable parts, its call
on whole synthetic samples, the typed field figures and the output formats."""

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from malaria_cells import MalariaCellsError
from malaria_cells.fields import (FORMATS, ClassicalDetector, FieldDetection, FieldFigures, Screener, detect_cells,
                                  render)
from malaria_cells.runtimes import CellClassifier

from conftest import make_field


class PurpleDotClassifier(CellClassifier):
    """A rule, not a network: the share of a crop's pixels stained the synthetic parasites'
    dark purple. It tells the synthetic fields' infected cells from the rest without error,
    so the call rule is tested apart from any trained model's quality."""

    runtime = "rule"

    def __init__(self, figures: FieldFigures | None = None):
        super().__init__("purple-dot-rule", 64, 0.5, {"field": figures.to_info()} if figures else {})

    def _score(self, images):
        images = np.asarray(images, np.float32)
        if images.max() <= 1.0:
            images = images * 255
        red, green, blue = images[..., 0], images[..., 1], images[..., 2]
        purple = (red > 40) & (green < 80) & (blue > 1.1 * red)
        return np.clip(purple.reshape(len(images), -1).sum(axis=1) / 40.0, 0, 1)


FIGURES = FieldFigures(threshold=0.5, sensitivity=0.9, specificity=0.995)


def _write_sample(folder, n_fields, infected_per_field, seed):
    folder.mkdir(parents=True)
    for k in range(n_fields):
        infected = tuple(range(3, 3 + 7 * infected_per_field[k], 7))
        image, _ = make_field(np.random.default_rng(seed + k), infected=infected)
        Image.fromarray(image).save(folder / f"field{k}.png")


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    _write_sample(root / "infected", 4, [5, 5, 5, 5], 100)   # 20 of ~250 cells: 8%
    _write_sample(root / "healthy", 8, [0] * 8, 200)         # 0 of ~500
    _write_sample(root / "borderline", 8, [1, 1, 1, 0, 0, 0, 0, 0], 300)  # 3 of ~500
    return root


def test_an_infected_sample_is_positive_a_healthy_one_negative_and_a_borderline_one_review(samples):
    screener = Screener(PurpleDotClassifier(FIGURES))
    result = screener.screen([samples / "infected", samples / "healthy", samples / "borderline"])
    calls = {s.name: s.call for s in result.samples}
    assert calls == {"infected": "positive", "healthy": "negative", "borderline": "review"}, \
        {s.name: (s.n_parasitized, s.n_cells, s.reasons) for s in result.samples}
    infected = result.samples[0]
    assert infected.n_parasitized == 20 and infected.parasitemia_ci[0] < infected.parasitemia < infected.parasitemia_ci[1]
    assert result.samples[1].n_parasitized == 0
    assert "borderline" in result.samples[2].reasons[0]
    assert result.summary.name == "all" and result.summary.n_cells == sum(s.n_cells for s in result.samples)


def test_too_few_cells_is_review_whatever_the_count(samples):
    screener = Screener(PurpleDotClassifier(FIGURES))
    result = screener.screen(sorted((samples / "infected").iterdir())[:1])
    assert result.summary.call == "review" and "cells counted" in result.summary.reasons[0]


def test_the_figures_the_model_carries_set_the_threshold_correction_and_call(samples):
    field = samples / "infected" / "field0.png"
    carried = Screener(PurpleDotClassifier(FieldFigures(threshold=0.99, sensitivity=0.5, specificity=0.9)))
    assert carried.threshold == 0.99 and carried.false_positive_rate == pytest.approx(0.1)
    item = carried.screen_image(field.read_bytes())
    raw = item.n_parasitized / item.n_cells
    assert item.corrected["parasitemia"] == pytest.approx(max(0.0, (raw - 0.1) / 0.4))
    plain = Screener(PurpleDotClassifier())  # no figures: its own threshold, 1% false alarms assumed
    assert plain.threshold == 0.5 and plain.false_positive_rate == 0.01 and plain.figures is None
    assert plain.screen_image(field.read_bytes()).corrected is None
    assert Screener(PurpleDotClassifier(FIGURES), threshold=0.3).threshold == 0.3


def test_field_figures_are_validated_and_round_trip_through_a_model_file(trained_run, tmp_path):
    from malaria_cells import load_model

    with pytest.raises(MalariaCellsError, match="sensitivity"):
        FieldFigures(threshold=0.5, sensitivity=1.5, specificity=0.99)
    with pytest.raises(MalariaCellsError, match="plasma_reference"):  # a plasma without a stain to bring
        FieldFigures(threshold=0.5, sensitivity=0.9, specificity=0.99, plasma_reference=[200, 210, 205])
    with pytest.raises(MalariaCellsError, match="plasma_reference"):
        FieldFigures(threshold=0.5, sensitivity=0.9, specificity=0.99, stain_reference=[0.2, 0.4, 0.3],
                     plasma_reference=[200, 310, 205])
    with pytest.raises(MalariaCellsError, match="missing specificity"):
        FieldFigures.from_info({"field": {"threshold": 0.5, "sensitivity": 0.8}})
    assert FieldFigures.from_info({"name": "a cell model"}) is None
    figures = FieldFigures(threshold=0.7, sensitivity=0.8, specificity=0.99, tta_gate=0.1, cells={"infected": 3},
                           extra={"future_key": [1, 2]})
    model = load_model(trained_run["model_path"])
    figures.attach(model)
    model.save(tmp_path / "with-figures.keras")
    again = load_model(tmp_path / "with-figures.keras")
    assert FieldFigures.from_model(again) == figures and again.threshold == pytest.approx(0.7)
    assert again.info["field"]["future_key"] == [1, 2]


class HalfFieldDetector:
    """Another detector: the classical one, with every object in the right half of the field
    excluded (a detector that only trusts part of the image)."""

    def __init__(self):
        self.inner = ClassicalDetector()

    def detect(self, image) -> FieldDetection:
        detection = self.inner.detect(image)
        for item in detection.objects:
            if item.kind == "red_cell" and item.x > image.shape[1] / 2:
                item.kind = "edge"
        return detection

    def describe(self):
        return {"name": "left-half"}


def test_the_detector_is_swappable_and_described_in_every_result(samples):
    field = samples / "healthy" / "field0.png"
    whole = Screener(PurpleDotClassifier(FIGURES)).screen(field)
    half = Screener(PurpleDotClassifier(FIGURES), HalfFieldDetector()).screen(field)
    assert 0 < half.fields[0].n_cells < whole.fields[0].n_cells
    assert all(c.x <= 450 for c in half.fields[0].cells)
    assert half.model["detector"] == {"name": "left-half"}
    assert whole.model["detector"] == {"name": "classical", "settings": {}}
    with pytest.raises(MalariaCellsError, match="detect"):
        Screener(PurpleDotClassifier(), detector=object())


class CountingDetector(ClassicalDetector):
    """The classical detector, remembering the width of every image it was given."""

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "widths", [])

    def detect(self, image):
        self.widths.append(image.shape[1])
        return super().detect(image)


def test_a_large_photograph_is_read_larger_only_when_its_cells_could_then_be_read():
    def png(image):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    # 4,200 px wide: read at half size, where cells 30 px across come out 15 px
    image, _ = make_field(np.random.default_rng(0), size=(4200, 420), radius=15, rows=4, cols=80)
    small_cells = CountingDetector()
    item = Screener(PurpleDotClassifier(FIGURES), small_cells).screen_image(png(image), path="wide.png")
    assert small_cells.widths == [2100, 4200]
    assert item.quality["applicable"] and 25 < item.cell_diameter < 40, item.quality
    noise = np.random.default_rng(0).integers(0, 256, (420, 4200, 3), dtype=np.uint8)
    once = CountingDetector()
    item = Screener(PurpleDotClassifier(FIGURES), once).screen_image(png(noise), path="noise.png")
    assert once.widths == [2100] and not item.quality["applicable"]


def test_detector_settings_are_validated_and_change_what_is_counted():
    with pytest.raises(MalariaCellsError, match="clump_cells"):
        ClassicalDetector(clump_cells=-1)
    with pytest.raises(MalariaCellsError, match="working_diameter"):
        ClassicalDetector(working_diameter=2)
    image, cells = make_field(np.random.default_rng(4), platelets=10)
    default = detect_cells(image)
    assert len(default.cells) == len(cells)
    # a platelet bound above a whole cell's area sorts every cell out as debris
    assert detect_cells(image, platelet_area=1.5).cells == []
    assert ClassicalDetector(platelet_area=1.5).describe() == {"name": "classical", "settings": {"platelet_area": 1.5}}
    # a low-quality verdict follows min_cells
    assert not detect_cells(image, min_cells=len(cells) + 1).quality["ok"]


def test_every_registered_format_renders_the_same_result(samples):
    result = Screener(PurpleDotClassifier(FIGURES)).screen(samples / "infected")
    assert set(FORMATS) == {"table", "json", "csv"}
    table = render(result, "table")
    assert "POSITIVE" in table and "field0.png" in table and table.count("\n") >= len(result.fields) + 3
    data = json.loads(render(result, "json"))
    assert data["summary"]["call"] == "positive" and len(data["fields"]) == 4
    assert data["model"]["counting_threshold"] == 0.5 and data["model"]["path"] == "purple-dot-rule"
    rows = render(result, "csv").splitlines()
    assert rows[0].startswith("field,frame,x,y") and len(rows) == 1 + sum(f.n_cells for f in result.fields)
    assert sum(",Parasitized," in row for row in rows) == 20
    with pytest.raises(MalariaCellsError, match="unknown format"):
        render(result, "xml")


def test_a_report_written_inside_the_input_folder_is_not_screened_as_fields(samples, tmp_path):
    import shutil

    from malaria_cells.fields.report import ReportWriter

    folder = tmp_path / "patient"
    shutil.copytree(samples / "infected", folder)
    screener = Screener(PurpleDotClassifier(FIGURES))
    writer = ReportWriter(folder / "report")
    first = screener.screen(folder, on_field=writer.add)
    writer.finish(first)
    assert len(list((folder / "report" / "overlays").glob("*.jpg"))) == len(first.fields) == 4
    again = screener.screen(folder)
    assert [f.path for f in again.fields] == [f.path for f in first.fields]
    assert again.samples[0].n_cells == first.samples[0].n_cells


def test_one_bad_field_is_skipped_and_the_rest_screened(samples, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    screener = Screener(PurpleDotClassifier(FIGURES))
    result = screener.screen_samples([("s", [("good", lambda: (samples / "healthy" / "field0.png").read_bytes()),
                                             ("broken", lambda: (tmp_path / "broken.png").read_bytes())])])
    assert [f.path for f in result.fields] == ["good"] and [p for p, _ in result.skipped] == ["broken"]


class TroubleDetector(ClassicalDetector):
    """The classical detector, slow or failing on images of a given width (as a hostile file
    might make a detector): the screening loop must report that field and go on."""

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "trouble", {})

    def detect(self, image):
        kind = self.trouble.get(image.shape[1])
        if kind == "slow":
            import time

            time.sleep(5.0)
        elif kind == "error":
            raise RuntimeError("OpenCV(4.11) error: (-215:Assertion failed) !ssize.empty()\nmore lines")
        return super().detect(image)


def _field_bytes(width, seed=0):
    image, _ = make_field(np.random.default_rng(seed))
    image = np.ascontiguousarray(image[:, :width])
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_field_past_its_time_limit_or_failing_inside_a_library_is_reported_and_the_rest_go_on():
    from malaria_cells.fields import FieldTimeout

    detector = TroubleDetector()
    detector.trouble.update({800: "slow", 700: "error"})
    screener = Screener(PurpleDotClassifier(FIGURES), detector, max_field_seconds=3.5)
    fields = [("slow", lambda: _field_bytes(800)), ("error", lambda: _field_bytes(700)),
              ("good", lambda: _field_bytes(600))]
    result = screener.screen_samples([("s", fields)])
    assert [f.path for f in result.fields] == ["good"] and result.fields[0].n_cells > 0
    reasons = dict(result.skipped)
    assert re.fullmatch(r"not screened: its limit of 3.5 s per field ran out after \d+\.\d s, while finding the cells",
                        reasons["slow"])
    assert reasons["error"] == "could not be screened (RuntimeError: OpenCV(4.11) error: (-215:Assertion failed) !ssize.empty())"
    assert issubclass(FieldTimeout, MalariaCellsError)
    # a limit for the whole loop: the fields after it are reported, the ones before it kept
    screener = Screener(PurpleDotClassifier(FIGURES), detector)
    result = screener.screen_samples([("s", [("good", lambda: _field_bytes(600)), ("slow", lambda: _field_bytes(800)),
                                             ("late", lambda: _field_bytes(600))])], max_seconds=3.5)
    assert [f.path for f in result.fields] == ["good"]
    assert dict(result.skipped)["slow"].startswith("not screened: the time limit for all fields ran out after")
    assert dict(result.skipped)["late"] == "not screened: the time limit of 3.5 s for all fields was reached first"
    for bad in (0, -1, float("nan"), "5"):
        with pytest.raises(MalariaCellsError, match="seconds"):
            Screener(PurpleDotClassifier(FIGURES), max_field_seconds=bad)


def test_a_sample_out_of_focus_is_not_called_negative_but_a_positive_stands(tmp_path):
    def sample(name, infected_per_field, blur):
        folder = tmp_path / name
        folder.mkdir()
        for k, n in enumerate(infected_per_field):
            image, _ = make_field(np.random.default_rng(200 + k), infected=tuple(range(3, 3 + 7 * n, 7)), blur=blur)
            Image.fromarray(image).save(folder / f"field{k}.png")
        return folder

    screener = Screener(PurpleDotClassifier(FIGURES))
    sharp = screener.screen(sample("sharp", [0] * 8, blur=1.0)).summary
    soft = screener.screen(sample("soft", [0] * 8, blur=2.0)).summary
    assert sharp.call == "negative"
    assert soft.call == "review" and soft.n_cells == sharp.n_cells
    assert soft.reasons[0].startswith("8 of 8 fields out of focus (border sharpness below 0.3")
    infected = screener.screen(sample("infected", [5] * 4, blur=2.0))
    assert infected.summary.call == "positive"
    assert all(f.quality["focus"] < screener.applicability.min_sharpness for f in infected.fields)


def test_parasites_per_microlitre_carry_the_parasitemia_and_its_interval(samples):
    screener = Screener(PurpleDotClassifier(FIGURES), rbc_per_ul=4_000_000)
    result = screener.screen(samples / "infected")
    sample = result.summary
    assert sample.density["rbc_per_ul"] == 4_000_000
    assert sample.density["per_ul"] == pytest.approx(sample.parasitemia * 4_000_000)
    assert sample.density["per_ul_ci"] == pytest.approx([v * 4_000_000 for v in sample.parasitemia_ci])
    assert json.loads(render(result, "json"))["summary"]["density"]["per_ul"] == pytest.approx(sample.density["per_ul"])
    low, high = sample.density["per_ul_ci"]
    assert f"parasites/uL {sample.density['per_ul']:,.0f} (95% CI {low:,.0f}-{high:,.0f}; 4,000,000 red cells/uL)" \
        in render(result, "table")
    assert Screener(PurpleDotClassifier(FIGURES)).rbc_per_ul == 5_000_000  # WHO's thin-film convention
    for bad in (0, 50, 2e7, True, "5e6"):
        with pytest.raises(MalariaCellsError, match="rbc_per_ul"):
            Screener(PurpleDotClassifier(FIGURES), rbc_per_ul=bad)


def test_an_over_exposed_sample_is_not_called_negative_and_says_so(tmp_path):
    from malaria_cells.shifts import exposure

    def sample(name, infected_per_field, factor):
        folder = tmp_path / name
        folder.mkdir()
        for k, n in enumerate(infected_per_field):
            image, _ = make_field(np.random.default_rng(300 + k), infected=tuple(range(3, 3 + 7 * n, 7)))
            Image.fromarray(exposure(image, factor)).save(folder / f"field{k}.png")
        return folder

    screener = Screener(PurpleDotClassifier(FIGURES))
    plain = screener.screen(sample("plain", [0] * 8, 1.0))
    bright = screener.screen(sample("bright", [0] * 8, 1.6))
    assert plain.summary.call == "negative"
    assert all(f.quality["checks"]["blown_channels"] == 0 for f in plain.fields)
    assert all(f.quality["checks"]["blown_channels"] >= 2 and f.quality["applicable"] for f in bright.fields)
    assert bright.summary.call == "review" and bright.summary.n_cells > 0.9 * plain.summary.n_cells
    assert bright.summary.reasons[0].startswith("8 of 8 fields over-exposed (plasma blown out")
    infected = screener.screen(sample("infected", [5] * 4, 1.6))
    assert infected.summary.call == "positive"
