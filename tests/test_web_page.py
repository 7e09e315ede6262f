"""End to end: the real server on 127.0.0.1, the page in headless Chromium (Playwright)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import make_cell

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(trained_run):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "malaria_cells", "serve", "--model", trained_run["model_path"], "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(process.stderr.read().decode())
            time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(10)



def _launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"])

def test_drop_two_images_and_read_their_labels(server, tmp_path, trained_run):
    from malaria_cells import predict

    rng = np.random.default_rng(7)
    paths = []
    for name, infected in (("infected.png", True), ("healthy.png", False)):
        Image.fromarray(make_cell(infected, rng, 56)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    from conftest import make_field

    Image.fromarray(make_field(rng, size=(600, 450))[0]).save(tmp_path / "field.png")
    expected = {os.path.basename(p.path): p.label for p in predict(paths, trained_run["model_path"])}

    with playwright.sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page()
        page.goto(server + "/")
        page.set_input_files("#files", paths + [str(tmp_path / "broken.png"), str(tmp_path / "field.png")])
        page.wait_for_selector(".cell >> nth=3", timeout=30_000)
        labels = {c.get_attribute("data-filename"): c.query_selector(".label").inner_text()
                  for c in page.query_selector_all(".cell")}
        assert labels == {**expected, "broken.png": "rejected", "field.png": "rejected"}
        assert "not an image" in page.inner_text("[data-filename='broken.png']")
        assert "not a single-cell crop" in page.inner_text("[data-filename='field.png']")
        assert "2 cells scored" in page.inner_text("#summary")
        with page.expect_download() as download:
            page.click("#csv")
        csv_text = open(download.value.path()).read()
        assert csv_text.splitlines()[0] == '"filename","probability","label","error"'
        assert len(csv_text.splitlines()) == 5
        browser.close()


def test_field_mode_screens_photographs_and_shows_the_call(server, tmp_path):
    from conftest import make_field

    for k in range(2):
        image, _ = make_field(np.random.default_rng(k), infected=(5, 17))
        if k == 1:  # a grayscale copy: listed with its reason, not counted
            image = np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / f"field{k}.jpg", quality=92)
    with playwright.sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page()
        page.goto(server + "/")
        assert "single red blood cells" in page.inner_text("#intro")
        page.click("#mode-fields")
        assert page.is_visible("#field-drop") and not page.is_visible("#drop")
        assert "field photographs of one sample" in page.inner_text("#intro")
        page.click("#identifiers summary")
        page.fill("#identifiers input[name=patient]", "PT-0193")
        page.fill("#identifiers input[name=operator]", "A. Diallo")
        page.set_input_files("#field-files", [str(tmp_path / "field0.jpg"), str(tmp_path / "field1.jpg")])
        page.wait_for_selector("#overlays img >> nth=1", timeout=60_000)
        assert page.inner_text("#call") == "REVIEW"  # 63 readable cells are too few for a call
        assert "1 of 2 fields not read (1 grayscale)" in page.inner_text("#reasons")
        summary = page.inner_text("#field-summary")
        assert "Parasitemia (raw)" in summary and "parasites/µL" in summary and "5,000,000 red cells/µL" in summary
        assert "grayscale image" in page.inner_text("[data-field='field1.jpg']")
        rows = page.query_selector_all("#field-table tr")
        assert len(rows) == 3 and rows[1].get_attribute("data-field") == "field0.jpg"
        # the gallery: each cell as photographed beside its heat map, highest first, the threshold between
        cells = page.query_selector_all("#gallery figure")
        assert cells and all(len(c.query_selector_all("img")) == 2 for c in cells)
        scores = [float(c.inner_text().split()[0]) for c in cells]
        assert scores == sorted(scores, reverse=True)
        import json

        downloads = {}
        for button in ("#report", "#download-csv", "#download-html", "#download-pdf"):
            with page.expect_download() as download:
                page.click(button)
            downloads[button] = download.value.path()
        report = json.load(open(downloads["#report"]))
        assert len(report["fields"]) == 2 and "overlay" not in report["fields"][0] and "report" not in report
        assert report["summary"]["metadata"] == {"patient": "PT-0193", "operator": "A. Diallo"}
        rows = open(downloads["#download-csv"]).read().splitlines()
        assert rows[0] == "field,frame,x,y,x0,y0,x1,y1,probability,label,stage,stage_probability,sample"  # as cells.csv
        assert len(rows) == 1 + sum(f["n_cells"] for f in report["fields"])
        assert "PT-0193" in open(downloads["#download-html"]).read()
        from pypdf import PdfReader

        text = "".join(sheet.extract_text() for sheet in PdfReader(downloads["#download-pdf"]).pages)
        assert "PT-0193" in text and "REVIEW" in text and "parasites per microlitre" in text
        browser.close()


def test_review_mode_signs_off_a_recorded_sample_beside_its_automatic_call(tmp_path):
    """Two synthetic samples recorded through the Python API, then reviewed on the page of a
    server started with --db and --user-keys: one cell rejected, signed off, the reviewed call shown."""
    from malaria_cells.fields import Gallery, Screener
    from malaria_cells.records import open_records
    from test_fields import FIGURES, PurpleDotClassifier, _write_sample

    _write_sample(tmp_path / "infected", 4, [5] * 4, 100)
    _write_sample(tmp_path / "healthy", 2, [0] * 2, 200)
    gallery = Gallery()
    result = Screener(PurpleDotClassifier(FIGURES)).screen([tmp_path / "infected", tmp_path / "healthy"],
                                                           on_field=gallery.add)
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    with open_records(url) as records:
        infected_id, _ = records.add(result, gallery=gallery)
    (tmp_path / "keys.csv").write_text("name,key\nDr. A. Diallo,diallo-key-0193\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "malaria_cells", "serve", "--port", str(port), "--db", url,
         "--user-keys", str(tmp_path / "keys.csv")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(server + "/healthz", timeout=1)
                break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(process.stderr.read().decode())
                time.sleep(0.5)
        with playwright.sync_playwright() as p:
            browser = _launch(p)
            page = browser.new_page()
            page.goto(server + "/?api_key=diallo-key-0193")
            page.click("#mode-review")
            assert page.is_visible("#review") and not page.is_visible("#field-drop")
            page.wait_for_selector("#record-list tr[data-record] >> nth=1", timeout=30_000)
            rows = page.query_selector_all("#record-list tr[data-record]")
            assert [r.get_attribute("data-record") for r in rows] == [str(infected_id + 1), str(infected_id)]
            assert "POSITIVE" in rows[1].inner_text() and "REVIEW" in rows[0].inner_text()  # 2 fields: too few cells
            rows[1].click()
            page.wait_for_selector("#review-cells figure >> nth=0", timeout=30_000)
            assert "You sign as Dr. A. Diallo" in page.inner_text("#sign-status")
            assert "Reviewed: not yet" in page.inner_text("#record-calls")
            figures = page.query_selector_all("#review-cells figure")
            assert len(figures) > 20 and "counted" in figures[0].inner_text()
            figures[0].query_selector("button.reject").click()
            page.fill("#review-comment", "<b>stain debris</b>")
            page.click("#sign-off")
            page.wait_for_selector("#reviewed-call", timeout=30_000)
            assert page.inner_text("#reviewed-call") == "REVIEW"  # 19 left, none confirmed: not positive by itself
            calls = page.inner_text("#record-calls")
            assert "Automatic: POSITIVE (20 of" in calls and "Reviewed: REVIEW (19 of" in calls
            history = page.inner_text("#review-history")
            assert "Dr. A. Diallo, REVIEW" in history and '"<b>stain debris</b>"' in history  # text, not markup
            page.wait_for_function("document.querySelector('#record-list').innerText.includes('Dr. A. Diallo')")
            browser.close()
    finally:
        process.terminate()
        process.wait(10)
    with open_records(url) as records:
        [review] = records.reviews(infected_id)
        assert review.reviewer == "Dr. A. Diallo" and review.n_rejected == 1 and review.comment == "<b>stain debris</b>"
