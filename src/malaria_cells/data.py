"""Finding, reading, splitting and preprocessing cell images.

Everything that turns files into model input lives here, so that training, evaluation,
prediction, serving and export share one decoder (:func:`decode_image`) and one
preprocessing function (:func:`preprocess_image`) and can never drift apart.
"""

from __future__ import annotations

import io
import os
import re
import struct
import sys
import warnings
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import MalariaCellsError

CLASS_NAMES = ("Uninfected", "Parasitized")
"""Class names in label order: label 0 is Uninfected, label 1 is Parasitized."""

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
MAX_IMAGE_PIXELS = 40_000_000
"""Larger images are refused as probable decompression bombs (a cell crop is ~0.1 MP)."""

EXPECTED_LAYOUT = (
    "expected a folder holding one sub-folder per class, e.g. "
    "cell_images/Parasitized/*.png and cell_images/Uninfected/*.png"
)

_PATIENT_ID = re.compile(r"^(C\d+)(?=[A-Za-z_])")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")


def patient_id(path: str | os.PathLike) -> str | None:
    """Return the NIH patient id (the ``C<digits>`` file-name prefix), or None.

    >>> patient_id("Parasitized/C100P61ThinF_IMG_20150918_144104_cell_162.png")
    'C100'
    """
    match = _PATIENT_ID.match(Path(path).name)
    return match.group(1) if match else None


# --------------------------------------------------------------------------- layout


@dataclass
class CellImageFiles:
    """The labelled image files of a dataset folder.

    Attributes
    ----------
    root : Path
        The folder that holds the class sub-folders.
    paths : list of str
        Image files, sorted, Uninfected first.
    labels : numpy.ndarray of int
        1 for Parasitized, 0 for Uninfected.
    ignored : list of (str, str)
        Files skipped while listing (not an image, empty), with the reason.
    """

    root: Path
    paths: list[str]
    labels: np.ndarray
    ignored: list[tuple[str, str]] = field(default_factory=list)

    @cached_property
    def groups(self) -> list[str]:
        """Patient id of each file; a file without one is its own group."""
        return [patient_id(p) or f"file:{p}" for p in self.paths]

    def subset(self, index: Sequence[int] | np.ndarray) -> "CellImageFiles":
        index = np.asarray(index, dtype=int)
        return CellImageFiles(
            self.root, [self.paths[i] for i in index], self.labels[index], []
        )

    def class_counts(self) -> dict[str, int]:
        return {
            name: int(np.sum(self.labels == label))
            for label, name in enumerate(CLASS_NAMES)
        }


def _class_folders(folder: Path) -> dict[str, Path] | None:
    """Map class name -> sub-folder when ``folder`` holds both (any case)."""
    if not folder.is_dir():
        return None
    found = {}
    for child in folder.iterdir():
        for name in CLASS_NAMES:
            if child.is_dir() and child.name.lower() == name.lower():
                found[name] = child
    return found if len(found) == len(CLASS_NAMES) else None


def find_dataset_root(path: str | os.PathLike) -> Path:
    """Return the folder under ``path`` that holds the ``Parasitized`` and ``Uninfected`` folders.

    Accepts the folder itself or one nested a level or two deeper (the Kaggle archive
    unpacks to ``cell_images/cell_images/``; when both levels hold the classes, the
    outer one is used and the duplicate is never read twice).

    Raises
    ------
    MalariaCellsError
        When no such folder exists, with the expected layout.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MalariaCellsError(f"{path}: no such folder ({EXPECTED_LAYOUT})")
    if not path.is_dir():
        raise MalariaCellsError(f"{path}: not a folder ({EXPECTED_LAYOUT})")
    candidates = [path]
    for _ in range(2):
        for folder in candidates:
            if _class_folders(folder):
                return folder
        candidates = [c for f in candidates for c in sorted(f.iterdir()) if c.is_dir()]
    raise MalariaCellsError(
        f"{path}: no Parasitized/ and Uninfected/ folders found ({EXPECTED_LAYOUT})"
    )


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith("._")


def list_image_files(
    inputs: Iterable[str | os.PathLike],
) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand files and folders (recursively) into image files.

    Returns
    -------
    files : list of str
        Image files in a stable order (folders sorted, given files in the given order).
    ignored : list of (str, str)
        Paths that cannot be images, with the reason: missing paths, empty files, and
        files in folders whose name is not an image type (``Thumbs.db``, ``.DS_Store``).
    """
    files: list[str] = []
    ignored: list[tuple[str, str]] = []
    for item in inputs:
        item = Path(item).expanduser()
        if item.is_dir():
            # Plain strings, not Path objects: listing 100,000 files is then ~3x faster.
            for dirpath, dirnames, filenames in os.walk(item):
                dirnames.sort()
                for name in sorted(filenames):
                    _add_file(os.path.join(dirpath, name), name, files, ignored, from_folder=True)
        elif item.exists():
            _add_file(str(item), item.name, files, ignored, from_folder=False)
        else:
            ignored.append((str(item), "no such file or folder"))
    return files, ignored


def _add_file(path: str, name: str, files: list, ignored: list, from_folder: bool) -> None:
    if from_folder and not _is_image_name(name):
        ignored.append((path, "not an image file"))
    elif os.stat(path).st_size == 0:
        ignored.append((path, "empty file"))
    else:
        files.append(path)


def list_cell_images(path: str | os.PathLike) -> CellImageFiles:
    """List the labelled images of a dataset folder (see :func:`find_dataset_root`).

    Raises
    ------
    MalariaCellsError
        When the layout is wrong or a class folder holds no images.
    """
    root = find_dataset_root(path)
    folders = _class_folders(root)
    paths: list[str] = []
    labels: list[int] = []
    ignored: list[tuple[str, str]] = []
    for label, name in enumerate(CLASS_NAMES):
        files, skipped = list_image_files([folders[name]])
        if not files:
            raise MalariaCellsError(
                f"{folders[name]}: no images in the {name} folder ({EXPECTED_LAYOUT})"
            )
        paths += files
        labels += [label] * len(files)
        ignored += skipped
    return CellImageFiles(root, paths, np.array(labels, dtype=np.int64), ignored)


def warn_skipped(skipped: Sequence[tuple[str, str]], what: str = "files") -> None:
    """Report skipped files in one warning that counts them and names the first few."""
    if not skipped:
        return
    shown = "; ".join(f"{p} ({why})" for p, why in skipped[:3])
    more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    warnings.warn(f"skipped {len(skipped)} {what}: {shown}{more}", stacklevel=2)


# --------------------------------------------------------------------------- splits


@dataclass
class Split:
    """Indices into a :class:`CellImageFiles` for each part of a split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def patients(self, files: CellImageFiles) -> dict[str, list[str]]:
        groups = files.groups
        return {
            part: sorted({groups[i] for i in getattr(self, part)})
            for part in ("train", "val", "test")
        }


def split_dataset(
    files: CellImageFiles,
    *,
    method: str = "patient",
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    folds: int = 0,
    fold: int = 0,
) -> Split:
    """Split a dataset into train, validation and test parts.

    Parameters
    ----------
    method : {"patient", "random"}
        ``"patient"`` puts all cells of a patient in one part, drawing healthy and
        infected patients separately so that every part holds both kinds of patient
        and both classes. ``"random"`` splits cells one by one, stratified by class,
        as the tutorial does (patients leak between parts and scores are flattered).
    val_fraction : float
        Share of what remains after the test part that goes to validation.
    test_fraction : float
        Share of patients (or cells, for ``"random"``) held out for testing; 0 keeps
        no test part.
    seed : int
        The same seed and files always give the same split.
    folds, fold : int
        Cross-validation: with ``folds`` = K > 1, the test part is fold ``fold``
        (0 to K-1) of K disjoint parts (``test_fraction`` is then ignored), so that K
        runs with the same seed test every patient (or cell) exactly once.
    """
    if method not in ("patient", "random"):
        raise MalariaCellsError(f"unknown split {method!r}: use 'patient' or 'random'")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise MalariaCellsError(f"{name} must be in [0, 1), got {value}")
    if folds == 1 or folds < 0 or (folds and not 0 <= fold < folds):
        raise MalariaCellsError(f"fold must be 0 to folds-1 with folds >= 2 (or folds 0: no cross-validation), "
                                f"got fold {fold} of {folds}")
    if method == "random":
        return _random_split(files.labels, val_fraction, test_fraction, seed, folds, fold)
    return _patient_split(files, val_fraction, test_fraction, seed, folds, fold)


def _random_split(labels, val_fraction, test_fraction, seed, folds=0, fold=0) -> Split:
    from sklearn.model_selection import StratifiedKFold, train_test_split

    index = np.arange(len(labels))
    test = np.array([], dtype=int)
    if folds:
        index, test = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(index, labels))[fold]
    elif test_fraction:
        index, test = train_test_split(
            index, test_size=test_fraction, stratify=labels, random_state=seed
        )
    train, val = train_test_split(
        index, test_size=val_fraction, stratify=labels[index], random_state=seed + 1
    )
    return Split(np.sort(train), np.sort(val), np.sort(test))


def _patient_split(files: CellImageFiles, val_fraction, test_fraction, seed, folds=0, fold=0) -> Split:
    groups = np.array(files.groups)
    infected = {g for g, y in zip(groups, files.labels) if y == 1}
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for stratum in (sorted(set(groups) - infected), sorted(infected)):
        stratum = list(rng.permutation(stratum))
        if folds:
            chunks = [[str(g) for g in chunk] for chunk in np.array_split(stratum, folds)]
            # The folds after the test fold come next, so validation patients rotate with
            # the fold: each fold's threshold and epoch are chosen on different patients.
            stratum = [g for chunk in chunks[fold:] + chunks[:fold] for g in chunk]
            n_test = len(chunks[fold])
        else:
            n_test = _share(len(stratum), test_fraction)
        n_val = _share(len(stratum) - n_test, val_fraction)
        parts["test"] += stratum[:n_test]
        parts["val"] += stratum[n_test : n_test + n_val]
        parts["train"] += stratum[n_test + n_val :]
    index = {
        part: np.flatnonzero(np.isin(groups, members)) for part, members in parts.items()
    }
    for part, members in index.items():
        wanted = part != "test" or test_fraction > 0 or folds > 0
        if wanted and (len(members) == 0 or len(set(files.labels[members])) < 2):
            raise MalariaCellsError(
                f"too few patients to give the {part} split both classes "
                f"({len(set(groups))} patients): add data or use --split random"
            )
    return Split(index["train"], index["val"], index["test"])


def _share(n: int, fraction: float) -> int:
    """Round n * fraction, keeping at least one member when the fraction is not 0."""
    if fraction == 0 or n == 0:
        return 0
    return int(min(n - 1, max(1, round(n * fraction)))) if n > 1 else 0


# --------------------------------------------------------------------------- pixels


class UnreadableImage(MalariaCellsError, ValueError):
    """Bytes that are not an image this package can read; the message says why."""


_CODECS = {"png": "PNG", "jpeg8": "JPEG", "gif": "GIF", "bmp": "BMP", "webp": "WebP", "tiff": "TIFF"}
NOT_AN_IMAGE = "not an image (PNG, JPEG, BMP, GIF, WebP or TIFF expected)"


def _codec(contents: bytes) -> str:
    """The imagecodecs codec for these bytes, told from their first bytes (never the file name)."""
    head = bytes(contents[:12])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg8"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    raise UnreadableImage(NOT_AN_IMAGE)


def image_dimensions(contents: bytes) -> tuple[int, int]:
    """``(width, height)`` from the header alone, to refuse decompression bombs before decoding."""
    return _dimensions(contents, _codec(contents))


def _dimensions(contents: bytes, codec: str) -> tuple[int, int]:
    if codec == "png":  # the IHDR chunk always comes first
        if len(contents) < 24 or contents[12:16] != b"IHDR":
            raise UnreadableImage("corrupt PNG (no image header)")
        return struct.unpack(">II", contents[16:24])
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(contents)) as image:
                return image.size
    except Image.DecompressionBombError:
        raise UnreadableImage("image too large (decompression bomb?)") from None
    except Exception:  # noqa: BLE001 - Pillow fails on bad headers in many ways
        raise UnreadableImage(f"corrupt {_CODECS[codec]} (unreadable header)") from None


def decode_image(contents: bytes) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, BMP, GIF, WebP, TIFF) to uint8 RGB ``(h, w, 3)``.

    Any bit depth and colour mode (gray, palette, RGBA, 16-bit) becomes 8-bit RGB; alpha
    is dropped; an animation or multi-page file gives its first frame. The decoders
    (imagecodecs: libpng, libjpeg-turbo, ...) release the GIL, so threads decode in
    parallel.

    Raises
    ------
    UnreadableImage
        Not an image, corrupt, or larger than :data:`MAX_IMAGE_PIXELS`.
    """
    import imagecodecs

    codec = _codec(contents)
    width, height = _dimensions(contents, codec)
    if width * height > MAX_IMAGE_PIXELS:
        raise UnreadableImage(f"image too large ({width}x{height} pixels; decompression bomb?)")
    # 8-bit RGB/RGBA PNGs: inflated by imagecodecs (libdeflate), unfiltered by the C loops; the rest by libpng.
    pixels = _kernels.decode_png(contents) if codec == "png" and _kernels is not None else None
    if pixels is None:
        try:
            pixels = getattr(imagecodecs, f"{codec}_decode")(contents)
        except Exception:  # noqa: BLE001 - each codec has its own error type
            raise UnreadableImage(f"corrupt or truncated {_CODECS[codec]}") from None
    return _as_rgb8(np.asarray(pixels))


def _kernels_switched_off() -> bool:
    return os.environ.get("MALARIA_CELLS_NO_KERNELS", "") not in ("", "0")


def _import_kernels():
    """The module :mod:`.kernels` (compiled PNG loops: the same pixels in about a third of
    libpng's time), or None where its C part was not built at install (no compiler) or the
    environment variable ``MALARIA_CELLS_NO_KERNELS`` is 1: then libpng decodes everything;
    only speed differs."""
    if _kernels_switched_off():
        return None
    try:
        from . import kernels
    except ImportError:
        return None
    return kernels


_kernels = _import_kernels()


def png_decoder() -> str:
    """Which PNG decoder reading uses on this installation, in words (``malaria-cells info``)."""
    if _kernels is None:
        if _kernels_switched_off():
            return "libpng (MALARIA_CELLS_NO_KERNELS is set)"
        return ("libpng: the package's C loops were not built at install; install a C compiler (gcc or "
                "clang) and reinstall malaria-cells to decode cells about 3x faster")
    simd = " with SSE4.1" if _kernels._pngloops.simd() else ""
    cells = ("whole cells in C, inflated by libdeflate" if _kernels._libdeflate_ready()
             else "libdeflate's functions not found: inflating through imagecodecs")
    return f"the package's C loops{simd}; {cells}"


def _as_rgb8(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 4:  # frames or pages
        pixels = pixels[0]
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.size == 0:
        raise UnreadableImage(f"unsupported image layout {pixels.shape}")
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)  # as tf.image.convert_image_dtype
    elif pixels.dtype != np.uint8:
        values = pixels.astype(np.float64)
        brightest = values.max()
        top = 1.0 if brightest <= 1 else 255.0 if brightest <= 255 else float(brightest)
        pixels = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    if pixels.shape[2] < 3:
        pixels = np.repeat(pixels[..., :1], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])


@lru_cache(maxsize=8)
def _compiled_resize(image_size: int):
    import tensorflow as tf

    def resize(images):
        # Bilinear without antialiasing: 3x faster than with it (at exactly half size it is a
        # 2x2 block mean, which _halve computes without TensorFlow).
        images = tf.image.resize(images, (image_size, image_size), method="bilinear")
        return tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)

    return tf.function(resize, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)], autograph=False)


def resize_images(images: Sequence[np.ndarray], image_size: int) -> np.ndarray:
    """Resize decoded uint8 RGB images to ``image_size`` x ``image_size``; one array out.

    The arithmetic is always TensorFlow's bilinear resize (half-pixel centres, no
    antialiasing, rounded). Images of one size go through it together, one call per size,
    when TensorFlow is loaded anyway; a call costs about 0.3 ms whatever its size, so a size
    with fewer than 4 images (a single upload), or any size when TensorFlow is not loaded
    (a .tflite or .onnx model needs none, and importing it takes seconds), goes through
    :func:`_resize_bilinear`, the same arithmetic in numpy. The common exact cases skip
    both: images already of the size are copied, images of twice the size (the NIH cells,
    128 -> 64 px) are averaged by 2x2 blocks (:func:`_halve`). All give the same pixels
    (tested).
    """
    out = np.empty((len(images), image_size, image_size, 3), np.uint8)
    by_shape: dict[tuple, list[int]] = {}
    for index, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(index)
    for shape, members in by_shape.items():
        if shape[:2] == (image_size, image_size):  # bilinear at scale 1 samples every pixel as it is
            out[members] = np.stack([images[i] for i in members])
        elif (half := shape[:2] == (2 * image_size, 2 * image_size)) or len(members) < 4 \
                or "tensorflow" not in sys.modules:  # not imported just to resize
            for start in range(0, len(members), 8):  # 8 at a time stay in the CPU cache: up to 2x faster
                some = members[start : start + 8]
                batch = np.stack([images[i] for i in some])
                out[some] = _halve(batch) if half else _resize_bilinear(batch, image_size)
        else:
            out[members] = _compiled_resize(int(image_size))(np.stack([images[i] for i in members])).numpy()
    return out


def _halve(images: np.ndarray) -> np.ndarray:
    """Bilinear resize to half the side, in integers: the same pixels as TensorFlow's.

    At exactly half size, TensorFlow's half-pixel-centre bilinear samples the middle of
    each 2x2 block with weights 1/2 and 1/2, so each output pixel is the rounded mean of
    a 2x2 block; numpy does that here in a few passes, without TensorFlow, whose ops
    would compete with the network for its threads while prediction runs.
    """
    if _kernels is not None:
        return _kernels.halve(images)
    count, height, width, channels = images.shape
    blocks = images.reshape(count * height // 2, 2, width // 2, 2 * channels)
    rows = np.add(blocks[:, 0], blocks[:, 1], dtype=np.uint16)
    totals = rows[..., :channels] + rows[..., channels:]
    totals += 1 + ((totals >> 2) & 1)  # then // 4 rounds halves to even, as TensorFlow's rounding
    totals >>= 2
    return totals.astype(np.uint8).reshape(count, height // 2, width // 2, channels)


@lru_cache(maxsize=64)
def _bilinear_weights(in_size: int, out_size: int):
    # TensorFlow's half-pixel-centre sampling (resize_bilinear_op.cc), in float32 as it does.
    scale = np.float32(in_size) / np.float32(out_size)
    position = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(position)
    lower = np.maximum(floor, 0).astype(np.intp)
    upper = np.minimum(np.ceil(position), in_size - 1).astype(np.intp)
    return lower, upper, (position - floor).astype(np.float32)


def _resize_bilinear(images: np.ndarray, image_size: int) -> np.ndarray:
    """Images of one size, ``(n, h, w, 3)``, through TensorFlow's bilinear resize and rounding,
    in numpy: the same operations in the same order, in float32 (no call overhead)."""
    rows_low, rows_high, row_weight = _bilinear_weights(images.shape[1], image_size)
    cols_low, cols_high, col_weight = _bilinear_weights(images.shape[2], image_size)
    col_weight = col_weight[None, None, :, None]
    top, bottom = images[:, rows_low], images[:, rows_high]
    top_left, top_right = top[:, :, cols_low].astype(np.float32), top[:, :, cols_high].astype(np.float32)
    bottom_left, bottom_right = bottom[:, :, cols_low].astype(np.float32), bottom[:, :, cols_high].astype(np.float32)
    upper = top_left + (top_right - top_left) * col_weight
    lower = bottom_left + (bottom_right - bottom_left) * col_weight
    pixels = upper + (lower - upper) * row_weight[None, :, None, None]
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def preprocess_image(contents: bytes, image_size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 RGB array of ``image_size`` x ``image_size`` x 3.

    The one preprocessing step outside the model (:func:`decode_image`, then
    :func:`resize_images`), shared by training, evaluation, prediction, serving and
    export: colour conversion and scaling are layers inside every model, so a model file
    alone predicts correctly anywhere.

    Raises
    ------
    UnreadableImage
        When the bytes are not a readable image, with the reason.
    """
    images, failures = _preprocess_all([contents], image_size, files=False)
    if failures:
        raise UnreadableImage(failures[0][1])
    return images[0]


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb", buffering=0) as handle:  # unbuffered: one read into the result, 10% faster
            contents = handle.read()
    except OSError as error:
        raise UnreadableImage(error.strerror or "cannot be read") from None
    if not contents:
        raise UnreadableImage("empty file")
    return contents


def _preprocess_all(items: Sequence, image_size: int, *, files: bool) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """:func:`preprocess_image` of each item (paths where ``files``, else encoded bytes):
    (the images, in order, of those that decoded; [(position, reason)] of the others)."""
    images = np.empty((len(items), image_size, image_size, 3), np.uint8)
    # The compiled path takes the common cells (PNGs of the model's size or twice it, such as
    # the NIH cells) from file or bytes to their row of the batch in one call without the
    # GIL, halving them as it decodes: the same pixels as below. It leaves the rest here.
    done = None
    if _kernels is not None:
        done = (_kernels.read_cells if files else _kernels.decode_cells)(items, images)
    failures: list[tuple[int, str]] = []
    others: dict[int, np.ndarray] = {}  # row -> decoded image, resized together below
    for position, item in enumerate(items):
        status = -1 if done is None else done[position]
        if status == 0:
            continue
        try:
            if status > 0:
                raise UnreadableImage(os.strerror(status))
            contents = _read_file(item) if files else bytes(item)
            if done is not None or _kernels is None or not _kernels.decode_png_into(contents, images[position]):
                others[position] = decode_image(contents)
        except UnreadableImage as error:
            failures.append((position, str(error)))
    if others:
        images[list(others)] = resize_images(list(others.values()), image_size)
    if failures:
        images = np.delete(images, [position for position, _ in failures], axis=0)
    return images, failures


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@lru_cache(maxsize=1)
def _thread_pool():
    """Threads shared by every reader: the decoders release the GIL, so they use every core."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(_workers(), thread_name_prefix="malaria-cells-decode")


def _chunks(items: Sequence, size: int) -> list:
    return [items[i : i + size] for i in range(0, len(items), size)]


def preprocess_many(contents: Sequence[bytes], image_size: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Decode and resize encoded images held in memory (what a web request carries), in parallel.

    Returns
    -------
    images : numpy.ndarray
        uint8 (n_decoded, image_size, image_size, 3), in input order.
    decoded : numpy.ndarray of bool
        Which inputs decoded.
    reasons : list of str or None
        Why each input that did not decode was refused (None for the others).
    """
    decoded = np.ones(len(contents), bool)
    reasons: list = [None] * len(contents)
    size = max(1, -(-len(contents) // _workers()))
    parts = _chunks(list(contents), size)

    def preprocess(part):
        return _preprocess_all(part, image_size, files=False)

    # One image is decoded here: handing it to a thread would only add latency.
    results = list(_thread_pool().map(preprocess, parts) if len(parts) > 1 else map(preprocess, parts))
    for offset, (_, failures) in zip(range(0, len(contents), size), results):
        for position, reason in failures:
            decoded[offset + position], reasons[offset + position] = False, reason
    if not results:
        return np.zeros((0, image_size, image_size, 3), np.uint8), decoded, reasons
    return np.concatenate([part_images for part_images, _ in results]), decoded, reasons


def _load_files(paths: Sequence[str], image_size: int):
    images, failures = _preprocess_all(paths, image_size, files=True)
    bad = {position for position, _ in failures}
    return ([p for i, p in enumerate(paths) if i not in bad], images,
            [(paths[position], reason) for position, reason in failures])


def iter_image_batches(paths: Sequence[str], image_size: int, batch_size: int = 256, *, chunk: int = 32):
    """Yield ``(paths, images, skipped)`` per batch, streaming over any number of files.

    Files are read and decoded on all cores, ``chunk`` files per task, a bounded number
    of tasks ahead, so memory stays flat however many files there are. ``images`` is a
    uint8 array (n, image_size, image_size, 3) in the order of ``paths``; ``skipped``
    lists the ``(path, reason)`` of files left out since the previous batch.
    """
    from collections import deque

    pool = _thread_pool()
    pending: deque = deque()
    tasks = iter(_chunks(list(paths), chunk))

    def submit():
        part = next(tasks, None)
        if part is not None:
            pending.append(pool.submit(_load_files, part, image_size))

    for _ in range(2 * _workers() + batch_size // chunk):
        submit()
    ready_paths: list[str] = []
    ready_images: list[np.ndarray] = [np.zeros((0, image_size, image_size, 3), np.uint8)]
    skipped: list[tuple[str, str]] = []
    while pending:
        part_paths, part_images, part_skipped = pending.popleft().result()
        submit()
        ready_paths += part_paths
        ready_images.append(part_images)  # joined once per batch: each cell is copied once
        skipped += part_skipped
        while len(ready_paths) >= batch_size or (not pending and (ready_paths or skipped)):
            images = np.concatenate(ready_images) if len(ready_images) > 1 else ready_images[0]
            yield ready_paths[:batch_size], images[:batch_size], skipped
            ready_paths, ready_images, skipped = ready_paths[batch_size:], [images[batch_size:]], []


def read_images(
    paths: Sequence[str], image_size: int, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Read and preprocess many images into memory.

    Returns
    -------
    images : numpy.ndarray
        uint8 array (n_readable, image_size, image_size, 3).
    readable : numpy.ndarray of bool
        Which of ``paths`` were read (the rows of ``images``, in order).
    skipped : list of (str, str)
        Unreadable files with the reason.
    """
    images = np.empty((len(paths), image_size, image_size, 3), np.uint8)
    readable = np.zeros(len(paths), bool)
    position = {p: i for i, p in enumerate(paths)}
    skipped: list[tuple[str, str]] = []
    count = 0
    for batch_paths, batch, batch_skipped in iter_image_batches(paths, image_size, batch_size):
        images[count : count + len(batch)] = batch
        count += len(batch)
        readable[[position[p] for p in batch_paths]] = True
        skipped += batch_skipped
    return images[:count], readable, skipped
