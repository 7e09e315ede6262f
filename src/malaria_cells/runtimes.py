"""What runs a trained network: Keras, LiteRT (TFLite) and onnxruntime models behind one class.

:func:`load_model` opens any of the three formats as a :class:`CellClassifier`, which carries
its input size and threshold (stored in the file or its side-car JSON), so a model file alone
scores cells correctly anywhere.
"""

from __future__ import annotations

import json
import os
import re
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from .config import CLASS_NAMES, MODEL_SUFFIXES
from .errors import MalariaCellsError

__all__ = ["CellClassifier", "KerasClassifier", "LiteRTClassifier", "OnnxClassifier", "DEFAULT_MODEL",
           "DEFAULT_MODEL_ONNX", "MODEL_ENV", "METADATA_KEY", "check_threshold", "default_model_path",
           "load_model", "save_keras_model", "sidecar_path"]

METADATA_KEY = "malaria_cells"


_TENSORFLOW_START_UP = re.compile(
    r"absl::InitializeLog|oneDNN custom operations|cuda drivers|cudart_stub|cuInit|cpu_feature_guard"
    r"|rebuild TensorFlow with the appropriate compiler flags|This TensorFlow binary is optimized")
"""Lines TensorFlow's C++ core prints at import whatever TF_CPP_MIN_LOG_LEVEL says."""


def import_tensorflow_quietly() -> None:
    """Import TensorFlow without its start-up log lines, passing on anything else it prints.

    Its C++ core writes straight to file descriptor 2, so that descriptor is captured for
    the import; lines other than the known start-up ones (and everything, when the import
    fails) are written back to stderr. Outside the main thread (a server's worker), or once
    TensorFlow is imported, it imports plainly: file descriptor 2 is the whole process's.
    """
    import sys
    import tempfile
    import warnings

    if "tensorflow" in sys.modules or threading.current_thread() is not threading.main_thread():
        import tensorflow  # noqa: F401

        return

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    sys.stderr.flush()
    failed = True
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        try:
            os.dup2(captured.fileno(), 2)
            import tensorflow  # noqa: F401

            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines()
            kept = [line for line in lines if failed or not _TENSORFLOW_START_UP.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / "malaria_cells.json" if path.is_dir() else path.with_name(path.name + ".json")


PRETRAINED_DIR = Path(__file__).parent / "pretrained"
DEFAULT_MODEL = PRETRAINED_DIR / "malaria-cells-default.keras"
"""The model shipped inside the package, used when no model is named."""
DEFAULT_MODEL_ONNX = DEFAULT_MODEL.with_suffix(".onnx")
"""An ONNX copy of :data:`DEFAULT_MODEL` (same weights and threshold, written with it by
``scripts/ship_model.py``, which checks that both label every dataset cell alike)."""
FIELD_MODEL = PRETRAINED_DIR / "malaria-cells-fields.keras"
"""The model ``screen`` uses when none is named: the cell model fine-tuned on field crops, whose
threshold is its counting threshold (chosen on validation fields; ``info["field"]`` holds it and
what it gave). ``predict`` and the other cell commands keep :data:`DEFAULT_MODEL`."""
MODEL_ENV = "MALARIA_CELLS_MODEL"


def default_model_path(*, fast_start: bool = True, fields: bool = False) -> Path:
    """The model used when none is named: ``$MALARIA_CELLS_MODEL``, else the shipped one.

    Parameters
    ----------
    fast_start : bool
        Run the shipped model from its ONNX copy when it matches the ``.keras`` file (same
        training run and threshold) and onnxruntime is installed: onnxruntime starts in a
        fraction of the time TensorFlow takes to import and needs less memory. Commands that
        need the Keras model (``export``) pass False.
    fields : bool
        The model for field screening (:data:`FIELD_MODEL`, where it is shipped).
    """
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    model = FIELD_MODEL if fields and FIELD_MODEL.is_file() else DEFAULT_MODEL
    if fast_start and _onnx_copy_matches(model):
        return model.with_suffix(".onnx")
    return model


def _onnx_copy_matches(model: Path = DEFAULT_MODEL) -> bool:
    import importlib.util

    onnx_copy = model.with_suffix(".onnx")
    try:
        shipped = json.loads(model.with_suffix(".json").read_text())
        copy = json.loads(sidecar_path(onnx_copy).read_text())
    except (OSError, ValueError):
        return False
    return (onnx_copy.is_file() and importlib.util.find_spec("onnxruntime") is not None
            and copy.get("threshold") == shipped.get("threshold")
            and copy.get("info", {}).get("trained_at") == shipped.get("trained_at"))


def check_threshold(threshold: float | None) -> float | None:
    """Validate a user-given threshold (None means: the model's own)."""
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise MalariaCellsError(f"threshold must be between 0 and 1, got {threshold}")
    return None if threshold is None else float(threshold)


@lru_cache(maxsize=1)
def _scoring_pool():
    """Threads that run network calls side by side (apart from the decoding threads of
    :mod:`.pipeline`, so a scoring task never queues behind decoding or the reverse)."""
    from concurrent.futures import ThreadPoolExecutor

    from .pipeline import workers

    return ThreadPoolExecutor(workers(), thread_name_prefix="malaria-cells-score")


def plain_info(info) -> dict:
    """A model's metadata as plain dicts and lists. What a Keras layer holds comes back wrapped
    in Keras's tracking types, which do not survive pickling (a result sent between Dask
    processes, a model handed to a worker)."""
    from collections.abc import Mapping

    def plain(value):
        if isinstance(value, Mapping):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    return plain(info or {})


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
    parallel_batches : bool
        Whether batches may be scored side by side on threads (runtimes that release the GIL
        and are thread-safe); prediction then scores one batch while the next is decoded.
    """

    keras_model = None
    runtime = "?"
    parallel_batches = False  # whether batches of a large array run side by side (one thread each)
    _takes_uint8 = False  # whether _score casts uint8 cells itself (inside its graph)

    def __init__(self, path, image_size: int, threshold: float = 0.5, info: dict | None = None):
        self.path = str(path)
        self.image_size = int(image_size)
        self.threshold = float(threshold)
        self.info = plain_info(info)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={self.path!r}, image_size={self.image_size}, "
            f"threshold={self.threshold:.4f})"
        )

    def _score(self, images: np.ndarray) -> np.ndarray:
        """Scores of a batch of float32 cells (n, image_size, image_size, 3); uint8 too where
        ``_takes_uint8``."""
        raise NotImplementedError

    classes_ = np.array(CLASS_NAMES)
    """Class names in the column order of :meth:`predict_proba` (scikit-learn's attribute)."""

    def probability(self, images: np.ndarray, *, tta: bool = False, batch_size: int = 256) -> np.ndarray:
        """Probability of Parasitized for each preprocessed image, shape ``(n,)``.

        Parameters
        ----------
        images : array of shape (n, image_size, image_size, 3)
            RGB pixels 0-255, as :func:`malaria_cells.images.preprocess` gives (uint8 or float).
        tta : bool
            Test-time augmentation: average over the 8 rotations and mirrors of each
            cell (8 times the compute).
        batch_size : int
            Images run through the network at once (bounds memory for large arrays).
        """
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise MalariaCellsError(
                f"images must have shape (n, {self.image_size}, {self.image_size}, 3), got {images.shape}"
            )
        if len(images) > batch_size:
            def score(start):
                return self._probability(images[start:start + batch_size], tta)

            starts = range(0, len(images), batch_size)
            return np.concatenate(list(_scoring_pool().map(score, starts)) if self.parallel_batches
                                  else [score(start) for start in starts])
        return self._probability(images, tta)

    def _probability(self, images: np.ndarray, tta: bool) -> np.ndarray:
        if not (self._takes_uint8 and images.dtype == np.uint8):  # uint8 stays small until the graph casts it
            images = images.astype(np.float32, copy=False)
        if len(images) == 0:
            return np.zeros(0, np.float32)
        if not tta:
            return np.asarray(self._score(images)).reshape(-1)
        views = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
        views += [np.flip(view, axis=2) for view in views]
        scores = np.asarray(self._score(np.ascontiguousarray(np.concatenate(views))))
        return scores.reshape(8, -1).mean(axis=0)

    def predict_proba(self, images: np.ndarray, *, tta: bool = False, batch_size: int = 256) -> np.ndarray:
        """Class probabilities, shape ``(n, 2)``: columns in :attr:`classes_` order
        (Uninfected, Parasitized), as in scikit-learn. Parameters as :meth:`probability`."""
        parasitized = self.probability(images, tta=tta, batch_size=batch_size)
        return np.column_stack([1.0 - parasitized, parasitized])

    def predict(self, images: np.ndarray, *, tta: bool = False, batch_size: int = 256) -> np.ndarray:
        """Labels at the model's threshold, shape ``(n,)``: 1 for Parasitized, 0 for Uninfected."""
        return (self.probability(images, tta=tta, batch_size=batch_size) >= self.threshold).astype(np.int64)

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
    if path.suffix not in MODEL_SUFFIXES:
        raise MalariaCellsError(f"{path}: unsupported model format (expected {', '.join(MODEL_SUFFIXES)})")
    if path.suffix == ".tflite":
        return LiteRTClassifier(path)
    if path.suffix == ".onnx":
        return OnnxClassifier(path)
    import keras

    from . import models  # noqa: F401 - registers the custom layers

    try:
        keras_model = keras.saving.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - a broken file can fail in many ways
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise MalariaCellsError(f"{path}: cannot load model ({first_line[:200]})") from error
    return KerasClassifier(keras_model, path)


def _read_metadata(path: Path) -> dict:
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        return json.loads(sidecar.read_text())
    return {}


class LiteRTClassifier(CellClassifier):
    """A ``.tflite`` model run with LiteRT (or TensorFlow's own interpreter)."""

    def __init__(self, path: Path):
        try:
            from ai_edge_litert.interpreter import Interpreter

            runtime = "LiteRT"
        except ImportError:
            import tensorflow as tf

            Interpreter, runtime = tf.lite.Interpreter, f"TensorFlow {tf.__version__} (TFLite interpreter)"
        try:
            self._interpreter = Interpreter(model_path=str(path), num_threads=os.cpu_count())
        except Exception as error:  # noqa: BLE001 - any failure means an unusable file
            raise MalariaCellsError(f"{path}: cannot load TFLite model ({str(error).splitlines()[0][:200]})") from error
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        metadata = _read_metadata(path)
        super().__init__(path, self._input["shape"][1], metadata.get("threshold", 0.5), metadata.get("info"))
        self.runtime = runtime
        self._lock = threading.Lock()
        self._batch = None

    def _score(self, images):
        with self._lock:
            if self._batch != len(images):
                self._interpreter.resize_tensor_input(self._input["index"], images.shape)
                self._interpreter.allocate_tensors()
                self._batch = len(images)
            self._interpreter.set_tensor(self._input["index"], images)
            self._interpreter.invoke()
            return self._interpreter.get_tensor(self._output["index"]).copy()


class OnnxClassifier(CellClassifier):
    """An ``.onnx`` model run with onnxruntime."""

    parallel_batches = True

    def __init__(self, path: Path):
        try:
            import onnxruntime
        except ImportError:
            raise MalariaCellsError("ONNX models need onnxruntime: pip install onnxruntime") from None
        options = onnxruntime.SessionOptions()
        # One thread per run: in predict's pipeline decoding keeps the other cores busy, and
        # more threads only wait; many images at once run batches side by side instead.
        options.intra_op_num_threads = 1
        try:
            self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001
            raise MalariaCellsError(f"{path}: cannot load ONNX model ({str(error).splitlines()[0][:200]})") from error
        embedded = self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        metadata = _read_metadata(path) or (json.loads(embedded) if embedded else {})
        self._input_name = self._session.get_inputs()[0].name
        size = self._session.get_inputs()[0].shape[1]
        super().__init__(path, metadata.get("image_size", size), metadata.get("threshold", 0.5), metadata.get("info"))
        self.runtime = f"onnxruntime {onnxruntime.__version__}"

    def _score(self, images):
        # Runs of 64 cells: their activations stay in the CPU caches.
        return np.concatenate([self._session.run(None, {self._input_name: images[start:start + _ONNX_RUN]})[0]
                               for start in range(0, len(images), _ONNX_RUN)])


_ONNX_RUN = 64
