"""Finding, reading, splitting and preprocessing cell images.

Everything that turns files into model input lives here, so that training, evaluation,
prediction, serving and export share one decoder (:func:`decode_image`) and one
preprocessing function (:func:`preprocess_image`) and can never drift apart.
"""

from __future__ import annotations

import io
import os
import re
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


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("._")


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
            for dirpath, dirnames, filenames in os.walk(item):
                dirnames.sort()
                for name in sorted(filenames):
                    _add_file(Path(dirpath) / name, files, ignored, from_folder=True)
        elif item.exists():
            _add_file(item, files, ignored, from_folder=False)
        else:
            ignored.append((str(item), "no such file or folder"))
    return files, ignored


def _add_file(path: Path, files: list, ignored: list, from_folder: bool) -> None:
    if from_folder and not _is_image_name(path):
        ignored.append((str(path), "not an image file"))
    elif path.stat().st_size == 0:
        ignored.append((str(path), "empty file"))
    else:
        files.append(str(path))


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


def _decode_with_pillow(contents: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(contents)) as image:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image too large ({image.width}x{image.height})")
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            pixels = np.asarray(image, dtype=np.float64)
            top = 65535.0 if pixels.max() > 255 else 255.0
            image = Image.fromarray((pixels * 255.0 / top).clip(0, 255).astype(np.uint8))
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_image(contents):
    """Decode encoded image bytes (PNG, JPEG, BMP, GIF, WebP, TIFF) to uint8 RGB.

    Any bit depth and colour mode (gray, palette, RGBA, 16-bit) becomes 8-bit RGB;
    alpha is dropped. TensorFlow decodes the common formats in-graph; TIFF, which
    it cannot read, goes through Pillow.
    """
    import tensorflow as tf

    head = tf.strings.substr(contents, 0, 4)
    is_tiff = tf.reduce_any([tf.equal(head, magic) for magic in _TIFF_MAGIC])

    def with_tensorflow():
        return tf.io.decode_image(
            contents, channels=3, dtype=tf.uint8, expand_animations=False
        )

    def with_pillow():
        return tf.numpy_function(_decode_with_pillow, [contents], tf.uint8, stateful=False)

    image = tf.cond(is_tiff, with_pillow, with_tensorflow)
    image.set_shape([None, None, 3])
    return image


def preprocess_image(contents, image_size: int):
    """Encoded image bytes -> uint8 RGB of ``image_size`` x ``image_size``.

    The one preprocessing step outside the model: colour conversion and scaling are
    layers inside every model, so a model file alone predicts correctly anywhere.
    """
    import tensorflow as tf

    image = decode_image(contents)
    pixels = tf.shape(image)[0] * tf.shape(image)[1]
    tf.debugging.assert_less_equal(
        pixels, MAX_IMAGE_PIXELS, message="image too large (decompression bomb?)"
    )
    # Bilinear without antialiasing: 3x faster, and exact 2x2 averaging for the common
    # 128 -> 64 px case.
    image = tf.image.resize(image, (image_size, image_size), method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def image_dataset(paths: Sequence[str], image_size: int, batch_size: int = 256):
    """A tf.data pipeline of ``(paths, images)`` batches read in parallel.

    Files that fail to read or decode are dropped from the stream (compare the paths
    that come out with those that went in to find them: see :func:`read_images`).
    """
    import tensorflow as tf

    def load(path):
        return path, preprocess_image(tf.io.read_file(path), image_size)

    return (
        tf.data.Dataset.from_tensor_slices(tf.constant(list(paths), dtype=tf.string))
        .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .ignore_errors()
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


@lru_cache(maxsize=8)
def _compiled_preprocess(image_size: int):
    import tensorflow as tf

    return tf.function(lambda contents: preprocess_image(contents, image_size),
                       input_signature=[tf.TensorSpec([], tf.string)], autograph=False)


@lru_cache(maxsize=8)
def _compiled_preprocess_batch(image_size: int):
    """:func:`preprocess_image` over a batch of encoded images, in parallel, in one call."""
    import tensorflow as tf

    def batch(contents):
        # A tf.data map traced once into this function: it decodes on every core, with
        # less overhead per image than tf.map_fn (about 2/3 of the wall time per request).
        images = tf.data.Dataset.from_tensor_slices(contents).map(
            lambda one: preprocess_image(one, image_size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return images.batch(tf.cast(tf.size(contents), tf.int64)).get_single_element()

    return tf.function(batch, input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)


def preprocess_many(contents: Sequence[bytes], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize encoded images held in memory (what a web request carries).

    The whole batch goes through :func:`preprocess_image` in one compiled call that
    decodes in parallel; only when some image fails does it go image by image, to find
    which ones (a tf.data pipeline per request costs more to build than this).

    Returns
    -------
    images : numpy.ndarray
        uint8 (n_decoded, image_size, image_size, 3), in input order.
    decoded : numpy.ndarray of bool
        Which inputs decoded (the others are corrupt or not images).
    """
    import tensorflow as tf

    if not contents:
        return np.zeros((0, image_size, image_size, 3), np.uint8), np.zeros(0, bool)
    preprocess = _compiled_preprocess(int(image_size))
    if len(contents) > 1:  # one image goes straight through: starting the parallel map costs more
        try:
            images = _compiled_preprocess_batch(int(image_size))(tf.constant(list(contents))).numpy()
            return images, np.ones(len(contents), bool)
        except (tf.errors.OpError, ValueError):
            pass
    images, decoded = [], np.zeros(len(contents), bool)
    for index, data in enumerate(contents):
        try:
            images.append(preprocess(tf.constant(data)).numpy())
            decoded[index] = True
        except (tf.errors.OpError, ValueError):
            continue
    stacked = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    return stacked, decoded


def explain_unreadable(path: str) -> str:
    """Why a file could not be read as an image, in a few words."""
    try:
        with open(path, "rb") as handle:
            contents = handle.read()
    except OSError as error:
        return error.strerror or "cannot be read"
    if not contents:
        return "empty file"
    try:
        import tensorflow as tf

        preprocess_image(tf.constant(contents), 8)
    except Exception as error:  # noqa: BLE001 - any decoder failure is the answer
        text = str(error).strip().splitlines()
        message = text[-1] if text else type(error).__name__
        if "too large" in message:
            return "image too large (decompression bomb?)"
        return "not a readable image (corrupt or unsupported format)"
    return "could not be read"


def iter_image_batches(paths: Sequence[str], image_size: int, batch_size: int = 256):
    """Yield ``(paths, images, skipped)`` per batch, streaming over any number of files.

    ``images`` is a uint8 array (n, image_size, image_size, 3); ``skipped`` lists the
    ``(path, reason)`` of files dropped since the previous batch.
    """
    expected = iter(paths)
    for batch_paths, images in image_dataset(paths, image_size, batch_size):
        batch_paths = [p.decode() for p in batch_paths.numpy()]
        skipped = []
        for path in batch_paths:
            for missing in expected:
                if missing == path:
                    break
                skipped.append((missing, explain_unreadable(missing)))
        yield batch_paths, images.numpy(), skipped
    rest = [(p, explain_unreadable(p)) for p in expected]
    if rest:
        yield [], np.zeros((0, image_size, image_size, 3), np.uint8), rest


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
