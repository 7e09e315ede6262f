"""Life stage of a cell called Parasitized: ring, trophozoite, schizont or gametocyte.

    python -m malaria_cells.fields.stages train --crops W/field_crops.npz --fields W/fields.json --out M.keras

The stage model reads the crops screening cuts (uint8 RGB, stain-normalised, black outside the
cell) with the frozen convolutional body of the shipped field model: the mean over the cell's 8
rotations and mirrors of the pooled activations of its last two stages (a description that does
not depend on how the cell lies). A multinomial logistic regression on those, with class
weights, gives each stage's probability. The whole, from uint8 pixels to probabilities, is one
Keras model (the regression is a final dense softmax layer), which carries its figures.

With about 170 labelled cells, the figures are leave-slide-out: the fields are cut into blocks
of consecutive names (neighbouring numbers are one slide, as for the field model), each block
is predicted by a model trained on the others, with its regularisation chosen by the same
leave-block-out on those others only. A stage with fewer than ``min_support`` training cells is
listed as too rare to trust (:attr:`StageFigures.too_rare`); the model may still name it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields as dataclass_fields
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import MalariaCellsError
from .truth import STAGES

__all__ = ["STAGES", "STAGE_MODEL", "INFO_KEY", "StageRecipe", "StageFigures", "StageModel", "stage_set",
           "load_field_crops", "cross_validate", "train_stage_model", "load_stage_model", "main"]

STAGE_MODEL = Path(__file__).resolve().parents[1] / "pretrained" / "malaria-cells-stages.keras"
"""The shipped stage model (its figures also in the side-car ``malaria-cells-stages.json``)."""
INFO_KEY = "stages"
"""Where a stage model's ``info`` holds its :class:`StageFigures`."""
_ABSENT = -1e4
"""Bias of a stage the training set lacked: its probability is exactly 0."""


@dataclass(frozen=True)
class StageRecipe:
    """How a stage model is made.

    Parameters
    ----------
    blocks : int
        Leave-slide-out blocks of consecutive fields (:meth:`.training.FieldCrops.block_of`).
    c_grid : tuple of float
        Inverse regularisation strengths tried (kept sorted); the one with the best leave-block-out balanced
        accuracy on the training blocks is used (ties: the strongest regularisation).
    max_class_weight : float
        Class weights are balanced (``n / (stages * count)``), capped at this, so one schizont
        does not weigh as much as forty rings.
    min_support : int
        Stages with fewer training cells are reported as too rare to trust.
    """

    blocks: int = 5
    c_grid: tuple = (0.01, 0.03, 0.1, 0.3, 1.0)
    max_class_weight: float = 5.0
    min_support: int = 10

    def __post_init__(self):
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 2:
            raise MalariaCellsError(f"stage recipe: blocks must be an integer of at least 2, got {self.blocks!r}")
        grid = tuple(self.c_grid)
        if not grid or not all(_is_number(c) and c > 0 for c in grid):
            raise MalariaCellsError(f"stage recipe: c_grid must be positive numbers, got {self.c_grid!r}")
        object.__setattr__(self, "c_grid", tuple(sorted(float(c) for c in grid)))
        if not _is_number(self.max_class_weight) or self.max_class_weight < 1:
            raise MalariaCellsError(f"stage recipe: max_class_weight must be at least 1, got {self.max_class_weight!r}")
        if isinstance(self.min_support, bool) or not isinstance(self.min_support, int) or self.min_support < 1:
            raise MalariaCellsError(f"stage recipe: min_support must be an integer of at least 1, got {self.min_support!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class StageFigures:
    """What a stage model was measured to do, leave-slide-out.

    Parameters
    ----------
    support : dict
        ``{stage: training cells}`` for every stage of :data:`STAGES`.
    recall, precision : dict
        ``{stage: value}`` out-of-fold (None: no cell of that stage, or none called it).
    confusion : list of lists
        Out-of-fold counts, rows the true stage and columns the predicted one, in
        :data:`STAGES` order; each row sums to that stage's support.
    too_rare : list of str
        Stages with fewer than ``min_support`` training cells: their figures (and calls) are
        not to be trusted.
    min_support : int
        The support below which a stage is too rare.
    accuracy : float
        Out-of-fold share of cells given their true stage.
    balanced_accuracy : float or None
        Mean recall over the stages that are not too rare.
    chosen_on : str
        How the figures were measured, in words.
    recipe : dict
        The :class:`StageRecipe` (and per-block choices) that made them.
    extra : dict
        Any further keys a newer version wrote (kept, not interpreted).
    """

    support: dict
    recall: dict
    precision: dict
    confusion: list
    too_rare: list
    min_support: int
    accuracy: float
    balanced_accuracy: float | None = None
    chosen_on: str = ""
    recipe: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("support", "recall", "precision", "recipe", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise MalariaCellsError(f"stage figures: {name} must be a mapping")
        for name in ("support", "recall", "precision"):
            if set(getattr(self, name)) != set(STAGES):
                raise MalariaCellsError(f"stage figures: {name} must name exactly the stages {', '.join(STAGES)}")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in self.support.values()):
            raise MalariaCellsError("stage figures: support must be counts")
        for name in ("recall", "precision"):
            if not all(v is None or (_is_number(v) and 0 <= v <= 1) for v in getattr(self, name).values()):
                raise MalariaCellsError(f"stage figures: {name} must be numbers in [0, 1] or null")
        for name in ("accuracy",) + (("balanced_accuracy",) if self.balanced_accuracy is not None else ()):
            if not _is_number(getattr(self, name)) or not 0 <= getattr(self, name) <= 1:
                raise MalariaCellsError(f"stage figures: {name} must be a number in [0, 1], got {getattr(self, name)!r}")
        matrix = self.confusion
        if not (isinstance(matrix, (list, tuple)) and len(matrix) == len(STAGES) and all(
                isinstance(row, (list, tuple)) and len(row) == len(STAGES)
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in row) for row in matrix)):
            raise MalariaCellsError(f"stage figures: confusion must be {len(STAGES)}x{len(STAGES)} counts")
        if [sum(row) for row in matrix] != [self.support[s] for s in STAGES]:
            raise MalariaCellsError("stage figures: each confusion row must sum to its stage's support")
        if not isinstance(self.too_rare, (list, tuple)) or not set(self.too_rare) <= set(STAGES):
            raise MalariaCellsError(f"stage figures: too_rare must list stages of {', '.join(STAGES)}")
        if isinstance(self.min_support, bool) or not isinstance(self.min_support, int) or self.min_support < 1:
            raise MalariaCellsError(f"stage figures: min_support must be a positive integer, got {self.min_support!r}")

    @classmethod
    def from_info(cls, info: dict | None) -> StageFigures | None:
        """The figures a model's ``info`` carries (None where it carries none).

        Raises
        ------
        MalariaCellsError
            When they are present but malformed.
        """
        data = info.get(INFO_KEY) if isinstance(info, dict) else None
        if data is None:
            return None
        if not isinstance(data, dict):
            raise MalariaCellsError(f"stage figures: expected a mapping, got {type(data).__name__}")
        known = {item.name for item in dataclass_fields(cls)} - {"extra"}
        required = {item.name for item in dataclass_fields(cls)
                    if item.default is MISSING and item.default_factory is MISSING}
        missing = required - set(data)
        if missing:
            raise MalariaCellsError(f"stage figures: missing {', '.join(sorted(missing))}")
        return cls(**{key: data[key] for key in known if key in data},
                   extra={key: value for key, value in data.items() if key not in known})

    def to_info(self) -> dict:
        """The JSON form stored as ``info["stages"]`` (what :meth:`from_info` reads back)."""
        data = asdict(self)
        extra = data.pop("extra")
        return {**data, "confusion": [list(row) for row in self.confusion], "too_rare": list(self.too_rare), **extra}

    def table(self) -> str:
        """The per-stage figures and the confusion matrix as plain text."""
        def cell(value):
            return "-" if value is None else f"{value:.2f}"

        lines = [f"{'stage':<12} {'support':>7} {'recall':>6} {'precision':>9}  note"]
        for stage in STAGES:
            note = "too rare to trust" if stage in self.too_rare else ""
            lines.append(f"{stage:<12} {self.support[stage]:>7} {cell(self.recall[stage]):>6} "
                         f"{cell(self.precision[stage]):>9}  {note}".rstrip())
        lines.append(f"accuracy {self.accuracy:.3f}, balanced accuracy (stages not too rare) "
                     f"{cell(self.balanced_accuracy)}")
        lines.append("confusion (rows true, columns predicted): " + " ".join(s[:5] for s in STAGES))
        lines += [f"{stage:<12} " + " ".join(f"{n:>5}" for n in row) for stage, row in zip(STAGES, self.confusion)]
        return "\n".join(lines)


# --------------------------------------------------------------------------- the network


@lru_cache(maxsize=1)
def _dihedral_view_class():
    """The ``DihedralView`` layer class, defined (and registered with Keras) on first use, so
    that importing this module does not import TensorFlow."""
    import keras

    @keras.saving.register_keras_serializable(package="malaria_cells")
    class DihedralView(keras.layers.Layer):
        """The input turned ``turns`` quarter turns, then mirrored left-right if ``mirror``."""

        def __init__(self, turns: int = 0, mirror: bool = False, **kwargs):
            super().__init__(**kwargs)
            self.turns, self.mirror = int(turns) % 4, bool(mirror)

        def call(self, inputs):
            ops = keras.ops
            x = inputs
            for _ in range(self.turns):
                x = ops.flip(ops.transpose(x, (0, 2, 1, 3)), axis=1)
            return ops.flip(x, axis=2) if self.mirror else x

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "turns": self.turns, "mirror": self.mirror}

    return DihedralView


def _backbone_model(backbone):
    """The Keras network whose convolutional body describes the cells (default: the shipped field
    model, else the shipped cell model) and its name."""
    import keras

    from .. import models  # noqa: F401 - registers the custom layers
    from ..runtimes import DEFAULT_MODEL, FIELD_MODEL

    if isinstance(backbone, keras.Model):
        return backbone, backbone.name
    path = Path(backbone) if backbone is not None else (FIELD_MODEL if FIELD_MODEL.is_file() else DEFAULT_MODEL)
    if path.suffix != ".keras" or not path.is_file():
        raise MalariaCellsError(f"{path}: the stage model needs a .keras cell model as its backbone")
    try:
        return keras.saving.load_model(path, compile=False), path.name
    except Exception as error:  # noqa: BLE001 - a broken file can fail in many ways
        raise MalariaCellsError(f"{path}: cannot load model ({str(error).strip().splitlines()[0][:200]})") from None


def _feature_layers(network) -> list:
    """The last layer at each of the two coarsest spatial resolutions of ``network``."""
    last = {}
    for layer in network.layers:
        shape = getattr(layer, "output", None) is not None and layer.output.shape
        if shape and len(shape) == 4 and shape[1] is not None and shape[1] < network.input_shape[1]:
            last[shape[1]] = layer
    if len(last) < 2:
        raise MalariaCellsError(f"{network.name}: no convolutional body with two resolutions to describe cells by")
    return [last[side] for side in sorted(last)[:2]][::-1]


def _describer(backbone):
    """A Keras model: uint8-range RGB cells ``(n, S, S, 3)`` to their rotation-invariant description."""
    import keras
    from keras import layers

    network, source = _backbone_model(backbone)
    chosen = _feature_layers(network)
    body = keras.Model(network.inputs, layers.Concatenate(name="description")(
        [layers.GlobalAveragePooling2D(name=f"pool_{k}")(layer.output) for k, layer in enumerate(chosen)]),
        name="cell_body")
    body.trainable = False
    view = _dihedral_view_class()
    inputs = keras.Input(network.input_shape[1:], name="image")
    described = [body(view(turns, mirror, name=f"view_{turns}{'m' if mirror else ''}")(inputs))
                 for mirror in (False, True) for turns in range(4)]
    describer = keras.Model(inputs, layers.Average(name="mean_of_views")(described), name="stage_describer")
    describer.source = {"backbone": source, "layers": [layer.name for layer in chosen]}
    return describer


def _describe(describer, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
    if len(crops) == 0:
        return np.zeros((0, describer.output_shape[-1]), np.float32)
    return np.concatenate([np.asarray(describer(crops[start:start + batch_size].astype(np.float32), training=False))
                           for start in range(0, len(crops), batch_size)])


# --------------------------------------------------------------------------- the regression


def _class_weights(stages: np.ndarray, cap: float) -> dict:
    present, counts = np.unique(stages, return_counts=True)
    return {int(s): min(cap, len(stages) / (len(present) * n)) for s, n in zip(present, counts)}


def _fit_head(x: np.ndarray, stages: np.ndarray, c: float, recipe: StageRecipe) -> tuple[np.ndarray, np.ndarray]:
    """Standardised multinomial logistic regression, folded into one dense layer's ``(W, b)``
    over all of :data:`STAGES` (stages absent from ``stages`` get probability 0)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(stages)) < 2:
        raise MalariaCellsError("a stage model needs cells of at least two stages to train on")
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    regression = LogisticRegression(C=c, class_weight=_class_weights(stages, recipe.max_class_weight), max_iter=5000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        regression.fit((x - mean) / scale, stages)
    coef, intercept = regression.coef_, regression.intercept_
    if len(regression.classes_) == 2:  # one logit z: the same probabilities as logits (-z/2, z/2)
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weights = np.zeros((x.shape[1], len(STAGES)), np.float32)
    bias = np.full(len(STAGES), _ABSENT, np.float32)
    for row, stage in enumerate(regression.classes_):
        weights[:, stage] = coef[row] / scale
        bias[stage] = intercept[row] - np.sum(coef[row] * mean / scale)
    return weights, bias


def _probabilities(x: np.ndarray, head: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    logits = x @ head[0] + head[1]
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def _leave_group_out(x, stages, groups, c, recipe) -> np.ndarray:
    """Each group's cells predicted by a head fitted on the other groups (-1 where those others
    hold a single stage)."""
    predicted = np.full(len(stages), -1)
    for group in np.unique(groups):
        out = groups == group
        if len(np.unique(stages[~out])) >= 2:
            predicted[out] = _probabilities(x[out], _fit_head(x[~out], stages[~out], c, recipe)).argmax(axis=1)
    return predicted


def _balanced_accuracy(stages, predicted) -> float:
    scored = predicted >= 0
    stages, predicted = stages[scored], predicted[scored]
    return float(np.mean([(predicted[stages == s] == s).mean() for s in np.unique(stages)])) if scored.any() else 0.0


def _choose_c(x, stages, groups, recipe: StageRecipe) -> float:
    """The ``c_grid`` value with the best leave-group-out balanced accuracy (ties: the smallest)."""
    if len(np.unique(groups)) < 2:
        return recipe.c_grid[0]
    scores = [_balanced_accuracy(stages, _leave_group_out(x, stages, groups, c, recipe)) for c in recipe.c_grid]
    return recipe.c_grid[int(np.argmax(scores))]


def _figures(stages, predicted, recipe: StageRecipe, chosen: list, chosen_on: str) -> StageFigures:
    n = len(STAGES)
    confusion = np.zeros((n, n), int)
    np.add.at(confusion, (stages, predicted), 1)
    support = {s: int(confusion[k].sum()) for k, s in enumerate(STAGES)}
    recall = {s: float(confusion[k, k] / confusion[k].sum()) if confusion[k].sum() else None for k, s in enumerate(STAGES)}
    precision = {s: float(confusion[k, k] / confusion[:, k].sum()) if confusion[:, k].sum() else None
                 for k, s in enumerate(STAGES)}
    too_rare = [s for s in STAGES if support[s] < recipe.min_support]
    trusted = [recall[s] for s in STAGES if s not in too_rare and recall[s] is not None]
    return StageFigures(support=support, recall=recall, precision=precision,
                        confusion=[[int(v) for v in row] for row in confusion], too_rare=too_rare,
                        min_support=recipe.min_support, accuracy=float(np.mean(stages == predicted)),
                        balanced_accuracy=float(np.mean(trusted)) if trusted else None, chosen_on=chosen_on,
                        recipe={**asdict(recipe), "c_grid": list(recipe.c_grid), "c_chosen_per_block": chosen})


# --------------------------------------------------------------------------- inputs


def _check_crops(crops, image_size: int | None = None) -> np.ndarray:
    """``crops`` as an array ``(n, S, S, 3)`` of pixel values 0-255 (an empty one for no crops)."""
    try:
        crops = np.asarray(crops)
    except (ValueError, TypeError):
        raise MalariaCellsError("crops must be an array (n, size, size, 3)") from None
    if crops.size == 0 and crops.ndim in (1, 4) and len(crops) == 0:
        side = image_size or (crops.shape[1] if crops.ndim == 4 else 0)
        return np.zeros((0, side, side, 3), np.uint8)
    if crops.ndim != 4 or crops.shape[1] != crops.shape[2] or crops.shape[3] != 3:
        raise MalariaCellsError(f"crops must have shape (n, size, size, 3), got {crops.shape}")
    if image_size is not None and crops.shape[1] != image_size:
        raise MalariaCellsError(f"crops must be {image_size}x{image_size}, got {crops.shape[1]}x{crops.shape[2]}")
    if crops.dtype.kind not in "uif":
        raise MalariaCellsError(f"crops must hold pixel values, got {crops.dtype}")
    if crops.dtype != np.uint8 and not (np.isfinite(crops).all() and crops.min() >= 0 and crops.max() <= 255):
        raise MalariaCellsError("crops must hold pixel values 0-255 (uint8-range RGB, as screening cuts them)")
    return crops


def _check_examples(crops, stages, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated training cells: crops, stage indices into :data:`STAGES`, and groups."""
    crops = _check_crops(crops)
    if len(crops) == 0:
        raise MalariaCellsError("no staged cells to train on")
    stages, groups = np.asarray(stages), np.asarray(groups)
    if stages.shape != (len(crops),) or groups.shape != (len(crops),):
        raise MalariaCellsError(f"stages and groups must each have one entry per crop ({len(crops)}), "
                                f"got {stages.shape} and {groups.shape}")
    unknown = sorted({str(s) for s in stages} - set(STAGES))
    if unknown:
        raise MalariaCellsError(f"unknown stages {', '.join(map(repr, unknown))} (expected {', '.join(STAGES)})")
    return crops, np.array([STAGES.index(str(s)) for s in stages]), groups


def load_field_crops(crops: str | Path, fields: str | Path):
    """The :class:`~.training.FieldCrops` that ``crops`` (``field_crops.npz``) and ``fields``
    (``fields.json``, the fields in the crops' index order) hold, as the crops step wrote them.

    Raises
    ------
    MalariaCellsError
        When either file is missing or unreadable, or they do not belong together.
    """
    from .training import FieldCrops

    crops, fields = Path(crops), Path(fields)
    for path in (crops, fields):
        if not path.is_file():
            raise MalariaCellsError(f"{path}: file not found")
    if crops.parent.resolve() == fields.parent.resolve() and (crops.name, fields.name) == ("field_crops.npz", "fields.json"):
        data = FieldCrops.load(crops.parent)
    else:
        try:
            arrays, meta = np.load(crops), json.loads(fields.read_text(encoding="utf-8"))
            data = FieldCrops(arrays["crops"], arrays["labels"], arrays["stages"], arrays["field"], meta["fields"],
                              meta.get("stain_reference"), meta.get("plasma_reference"))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise MalariaCellsError(f"{crops}, {fields}: not the crops step's files ({error})") from None
    if len(data.field) and (data.field.min() < 0 or data.field.max() >= len(data.records)):
        raise MalariaCellsError(f"{crops}: field indices go beyond the {len(data.records)} fields of {fields}")
    return data


def stage_set(data, blocks: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The staged infected cells of the training fields of ``data`` (a :class:`~.training.FieldCrops`):
    their crops, stage names and leave-slide-out block (``blocks`` runs of consecutive field names)."""
    block_of = data.block_of(blocks)
    keep = (np.asarray(data.labels) == 1) & np.isin(data.stages, STAGES) & np.isin(data.field, list(block_of))
    if not keep.any():
        raise MalariaCellsError("no infected cell with a stage in the training fields")
    return data.crops[keep], np.asarray(data.stages[keep], dtype=str), np.array([block_of[int(f)] for f in data.field[keep]])


# --------------------------------------------------------------------------- the model


class StageModel:
    """A stage model: uint8-range RGB cell crops in, a stage and its probability out.

    Attributes
    ----------
    keras_model : keras.Model
        The network, preprocessing included: input ``(n, S, S, 3)`` pixel values 0-255,
        output the probabilities of :data:`STAGES` ``(n, 4)``.
    image_size : int
        Side of the square crops it takes.
    info : dict
        Recipe, figures, versions; ``info["stages"]`` holds the :class:`StageFigures`.
    path : str
        Where it was loaded from.
    """

    stages = np.array(STAGES)
    """Stage names in the column order of :meth:`predict_proba`."""

    def __init__(self, keras_model, path: str = "<memory>"):
        from ..models import model_info_layer
        from ..runtimes import plain_info

        shape = keras_model.input_shape
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3 or keras_model.output_shape[-1] != len(STAGES):
            raise MalariaCellsError(f"{path}: not a stage model (input {shape}, output {keras_model.output_shape})")
        self.keras_model, self.path, self.image_size = keras_model, str(path), int(shape[1])
        layer = model_info_layer(keras_model)
        self.info = plain_info(layer.info if layer is not None else {})
        self.figures = StageFigures.from_info(self.info)

    def __repr__(self) -> str:
        return f"StageModel(path={self.path!r}, image_size={self.image_size})"

    def predict_proba(self, crops, *, batch_size: int = 256) -> np.ndarray:
        """Each crop's probability of each stage, ``(n, 4)`` in :data:`STAGES` order (rows sum to 1).

        Parameters
        ----------
        crops : array ``(n, S, S, 3)``
            Cells as screening cuts them: RGB pixel values 0-255, black outside the cell.
        batch_size : int
            Crops run through the network at once.
        """
        crops = _check_crops(crops, self.image_size)
        if len(crops) == 0:
            return np.zeros((0, len(STAGES)), np.float32)
        return np.concatenate([np.asarray(self.keras_model(crops[start:start + batch_size].astype(np.float32),
                                                           training=False))
                               for start in range(0, len(crops), batch_size)])

    def predict(self, crops, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Each crop's most probable stage and that stage's probability.

        Returns
        -------
        names : str array ``(n,)``
            Stages of :data:`STAGES`.
        probability : float array ``(n,)``
        """
        probabilities = self.predict_proba(crops, batch_size=batch_size)
        best = probabilities.argmax(axis=1)
        return self.stages[best], probabilities[np.arange(len(best)), best]

    def save(self, path: str | Path) -> None:
        """Write the ``.keras`` file and its side-car JSON (``path`` with suffix ``.json``), atomically."""
        from ..files import write_json
        from ..runtimes import save_keras_model

        path = Path(path)
        if path.suffix != ".keras":
            raise MalariaCellsError(f"{path}: a stage model is saved as .keras")
        save_keras_model(self.keras_model, path)
        write_json(path.with_suffix(".json"), {**self.info, "file": path.name})


def _build(describer, head, info: dict):
    import keras

    from ..models import CellModelInfo

    inputs = keras.Input(describer.input_shape[1:], name="image")
    dense = keras.layers.Dense(len(STAGES), activation="softmax", name="stage", dtype="float32")
    outputs = CellModelInfo(0.5, info, name="info")(dense(describer(inputs)))
    dense.set_weights([head[0], head[1]])
    return keras.Model(inputs, outputs, name="stage_model")


def cross_validate(crops, stages, groups, *, recipe: StageRecipe = StageRecipe(), backbone=None) -> StageFigures:
    """Leave-group-out figures: each group (a block of consecutive fields) predicted by a model
    trained on the others, its ``C`` chosen by leave-group-out on those others alone.

    Parameters
    ----------
    crops : array ``(n, S, S, 3)``
        Infected cells as screening cuts them.
    stages : array of str ``(n,)``
        Each cell's stage, one of :data:`STAGES`.
    groups : array ``(n,)``
        Each cell's block (cells of one slide in one block); at least 2 blocks.
    recipe : StageRecipe
    backbone : path or keras.Model, optional
        The cell model whose body describes the cells (default: the shipped field model).

    Raises
    ------
    MalariaCellsError
        For malformed inputs, fewer than two groups, or a group whose others hold one stage.
    """
    crops, labels, groups = _check_examples(crops, stages, groups)
    if len(np.unique(groups)) < 2:
        raise MalariaCellsError("leave-block-out needs cells in at least two blocks")
    x = _describe(_describer(backbone), crops)
    predicted, chosen = np.zeros(len(labels), int), []
    for group in np.unique(groups):
        out = groups == group
        if len(np.unique(labels[~out])) < 2:
            raise MalariaCellsError(f"block {group}: the other blocks hold fewer than two stages")
        c = _choose_c(x[~out], labels[~out], groups[~out], recipe)
        predicted[out] = _probabilities(x[out], _fit_head(x[~out], labels[~out], c, recipe)).argmax(axis=1)
        chosen.append(c)
    return _figures(labels, predicted, recipe, chosen,
                    f"leave-block-out over {len(np.unique(groups))} blocks of consecutive fields "
                    f"({len(labels)} cells); C chosen within each block's training blocks")


def train_stage_model(crops, stages, groups, *, recipe: StageRecipe = StageRecipe(), backbone=None,
                      figures: StageFigures | None = None, info: dict | None = None) -> StageModel:
    """A stage model trained on every cell, with ``C`` chosen by leave-group-out over them.

    Parameters
    ----------
    crops, stages, groups, recipe, backbone
        As in :func:`cross_validate`.
    figures : StageFigures, optional
        Figures to carry (those :func:`cross_validate` measured with the same arguments).
    info : dict, optional
        Further metadata to carry (data, command).
    """
    from ..runs import versions

    crops, labels, groups = _check_examples(crops, stages, groups)
    describer = _describer(backbone)
    x = _describe(describer, crops)
    c = _choose_c(x, labels, groups, recipe)
    head = _fit_head(x, labels, c, recipe)
    meta = {**(info or {}), "name": "stage-model", "image_size": describer.input_shape[1],
            "stage_names": list(STAGES), "description": describer.source,
            "recipe": {**asdict(recipe), "c_grid": list(recipe.c_grid), "c": c},
            "training_cells": {s: int((labels == k).sum()) for k, s in enumerate(STAGES)},
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions()}
    meta.pop(INFO_KEY, None)
    if figures is not None:
        meta[INFO_KEY] = figures.to_info()
    return StageModel(_build(describer, head, meta))


def load_stage_model(path: str | Path | None = None) -> StageModel:
    """A saved stage model; with no path, the shipped one (:data:`STAGE_MODEL`).

    Raises
    ------
    MalariaCellsError
        When the file is missing, unreadable, not a stage model, or its figures are malformed.
    """
    from ..runtimes import import_tensorflow_quietly

    import_tensorflow_quietly()  # screening with the ONNX field model may not have imported it yet
    import keras

    from .. import models  # noqa: F401 - registers the custom layers

    path = STAGE_MODEL if path is None else Path(path).expanduser()
    if not path.is_file():
        raise MalariaCellsError(f"{path}: stage model not found")
    _dihedral_view_class()
    try:
        keras_model = keras.saving.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - a broken file can fail in many ways
        raise MalariaCellsError(f"{path}: cannot load model ({str(error).strip().splitlines()[0][:200]})") from None
    return StageModel(keras_model, path)


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m malaria_cells.fields.stages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("train",), help="train: leave-slide-out figures, then the model on all")
    parser.add_argument("--crops", type=Path, required=True, help="field_crops.npz of the field model's crops step")
    parser.add_argument("--fields", type=Path, required=True, help="its fields.json (the fields in index order)")
    parser.add_argument("--out", type=Path, required=True, help="the model to write (.keras; figures also in .json)")
    parser.add_argument("--backbone", type=Path, help="cell model whose body describes cells (default: the field model)")
    defaults = StageRecipe()
    parser.add_argument("--blocks", type=int, default=defaults.blocks, help=f"recipe (default: {defaults.blocks})")
    parser.add_argument("--c-grid", type=float, nargs="+", default=list(defaults.c_grid),
                        help=f"recipe (default: {' '.join(map(str, defaults.c_grid))})")
    parser.add_argument("--max-class-weight", type=float, default=defaults.max_class_weight,
                        help=f"recipe (default: {defaults.max_class_weight})")
    parser.add_argument("--min-support", type=int, default=defaults.min_support,
                        help=f"recipe (default: {defaults.min_support})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line of this module (see its docstring)."""
    args = _parser().parse_args(argv)
    try:
        if args.out.suffix != ".keras":
            raise MalariaCellsError(f"{args.out}: --out must end in .keras")
        recipe = StageRecipe(blocks=args.blocks, c_grid=tuple(args.c_grid), max_class_weight=args.max_class_weight,
                             min_support=args.min_support)
        crops, stages, groups = stage_set(load_field_crops(args.crops, args.fields), recipe.blocks)
        figures = cross_validate(crops, stages, groups, recipe=recipe, backbone=args.backbone)
        print(figures.table(), flush=True)
        command = "python -m malaria_cells.fields.stages " + " ".join(sys.argv[1:] if argv is None else argv)
        model = train_stage_model(crops, stages, groups, recipe=recipe, backbone=args.backbone, figures=figures,
                                  info={"data": {"crops": args.crops.name, "fields": args.fields.name,
                                                 "cells": len(stages)},
                                        "command": command})
        model.save(args.out)
        print(f"wrote {args.out} (C {model.info['recipe']['c']})")
        return 0
    except MalariaCellsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
