"""The compiled PNG decoder and 2x resize must give libpng's and numpy's pixels exactly."""

from __future__ import annotations

import struct
import zlib

import imagecodecs
import numpy as np
import pytest

from malaria_cells import data

kernels = pytest.importorskip("malaria_cells.kernels", reason="the C extension malaria_cells._pngloops was not built")


@pytest.fixture(autouse=True, params=["simd", "scalar"])
def paeth_path(request):
    """Each test runs with the SSE4.1 Paeth loop (where the CPU has it) and the plain one."""
    from malaria_cells import _pngloops

    before = _pngloops.simd()
    _pngloops.simd(request.param == "simd")
    yield
    _pngloops.simd(before)


def _chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def encode_png(pixels: np.ndarray, filters, *, extra: bytes = b"", interlace: int = 0) -> bytes:
    """An 8-bit RGB/RGBA PNG whose rows use the given filter types (0-4), as PNG defines them."""
    height, width, channels = pixels.shape
    rows, above = [], np.zeros(width * channels, np.int32)
    for y in range(height):
        row = pixels[y].reshape(-1).astype(np.int32)
        left = np.concatenate([np.zeros(channels, np.int32), row[:-channels]])
        up_left = np.concatenate([np.zeros(channels, np.int32), above[:-channels]])
        estimate = left + above - up_left
        distances = [np.abs(estimate - left), np.abs(estimate - above), np.abs(estimate - up_left)]
        paeth = np.where((distances[0] <= distances[1]) & (distances[0] <= distances[2]), left,
                         np.where(distances[1] <= distances[2], above, up_left))
        predicted = [0, left, above, (left + above) // 2, paeth][filters[y]]
        rows.append(bytes([filters[y]]) + ((row - predicted) % 256).astype(np.uint8).tobytes())
        above = row
    header = struct.pack(">IIBBBBB", width, height, 8, {3: 2, 4: 6}[channels], 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra
            + _chunk(b"IDAT", zlib.compress(b"".join(rows))) + _chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("height, width", [(1, 1), (7, 5), (33, 17), (128, 128)])
def test_every_row_filter_decodes_to_libpngs_pixels(channels, height, width):
    rng = np.random.default_rng(height * width + channels)
    smooth = rng.integers(0, 256, (height, width, channels)).cumsum(axis=1) // max(1, width // 8)
    for pixels in (rng.integers(0, 256, (height, width, channels)), smooth % 256):
        pixels = pixels.astype(np.uint8)
        for filters in ([4] * height, rng.integers(0, 5, height)):
            png = encode_png(pixels, filters)
            decoded = kernels.decode_png(png)
            assert decoded is not None
            np.testing.assert_array_equal(decoded, pixels)
            np.testing.assert_array_equal(decoded, imagecodecs.png_decode(png))


def test_files_written_by_libpng_and_pillow_decode_the_same(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "cell.png")
    for png in (imagecodecs.png_encode(pixels), (tmp_path / "cell.png").read_bytes()):
        np.testing.assert_array_equal(kernels.decode_png(png), pixels)


def _split_image_data(png: bytes, parts: int) -> bytes:
    """The same PNG with its image data in ``parts`` consecutive IDAT chunks."""
    (length,) = struct.unpack(">I", png[33:37])
    data = png[41 : 41 + length]
    cuts = np.linspace(0, len(data), parts + 1).astype(int)
    return png[:33] + b"".join(_chunk(b"IDAT", data[a:b]) for a, b in zip(cuts[:-1], cuts[1:])) + png[-12:]


def test_image_data_in_several_chunks_decodes_the_same():
    pixels = np.random.default_rng(12).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    png = _split_image_data(encode_png(pixels, [4] * 16), 3)
    assert png.count(b"IDAT") == 3
    np.testing.assert_array_equal(imagecodecs.png_decode(png), pixels)
    np.testing.assert_array_equal(kernels.decode_png(png), pixels)
    out = np.zeros((2, 16, 16, 3), np.uint8)
    assert kernels.decode_cells([png, png], out) == [0, 0]
    np.testing.assert_array_equal(out, [pixels, pixels])


def test_text_and_colour_space_chunks_do_not_change_libpngs_pixels():
    pixels = np.random.default_rng(2).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    extra = _chunk(b"gAMA", struct.pack(">I", 45455)) + _chunk(b"sRGB", b"\x00") + _chunk(b"tEXt", b"a\x00b")
    png = encode_png(pixels, [1] * 9, extra=extra)
    np.testing.assert_array_equal(imagecodecs.png_decode(png), pixels)  # what makes ignoring them right
    np.testing.assert_array_equal(kernels.decode_png(png), pixels)
    out = np.zeros((1, 9, 11, 3), np.uint8)
    assert kernels.decode_cells([png], out) == [-1]  # not square: not a cell this path takes
    square = encode_png(pixels[:, :9], [1] * 9, extra=extra)
    assert kernels.decode_cells([square], out := np.zeros((1, 9, 9, 3), np.uint8)) == [0]
    np.testing.assert_array_equal(out[0], pixels[:, :9])


def _with_filter_byte(value: int) -> bytes:
    rows = bytes([value]) + bytes(6) + bytes([0]) + bytes(6)  # 2 x 2 RGB, first row's filter = value
    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows))
            + _chunk(b"IEND", b""))


@pytest.mark.parametrize("case", ["gray", "sixteen-bit", "palette", "interlaced", "bad crc", "truncated",
                                  "bad filter", "transparency", "short stream", "not png", "split data",
                                  "second header"])
def test_anything_unusual_is_left_to_libpng(case):
    pixels = np.random.default_rng(3).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    png = encode_png(pixels, [2] * 6)
    if case == "gray":
        png = imagecodecs.png_encode(np.ascontiguousarray(pixels[..., 0]))
    elif case == "sixteen-bit":
        png = imagecodecs.png_encode(pixels.astype(np.uint16) * 257)
    elif case == "palette":
        from PIL import Image
        import io

        buffer = io.BytesIO()
        Image.fromarray(pixels).convert("P").save(buffer, format="PNG")
        png = buffer.getvalue()
    elif case == "interlaced":
        png = encode_png(pixels, [2] * 6, interlace=1)
    elif case == "bad crc":  # the image data's checksum itself: the data still inflates
        png = png[:-16] + bytes([png[-16] ^ 1]) + png[-15:]
        with pytest.raises(Exception):
            imagecodecs.png_decode(png)  # libpng refuses it too
    elif case == "truncated":
        png = png[: len(png) // 2]
    elif case == "bad filter":
        png = _with_filter_byte(9)
    elif case == "transparency":
        png = encode_png(pixels, [2] * 6, extra=_chunk(b"tRNS", b"\x00\x00\x00\x00\x00\x00"))
    elif case == "short stream":
        png = encode_png(pixels[:3], [2] * 3).replace(struct.pack(">II", 6, 3), struct.pack(">II", 6, 6))
        png = png[:16] + png[16:29] + struct.pack(">I", zlib.crc32(png[12:29])) + png[33:]
    elif case in ("split data", "second header"):
        idat = png[33:-12]
        (length,) = struct.unpack(">I", idat[:4])
        data, half = idat[8 : 8 + length], length // 2
        between = _chunk(b"tEXt", b"a\x00b") if case == "split data" else png[8:33]
        png = png[:33] + _chunk(b"IDAT", data[:half]) + between + _chunk(b"IDAT", data[half:]) + png[-12:]
    else:
        png = b"GIF89a" + png[6:]
    assert kernels.decode_png(png) is None
    side = struct.unpack(">I", png[16:20])[0] if png.startswith(b"\x89PNG") else 6
    for out_side in (side, side // 2):  # the whole-cell path, at the image's size and half of it
        assert kernels.decode_cells([png], np.zeros((1, max(1, out_side), max(1, out_side), 3), np.uint8)) == [-1]


@pytest.mark.parametrize("channels", [3, 4])
def test_decode_png_into_halves_as_decoding_then_resizing_does(channels, monkeypatch):
    rng = np.random.default_rng(6 + channels)
    monkeypatch.setattr(data, "_kernels", None)
    for side in (1, 5, 32):
        pixels = rng.integers(0, 256, (2 * side, 2 * side, channels), dtype=np.uint8)
        pixels[: side // 2] = rng.integers(0, 2, pixels[: side // 2].shape) * 255  # block sums ending in .5
        png = encode_png(pixels, rng.integers(0, 5, 2 * side))
        out = np.full((side, side, 3), 7, np.uint8)
        assert kernels.decode_png_into(png, out)
        np.testing.assert_array_equal(out, data.resize_images([data.decode_image(png)], side)[0])


def test_decode_png_into_copies_a_png_of_its_size_and_refuses_other_sizes():
    pixels = np.random.default_rng(8).integers(0, 256, (12, 12, 4), dtype=np.uint8)
    png = encode_png(pixels, [4, 1] * 6)
    out = np.zeros((12, 12, 3), np.uint8)
    assert kernels.decode_png_into(png, out)
    np.testing.assert_array_equal(out, pixels[..., :3])
    for side in (5, 7, 11, 24):
        assert not kernels.decode_png_into(png, np.zeros((side, side, 3), np.uint8))
    assert not kernels.decode_png_into(encode_png(pixels[:, :10], [0] * 12), np.zeros((5, 5, 3), np.uint8))
    assert not kernels.decode_png_into(png[:-20] + bytes([png[-20] ^ 1]) + png[-19:], np.zeros((6, 6, 3), np.uint8))
    assert not kernels.decode_png_into(_with_filter_byte(9)[:-12] + _chunk(b"IEND", b""), np.zeros((1, 1, 3), np.uint8))


@pytest.mark.parametrize("path", ["whole cells in C", "decode_png_into"])
def test_reading_files_gives_the_same_cells_and_skips_with_the_kernels(tmp_path, monkeypatch, path):
    if path == "decode_png_into":
        monkeypatch.setattr(kernels, "_libdeflate", False)  # as where libdeflate is not found
        assert kernels.read_cells([], np.zeros((0, 8, 8, 3), np.uint8)) is None
    rng = np.random.default_rng(9)
    paths = []
    for index, (side, channels) in enumerate([(16, 3), (8, 3), (16, 4), (13, 3), (8, 4), (32, 3), (16, 3)]):
        pixels = rng.integers(0, 256, (side, side, channels), dtype=np.uint8)
        paths.append(tmp_path / f"cell{index}.png")
        paths[-1].write_bytes(encode_png(pixels, rng.integers(0, 5, side)))
    paths[-1].write_bytes(_split_image_data(paths[-1].read_bytes(), 4))
    (tmp_path / "broken.png").write_bytes(paths[0].read_bytes()[:70])
    (tmp_path / "cell.jpg").write_bytes(imagecodecs.jpeg8_encode(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    bad = [tmp_path / "broken.png", tmp_path / "empty.png", tmp_path / "missing.png", tmp_path / "folder.png"]
    paths[3:3] = bad[:2] + [tmp_path / "cell.jpg"] + bad[2:]
    paths = [str(path) for path in paths]
    monkeypatch.setattr(data, "_kernels", None)
    expected = data._load_files(paths, 8)
    monkeypatch.setattr(data, "_kernels", kernels)
    kept, images, skipped = data._load_files(paths, 8)
    assert kept == expected[0] and skipped == expected[2] and [p for p, _ in skipped] == [str(p) for p in bad]
    assert [reason for _, reason in skipped] == ["corrupt or truncated PNG", "empty file", "No such file or directory",
                                                 "Is a directory"]
    np.testing.assert_array_equal(images, expected[1])
    assert images.shape == (len(paths) - len(bad), 8, 8, 3)
    if path == "whole cells in C":
        out = np.zeros((len(paths), 8, 8, 3), np.uint8)
        statuses = kernels.read_cells(paths, out)
        assert [status == 0 for status in statuses] == [p.endswith(("cell0.png", "cell1.png", "cell2.png", "cell4.png",
                                                                    "cell6.png")) for p in paths]
        assert statuses[paths.index(str(bad[2]))] > 0 and statuses[paths.index(str(bad[3]))] > 0  # errno


def test_images_in_memory_give_the_same_cells_with_the_kernels(monkeypatch):
    rng = np.random.default_rng(11)
    contents = [encode_png(rng.integers(0, 256, (side, side, channels), dtype=np.uint8), rng.integers(0, 5, side))
                for side, channels in [(16, 3), (8, 4), (12, 3), (16, 4)]]
    contents.insert(2, contents[0][:50])
    monkeypatch.setattr(data, "_kernels", None)
    expected = data.preprocess_many(contents, 8)
    monkeypatch.setattr(data, "_kernels", kernels)
    images, decoded, reasons = data.preprocess_many(contents, 8)
    np.testing.assert_array_equal(images, expected[0])
    assert list(decoded) == list(expected[1]) == [True, True, False, True, True] and reasons == expected[2]


def test_decode_image_gives_the_same_pixels_and_errors_with_the_kernels(monkeypatch):
    pixels = np.random.default_rng(4).integers(0, 256, (20, 24, 4), dtype=np.uint8)
    png = encode_png(pixels, [4, 3, 2, 1, 0] * 4)
    monkeypatch.setattr(data, "_kernels", None)
    without = data.decode_image(png)
    with pytest.raises(data.UnreadableImage) as libpng_error:
        data.decode_image(png[:60])
    monkeypatch.setattr(data, "_kernels", kernels)
    np.testing.assert_array_equal(data.decode_image(png), without)
    np.testing.assert_array_equal(without, pixels[..., :3])
    with pytest.raises(data.UnreadableImage) as kernels_error:
        data.decode_image(png[:60])
    assert str(kernels_error.value) == str(libpng_error.value)


def test_halve_is_the_numpy_block_mean_rounding_halves_to_even(monkeypatch):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (9, 24, 18, 3), dtype=np.uint8)
    images[0] = rng.integers(0, 2, (24, 18, 3)) * 255  # sums ending in .5 after dividing
    monkeypatch.setattr(data, "_kernels", None)
    expected = data._halve(images)
    np.testing.assert_array_equal(kernels.halve(images), expected)
    np.testing.assert_array_equal(kernels.halve(images[:, :, ::-1]), data._halve(images[:, :, ::-1]))


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("MALARIA_CELLS_NO_KERNELS", "1")
    assert data._import_kernels() is None
    monkeypatch.setenv("MALARIA_CELLS_NO_KERNELS", "0")
    assert data._import_kernels() is kernels


def test_without_the_compiled_loops_reading_goes_on_with_libpng(monkeypatch):
    import sys

    import malaria_cells

    monkeypatch.delenv("MALARIA_CELLS_NO_KERNELS", raising=False)
    monkeypatch.delitem(sys.modules, "malaria_cells.kernels")
    monkeypatch.delattr(malaria_cells, "kernels")
    monkeypatch.delattr(malaria_cells, "_pngloops")
    monkeypatch.setitem(sys.modules, "malaria_cells._pngloops", None)  # as where no compiler built it
    assert data._import_kernels() is None


def test_the_loops_refuse_buffers_that_do_not_fit():
    from malaria_cells import _pngloops

    raw = np.zeros(4 * (12 + 1), np.uint8)
    with pytest.raises(ValueError, match="too small"):
        _pngloops.unfilter(raw[:-1], 4, 12, 3, np.empty(48, np.uint8))
    with pytest.raises(ValueError, match="too small"):
        _pngloops.unfilter(raw, 4, 12, 3, np.empty(47, np.uint8))
    with pytest.raises(ValueError, match="geometry"):
        _pngloops.unfilter(raw, 4, 12, 5, np.empty(48, np.uint8))
    with pytest.raises(ValueError, match="even"):
        _pngloops.unfilter_halved(raw[:39], 3, 12, 3, np.empty(6, np.uint8))
    with pytest.raises(TypeError):  # read-only output
        _pngloops.unfilter(raw, 4, 12, 3, bytes(48))
    with pytest.raises(ValueError, match="shape"):
        _pngloops.halve(np.zeros((1, 4, 4, 3), np.uint8), 1, 4, 4, 3, np.empty(11, np.uint8))
    assert _pngloops.unfilter(raw, 4, 12, 3, out := np.ones(48, np.uint8)) and not out.any()
    assert kernels._libdeflate_ready()
    batch = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(TypeError):
        _pngloops.decode_cells([b"", 7], 4, batch)  # not bytes-like
    with pytest.raises(TypeError):
        _pngloops.read_cells(["cell.png", 7], 4, batch)  # not a path
    with pytest.raises(ValueError, match="smaller"):
        _pngloops.decode_cells([b"", b"", b""], 4, batch)


def test_info_says_which_png_decoder_is_in_use(monkeypatch):
    assert data.png_decoder().startswith("the package's C loops")
    assert ("SSE4.1" in data.png_decoder()) == kernels._pngloops.simd()
    monkeypatch.setattr(kernels, "_libdeflate", False)
    assert "inflating through imagecodecs" in data.png_decoder()
    monkeypatch.setattr(data, "_kernels", None)
    assert "install a C compiler" in data.png_decoder()
    monkeypatch.setenv("MALARIA_CELLS_NO_KERNELS", "1")
    assert "MALARIA_CELLS_NO_KERNELS" in data.png_decoder()
