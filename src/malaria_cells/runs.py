"""Run folders: what ``train`` writes and ``retune`` reads, and the typed results both return.

A run folder holds ``config.json`` (written first, with ``status`` ``running``, then
``interrupted`` or ``complete``), ``model.keras`` (with its threshold), its ONNX copy,
``history.csv``, ``metrics.json`` and the plots. Everything that touches the folder's layout
lives here, so a change of layout is one module's change.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MalariaCellsError
from .files import write_json

CONFIG = "config.json"
MODEL = "model.keras"
METRICS = "metrics.json"
HISTORY = "history.csv"


class _ReadsLikeADict:
    """``result["run_dir"]`` keeps working for callers written against the older dict results
    (paths then come back as strings, as they did)."""

    def __getitem__(self, key: str):
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        value = getattr(self, key)
        return str(value) if isinstance(value, Path) else value

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]


@dataclass(frozen=True)
class RunResult(_ReadsLikeADict):
    """What :func:`malaria_cells.train` made.

    Attributes
    ----------
    run_dir, model_path : Path
        The run folder and its ``model.keras`` (best checkpoint by validation loss).
    metrics : dict
        Scores of the test patients (``evaluated_on`` says ``test``, or ``validation``
        when there is no test split), as :func:`malaria_cells.compute_metrics` gives them.
    threshold : float
        The model's own screening threshold, saved inside it.
    threshold_choice : dict
        How the threshold was chosen (rule, validation figures, what limited it).
    interrupted : bool
        Training was stopped with Ctrl-C; the folder holds the best checkpoint so far.
    onnx_path : Path or None
        The model's ONNX copy (None without tf2onnx, or when it disagreed with the model).
    chief : bool
        True, except on the other workers of a multi-worker run: they write nothing (the
        chief writes the run folder, which ``run_dir`` names), and their ``metrics`` and
        ``threshold_choice`` are empty and ``threshold`` is NaN.
    """

    run_dir: Path
    model_path: Path
    metrics: dict
    threshold: float
    threshold_choice: dict
    interrupted: bool
    onnx_path: Path | None
    chief: bool = True


@dataclass(frozen=True)
class RetuneResult(_ReadsLikeADict):
    """What :func:`malaria_cells.retune` changed: the new ``threshold`` and ``threshold_choice``,
    the test patients' ``metrics`` scored again, and the rewritten ``onnx_path`` (or None)."""

    threshold: float
    threshold_choice: dict
    metrics: dict
    onnx_path: Path | None


def check_run_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a run folder that holds someone's files (it is created later, once data is found)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MalariaCellsError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MalariaCellsError(
            f"{out}: folder is not empty; choose a new --out (or pass --overwrite to replace its run files)"
        )
    return out


def versions() -> dict:
    """Versions of what made a model, recorded beside it."""
    import keras
    import tensorflow as tf

    from . import __version__

    return {"malaria_cells": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version(), "numpy": np.__version__}


def machine() -> dict:
    import tensorflow as tf

    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "gpus": len(tf.config.list_physical_devices("GPU"))}


def write_record(run_dir: Path, record: dict) -> None:
    """(Re)write the run's ``config.json``, atomically."""
    write_json(Path(run_dir) / CONFIG, record)


def read_run(run: str | os.PathLike) -> tuple[Path, dict]:
    """A run folder and its ``config.json``, or one line saying why it is not one."""
    run_dir = Path(run).expanduser()
    if not (run_dir / CONFIG).is_file() or not (run_dir / MODEL).is_file():
        raise MalariaCellsError(f"{run_dir}: not a training run folder (needs {CONFIG} and {MODEL})")
    try:
        saved = json.loads((run_dir / CONFIG).read_text())
        for key in ("config", "patients", "data_root"):
            saved[key]  # noqa: B018 - presence check
    except (ValueError, TypeError, KeyError) as error:
        raise MalariaCellsError(f"{run_dir / CONFIG}: not a {CONFIG} written by train ({error})") from None
    return run_dir, saved


def score_run(run_dir: Path, eval_true, eval_prob, groups, threshold: float, evaluated_on: str) -> dict:
    """Write a run's ``metrics.json`` and evaluation plots for its test (or validation) cells."""
    from .evaluation import compute_metrics
    from .plots import plot_evaluation

    metrics = compute_metrics(eval_true, eval_prob, threshold=threshold, groups=groups)
    metrics["evaluated_on"] = evaluated_on
    at_half = compute_metrics(eval_true, eval_prob, threshold=0.5, resamples=0)
    metrics["at_threshold_0.5"] = {k: at_half[k] for k in ("accuracy", "sensitivity", "specificity", "confusion")}
    write_json(Path(run_dir) / METRICS, metrics)
    plot_evaluation(eval_true, eval_prob, threshold, run_dir)
    return metrics
