"""Making a field model: the cell network fine-tuned on field crops, with an honest threshold.

    python -m malaria_cells.fields.training crops --fields DIR [DIR ...] [--check DIR ...] --work W
    python -m malaria_cells.fields.training cv    --work W --cells cell_images/ [--relabels relabels/]
    python -m malaria_cells.fields.training final --work W --cells cell_images/ [--relabels relabels/]
    python -m malaria_cells.fields.training ship  --work W --cells cell_images/ [--shift-suite suite.json]

or the first three in one: ``python -m malaria_cells.fields.training all --fields ... --work W
--cells cell_images/``.

1. **crops**: every field with ground truth (NIH point files or IML-style JSON beside it) is
   screened by the same :class:`~.screener.Screener` as ``malaria-cells screen``; each counted
   cell's crop is labelled by matching it to the truth (unmatched: uninfected, which is what
   the model must say of them in use; a piece of an infected or undecidable cell that the
   detector split: left out, label -2). The ``--fields`` are put in ``recipe.blocks`` blocks
   of consecutive file names (neighbouring numbers are one slide); the ``--check`` fields
   (a healthy patient's) are never trained on and only check false alarms.
2. **cv**: for each block, fine-tune on the others (plus a mix of NIH cell crops whose label
   the published re-annotation does not dispute, every healthy patient's cells as sure
   negatives, and uninfected cells with a stain speck drawn on as hard negatives) and score
   every crop. The nested report scores each block at a threshold chosen on the other blocks'
   out-of-fold scores: what the recipe does on slides it did not see.
3. **final**: train on every block; the counting threshold is the lowest at which at most
   ``recipe.max_fpr`` of the out-of-fold uninfected cells are called, and the model carries it
   with the out-of-fold sensitivity and specificity at it (:class:`~.figures.FieldFigures`).
4. **ship**: copy it into the package with its ONNX copy, kept only if both give the same
   label on every cell of ``--cells``; with ``--shift-suite``, the model carries that report's
   figures (``benchmarks/shift_suite.py --model W/field-model.keras``, run on it before).

Every score is a counting score, as ``screen`` computes it (:func:`~.screener.counting_probability`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields as dataclass_fields
from pathlib import Path

import numpy as np

from ..errors import MalariaCellsError
from .figures import FieldFigures
from .truth import STAGES

__all__ = ["Recipe", "FieldCrops", "cut_crops", "nih_mix", "add_specks", "training_set", "finetune",
           "field_report", "cross_validate", "nested_report", "final_model", "ship", "main"]


@dataclass(frozen=True)
class Recipe:
    """How a field model is made.

    Parameters
    ----------
    epochs, learning_rate : int, float
        Fine-tuning length and peak learning rate (cosine decay, Adam).
    oversample : int
        Times each infected field crop appears in training (they are about 1% of cells).
    nih_cells, nih_parasitized : int, float
        NIH cell crops in the mix, and the Parasitized share of them.
    nih_healthy_repeat : int
        Times the healthy NIH patients' cells (sure negatives) are in the mix.
    holdout_patient : str
        The healthy NIH patient whose field photographs check false alarms: never trained on.
    specks : int
        Hard negatives: uninfected cells with a stain speck drawn on.
    max_fpr : float
        False-positive rate on validation uninfected cells that the threshold allows.
    tta_gate : float
        Cells scoring at least this are scored as the mean of their 8 views (1: never).
    stain_normalise : bool
        Bring every field's cells to the median training field's stain before training and
        scoring (:mod:`.stain`); the model then carries that reference and ``screen`` does the
        same to every field it reads.
    plasma_normalise : bool
        With ``stain_normalise``, also rebuild every crop on the training fields' median plasma
        colour, and shift rather than scale a channel whose plasma is blown out (:mod:`.stain`):
        exposure and white balance then never reach the model. Applies at the crops step.
    augment : str
        Training augmentation (:func:`malaria_cells.augment.augment_cell`): ``"shifts"``, what
        differs between labs at the shift suite's strengths (stain, hue, saturation,
        exposure, gamma, defocus, noise, JPEG), or ``"flips+color"``, flips and mild colour.
    consistency : float
        Weight of a penalty on the squared difference between a cell's score and its score
        under another lab's stain, camera and focus (the ``"shifts"`` augmentation of the same
        cell); 0: none. Augmenting alone teaches the model to score a shifted parasite lower, so
        it sinks below the fixed threshold; this asks for the same score instead. Trains
        without a ``tf.distribute`` strategy only.
    blocks : int
        Cross-validation blocks of consecutive fields.
    seed : int
        Seeds sampling, augmentation and initialisation.
    """

    epochs: int = 8
    learning_rate: float = 2e-4
    oversample: int = 20
    nih_cells: int = 8000
    nih_parasitized: float = 0.25
    nih_healthy_repeat: int = 4
    holdout_patient: str = "C12"
    specks: int = 6000
    max_fpr: float = 0.005
    tta_gate: float = 0.1
    stain_normalise: bool = True
    plasma_normalise: bool = True
    augment: str = "flips+color"
    consistency: float = 0.0
    blocks: int = 5
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "oversample", "blocks"):
            if int(getattr(self, name)) < 1:
                raise MalariaCellsError(f"recipe: {name} must be at least 1, got {getattr(self, name)}")
        if self.blocks < 2:
            raise MalariaCellsError("recipe: blocks must be at least 2 (one held out, one trained on)")
        for name in ("nih_parasitized", "max_fpr", "tta_gate"):
            if not 0 <= getattr(self, name) <= 1:
                raise MalariaCellsError(f"recipe: {name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("nih_cells", "nih_healthy_repeat", "specks", "seed"):
            if int(getattr(self, name)) < 0:
                raise MalariaCellsError(f"recipe: {name} must be at least 0, got {getattr(self, name)}")
        from ..config import AUGMENTATIONS

        if self.augment not in AUGMENTATIONS:
            raise MalariaCellsError(f"recipe: augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        if not (np.isfinite(self.consistency) and self.consistency >= 0):
            raise MalariaCellsError(f"recipe: consistency must be a number >= 0, got {self.consistency}")
        if not self.learning_rate > 0:
            raise MalariaCellsError(f"recipe: learning_rate must be positive, got {self.learning_rate}")


@dataclass
class FieldCrops:
    """Labelled crops of every counted cell of the training fields.

    Attributes
    ----------
    crops : uint8 ``(n, size, size, 3)``
    labels : int ``(n,)``
        1 infected, 0 uninfected (or unmatched), -2 a piece of an infected cell (left out).
    stages : str ``(n,)``
        The matched cell's parasite stage, or ``""``.
    field : int ``(n,)``
        Index into ``records``.
    records : list of dict
        Per field: ``name``, ``check`` (only checks false alarms), ``n_true``,
        ``n_true_parasitized``, ``stages_true``, and its ``plasma`` and cell ``density``.
    stain_reference : list of 3 floats or None
        The median training field's cell density, which every field's crops were brought to
        (None: the crops are as cut).
    plasma_reference : list of 3 floats or None
        The median training field's plasma colour the crops were rebuilt on (None: each
        field's own).
    """

    crops: np.ndarray
    labels: np.ndarray
    stages: np.ndarray
    field: np.ndarray
    records: list
    stain_reference: list | None = None
    plasma_reference: list | None = None

    def save(self, work: Path) -> None:
        from ..files import atomic_path, write_json

        with atomic_path(work / "field_crops.npz") as temporary:
            with open(temporary, "wb") as stream:
                np.savez_compressed(stream, crops=self.crops, labels=self.labels, stages=self.stages, field=self.field)
        write_json(work / "fields.json", {"fields": self.records, "stain_reference": self.stain_reference,
                                          "plasma_reference": self.plasma_reference})

    @classmethod
    def load(cls, work: Path) -> FieldCrops:
        if not (work / "field_crops.npz").is_file():
            raise MalariaCellsError(f"{work}: no field_crops.npz; run the crops step with --work {work} first")
        data = np.load(work / "field_crops.npz")
        meta = json.loads((work / "fields.json").read_text())
        return cls(data["crops"], data["labels"], data["stages"], data["field"], meta["fields"],
                   meta.get("stain_reference"), meta.get("plasma_reference"))

    def healthy_fields(self) -> list[int]:
        """The fields that only check false alarms."""
        return [i for i, r in enumerate(self.records) if r["check"]]

    def block_of(self, blocks: int) -> dict[int, int]:
        """``{field index: block}`` over the training fields, in ``blocks`` runs of consecutive names."""
        ordered = sorted((i for i, r in enumerate(self.records) if not r["check"]), key=lambda i: self.records[i]["name"])
        if len(ordered) < blocks:
            raise MalariaCellsError(f"{len(ordered)} training fields cannot make {blocks} blocks")
        return {int(f): b for b, part in enumerate(np.array_split(np.array(ordered), blocks)) for f in part}


def cut_crops(paths, check=(), screener=None, *, truth=None, stain_normalise: bool = True,
              plasma_normalise: bool = True, log=print) -> FieldCrops:
    """Screen each field image that has ground truth and label its counted cells' crops.

    Parameters
    ----------
    paths : iterable of path
        Training field images or folders of them (recursively).
    check : iterable of path
        Fields that only check false alarms (never trained on).
    screener : Screener, optional
        Default: the shipped detector and field model (the crops do not depend on the model:
        any stain normalisation its figures would apply is left to ``stain_normalise``).
    truth : path, optional
        An annotations file or folder, as ``screen --truth`` takes (default: beside the images).
    stain_normalise : bool
        Bring every field's crops to the median training field's stain (:mod:`.stain`).
    plasma_normalise : bool
        With ``stain_normalise``, rebuild them on the median training field's plasma colour.
    """
    from ..datasets import list_image_files
    from ..images import read_file
    from .screener import Screener
    from .truth import match_result, read_truth

    screener = screener or Screener()
    if screener.figures is not None and screener.figures.stain_reference is not None:
        from dataclasses import replace

        screener.figures = replace(screener.figures, stain_reference=None, plasma_reference=None)  # below, once
    train, _ = list_image_files([Path(p) for p in paths])
    checks, _ = list_image_files([Path(p) for p in check]) if check else ([], [])
    crops, labels, stages, field_index, records = [], [], [], [], []
    for path, checking in sorted([(p, False) for p in train], key=lambda e: Path(e[0]).name) + \
            sorted([(p, True) for p in checks], key=lambda e: Path(e[0]).name):
        annotated = read_truth(path, truth)
        if annotated is None:
            log(f"{path}: no ground truth; left out")
            continue
        result, field_crops, _ = screener.screen_image(read_file(path), path=str(path), keep_crops=True)
        counted, pairs = match_result(result, annotated)
        found = np.array([[c.x, c.y] for c in result.cells]).reshape(-1, 2)
        label, stage = np.full(len(found), 0), [""] * len(found)
        matched = np.zeros(len(found), bool)
        for i, j in pairs:
            label[i], stage[i], matched[i] = int(counted[j].label == "Parasitized"), counted[j].stage or "", True
        unsure = [c for c in annotated if c.label in ("Parasitized", "difficult") and c.width]
        for i in np.flatnonzero(~matched):
            if any(abs(found[i, 0] - c.x) < c.width / 2 and abs(found[i, 1] - c.y) < c.width / 2 for c in unsure):
                label[i] = -2
        number = len(records)
        crops.append(field_crops)
        labels.append(label)
        stages += stage
        field_index.append(np.full(len(found), number))
        checks = result.quality.get("checks", {})
        records.append({"name": Path(path).name, "check": checking, "n_true": len(counted),
                        "plasma": checks.get("plasma"), "density": checks.get("density"),
                        "n_true_parasitized": sum(c.label == "Parasitized" for c in counted),
                        "stages_true": [c.stage for c in counted if c.stage]})
        log(f"{Path(path).name}: {len(found)} cells")
    if not records:
        raise MalariaCellsError("no field with ground truth was found")
    reference = plasma_reference = None
    if stain_normalise:
        from .stain import normalise_crops

        measured = [r["density"] for r in records if not r["check"] and r["density"]]
        if not measured:
            raise MalariaCellsError("no training field could be measured for stain normalisation")
        reference = [round(float(v), 4) for v in np.median(np.array(measured), axis=0)]
        if plasma_normalise:
            plasma = np.median(np.array([r["plasma"] for r in records if not r["check"] and r["density"]]), axis=0)
            plasma_reference = [round(float(v), 1) for v in plasma]
        crops = [normalise_crops(c, r["plasma"], r["density"], reference, plasma_reference) if r["density"] else c
                 for c, r in zip(crops, records)]
    size = screener.classifier.image_size
    return FieldCrops(np.concatenate(crops).reshape(-1, size, size, 3), np.concatenate(labels),
                      np.array(stages, dtype=str), np.concatenate(field_index), records, reference, plasma_reference)


def nih_mix(cells: str | os.PathLike, recipe: Recipe, relabels: str | os.PathLike | None = None,
            image_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """NIH cell crops for the training mix: ``recipe.nih_cells`` crops whose label the
    re-annotation (``relabels``: ``disputed_parasitized.txt``, ``disputed_uninfected.txt``) does
    not dispute, ``recipe.nih_parasitized`` of them Parasitized, plus every cell of the healthy
    patients (``NThinF`` in the file name: no label noise) but ``recipe.holdout_patient``,
    ``recipe.nih_healthy_repeat`` times."""
    from ..datasets import list_cell_images
    from ..pipeline import read_images

    disputed = set()
    if relabels is not None:
        for name in ("disputed_parasitized.txt", "disputed_uninfected.txt"):
            if (Path(relabels) / name).is_file():
                disputed |= set((Path(relabels) / name).read_text().split())
    files = list_cell_images(cells)
    names = [Path(p).name for p in files.paths]
    keep = np.array([name not in disputed for name in names])
    held_out = np.array([name.startswith(recipe.holdout_patient + "N") for name in names])
    healthy = np.array(["NThinF" in name for name in names]) & ~held_out
    keep &= ~healthy & ~held_out  # the held-out patient's cells check false alarms: never trained on
    rng = np.random.default_rng(recipe.seed)
    chosen = list(np.flatnonzero(healthy)) * recipe.nih_healthy_repeat
    for label, share in ((0, 1 - recipe.nih_parasitized), (1, recipe.nih_parasitized)):
        pool = np.flatnonzero(keep & (files.labels == label))
        chosen += list(rng.choice(pool, min(len(pool), int(recipe.nih_cells * share)), replace=False))
    chosen = np.array(chosen, dtype=int)
    unique, inverse = np.unique(chosen, return_inverse=True)
    images, readable, _ = read_images([files.paths[i] for i in unique], image_size)
    if not readable.all():
        raise MalariaCellsError(f"{cells}: {int((~readable).sum())} cell images could not be read")
    return images[inverse], files.labels[chosen].astype(np.float32)


def add_specks(cells: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uninfected cells with a stain speck or platelet fragment on top: one or two short, thin,
    straight dark rods (no parasite stage looks like that: a ring is a ring with a dot, a
    gametocyte fills much of the cell). The hard negatives real fields are full of."""
    import cv2

    out = cells.copy()
    size = cells.shape[1]
    for image in out:
        inside = image.max(axis=2) > 20
        ys, xs = np.nonzero(inside)
        if len(ys) < 50:
            continue
        for _ in range(rng.integers(1, 3)):
            k = rng.integers(len(ys))
            angle, length = rng.uniform(0, np.pi), rng.uniform(0.06, 0.16) * size
            dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
            colour = tuple(int(v) for v in rng.uniform([60, 10, 70], [130, 55, 130]))
            rod = image.copy()
            cv2.line(rod, (int(xs[k] - dx), int(ys[k] - dy)), (int(xs[k] + dx), int(ys[k] + dy)), colour,
                     int(rng.integers(1, 3)), cv2.LINE_AA)
            alpha = rng.uniform(0.6, 0.95)
            image[:] = (alpha * rod + (1 - alpha) * image).astype(np.uint8)
        image[~inside] = 0
    return out


def training_set(data: FieldCrops, fields, mix, recipe: Recipe) -> tuple[np.ndarray, np.ndarray]:
    """Crops of ``fields`` (infected ones ``recipe.oversample`` times), the NIH ``mix`` and the
    speck hard negatives; pieces of infected cells (label -2) are left out."""
    chosen = np.isin(data.field, list(fields)) & (data.labels != -2)
    x, y = data.crops[chosen], data.labels[chosen].astype(np.float32)
    infected = np.flatnonzero(y == 1)
    parts_x, parts_y = [x, np.repeat(x[infected], recipe.oversample - 1, axis=0)], [y, np.ones(len(infected) * (recipe.oversample - 1), np.float32)]
    if mix is not None:
        parts_x.append(mix[0])
        parts_y.append(mix[1])
    x, y = np.concatenate(parts_x), np.concatenate(parts_y)
    if recipe.specks:
        rng = np.random.default_rng(recipe.seed)
        negatives = np.flatnonzero(y == 0)
        picked = rng.choice(negatives, min(recipe.specks, len(negatives)), replace=False)
        x = np.concatenate([x, add_specks(x[picked], rng)])
        y = np.concatenate([y, np.zeros(len(picked), np.float32)])
    return x, y


BATCH_SIZE = 64
"""Cells per training step, over all replicas when a strategy spreads the work."""


def finetune(x: np.ndarray, y: np.ndarray, recipe: Recipe, base=None, strategy=None):
    """The ``base`` cell model (default: the shipped one) fine-tuned on ``(x, y)``.

    ``strategy`` (a ``tf.distribute.Strategy``, see :func:`malaria_cells.distribute.make_strategy`)
    spreads each step's :data:`BATCH_SIZE` cells over its replicas; every worker of a
    multi-worker strategy must call this with the same arrays. The model returned lives
    outside the strategy, so each worker scores and saves it on its own.
    """
    import contextlib

    import keras

    from ..augment import training_dataset
    from ..distribute import build_on_local_batch, check_global_batch, shard_by_data
    from ..runtimes import DEFAULT_MODEL, KerasClassifier, load_model

    base = DEFAULT_MODEL if base is None else base
    if strategy is not None:
        if recipe.consistency:
            raise MalariaCellsError("recipe: consistency training runs without a strategy")
        check_global_batch(BATCH_SIZE, strategy.num_replicas_in_sync)
    keras.utils.set_random_seed(recipe.seed)
    if recipe.consistency:
        from ..augment import paired_dataset

        data = paired_dataset(x, y, batch_size=BATCH_SIZE, augment=recipe.augment, seed=recipe.seed)
    else:
        data = training_dataset(x, y, batch_size=BATCH_SIZE, augment=recipe.augment, seed=recipe.seed)
    with contextlib.nullcontext() if strategy is None else strategy.scope():
        model = load_model(base).keras_model
        if model is None:
            raise MalariaCellsError("the base model must be a .keras file to be fine-tuned")
        steps = int(np.ceil(len(y) / BATCH_SIZE)) * recipe.epochs
        schedule = keras.optimizers.schedules.CosineDecay(recipe.learning_rate, decay_steps=steps)
        trainer = _consistent(model, recipe.consistency) if recipe.consistency else model
        trainer.compile(optimizer=keras.optimizers.Adam(schedule),
                        loss=keras.losses.BinaryCrossentropy(label_smoothing=0.05))
    if strategy is not None:
        data = shard_by_data(data)
        build_on_local_batch(model, strategy)
    trainer.fit(data, epochs=recipe.epochs, verbose=0)
    if strategy is not None:  # the trained weights in a plain copy: scoring needs no other worker
        plain = load_model(base).keras_model
        plain.set_weights(model.get_weights())
        model = plain
    return KerasClassifier(model)


def _consistent(model, weight: float):
    """``model`` inside a trainer whose batches are pairs of views (:func:`.augment.paired_dataset`):
    the loss is the compiled one on the first view plus ``weight`` times the mean squared
    difference between the second view's probability and the first's (held fixed, so the
    shifted view is pulled to the plain one's score, not both towards each other)."""
    import keras
    import tensorflow as tf

    class ConsistentTrainer(keras.Model):
        def __init__(self):
            super().__init__()
            self.inner = model

        def call(self, inputs, training=False):
            return self.inner(inputs, training=training)

        def train_step(self, data):
            (plain, shifted), labels = data
            count = tf.shape(plain)[0]
            with tf.GradientTape() as tape:
                # one pass over both views: batch statistics see each cell stained both ways
                scores = self.inner(tf.concat([plain, shifted], axis=0), training=True)
                first, second = scores[:count], scores[count:]
                loss = self.compute_loss(x=plain, y=labels, y_pred=first)
                loss += weight * tf.reduce_mean(tf.square(second - tf.stop_gradient(first)))
            variables = self.inner.trainable_variables
            self.optimizer.apply(tape.gradient(loss, variables), variables)
            return {"loss": loss}

    return ConsistentTrainer()


def _threshold(probability: np.ndarray, labels: np.ndarray, max_fpr: float) -> float:
    """The lowest threshold calling at most ``max_fpr`` of the uninfected cells (labels 0)."""
    from ..evaluation import threshold_for_specificity

    known = labels >= 0
    return threshold_for_specificity((labels[known] == 1).astype(int), probability[known], 1 - max_fpr)


def field_report(data: FieldCrops, fields, probability: np.ndarray, threshold: float) -> dict:
    """Cell and field figures at ``threshold`` over ``fields``: sensitivity and false-positive
    rate on matched cells, per-field parasitemia error, infected found and stages."""
    mask = np.isin(data.field, list(fields))
    labels, stages, called, field_of = data.labels[mask], data.stages[mask], probability[mask] >= threshold, data.field[mask]
    per_field = []
    for f in fields:
        here = field_of == f
        record = data.records[f]
        per_field.append((record["name"], int(here.sum()), int(called[here].sum()),
                          100 * called[here].sum() / max(1, here.sum()),
                          100 * record["n_true_parasitized"] / max(1, record["n_true"])))
    infected, healthy = labels == 1, labels == 0
    return {"fields": len(per_field), "cells": int(mask.sum()), "threshold": float(threshold),
            "sensitivity": float(called[infected].mean()) if infected.any() else None,
            "false_positive_rate": float(called[healthy].mean()) if healthy.any() else None,
            "parasitemia_mae_points": float(np.mean([abs(row[3] - row[4]) for row in per_field])) if per_field else None,
            "found_of_annotated_infected": [int((called & infected).sum()),
                                            sum(data.records[f]["n_true_parasitized"] for f in fields)],
            "stages": {stage: {"annotated": sum(data.records[f]["stages_true"].count(stage) for f in fields),
                               "detected": int((stages == stage).sum()), "called": int((called & (stages == stage)).sum())}
                       for stage in STAGES},
            "per_field": per_field}


def _out_of_fold(data: FieldCrops, block_of: dict, probabilities) -> np.ndarray:
    oof = np.full(len(data.labels), -1.0)
    for k, probability in enumerate(probabilities):
        here = np.isin(data.field, [f for f, b in block_of.items() if b == k])
        oof[here] = probability[here]
    return oof


def _blocks_threshold(data, block_of, oof, blocks, max_fpr) -> float:
    mask = np.isin(data.field, [f for f, b in block_of.items() if b in blocks])
    return _threshold(oof[mask], data.labels[mask], max_fpr)


def nested_report(data: FieldCrops, block_of: dict, probabilities, max_fpr: float) -> dict:
    """Each block scored by the model that never saw it, at a threshold chosen on the other
    blocks' out-of-fold scores; pooled, with the parasitemia corrected as ``screen`` corrects
    it (by the figures measured on the other blocks) and the false alarms on healthy fields."""
    from .call import corrected_parasitemia

    oof = _out_of_fold(data, block_of, probabilities)
    called = np.zeros(len(oof), bool)
    errors, corrected_errors, per_fold, healthy_fpr, stages = [], [], [], [], {}
    for k, probability in enumerate(probabilities):
        others = [b for b in range(len(probabilities)) if b != k]
        threshold = _blocks_threshold(data, block_of, oof, others, max_fpr)
        fields = [f for f, b in block_of.items() if b == k]
        report = field_report(data, fields, probability, threshold)
        seen = np.isin(data.field, [f for f, b in block_of.items() if b in others])
        figures = FieldFigures(threshold, float((oof[seen & (data.labels == 1)] >= threshold).mean()),
                               float((oof[seen & (data.labels == 0)] < threshold).mean()))
        for _, cells, n_called, _, truth in report["per_field"]:
            corrected = corrected_parasitemia(n_called, cells, figures)
            if corrected is not None:
                corrected_errors.append(abs(100 * corrected["parasitemia"] - truth))
        here = np.isin(data.field, fields)
        called[here] = probability[here] >= threshold
        errors += [abs(row[3] - row[4]) for row in report["per_field"]]
        for stage, counts in report["stages"].items():
            stages[stage] = {key: stages.get(stage, {}).get(key, 0) + value for key, value in counts.items()}
        per_fold.append({key: report[key] for key in ("threshold", "sensitivity", "false_positive_rate",
                                                      "parasitemia_mae_points")})
        if data.healthy_fields():
            healthy_fpr.append(field_report(data, data.healthy_fields(), probability, threshold)["false_positive_rate"])
    infected, uninfected = (oof >= 0) & (data.labels == 1), (oof >= 0) & (data.labels == 0)
    healthy_fpr = [rate for rate in healthy_fpr if rate is not None]
    return {"max_fpr": max_fpr, "fields": len(errors), "sensitivity": float(called[infected].mean()),
            "false_positive_rate": float(called[uninfected].mean()), "parasitemia_mae_points": float(np.mean(errors)),
            "corrected_parasitemia_mae_points": float(np.mean(corrected_errors)) if corrected_errors else None,
            "found_of_annotated_infected": [int((called & infected).sum()),
                                            sum(data.records[f]["n_true_parasitized"] for f in block_of)],
            "stages": stages,
            "healthy_fields_false_positive_rate": ({"mean": float(np.mean(healthy_fpr)), "max": float(np.max(healthy_fpr))}
                                                   if healthy_fpr else None),
            "folds": per_fold}


def cross_validate(data: FieldCrops, mix, recipe: Recipe, work: Path, *, save_models: bool = False,
                   log=print, strategy=None) -> list[dict]:
    """Train one model per held-out block, keep every crop's scores (``work/fold{k}-probability.npy``)
    and return the nested reports at a few false-positive rules around ``recipe.max_fpr``.

    With a ``strategy`` each fold is trained by all its replicas (:func:`finetune`); only its
    chief writes into ``work``."""
    from ..distribute import is_chief
    from .screener import counting_probability

    chief = is_chief(strategy)
    block_of = data.block_of(recipe.blocks)
    probabilities = []
    for k in range(recipe.blocks):
        x, y = training_set(data, [f for f, b in block_of.items() if b != k], mix, recipe)
        model = finetune(x, y, recipe, strategy=strategy)
        probabilities.append(counting_probability(model, data.crops, tta_gate=recipe.tta_gate))
        if chief:
            np.save(work / f"fold{k}-probability.npy", probabilities[-1])
            if save_models:
                model.save(work / f"fold{k}.keras")
        log(f"fold {k}: trained on {len(y)} crops")
    from ..files import write_json

    rules = sorted({recipe.max_fpr, 0.6 * recipe.max_fpr, 0.8 * recipe.max_fpr, 1.2 * recipe.max_fpr,
                    1.6 * recipe.max_fpr})
    nested = [nested_report(data, block_of, probabilities, rule) for rule in rules]
    if chief:
        write_json(work / "recipe.json", asdict(recipe))
        write_json(work / "nested.json", nested)
    return nested


def _check_recipe(work: Path, recipe: Recipe) -> None:
    """Refuse a final model whose recipe differs from the one its out-of-fold scores came from."""
    if not (work / "recipe.json").is_file():
        return
    used = json.loads((work / "recipe.json").read_text())
    differ = sorted(key for key, value in asdict(recipe).items() if key in used and used[key] != value)
    if differ:
        raise MalariaCellsError(f"{work}: the cv step ran with another recipe ({', '.join(differ)} differ); "
                                "give final the same settings, or run cv again")


def _fold_probabilities(work: Path, blocks: int) -> list[np.ndarray]:
    missing = [f"fold{k}-probability.npy" for k in range(blocks) if not (work / f"fold{k}-probability.npy").is_file()]
    if missing:
        raise MalariaCellsError(f"{work}: no {', '.join(missing)}; run the cv step with --work {work} first")
    return [np.load(work / f"fold{k}-probability.npy") for k in range(blocks)]


def final_model(data: FieldCrops, mix, recipe: Recipe, probabilities, *, trained=None, strategy=None):
    """The model to ship: trained on every block (or ``trained``, a model this recipe already
    made), carrying the threshold chosen on all out-of-fold scores and the figures at it.
    ``strategy`` spreads the training as :func:`finetune` does."""
    from .screener import counting_probability

    block_of = data.block_of(recipe.blocks)
    if trained is None:
        x, y = training_set(data, list(block_of), mix, recipe)
        model = finetune(x, y, recipe, strategy=strategy)
        model.info = {**model.info, "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "base": "malaria-cells-default.keras, fine-tuned by malaria_cells.fields.training"}
    else:
        from ..runtimes import load_model

        model = load_model(trained)
    oof = _out_of_fold(data, block_of, probabilities)
    threshold = _blocks_threshold(data, block_of, oof, list(range(recipe.blocks)), recipe.max_fpr)
    labelled = (oof >= 0) & (data.labels >= 0)
    called, labels = oof[labelled] >= threshold, data.labels[labelled]
    healthy = {}
    if data.healthy_fields():
        probability = counting_probability(model, data.crops, tta_gate=recipe.tta_gate)
        report = field_report(data, data.healthy_fields(), probability, threshold)
        healthy = {key: report[key] for key in ("fields", "cells", "false_positive_rate")}
    figures = FieldFigures(
        threshold=threshold, sensitivity=float(called[labels == 1].mean()),
        specificity=1 - float(called[labels == 0].mean()), tta_gate=recipe.tta_gate,
        chosen_on=f"out-of-fold scores of the {len(block_of)} training fields ({recipe.blocks} blocks), "
                  f"at most {recipe.max_fpr:.1%} of their uninfected cells called",
        cells={"infected": int((labels == 1).sum()), "uninfected": int((labels == 0).sum())},
        nested={k: v for k, v in nested_report(data, block_of, probabilities, recipe.max_fpr).items() if k != "folds"},
        nih_healthy=healthy, recipe=asdict(recipe), stain_reference=data.stain_reference,
        plasma_reference=data.plasma_reference)
    figures.attach(model)
    return model


def ship(model_path: Path, cells: str | os.PathLike, *, to: Path | None = None,
         shift_suite: str | os.PathLike | None = None) -> dict:
    """Put a field model in the package (``malaria-cells-fields.keras``, its metadata JSON and its
    ONNX copy), the ONNX copy kept only if both give every cell of ``cells`` the same label.
    ``shift_suite`` names a shift-suite report of this model, whose figures it then carries."""
    import shutil

    from ..export import check_parity, export_model, sidecar_path
    from ..files import atomic_path, write_json
    from ..runtimes import FIELD_MODEL, load_model
    from .figures import shift_suite_summary

    target = FIELD_MODEL if to is None else Path(to) / FIELD_MODEL.name
    model = load_model(model_path)
    figures = FieldFigures.from_model(model)
    if figures is None:
        raise MalariaCellsError(f"{model_path}: carries no field figures; make it with the final step")
    if shift_suite is not None:
        try:
            report = json.loads(Path(shift_suite).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise MalariaCellsError(f"{shift_suite}: cannot read the shift-suite report ({error})") from None
        if not isinstance(report, dict):
            raise MalariaCellsError(f"{shift_suite}: not a report of benchmarks/shift_suite.py")
        reported = Path(str(report.get("model", "")))
        if reported.is_file():  # this model, or another form of it (its ONNX copy), by when it was made
            made = model.info.get("trained_at")
            same = reported.resolve() == Path(model_path).resolve() or (
                made is not None and load_model(reported).info.get("trained_at") == made)
        else:
            same = reported.name == Path(model_path).name
        if not same:
            raise MalariaCellsError(f"{shift_suite}: reports model {report.get('model')!r}, not {model_path}")
        figures = dataclasses.replace(figures, shift_suite=shift_suite_summary(report))
        figures.attach(model)
    if shift_suite is not None:
        model.save(target)  # atomically, with the figures it now carries
    else:
        with atomic_path(target) as temporary:
            shutil.copyfile(model_path, temporary)
    write_json(target.with_suffix(".json"), {**model.info, "file": target.name, "threshold": model.threshold})
    onnx_copy = target.with_suffix(".onnx")
    export_model(target, onnx_copy, format="onnx")
    parity = check_parity(target, onnx_copy, cells)
    if parity["agreement"] < 1.0:
        onnx_copy.unlink()
        sidecar_path(onnx_copy).unlink()
        raise MalariaCellsError(f"the ONNX copy disagreed with the .keras model: {parity}; not shipped")
    return parity


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m malaria_cells.fields.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("crops", "cv", "final", "all", "ship"),
                        help="crops, cv, final, or all three in turn; then ship")
    parser.add_argument("--work", type=Path, required=True, help="folder for crops, fold scores and the model")
    parser.add_argument("--fields", type=Path, nargs="+", help="crops: training field images or folders, with ground truth")
    parser.add_argument("--check", type=Path, nargs="*", default=[],
                        help="crops: fields with ground truth that only check false alarms (a healthy patient's)")
    parser.add_argument("--truth", type=Path, help="crops: annotations file or folder (default: beside the images)")
    parser.add_argument("--cells", type=Path, help="NIH cell_images folder (cv, final: the mix; ship: parity)")
    parser.add_argument("--relabels", type=Path, help="re-annotation folder whose disputed crops are left out")
    parser.add_argument("--save-models", action="store_true", help="cv: keep each fold's model in --work")
    parser.add_argument("--trained", type=Path, help="final: a model this recipe already trained, given new figures")
    parser.add_argument("--to", type=Path, help="ship: a folder instead of the package's pretrained/")
    parser.add_argument("--shift-suite", type=Path, help="ship: a shift-suite report of this model, to carry")
    from ..distribute import STRATEGIES

    parser.add_argument("--strategy", choices=STRATEGIES, default="default",
                        help="cv, final: train each model with tf.distribute: mirrored (every local GPU) or "
                        "multi-worker (one process per machine, each with its TF_CONFIG and the same --work "
                        "folder; only the chief writes) (default: one process, no distribution)")
    for item in dataclass_fields(Recipe):
        flag = "--" + item.name.replace("_", "-")
        if isinstance(item.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=item.default,
                                help=f"recipe (default: {item.default})")
        else:
            parser.add_argument(flag, type=type(item.default), default=item.default, help=f"recipe (default: {item.default})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line of this module (see its docstring)."""
    args = _parser().parse_args(argv)
    try:
        recipe = Recipe(**{item.name: getattr(args, item.name) for item in dataclass_fields(Recipe)})
        strategy = None
        if args.strategy != "default":
            if recipe.consistency:
                raise MalariaCellsError("--consistency trains in one process: leave out --strategy")
            if args.step not in ("cv", "final"):
                raise MalariaCellsError(f"--strategy trains: give it to cv or final, not {args.step} (cut the crops "
                                        "once, into a --work folder every worker reads)")
            from ..distribute import make_strategy

            strategy = make_strategy(args.strategy)  # before any other TensorFlow op (multi-worker)
        from ..distribute import is_chief

        chief = is_chief(strategy)
        args.work.mkdir(parents=True, exist_ok=True)
        if args.step in ("crops", "all"):
            if not args.fields:
                raise MalariaCellsError(f"{args.step} needs --fields")
            cut_crops(args.fields, args.check, truth=args.truth, stain_normalise=recipe.stain_normalise,
                      plasma_normalise=recipe.plasma_normalise).save(args.work)
            if args.step == "crops":
                return 0
        if args.step == "ship":
            if args.cells is None:
                raise MalariaCellsError("ship needs --cells (the parity check scores every cell)")
            parity = ship(args.work / "field-model.keras", args.cells, to=args.to, shift_suite=args.shift_suite)
            print(f"shipped: same label on all {parity['n']} cells "
                  f"(largest difference {parity['max_probability_difference']:.1e})")
            return 0
        data = FieldCrops.load(args.work)
        mix = None
        if args.cells is not None:
            mix = nih_mix(args.cells, recipe, args.relabels, data.crops.shape[1])
        if args.step in ("cv", "all"):
            for row in cross_validate(data, mix, recipe, args.work, save_models=args.save_models,
                                      strategy=strategy):
                if chief:
                    print(json.dumps({k: v for k, v in row.items() if k not in ("folds", "stages")}), flush=True)
            if args.step == "cv":
                return 0
        _check_recipe(args.work, recipe)
        model = final_model(data, mix, recipe, _fold_probabilities(args.work, recipe.blocks), trained=args.trained,
                            strategy=strategy)
        if chief:
            model.save(args.work / "field-model.keras")
            print(json.dumps(model.info["field"], indent=1, default=str))
        return 0
    except MalariaCellsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
