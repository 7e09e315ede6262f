import io
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from malaria_cells import MalariaCellsError, download
from malaria_cells.download import safe_extract

from conftest import make_cell


class RangeHandler(SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support; can cut a response short once."""

    cut_after: int | None = None

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        try:
            data = open(path, "rb").read()
        except OSError:
            self.send_error(404)
            return
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if RangeHandler.cut_after is not None:
            body, RangeHandler.cut_after = body[: RangeHandler.cut_after], None
        self.wfile.write(body)


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def make_zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def png(infected):
    buffer = io.BytesIO()
    Image.fromarray(make_cell(infected, np.random.default_rng(0))).save(buffer, "PNG")
    return buffer.getvalue()


def nih_members():
    members = {}
    for top in ("cell_images/", "cell_images/cell_images/"):
        members[f"{top}Parasitized/C1P1_cell_1.png"] = png(True)
        members[f"{top}Uninfected/C1P1_cell_2.png"] = png(False)
    return members


def test_download_resumes_verifies_and_extracts(server, tmp_path):
    root, url = server
    make_zip(root / "cell_images.zip", nih_members())
    RangeHandler.cut_after = 100
    with pytest.raises(MalariaCellsError, match="run the command again to resume"):
        download(tmp_path / "dest", url=f"{url}/cell_images.zip", verbose=0)
    assert (tmp_path / "dest" / "cell_images.zip.part").stat().st_size == 100
    dataset = download(tmp_path / "dest", url=f"{url}/cell_images.zip", verbose=0)
    assert dataset == (tmp_path / "dest" / "cell_images").resolve() or dataset == tmp_path / "dest" / "cell_images"
    assert (dataset / "Parasitized" / "C1P1_cell_1.png").read_bytes() == png(True)
    assert not (tmp_path / "dest" / "cell_images.zip.part").exists()


def test_download_uses_the_cache_dir(server, tmp_path, monkeypatch):
    root, url = server
    make_zip(root / "cell_images.zip", nih_members())
    monkeypatch.setenv("MALARIA_CELLS_HOME", str(tmp_path / "home"))
    dataset = download(url=f"{url}/cell_images.zip", verbose=0)
    assert str(dataset).startswith(str(tmp_path / "home"))


def test_sha256_and_size_mismatch_are_refused(server, tmp_path):
    root, url = server
    make_zip(root / "cell_images.zip", nih_members())
    with pytest.raises(MalariaCellsError, match="SHA-256 mismatch"):
        download(tmp_path / "a", url=f"{url}/cell_images.zip", sha256="0" * 64, verbose=0)
    with pytest.raises(MalariaCellsError, match="expected 12"):
        download(tmp_path / "b", url=f"{url}/cell_images.zip", expected_size=12, verbose=0)


def test_corrupt_member_fails_crc_check(server, tmp_path):
    root, url = server
    make_zip(root / "cell_images.zip", {"cell_images/Parasitized/a.txt": b"A" * 5000})
    data = bytearray((root / "cell_images.zip").read_bytes())
    data[40] ^= 0xFF
    (root / "cell_images.zip").write_bytes(bytes(data))
    with pytest.raises(MalariaCellsError, match="CRC|not a valid zip|damaged"):
        download(tmp_path / "c", url=f"{url}/cell_images.zip", verbose=0)


@pytest.mark.parametrize("members, message", [
    ({"../evil.txt": b"x"}, "escape"),
    ({"/abs/evil.txt": b"x"}, "escape"),
    ({"cell_images/bomb.bin": b"\0" * (50 * 2**20)}, "zip bomb"),
])
def test_unsafe_archives_are_refused(tmp_path, members, message):
    make_zip(tmp_path / "x.zip", members)
    with pytest.raises(MalariaCellsError, match=message):
        safe_extract(tmp_path / "x.zip", tmp_path / "dest")
    assert not (tmp_path / "evil.txt").exists()


def test_too_many_members_are_refused(tmp_path, monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("malaria_cells.download"), "MAX_MEMBERS", 3)
    make_zip(tmp_path / "x.zip", {f"f{i}": b"x" for i in range(5)})
    with pytest.raises(MalariaCellsError, match="5 members"):
        safe_extract(tmp_path / "x.zip", tmp_path / "dest")


def test_unreachable_server_is_a_clear_error(tmp_path):
    with pytest.raises(MalariaCellsError, match="cannot connect"):
        download(tmp_path, url="http://127.0.0.1:9/cell_images.zip", verbose=0)


def test_a_colliding_entry_is_never_replaced_and_nothing_is_left_behind(server, tmp_path):
    root, url = server
    make_zip(root / "cell_images.zip", nih_members())
    dest = tmp_path / "dest"
    (dest / "cell_images").mkdir(parents=True)
    (dest / "cell_images" / "my-notes.txt").write_text("mine")
    with pytest.raises(MalariaCellsError, match=r"cell_images: already exists.*nothing was changed"):
        download(dest, url=f"{url}/cell_images.zip", verbose=0)
    assert (dest / "cell_images" / "my-notes.txt").read_text() == "mine"
    assert sorted(p.name for p in dest.iterdir()) == ["cell_images", "cell_images.zip"]


def test_an_extracted_dataset_is_reused_not_replaced(server, tmp_path):
    root, url = server
    make_zip(root / "cell_images.zip", nih_members())
    first = download(tmp_path / "d", url=f"{url}/cell_images.zip", verbose=0)
    marker = first / "Parasitized" / "added-by-me.png"
    marker.write_bytes(png(True))
    assert download(tmp_path / "d", url=f"{url}/cell_images.zip", verbose=0) == first and marker.exists()


def test_many_small_highly_compressed_members_are_refused_before_extracting(tmp_path):
    make_zip(tmp_path / "x.zip", {f"cell_images/f{i}.bin": b"\0" * (512 * 1024) for i in range(40)})
    assert (tmp_path / "x.zip").stat().st_size < 100_000
    with pytest.raises(MalariaCellsError, match="zip bomb"):
        safe_extract(tmp_path / "x.zip", tmp_path / "dest")
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())


def test_a_million_members_are_refused_from_the_end_record_at_once(tmp_path):
    import struct
    import time

    # A ZIP64 end record declaring 1,000,000 members, its locator and the classic end record.
    zip64_end = (b"PK\x06\x06" + struct.pack("<QHHIIQQQQ", 44, 45, 45, 0, 0, 1_000_000, 1_000_000, 0, 0))
    locator = b"PK\x06\x07" + struct.pack("<IQI", 0, 0, 1)
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    (tmp_path / "many.zip").write_bytes(zip64_end + locator + end)
    started = time.monotonic()
    with pytest.raises(MalariaCellsError, match="1000000 members"):
        safe_extract(tmp_path / "many.zip", tmp_path / "dest")
    assert time.monotonic() - started < 1


def test_a_damaged_member_fails_its_crc_and_leaves_nothing(tmp_path):
    make_zip(tmp_path / "x.zip", {"cell_images/a.txt": b"A" * 5000, "cell_images/b.txt": b"B" * 5000})
    data = bytearray((tmp_path / "x.zip").read_bytes())
    data[45] ^= 0x55  # inside the first member's compressed data
    (tmp_path / "x.zip").write_bytes(bytes(data))
    with pytest.raises(MalariaCellsError, match="damaged|CRC"):
        safe_extract(tmp_path / "x.zip", tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []
