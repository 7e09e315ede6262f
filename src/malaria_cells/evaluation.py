"""Clinically meaningful scores: sensitivity first, with confidence intervals."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .config import CLASS_NAMES
from .datasets import list_cell_images, patient_id, warn_skipped
from .errors import MalariaCellsError
from .proportions import binomial_tail, wilson_interval  # noqa: F401  (part of this module's API)

RATES = ("accuracy", "sensitivity", "specificity", "precision")
"""Proportions, given Wilson 95% intervals."""
BOOTSTRAPPED = ("f1", "mcc", "auc")
"""Other scores, given percentile-bootstrap 95% intervals (by patient when known)."""


def threshold_for_sensitivity(y_true, y_prob, target: float) -> float:
    """The highest threshold whose sensitivity on (y_true, y_prob) is at least ``target``.

    A cell is called Parasitized when its probability is >= the threshold.
    """
    if not 0 < target <= 1:
        raise MalariaCellsError(f"target sensitivity must be in (0, 1], got {target}")
    positives = np.sort(np.asarray(y_prob)[np.asarray(y_true) == 1])[::-1]
    if len(positives) == 0:
        raise MalariaCellsError("cannot choose a threshold: no Parasitized cells in validation data")
    needed = int(np.ceil(target * len(positives) - 1e-9))
    cut = positives[max(needed, 1) - 1]
    below = np.asarray(y_prob)[np.asarray(y_prob) < cut]
    # Halfway to the next lower score, so that float noise (another runtime, an export)
    # cannot flip the cell that sits exactly on the threshold.
    return float((cut + below.max()) / 2 if len(below) else cut)


def threshold_for_specificity(y_true, y_prob, target: float) -> float:
    """The lowest threshold whose specificity on (y_true, y_prob) is at least ``target``."""
    if not 0 < target <= 1:
        raise MalariaCellsError(f"target specificity must be in (0, 1], got {target}")
    negatives = np.sort(np.asarray(y_prob)[np.asarray(y_true) == 0])
    if len(negatives) == 0:
        raise MalariaCellsError("cannot choose a threshold: no Uninfected cells in validation data")
    needed = int(np.ceil(target * len(negatives) - 1e-9))
    cut = negatives[max(needed, 1) - 1]
    above = np.asarray(y_prob)[np.asarray(y_prob) > cut]
    return float((cut + above.min()) / 2 if len(above) else np.nextafter(cut, np.inf))


def choose_threshold(y_true, y_prob, target_sensitivity: float, min_specificity: float = 0.0) -> dict:
    """Screening threshold: reach ``target_sensitivity``, unless specificity falls below the floor.

    Returns a dict with ``threshold`` and what it gives on these cells; ``limited_by`` says
    which rule set it ("sensitivity" or "specificity"). A single odd validation patient
    (unusual stain, doubtful labels) can otherwise drag the threshold to near 0 and make
    every cell a false alarm.
    """
    threshold = threshold_for_sensitivity(y_true, y_prob, target_sensitivity)
    limited_by = "sensitivity"
    if min_specificity > 0:
        floor = threshold_for_specificity(y_true, y_prob, min_specificity)
        if floor > threshold:
            threshold, limited_by = floor, "specificity"
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    called = y_prob >= threshold
    return {"threshold": threshold, "limited_by": limited_by,
            "target_sensitivity": target_sensitivity, "min_specificity": min_specificity,
            "sensitivity": float(called[y_true == 1].mean()), "specificity": float((~called[y_true == 0]).mean())}


def _scores(y_true, y_prob, y_pred) -> dict:
    from sklearn.metrics import f1_score, matthews_corrcoef, roc_auc_score

    both = len(np.unique(y_true)) == 2
    return {
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "mcc": float(matthews_corrcoef(y_true, y_pred)) if both else float("nan"),
        "auc": float(roc_auc_score(y_true, y_prob)) if both else float("nan"),
    }


def expected_calibration_error(y_true, y_prob, bins: int = 10) -> float:
    """Mean |observed - predicted| rate over equal-width probability bins, weighted by size."""
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    which = np.minimum((y_prob * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(y_true[members].mean() - y_prob[members].mean())
    return float(error)


_BOOTSTRAP_BLOCK_CELLS = 2_000_000  # resamples x cells weighed at once (16 MB of weights)


def _bootstrap(y_true, y_prob, y_pred, groups, resamples: int, seed: int) -> dict:
    """Percentile intervals of F1, MCC and AUC over bootstrap resamples.

    A resample is a vector of multiplicities (how often each cell is drawn), so all
    resamples are scored at once with weighted counts instead of a Python loop. With
    patient ids, whole patients are drawn: cells of one patient are not independent.
    """
    rng = np.random.default_rng(seed)
    n = len(y_true)
    by_patient = groups is not None and len(set(groups)) >= 10
    if by_patient:
        _, member_of = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
        n_groups = member_of.max() + 1
    positive, called = y_true == 1, y_pred == 1
    f1, mcc, auc = [], [], []
    # A block of resamples at a time: one weight matrix for all of them is resamples x cells
    # (1.3 GB for 1,000 resamples of 160,000 cells); the draws are the same either way.
    block = max(1, min(resamples, _BOOTSTRAP_BLOCK_CELLS // max(n, 1)))
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        if by_patient:
            weights = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size)[:, member_of]
        else:
            weights = rng.multinomial(n, np.full(n, 1 / n), size)
        weights = weights.astype(np.float64)
        tp = weights @ (positive & called)
        fp = weights @ (~positive & called)
        fn = weights @ (positive & ~called)
        tn = weights @ (~positive & ~called)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1.append(2 * tp / (2 * tp + fp + fn))
            mcc.append((tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
            auc.append(_weighted_auc(y_true, y_prob, weights))
    f1, mcc, auc = np.concatenate(f1), np.concatenate(mcc), np.concatenate(auc)
    return {
        name: [float(v) for v in np.nanpercentile(values, [2.5, 97.5])]
        if np.isfinite(values).any() else [float("nan")] * 2
        for name, values in (("f1", f1), ("mcc", mcc), ("auc", auc))
    }


def _weighted_auc(y_true, y_prob, weights) -> np.ndarray:
    """ROC AUC (ties count one half) for each row of case weights."""
    order = np.argsort(y_prob, kind="stable")
    scores, labels, weights = y_prob[order], y_true[order], weights[:, order]
    starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
    negatives = np.add.reduceat(weights * (labels == 0), starts, axis=1)
    positives = np.add.reduceat(weights * (labels == 1), starts, axis=1)
    below = np.cumsum(negatives, axis=1) - negatives
    wins = np.sum(positives * (below + 0.5 * negatives), axis=1)
    return wins / (positives.sum(axis=1) * negatives.sum(axis=1))


def compute_metrics(
    y_true: Sequence[int],
    y_prob: Sequence[float],
    *,
    threshold: float = 0.5,
    groups: Sequence[str | None] | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Score probabilities against labels at a threshold.

    Parameters
    ----------
    y_true : array of {0, 1}
        1 for Parasitized.
    y_prob : array of float
        Predicted probability of Parasitized.
    threshold : float
        Cells with probability >= threshold are called Parasitized.
    groups : array of str, optional
        Patient of each cell: gives per-patient figures, and bootstrap intervals
        that resample patients (cells of a patient are not independent).
    resamples : int
        Bootstrap resamples for the F1, MCC and AUC intervals (0: none).

    Returns
    -------
    dict
        ``n``, ``accuracy``, ``sensitivity``, ``specificity``, ``precision``, ``f1``,
        ``auc``, ``mcc``, ``threshold``, ``confusion`` (tp, fp, tn, fn), ``ci`` (95%
        interval of each score), ``brier``, ``ece`` and, with groups, ``patients``.
    """
    y_true = np.asarray(y_true, dtype=int)
    y_prob = np.asarray(y_prob, dtype=float)
    if y_true.shape != y_prob.shape or y_true.ndim != 1:
        raise MalariaCellsError("labels and probabilities must be 1-D arrays of one length")
    if len(y_true) == 0:
        raise MalariaCellsError("nothing to evaluate: no readable images")
    y_pred = (y_prob >= threshold).astype(int)
    tp = int(np.sum((y_pred == 1) & (y_true == 1)))
    fp = int(np.sum((y_pred == 1) & (y_true == 0)))
    tn = int(np.sum((y_pred == 0) & (y_true == 0)))
    fn = int(np.sum((y_pred == 0) & (y_true == 1)))
    fractions = {
        "accuracy": (tp + tn, len(y_true)),
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
        "precision": (tp, tp + fp),
    }
    metrics: dict = {"n": int(len(y_true)), "n_parasitized": tp + fn, "n_uninfected": tn + fp}
    for name, (k, n) in fractions.items():
        metrics[name] = k / n if n else float("nan")
    metrics.update(_scores(y_true, y_prob, y_pred))
    metrics["threshold"] = float(threshold)
    metrics["confusion"] = {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    metrics["brier"] = float(np.mean((y_prob - y_true) ** 2))
    metrics["ece"] = expected_calibration_error(y_true, y_prob)
    metrics["ci"] = {name: wilson_interval(k, n) for name, (k, n) in fractions.items()}
    if resamples:
        metrics["ci"].update(_bootstrap(y_true, y_prob, y_pred, groups, resamples, seed))
    metrics["ci_method"] = (
        "Wilson score for accuracy, sensitivity, specificity, precision; percentile "
        "bootstrap for f1, mcc, auc"
        + (" resampling patients" if groups is not None and len(set(groups)) >= 10 else "")
    )
    if groups is not None:
        metrics["patients"] = per_patient(y_true, y_pred, groups)
    return metrics


def per_patient(y_true, y_pred, groups) -> list[dict]:
    """Per patient: cells, true and predicted parasitized fraction, errors."""
    rows = []
    groups = np.asarray([g if g is not None else "" for g in groups])
    for group in sorted(set(groups)):
        members = groups == group
        rows.append({
            "patient": group or "(no id)",
            "cells": int(members.sum()),
            "true_parasitized": float(y_true[members].mean()),
            "predicted_parasitized": float(y_pred[members].mean()),
            "errors": int(np.sum(y_true[members] != y_pred[members])),
        })
    return rows


def score_files(model, paths: Sequence[str], batch_size: int = 256, tta: bool = False):
    """Probabilities for image files; returns (probabilities, readable mask, skipped)."""
    from .inference import predict_files

    position = {p: i for i, p in enumerate(paths)}
    probabilities = np.full(len(paths), np.nan)
    skipped: list = []
    for prediction in predict_files(paths, model, model.threshold, batch_size=batch_size, tta=tta,
                                    skipped=skipped):
        probabilities[position[prediction.path]] = prediction.probability
    return probabilities, ~np.isnan(probabilities), skipped


def evaluate(
    model=None,
    data: str | os.PathLike = "cell_images",
    *,
    threshold: float | None = None,
    batch_size: int = 256,
    plots: str | os.PathLike | None = None,
    resamples: int = 1000,
    tta: bool = False,
) -> dict:
    """Score a model on a labelled folder (``Parasitized/`` and ``Uninfected/`` inside).

    Parameters
    ----------
    model : path or CellClassifier, optional
        Defaults to the model shipped with the package.
    data : path
        Labelled dataset folder.
    threshold : float, optional
        Overrides the model's stored threshold.
    plots : path, optional
        Folder to draw ROC, precision-recall, confusion, score histogram and
        calibration plots into.
    tta : bool
        Average over the 8 rotations/mirrors of each cell.

    Returns
    -------
    dict
        See :func:`compute_metrics`; also ``model`` and ``data``.
    """
    from .runtimes import check_threshold, load_model

    model = load_model(model)
    threshold = model.threshold if check_threshold(threshold) is None else threshold
    files = list_cell_images(data)
    probabilities, readable, skipped = score_files(model, files.paths, batch_size, tta)
    warn_skipped(files.ignored + skipped)
    labels = files.labels[readable]
    paths = [p for p, ok in zip(files.paths, readable) if ok]
    groups = [patient_id(p) for p in paths]
    metrics = compute_metrics(
        labels, probabilities[readable], threshold=threshold,
        groups=groups if any(groups) else None, resamples=resamples,
    )
    metrics = {"model": model.path, "data": str(files.root), "n_skipped": len(files.ignored + skipped), **metrics}
    if plots is not None:
        from .plots import plot_evaluation

        plot_evaluation(labels, probabilities[readable], threshold, plots)
    return metrics


def format_report(metrics: dict) -> str:
    """Human-readable text of :func:`compute_metrics` output."""
    ci = metrics.get("ci", {})
    lines = [f"{metrics['n']} cells ({metrics['n_parasitized']} {CLASS_NAMES[1]}, "
             f"{metrics['n_uninfected']} {CLASS_NAMES[0]}), threshold {metrics['threshold']:.4f}", ""]
    for name in ("sensitivity", "specificity", "accuracy", "precision", "f1", "mcc", "auc"):
        low, high = ci.get(name, [float("nan")] * 2)
        lines.append(f"  {name:<12} {metrics[name]:7.4f}   95% CI [{low:.4f}, {high:.4f}]")
    lines.append(f"  {'brier':<12} {metrics['brier']:7.4f}")
    lines.append(f"  {'ece':<12} {metrics['ece']:7.4f}")
    c = metrics["confusion"]
    lines += ["", "  confusion         predicted P   predicted U",
              f"  true Parasitized  {c['tp']:>11}   {c['fn']:>11}",
              f"  true Uninfected   {c['fp']:>11}   {c['tn']:>11}"]
    if metrics.get("patients"):
        lines += ["", "  patient     cells  true P   pred P  errors"]
        for row in metrics["patients"]:
            lines.append(
                f"  {row['patient']:<10} {row['cells']:>6} {row['true_parasitized']:>7.1%} "
                f"{row['predicted_parasitized']:>8.1%} {row['errors']:>7}"
            )
    return "\n".join(lines)
