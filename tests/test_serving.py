import io
import json
import os
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import make_cell

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from malaria_cells.errors import MalariaCellsError  # noqa: E402
from malaria_cells.serving import ServeLimits, create_app  # noqa: E402


def png_bytes(infected=True, seed=0, size=48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_cell(infected, np.random.default_rng(seed), size)).save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png(side=20000) -> bytes:
    """A valid PNG header announcing side x side pixels, with a tiny body."""
    import struct

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def bomb_bmp(side=9000) -> bytes:
    """A small BMP whose header announces side x side pixels (81 MP: over the limit, under Pillow's)."""
    import struct

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "BMP")
    data = bytearray(buffer.getvalue())
    data[18:26] = struct.pack("<ii", side, side)
    return bytes(data)


@pytest.fixture(scope="module")
def client(trained_run):
    return TestClient(create_app(trained_run["model_path"], limits=ServeLimits(max_images=4, max_request_bytes=2**20)))


def test_health_and_model_metadata(client, trained_run):
    assert client.get("/healthz").json() == {"status": "ok"}
    meta = client.get("/v1/model").json()
    assert meta["image_size"] == 32 and meta["threshold"] == pytest.approx(trained_run["threshold"])
    assert client.get("/docs").status_code == 200
    assert "malaria-cells" in client.get("/").text


def test_predict_many_images_with_summary(client, trained_run):

    files = [("files", (f"{i}.png", png_bytes(i % 2 == 0, i), "image/png")) for i in range(3)]
    body = client.post("/v1/predict", files=files).json()
    assert [r["filename"] for r in body["results"]] == ["0.png", "1.png", "2.png"]
    assert all(r["status"] == 200 and r["label"] in ("Parasitized", "Uninfected") for r in body["results"])
    assert body["summary"]["n"] == 3
    assert body["summary"]["percent_parasitized"] == pytest.approx(
        100 * sum(r["label"] == "Parasitized" for r in body["results"]) / 3, abs=0.01)
    assert body["threshold"] == pytest.approx(trained_run["threshold"])


def test_same_probability_as_the_command_line_path(client, trained_run, tmp_path):
    from malaria_cells import predict

    (tmp_path / "a.png").write_bytes(png_bytes(True, 9))
    expected = predict(tmp_path / "a.png", trained_run["model_path"])[0].probability
    body = client.post("/v1/predict", files=[("files", ("a.png", png_bytes(True, 9), "image/png"))]).json()
    assert body["results"][0]["probability"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("name, data, status, message", [
    ("empty.png", b"", 422, "empty file"),
    ("notes.png", b"hello, not an image", 415, "not an image"),
    ("cut.png", png_bytes()[:200], 422, "corrupt"),
    ("bomb.png", bomb_png(), 413, "too large"),
    ("bomb.bmp", bomb_bmp(), 413, "too large"),
])
def test_bad_uploads_are_rejected_without_spoiling_the_rest(client, name, data, status, message):
    files = [("files", ("good.png", png_bytes(), "image/png")), ("files", (name, data, "image/png"))]
    body = client.post("/v1/predict", files=files)
    assert body.status_code == 200
    good, bad = body.json()["results"]
    assert good["status"] == 200 and "label" in good
    assert bad["status"] == status and message in bad["error"]
    alone = client.post("/v1/predict", files=[("files", (name, data, "image/png"))])
    assert alone.status_code == status
    assert client.get("/healthz").status_code == 200


def test_request_limits(client):
    files = [("files", (f"{i}.png", png_bytes(), "image/png")) for i in range(5)]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 413 and "too many images" in response.json()["detail"]
    big = [("files", ("big.png", b"\0" * (2**20 + 10), "image/png"))]
    response = client.post("/v1/predict", files=big)
    assert response.status_code == 413 and "request too large" in response.json()["detail"]


def test_a_chunked_body_without_length_is_counted(client):
    # No Content-Length to check up front: the body is counted as it streams in.
    boundary = "limit-test"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(24):
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    request = client.build_request("POST", "/v1/predict", content=body(),
                                   headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert "content-length" not in request.headers
    response = client.send(request)
    assert response.status_code == 413 and "request too large (at least" in response.json()["detail"]
    small = [("files", ("ok.png", png_bytes(), "image/png"))]
    assert client.post("/v1/predict", files=small).status_code == 200  # the server is still healthy


def test_api_key_guards_everything_but_health(trained_run):
    client = TestClient(create_app(trained_run["model_path"], api_key="s3cret"))
    assert client.get("/healthz").status_code == 200
    assert client.get("/v1/model").status_code == 401
    assert client.post("/v1/predict", files=[("files", ("a.png", png_bytes(), "image/png"))]).status_code == 401
    assert client.get("/v1/model", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/?api_key=s3cret").status_code == 200


def test_worker_processes_build_the_same_app(trained_run, monkeypatch):
    # serve(workers=N) hands uvicorn an import string; each worker rebuilds the app from the environment.
    import uvicorn

    from malaria_cells import serving

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    monkeypatch.delenv(serving._WORKER_CONFIG_ENV, raising=False)
    serving.serve(trained_run["model_path"], port=8123, api_key="k3y", workers=3,
                  limits=ServeLimits(max_images=7))
    (app, kwargs), = calls
    assert app == "malaria_cells.serving:app_from_environment" and kwargs["factory"] and kwargs["workers"] == 3
    worker = TestClient(serving.app_from_environment())
    assert worker.get("/v1/model").status_code == 401
    described = worker.get("/v1/model", headers={"X-API-Key": "k3y"}).json()
    assert described["path"] == os.path.basename(trained_run["model_path"]) and described["limits"]["max_images"] == 7
    files = [("files", ("a.png", png_bytes(), "image/png"))]
    assert worker.post("/v1/predict", files=files, headers={"X-API-Key": "k3y"}).json()["summary"]["n"] == 1


def test_every_route_needs_the_key_but_health_and_readiness(trained_run):
    app = create_app(trained_run["model_path"], api_key="s3cret")
    keyed = TestClient(app)
    paths = {route.path for route in app.routes} | {"/redoc", "/docs/oauth2-redirect", "/no-such-page"}
    assert {"/docs", "/openapi.json", "/v1/screen", "/v1/predict", "/"} <= paths
    for path in paths:
        for method in ("GET", "POST"):
            status = keyed.request(method, path).status_code
            if path not in ("/healthz", "/readyz"):
                assert status == 401, (method, path, status)
    assert keyed.get("/healthz").status_code == 200 and keyed.post("/healthz").status_code == 200
    assert keyed.get("/readyz").json() == {"status": "ready", "screening": 0, "waiting": 0, "slots": 2}
    assert keyed.get("/openapi.json", headers={"X-API-Key": "s3cret"}).status_code == 200
    docs = keyed.get("/docs?api_key=s3cret")
    assert docs.status_code == 200 and "/openapi.json?api_key=s3cret" in docs.text


def test_screen_endpoint_answers_the_screen_json_with_overlays(client):
    from conftest import encode, make_field

    image, cells = make_field(np.random.default_rng(2), infected=(3, 11))
    files = [("files", ("f.jpg", encode(image, "JPEG", quality=92), "image/jpeg")),
             ("files", ("bad.jpg", b"not an image", "image/jpeg"))]
    response = client.post("/v1/screen?overlays=true", files=files)
    assert response.status_code == 200
    body = response.json()
    assert len(body["fields"]) == 1 and body["skipped"][0]["path"] == "bad.jpg"
    field = body["fields"][0]
    assert abs(field["n_cells"] - len(cells)) <= 3 and field["overlay"].startswith("data:image/jpeg;base64,")
    assert body["summary"]["call"] == "review" and "cells counted" in body["summary"]["reasons"][0]
    assert client.post("/v1/screen", files=files[1:]).status_code == 422


def test_screen_endpoint_gives_what_the_python_api_gives(client, trained_run, tmp_path):
    from conftest import encode, make_field

    from malaria_cells import screen

    files = []
    for k in range(2):
        image, _ = make_field(np.random.default_rng(20 + k), infected=(3, 11, 30))
        (tmp_path / f"f{k}.jpg").write_bytes(encode(image, "JPEG", quality=90))
        files.append(("files", (f"f{k}.jpg", (tmp_path / f"f{k}.jpg").read_bytes(), "image/jpeg")))
    served = client.post("/v1/screen", files=files).json()
    local = json.loads(json.dumps(screen(tmp_path, trained_run["model_path"]).to_dict(), default=float))
    for entry in served["fields"] + local["fields"]:
        entry["path"] = os.path.basename(entry["path"])
        entry.pop("seconds"), entry.pop("overlay", None), entry.pop("sample")
    served["summary"].pop("name"), local["summary"].pop("name")
    assert served == local
    table = client.post("/v1/screen?format=table", files=files)
    assert table.headers["content-type"].startswith("text/plain") and "REVIEW" in table.text
    assert client.post("/v1/screen?format=xml", files=files).status_code == 422


def test_screen_endpoint_gives_the_sample_report_as_pdf_html_or_inside_the_json(client):
    from conftest import encode, make_field

    image, _ = make_field(np.random.default_rng(4), infected=(3, 11, 30))
    files = [("files", ("f.jpg", encode(image, "JPEG", quality=92), "image/jpeg"))]
    pdf = client.post("/v1/screen?format=pdf&patient=PT-7&site=Kisumu", files=files)
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    from pypdf import PdfReader

    text = "".join(sheet.extract_text() for sheet in PdfReader(io.BytesIO(pdf.content)).pages)
    assert "PT-7" in text and "Kisumu" in text and "REVIEW" in text
    page = client.post("/v1/screen?format=html&patient=PT-7", files=files)
    assert page.headers["content-type"].startswith("text/html") and "PT-7" in page.text
    assert "overlays/" not in page.text and "data:image/jpeg;base64," in page.text  # self-contained
    body = client.post("/v1/screen?report=true&slide=S-1", files=files).json()
    assert body["summary"]["metadata"] == {"slide": "S-1"}
    gallery = body["report"]["gallery"]
    assert gallery and all(c["image"].startswith("data:image/png") and c["heat"].startswith("data:image/png")
                           for c in gallery)
    assert [c["probability"] for c in gallery] == sorted((c["probability"] for c in gallery), reverse=True)
    assert body["report"]["pdf"] and "S-1" in body["report"]["html"]
    bad = client.post("/v1/screen?date=30/11/2026", files=files)
    assert bad.status_code == 422 and "YYYY-MM-DD" in bad.json()["detail"]


MEMORY_PROBE = r"""
import io, json, sys


def peak_mib():  # this process's own high-water mark (ru_maxrss can carry the parent's across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
import numpy as np
from fastapi.testclient import TestClient
from malaria_cells.serving import ServeLimits, create_app
import struct, zlib
app = create_app(None, limits=ServeLimits(max_images=16, max_request_bytes=64 * 2**20))  # the shipped model
client = TestClient(app)
side = 6000  # 36 MP each, under the per-image limit; compressed row by row, so never held decoded here

def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

packer, row, parts = zlib.compressobj(9), bytes(1 + 3 * side), []
for _ in range(side):
    parts.append(packer.compress(row))
parts.append(packer.flush())
blank = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
         + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
before = peak_mib()
files = [("files", (f"{i}.png", blank, "image/png")) for i in range(8)]
response = client.post("/v1/predict", files=files)
peak = peak_mib()
print(json.dumps({"status": response.status_code, "errors": [r.get("error") for r in response.json()["results"]],
                  "before": before, "peak": peak, "body": len(blank) * 8}))
"""


def test_a_request_of_many_huge_images_stays_within_a_memory_bound():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    # 6000x6000 is a field photograph, not a cell crop: refused from the header, before decoding
    assert probe["status"] == 422 and all("not a single-cell crop" in e for e in probe["errors"]), probe
    # 8 decoded images would be 864 MB.
    assert probe["peak"] - probe["before"] < 500, probe
    assert probe["peak"] < 1024, probe


def test_uploads_with_one_name_keep_their_own_fields_and_a_repeated_photograph_counts_once(client):
    from conftest import encode, make_field

    first = encode(make_field(np.random.default_rng(30))[0], "JPEG", quality=90)
    second = encode(make_field(np.random.default_rng(31), infected=(3,))[0], "JPEG", quality=90)
    files = [("files", ("image.jpg", data, "image/jpeg")) for data in (first, second, first)]
    body = client.post("/v1/screen?overlays=true", files=files).json()
    assert [f["path"] for f in body["fields"]] == ["image.jpg", "image.jpg (2)", "image.jpg (3)"]
    assert len({f["overlay"] for f in body["fields"]}) == 3
    assert body["fields"][2]["quality"]["flags"] == ["duplicate"] and body["fields"][2]["n_cells"] == 0
    assert "the same field as image.jpg" in body["fields"][2]["quality"]["reasons"][-1]


def test_health_and_readiness_answer_while_every_screening_slot_is_taken(trained_run, monkeypatch):
    import threading
    import time

    from conftest import encode, make_field

    from malaria_cells.fields import Screener

    release, entered = threading.Event(), threading.Semaphore(0)
    original = Screener.screen_samples

    def held(self, *args, **kwargs):  # screening that waits until the test lets it go
        entered.release()
        release.wait(30)
        return original(self, *args, **kwargs)

    app = create_app(trained_run["model_path"], limits=ServeLimits(screening_slots=1, max_seconds=3.0))
    client = TestClient(app).__enter__()  # one event loop for every thread's requests, as uvicorn has
    field = [("files", ("f.jpg", encode(make_field(np.random.default_rng(5))[0], "JPEG", quality=90), "image/jpeg"))]
    assert client.post("/v1/screen", files=field).status_code == 200  # warm: the held request's field is quick
    monkeypatch.setattr(Screener, "screen_samples", held)
    answers = {}

    def post(name):
        answers[name] = client.post("/v1/screen", files=field)

    first = threading.Thread(target=post, args=("first",))
    first.start()
    assert entered.acquire(timeout=30)  # the only slot is taken
    assert client.get("/readyz").json() == {"status": "ready", "screening": 1, "waiting": 0, "slots": 1}
    second = threading.Thread(target=post, args=("second",))
    second.start()
    for _ in range(100):
        busy = client.get("/readyz")
        if busy.status_code == 503:
            break
        time.sleep(0.02)
    assert busy.status_code == 503 and busy.json()["waiting"] == 1
    started = time.perf_counter()
    assert client.get("/healthz").json() == {"status": "ok"}
    assert time.perf_counter() - started < 1.0
    second.join(10)  # no slot within its 3 s: told to come back
    assert answers["second"].status_code == 503 and "server busy" in answers["second"].json()["detail"]
    release.set()
    first.join(30)
    assert answers["first"].status_code == 200 and answers["first"].json()["summary"]["fields"] == 1
    assert client.get("/readyz").json()["screening"] == 0
    client.__exit__(None, None, None)


def test_model_endpoint_describes_both_models_by_file_name_and_an_open_host_needs_a_key(client, trained_run,
                                                                                        monkeypatch, capsys):
    described = client.get("/v1/model").json()
    assert "/" not in described["path"] and "/" not in described["fields"]["path"]
    assert described["fields"]["counting_threshold"] == pytest.approx(trained_run["threshold"])
    stages = described["fields"]["stage_model"]
    assert stages["path"] == "malaria-cells-stages.keras" and stages["figures"]["too_rare"] == ["schizont"]
    import uvicorn

    from malaria_cells import serving

    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    monkeypatch.delenv(serving.API_KEY_ENV, raising=False)
    with pytest.raises(MalariaCellsError, match="no API key is set"):
        serving.serve(trained_run["model_path"], host="0.0.0.0", port=8124)
    serving.serve(trained_run["model_path"], host="0.0.0.0", port=8124, no_auth=True)
    assert "warning: listening on 0.0.0.0 without an API key (--no-auth)" in capsys.readouterr().err
    serving.serve(trained_run["model_path"], host="0.0.0.0", port=8124, api_key="k")
    assert "warning" not in capsys.readouterr().err


def test_user_keys_file_is_checked_at_once_with_one_line(tmp_path):
    from malaria_cells.serving import read_user_keys

    good = tmp_path / "keys.csv"
    good.write_text("name,key\nDr. A. Diallo, diallo-key-0193\n\nB. Okello,okello-key-4471\n")
    assert read_user_keys(good) == {"Dr. A. Diallo": "diallo-key-0193", "B. Okello": "okello-key-4471"}
    for text, message in (("a,diallo-key-0193,extra\n", "line 1: expected name,key, got 3 values"),
                          ("a,short\n", "'a''s key is shorter than 12 characters"),
                          ("a,diallo-key-0193\na,okello-key-4471\n", "line 2: 'a' is named twice"),
                          ("a,diallo-key-0193\nb,diallo-key-0193\n", "another reviewer's too"),
                          (",diallo-key-0193\n", "a reviewer's name is one line"),
                          ("name,key\n", "no keys")):
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(MalariaCellsError, match=message) as error:
            read_user_keys(tmp_path / "bad.csv")
        assert "\n" not in str(error.value)
    with pytest.raises(MalariaCellsError, match="cannot read"):
        read_user_keys(tmp_path / "missing.csv")


def test_a_user_key_opens_the_api_and_names_its_user_and_the_shared_key_names_none():
    from fastapi import FastAPI

    from malaria_cells.serving import ApiKeyRequired

    app = FastAPI()

    @app.get("/who")
    def who(request: fastapi.Request):
        return {"user": getattr(request.state, "user", "unset")}

    app.add_middleware(ApiKeyRequired, api_key="shared-key-1", user_keys={"Dr. A. Diallo": "diallo-key-0193"})
    client = TestClient(app)
    assert client.get("/who", headers={"X-API-Key": "diallo-key-0193"}).json() == {"user": "Dr. A. Diallo"}
    assert client.get("/who?api_key=diallo-key-0193").json() == {"user": "Dr. A. Diallo"}
    assert client.get("/who", headers={"X-API-Key": "shared-key-1"}).json() == {"user": None}
    assert client.get("/who", headers={"X-API-Key": "diallo-key-019"}).status_code == 401
    assert client.get("/who").status_code == 401
    only_users = FastAPI()
    only_users.add_middleware(ApiKeyRequired, user_keys={"B. Okello": "okello-key-4471"})
    assert TestClient(only_users).get("/anything").status_code == 401  # user keys alone guard everything


def test_serve_refuses_user_keys_without_records_before_loading_anything(tmp_path):
    from malaria_cells import serving

    (tmp_path / "keys.csv").write_text("a,diallo-key-0193\n")
    with pytest.raises(MalariaCellsError, match="--user-keys: reviews are of recorded samples"):
        serving.serve(port=8125, user_keys=tmp_path / "keys.csv")
    with pytest.raises(MalariaCellsError, match="line 1: expected name,key"):
        (tmp_path / "bad.csv").write_text("just-a-name\n")
        serving.serve(port=8125, user_keys=tmp_path / "bad.csv", db=f"sqlite:///{tmp_path / 'lab.db'}")


def test_create_app_checks_user_keys_before_loading_a_model(tmp_path):
    (tmp_path / "keys.csv").write_text("a,diallo-key-0193\n")
    with pytest.raises(MalariaCellsError, match="name the records database"):
        create_app("no-such-model.keras", user_keys=tmp_path / "keys.csv")
    with pytest.raises(MalariaCellsError, match="also the shared API key"):
        create_app("no-such-model.keras", api_key="diallo-key-0193", user_keys={"a": "diallo-key-0193"},
                   db=f"sqlite:///{tmp_path / 'lab.db'}")


def test_every_request_is_logged_as_one_json_line_without_query_or_file_names(client, caplog):
    import logging

    from conftest import encode, make_field

    image, _ = make_field(np.random.default_rng(6))
    with caplog.at_level(logging.INFO, logger="malaria_cells.access"):
        client.post("/v1/screen?patient=PT-SECRET-7", files=[("files", ("PT-SECRET-7.jpg", encode(image, "JPEG"),
                                                                        "image/jpeg"))])
        client.get("/healthz")
        client.get("/nope")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "malaria_cells.access"]
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("POST", "/v1/screen", 200), ("GET", "/nope", 404)]  # a health check that passes is not logged
    assert all(set(line) == {"time", "method", "path", "status", "ms", "bytes", "client"} for line in lines)
    assert lines[0]["bytes"] > 100 and lines[0]["ms"] > 0
    assert "PT-SECRET" not in caplog.text
