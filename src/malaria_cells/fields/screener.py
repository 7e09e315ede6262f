"""The screening loop: field photographs to counted cells, parasitemia and a call.

A :class:`Screener` composes three swappable parts, as cellpose composes a size model and a
segmentation model:

- a **detector** (:class:`~.detection.Detector`; default :class:`~.detection.ClassicalDetector`)
  that finds and sorts the objects of a field;
- a **cell classifier** (:class:`~malaria_cells.runtimes.CellClassifier`; default the shipped
  field model) that scores each counted cell's crop;
- its **field figures** (:class:`~.figures.FieldFigures`, read from the classifier's file):
  the counting threshold chosen on validation fields for few false alarms, and the
  sensitivity and specificity measured there, which correct parasitemia and weigh the call.

Every field goes through one path: :func:`~malaria_cells.images.decode` (at a reduced size
for large photographs), ``detector.detect``, :func:`~.crops.crop_cells`, the classifier, the
count. :meth:`Screener.screen_samples` is the one loop over samples that the command line, the
Python API, the server and the field model's making all run. Parasitemia is infected / counted
red cells with a 95% Wilson interval; the call follows :mod:`.call`.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..config import CLASS_NAMES, MAX_IMAGE_PIXELS
from ..errors import MalariaCellsError
from .applicability import ApplicabilityLimits, assess_field, fingerprint, same_field
from .call import RBC_PER_UL, call_sample, corrected_parasitemia, parasite_density, parasitemia_interval
from .detection import ClassicalDetector, Detector
from .figures import DEFAULT_FIELD_FPR, FieldFigures
from .results import CellResult, FieldResult, SampleResult, ScreenResult

__all__ = ["Screener", "FieldTimeout", "screen", "screen_image", "group_samples", "pool_fields",
           "counting_probability", "DECODE_SIDE"]

MIN_SIDE = 16
"""Smallest side (pixels) of a field photograph that is read at all."""
DECODE_SIDE = 2000
"""Photographs are decoded at a reduced size so their longer side is at most about twice this
(JPEGs scale inside the decoder): a 16 MP phone photograph's cells are then still ~60 px."""

READ_LARGER_BELOW = 40.0
"""A reduced photograph whose cells come out narrower than this many pixels is read again at
twice the size (down to the size as stored), if at that size they would be wide enough to read."""


class FieldTimeout(MalariaCellsError):
    """A field (or a request's remaining fields) ran past its time limit: reported, not counted."""


OnField = Callable[[FieldResult, np.ndarray, np.ndarray], None]
"""Called with each field's result, its counted cells' crops and its decoded image."""


class Screener:
    """Screens field photographs with a detector, a cell classifier and its field figures.

    Parameters
    ----------
    classifier : path or CellClassifier, optional
        The cell model (default: the shipped field model, run from its ONNX copy); any format.
    detector : Detector, optional
        Default :class:`~.detection.ClassicalDetector` with its default settings.
    figures : FieldFigures, optional
        Operating figures (default: those the classifier's file carries; a model without them
        counts at its own threshold and the call assumes a 1% false-positive rate).
    threshold : float, optional
        Counting threshold overriding the figures'.
    max_pixels : int
        Largest decoded image accepted, in pixels (refused from the header, before decoding).
    applicability : ApplicabilityLimits, optional
        What a field must look like to be read (default: the stated limits); a field outside
        them is listed with its reasons and not counted.
    rbc_per_ul : float
        Red cells per microlitre of the patient's blood, for parasites per microlitre (default
        5,000,000, the WHO thin-film convention; give the patient's own count where known).
    max_field_seconds : float, optional
        Time limit per field (default: none). It is checked between a field's steps (decoding,
        detection, the readability checks, classification), each of which is bounded by the
        image's size; a field past it is reported as not screened and the rest go on.
    stages : bool, path or StageModel
        Give each Parasitized cell its life stage (:mod:`.stages`): True (default) with the
        shipped stage model, loaded when the first Parasitized cell is met; a path or a loaded
        :class:`~.stages.StageModel`; False for none. A stage model that cannot be loaded or
        run turns stages off with the reason in :meth:`describe` (counts are unaffected).

    Examples
    --------
    >>> from malaria_cells.fields import Screener, ClassicalDetector
    >>> screener = Screener(detector=ClassicalDetector(clump_cells=2.5))   # doctest: +SKIP
    >>> result = screener.screen(["patient1/", "patient2/"])              # doctest: +SKIP
    >>> result.summary.call                                               # doctest: +SKIP
    'negative'
    """

    def __init__(self, classifier=None, detector: Detector | None = None, *, figures: FieldFigures | None = None,
                 threshold: float | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                 applicability: ApplicabilityLimits | None = None, max_field_seconds: float | None = None,
                 rbc_per_ul: float = RBC_PER_UL, stages=True):
        from ..runtimes import check_threshold, default_model_path, load_model

        self.classifier = load_model(default_model_path(fields=True) if classifier is None else classifier)
        self.detector = ClassicalDetector() if detector is None else detector
        if not isinstance(self.detector, Detector):
            raise MalariaCellsError(f"detector: {type(self.detector).__name__} has no detect(image) and describe()")
        self.figures = FieldFigures.from_model(self.classifier) if figures is None else figures
        threshold = check_threshold(threshold)
        if threshold is None:
            threshold = self.figures.threshold if self.figures else self.classifier.threshold
        self.threshold = float(threshold)
        self.false_positive_rate = self.figures.false_positive_rate if self.figures else DEFAULT_FIELD_FPR
        if int(max_pixels) < 1:
            raise MalariaCellsError(f"max_pixels must be at least 1, got {max_pixels}")
        self.max_pixels = int(max_pixels)
        self.applicability = ApplicabilityLimits() if applicability is None else applicability
        self.max_field_seconds = _check_seconds(max_field_seconds, "max_field_seconds")
        if isinstance(rbc_per_ul, bool) or not isinstance(rbc_per_ul, (int, float)) \
                or not 100_000 <= rbc_per_ul <= 10_000_000:
            raise MalariaCellsError(f"rbc_per_ul must be red cells per microlitre, 100,000 to 10,000,000, "
                                    f"got {rbc_per_ul!r}")
        self.rbc_per_ul = float(rbc_per_ul)
        if not (isinstance(stages, (bool, str, os.PathLike)) or hasattr(stages, "predict")):
            raise MalariaCellsError(f"stages: True (the shipped stage model), False, a path or a StageModel, "
                                    f"got {type(stages).__name__}")
        if isinstance(stages, (str, os.PathLike)) and not Path(stages).expanduser().is_file():
            raise MalariaCellsError(f"stages: {stages}: stage model not found")
        self._stages = stages if hasattr(stages, "predict") else None
        self._stage_source = None if isinstance(stages, bool) else stages
        self.stages_enabled = stages is not False
        self.stage_error: str | None = None
        """Why stages were turned off while screening (a model that failed to load or run)."""
        self._stage_lock = threading.Lock()

    @property
    def stage_model(self):
        """The life-stage model (:mod:`.stages`), loaded when first needed (a sample with no
        Parasitized cell never loads it), or None when stages are off."""
        if not self.stages_enabled:
            return None
        with self._stage_lock:
            if self._stages is None:
                from .stages import load_stage_model

                self._stages = load_stage_model(self._stage_source)
            return self._stages

    def __repr__(self) -> str:
        return (f"Screener(classifier={os.path.basename(self.classifier.path)!r}, detector={self.detector!r}, "
                f"threshold={self.threshold:.4f})")

    def describe(self) -> dict:
        """The ``model`` block of every result: file name, counting threshold, field figures,
        the false-positive rate the call uses, and the detector."""
        stages = self.stage_description()
        return {"path": os.path.basename(self.classifier.path),
                "trained_at": (getattr(self.classifier, "info", None) or {}).get("trained_at"),
                "stage_model": stages, "counting_threshold": self.threshold,
                "field_figures": self.figures.to_info() if self.figures else None,
                "false_positive_rate_for_call": self.false_positive_rate, "detector": self.detector.describe()}

    def stage_description(self) -> dict | None:
        """The stage model's file name, training date and figures, read from its side-car file
        while the model itself is not loaded (describing a screen must not load TensorFlow)."""
        if self.stage_error is not None:
            return {"path": None, "trained_at": None, "figures": None, "error": f"stages off: {self.stage_error}"}
        if not self.stages_enabled:
            return None
        if self._stages is not None:
            info, path = self._stages.info, self._stages.path
        else:
            import json

            from .stages import STAGE_MODEL

            path = Path(self._stage_source or STAGE_MODEL)
            try:
                info = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                info = {}
        from .stages import StageFigures

        try:
            figures = StageFigures.from_info(info)
        except MalariaCellsError:
            figures = None
        return {"path": os.path.basename(str(path)), "trained_at": info.get("trained_at"),
                "figures": figures.to_info() if figures else None}

    def _stage(self, cells: list[CellResult], crops: np.ndarray) -> None:
        """Give each Parasitized cell its life stage and that stage's probability, in place."""
        infected = [k for k, cell in enumerate(cells) if cell.label == CLASS_NAMES[1]]
        if not infected or not self.stages_enabled:
            return
        try:
            model = self.stage_model
            picked = crops[infected]
            if picked.shape[1] != model.image_size:
                from ..images import resize

                picked = np.stack([resize(crop, (model.image_size, model.image_size)) for crop in picked])
            names, probabilities = model.predict(picked)
        except Exception as error:  # noqa: BLE001 - stages are extra: a failure must not cost the count
            self.stages_enabled = False
            self.stage_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}"
            return
        for k, name, probability in zip(infected, names, probabilities):
            cells[k].stage, cells[k].stage_probability = str(name), round(float(probability), 4)

    def report_options(self) -> dict:
        """What a :class:`~.report.ReportWriter` needs from this screener: ``explain``, heat maps
        of the classifier on cell crops. Occlusion (:func:`malaria_cells.explain.occlusion`), for
        any runtime: its peak falls on the stained parasite far more often than Grad-CAM's on the
        64 px model's 4x4 feature map (``benchmarks/heatmap_check.py``)."""
        from ..explain import occlusion

        stages = self.stage_description()
        return {"explain": lambda crops: occlusion(self.classifier, crops),
                "stage_figures": stages["figures"] if stages else None}

    def score(self, crops: np.ndarray) -> np.ndarray:
        """Counting probabilities of cell crops (see :func:`counting_probability`)."""
        return counting_probability(self.classifier, crops,
                                    tta_gate=self.figures.tta_gate if self.figures else None)

    def screen_image(self, contents: bytes, *, path: str = "<image>", truth_cells=None, keep_crops: bool = False,
                     deadline: float | None = None):
        """Screen one field photograph held in memory.

        ``deadline`` (a :func:`time.perf_counter` time) ends it sooner than ``max_field_seconds``
        would (a request's remaining time).

        Returns
        -------
        FieldResult; with ``keep_crops``, ``(result, crops of its counted cells, the decoded image)``.

        Raises
        ------
        MalariaCellsError
            An unreadable image, or one over ``max_pixels``; :class:`FieldTimeout` past its limit.
        """
        from ..images import UnreadableImage, dimensions, pixels_in_flight

        started = time.perf_counter()
        limit = "the time limit for all fields"
        if self.max_field_seconds is not None and (deadline is None or started + self.max_field_seconds < deadline):
            deadline, limit = started + self.max_field_seconds, f"its limit of {self.max_field_seconds:g} s per field"
        width, height = dimensions(contents)
        if min(width, height) < MIN_SIDE:
            raise UnreadableImage(f"image too small ({width}x{height} pixels; a field photograph is at least "
                                  f"{MIN_SIDE} pixels on each side)")
        if width * height > self.max_pixels:
            raise UnreadableImage(f"image too large ({width}x{height} pixels, limit {self.max_pixels:,}; "
                                  "decompression bomb?)")
        try:  # the wait for room in the process's memory budget is within the time limit too
            with pixels_in_flight(width * height, None if deadline is None else max(0.0, deadline - started)):
                result, crops, image = self._screen_decoded(contents, path, truth_cells, started, width, height,
                                                            deadline, limit)
        except TimeoutError:
            raise FieldTimeout(f"not screened: {limit} ran out while it waited for memory") from None
        return (result, crops, image) if keep_crops else result

    def _screen_decoded(self, contents, path, truth_cells, started, width, height, deadline, limit):
        from ..images import decode
        from .crops import crop_cells

        reduce = max(1, int(max(width, height) // DECODE_SIDE))
        image = decode(contents, max_pixels=self.max_pixels, reduce=reduce)
        _in_time(deadline, "decoding", started, limit)
        detection = self.detector.detect(image)
        _in_time(deadline, "finding the cells", started, limit)
        while (reduce > 1 and detection.cell_diameter < READ_LARGER_BELOW
               and detection.cell_diameter * reduce >= self.applicability.min_cell_diameter):
            # cells too small once shrunk: read larger, unless even the stored size could not
            # make them readable (noise and tiny cells are not decoded and detected again)
            reduce = max(1, reduce // 2)
            image = decode(contents, max_pixels=self.max_pixels, reduce=reduce)
            detection = self.detector.detect(image)
            _in_time(deadline, "finding the cells at a larger size", started, limit)
        factor_x, factor_y = width / image.shape[1], height / image.shape[0]
        check = assess_field(image, detection, self.applicability)
        quality = {**detection.quality, "applicable": check["applicable"], "flags": check["flags"],
                   "checks": check["measures"]}
        if not check["applicable"]:  # shown, never counted: its cells are not classified
            quality["ok"] = False
            quality["reasons"] = list(detection.quality["reasons"]) + check["reasons"]
            detection.objects = [o for o in detection.objects if o.kind != "red_cell"]
        crops = crop_cells(image, detection, self.classifier.image_size)
        reference = self.figures.stain_reference if self.figures else None
        if reference is not None and check["applicable"]:
            from .stain import normalise_crops

            crops = normalise_crops(crops, check["measures"]["plasma"], check["measures"]["density"], reference,
                                    self.figures.plasma_reference)
        _in_time(deadline, "checking the field and cutting its cells", started, limit)
        probabilities = self.score(crops)

        def box(b):
            return [round(b[0] * factor_x), round(b[1] * factor_y), round(b[2] * factor_x), round(b[3] * factor_y)]

        cells = [CellResult(round(item.x * factor_x, 1), round(item.y * factor_y, 1), box(item.bbox),
                            round(float(probability), 6), CLASS_NAMES[int(probability >= self.threshold)])
                 for item, probability in zip(detection.cells, probabilities)]
        excluded = [{"x": round(o.x * factor_x, 1), "y": round(o.y * factor_y, 1), "kind": o.kind, "bbox": box(o.bbox)}
                    for o in detection.excluded]
        self._stage(cells, crops)
        n_cells = len(cells)
        n_parasitized = sum(c.label == CLASS_NAMES[1] for c in cells)
        result = FieldResult(
            path=path, width=width, height=height, frame="stored", quality=quality, n_cells=n_cells,
            n_parasitized=n_parasitized, parasitemia=n_parasitized / n_cells if n_cells else None,
            parasitemia_ci=parasitemia_interval(n_parasitized, n_cells),
            corrected=corrected_parasitemia(n_parasitized, n_cells, self.figures),
            cell_diameter=round(detection.cell_diameter * factor_x, 1), cells=cells, excluded=excluded)
        if truth_cells is not None:
            from .truth import score_field

            result.truth = score_field(result, truth_cells)
        result.seconds = round(time.perf_counter() - started, 3)
        return result, crops, image

    def screen(self, paths: str | os.PathLike | Iterable[str | os.PathLike], *,
               truth: str | os.PathLike | bool | None = None, progress: Callable[[int], None] | None = None,
               on_field: OnField | None = None) -> ScreenResult:
        """Screen field photographs: each folder is one sample, files given directly one more.

        Parameters
        ----------
        paths : path or iterable of paths
            Field images (JPEG, PNG, TIFF, ... any size) or folders of them.
        truth : path or True, optional
            Score against ground truth: NIH point files (``.txt`` beside each image) or
            IML-style JSON. ``True`` looks beside the images only; a path names a JSON file
            or folder.
        progress : callable, optional
            Called with 1 after each field (a progress bar's ``update``).
        on_field : callable, optional
            Called with each field's result, its cell crops and its decoded image as it is done.
        """
        from ..images import read_file

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        groups, skipped = group_samples(paths)
        indexes: dict = {}

        def truth_for(path):
            if not truth:
                return None
            from .truth import read_truth

            return read_truth(path, None if truth is True else truth, indexes)

        samples = [(name, [(str(path), (lambda p=path: read_file(p, max_pixels=self.max_pixels)),
                            (lambda p=path: truth_for(p)))
                           for path in files]) for name, files in groups]
        return self.screen_samples(samples, skipped=skipped, progress=progress, on_field=on_field)

    def screen_samples(self, samples: Iterable[tuple[str, Iterable[tuple]]], *, skipped=(),
                       progress: Callable[[int], None] | None = None, on_field: OnField | None = None,
                       summary_name: str = "all", max_seconds: float | None = None) -> ScreenResult:
        """The one screening loop, over samples of fields from anywhere (files, uploads).

        Parameters
        ----------
        samples : iterable of ``(name, fields)``
            Each field is ``(path, read)`` or ``(path, read, truth)``: its name, a callable
            returning its bytes, and optionally a callable returning its ground truth cells.
            A :class:`~malaria_cells.errors.MalariaCellsError` from either skips that field
            (reported in ``skipped``), and the rest go on.
        skipped : sequence of ``(path, reason)``
            Inputs already refused (they are reported with the rest).
        max_seconds : float, optional
            Time limit for the whole loop (a request's): fields not finished by then are
            reported as not screened, and the result holds the fields that were.

        A field that fails in any way (an unreadable or hostile file, its time limit, a
        decoder's or OpenCV's exception, memory) is reported in ``skipped`` with the reason;
        it never ends the loop.
        """
        skipped = list(skipped)
        max_seconds = _check_seconds(max_seconds, "max_seconds")
        deadline = None if max_seconds is None else time.perf_counter() + max_seconds
        fields, pooled, names = [], [], set()
        for name, items in samples:
            base, name, k = str(name), str(name), 2
            while name in names:  # two folders of one name are still two samples
                name, k = f"{base} ({k})", k + 1
            names.add(name)
            sample_fields, prints = [], []
            for item in items:
                path, read = item[0], item[1]
                try:
                    if deadline is not None and time.perf_counter() > deadline:
                        raise FieldTimeout(f"not screened: the time limit of {max_seconds:g} s for all fields "
                                           "was reached first")
                    truth_cells = item[2]() if len(item) > 2 else None
                    result, crops, image = self.screen_image(read(), path=str(path), truth_cells=truth_cells,
                                                             keep_crops=True, deadline=deadline)
                except MalariaCellsError as error:
                    skipped.append((str(path), str(error)))
                except MemoryError:
                    skipped.append((str(path), "not enough memory to screen this field"))
                except Exception as error:  # noqa: BLE001 - one field's failure must not cost the others
                    skipped.append((str(path), f"could not be screened ({type(error).__name__}: "
                                               f"{str(error).splitlines()[0] if str(error) else 'no detail'})"))
                else:
                    prints.append(fingerprint(image))
                    earlier = next((f for f, p in zip(sample_fields, prints) if same_field(p, prints[-1],
                                                                                          self.applicability)), None)
                    if earlier is not None:
                        _withhold(result, "duplicate", f"the same field as {Path(earlier.path).name}: counted once")
                        crops = crops[:0]
                    result.sample = name
                    sample_fields.append(result)
                    if on_field is not None:
                        on_field(result, crops, image)
                    del image, crops
                if progress is not None:
                    progress(1)
            fields += sample_fields
            if sample_fields:
                pooled.append(self.pool(name, sample_fields))
        summary = self.pool(summary_name, fields) if len(pooled) != 1 else pooled[0]
        return ScreenResult(fields, pooled, summary, skipped, self.describe())

    def pool(self, name: str, fields: Sequence[FieldResult]) -> SampleResult:
        """Pool fields into a sample: counts over its good-quality fields (all, if none is), the
        interval, the corrected estimate and the call."""
        good = [f for f in fields if f.quality.get("ok")]
        counted = good or [f for f in fields if f.quality.get("applicable", True)]
        n_cells = sum(f.n_cells for f in counted)
        n_parasitized = sum(f.n_parasitized for f in counted)
        corrected = corrected_parasitemia(n_parasitized, n_cells, self.figures)
        limits = self.applicability
        hiding = {  # what may hide pale parasites on a counted field, and how to say it
            f"out of focus (border sharpness below {limits.min_sharpness:g}, the least sharp validated)":
                lambda f: f.quality.get("focus", limits.min_sharpness) < limits.min_sharpness,
            f"over-exposed (plasma blown out in {limits.blown_channels}+ channels)":
                lambda f: f.quality.get("checks", {}).get("blown_channels", 0) >= limits.blown_channels,
        }
        unsure = [f for f in good if any(test(f) for test in hiding.values())]
        what = [words for words, test in hiding.items() if any(map(test, unsure))]
        call, reasons = call_sample(n_parasitized, sum(f.n_cells for f in good),
                                    false_positive_rate=self.false_positive_rate, good_fields=len(good),
                                    fields=len(fields), corrected=corrected,
                                    unsure_fields=len(unsure), unsure_reason=" or ".join(what))
        unread = [f for f in fields if not f.quality.get("applicable", True)]
        if unread:
            kinds: dict[str, int] = {}
            for f in unread:
                for flag in f.quality.get("flags", []):
                    kinds[flag] = kinds.get(flag, 0) + 1
            reasons.append(f"{len(unread)} of {len(fields)} fields not read ("
                           + ", ".join(f"{k} {_FLAG_WORDS.get(flag, flag)}" for flag, k in kinds.items()) + ")")
        sample = SampleResult(name, len(fields), n_cells, n_parasitized, n_parasitized / n_cells if n_cells else None,
                              parasitemia_interval(n_parasitized, n_cells), corrected, call, reasons,
                              density=parasite_density(n_parasitized, n_cells, self.rbc_per_ul),
                              stages=stage_counts(counted) if self.stages_enabled and n_parasitized else None)
        scored = [f.truth for f in fields if f.truth]
        if scored:
            from .truth import pool_scores

            sample.truth = pool_scores(scored)
        return sample


def stage_counts(fields: Sequence[FieldResult]) -> dict:
    """Parasitized cells of ``fields`` per life stage (:data:`.stages.STAGES` order)."""
    from .truth import STAGES

    counts = dict.fromkeys(STAGES, 0)
    for item in fields:
        for cell in item.cells:
            if cell.label == CLASS_NAMES[1] and cell.stage in counts:
                counts[cell.stage] += 1
    return counts


_FLAG_WORDS = {"grayscale": "grayscale", "magnification": "at an unsupported magnification",
               "exposure": "under- or over-exposed",
               "not_a_smear": "not a stained smear", "stain": "stained outside the validated range",
               "fragments": "cut into fragments", "duplicate": "duplicates", "no_cells": "without red cells"}


def _check_seconds(value, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not np.isfinite(value):
        raise MalariaCellsError(f"{name} must be a number of seconds above 0, got {value!r}")
    return float(value)


def _in_time(deadline: float | None, step: str, started: float, limit: str) -> None:
    """Raise :class:`FieldTimeout` once ``deadline`` has passed (checked between a field's steps)."""
    now = time.perf_counter()
    if deadline is not None and now > deadline:
        raise FieldTimeout(f"not screened: {limit} ran out after {now - started:.1f} s, while {step}")


def _withhold(result: FieldResult, flag: str, reason: str) -> None:
    """Keep a field in the results but out of every count, with why."""
    quality = result.quality
    quality.update(ok=False, applicable=False, flags=list(quality.get("flags", [])) + [flag],
                   reasons=list(quality.get("reasons", [])) + [reason])
    result.cells, result.n_cells, result.n_parasitized = [], 0, 0
    result.parasitemia = result.parasitemia_ci = result.corrected = result.truth = None


def counting_probability(model, crops: np.ndarray, *, tta_gate: float | None = None) -> np.ndarray:
    """Probability of Parasitized for each field crop, as counting uses it.

    A cell whose crop scores at least ``tta_gate`` (default: the gate the model's field figures
    carry) is scored again as the mean over its 8 rotations and mirrors (test-time
    augmentation), which steadies the scores near the counting threshold; the few cells that
    pass the gate keep the cost low. Without a gate, the plain scores.
    """
    if len(crops) == 0:
        return np.zeros(0)
    # Where a runtime scores batches side by side, batches of one network run (64 crops) keep
    # every core busy on a single field.
    batch = 64 if model.parallel_batches else 512
    probabilities = np.asarray(model.probability(crops, batch_size=batch), dtype=float)
    if tta_gate is None:
        figures = FieldFigures.from_model(model)
        tta_gate = figures.tta_gate if figures else None
    if tta_gate is not None and tta_gate < 1:
        again = np.flatnonzero(probabilities >= tta_gate)
        if len(again):
            probabilities[again] = model.probability(crops[again], tta=True, batch_size=batch // 8)
    return probabilities


def _in_report(path: Path) -> bool:
    """A picture of a report folder (its overlays and their thumbnails), not a field."""
    folder = path.parent.parent if path.parent.name == "small" else path.parent
    return folder.name == "overlays" and (folder.parent / "report.json").is_file()


def group_samples(inputs: Iterable[str | os.PathLike]) -> tuple[list[tuple[str, list[str]]], list[tuple[str, str]]]:
    """Group inputs into samples: each folder is one (its images, recursively), loose files one more."""
    from ..datasets import list_image_files

    samples, loose, skipped = [], [], []
    for item in inputs:
        item = Path(item).expanduser()
        if item.is_dir():
            files, ignored = list_image_files([item])
            # Ground-truth files beside the images are expected there, not skipped images.
            skipped += [(p, why) for p, why in ignored
                        if not (why == "not an image file" and p.lower().endswith((".txt", ".json")))]
            # a report written inside the input folder holds overlays, not more fields of the sample
            files = [p for p in files if not _in_report(Path(p))]
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
           on_field: OnField | None = None, detector: Detector | None = None) -> ScreenResult:
    """Screen field photographs: count red cells, classify them, give parasitemia and a call.

    ``Screener(model, detector, threshold=threshold).screen(paths, ...)``: see
    :class:`Screener` and :meth:`Screener.screen` for the parameters.

    Returns
    -------
    ScreenResult
    """
    return Screener(model, detector, threshold=threshold).screen(paths, truth=truth, progress=progress,
                                                                 on_field=on_field)


def screen_image(contents: bytes, model=None, *, path: str = "<image>", threshold: float | None = None,
                 truth_cells=None, max_pixels: int = MAX_IMAGE_PIXELS, keep_crops: bool = False,
                 detector: Detector | None = None):
    """Screen one field photograph held in memory (see :meth:`Screener.screen_image`)."""
    screener = Screener(model, detector, threshold=threshold, max_pixels=max_pixels)
    return screener.screen_image(contents, path=path, truth_cells=truth_cells, keep_crops=keep_crops)


def pool_fields(name: str, fields: Sequence[FieldResult], model=None, rate: float | None = None) -> SampleResult:
    """Pool fields screened with ``model`` into a sample (see :meth:`Screener.pool`); ``rate``
    overrides the false-positive rate the call weighs counts against."""
    screener = Screener(model)
    if rate is not None:
        screener.false_positive_rate = float(rate)
    return screener.pool(name, fields)
