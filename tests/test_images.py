import io

import numpy as np
import pytest
from PIL import Image

from malaria_cells.images import preprocess

from conftest import encode, make_cell


@pytest.mark.parametrize("mode, fmt", [
    ("RGB", "PNG"), ("RGB", "JPEG"), ("RGB", "BMP"), ("RGB", "TIFF"), ("RGBA", "PNG"),
    ("L", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("L", "TIFF"), ("RGB", "GIF"),
])
def test_every_format_and_mode_decodes_to_rgb_of_the_asked_size(mode, fmt):
    rgb = Image.fromarray(make_cell(True, np.random.default_rng(0), 57))
    if mode == "I;16":
        image = Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257))
    else:
        image = rgb.convert(mode)
    out = preprocess(encode(image, fmt), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    reference = np.asarray(rgb.convert("L").resize((32, 32)), float)
    assert np.corrcoef(out.mean(axis=2).ravel(), reference.ravel())[0, 1] > 0.9


def test_sixteen_bit_keeps_its_brightness():
    image = Image.fromarray(np.full((20, 20), 40000, np.uint16))
    out = preprocess(encode(image, "PNG"), 8)
    assert abs(int(out[0, 0, 0]) - round(40000 / 257)) <= 1


@pytest.mark.parametrize("layout", ["grey1", "grey8", "grey16", "greyalpha8", "rgb8", "rgb16", "rgba8",
                                    "rgba16", "palette"])
def test_every_png_layout_gives_its_exact_pixels(layout):
    """Each PNG layout goes to one of two decoders (by its header); both must give the same RGB."""
    import cv2

    from malaria_cells.images import decode

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    if layout == "grey1":
        contents, expected = encode(Image.fromarray(grey > 127).convert("1"), "PNG"), np.where(grey > 127, 255, 0)
    elif layout == "greyalpha8":
        contents, expected = encode(Image.fromarray(np.dstack([grey, rgb[..., 1]]), "LA"), "PNG"), grey
    elif layout == "palette":
        image = Image.fromarray(rgb).quantize(16)
        contents, expected = encode(image, "PNG"), np.asarray(image.convert("RGB"))
    else:
        bits = 16 if layout.endswith("16") else 8
        channels = {"grey": 1, "rgb": 3, "rgba": 4}[layout[:-len(str(bits))]]
        pixels = np.dstack([rgb, rng.integers(0, 256, (9, 11), dtype=np.uint8)])[..., :channels]
        stored = pixels.astype(np.uint16) * 257 if bits == 16 else pixels
        # OpenCV writes BGR(A); the file then holds the RGB(A) of `pixels`
        order = stored[..., 0] if channels == 1 else stored[..., [2, 1, 0, 3][:channels]]
        contents, expected = cv2.imencode(".png", np.ascontiguousarray(order))[1].tobytes(), pixels[..., :3]
        expected = expected[..., 0] if channels == 1 else expected
    out = decode(contents)
    expected = np.asarray(expected, np.uint8)
    expected = np.repeat(expected[..., None], 3, axis=2) if expected.ndim == 2 else expected
    assert out.dtype == np.uint8 and np.array_equal(out, expected)


def test_truncated_png_and_decompression_bomb_are_refused_before_harm():
    import struct
    import zlib

    from malaria_cells.images import UnreadableImage

    whole = encode(Image.fromarray(make_cell(True, np.random.default_rng(0), 40)), "PNG")
    with pytest.raises(UnreadableImage, match="corrupt or truncated PNG"):
        preprocess(whole[: len(whole) // 2], 16)
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    with pytest.raises(UnreadableImage, match="too large"):
        preprocess(bomb, 16)


def test_half_size_resize_is_the_exact_2x2_block_mean():
    from malaria_cells.images import resize

    image = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    means = image.reshape(64, 2, 64, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(resize(image, 64).astype(float) - means).max() <= 0.5
    assert resize(image, (40, 20)).shape == (20, 40, 3)
    assert np.array_equal(resize(image, 128), image)


def _bmp_header(width: int, height: int, bits: int = 24) -> bytes:
    import struct

    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + 64, 0, 0, 14 + len(info)) + info + bytes(64)


@pytest.mark.parametrize("width, height", [(6000, -6000), (6000, 6000), (1, -2**31), (2**31 - 1, 1), (0, 5), (-4, 4)])
def test_a_bmp_whose_header_lies_is_refused_not_crashed_on(width, height):
    from malaria_cells.images import UnreadableImage, decode

    with pytest.raises(UnreadableImage):
        decode(_bmp_header(width, height))


def test_multi_frame_files_decode_their_first_frame_only():
    from malaria_cells.images import decode

    frames = [Image.fromarray(np.full((40, 30, 3), value, np.uint8)) for value in (10, 200, 90)]
    for fmt, options in (("GIF", {}), ("TIFF", {}), ("WEBP", {"lossless": True}), ("PNG", {})):
        buffer = io.BytesIO()
        frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], **options)
        pixels = decode(buffer.getvalue())
        assert pixels.shape == (40, 30, 3), fmt
        assert abs(int(pixels.mean()) - 10) <= 2, fmt


def test_images_over_the_pixel_limit_are_refused_from_the_header_for_every_format():
    from malaria_cells.images import UnreadableImage, decode, dimensions

    image = Image.fromarray(np.zeros((300, 400, 3), np.uint8))
    for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"):
        contents = encode(image, fmt)
        assert dimensions(contents) == (400, 300), fmt
        with pytest.raises(UnreadableImage, match="too large"):
            decode(contents, max_pixels=100_000)
        assert decode(contents, max_pixels=120_000).shape == (300, 400, 3)


def test_reduce_decodes_at_a_fraction_of_each_side():
    from malaria_cells.images import decode

    pixels = np.random.default_rng(0).integers(0, 256, (301, 402, 3), dtype=np.uint8)
    for fmt in ("JPEG", "PNG", "TIFF"):
        assert decode(encode(pixels, fmt), reduce=2).shape == (151, 201, 3), fmt
        assert decode(encode(pixels, fmt), reduce=4).shape == (76, 101, 3), fmt


def test_exif_orientation_is_read_but_pixels_stay_in_the_stored_grid():
    from malaria_cells.images import decode, exif_orientation

    image = Image.fromarray(np.zeros((20, 50, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 8
    tagged = encode(image, "JPEG", exif=exif.tobytes())
    assert exif_orientation(tagged) == 8
    assert decode(tagged).shape == (20, 50, 3)
    assert exif_orientation(encode(image, "JPEG")) == 1
    assert exif_orientation(encode(image, "PNG")) == 1


def _lie_about_size(contents: bytes, fmt: str, width: int, height: int) -> bytes:
    """The same file with its header declaring another size (checksums fixed where there are)."""
    import struct
    import zlib

    data = bytearray(contents)
    if fmt == "PNG":
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    elif fmt == "GIF":
        data[6:10] = struct.pack("<HH", min(width, 65535), min(height, 65535))
    elif fmt == "BMP":
        data[18:26] = struct.pack("<ii", width, height)
    elif fmt == "JPEG":
        at = data.find(b"\xff\xc0")
        data[at + 5:at + 9] = struct.pack(">HH", min(height, 65535), min(width, 65535))
    elif fmt == "WEBP":  # lossy VP8: 14-bit sizes after the frame tag and start code
        at = data.find(b"\x9d\x01\x2a")
        data[at + 3:at + 7] = struct.pack("<HH", min(width, 16383), min(height, 16383))
    elif fmt == "TIFF":
        return contents[: len(contents) // 3]  # the header keeps its size, the pixels are gone
    return bytes(data)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "JPEG", "WEBP", "TIFF"])
@pytest.mark.parametrize("declared", [(70000, 70000), (3000, 3000), (64, 9000)])
def test_a_header_that_lies_about_the_size_is_refused_or_decoded_to_that_size(fmt, declared):
    from malaria_cells.images import UnreadableImage, decode, dimensions

    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    contents = _lie_about_size(encode(image, fmt), fmt, *declared)
    try:
        pixels = decode(contents)
    except UnreadableImage as error:
        assert "\n" not in str(error)
    else:
        width, height = dimensions(contents)
        assert pixels.shape == (height, width, 3) and width * height <= 40_000_000


def test_a_png_chunk_claiming_gigabytes_is_refused_at_once():
    import struct
    import time

    from malaria_cells.images import UnreadableImage, decode

    good = encode(make_cell(True, np.random.default_rng(0), 64), "PNG")
    header_end = 8 + 12 + 13  # signature, then the IHDR chunk
    lying = good[:header_end] + struct.pack(">I4s", 0xFF0000A6, b"PLTE") + good[header_end + 8:]
    started = time.monotonic()
    with pytest.raises(UnreadableImage, match="claims 4278190246 bytes"):
        decode(lying)
    assert time.monotonic() - started < 1


def test_refusing_corrupt_pngs_leaves_the_interpreter_intact():
    """Each refusal must release what it took: a decoder that drops a reference per corrupt
    file would bring a long-running server down after a few thousand uploads."""
    import gc
    import sys

    from malaria_cells.images import UnreadableImage, decode

    good = bytearray(encode(make_cell(True, np.random.default_rng(1), 64), "PNG"))
    idat = good.index(b"IDAT")
    good[idat + 20] ^= 0xFF  # corrupt the image data (the CRC check refuses it)
    gc.collect()
    before = sys.getrefcount(None)
    for _ in range(500):
        with pytest.raises(UnreadableImage):
            decode(bytes(good))
    gc.collect()
    assert sys.getrefcount(None) >= before - 50


def _jpeg_bytes(image, **options):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def test_jpeg_with_thousands_of_scans_or_metadata_segments_is_refused_from_its_structure():
    from malaria_cells.images import MAX_JPEG_METADATA_SEGMENTS, MAX_JPEG_SCANS, UnreadableImage, decode, dimensions

    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    progressive = _jpeg_bytes(image, progressive=True)
    assert 1 < progressive.count(b"\xff\xda") <= MAX_JPEG_SCANS  # an ordinary progressive JPEG is read
    assert decode(progressive).shape == (64, 64, 3)
    last = progressive.rfind(b"\xff\xda")
    many_scans = progressive[:-2] + progressive[last:-2] * (MAX_JPEG_SCANS + 1) + b"\xff\xd9"
    payload = b"Exif\x00\x00" + bytes(1000)
    segment = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    baseline = _jpeg_bytes(image)
    assert decode(baseline[:2] + segment * 3 + baseline[2:]).shape == (64, 64, 3)  # a few segments are fine
    many_segments = baseline[:2] + segment * (MAX_JPEG_METADATA_SEGMENTS + 1) + baseline[2:]
    # a motion photo: a video appended after the end of the image, whose bytes hold 0xFFDA by chance
    appended = baseline + bytes(np.random.default_rng(1).integers(0, 256, 4 * 2**20, np.uint8)) + b"\xff\xda" * 200
    assert decode(appended).shape == (64, 64, 3)
    for data, words in ((many_scans, "scans"), (many_segments, "too much metadata")):
        for read in (dimensions, decode):
            with pytest.raises(UnreadableImage, match=words):
                read(data)


def test_a_file_is_refused_from_its_first_bytes_before_the_rest_is_read(tmp_path):
    import subprocess
    import sys

    from malaria_cells.images import HEADER_BYTES, UnreadableImage, read_file

    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    small = _jpeg_bytes(image)
    assert read_file(_write(tmp_path / "ok.jpg", small)) == small
    # a 64x64 JPEG followed by 2 GB (sparse: no disk used): more than such an image can hold
    huge = _write(tmp_path / "huge.jpg", small)
    with open(huge, "r+b") as handle:
        handle.truncate(2 * 2**30)
    with pytest.raises(UnreadableImage, match=r"file too large \(2,048 MB; at most 16 MB"):
        read_file(huge)
    # in a fresh process, so that the peak memory is this refusal's alone
    probe = ("import sys\nfrom malaria_cells.images import read_file, UnreadableImage\n"
             "try:\n    read_file(sys.argv[1])\nexcept UnreadableImage:\n    pass\n" + _PEAK + "print(peak_kib())")
    peak_kib = int(subprocess.run([sys.executable, "-c", probe, str(huge)], capture_output=True, text=True,
                                  check=True, env=_this_package_env()).stdout)
    assert peak_kib < 300 * 1024, peak_kib
    text = _write(tmp_path / "notes.jpg", b"just some text\n" * 200_000)
    with pytest.raises(UnreadableImage, match="not an image"):
        read_file(text)
    with pytest.raises(UnreadableImage, match="empty file"):
        read_file(_write(tmp_path / "empty.png", b""))
    bomb = _write(tmp_path / "bomb.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (50_000).to_bytes(4, "big") * 2
                  + b"\x08\x02\x00\x00\x00" + bytes(HEADER_BYTES))
    with pytest.raises(UnreadableImage, match="image too large"):
        read_file(bomb)


def _write(path, data):
    path.write_bytes(data)
    return path


def test_a_16_bit_rgba_png_decodes_without_holding_its_16_bit_pixels_whole(tmp_path):
    import subprocess
    import sys

    import cv2

    height, width = 4000, 5000  # 160 MB as 16-bit RGBA, 60 MB as 8-bit RGB
    image = np.empty((height, width, 4), np.uint16)
    image[..., :3] = np.linspace(0, 65535, width).astype(np.uint16)[None, :, None]
    image[..., 3] = 65535
    path = tmp_path / "wide16.png"
    path.write_bytes(cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes())
    del image
    # the decoders' libraries imported first, so that the growth measured is the decoding's own
    probe = ("import sys\nimport cv2, imagecodecs, PIL.Image\nfrom malaria_cells.images import decode\n" + _PEAK +
             "data = open(sys.argv[1], 'rb').read()\n"
             "before = peak_kib()\n"
             "pixels = decode(data)\n"
             "assert pixels.shape == (4000, 5000, 3) and pixels[0, -1].tolist() == [255, 255, 255]\n"
             "print((peak_kib() - before) // 1024)")
    grown_mib = int(subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True,
                                   check=True, env=_this_package_env()).stdout)
    assert grown_mib < 160, grown_mib  # at most two 8-bit copies (57 MB each); the 16 bits held whole: about 380


# A child's own high-water mark: ru_maxrss would carry the parent's (the test process's) across exec.
_PEAK = ("def peak_kib():\n    for line in open('/proc/self/status'):\n"
         "        if line.startswith('VmHWM:'):\n            return int(line.split()[1])\n")


def _this_package_env():
    """The environment for a child Python that imports this very copy of the package."""
    import os
    from pathlib import Path

    import malaria_cells

    source = str(Path(malaria_cells.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
