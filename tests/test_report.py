"""The report folder: one report per sample (HTML and PDF), an index, overlays, identifiers."""

import json

import numpy as np
import pytest
from PIL import Image

from malaria_cells.errors import MalariaCellsError
from malaria_cells.fields import Screener
from malaria_cells.fields.metadata import SampleMetadata, attach_metadata, read_manifest
from malaria_cells.fields.report import GALLERY_SIZE, NEAR_MISSES, ReportWriter

from test_fields import FIGURES, PurpleDotClassifier, _write_sample


@pytest.fixture(scope="module")
def two_samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-samples")
    _write_sample(root / "P-infected", 4, [5, 5, 5, 5], 100)  # 20 of ~250 cells
    _write_sample(root / "P-healthy", 8, [0] * 8, 200)
    return root


def _pdf_text(path) -> str:
    from pypdf import PdfReader

    return "\n".join(page.extract_text() for page in PdfReader(path).pages)


def test_one_sample_gets_an_html_and_a_pdf_report_with_its_call_figures_and_identifiers(two_samples, tmp_path):
    writer = ReportWriter(tmp_path / "report")
    result = Screener(PurpleDotClassifier(FIGURES)).screen(two_samples / "P-infected", on_field=writer.add)
    attach_metadata(result, defaults=SampleMetadata(patient="PT-0193", operator="A. Diallo", date="2026-11-30"))
    page = writer.finish(result)
    assert page.name == "report.html"
    assert {p.name for p in page.parent.iterdir()} == {"overlays", "cells.csv", "report.json", "report.html",
                                                       "report.pdf"}
    text = page.read_text()
    assert "POSITIVE" in text and "PT-0193" in text and "A. Diallo" in text and "2026-11-30" in text
    assert "parasitemia (raw)" in text and "parasitemia corrected" in text and "parasites per microlitre" in text
    # the 20 counted cells, highest first, then the near misses below the threshold line, drawn once
    captions = text.split('<figure class="cell">')[1:]
    scores = [float(c.split("<figcaption>")[1].split("<")[0]) for c in captions]
    assert len(scores) == 20 + NEAR_MISSES and scores == sorted(scores, reverse=True)
    assert text.count('<p class="cutoff">counting threshold 0.500') == 1
    assert text.split('<p class="cutoff">')[0].count('<figure class="cell">') == 20
    # each overlay is shown small and opens at the photograph's own resolution
    overlays = sorted((page.parent / "overlays").glob("*.jpg"))
    assert len(overlays) == 4
    for overlay in overlays:
        assert f'<a href="overlays/{overlay.name}"><img src="overlays/small/{overlay.name}"' in text
        full = Image.open(overlay)
        assert full.size == Image.open(two_samples / "P-infected" / "field0.png").size
        assert max(Image.open(page.parent / "overlays" / "small" / overlay.name).size) <= 640
    pdf = _pdf_text(page.parent / "report.pdf")
    for words in ("P-infected", "POSITIVE", "PT-0193", "A. Diallo", "parasites per microlitre", "parasitemia (raw)",
                  "Cells that drove the call"):
        assert words in pdf, words
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # rendering a PDF leaves truncated uploads refused
    data = json.loads((page.parent / "report.json").read_text())
    assert data["summary"]["metadata"] == {"patient": "PT-0193", "operator": "A. Diallo", "date": "2026-11-30"}
    assert data["fields"][0]["overlay"].startswith("overlays/") and data["fields"][0]["sample"] == "P-infected"


def test_several_samples_get_a_report_each_and_an_index_without_a_pooled_call_unless_asked(two_samples, tmp_path):
    screener = Screener(PurpleDotClassifier(FIGURES))
    writer = ReportWriter(tmp_path / "report", pdf=False)
    result = screener.screen([two_samples / "P-infected", two_samples / "P-healthy"], on_field=writer.add)
    page = writer.finish(result)
    assert page.name == "index.html"
    names = {p.name for p in page.parent.iterdir()}
    assert {"index.html", "P-infected.html", "P-healthy.html"} <= names and not any(n.endswith(".pdf") for n in names)
    index = page.read_text()
    assert '<a href="P-infected.html">P-infected</a>' in index and '<a href="P-healthy.html">P-healthy</a>' in index
    assert "pooled" not in index and "P-infected.pdf" not in index  # no PDF written, none linked
    infected, healthy = (page.parent / "P-infected.html").read_text(), (page.parent / "P-healthy.html").read_text()
    assert "POSITIVE" in infected and "NEGATIVE" not in infected
    assert "NEGATIVE" in healthy and "POSITIVE" not in healthy
    # a sample's gallery and overlays are its own: no counted cell in the healthy one
    assert healthy.count('<figure class="cell">') <= NEAR_MISSES and "field0.png: 0 of" in healthy
    assert healthy.split('<p class="cutoff">')[0].count('<figure class="cell">') == 0
    pooled = ReportWriter(tmp_path / "pooled", pdf=False, pooled=True)
    result = screener.screen([two_samples / "P-infected", two_samples / "P-healthy"], on_field=pooled.add)
    assert "all samples pooled" in pooled.finish(result).read_text()


def test_the_report_is_never_written_over_a_file_or_through_a_link(tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(MalariaCellsError, match="is a file"):
            ReportWriter(mine, overwrite=overwrite)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for link in ("overlays", "overlays/small"):
        out = tmp_path / link.replace("/", "-")
        (out / link).parent.mkdir(parents=True, exist_ok=True)
        (out / link).symlink_to(elsewhere, target_is_directory=True)
        with pytest.raises(MalariaCellsError, match="is a link"):
            ReportWriter(out, overwrite=True)
    assert mine.read_text() == "mine" and list(elsewhere.iterdir()) == []
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(MalariaCellsError, match="not empty"):
        ReportWriter(full)


def test_a_manifest_gives_each_sample_its_identifiers(two_samples, tmp_path):
    manifest = tmp_path / "samples.csv"
    manifest.write_text("\ufeffsample,patient,slide,date,note\nP-infected,PT-1,S-9,2026-11-30,\"febrile, 3 days\"\n"
                        "P-other,PT-3,,,\n", encoding="utf-8")
    rows = read_manifest(manifest)
    assert rows["P-infected"] == SampleMetadata(patient="PT-1", slide="S-9", date="2026-11-30", note="febrile, 3 days")
    result = Screener(PurpleDotClassifier(FIGURES)).screen([two_samples / "P-infected", two_samples / "P-healthy"])
    warnings = attach_metadata(result, rows, SampleMetadata(operator="A. Diallo", slide="default"))
    by_name = {s.name: s.metadata for s in result.samples}
    assert by_name["P-infected"] == {"patient": "PT-1", "slide": "S-9", "operator": "A. Diallo", "date": "2026-11-30",
                                     "note": "febrile, 3 days"}
    assert by_name["P-healthy"] == {"slide": "default", "operator": "A. Diallo"}
    assert sorted(warnings) == ["manifest: no row for sample 'P-healthy'",
                                "manifest: sample 'P-other' was not screened (no folder of that name)"]


@pytest.mark.parametrize("content, message", [
    ("patient\nPT-1\n", "needs a header row with a 'sample' column"),
    ("sample,ward\nA,3\n", "unknown column 'ward'"),
    ("sample,patient\nA,1\nA,2\n", "line 3: sample 'A' is listed twice"),
    ("sample,date\nA,30/11/2026\n", "line 2: date: expected YYYY-MM-DD"),
    ("sample,patient\nA,1,extra\n", "line 2: more values than columns"),
    ("sample,patient\nA,x\x07y\n", "control characters"),
    ("sample,patient\nA," + "x" * 201 + "\n", "at most 200 characters"),
])
def test_a_bad_manifest_is_refused_with_the_file_and_line(content, message, tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(content)
    with pytest.raises(MalariaCellsError, match="m.csv") as error:
        read_manifest(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_manifest_that_is_not_text_or_too_large_is_refused(tmp_path):
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"sample\n\xff\xfe\x00")
    with pytest.raises(MalariaCellsError, match="not UTF-8"):
        read_manifest(binary)
    with pytest.raises(MalariaCellsError, match="cannot read the manifest"):
        read_manifest(tmp_path / "missing.csv")
    big = tmp_path / "big.csv"
    big.write_bytes(b"sample\n" + b"a" * (4 * 2**20 + 10))
    with pytest.raises(MalariaCellsError, match="larger than 4 MB"):
        read_manifest(big)


def test_each_parasitized_cell_gets_a_stage_and_the_report_counts_them_with_the_models_figures(two_samples,
                                                                                                  tmp_path):
    from malaria_cells.fields.stages import STAGES, load_stage_model

    screener = Screener(PurpleDotClassifier(FIGURES))
    writer = ReportWriter(tmp_path / "report", pdf=False, **screener.report_options())
    result = screener.screen(two_samples / "P-infected", on_field=writer.add)
    cells = [c for f in result.fields for c in f.cells]
    infected = [c for c in cells if c.label == "Parasitized"]
    assert infected and all(c.stage in STAGES and 0.25 <= c.stage_probability <= 1 for c in infected)
    assert all(c.stage is None and c.stage_probability is None for c in cells if c.label != "Parasitized")
    assert sum(result.summary.stages.values()) == result.summary.n_parasitized
    assert list(result.summary.stages) == list(STAGES)
    described = result.model["stage_model"]
    assert described["path"] == "malaria-cells-stages.keras" and "schizont" in described["figures"]["too_rare"]
    page = writer.finish(result).read_text()
    assert "Life stages of the Parasitized cells" in page and "treat as unconfirmed" in page
    recall = load_stage_model().figures.recall["gametocyte"]
    assert f"leave-slide-out recall {recall:.0%}" in page
    rows = (tmp_path / "report" / "cells.csv").read_text().splitlines()
    assert rows[0].endswith(",label,stage,stage_probability,sample")
    assert sum(row.split(",")[10] in STAGES for row in rows[1:]) == len(infected)
    off = Screener(PurpleDotClassifier(FIGURES), stages=False).screen(two_samples / "P-infected")
    assert off.summary.stages is None and off.model["stage_model"] is None
    assert all(c.stage is None for f in off.fields for c in f.cells)
    with pytest.raises(MalariaCellsError, match="stages: True"):
        Screener(PurpleDotClassifier(FIGURES), stages=3)


def test_many_fields_fold_their_overlays_in_the_html_and_the_pdf_shows_a_few(tmp_path):
    from malaria_cells.fields.report import COLLAPSE_OVERLAYS, PDF_OVERLAYS

    folder = tmp_path / "many"
    _write_sample(folder, COLLAPSE_OVERLAYS + 1, [1] + [0] * COLLAPSE_OVERLAYS, 40)
    writer = ReportWriter(tmp_path / "report")
    result = Screener(PurpleDotClassifier(FIGURES), stages=False).screen(folder, on_field=writer.add)
    text = writer.finish(result).read_text()
    assert f"<details><summary>Show all {COLLAPSE_OVERLAYS + 1} overlays</summary>" in text
    pdf = _pdf_text(tmp_path / "report" / "report.pdf")
    assert f"{PDF_OVERLAYS} of {COLLAPSE_OVERLAYS + 1} overlays" in pdf
    assert "field0.png: 1 of" in pdf  # the field with a Parasitized cell comes first


def _field(sample, path, probabilities, *, ok=True, threshold=0.5):
    from malaria_cells.fields import CellResult, FieldResult

    cells = [CellResult(10.0 + 30 * k, 20.0, [5 + 30 * k, 10, 25 + 30 * k, 30], p,
                        "Parasitized" if p >= threshold else "Uninfected") for k, p in enumerate(probabilities)]
    return FieldResult(path, 30 * len(cells) + 40, 60, "stored", {"ok": ok, "applicable": True, "reasons": []},
                       len(cells), sum(c.label == "Parasitized" for c in cells), None, None, None, 20.0, cells,
                       sample=sample)


def test_the_gallery_keeps_each_samples_highest_counted_cells_and_near_misses_from_counted_fields_only():
    rng = np.random.default_rng(5)
    writer = ReportWriter(None, pdf=False)
    scores = {"A": [], "B": []}
    for k in range(6):
        for sample in ("A", "B"):
            p = rng.uniform(0, 1, 12).round(6)
            scores[sample] += list(p)
            item = _field(sample, f"{sample}{k}.png", p)
            writer.add(item, np.zeros((len(p), 64, 64, 3), np.uint8), np.zeros((60, item.width, 3), np.uint8))
    # a field that failed quality in a sample with good fields: its cells were not counted
    poor = _field("A", "poor.png", [0.999, 0.998, 0.49])
    poor.quality["ok"] = False
    writer.add(poor, np.zeros((3, 64, 64, 3), np.uint8), np.zeros((60, poor.width, 3), np.uint8))
    for sample in ("A", "B"):
        gallery = [entry["cell"] for entry in writer._gallery(sample)]
        counted = sorted((p for p in scores[sample] if p >= 0.5), reverse=True)[:GALLERY_SIZE]
        near = sorted((p for p in scores[sample] if p < 0.5), reverse=True)[:NEAR_MISSES]
        assert [c.probability for c in gallery] == counted + near
        assert all(c.field.startswith(sample) for c in gallery)


def test_two_folders_of_one_name_are_two_samples_with_a_report_each(two_samples, tmp_path):
    import shutil

    for parent, source in (("a", "P-infected"), ("b", "P-healthy")):
        shutil.copytree(two_samples / source, tmp_path / parent / "slide")
    writer = ReportWriter(tmp_path / "report", pdf=False)
    result = Screener(PurpleDotClassifier(FIGURES), stages=False).screen(
        [tmp_path / "a" / "slide", tmp_path / "b" / "slide"], on_field=writer.add)
    assert [s.name for s in result.samples] == ["slide", "slide (2)"]
    assert [s.call for s in result.samples] == ["positive", "negative"]
    writer.finish(result)
    first, second = (tmp_path / "report" / "slide.html").read_text(), (tmp_path / "report" / "slide_2.html").read_text()
    assert "POSITIVE" in first and "NEGATIVE" in second
    assert f"Fields ({result.samples[1].fields})" in second
    assert second.split('<p class="cutoff">')[0].count('<figure class="cell">') == 0  # none of the first's cells
    assert first.split('<p class="cutoff">')[0].count('<figure class="cell">') == 20


def test_names_and_identifiers_are_escaped_and_the_pdf_fetches_nothing_from_outside(tmp_path):
    hostile = '<img src=x onerror=alert(1)>'
    folder = tmp_path / hostile.replace("/", "_")
    _write_sample(folder, 1, [3], 9)
    writer = ReportWriter(tmp_path / "report")
    result = Screener(PurpleDotClassifier(FIGURES), stages=False).screen(folder, on_field=writer.add)
    attach_metadata(result, defaults=SampleMetadata(patient=hostile, note='<link rel=stylesheet href="file:///etc/passwd">'))
    page = writer.finish(result).read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<link rel" not in page
    from malaria_cells.fields.report import _local_fetcher

    fetch = _local_fetcher(tmp_path / "report")
    for url in ("file:///etc/passwd", "http://127.0.0.1:9/x.png", f"file://{tmp_path}/elsewhere.png"):
        with pytest.raises(ValueError, match="not fetched"):
            fetch(url)
    assert "overlays/" not in _pdf_text(tmp_path / "report" / "report.pdf")
    from pypdf import PdfReader

    links = [a.get_object().get("/A", {}).get("/URI") for p in PdfReader(tmp_path / "report" / "report.pdf").pages
             for a in p.get("/Annots", []) or []]
    assert not any(links)  # a PDF travels alone: no links into the report folder


def test_a_stage_model_that_fails_turns_stages_off_and_costs_no_field(two_samples, tmp_path):
    class Broken:
        image_size = 64

        def predict(self, crops):
            raise RuntimeError("out of memory\nmore detail")

    screener = Screener(PurpleDotClassifier(FIGURES), stages=Broken())
    result = screener.screen(two_samples / "P-infected")
    assert len(result.fields) == 4 and not result.skipped and result.summary.n_parasitized == 20
    assert result.summary.stages is None
    assert result.model["stage_model"]["error"] == "stages off: RuntimeError: out of memory"
    with pytest.raises(MalariaCellsError, match="stage model not found"):
        Screener(PurpleDotClassifier(FIGURES), stages=tmp_path / "missing.keras")


def test_a_report_built_in_memory_past_its_deadline_leaves_out_heat_maps_and_pdf(two_samples):
    screener = Screener(PurpleDotClassifier(FIGURES), stages=False)
    writer = ReportWriter(None, explain=lambda crops: np.ones(crops.shape[:3], np.float32))
    result = screener.screen(two_samples / "P-infected", on_field=writer.add)
    built = writer.build(result, deadline=0.0)
    assert built["pdf"] is None and all(cell["heat"] is None for cell in built["gallery"]) and built["gallery"]
    assert writer.warnings == ["heat maps left out: the request's time limit was reached",
                               "the PDF left out: the request's time limit was reached"]
    in_time = writer.build(result)
    assert in_time["pdf"].startswith(b"%PDF") and all(cell["heat"] for cell in in_time["gallery"])
