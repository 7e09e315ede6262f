"""Decoding and resizing images: the one image path of the package.

Training, evaluation, prediction, serving, export and field screening all read pixels
through :func:`decode` and scale them with :func:`resize`, so they can never drift apart.
Colour conversion and scaling to 0-1 are layers inside every model, so a model file alone
predicts correctly anywhere: inputs are RGB pixels 0-255.

One decoder per format, told from the bytes (never the file name):

- PNG: libspng (through imagecodecs) for grey, RGB, palette and RGBA at 8 bits or fewer;
  it is the fastest decoder measured and checks every chunk's CRC. The other layouts (16 bits,
  grey with alpha) go to libpng through OpenCV, which strips the alpha and the low byte row by
  row (libspng's binding would hold a 16-bit RGBA image whole: 8 bytes a pixel, 320 MB at
  40 MP, before it became 8-bit RGB). Chosen from the header, never by retrying: each file has exactly one decoder.
  An APNG gives its default image, the first frame. (Not imagecodecs' libpng binding: it
  drops a reference to ``None`` per refused stream, which aborts Python 3.11.)
- JPEG, BMP, GIF, TIFF, WebP: Pillow, which checks each header against the file and raises
  on lies; only the first frame or page of a multi-frame file is decoded.

Every image's size is read from its header and refused above ``max_pixels`` before any
pixel is decoded.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from functools import lru_cache

import numpy as np

from .config import MAX_IMAGE_PIXELS, MAX_PIXELS_IN_FLIGHT
from .errors import MalariaCellsError

__all__ = ["UnreadableImage", "NOT_AN_IMAGE", "image_format", "dimensions", "decode", "read_file", "resize",
           "preprocess", "exif_orientation", "pixels_in_flight", "MAX_JPEG_SCANS", "MAX_JPEG_METADATA_SEGMENTS"]

NOT_AN_IMAGE = "not an image (PNG, JPEG, BMP, GIF, WebP or TIFF expected)"
_FORMATS = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "bmp": "BMP", "webp": "WebP", "tiff": "TIFF"}


class UnreadableImage(MalariaCellsError, ValueError):
    """Bytes that are not an image this package can read; the message says why."""


def image_format(contents: bytes) -> str:
    """The format of encoded image bytes (``"png"``, ``"jpeg"``, ...), from their first bytes."""
    head = bytes(contents[:12])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    raise UnreadableImage(NOT_AN_IMAGE)


def dimensions(contents: bytes) -> tuple[int, int]:
    """``(width, height)`` from the header alone, to refuse decompression bombs before decoding.

    Raises
    ------
    UnreadableImage
        Not an image, or a header that cannot be read.
    """
    kind = image_format(contents)
    if kind == "png":
        return _png_dimensions(contents)
    if kind == "jpeg":
        _check_jpeg_structure(contents)
    with _opened(contents, kind) as image:
        return image.size


def _check_png_chunks(contents: bytes) -> None:
    """Refuse a chunk that claims more bytes than the file holds: libpng would otherwise read
    towards a length of up to 4 GiB through OpenCV's stream, for many seconds per file.
    Checked for every PNG, so both decoders see only streams whose chunks fit the file."""
    position, end = 8, len(contents)
    while position + 8 <= end:
        length, kind = struct.unpack(">I4s", contents[position:position + 8])
        if position + 12 + length > end:
            raise UnreadableImage(f"corrupt or truncated PNG ({kind!r} chunk claims {length} bytes)")
        if kind == b"IEND":
            return
        position += 12 + length


MAX_JPEG_SCANS = 100
"""Most scans a JPEG may hold: a camera's or encoder's progressive JPEG has about 10 (mozjpeg's
up to about 20); each scan makes the decoder pass over every coefficient again, so thousands
of empty scans cost minutes for a file of a few hundred kilobytes."""
MAX_JPEG_METADATA_SEGMENTS = 64
"""Most metadata segments (APPn and comments) a JPEG may hold before its image: EXIF, XMP and
its extensions, an ICC profile in chunks and a phone's multi-picture index use a handful.
(Each segment holds at most 64 KB, so this also bounds their bytes, at 4 MB.)"""


def _check_jpeg_structure(contents: bytes) -> None:
    """Refuse a JPEG whose structure costs far more to decode than its size suggests: too many
    metadata segments (Pillow joins them in quadratic time) or too many scans. Markers are
    walked from the start to the first scan; scans are counted from there to the end of the
    image (inside entropy-coded data a 0xFF byte is always followed by 0x00 or a restart
    marker, so every 0xFFDA pair is a scan header; whatever a phone appends after the end of
    the image, a motion photo's video or a second picture, is not looked at). Both run at
    memory speed."""
    position, end, segments = 2, len(contents), 0
    while position + 4 <= end:
        if contents[position] != 0xFF:  # stray bytes: the decoder judges them
            break
        marker = contents[position + 1]
        if marker == 0xFF:  # fill bytes before a marker
            position += 1
            continue
        if marker == 0xDA or marker == 0xD9:  # start of scan / end of image
            break
        length = int.from_bytes(contents[position + 2:position + 4], "big")
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            segments += 1
            if segments > MAX_JPEG_METADATA_SEGMENTS:
                raise UnreadableImage(f"JPEG with too much metadata (over {MAX_JPEG_METADATA_SEGMENTS} segments "
                                      "before the image)")
        position += 2 + length
    first_scan = contents.find(b"\xff\xda", position)
    if first_scan < 0:
        return
    end_of_image = contents.find(b"\xff\xd9", first_scan)
    scans = contents.count(b"\xff\xda", first_scan, end_of_image if end_of_image >= 0 else end)
    if scans > MAX_JPEG_SCANS:
        raise UnreadableImage(f"JPEG with {scans} scans (at most {MAX_JPEG_SCANS}; a photograph has about 10)")


def _png_dimensions(contents: bytes) -> tuple[int, int]:
    if len(contents) < 24 or contents[12:16] != b"IHDR":  # the header chunk always comes first
        raise UnreadableImage("corrupt PNG (no image header)")
    width, height = struct.unpack(">II", contents[16:24])
    if width == 0 or height == 0:
        raise UnreadableImage(f"corrupt PNG (header says {width}x{height} pixels)")
    return width, height


class _opened:
    """Pillow's lazy open of ``contents`` (reads the header only), with its failures as UnreadableImage."""

    def __init__(self, contents: bytes, kind: str):
        from PIL import Image

        self._kind = _FORMATS[kind]
        try:
            with warnings.catch_warnings():
                # Our own limit applies (callers compare the size with max_pixels); Pillow's
                # warnings about damaged metadata would only repeat what a refusal says.
                warnings.simplefilter("ignore")
                self.image = Image.open(io.BytesIO(contents))
                self.image.size  # noqa: B018 - the header is parsed by open
        except Image.DecompressionBombError:
            raise UnreadableImage("image too large (decompression bomb?)") from None
        except Exception:  # noqa: BLE001 - Pillow fails on bad headers in many ways
            raise UnreadableImage(f"corrupt {self._kind} (unreadable header)") from None

    def __enter__(self):
        return self.image

    def __exit__(self, *exc):
        self.image.close()


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise UnreadableImage(f"corrupt image (header says {width}x{height} pixels)")
    if width * height > max_pixels:
        raise UnreadableImage(f"image too large ({width}x{height} pixels, limit {max_pixels:,}; "
                              "decompression bomb?)")


def decode(contents: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS, reduce: int = 1) -> np.ndarray:
    """Decode encoded image bytes to uint8 RGB ``(height, width, 3)`` in the stored pixel grid.

    Any bit depth and colour mode (gray, palette, RGBA, 16-bit) becomes 8-bit RGB; alpha is
    dropped; a multi-frame or multi-page file gives its first frame. EXIF orientation is not
    applied (see :func:`exif_orientation`). The decoders release the GIL, so threads decode
    in parallel.

    Parameters
    ----------
    contents : bytes
        The encoded file.
    max_pixels : int
        Images whose header declares more pixels are refused before decoding.
    reduce : int
        Decode at 1/``reduce`` of each side (rounded up). JPEGs are scaled inside the
        decoder (DCT scaling, several times faster than decoding at full size); other formats
        are decoded, then shrunk by :func:`resize`.

    Raises
    ------
    UnreadableImage
        Not an image, corrupt, truncated, or larger than ``max_pixels``.
    """
    kind = image_format(contents)
    if kind == "png":
        width, height = _png_dimensions(contents)
        _check_size(width, height, max_pixels)
        _check_png_chunks(contents)
        pixels = _decode_png(contents)
        if pixels.shape[:2] != (height, width):
            raise UnreadableImage("corrupt PNG (pixels do not match the header)")
    else:
        if kind == "jpeg":
            _check_jpeg_structure(contents)
        pixels, (width, height) = _decode_with_pillow(contents, kind, max_pixels, reduce)
    if reduce > 1:
        target = (-(-width // reduce), -(-height // reduce))
        if pixels.shape[1::-1] != target:
            pixels = resize(pixels, target)
    return pixels


# (bit depth, colour type) pairs decoded by libspng's imagecodecs binding: 8-bit and lower grey,
# RGB, palette and RGBA (it also decodes 16-bit RGBA, but only whole, at 8 bytes a pixel)
_SPNG_LAYOUTS = {(depth, 0) for depth in (1, 2, 4, 8)} | {(depth, 3) for depth in (1, 2, 4, 8)} | {
    (8, 2), (8, 6)}


def _decode_png(contents: bytes) -> np.ndarray:
    """PNG pixels as 8-bit RGB: libspng for the layouts it decodes, OpenCV's libpng for the rest."""
    layout = (contents[24], contents[25])
    if layout in _SPNG_LAYOUTS:
        import imagecodecs

        try:
            pixels = imagecodecs.spng_decode(contents)
        except Exception:  # noqa: BLE001 - imagecodecs raises its own error types
            raise UnreadableImage("corrupt or truncated PNG") from None
        return _as_rgb8(pixels)
    # 16-bit grey, RGB and RGBA, grey with alpha: alpha dropped, grey repeated, 16 bits to 8
    cv2 = _cv2()
    pixels = cv2.imdecode(np.frombuffer(contents, np.uint8), cv2.IMREAD_COLOR_RGB)
    if pixels is None:
        raise UnreadableImage("corrupt or truncated PNG")
    return pixels


def _decode_with_pillow(contents: bytes, kind: str, max_pixels: int, reduce: int):
    with warnings.catch_warnings(), _opened(contents, kind) as image:
        warnings.simplefilter("ignore")  # damaged metadata: a refusal, if any, says enough
        size = image.size
        _check_size(*size, max_pixels)
        try:
            if kind == "jpeg" and reduce > 1:
                image.draft("RGB", (-(-image.size[0] // reduce), -(-image.size[1] // reduce)))
            image.seek(0)  # the first frame or page only
            image.load()
            if image.mode not in ("RGB", "L"):
                image = image.convert("RGBA" if "A" in image.getbands() or image.mode == "P" else "RGB")
            pixels = np.asarray(image)
        except UnreadableImage:
            raise
        except Exception:  # noqa: BLE001 - Pillow fails on corrupt data in many ways
            raise UnreadableImage(f"corrupt or truncated {_FORMATS[kind]}") from None
    return _as_rgb8(pixels), size


def _as_rgb8(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 4:  # frames or pages
        pixels = pixels[0]
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.size == 0 or pixels.shape[2] > 4:
        raise UnreadableImage(f"unsupported image layout {pixels.shape}")
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    elif pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    elif pixels.dtype != np.uint8:
        raise UnreadableImage(f"unsupported pixel type {pixels.dtype}")
    if pixels.shape[2] < 3:
        pixels = np.repeat(pixels[..., :1], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])


def exif_orientation(contents: bytes) -> int:
    """The EXIF orientation tag of a JPEG or TIFF (1 = as stored; 6 and 8 = turned a quarter)."""
    try:
        kind = image_format(contents)
        if kind not in ("jpeg", "tiff", "webp"):
            return 1
        with _opened(contents, kind) as image:
            return int(image.getexif().get(0x0112, 1)) or 1
    except (UnreadableImage, ValueError, TypeError):
        return 1


HEADER_BYTES = 2**20
"""How much of a file is read first, to check its header before the rest is read."""
MAX_FILE_BYTES = 512 * 2**20
"""Largest image file read when its header gives no size within its first :data:`HEADER_BYTES`."""


def read_file(path: str | os.PathLike, *, max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    """The bytes of an image file, or UnreadableImage with the reason.

    The first :data:`HEADER_BYTES` are read and checked first: a file that is not an image, or
    whose header declares more than ``max_pixels`` pixels, or that is larger than an image of
    its declared size could be (uncompressed 16-bit RGBA, plus metadata), is refused before
    the rest is read.
    """
    try:
        with open(path, "rb", buffering=0) as handle:  # unbuffered: reads straight into the result
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(HEADER_BYTES)
            if not head:
                raise UnreadableImage("empty file")
            kind = image_format(head)
            limit = MAX_FILE_BYTES
            if len(head) < size and kind != "tiff":  # a TIFF may hold many pages
                try:
                    width, height = dimensions(head)
                except UnreadableImage:
                    pass  # the header runs past the first bytes: the size cap alone applies
                else:
                    _check_size(width, height, max_pixels)
                    limit = 8 * width * height + 16 * 2**20
            if size > limit:
                raise UnreadableImage(f"file too large ({size / 2**20:,.0f} MB; at most {limit / 2**20:,.0f} MB "
                                      "for an image of its size)")
            contents = head if len(head) >= size else head + handle.read(limit - len(head) + 1)
            if len(contents) > limit:  # it grew while being read
                raise UnreadableImage(f"file too large (over {limit / 2**20:,.0f} MB)")
    except OSError as error:
        raise UnreadableImage(error.strerror or "cannot be read") from None
    return contents


@lru_cache(maxsize=1)
def _cv2():
    import cv2

    # Callers already run one image per thread on every core; OpenCV's own threads on top
    # of that only add hand-over time for images this small.
    cv2.setNumThreads(1)
    return cv2


def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a uint8 RGB image to ``size`` x ``size`` (or ``(width, height)``).

    OpenCV's area interpolation: each output pixel is the mean of the input pixels it covers
    (an exact 2x2 block mean at half size), so shrinking never aliases fine detail such as a
    ring stage; enlarging is bilinear.
    """
    width, height = (size, size) if np.isscalar(size) else size
    cv2 = _cv2()
    if image.shape[:2] == (height, width):
        return np.ascontiguousarray(image)
    return cv2.resize(np.ascontiguousarray(image), (int(width), int(height)), interpolation=cv2.INTER_AREA)


class _PixelBudget:
    """Decoded pixels in flight across the process, with a wait for room (a counting semaphore
    weighted by image size)."""

    def __init__(self, limit: int):
        import threading

        self.limit, self.used = limit, 0
        self._room = threading.Condition()

    def acquire(self, pixels: int, timeout: float | None = None) -> int:
        pixels = min(max(1, int(pixels)), self.limit)  # one image alone always fits
        with self._room:
            if not self._room.wait_for(lambda: self.used + pixels <= self.limit, timeout):
                raise TimeoutError(f"no room for {pixels:,} decoded pixels within {timeout:.1f} s")
            self.used += pixels
        return pixels

    def release(self, pixels: int) -> None:
        with self._room:
            self.used -= pixels
            self._room.notify_all()


_budget = _PixelBudget(MAX_PIXELS_IN_FLIGHT)


class pixels_in_flight:
    """Hold room for ``pixels`` decoded pixels while the block runs (waits until there is room,
    or raises TimeoutError after ``timeout`` seconds).

    Everything that decodes (cell batches, uploads, fields) decodes inside one, so the process
    never holds more than :data:`malaria_cells.config.MAX_PIXELS_IN_FLIGHT` decoded pixels.
    """

    def __init__(self, pixels: int, timeout: float | None = None):
        self.pixels, self.timeout = pixels, timeout

    def __enter__(self):
        self.held = _budget.acquire(self.pixels, self.timeout)
        return self

    def __exit__(self, *exc):
        _budget.release(self.held)


def preprocess(contents: bytes, image_size: int, *, max_pixels: int = MAX_IMAGE_PIXELS,
               check=None) -> np.ndarray:
    """Encoded image bytes -> the model input: uint8 RGB ``(image_size, image_size, 3)``.

    The full-size decoded image exists only inside this call, within the process's budget of
    decoded pixels (:class:`pixels_in_flight`). ``check``, if given, is called with the
    decoded image; a reason it returns refuses the image (as
    :func:`malaria_cells.crop_check.check_cell_crop` refuses what is not a cell crop).

    Raises
    ------
    UnreadableImage
        When the bytes are not a readable image (or ``check`` refuses it), with the reason.
    """
    width, height = dimensions(contents)
    _check_size(width, height, max_pixels)
    with pixels_in_flight(width * height):
        image = decode(contents, max_pixels=max_pixels)
        reason = check(image) if check is not None else None
        if reason:
            raise UnreadableImage(reason)
        return resize(image, image_size)
