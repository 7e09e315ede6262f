"""Compiled loops (C, ``_pngloops.c``) for the pixel steps that dominate reading many cells.

Cell crops are nearly always 8-bit RGB PNGs. libpng (through imagecodecs) takes about
230 us for a 128 px NIH cell: 130 inflating with zlib, most of the rest undoing the
per-row filters. Here they are inflated with libdeflate (about 50 us) and unfiltered in
loops written for PNG's Paeth filter (SSE4.1 where the CPU has it).

- :func:`read_cells` and :func:`decode_cells` take a task's cells of the model's input size
  or twice it (the NIH cells, 128 -> 64 px) from file or bytes to their rows of the batch in
  one C call without the GIL, halving them two rows at a time as they are decoded: ~100 us
  per NIH cell from file to network input. They call libdeflate directly, the copy that
  imagecodecs ships (:func:`_find_libdeflate`).
- :func:`decode_png` (any size) and :func:`decode_png_into` (the same cells, where
  libdeflate's functions were not found) inflate through imagecodecs and unfilter in C.
- :func:`halve` is the 2x2 block mean of ``data._halve`` for images decoded otherwise.

All give the same pixels as the code they stand in for (tested; on all 15,914 NIH
cells too), and they take only what they can decode exactly: anything else (other bit
depths and colour types, interlacing, a bad checksum, an unexpected chunk, a stream that
does not inflate to the image's size) is refused and goes to libpng, which decodes it or
says what is wrong.

The loops are a C extension built when the package is installed; where it could not be
built (no C compiler), importing this module fails and :mod:`.data` decodes with libpng:
nothing changes but the speed. They load in well under a millisecond.
"""

from __future__ import annotations

import struct
import zlib

import imagecodecs
import numpy as np

from . import _pngloops  # ImportError where it was not built: data.py then decodes with libpng

# libdeflate's CRC-32 (carry-less multiplication): ~2x zlib's on a 13 KB cell.
_crc32 = getattr(imagecodecs, "deflate_crc32", zlib.crc32)
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
    if not _pngloops.unfilter(inflated, height, width * channels, channels, pixels):
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
    return inflated is not None and _pngloops.unfilter_halved(inflated, height, width * channels, channels, out)


def read_cells(paths: list[str], out: np.ndarray) -> list[int] | None:
    """Read and decode files straight into ``out`` (n, s, s, 3) uint8, as
    :func:`decode_png_into` does, all in C without the GIL (see :func:`_find_libdeflate`).

    Returns, per path, 0 (decoded into its row), -1 (not done here: any other image, or
    anything unusual; read and decode it otherwise, which also says what is wrong), or the
    errno of a failed read; None where this path is not available (libdeflate not found,
    Windows).
    """
    if not _libdeflate_ready() or not hasattr(_pngloops, "read_cells"):
        return None
    return _pngloops.read_cells(paths if isinstance(paths, list) else list(paths), out.shape[1], out)


def decode_cells(contents: list[bytes], out: np.ndarray) -> list[int] | None:
    """:func:`read_cells` for images held in memory: per item 0 (decoded) or -1 (not done here)."""
    if not _libdeflate_ready():
        return None
    return _pngloops.decode_cells(contents if isinstance(contents, list) else list(contents), out.shape[1], out)


_libdeflate = None  # the ctypes handle, kept so that the library stays loaded


def _libdeflate_ready() -> bool:
    global _libdeflate
    if _libdeflate is None:
        _libdeflate = _find_libdeflate() or False
    return bool(_libdeflate)


def _find_libdeflate():
    """libdeflate as imagecodecs loaded it, handed to the C loops; None where it is not found.

    imagecodecs inflates with libdeflate but offers no C interface, so ctypes opens the same
    shared library (on Linux found in the process's memory map, elsewhere beside imagecodecs
    or on the system) and the loops call it directly.
    """
    import ctypes
    import glob
    import os

    from imagecodecs import _deflate  # loads the library

    candidates = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            candidates += [line.split(None, 5)[-1].strip() for line in maps if "libdeflate" in line]
    except OSError:
        pass
    package = os.path.dirname(_deflate.__file__)
    for folder in (package, os.path.join(package, ".dylibs"), package + ".libs"):
        candidates += sorted(glob.glob(os.path.join(folder, "*deflate*.*[sd][oyl]*")))
    for candidate in [*dict.fromkeys(candidates), _system_libdeflate]:
        path = candidate() if callable(candidate) else candidate
        try:
            library = ctypes.CDLL(path) if path else None
            addresses = [ctypes.cast(getattr(library, name), ctypes.c_void_p).value for name in (
                "libdeflate_alloc_decompressor", "libdeflate_free_decompressor", "libdeflate_zlib_decompress",
                "libdeflate_crc32")] if library else None
        except (OSError, AttributeError):  # not a library, or not libdeflate
            continue
        if addresses:
            _pngloops.set_libdeflate(*addresses, b"".join(sorted(_IGNORED_CHUNKS)))
            return library
    return None


def _system_libdeflate() -> str | None:
    import ctypes.util  # imports subprocess: only when nothing else was found

    return ctypes.util.find_library("deflate")


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
        if stop + 4 > end or _crc32(view[position + 4 : stop]) != struct.unpack_from(">I", contents, stop)[0]:
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
    try:  # a known output size makes imagecodecs use libdeflate rather than zlib
        raw = imagecodecs.deflate_decode(compressed[0] if len(compressed) == 1 else b"".join(compressed), out=size)
    except Exception:  # noqa: BLE001 - imagecodecs' error type varies between versions
        return None
    return np.frombuffer(raw, np.uint8) if len(raw) == size else None


def halve(images: np.ndarray) -> np.ndarray:
    """``(n, 2h, 2w, c)`` uint8 -> ``(n, h, w, c)``: rounded 2x2 block means, as ``data._halve``."""
    count, height, width, channels = images.shape
    out = np.empty((count, height // 2, width // 2, channels), np.uint8)
    _pngloops.halve(np.ascontiguousarray(images), count, height, width, channels, out)
    return out
