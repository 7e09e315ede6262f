"""A field model's operating figures: its counting threshold and what was measured at it.

A cell classifier used on fields counts at a threshold chosen on validation fields (for few
false alarms), not at the cell-level screening threshold; the sensitivity and specificity
measured there correct parasitemia (Rogan-Gladen) and weigh the call. They travel inside the
model file as ``info["field"]``; :class:`FieldFigures` is the one code that reads and writes
them, validated once when a screener is built.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields as dataclass_fields

from ..errors import MalariaCellsError

__all__ = ["shift_suite_summary", "FieldFigures", "DEFAULT_FIELD_FPR", "INFO_KEY"]

INFO_KEY = "field"
"""Where a model's ``info`` holds its field figures."""
DEFAULT_FIELD_FPR = 0.01
"""False-positive rate the call assumes for a classifier that carries no field figures."""


@dataclass(frozen=True)
class FieldFigures:
    """A classifier's operating point for counting field cells, with its measured figures.

    Parameters
    ----------
    threshold : float
        Cells scoring at least this are counted Parasitized.
    sensitivity, specificity : float
        Measured at ``threshold`` on validation field cells (out-of-fold).
    tta_gate : float, optional
        Cells scoring at least this are scored again as the mean of their 8 rotations and
        mirrors (None: never).
    chosen_on : str
        How the threshold was chosen, in words.
    cells : dict
        Validation cells the figures rest on (``{"infected": n, "uninfected": n}``).
    nested, nih_healthy, recipe : dict
        The nested cross-validation report, the false alarms on healthy photographs, and the
        recipe that made the model.
    stain_reference : list of 3 floats, optional
        The median red cell's optical density (RGB, against the plasma) of the fields the
        model was trained on; with it, each field's crops are stain-normalised to it
        (:mod:`.stain`) before scoring.
    plasma_reference : list of 3 floats, optional
        The median plasma colour (RGB, 0-255) of those fields; with it, the normalised crops
        are rebuilt on that plasma, so exposure and white balance do not reach the model.
    shift_suite : dict
        The shift suite's figures for this model (``benchmarks/shift_suite.py``; see
        :func:`shift_suite_summary`): per condition, infected found, false-positive rate,
        parasitemia error, detection F1 and the healthy sample's call, and the floors failed.
    extra : dict
        Any further keys a newer version wrote (kept, not interpreted).
    """

    threshold: float
    sensitivity: float
    specificity: float
    tta_gate: float | None = None
    chosen_on: str = ""
    cells: dict = field(default_factory=dict)
    nested: dict = field(default_factory=dict)
    nih_healthy: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    stain_reference: list | None = None
    plasma_reference: list | None = None
    shift_suite: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("threshold", "sensitivity", "specificity") + (("tta_gate",) if self.tta_gate is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1 \
                    or math.isnan(value):
                raise MalariaCellsError(f"field figures: {name} must be a number in [0, 1], got {value!r}")
        if self.stain_reference is not None:
            values = self.stain_reference
            if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 5 for v in values):
                raise MalariaCellsError(f"field figures: stain_reference must be 3 densities in (0, 5), got {values!r}")
        if self.plasma_reference is not None:
            values = self.plasma_reference
            if self.stain_reference is None or not isinstance(values, (list, tuple)) or len(values) != 3 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 255 for v in values):
                raise MalariaCellsError("field figures: plasma_reference must be 3 levels in (0, 255], beside a "
                                        f"stain_reference, got {values!r}")
        for name in ("cells", "nested", "nih_healthy", "recipe", "shift_suite", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise MalariaCellsError(f"field figures: {name} must be a mapping")

    @property
    def false_positive_rate(self) -> float:
        """``1 - specificity``: the rate the call weighs a Parasitized count against."""
        return 1.0 - self.specificity

    @classmethod
    def from_info(cls, info: dict | None) -> FieldFigures | None:
        """The figures a model's ``info`` carries, or None where it carries none (a cell model).

        Raises
        ------
        MalariaCellsError
            When they are present but malformed (a missing or out-of-range value).
        """
        data = info.get(INFO_KEY) if isinstance(info, dict) else None
        if data is None:
            return None
        if not isinstance(data, dict):
            raise MalariaCellsError(f"field figures: expected a mapping, got {type(data).__name__}")
        missing = {"threshold", "sensitivity", "specificity"} - set(data)
        if missing:
            raise MalariaCellsError(f"field figures: missing {', '.join(sorted(missing))}")
        known = {item.name for item in dataclass_fields(cls)} - {"extra"}
        return cls(**{key: data[key] for key in known if key in data},
                   extra={key: value for key, value in data.items() if key not in known})

    @classmethod
    def from_model(cls, model) -> FieldFigures | None:
        """The figures ``model`` (a :class:`~malaria_cells.runtimes.CellClassifier`) carries."""
        return cls.from_info(getattr(model, "info", None))

    def to_info(self) -> dict:
        """The JSON form stored as ``info["field"]`` (what :meth:`from_info` reads back)."""
        data = asdict(self)
        extra = data.pop("extra")
        return {key: value for key, value in {**data, **extra}.items() if value is not None}

    def attach(self, model) -> None:
        """Store these figures in ``model.info`` (and the Keras model's info layer, if any), and
        make the threshold the model's own."""
        info = {**model.info, INFO_KEY: self.to_info()}
        if getattr(model, "keras_model", None) is not None:
            from ..models import model_info_layer

            model_info_layer(model.keras_model).info = info
        model.info = info
        model.set_threshold(self.threshold)


def shift_suite_summary(report: dict) -> dict:
    """The part of a shift-suite report (the JSON ``benchmarks/shift_suite.py`` writes) that a
    model carries: its command, fields and floors, and per condition the pooled figures.

    Raises
    ------
    MalariaCellsError
        When ``report`` is not such a report.
    """
    if not isinstance(report, dict) or not isinstance(report.get("conditions"), list) or not report["conditions"]:
        raise MalariaCellsError("shift suite: not a report of benchmarks/shift_suite.py (no conditions)")

    def pick(row):
        iml, every = row.get("iml", {}), row.get("all", {})
        return {"infected_found_pct": iml.get("infected_found_pct"), "false_positive_rate_pct":
                every.get("false_positive_rate_pct"), "parasitemia_mae_points": every.get("parasitemia_mae_points"),
                "detection_f1": every.get("f1"), "unread_fields": row.get("unread_fields"),
                "healthy_call": row.get("nih_call", {}).get("call"), "floor": row.get("passed")}

    return {"command": report.get("command"), "fields": report.get("fields"), "floors": report.get("floors"),
            "conditions": {row["name"]: pick(row) for row in report["conditions"] if "name" in row},
            "drawn_cells": {row["name"]: row.get("passed") for row in report.get("morphology", []) if "name" in row},
            "failed": list(report.get("failed", []))}
