"""Loading trained models and scoring cell images with them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .data import CLASS_NAMES, _thread_pool, iter_image_batches, list_image_files
from .errors import MalariaCellsError

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
DEFAULT_MODEL = PRETRAINED_DIR / "malaria-cells-default.keras"
"""The model shipped inside the package, used when no model is named."""
DEFAULT_MODEL_ONNX = DEFAULT_MODEL.with_suffix(".onnx")
"""An ONNX copy of :data:`DEFAULT_MODEL` (same weights and threshold, written with it by
``scripts/ship_model.py``, which checks that both label every dataset cell alike)."""
MODEL_ENV = "MALARIA_CELLS_MODEL"


def default_model_path(*, fast_start: bool = True) -> Path:
    """The model used when none is named: ``$MALARIA_CELLS_MODEL``, else the shipped one.

    Parameters
    ----------
    fast_start : bool
        Run the shipped model from its ONNX copy when it matches the ``.keras`` file (same
        training run and threshold) and onnxruntime is installed: onnxruntime starts in
        about 0.2 s where TensorFlow takes 4 s (most of the time of a ``predict`` on a few
        cells), takes a quarter of the memory, and on 2 cores scored a folder and served
        requests at least as fast. Commands that need the Keras model (``export``) pass False.
    """
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    if fast_start and _onnx_copy_matches():
        return DEFAULT_MODEL_ONNX
    return DEFAULT_MODEL


def _onnx_copy_matches() -> bool:
    import importlib.util
    import json

    from .export import sidecar_path

    try:
        shipped = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
        copy = json.loads(sidecar_path(DEFAULT_MODEL_ONNX).read_text())
    except (OSError, ValueError):
        return False
    return (DEFAULT_MODEL_ONNX.is_file() and importlib.util.find_spec("onnxruntime") is not None
            and copy.get("threshold") == shipped.get("threshold")
            and copy.get("info", {}).get("trained_at") == shipped.get("trained_at"))


def check_threshold(threshold: float | None) -> float | None:
    """Validate a user-given threshold (None means: the model's own)."""
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise MalariaCellsError(f"threshold must be between 0 and 1, got {threshold}")
    return None if threshold is None else float(threshold)


class CellClassifier:
    """A trained model with everything needed to use it, whatever its file format.

    Attributes
    ----------
    path : str
        Where it was loaded from.
    image_size : int
        Side of the square input the model expects.
    threshold : float
        Probability above which a cell is called Parasitized.
    info : dict
        Recipe, data, validation figures and versions stored with the model.
    keras_model : keras.Model or None
        The network, for Keras models (None for TFLite and ONNX exports).
    runtime : str
        What runs the network (TensorFlow, LiteRT or onnxruntime, with its version).
    """

    keras_model = None
    runtime = "?"
    _parallel_batches = False  # whether batches of a large array run side by side (one thread each)
    _takes_uint8 = False  # whether _score casts uint8 cells itself (inside its graph)

    def __init__(self, path, image_size: int, threshold: float = 0.5, info: dict | None = None):
        self.path = str(path)
        self.image_size = int(image_size)
        self.threshold = float(threshold)
        self.info = dict(info or {})

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={self.path!r}, image_size={self.image_size}, "
            f"threshold={self.threshold:.4f})"
        )

    def _score(self, images: np.ndarray) -> np.ndarray:
        """Scores of a batch of float32 cells (n, image_size, image_size, 3); uint8 too where
        ``_takes_uint8``."""
        raise NotImplementedError

    def predict_proba(self, images: np.ndarray, *, tta: bool = False, batch_size: int = 256) -> np.ndarray:
        """Probability of Parasitized for preprocessed images.

        Parameters
        ----------
        images : array of shape (n, image_size, image_size, 3)
            RGB pixels 0-255, as :func:`malaria_cells.data.preprocess_image` gives.
        tta : bool
            Test-time augmentation: average over the 8 rotations and mirrors of each
            cell (8 times the compute).
        batch_size : int
            Images run through the network at once (bounds memory for large arrays).
        """
        if len(images) > batch_size:
            def score(start):
                return self.predict_proba(images[start:start + batch_size], tta=tta, batch_size=batch_size)

            starts = range(0, len(images), batch_size)
            return np.concatenate(list(_thread_pool().map(score, starts)) if self._parallel_batches
                                  else [score(start) for start in starts])
        images = np.asarray(images)
        if not (self._takes_uint8 and images.dtype == np.uint8):  # uint8 stays small until the graph casts it
            images = images.astype(np.float32, copy=False)
        if images.ndim == 3:
            images = images[None]
        if images.shape[1:] != (self.image_size, self.image_size, 3):
            raise MalariaCellsError(
                f"images must have shape (n, {self.image_size}, {self.image_size}, 3), got {images.shape}"
            )
        if len(images) == 0:
            return np.zeros(0, np.float32)
        if not tta:
            return np.asarray(self._score(images)).reshape(-1)
        views = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
        views += [np.flip(view, axis=2) for view in views]
        scores = np.asarray(self._score(np.ascontiguousarray(np.concatenate(views))))
        return scores.reshape(8, -1).mean(axis=0)

    def set_threshold(self, threshold: float) -> None:
        """Change the operating threshold (kept when a Keras model is saved)."""
        self.threshold = check_threshold(threshold)


class KerasClassifier(CellClassifier):
    """A ``.keras`` model; its threshold and metadata live in its ``CellModelInfo`` layer.

    Scores come from an inference twin of ``keras_model`` with its batch norms folded
    into the convolutions (:func:`malaria_cells.models.fuse_batch_norm`), made when the
    classifier is created: wrap a model once it is trained, not before.
    """

    _takes_uint8 = True

    def __init__(self, keras_model, path: str | os.PathLike = "<memory>"):
        import tensorflow as tf

        from .models import fuse_batch_norm, model_info_layer

        shape = keras_model.input_shape
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
            raise MalariaCellsError(
                f"{path}: not a malaria-cells model (input shape {shape}, expected (None, S, S, 3))"
            )
        layer = model_info_layer(keras_model)
        super().__init__(path, shape[1], layer.threshold if layer else 0.5, layer.info if layer else {})
        self.keras_model = keras_model
        self.runtime = f"TensorFlow {tf.__version__}"
        network = fuse_batch_norm(keras_model)
        shape = (None, self.image_size, self.image_size, 3)
        self._infer = {
            np.dtype(dtype): tf.function(lambda images: network(tf.cast(images, tf.float32), training=False),
                                         input_signature=[tf.TensorSpec(shape, dtype)], autograph=False)
            for dtype in ("uint8", "float32")
        }

    def _score(self, images):
        return self._infer[images.dtype](images).numpy()

    def set_threshold(self, threshold: float) -> None:
        from .models import model_info_layer

        super().set_threshold(threshold)
        layer = model_info_layer(self.keras_model)
        if layer is not None:
            layer.threshold = self.threshold

    def save(self, path: str | os.PathLike) -> None:
        """Save as ``.keras`` without ever leaving a half-written file at ``path``."""
        save_keras_model(self.keras_model, path)


def save_keras_model(keras_model, path: str | os.PathLike) -> None:
    """Write a ``.keras`` file atomically: to a temporary file, then rename."""
    from .files import atomic_path

    with atomic_path(path) as temporary:
        keras_model.save(temporary)


def load_model(path: str | os.PathLike | CellClassifier | None = None) -> CellClassifier:
    """Load a trained model; with no path, :func:`default_model_path` (the shipped model,
    run from its ONNX copy when that can be).

    Raises
    ------
    MalariaCellsError
        When the file is missing or is not a malaria-cells model.
    """
    if isinstance(path, CellClassifier):
        return path
    if path is None:
        path = default_model_path()
        if not Path(path).is_file():
            raise MalariaCellsError(
                "no model given and no model is shipped with this install: "
                "train one with `malaria-cells train` and pass --model RUN_DIR/model.keras"
            )
    path = Path(path).expanduser()
    if path.is_dir() and (path / "model.keras").is_file():
        path = path / "model.keras"
    if not path.is_file():
        raise MalariaCellsError(f"{path}: model file not found")
    if path.suffix in (".tflite", ".onnx"):
        from .export import load_exported_model

        return load_exported_model(path)
    if path.suffix != ".keras":
        raise MalariaCellsError(f"{path}: unsupported model format (expected .keras, .tflite or .onnx)")
    import keras

    from . import models  # noqa: F401 - registers the custom layers

    try:
        keras_model = keras.saving.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - a broken file can fail in many ways
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise MalariaCellsError(f"{path}: cannot load model ({first_line[:200]})") from error
    return KerasClassifier(keras_model, path)


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image."""

    path: str
    probability: float
    label: str

    @property
    def parasitized(self) -> bool:
        return self.label == CLASS_NAMES[1]


def label_for(probability: float, threshold: float) -> str:
    return CLASS_NAMES[int(probability >= threshold)]


def iter_predictions(
    inputs: Iterable[str | os.PathLike],
    model: str | os.PathLike | CellClassifier | None = None,
    *,
    threshold: float | None = None,
    batch_size: int = 256,
    tta: bool = False,
    skipped: list | None = None,
) -> Iterator[Prediction]:
    """Score image files and folders (recursively), streaming: memory stays flat.

    Parameters
    ----------
    inputs : iterable of path
        Image files and folders.
    model : path or CellClassifier, optional
        Defaults to the model shipped with the package.
    threshold : float, optional
        Overrides the model's stored threshold.
    batch_size : int
        Images scored at once.
    tta : bool
        Average over the 8 rotations/mirrors of each cell.
    skipped : list, optional
        Receives ``(path, reason)`` for every file that could not be scored.
    """
    model = load_model(model)
    threshold = model.threshold if check_threshold(threshold) is None else threshold
    files, ignored = list_image_files(inputs)
    if skipped is not None:
        skipped += ignored
    yield from predict_files(files, model, threshold, batch_size=batch_size, tta=tta, skipped=skipped)


def predict_files(files: Sequence[str], model: CellClassifier, threshold: float, *,
                  batch_size: int = 256, tta: bool = False, skipped: list | None = None):
    """Stream predictions for a list of image files (see :func:`iter_predictions`)."""
    batches = iter_image_batches(files, model.image_size, batch_size)
    scored = (_scored_ahead(batches, model, tta) if model._parallel_batches
              else ((paths, model.predict_proba(images, tta=tta), bad) for paths, images, bad in batches))
    for paths, probabilities, bad in scored:
        if skipped is not None:
            skipped += bad
        for path, probability in zip(paths, probabilities):
            yield Prediction(path, float(probability), label_for(probability, threshold))


def _scored_ahead(batches, model: CellClassifier, tta: bool, ahead: int = 2):
    """``(paths, images, skipped)`` batches -> ``(paths, probabilities, skipped)``, in order,
    each batch scored on the shared threads while later ones are read.

    Scoring in this thread would cap the network at one core while decoding leaves the
    other half idle; queued with the decoding, both cores stay busy with whichever work
    is ready. Only for models whose calls may run side by side (``_parallel_batches``).
    """
    from collections import deque

    pool, pending = _thread_pool(), deque()
    for paths, images, skipped in batches:
        # batch_size = the whole batch: a scoring task must not wait on tasks queued behind it
        pending.append((paths, pool.submit(model.predict_proba, images, tta=tta, batch_size=max(1, len(images))),
                        skipped))
        while len(pending) > ahead:
            paths, scores, skipped = pending.popleft()
            yield paths, scores.result(), skipped
    for paths, scores, skipped in pending:
        yield paths, scores.result(), skipped


def predict(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    model: str | os.PathLike | CellClassifier | None = None,
    *,
    threshold: float | None = None,
    batch_size: int = 256,
    tta: bool = False,
) -> list[Prediction]:
    """Score image files and folders; unreadable files are left out with a warning.

    >>> from malaria_cells import predict
    >>> predict("cell.png")  # doctest: +SKIP
    [Prediction(path='cell.png', probability=0.993, label='Parasitized')]
    """
    from .data import warn_skipped

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    skipped: list = []
    results = list(
        iter_predictions(inputs, model, threshold=threshold, batch_size=batch_size, tta=tta,
                         skipped=skipped)
    )
    warn_skipped(skipped)
    return results
