"""Why a cell was flagged: heat maps of what drove the classifier's score.

Two methods, one output: a float32 heat map per crop, ``(n, size, size)`` in [0, 1], 1 where
the evidence for Parasitized is strongest, 0 outside the cell.

- :func:`grad_cam`: Grad-CAM (Selvaraju et al., 2017) for Keras models. One forward and one
  backward pass per batch; the map has the resolution of the last convolutional feature map
  (4 x 4 for a 64 px ``cellnet`` model: each of its cells covers a 16 px square), upsampled.
- :func:`occlusion`: occlusion sensitivity (Zeiler & Fergus, 2014) for any runtime (Keras,
  ONNX, LiteRT, or any object with a ``probability(images)`` method). Each crop is scored again
  with a square patch of the cell painted over in the cell's own median colour; the score drop
  is the heat. One network call per patch position, batched across positions and crops.
- :func:`explain` picks Grad-CAM for Keras models and occlusion for the others;
  :func:`heat_overlay` blends a heat map onto its crop for a report.

Crops are what screening cuts (:func:`malaria_cells.fields.crops.crop_cells`) and the models
read: uint8 RGB ``(n, size, size, 3)``, black outside the cell.
"""

from __future__ import annotations

import threading

import numpy as np

from .errors import MalariaCellsError

__all__ = ["CELL_FLOOR", "COLORMAPS", "METHODS", "cell_mask", "explain", "grad_cam", "heat_overlay", "occlusion"]

CELL_FLOOR = 20
"""A pixel belongs to the cell when its brightest channel exceeds this (0-255): the floor the
models' own :class:`malaria_cells.models.StainNormalization` layer uses for the black surround."""

METHODS = ("auto", "grad-cam", "occlusion")
"""The values of :func:`explain`'s ``method``."""

COLORMAPS = ("turbo", "jet", "inferno", "magma", "plasma", "viridis", "hot")
"""Colour maps :func:`heat_overlay` offers (OpenCV's of the same names)."""

_SCORES = ("logit", "probability")
_LOGIT_EPS = 1e-6
_keras_lock = threading.Lock()  # grad_cam briefly wraps two layers of a model: one call at a time


# --------------------------------------------------------------------------- validation


def _check_crops(crops, image_size: int | None = None, name: str = "crops") -> np.ndarray:
    if not isinstance(crops, np.ndarray):
        raise MalariaCellsError(f"{name} must be a numpy array, got {type(crops).__name__}")
    if crops.dtype != np.uint8:
        raise MalariaCellsError(f"{name} must be uint8 RGB pixels 0-255, got dtype {crops.dtype}")
    if crops.ndim != 4 or crops.shape[3] != 3 or crops.shape[1] != crops.shape[2] or crops.shape[1] == 0:
        raise MalariaCellsError(f"{name} must have shape (n, size, size, 3), got {crops.shape}")
    if image_size is not None and crops.shape[1] != image_size:
        raise MalariaCellsError(f"{name} are {crops.shape[1]} px but the model takes {image_size} px cells "
                                f"(cut them at the model's image_size)")
    return crops


def _check_int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise MalariaCellsError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return int(value)


def _check_choice(value, choices, name: str) -> str:
    if value not in choices:
        raise MalariaCellsError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def cell_mask(crops: np.ndarray, *, floor: int = CELL_FLOOR) -> np.ndarray:
    """The cell's pixels in each crop: those whose brightest channel exceeds ``floor``.

    Parameters
    ----------
    crops : numpy.ndarray of uint8
        One crop ``(size, size, 3)`` or many ``(n, size, size, 3)``, black outside the cell.
    floor : int
        Brightest-channel level (0-255) at or below which a pixel is the black surround.

    Returns
    -------
    numpy.ndarray of bool
        ``crops``' shape without its channel axis.
    """
    if not isinstance(crops, np.ndarray) or crops.dtype != np.uint8 or crops.ndim not in (3, 4) \
            or crops.shape[-1] != 3:
        raise MalariaCellsError(f"crops must be uint8 RGB of shape (size, size, 3) or (n, size, size, 3), "
                                f"got {getattr(crops, 'dtype', type(crops).__name__)} "
                                f"{getattr(crops, 'shape', '')}".rstrip())
    floor = _check_int(floor, "floor", 0, 254)
    return crops.max(axis=-1) > floor


def _finish(heat: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Clip at 0, zero outside ``mask``, scale each map to a maximum of 1 (all-zero maps stay 0)."""
    heat = np.maximum(np.nan_to_num(heat, nan=0.0, posinf=0.0, neginf=0.0), 0.0).astype(np.float32)
    if mask is not None:
        heat *= mask
    peak = heat.reshape(len(heat), -1).max(axis=1, initial=0.0)
    heat /= np.where(peak > 0, peak, 1.0)[:, None, None]
    return heat


# --------------------------------------------------------------------------- Grad-CAM


def _keras_network(classifier):
    """The keras.Model behind ``classifier`` (a KerasClassifier or a keras.Model), or an error."""
    network = getattr(classifier, "keras_model", None)
    if network is None:
        import keras

        if isinstance(classifier, keras.Model):
            return classifier
        runtime = getattr(classifier, "runtime", type(classifier).__name__)
        raise MalariaCellsError(f"Grad-CAM needs a Keras model, not {runtime}: use occlusion (method='occlusion')")
    return network


def _flat_layers(model) -> list:
    """Every leaf layer of ``model`` in order, nested models (a backbone, ensemble members) opened."""
    import keras

    out = []
    for layer in model.layers:
        out += _flat_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return out


def _output_shape(layer):
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):  # never called, or shared (no single output)
        return None


def _feature_layer(model, name: str | None, min_side: int | None = None):
    """The layer whose output Grad-CAM weighs: ``name``, or the last convolutional feature map
    (with ``min_side``, the last one at least that many pixels a side)."""
    from keras import layers

    flat = _flat_layers(model)
    if name is not None:
        found = [layer for layer in flat if layer.name == name]
        if not found:
            raise MalariaCellsError(f"layer {name!r} not found in model {model.name!r}")
        shape = _output_shape(found[0])
        if shape is None or len(shape) != 4:
            raise MalariaCellsError(f"layer {name!r} has no (batch, height, width, channels) output: {shape}")
        return found[0]
    convolutions = (layers.Conv2D, layers.DepthwiseConv2D, layers.SeparableConv2D)
    side = 2 if min_side is None else min_side
    seen_convolution, chosen = False, None
    for layer in flat:
        seen_convolution = seen_convolution or isinstance(layer, convolutions)
        shape = _output_shape(layer)
        # The preprocessing layers (scaling, stain normalization) come before every convolution.
        if seen_convolution and shape is not None and len(shape) == 4 and shape[1] >= side and shape[2] >= side:
            chosen = layer
    if chosen is None:
        wanted = "" if min_side is None else f" of at least {min_side} px a side"
        raise MalariaCellsError(f"model {model.name!r} has no convolutional feature map{wanted} for Grad-CAM")
    return chosen


def _sigmoid_dense(model):
    """The single Dense layer with a sigmoid (whose input to the sigmoid is the logit), or None."""
    import keras
    from keras import layers

    found = [layer for layer in _flat_layers(model) if isinstance(layer, layers.Dense)
             and getattr(layer, "activation", None) is keras.activations.sigmoid]
    return found[0] if len(found) == 1 else None


class _Capture:
    """While open, record the output of ``feature`` and the logit entering ``dense``'s sigmoid."""

    def __init__(self, feature, dense):
        self.feature, self.dense, self.values = feature, dense, {}

    def __enter__(self):
        feature_call, values = self.feature.call, self.values

        def call(*args, **kwargs):
            values["features"] = output = feature_call(*args, **kwargs)
            return output

        self._had_call = "call" in vars(self.feature)
        self._call = feature_call
        self.feature.call = call
        if self.dense is not None:
            sigmoid = self._activation = self.dense.activation

            def activation(logit):
                values["logit"] = logit
                return sigmoid(logit)

            self.dense.activation = activation
        return self

    def __exit__(self, *exc):
        if self._had_call:
            self.feature.call = self._call
        else:
            del self.feature.call
        if self.dense is not None:
            self.dense.activation = self._activation


def grad_cam(classifier, crops: np.ndarray, *, layer: str | None = None, min_side: int | None = None,
             cell_only: bool = True, floor: int = CELL_FLOOR, batch_size: int = 64) -> np.ndarray:
    """Grad-CAM heat maps: where the last convolutional features raise the Parasitized score.

    Each feature channel of the chosen layer is weighted by the mean gradient of the score
    with respect to it; the positive part of the weighted sum, upsampled (bilinear) to the
    crop, is the heat. The score is the logit of Parasitized (the input of the model's sigmoid,
    so a confident cell's gradient does not vanish); for models without a single sigmoid output
    layer (an ensemble), the output probability. The models' preprocessing (scaling, stain
    normalization) is inside them: crops go in as they are.

    Parameters
    ----------
    classifier : malaria_cells.runtimes.KerasClassifier or keras.Model
        A Keras model (``load_model("model.keras")``). ONNX and LiteRT models have no
        gradients: use :func:`occlusion`.
    crops : numpy.ndarray of uint8, shape (n, size, size, 3)
        RGB cell crops at the model's input size, black outside the cell.
    layer : str, optional
        Name of the layer whose output to weigh (searched in nested models too). Default: the
        last layer with a spatial output (height and width above 1) after the first
        convolution, i.e. the last convolutional feature map after its activation.
    min_side : int, optional
        Instead of the last feature map, the last one at least this many pixels a side (2 to
        the crop size; not with ``layer``). The last map is the most class-specific but the
        coarsest: 4 x 4 in a 64 px ``cellnet`` model, whose 16 px squares are larger than a
        ring-stage parasite; ``min_side=16`` takes the map after the first stage, which
        localizes small parasites better (``benchmarks/heatmap_check.py`` measures both).
    cell_only : bool
        Set the heat to 0 outside the cell (pixels at or below ``floor``) before scaling.
    floor : int
        Brightest-channel level (0-255) at or below which a pixel is outside the cell.
    batch_size : int
        Crops per forward and backward pass (bounds memory).

    Returns
    -------
    numpy.ndarray of float32, shape (n, size, size)
        Heat in [0, 1], each map scaled to a maximum of 1; a map with no positive evidence is
        all 0. ``n == 0`` gives an empty array.

    Notes
    -----
    To read the feature map and the logit, the chosen layer and the sigmoid layer of the model
    are wrapped for the length of the call (one call at a time, behind a lock); a
    :class:`~malaria_cells.runtimes.KerasClassifier` scores through its own fused copy of the
    network, which is never touched.

    Raises
    ------
    MalariaCellsError
        For a model that is not Keras, crops that are not uint8 ``(n, size, size, 3)`` at the
        model's input size, a ``layer`` that is missing or not a feature map, a bad parameter.
    """
    import tensorflow as tf

    network = _keras_network(classifier)
    size = network.input_shape[1]
    crops = _check_crops(crops, size)
    batch_size = _check_int(batch_size, "batch_size", 1, 2**16)
    floor = _check_int(floor, "floor", 0, 254)
    if min_side is not None:
        min_side = _check_int(min_side, "min_side", 2, size)
        if layer is not None:
            raise MalariaCellsError("give layer or min_side, not both")
    if len(crops) == 0:
        return np.zeros((0, size, size), np.float32)
    feature, dense = _feature_layer(network, layer, min_side), _sigmoid_dense(network)
    maps = []
    with _keras_lock, _Capture(feature, dense) as capture:
        for start in range(0, len(crops), batch_size):
            images = tf.convert_to_tensor(crops[start:start + batch_size], tf.float32)
            with tf.GradientTape() as tape:
                probability = network(images, training=False)
                features = capture.values["features"]
                score = capture.values["logit"] if dense is not None else probability
            gradients = tape.gradient(score, features)
            if gradients is None:  # the score does not depend on this layer
                raise MalariaCellsError(f"the model's score does not depend on layer {feature.name!r}")
            weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
            maps.append(tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy())
    import cv2

    coarse = np.concatenate(maps).astype(np.float32)
    heat = np.stack([cv2.resize(item, (size, size), interpolation=cv2.INTER_LINEAR) for item in coarse])
    return _finish(heat, cell_mask(crops, floor=floor) if cell_only else None)


# --------------------------------------------------------------------------- occlusion


def _patch_masks(size: int, patch_size: int, stride: int) -> np.ndarray:
    """One boolean (size, size) square per patch position; the last row and column touch the edge."""
    starts = list(range(0, size - patch_size + 1, stride))
    if starts[-1] != size - patch_size:
        starts.append(size - patch_size)
    masks = np.zeros((len(starts) ** 2, size, size), bool)
    for index, (y, x) in enumerate((y, x) for y in starts for x in starts):
        masks[index, y:y + patch_size, x:x + patch_size] = True
    return masks


def _scores(classifier, images: np.ndarray, score: str) -> np.ndarray:
    probability = np.asarray(classifier.probability(images), dtype=np.float64).reshape(-1)
    if len(probability) != len(images):
        raise MalariaCellsError(f"classifier.probability gave {len(probability)} scores for {len(images)} images")
    if score == "probability":
        return probability
    probability = np.clip(probability, _LOGIT_EPS, 1 - _LOGIT_EPS)
    return np.log(probability) - np.log1p(-probability)


def occlusion(classifier, crops: np.ndarray, *, patch_size: int | None = None, stride: int | None = None,
              score: str = "logit", cell_only: bool = True, floor: int = CELL_FLOOR,
              batch_size: int = 2048) -> np.ndarray:
    """Occlusion-sensitivity heat maps: how much the score drops when a patch of the cell is hidden.

    A ``patch_size`` square slides over each crop in steps of ``stride``; under it the cell's
    pixels (only those: the black surround stays black, so the cell's outline never changes)
    are painted in the cell's own median colour, a plain patch of cytoplasm. Each pixel's heat
    is the mean score drop over the patches that cover it, negative drops clipped to 0.
    Positions that cover no cell pixel are skipped. Cost: one network call per crop per
    position (with the defaults, at most 225 positions for a 64 px crop), run in batches
    across crops.

    Parameters
    ----------
    classifier : malaria_cells.runtimes.CellClassifier or object
        Any model with ``probability(images) -> (n,)`` scores of Parasitized for uint8 crops
        (Keras, ONNX, LiteRT). When it has ``image_size``, crops must be that size.
    crops : numpy.ndarray of uint8, shape (n, size, size, 3)
        RGB cell crops, black outside the cell.
    patch_size : int, optional
        Side of the occluding square in pixels, 1 to size. Default ``max(1, size // 8)`` (8 px
        for 64 px crops: the size of a ring-stage parasite there).
    stride : int, optional
        Step between patch positions in pixels, 1 to ``patch_size`` (every pixel is covered).
        Default ``max(1, patch_size // 2)``.
    score : {"logit", "probability"}
        What the drop is measured on. The logit keeps confident cells informative (a
        probability of 0.9999 barely moves when the parasite is hidden; its logit does).
    cell_only : bool
        Set the heat to 0 outside the cell before scaling.
    floor : int
        Brightest-channel level (0-255) at or below which a pixel is outside the cell.
    batch_size : int
        Occluded copies handed to ``classifier.probability`` at once (bounds memory: 12 kB each
        at 64 px).

    Returns
    -------
    numpy.ndarray of float32, shape (n, size, size)
        Heat in [0, 1], each map scaled to a maximum of 1; a map is all 0 where no patch lowers
        the score (or the crop holds no cell). ``n == 0`` gives an empty array.

    Raises
    ------
    MalariaCellsError
        For crops that are not uint8 ``(n, size, size, 3)`` (at the model's size), a classifier
        without ``probability``, or a bad parameter.
    """
    if not callable(getattr(classifier, "probability", None)):
        raise MalariaCellsError(f"classifier must have a probability(images) method, got {type(classifier).__name__}")
    crops = _check_crops(crops, getattr(classifier, "image_size", None))
    size = crops.shape[1]
    patch_size = _check_int(max(1, size // 8) if patch_size is None else patch_size, "patch_size", 1, size)
    stride = _check_int(max(1, patch_size // 2) if stride is None else stride, "stride", 1, patch_size)
    score = _check_choice(score, _SCORES, "score")
    floor = _check_int(floor, "floor", 0, 254)
    batch_size = _check_int(batch_size, "batch_size", 1, 2**20)
    if len(crops) == 0:
        return np.zeros((0, size, size), np.float32)

    patches = _patch_masks(size, patch_size, stride)
    coverage = patches.sum(axis=0, dtype=np.float64)
    masks = cell_mask(crops, floor=floor)
    base = _scores(classifier, crops, score)
    drops = np.zeros((len(crops), size, size))
    pending: list[tuple[int, np.ndarray]] = []  # (crop, patch positions) whose copies are in `buffer`
    buffer: list[np.ndarray] = []

    def flush():
        if not buffer:
            return
        scores = _scores(classifier, np.concatenate(buffer), score)
        offset = 0
        for row, positions in pending:
            lost = base[row] - scores[offset:offset + len(positions)]
            drops[row] += np.tensordot(lost, patches[positions], axes=1)
            offset += len(positions)
        pending.clear()
        buffer.clear()

    held = 0
    for row, (crop, mask) in enumerate(zip(crops, masks)):
        if not mask.any():
            continue
        positions = np.flatnonzero((patches & mask).any(axis=(1, 2)))
        median = np.median(crop[mask], axis=0).round().astype(np.uint8)
        for chunk in np.array_split(positions, -(-len(positions) // batch_size)):
            if held + len(chunk) > batch_size:
                flush()
                held = 0
            copies = np.repeat(crop[None], len(chunk), axis=0)
            copies[patches[chunk] & mask] = median
            buffer.append(copies)
            pending.append((row, chunk))
            held += len(chunk)
    flush()
    return _finish(drops / coverage, masks if cell_only else None)


# --------------------------------------------------------------------------- both


def explain(classifier, crops: np.ndarray, method: str = "auto", **options) -> np.ndarray:
    """Heat maps of what drove the classifier's Parasitized score, one per crop.

    Parameters
    ----------
    classifier : malaria_cells.runtimes.CellClassifier
        The model that scored the crops.
    crops : numpy.ndarray of uint8, shape (n, size, size, 3)
        RGB cell crops at the model's input size, black outside the cell.
    method : {"auto", "grad-cam", "occlusion"}
        ``"auto"``: :func:`grad_cam` for a Keras model (one forward and backward pass), else
        :func:`occlusion` (ONNX, LiteRT, any object with ``probability``).
    **options
        Keyword parameters of the chosen method (for ``"auto"``, those it resolves to; the
        parameters both share, ``cell_only`` and ``floor``, always fit).

    Returns
    -------
    numpy.ndarray of float32, shape (n, size, size)
        Heat in [0, 1], 0 outside the cell (unless ``cell_only=False``).

    Raises
    ------
    MalariaCellsError
        For an unknown ``method`` or option, or what the chosen method refuses.
    """
    import inspect

    _check_choice(method, METHODS, "method")
    if method == "auto":
        method = "grad-cam" if getattr(classifier, "keras_model", None) is not None else "occlusion"
    function = grad_cam if method == "grad-cam" else occlusion
    allowed = [name for name, parameter in inspect.signature(function).parameters.items()
               if parameter.kind is parameter.KEYWORD_ONLY]
    for name in options:
        if name not in allowed:
            raise MalariaCellsError(f"{name!r} is not an option of {method} (its options: {', '.join(allowed)})")
    return function(classifier, crops, **options)


def heat_overlay(crop: np.ndarray, heat: np.ndarray, *, alpha: float = 0.6, colormap: str = "turbo",
                 floor: int = CELL_FLOOR) -> np.ndarray:
    """The crop with its heat map blended in, for a report: uint8 RGB of the crop's shape.

    Each cell pixel becomes ``(1 - a) * crop + a * colour``, where ``colour`` is the colour
    map at the pixel's heat and ``a = alpha * heat``: where the heat is 0 the cell shows as it
    is, where it is 1 the colour covers ``alpha`` of it. Outside the cell the heat is taken as 0,
    so the black surround stays the crop's own.

    Parameters
    ----------
    crop : numpy.ndarray of uint8
        One crop ``(size, size, 3)`` or many ``(n, size, size, 3)``, black outside the cell.
    heat : numpy.ndarray of float
        Its heat map(s), ``(size, size)`` or ``(n, size, size)``, values in [0, 1] (as
        :func:`explain` gives; values outside are clipped).
    alpha : float
        Opacity of the colour map where the heat is 1, from 0 to 1.
    colormap : {"turbo", "jet", "inferno", "magma", "plasma", "viridis", "hot"}
        OpenCV colour map the heat is drawn in (low to high: for turbo and jet, blue to red).
    floor : int
        Brightest-channel level (0-255) at or below which a pixel is outside the cell.

    Returns
    -------
    numpy.ndarray of uint8
        RGB, the shape of ``crop``.

    Raises
    ------
    MalariaCellsError
        For a crop that is not uint8 RGB, a heat map of another shape or with NaN, or a bad
        parameter.
    """
    import cv2

    if not isinstance(crop, np.ndarray) or crop.dtype != np.uint8 or crop.ndim not in (3, 4) \
            or crop.shape[-1] != 3:
        raise MalariaCellsError(f"crop must be uint8 RGB (size, size, 3) or (n, size, size, 3), got "
                                f"{getattr(crop, 'dtype', type(crop).__name__)} {getattr(crop, 'shape', '')}".rstrip())
    heat = np.asarray(heat)
    if heat.shape != crop.shape[:-1] or not np.issubdtype(heat.dtype, np.number):
        raise MalariaCellsError(f"heat must be numbers of shape {crop.shape[:-1]} (the crop's), got "
                                f"{heat.dtype} {heat.shape}")
    if np.isnan(heat).any():
        raise MalariaCellsError("heat holds NaN")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not 0 <= alpha <= 1:
        raise MalariaCellsError(f"alpha must be from 0 to 1, got {alpha!r}")
    _check_choice(colormap, COLORMAPS, "colormap")
    heat = np.clip(heat.astype(np.float32), 0.0, 1.0) * cell_mask(crop, floor=floor)
    levels = np.round(heat * 255).astype(np.uint8)
    code = getattr(cv2, f"COLORMAP_{colormap.upper()}")
    colours = cv2.applyColorMap(levels.reshape(-1, levels.shape[-1]), code)[..., ::-1].reshape(crop.shape)
    weight = (float(alpha) * heat)[..., None]
    return np.round(crop * (1.0 - weight) + colours * weight).astype(np.uint8)
