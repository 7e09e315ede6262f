"""Model architectures, each a Keras model that takes uint8-valued RGB cells.

Every model starts with its own preprocessing layers (gray conversion when it was
trained on gray, scaling) and ends with a :class:`CellModelInfo` layer that carries the
operating threshold and the recipe, so a saved ``.keras`` file alone is enough to
predict correctly anywhere.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import keras
from keras import layers

from .config import COLORS, MODEL_NAMES, check_choice, check_image_size
from .errors import MalariaCellsError


@keras.saving.register_keras_serializable(package="malaria_cells")
class Grayscale(layers.Layer):
    """RGB -> luma (ITU-R BT.601, the weights OpenCV's grayscale read uses)."""

    def call(self, inputs):
        weights = keras.ops.convert_to_tensor([0.299, 0.587, 0.114], dtype=inputs.dtype)
        return keras.ops.sum(inputs * weights, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 1)


@keras.saving.register_keras_serializable(package="malaria_cells")
class StainNormalization(layers.Layer):
    """Divide each channel by its mean over the cell (the non-black pixels).

    Slides differ in stain colour and brightness (some patients' cells are violet, most
    pink); dividing out each cell's own mean colour removes that cast while keeping what
    differs inside the cell, such as a dark parasite. The black surround stays 0.
    """

    def __init__(self, floor: float = 20.0, **kwargs):
        super().__init__(**kwargs)
        self.floor = float(floor)

    by_planes = True
    """Which of two formulations ``call`` traces; they give the same numbers (tested). Per-channel
    planes, stacked channels-first: the fastest in TensorFlow and onnxruntime. Products with the
    (pixels, channels) matrix: the fastest in TFLite, whose strided slices are slow; TFLite
    exports are traced with it (:func:`stain_normalization_by_matrices`, which sets it on one
    model's layers only)."""

    def call(self, inputs):
        return self._by_planes(inputs) if self.by_planes else self._by_matrices(inputs)

    def _by_planes(self, inputs):
        ops = keras.ops
        height, width, channels = inputs.shape[1:]
        # Every step is a contiguous elementwise op, and the final transpose cancels the one the
        # ONNX export puts before the first convolution.
        pixels = ops.reshape(inputs, (-1, height * width, channels))
        planes = [pixels[..., k] for k in range(channels)]
        brightest = planes[0]
        for plane in planes[1:]:
            brightest = ops.maximum(brightest, plane)
        cell = ops.cast(brightest > self.floor, inputs.dtype)
        area = ops.maximum(ops.sum(cell, axis=-1, keepdims=True), 1.0)
        scaled = [plane * (0.5 / ops.maximum(ops.sum(plane * cell, axis=-1, keepdims=True) / area, 1.0))
                  for plane in planes]
        return ops.transpose(ops.reshape(ops.stack(scaled, axis=1), (-1, channels, height, width)), (0, 2, 3, 1))

    def _by_matrices(self, inputs):
        ops = keras.ops
        height, width, channels = inputs.shape[1:]
        pixels = ops.reshape(inputs, (-1, height * width, channels))
        cell = ops.cast(ops.max(pixels, axis=-1) > self.floor, inputs.dtype)
        area = ops.maximum(ops.sum(cell, axis=-1), 1.0)
        # One matrix product sums each channel over the cell, and the scaling is a product with
        # a diagonal matrix (exact zeros elsewhere), cheaper than a broadcast multiply.
        totals = ops.squeeze(ops.matmul(ops.expand_dims(cell, 1), pixels), 1)
        scale = 0.5 / ops.maximum(totals / ops.expand_dims(area, -1), 1.0)
        diagonal = ops.eye(channels, dtype=inputs.dtype) * ops.expand_dims(scale, 1)
        return ops.reshape(ops.matmul(pixels, diagonal), ops.shape(inputs))

    def get_config(self):
        return {**super().get_config(), "floor": self.floor}


@contextlib.contextmanager
def stain_normalization_by_matrices(model: keras.Model | layers.Layer):
    """Within the block, the :class:`StainNormalization` layers of ``model`` (a model or one
    such layer) trace their matrix-product form (for TFLite); other models are not touched."""
    found = [model] if isinstance(model, StainNormalization) else [
        layer for layer in getattr(model, "layers", []) if isinstance(layer, StainNormalization)]
    for layer in found:
        layer.by_planes = False
    try:
        yield
    finally:
        for layer in found:
            del layer.by_planes  # back to the class default


@keras.saving.register_keras_serializable(package="malaria_cells")
class CellModelInfo(layers.Layer):
    """Identity layer whose config holds the operating threshold and model metadata."""

    def __init__(self, threshold: float = 0.5, info: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.info = dict(info or {})

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold, "info": self.info}


# --------------------------------------------------------------------------- bodies


def tutorial_body(x):
    """The tutorial's network: 3 x [Conv 64 3x3, ReLU, MaxPool], Dense 64, Dense 64."""
    for _ in range(3):
        x = layers.Conv2D(64, 3, activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    return layers.Dense(64, activation="relu")(x)


def _conv_bn(x, filters, kernel_size=3, strides=1):
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    return layers.Activation("relu")(x)


def cellnet_body(x, widths=(24, 32, 64, 128)):
    """A small VGG-style CNN sized for laptop CPUs.

    A stride-2 stem (its 3x3 kernel still sees every pixel), then max pooling before
    each stage of two conv-BN-ReLU layers: the stages run at 1/4, 1/8 and 1/16 of the
    input side, so a 64 px cell costs about 12 M multiply-adds.
    """
    x = _conv_bn(x, widths[0], strides=2)
    for width in widths[1:]:
        x = layers.MaxPooling2D(2)(x)
        x = _conv_bn(x, width)
        x = _conv_bn(x, width)
    x = layers.GlobalAveragePooling2D()(x)
    return layers.Dropout(0.3)(x)


def _keras_application(constructor: Callable, scale_to: str) -> Callable:
    """Wrap a Keras Applications backbone; ``scale_to`` is the input range it expects."""

    def body(x, weights=None):
        if x.shape[-1] == 1:
            x = layers.Concatenate()([x, x, x])
        if scale_to == "0-255":
            x = layers.Rescaling(255.0)(x)
        elif scale_to == "-1-1":
            x = layers.Rescaling(2.0, offset=-1.0)(x)
        try:
            backbone = constructor(
                include_top=False, weights=weights, input_shape=tuple(x.shape[1:]), pooling="avg"
            )
        except Exception as error:  # download failures come in many types
            if weights == "imagenet":
                raise MalariaCellsError(
                    "could not download the ImageNet weights (no internet?): download "
                    "them on a connected machine, copy the .h5/.weights.h5 file here and "
                    "pass its path with --weights PATH, or use --weights none"
                ) from error
            raise
        return layers.Dropout(0.2)(backbone(x))

    return body


def _applications() -> dict[str, Callable]:
    apps = keras.applications
    return {
        "mobilenetv3small": _keras_application(
            lambda **kw: apps.MobileNetV3Small(include_preprocessing=False, **kw), "-1-1"
        ),
        "mobilenetv3large": _keras_application(
            lambda **kw: apps.MobileNetV3Large(include_preprocessing=False, **kw), "-1-1"
        ),
        "efficientnetv2b0": _keras_application(
            lambda **kw: apps.EfficientNetV2B0(include_preprocessing=False, **kw), "-1-1"
        ),
    }


def cellnet_slim_body(x):
    """``cellnet`` with narrower stages (16/24/48/96): about 1.5x the speed on a CPU."""
    return cellnet_body(x, widths=(16, 24, 48, 96))


def cellnet_lite_body(x):
    """``cellnet-slim`` with 16 channels in its first stage (16/16/48/96), for speed.

    CPUs with AVX-512 compute convolutions on blocks of 16 channels (onnxruntime's NCHWc
    kernels), so slim's 24-channel stage runs as 32 channels.
    """
    return cellnet_body(x, widths=(16, 16, 48, 96))


BODIES: dict[str, Callable] = {"tutorial": tutorial_body, "cellnet": cellnet_body,
                               "cellnet-slim": cellnet_slim_body, "cellnet-lite": cellnet_lite_body}


def build_model(
    name: str = "cellnet-slim",
    *,
    image_size: int = 64,
    color: str = "rgb",
    weights: str | None = None,
    stain_normalization: bool = False,
    threshold: float = 0.5,
    info: dict | None = None,
) -> keras.Model:
    """Build an untrained cell classifier.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`.
    image_size : int
        Side of the square input, in pixels.
    color : {"rgb", "gray"}
        Colour the network sees; the input is always RGB and converted inside.
    weights : {None, "imagenet"} or path
        Starting weights for Keras Applications backbones (``None``: random). A path
        is a weights file saved from the same backbone.
    stain_normalization : bool
        Scale each cell by its own mean colour (:class:`StainNormalization`) instead
        of a fixed 1/255.
    threshold : float
        Probability above which a cell is called Parasitized; stored in the model.
    info : dict, optional
        Metadata stored in the model (recipe, data, versions).

    Returns
    -------
    keras.Model
        Input: float RGB pixels 0-255 of shape (image_size, image_size, 3).
        Output: probability of Parasitized, shape (1,).
    """
    check_choice(color, COLORS, "colour")
    check_image_size(image_size)
    check_choice(name, MODEL_NAMES, "model")
    applications = _applications()
    if weights not in (None, "none") and name not in applications:
        raise MalariaCellsError(f"--weights applies to Keras Applications models only, not {name!r}")

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = Grayscale(name="grayscale")(inputs) if color == "gray" else inputs
    if stain_normalization:
        x = StainNormalization(name="stain_normalization")(x)
    else:
        x = layers.Rescaling(1.0 / 255, name="scale")(x)
    if name in applications:
        x = applications[name](x, weights="imagenet" if weights == "imagenet" else None)
    else:
        x = BODIES[name](x)
    outputs = layers.Dense(1, activation="sigmoid", name="parasitized", dtype="float32")(x)
    outputs = CellModelInfo(threshold, info, name="info")(outputs)
    model = keras.Model(inputs, outputs, name=name)
    if weights not in (None, "none", "imagenet"):
        _load_backbone_weights(model, weights)
    return model


def average_models(models: list[keras.Model], *, threshold: float = 0.5, info: dict | None = None,
                   name: str = "ensemble") -> keras.Model:
    """One model whose probability is the mean of ``models``' probabilities.

    Members trained alike from different seeds make different mistakes on the rare,
    ambiguous cell (a stain speck, a pale overlap); their mean is steadier than any one of
    them, and it is still a single model file that carries its own preprocessing, threshold
    and metadata, and exports to ONNX or TFLite as one graph.

    Parameters
    ----------
    models : list of keras.Model
        Trained malaria-cells models with the same input shape (copied, not changed).
    threshold, info
        As in :func:`build_model`.
    """
    if not models:
        raise MalariaCellsError("an ensemble needs at least one model")
    shape = models[0].input_shape[1:]
    if any(m.input_shape[1:] != shape for m in models):
        raise MalariaCellsError(f"ensemble members differ in input shape: {[m.input_shape for m in models]}")
    inputs = keras.Input(shape, name="image")
    outputs = []
    for number, model in enumerate(models):
        member = keras.models.clone_model(model)
        member.set_weights(model.get_weights())
        member.name = f"member_{number}"
        outputs.append(member(inputs))
    x = layers.Average(name="mean")(outputs) if len(outputs) > 1 else outputs[0]
    outputs = CellModelInfo(threshold, info, name="info")(x)
    return keras.Model(inputs, outputs, name=name)


def _load_backbone_weights(model: keras.Model, path: str) -> None:
    from pathlib import Path

    if not Path(path).is_file():
        raise MalariaCellsError(f"{path}: weights file not found (use imagenet, none or a file path)")
    backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    try:
        backbone.load_weights(path, skip_mismatch=False)
    except Exception as error:
        raise MalariaCellsError(
            f"{path}: cannot load as {backbone.name} weights ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]})"
        ) from error


def fuse_batch_norm(model: keras.Model) -> keras.Model:
    """An inference-only twin of ``model`` with each Conv2D -> BatchNormalization merged.

    At inference a batch norm is a fixed per-channel scale and shift, so it folds into
    the convolution before it (and the ReLU after it into the same layer), saving two
    passes over every feature map. The outputs agree to float rounding. Models that are
    not a plain chain of layers (Keras Applications backbones) come back as they are. The
    original is left untouched; the twin's weights are a copy taken now (fuse after training).
    """
    chain = model.layers
    if not _is_chain(chain):
        return model
    x = inputs = keras.Input(model.input_shape[1:], dtype=model.inputs[0].dtype, name=chain[0].name)
    index = 1
    while index < len(chain):
        layer, following = chain[index], chain[index + 1 : index + 3]
        if not (isinstance(layer, layers.Conv2D) and layer.get_config()["activation"] == "linear" and following
                and isinstance(following[0], layers.BatchNormalization) and following[0].axis in (-1, 3)):
            copy = layer.__class__.from_config(layer.get_config())  # reusing it would change the original
            x = copy(x)
            copy.set_weights(layer.get_weights())
            index += 1
            continue
        norm, config = following[0], layer.get_config()
        activation = None
        if len(following) == 2 and isinstance(following[1], layers.Activation):
            activation = following[1].get_config()["activation"]
        kernel, *bias = layer.get_weights()
        gamma = keras.ops.convert_to_numpy(norm.gamma) if norm.scale else 1.0
        beta = keras.ops.convert_to_numpy(norm.beta) if norm.center else 0.0
        scale = gamma / (keras.ops.convert_to_numpy(norm.moving_variance) + norm.epsilon) ** 0.5
        shift = beta + ((bias[0] if bias else 0.0) - keras.ops.convert_to_numpy(norm.moving_mean)) * scale
        fused = layers.Conv2D.from_config({**config, "use_bias": True, "activation": activation,
                                           "name": f"{layer.name}_fused"})
        x = fused(x)
        fused.set_weights([kernel * scale, shift])
        index += 3 if activation else 2
    return keras.Model(inputs, x, name=model.name)


def _is_chain(chain: list) -> bool:
    """Does each layer take the output of the one before it, and only that?"""
    try:
        return all(layer.input is before.output for before, layer in zip(chain, chain[1:]))
    except (AttributeError, ValueError):  # a layer used twice has no single input
        return False


def model_info_layer(model: keras.Model) -> CellModelInfo | None:
    """The :class:`CellModelInfo` layer of a malaria-cells model (None for others)."""
    for layer in model.layers:
        if isinstance(layer, CellModelInfo):
            return layer
    return None
