"""Screening whole smear photographs: every red cell found and classified, parasitemia and a call.

``screen(paths)`` runs each field photograph through one path: :func:`.images.decode` (at a
reduced size for large photographs), :func:`.detection.detect_cells`, :func:`.crops.crop_cells`
and the cell model (see :func:`counting_probability`), then counts. Cells are called
Parasitized at the model's *counting* threshold, chosen on validation fields for few false
alarms; it differs from the cell-level screening threshold, which is chosen for 99%
sensitivity on single crops.

Parasitemia is infected / counted red cells with a 95% Wilson interval. Where the model file
carries its measured sensitivity and specificity on field cells, a Rogan-Gladen estimate
corrected for them is reported beside the raw fraction.

The call, per sample (a folder of fields, or the files given together):

- ``review`` when fewer than :data:`MIN_CELLS` cells were counted on fields of good quality,
  or when half the fields or more are of low quality;
- ``positive`` when the number of Parasitized cells is too large to be false alarms alone:
  under the field false-positive rate the model carries, the chance of seeing that many or more
  is below :data:`POSITIVE_P` (so a healthy patient's scattered false alarms stay negative);
- ``negative`` when the count is what false alarms alone would give (chance at least
  :data:`NEGATIVE_P`) and the corrected parasitemia's upper bound is below
  :data:`RULE_OUT`, so an infection at or above that level is ruled out;
- ``review`` otherwise (borderline).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .config import CLASS_NAMES, MAX_IMAGE_PIXELS
from .errors import MalariaCellsError

__all__ = ["CellResult", "FieldResult", "SampleResult", "ScreenResult", "screen", "screen_image", "call_sample", "group_samples", "pool_fields",
           "MIN_CELLS", "POSITIVE_P", "NEGATIVE_P", "RULE_OUT", "DECODE_SIDE"]

MIN_CELLS = 200
"""Fewest counted cells (on good fields) for a positive or negative call."""
POSITIVE_P = 0.001
NEGATIVE_P = 0.05
RULE_OUT = 0.01
"""Parasitemia that a negative call rules out (upper 95% bound of the corrected estimate)."""
DECODE_SIDE = 2000
"""Photographs are decoded at a reduced size so their longer side is at most about twice this
(JPEGs scale inside the decoder): a 16 MP phone photograph's cells are then still ~60 px."""
DEFAULT_FIELD_FPR = 0.01
"""False-positive rate assumed for the call when the model carries no field figures."""


@dataclass
class CellResult:
    """A counted red cell: centre and box in pixels of the frame named by its field."""

    x: float
    y: float
    bbox: list[int]
    probability: float
    label: str


@dataclass
class FieldResult:
    """One field photograph, screened."""

    path: str
    width: int
    height: int
    frame: str
    quality: dict
    n_cells: int
    n_parasitized: int
    parasitemia: float | None
    parasitemia_ci: list[float] | None
    corrected: dict | None
    cell_diameter: float
    cells: list[CellResult] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)
    truth: dict | None = None
    seconds: float = 0.0


@dataclass
class SampleResult:
    """Fields of one sample (a slide or a patient), pooled, with the call."""

    name: str
    fields: int
    n_cells: int
    n_parasitized: int
    parasitemia: float | None
    parasitemia_ci: list[float] | None
    corrected: dict | None
    call: str
    reasons: list[str]
    truth: dict | None = None


@dataclass
class ScreenResult:
    """What :func:`screen` returns: every field, every sample and the summary of all."""

    fields: list[FieldResult]
    samples: list[SampleResult]
    summary: SampleResult
    skipped: list[tuple[str, str]]
    model: dict

    def to_dict(self, *, cells: bool = True) -> dict:
        """The JSON form: ``{"fields", "summary"}`` and, with several samples, ``"samples"``."""
        fields = []
        for item in self.fields:
            entry = asdict(item)
            if not cells:
                entry.pop("cells")
            fields.append(entry)
        out = {"fields": fields, "summary": _summary_dict(self.summary)}
        if len(self.samples) > 1:
            out["samples"] = [_summary_dict(sample) for sample in self.samples]
        out["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        out["model"] = self.model
        return out


def _summary_dict(sample: SampleResult) -> dict:
    entry = asdict(sample)
    entry["fields"] = sample.fields
    return entry


def wilson(successes: int, trials: int) -> list[float] | None:
    from .evaluation import wilson_interval

    return wilson_interval(successes, trials) if trials else None


def _corrected(n_parasitized: int, n_cells: int, figures: dict | None) -> dict | None:
    """Rogan-Gladen: the true fraction, given the classifier's field sensitivity and specificity."""
    if not figures or not n_cells:
        return None
    sensitivity, specificity = figures["sensitivity"], figures["specificity"]
    youden = sensitivity + specificity - 1
    if youden <= 0:
        return None

    def correct(p):
        return float(min(1.0, max(0.0, (p + specificity - 1) / youden)))

    low, high = wilson(n_parasitized, n_cells)
    return {"parasitemia": correct(n_parasitized / n_cells), "parasitemia_ci": [correct(low), correct(high)],
            "sensitivity": sensitivity, "specificity": specificity}


def call_sample(n_parasitized: int, n_cells: int, *, false_positive_rate: float, good_fields: int = 1,
                fields: int = 1, corrected: dict | None = None) -> tuple[str, list[str]]:
    """The sample call and its reasons, by the rule in this module's docstring."""
    from .evaluation import binomial_tail

    if n_cells < MIN_CELLS:
        return "review", [f"only {n_cells} cells counted on good fields (at least {MIN_CELLS} needed)"]
    if fields and good_fields * 2 <= fields:
        return "review", [f"{fields - good_fields} of {fields} fields are of low quality"]
    chance = binomial_tail(n_parasitized, n_cells, false_positive_rate)
    expected = n_cells * false_positive_rate
    if chance < POSITIVE_P:
        return "positive", [f"{n_parasitized} parasitized cells where false alarms alone would give about "
                            f"{expected:.1f} (chance {chance:.1e})"]
    upper = corrected["parasitemia_ci"][1] if corrected else wilson(n_parasitized, n_cells)[1]
    if chance >= NEGATIVE_P and upper < RULE_OUT:
        return "negative", [f"{n_parasitized} parasitized cells, as false alarms alone would give "
                            f"(about {expected:.1f}); parasitemia below {RULE_OUT:.0%} (95% upper bound {upper:.2%})"]
    return "review", [f"borderline: {n_parasitized} parasitized cells where false alarms alone would give about "
                      f"{expected:.1f} (chance {chance:.2g}); upper bound {upper:.2%}"]


def _decode_reduce(contents: bytes) -> int:
    from .images import dimensions

    width, height = dimensions(contents)
    return max(1, int(max(width, height) // DECODE_SIDE))


def screen_image(contents: bytes, model, *, path: str = "<image>", threshold: float | None = None,
                 truth_cells=None, max_pixels: int = MAX_IMAGE_PIXELS, keep_crops: bool = False):
    """Screen one field photograph held in memory.

    Returns
    -------
    FieldResult; with ``keep_crops``, ``(result, crops of its counted cells, the decoded image)``.
    """
    from .images import dimensions, pixels_in_flight

    started = time.perf_counter()
    width, height = dimensions(contents)
    if width * height > max_pixels:
        from .images import UnreadableImage

        raise UnreadableImage(f"image too large ({width}x{height} pixels, limit {max_pixels:,}; decompression bomb?)")
    with pixels_in_flight(width * height):
        return _screen_decoded(contents, model, path, threshold, truth_cells, max_pixels, keep_crops, started,
                               width, height)


def _screen_decoded(contents, model, path, threshold, truth_cells, max_pixels, keep_crops, started, width, height):
    from .crops import crop_cells
    from .detection import detect_cells
    from .images import decode

    reduce = _decode_reduce(contents)
    image = decode(contents, max_pixels=max_pixels, reduce=reduce)
    factor_x, factor_y = width / image.shape[1], height / image.shape[0]
    detection = detect_cells(image)
    crops = crop_cells(image, detection, model.image_size)
    probabilities = counting_probability(model, crops)
    threshold = counting_threshold(model) if threshold is None else threshold
    cells = []
    for item, probability in zip(detection.cells, probabilities):
        x0, y0, x1, y1 = item.bbox
        cells.append(CellResult(round(item.x * factor_x, 1), round(item.y * factor_y, 1),
                                [round(x0 * factor_x), round(y0 * factor_y), round(x1 * factor_x), round(y1 * factor_y)],
                                round(float(probability), 6), CLASS_NAMES[int(probability >= threshold)]))
    excluded = [{"x": round(o.x * factor_x, 1), "y": round(o.y * factor_y, 1), "kind": o.kind,
                 "bbox": [round(o.bbox[0] * factor_x), round(o.bbox[1] * factor_y),
                          round(o.bbox[2] * factor_x), round(o.bbox[3] * factor_y)]} for o in detection.excluded]
    n_cells = len(cells)
    n_parasitized = sum(c.label == CLASS_NAMES[1] for c in cells)
    result = FieldResult(
        path=path, width=width, height=height, frame="stored", quality=detection.quality, n_cells=n_cells,
        n_parasitized=n_parasitized, parasitemia=n_parasitized / n_cells if n_cells else None,
        parasitemia_ci=wilson(n_parasitized, n_cells), corrected=_corrected(n_parasitized, n_cells, field_figures(model)),
        cell_diameter=round(detection.cell_diameter * factor_x, 1), cells=cells, excluded=excluded)
    if truth_cells is not None:
        from .truth import score_field

        result.truth = score_field(result, truth_cells)
    result.seconds = round(time.perf_counter() - started, 3)
    return (result, crops, image) if keep_crops else result


def counting_probability(model, crops: np.ndarray, *, tta_gate: float | None = None) -> np.ndarray:
    """Probability of Parasitized for each field crop, as counting uses it.

    A cell whose crop scores at least ``tta_gate`` (default: the gate the model carries for
    fields, ``info["field"]["tta_gate"]``) is scored again as the mean over its 8 rotations and
    mirrors (test-time augmentation), which steadies the scores near the counting threshold;
    the few cells that pass the gate keep the cost low. Without a gate, the plain scores.
    """
    if len(crops) == 0:
        return np.zeros(0)
    # Where a runtime scores batches side by side, batches of one network run (64 crops) keep
    # every core busy on a single field.
    batch = 64 if model.parallel_batches else 512
    probabilities = np.asarray(model.probability(crops, batch_size=batch), dtype=float)
    if tta_gate is None:
        tta_gate = (field_figures(model) or {}).get("tta_gate")
    if tta_gate is not None and tta_gate < 1:
        again = np.flatnonzero(probabilities >= tta_gate)
        if len(again):
            probabilities[again] = model.probability(crops[again], tta=True, batch_size=batch // 8)
    return probabilities


def counting_threshold(model) -> float:
    """The threshold for counting field cells: the one the model file carries, else its own."""
    figures = field_figures(model)
    return float(figures["threshold"]) if figures else float(model.threshold)


def false_positive_rate(model) -> float:
    """The field false-positive rate the call weighs counts against."""
    figures = field_figures(model)
    return 1 - figures["specificity"] if figures else DEFAULT_FIELD_FPR


def field_figures(model) -> dict | None:
    """``{"threshold", "sensitivity", "specificity", ...}`` measured on validation fields, if the
    model carries them (``info["field"]``)."""
    figures = model.info.get("field") if isinstance(model.info, dict) else None
    return figures if figures and {"threshold", "sensitivity", "specificity"} <= set(figures) else None


def group_samples(inputs: Iterable[str | os.PathLike]) -> tuple[list[tuple[str, list[str]]], list[tuple[str, str]]]:
    """Group inputs into samples: each folder is one (its images, recursively), loose files one more."""
    from .datasets import list_image_files

    samples, loose, skipped = [], [], []
    for item in inputs:
        item = Path(item).expanduser()
        if item.is_dir():
            files, ignored = list_image_files([item])
            # Ground-truth files beside the images are expected there, not skipped images.
            skipped += [(p, why) for p, why in ignored
                        if not (why == "not an image file" and p.lower().endswith((".txt", ".json")))]
            if files:
                samples.append((item.name or str(item), files))
            else:
                skipped.append((str(item), "no images in this folder"))
        elif item.exists():
            files, ignored = list_image_files([item])
            loose += files
            skipped += ignored
        else:
            skipped.append((str(item), "no such file or folder"))
    if loose:
        samples.append(("fields", loose))
    return samples, skipped


def screen(paths: str | os.PathLike | Iterable[str | os.PathLike], model=None, *, threshold: float | None = None,
           truth: str | os.PathLike | bool | None = None, progress: Callable[[int], None] | None = None,
           on_field: Callable[[FieldResult, np.ndarray, np.ndarray], None] | None = None) -> ScreenResult:
    """Screen field photographs: count red cells, classify them, give parasitemia and a call.

    Parameters
    ----------
    paths : path or iterable of paths
        Field images (JPEG, PNG, TIFF, ... any size) or folders. Each folder is one sample
        (a slide or a patient) whose images are its fields; files given directly form one more.
    model : path or CellClassifier, optional
        The cell model (default: the shipped field model, see
        :data:`malaria_cells.runtimes.FIELD_MODEL`); any format.
    threshold : float, optional
        Counting threshold (default: the one the model carries for fields).
    truth : path or True, optional
        Score against ground truth: NIH point files (``.txt`` beside each image) or IML-style
        JSON. ``True`` looks beside the images only; a path names a JSON file or folder.
    progress : callable, optional
        Called with 1 after each field (a progress bar's ``update``).
    on_field : callable, optional
        Called with each field's result, its cell crops and its decoded image as it is done
        (reports draw overlays with it).

    Returns
    -------
    ScreenResult
    """
    from .runtimes import check_threshold, default_model_path, load_model

    model = load_model(default_model_path(fields=True) if model is None else model)
    threshold = check_threshold(threshold)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    groups, skipped = group_samples(paths)
    rate = false_positive_rate(model)
    fields, samples, indexes = [], [], {}
    for name, files in groups:
        sample_fields = []
        for path in files:
            try:
                truth_cells = None
                if truth:
                    from .truth import read_truth

                    truth_cells = read_truth(path, None if truth is True else truth, indexes)
                from .images import read_file

                result, crops, image = screen_image(read_file(path), model, path=str(path), threshold=threshold,
                                                    truth_cells=truth_cells, keep_crops=True)
            except MalariaCellsError as error:
                skipped.append((str(path), str(error)))
            else:
                sample_fields.append(result)
                if on_field is not None:
                    on_field(result, crops, image)
            if progress is not None:
                progress(1)
        fields += sample_fields
        if sample_fields:
            samples.append(pool_fields(name, sample_fields, model, rate))
    summary = pool_fields("all", fields, model, rate) if len(samples) != 1 else samples[0]
    info = {"path": model.path, "counting_threshold": counting_threshold(model) if threshold is None else threshold,
            "field_figures": field_figures(model), "false_positive_rate_for_call": rate}
    return ScreenResult(fields, samples, summary, skipped, info)


def pool_fields(name: str, fields: Sequence[FieldResult], model, rate: float | None = None) -> SampleResult:
    """Pool fields into a sample: counts over its good-quality fields (all, if none is), the
    interval, the corrected estimate and the call."""
    if rate is None:
        rate = false_positive_rate(model)
    good = [f for f in fields if f.quality.get("ok")]
    counted = good or list(fields)
    n_cells = sum(f.n_cells for f in counted)
    n_parasitized = sum(f.n_parasitized for f in counted)
    corrected = _corrected(n_parasitized, n_cells, field_figures(model))
    call, reasons = call_sample(n_parasitized, sum(f.n_cells for f in good), false_positive_rate=rate,
                                good_fields=len(good), fields=len(fields), corrected=corrected)
    sample = SampleResult(name, len(fields), n_cells, n_parasitized, n_parasitized / n_cells if n_cells else None,
                          wilson(n_parasitized, n_cells), corrected, call, reasons)
    scored = [f.truth for f in fields if f.truth]
    if scored:
        from .truth import pool_scores

        sample.truth = pool_scores(scored)
    return sample
