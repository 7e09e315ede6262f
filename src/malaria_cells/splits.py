"""Splitting a dataset into train, validation and test parts, by patient (or by cell)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .datasets import CellImageFiles
from .errors import MalariaCellsError

__all__ = ["Split", "split_dataset", "check_folds"]


def check_folds(folds: int, fold: int) -> None:
    """The one rule for cross-validation settings: ``folds`` 0 (none) or >= 2, ``fold`` in 0..folds-1."""
    if folds == 1 or folds < 0 or (folds and not 0 <= fold < folds) or (not folds and fold):
        raise MalariaCellsError(f"fold must be 0 to folds-1 with folds >= 2 (or folds 0: no cross-validation), "
                                f"got fold {fold} of {folds}")


@dataclass
class Split:
    """Indices into a :class:`CellImageFiles` for each part of a split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def patients(self, files: CellImageFiles) -> dict[str, list[str]]:
        groups = files.groups
        return {
            part: sorted({groups[i] for i in getattr(self, part)})
            for part in ("train", "val", "test")
        }


def split_dataset(
    files: CellImageFiles,
    *,
    method: str = "patient",
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    folds: int = 0,
    fold: int = 0,
) -> Split:
    """Split a dataset into train, validation and test parts.

    Parameters
    ----------
    method : {"patient", "random"}
        ``"patient"`` puts all cells of a patient in one part, drawing healthy and
        infected patients separately so that every part holds both kinds of patient
        and both classes. ``"random"`` splits cells one by one, stratified by class,
        as the tutorial does (patients leak between parts and scores are flattered).
    val_fraction : float
        Share of what remains after the test part that goes to validation.
    test_fraction : float
        Share of patients (or cells, for ``"random"``) held out for testing; 0 keeps
        no test part.
    seed : int
        The same seed and files always give the same split.
    folds, fold : int
        Cross-validation: with ``folds`` = K > 1, the test part is fold ``fold``
        (0 to K-1) of K disjoint parts (``test_fraction`` is then ignored), so that K
        runs with the same seed test every patient (or cell) exactly once.
    """
    if method not in ("patient", "random"):
        raise MalariaCellsError(f"unknown split {method!r}: use 'patient' or 'random'")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise MalariaCellsError(f"{name} must be in [0, 1), got {value}")
    check_folds(folds, fold)
    if method == "random":
        return _random_split(files.labels, val_fraction, test_fraction, seed, folds, fold)
    return _patient_split(files, val_fraction, test_fraction, seed, folds, fold)


def _random_split(labels, val_fraction, test_fraction, seed, folds=0, fold=0) -> Split:
    from sklearn.model_selection import StratifiedKFold, train_test_split

    index = np.arange(len(labels))
    test = np.array([], dtype=int)
    if folds:
        index, test = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(index, labels))[fold]
    elif test_fraction:
        index, test = train_test_split(
            index, test_size=test_fraction, stratify=labels, random_state=seed
        )
    train, val = train_test_split(
        index, test_size=val_fraction, stratify=labels[index], random_state=seed + 1
    )
    return Split(np.sort(train), np.sort(val), np.sort(test))


def _patient_split(files: CellImageFiles, val_fraction, test_fraction, seed, folds=0, fold=0) -> Split:
    groups = np.array(files.groups)
    infected = {g for g, y in zip(groups, files.labels) if y == 1}
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for stratum in (sorted(set(groups) - infected), sorted(infected)):
        stratum = list(rng.permutation(stratum))
        if folds:
            chunks = [[str(g) for g in chunk] for chunk in np.array_split(stratum, folds)]
            # The folds after the test fold come next, so validation patients rotate with
            # the fold: each fold's threshold and epoch are chosen on different patients.
            stratum = [g for chunk in chunks[fold:] + chunks[:fold] for g in chunk]
            n_test = len(chunks[fold])
        else:
            n_test = _share(len(stratum), test_fraction)
        n_val = _share(len(stratum) - n_test, val_fraction)
        parts["test"] += stratum[:n_test]
        parts["val"] += stratum[n_test : n_test + n_val]
        parts["train"] += stratum[n_test + n_val :]
    index = {
        part: np.flatnonzero(np.isin(groups, members)) for part, members in parts.items()
    }
    for part, members in index.items():
        wanted = part != "test" or test_fraction > 0 or folds > 0
        if wanted and (len(members) == 0 or len(set(files.labels[members])) < 2):
            raise MalariaCellsError(
                f"too few patients to give the {part} split both classes "
                f"({len(set(groups))} patients): add data or use --split random"
            )
    return Split(index["train"], index["val"], index["test"])


def _share(n: int, fraction: float) -> int:
    """Round n * fraction, keeping at least one member when the fraction is not 0."""
    if fraction == 0 or n == 0:
        return 0
    return int(min(n - 1, max(1, round(n * fraction)))) if n > 1 else 0
