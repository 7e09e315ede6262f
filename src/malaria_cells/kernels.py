"""Compiled loops (numba) for the pixel steps that dominate reading many cells.

Cell crops are nearly always 8-bit RGB PNGs. libpng (through imagecodecs) takes about
230 us for a 128 px NIH cell: 130 inflating with zlib, most of the rest undoing the
per-row filters. :func:`decode_png` inflates with libdeflate (also through imagecodecs,
about 50 us) and undoes the filters in a compiled loop (about 50 us), halving decoding,
the largest cost of ``predict`` on a folder. :func:`decode_png_into` goes further for
cells of the model's input size or twice it (the NIH cells, 128 -> 64 px): it writes
them straight into their row of the batch, halving two rows at a time as they are
decoded: ~117 us per NIH cell from file bytes to network input, and a 32-file task reads,
decodes and resizes in 143 us per cell against 230 before. :func:`halve` is the 2x2 block mean of
``data._halve`` for images decoded otherwise.

All give the same pixels as the code they stand in for (tested; on all 15,914 NIH
cells too), and they take only what they can decode exactly: anything else (other bit
depths and colour types, interlacing, a bad checksum, an unexpected chunk, a stream that
does not inflate to the image's size) returns None or False and goes to libpng, which
decodes it or says what is wrong.

Importing numba and loading the compiled loops costs about 0.5 s of CPU, so :mod:`.data`
uses this module only after :func:`.data.load_kernels`, which the readers of many images
and the server call. Without numba (a platform or NumPy it does not support yet) nothing
changes but the speed.
"""

from __future__ import annotations

import struct
import zlib

import numba
import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {2: 3, 6: 4}  # PNG colour types taken here: RGB and RGBA, 8 bits each
# Chunks that do not change the pixels libpng gives imagecodecs (checked in the tests); a
# chunk not listed (palette, transparency, APNG frames, ...) sends the file to libpng.
_IGNORED_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt", b"pHYs", b"tIME", b"gAMA", b"cHRM",
                             b"sRGB", b"iCCP", b"sBIT", b"bKGD"})


def decode_png(contents: bytes) -> np.ndarray | None:
    """Decode an 8-bit, non-interlaced RGB or RGBA PNG to ``(h, w, 3 or 4)`` uint8.

    Returns None for anything else, or for anything unusual about the file, so the
    caller can hand it to libpng. The caller checks the image size first
    (:func:`.data.decode_image` refuses decompression bombs from the header).
    """
    header = _header(contents)
    inflated = None if header is None else _inflate(contents, *header)
    if inflated is None:
        return None
    width, height, channels = header
    pixels = np.empty((height, width, channels), np.uint8)
    if not _unfilter(inflated, height, width * channels, channels, pixels.reshape(-1)):
        return None
    return pixels


def decode_png_into(contents: bytes, out: np.ndarray) -> bool:
    """Decode a PNG of ``out``'s size or twice it straight into ``out``, ``(s, s, 3)`` uint8.

    A PNG of twice the side is halved while it is decoded, with the rounding of
    :func:`halve` (the same pixels as decoding, then ``data.resize_images``), two rows at a
    time, so the full-size image is never written; alpha is dropped, as
    ``data.decode_image`` does. Returns False, with ``out`` unspecified, for whatever
    :func:`decode_png` would refuse and for other sizes.
    """
    header = _header(contents)
    if not header:
        return False
    width, height, channels = header
    side = out.shape[0]
    if width == height == side:
        pixels = decode_png(contents)
        if pixels is None:
            return False
        out[...] = pixels[..., :3]
        return True
    inflated = _inflate(contents, *header) if width == height == 2 * side else None
    return inflated is not None and _unfilter_halved(inflated, height, width * channels, channels, out)


def _header(contents: bytes) -> tuple[int, int, int] | None:
    """``(width, height, channels)`` of an image this module decodes, from its IHDR chunk."""
    if len(contents) < 33 or contents[:8] != _SIGNATURE or contents[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", contents, 16)
    channels = _CHANNELS.get(colour)
    if depth != 8 or channels is None or compression or filtering or interlace or not width or not height:
        return None
    return width, height, channels


def _inflate(contents: bytes, width: int, height: int, channels: int) -> np.ndarray | None:
    """The filtered rows (1 filter byte + ``width * channels`` bytes each) of a PNG whose
    chunks are all as expected, with good checksums; None otherwise."""
    compressed = []
    view = memoryview(contents)  # slices of it are not copies
    position, end, previous_kind = 8, len(contents), b""
    while True:
        if position + 12 > end:
            return None  # no IEND: truncated
        (length,) = struct.unpack_from(">I", contents, position)
        kind = contents[position + 4 : position + 8]
        stop = position + 8 + length
        if stop + 4 > end or zlib.crc32(view[position + 4 : stop]) != struct.unpack_from(">I", contents, stop)[0]:
            return None
        if kind == b"IDAT":
            if compressed and previous_kind != b"IDAT":
                return None  # image data split by another chunk: libpng says what it makes of it
            compressed.append(view[position + 8 : stop])
        elif kind == b"IEND":
            break
        elif (kind != b"IHDR" or position != 8) and kind not in _IGNORED_CHUNKS:
            return None
        position, previous_kind = stop + 4, kind
    size = height * (width * channels + 1)
    import imagecodecs

    try:  # a known output size makes imagecodecs use libdeflate rather than zlib
        raw = imagecodecs.deflate_decode(compressed[0] if len(compressed) == 1 else b"".join(compressed), out=size)
    except Exception:  # noqa: BLE001 - imagecodecs' error type varies between versions
        return None
    return np.frombuffer(raw, np.uint8) if len(raw) == size else None


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _unfilter_row(kind, row, previous, current, channels):  # pragma: no cover - compiled
    """Undo one row's filter (None, Sub, Up, Average, Paeth); False on a bad filter byte."""
    stride = len(current)
    if kind == 0:
        current[:] = row
    elif kind == 1:
        current[:channels] = row[:channels]
        for i in range(channels, stride):
            current[i] = row[i] + current[i - channels]
    elif kind == 2:
        for i in range(stride):
            current[i] = row[i] + previous[i]
    elif kind == 3:
        for i in range(channels):
            current[i] = row[i] + (previous[i] >> 1)
        for i in range(channels, stride):
            current[i] = row[i] + ((np.int32(current[i - channels]) + np.int32(previous[i])) >> 1)
    elif kind == 4:
        if channels == 3:
            _paeth_rgb(row, previous, current, stride // 3)
        else:
            _paeth(row, previous, current, channels, stride)
    else:
        return False
    return True


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _unfilter(raw, height, stride, channels, out):  # pragma: no cover - compiled
    """Undo PNG's per-row filters into ``out`` (flat); False on a bad filter byte."""
    previous = np.zeros(stride, np.uint8)  # the row above the first is all zeros
    for y in range(height):
        current = out[y * stride : (y + 1) * stride]
        if not _unfilter_row(raw[y * (stride + 1)], raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)],
                             previous, current, channels):
            return False
        previous = current
    return True


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _unfilter_halved(raw, height, stride, channels, out):  # pragma: no cover - compiled
    """:func:`_unfilter` two rows at a time, each pair halved into a row of ``out`` (h/2, w/2, 3)."""
    upper, lower = np.empty(stride, np.uint8), np.zeros(stride, np.uint8)  # zeros: the row above the first
    sums = np.empty(stride, np.int32)
    line = stride + 1
    for y in range(0, height, 2):
        if not (_unfilter_row(raw[y * line], raw[y * line + 1 : (y + 1) * line], lower, upper, channels)
                and _unfilter_row(raw[(y + 1) * line], raw[(y + 1) * line + 1 : (y + 2) * line], upper, lower,
                                  channels)):
            return False
        _halve_rows(upper, lower, channels, out[y // 2].reshape(-1), sums)
    return True


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _halve_rows(upper, lower, channels, target, sums):  # pragma: no cover - compiled
    for i in range(len(upper)):  # vectorized
        sums[i] = np.int32(upper[i]) + np.int32(lower[i])
    if channels == 3:
        for j in range(len(target) // 3):
            for c in range(3):
                total = sums[6 * j + c] + sums[6 * j + 3 + c]
                target[3 * j + c] = (total + 1 + ((total >> 2) & 1)) >> 2  # halves to even
    else:
        for j in range(len(target) // 3):
            for c in range(3):
                total = sums[2 * j * channels + c] + sums[(2 * j + 1) * channels + c]
                target[3 * j + c] = (total + 1 + ((total >> 2) & 1)) >> 2


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _predict(left, up, up_left):  # pragma: no cover - compiled
    # PNG's Paeth predictor (ties go to left, then up) in stb_image's form: a threshold and
    # two selects, no branch to mispredict on noisy pixels and a short chain from ``left``
    # to the result (the specification's if/elif decoded 40% slower).
    threshold = 3 * up_left - (left + up)
    low, high = min(left, up), max(left, up)
    closer = low if high <= threshold else up_left
    return high if threshold <= low else closer


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _paeth(row, previous, current, channels, stride):  # pragma: no cover - compiled
    for i in range(channels):
        current[i] = row[i] + previous[i]
    for i in range(channels, stride):
        predicted = _predict(np.int32(current[i - channels]), np.int32(previous[i]),
                             np.int32(previous[i - channels]))
        current[i] = (np.int32(row[i]) + predicted) & 255


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _paeth_rgb(row, previous, current, width):  # pragma: no cover - compiled
    # The left and upper-left pixels stay in registers, three independent chains side by
    # side: 1.6x the speed of the general loop, and most rows of most PNGs are Paeth rows.
    r, g, b = np.int32(0), np.int32(0), np.int32(0)
    up_r, up_g, up_b = np.int32(0), np.int32(0), np.int32(0)
    for x in range(width):
        i = 3 * x
        above_r, above_g, above_b = np.int32(previous[i]), np.int32(previous[i + 1]), np.int32(previous[i + 2])
        r = (np.int32(row[i]) + _predict(r, above_r, up_r)) & 255
        g = (np.int32(row[i + 1]) + _predict(g, above_g, up_g)) & 255
        b = (np.int32(row[i + 2]) + _predict(b, above_b, up_b)) & 255
        current[i], current[i + 1], current[i + 2] = r, g, b
        up_r, up_g, up_b = above_r, above_g, above_b


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _halve_into(images, out):  # pragma: no cover - compiled
    count, height, width, channels = images.shape
    for k in range(count):
        for y in range(height // 2):
            top, bottom, target = images[k, 2 * y], images[k, 2 * y + 1], out[k, y]
            for x in range(width // 2):
                for c in range(channels):
                    total = (np.uint16(top[2 * x, c]) + top[2 * x + 1, c]
                             + bottom[2 * x, c] + bottom[2 * x + 1, c])
                    target[x, c] = (total + 1 + ((total >> 2) & 1)) >> 2  # halves to even
    return out


def warm_up() -> None:
    """Compile (or load from numba's cache) every loop, so the first cells do not wait."""
    import imagecodecs

    if decode_png(imagecodecs.png_encode(np.zeros((2, 2, 3), np.uint8))) is None or not decode_png_into(
            imagecodecs.png_encode(np.zeros((4, 4, 3), np.uint8)), np.empty((2, 2, 3), np.uint8)):
        raise RuntimeError("the compiled PNG decoder refused a plain PNG")
    halve(np.zeros((1, 2, 2, 3), np.uint8))


def halve(images: np.ndarray) -> np.ndarray:
    """``(n, 2h, 2w, c)`` uint8 -> ``(n, h, w, c)``: rounded 2x2 block means, as ``data._halve``."""
    count, height, width, channels = images.shape
    return _halve_into(np.ascontiguousarray(images), np.empty((count, height // 2, width // 2, channels), np.uint8))
