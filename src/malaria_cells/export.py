"""Exporting models for phones and servers (TFLite, ONNX, SavedModel) and loading them back.

Every export carries what is needed to use it: the preprocessing is inside the network
(colour conversion and scaling layers; inputs are RGB pixels 0-255 at the model's size)
and a side-car ``<file>.json`` holds the input size, threshold and recipe. ONNX files also
embed that JSON in their metadata, so they stand alone.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np

from .errors import MalariaCellsError
from .files import atomic_path, write_json
from .config import CLASS_NAMES, EXPORT_FORMATS, QUANTIZATIONS, check_choice
from .runtimes import METADATA_KEY, CellClassifier, default_model_path, load_model, sidecar_path

INT8_FLOAT_OPS = ("ADD", "BATCH_MATMUL", "CAST", "CONCATENATION", "DIV", "EXPAND_DIMS", "FULLY_CONNECTED",
                  "GREATER", "HARD_SWISH", "LOGISTIC", "MAXIMUM", "MEAN", "MINIMUM", "MUL", "REDUCE_MAX",
                  "RESHAPE", "SUB", "SUM")
"""TFLite operators that ``--quantize int8`` leaves in float: all but convolutions and pooling."""

EXPORT_EXTRA = "pip install 'malaria-cells[export]'"
"""How to install the packages that ONNX export needs (the ``export`` extra)."""


def export_model(model, out: str | os.PathLike, *, format: str = "tflite", quantize: str = "none",
                 calibration_images: np.ndarray | None = None) -> Path:
    """Export a Keras model.

    Parameters
    ----------
    model : path or CellClassifier
        A ``.keras`` model (default: the shipped one).
    out : path
        Output file (``.tflite``, ``.onnx``) or folder (``saved_model``); never replaced
        half-written.
    format : {"tflite", "onnx", "saved_model"}
    quantize : {"none", "float16", "int8"}
        ``float16`` halves the file (TFLite); ``int8`` quarters it and needs
        ``calibration_images`` (a few hundred preprocessed training cells).
    calibration_images : array (n, size, size, 3), optional
        Representative inputs for int8 calibration.

    Returns
    -------
    Path
        The written file or folder; its metadata is in :func:`sidecar_path`.
    """
    check_choice(format, EXPORT_FORMATS, "format")
    check_choice(quantize, QUANTIZATIONS, "quantization")
    if quantize != "none" and format == "saved_model":
        raise MalariaCellsError("saved_model exports are not quantized: use --format tflite or onnx")
    if quantize == "float16" and format == "onnx":
        raise MalariaCellsError("float16 is offered for tflite only; for onnx use --quantize int8 or none")
    if quantize == "int8" and (calibration_images is None or len(calibration_images) == 0):
        raise MalariaCellsError("int8 quantization needs calibration images: pass --calibration DIR")
    if format == "onnx":  # a missing extra fails here, in one line, before any work is done
        require_export_packages(quantize)
    model = load_model(default_model_path(fast_start=False) if model is None else model)
    if model.keras_model is None:
        raise MalariaCellsError(f"{model.path}: export starts from a .keras model")
    out = Path(out)
    metadata = {"format": format, "quantize": quantize, "image_size": model.image_size,
                "threshold": model.threshold, "input": "RGB pixels 0-255, float32, shape (n, S, S, 3)",
                "output": "probability of Parasitized, shape (n, 1)",
                "class_names": list(CLASS_NAMES),
                "source": Path(model.path).name,  # not the whole path: exports travel to other machines
                "info": model.info}
    # Keras prints a listing of every variable of the SavedModel the converters start from.
    with contextlib.redirect_stdout(io.StringIO()):
        if format == "saved_model":
            _export_saved_model(model, out)
        elif format == "tflite":
            with atomic_path(out) as temporary:
                temporary.write_bytes(_tflite_bytes(model, quantize, calibration_images))
        else:
            with atomic_path(out) as temporary:
                temporary.write_bytes(_onnx_bytes(model, quantize, calibration_images, metadata))
    write_json(sidecar_path(out), metadata)
    return out


def require_export_packages(quantize: str = "none") -> None:
    """Raise a one-line :class:`MalariaCellsError` naming the package and the pip command
    when a package that ONNX export (``quantize="int8"``: its quantization too) needs is
    missing.

    tf2onnx and onnx convert; onnxruntime's quantization needs SymPy for its shape
    inference, which onnxruntime no longer installs itself.
    """
    import importlib

    modules = ["onnx", "tf2onnx"] + (["sympy", "onnxruntime.quantization"] if quantize == "int8" else [])
    what = "ONNX int8 quantization" if quantize == "int8" else "ONNX export"
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:  # also a package that the module itself imports
            missing = (error.name or module).split(".")[0]
            raise MalariaCellsError(f"{what} needs the Python package {missing}, which is not installed: "
                                    f"{EXPORT_EXTRA}") from None
        except ImportError as error:  # installed, but broken or of a version that does not fit
            detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            raise MalariaCellsError(f"{what} needs the Python package {module.split('.')[0]}, which fails to "
                                    f"import ({detail}): {EXPORT_EXTRA.replace('install', 'install --upgrade')}") from None


def _export_saved_model(model: CellClassifier, out: Path) -> None:
    import shutil

    if out.exists():
        raise MalariaCellsError(f"{out}: already exists; choose another --out")
    staging = out.with_name(f".{out.name}.exporting")
    shutil.rmtree(staging, ignore_errors=True)
    model.keras_model.export(str(staging), verbose=False)
    os.replace(staging, out)


def _representative(images: np.ndarray):
    def generate():
        for image in images[:500]:
            yield [image[None].astype(np.float32)]

    return generate


def _tflite_bytes(model: CellClassifier, quantize: str, calibration_images) -> bytes:
    from .models import stain_normalization_by_matrices

    with stain_normalization_by_matrices(model.keras_model):  # TFLite's fastest form of the layer
        return _convert_to_tflite(model, quantize, calibration_images)


def _convert_to_tflite(model: CellClassifier, quantize: str, calibration_images) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model.keras_model)
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        # int8 weights and activations in the convolutions (nearly all the compute); the
        # stain normalization, pooling head and sigmoid stay float: quantized too, they
        # changed more labels than the export check's bar allows.
        # Float input and output, so the same preprocessing and threshold apply unchanged.
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _representative(calibration_images)
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=_representative(calibration_images[:100]),
            debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(INT8_FLOAT_OPS)))
        return debugger.get_nondebug_quantized_model()
    return converter.convert()


def _onnx_bytes(model: CellClassifier, quantize: str, calibration_images, metadata: dict) -> bytes:
    import tensorflow as tf

    import onnx  # present: export_model checked with require_export_packages
    import tf2onnx

    spec = (tf.TensorSpec((None, model.image_size, model.image_size, 3), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(model.keras_model, input_signature=spec, opset=17)
    if quantize == "int8":
        proto = _onnx_int8(proto, calibration_images)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, default=str)
    return onnx.ModelProto.SerializeToString(proto)


def _onnx_int8(proto, calibration_images):
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": calibration_images[i:i + 32].astype(np.float32)}
                                 for i in range(0, min(len(calibration_images), 512), 32)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as folder:
        source, prepared, target = (Path(folder) / n for n in ("f.onnx", "p.onnx", "q.onnx"))
        onnx.save(proto, source)
        quant_pre_process(str(source), str(prepared))
        convs = [node.name for node in onnx.load(prepared).graph.node if node.op_type == "Conv"]
        # Per-channel weight scales: one scale per tensor changed too many labels. Only the
        # convolutions after the first become int8 (nearly all the compute): the stain
        # normalization's products were slower in int8 than in float, and the first
        # convolution's input (normalized pixels) loses the most in 8 bits.
        quantize_static(str(prepared), str(target), Reader(), weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8, per_channel=True, op_types_to_quantize=["Conv"],
                        nodes_to_exclude=convs[:1])
        return onnx.load(target)


def write_onnx_copy(model, images: np.ndarray, scores: np.ndarray | None = None) -> Path | None:
    """Export a run's ``model.keras`` to ``model.onnx`` beside it, kept only if it labels
    ``images`` (preprocessed cells, e.g. the run's validation cells) exactly as the Keras
    model does (``scores``: its scores of ``images`` when already computed, as ``train``
    and ``retune`` have them). ``predict --model RUN/model.onnx`` then starts without
    TensorFlow.

    Returns the copy's path, or None when tf2onnx is not installed or the copy is not kept
    (a stale copy from before is removed either way, so none can disagree with the run).
    """
    model = load_model(model)
    out = Path(model.path).with_suffix(".onnx")
    for path in (out, sidecar_path(out)):
        path.unlink(missing_ok=True)
    try:
        import tf2onnx  # noqa: F401
    except ImportError:
        return None
    try:
        export_model(model, out, format="onnx")
        copy = load_model(out)
        reference = model.probability(images) if scores is None else np.asarray(scores).reshape(-1)
        same = np.array_equal(reference >= model.threshold, copy.probability(images) >= copy.threshold)
    except Exception as error:  # noqa: BLE001 - an optional extra: training must not fail on it
        same = False
        warnings.warn(f"{out}: no ONNX copy written ({str(error).splitlines()[0][:200] if str(error) else type(error).__name__})")
    if not same:
        for path in (out, sidecar_path(out)):
            path.unlink(missing_ok=True)
        return None
    return out


def check_parity(reference, exported, data, batch_size: int = 256) -> dict:
    """Compare an export with its Keras model on a labelled folder.

    Returns agreement (share of cells given the same label), both accuracies and
    their difference in points.
    """
    from .datasets import list_cell_images
    from .pipeline import read_images

    reference, exported = load_model(reference), load_model(exported)
    files = list_cell_images(data)
    images, readable, _ = read_images(files.paths, reference.image_size)
    labels = files.labels[readable]
    ours = reference.probability(images, batch_size=batch_size)
    theirs = exported.probability(images, batch_size=batch_size)
    ours_label, theirs_label = ours >= reference.threshold, theirs >= exported.threshold
    accuracy = (ours_label == labels).mean(), (theirs_label == labels).mean()
    return {"n": int(len(labels)), "agreement": float((ours_label == theirs_label).mean()),
            "keras_accuracy": float(accuracy[0]), "export_accuracy": float(accuracy[1]),
            "accuracy_difference_points": float(100 * (accuracy[1] - accuracy[0])),
            "max_probability_difference": float(np.abs(ours - theirs).max())}
