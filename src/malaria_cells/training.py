"""Training recipes and the ``train`` entry point that writes a complete run folder."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import AUGMENTATIONS, COLORS, MODEL_NAMES, SCHEDULES, SPLITS, check_choice, check_image_size
from .config import CLASS_NAMES
from .datasets import list_cell_images, warn_skipped
from .distribute import build_on_local_batch, check_global_batch, is_chief, make_strategy, shard_by_data, worker_count
from .pipeline import read_images
from .augment import evaluation_dataset, training_dataset
from .splits import check_folds, split_dataset
from .errors import MalariaCellsError
from .runs import (HISTORY, MODEL, RetuneResult, RunResult, check_run_dir, machine, read_run, score_run,
                   versions, write_record)


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json``).

    Parameters
    ----------
    data : str, optional
        Dataset folder; default ``./cell_images``, else the download cache.
    model : str
        Architecture (see :data:`malaria_cells.models.MODEL_NAMES`).
    epochs, batch_size : int
        Passes over the training cells, and cells per step.
    image_size : int
        Cells are resized to ``image_size`` x ``image_size``.
    color : {"rgb", "gray"}
        What the network sees.
    split : {"patient", "random"}
        ``patient`` keeps every patient in one part (honest); ``random`` is the
        tutorial's per-image split (leaks patients between parts).
    val_fraction, test_fraction : float
        Test share of all patients (or cells); validation share of the rest.
    folds, fold : int
        Cross-validation instead of ``test_fraction``: test on fold ``fold`` of
        ``folds`` disjoint patient folds (0: no cross-validation).
    seed : int
        Seeds the split, the weights and the augmentation.
    learning_rate : float
        Peak learning rate of Adam(W).
    schedule : {"cosine", "constant"}
        ``cosine``: one epoch of warm-up, then cosine decay to 0.
    weight_decay : float
        AdamW decoupled weight decay (0: plain Adam).
    label_smoothing : float
        Softens the 0/1 targets; tolerates the dataset's mislabelled cells.
    mixup : float
        Mixup's Beta(alpha, alpha) parameter (0: off): blends each training cell and
        its label with another's, which also tolerates mislabelled cells.
    augment : {"none", "flips", "flips+color", "flips+stain", "flips+color+focus", "flips+color+blur"}
        ``flips``: the 8 rotations/mirrors of a cell (it is the same cell);
        ``flips+color`` adds stain colour, saturation, contrast and brightness jitter;
        ``flips+stain`` also varies stain density (optical density scaled 0.5-2x);
        ``flips+color+focus`` adds random blur or sharpening to ``flips+color``;
        ``flips+color+blur`` adds defocus (half the cells, sigma up to 3 px at 64 px).
    stain_normalization : bool
        Divide each cell by its own mean colour inside the model (slides differ).
    ema : bool
        Validate, checkpoint and keep an exponential moving average of the weights
        (Polyak averaging) instead of the last step's weights: steadier on new patients.
    target_sensitivity : float or None
        The threshold is chosen on validation patients to reach this sensitivity;
        None keeps 0.5.
    min_specificity : float
        ...unless that costs more specificity than this floor on validation patients.
    weights : str, optional
        ``imagenet``, ``none`` or a weights file, for Keras Applications models.
    preset : str, optional
        The named recipe these values started from.
    """

    data: str | None = None
    model: str = "cellnet-slim"
    epochs: int = 60
    batch_size: int = 64
    image_size: int = 64
    color: str = "rgb"
    split: str = "patient"
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    folds: int = 0
    fold: int = 0
    seed: int = 0
    learning_rate: float = 3e-3
    schedule: str = "cosine"
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    mixup: float = 0.0
    augment: str = "flips+color"
    stain_normalization: bool = True
    ema: bool = True
    target_sensitivity: float | None = 0.99
    min_specificity: float = 0.93
    weights: str | None = None
    preset: str | None = None

    def validate(self) -> "TrainConfig":
        check_choice(self.model, MODEL_NAMES, "model")
        check_image_size(self.image_size)
        check_choice(self.color, COLORS, "colour")
        check_choice(self.split, SPLITS, "split")
        check_choice(self.schedule, SCHEDULES, "schedule")
        check_choice(self.augment, AUGMENTATIONS, "augmentation")
        check_folds(self.folds, self.fold)
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (0 < self.val_fraction < 1, f"val fraction must be in (0, 1), got {self.val_fraction}"),
            (0 <= self.test_fraction < 1, f"test fraction must be in [0, 1), got {self.test_fraction}"),
            (self.learning_rate > 0, f"learning rate must be positive, got {self.learning_rate}"),
            (0 <= self.weight_decay < 1, f"weight decay must be in [0, 1), got {self.weight_decay}"),
            (0 <= self.label_smoothing < 0.5, f"label smoothing must be in [0, 0.5), got {self.label_smoothing}"),
            (0 <= self.mixup <= 10, f"mixup alpha must be in [0, 10], got {self.mixup}"),
            (self.target_sensitivity is None or 0 < self.target_sensitivity <= 1,
             f"target sensitivity must be in (0, 1], got {self.target_sensitivity}"),
            (0 <= self.min_specificity < 1, f"min specificity must be in [0, 1), got {self.min_specificity}"),
        ]
        for ok, message in checks:
            if not ok:
                raise MalariaCellsError(message)
        return self


PRESETS: dict[str, dict] = {
    "tutorial": dict(
        model="tutorial", image_size=70, color="gray", epochs=3, batch_size=64,
        split="random", test_fraction=0.1, val_fraction=0.2, learning_rate=1e-3,
        schedule="constant", weight_decay=0.0, label_smoothing=0.0, augment="none",
        stain_normalization=False, ema=False, target_sensitivity=None,
    ),
}
"""Named recipes; ``tutorial`` reproduces the tutorial exactly (see docs/SEED.md)."""


def make_config(preset: str | None = None, **options) -> TrainConfig:
    """Defaults, then the preset, then explicit options (None means: not given)."""
    if preset is not None and preset not in PRESETS:
        raise MalariaCellsError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    values = dict(PRESETS.get(preset, {}))
    values.update({k: v for k, v in options.items() if v is not None})
    unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise MalariaCellsError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    return TrainConfig(preset=preset, **values).validate()


def _best_checkpoint(path: Path):
    """A callback that saves the model whenever val_loss improves, atomically."""
    import keras

    from .runtimes import save_keras_model

    class BestCheckpoint(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best = np.inf
            self.best_epoch = None

        def on_epoch_end(self, epoch, logs=None):
            loss = (logs or {}).get("val_loss", np.inf)
            if loss < self.best:
                self.best, self.best_epoch = float(loss), epoch + 1
                save_keras_model(self.model, path)

    return BestCheckpoint()


def resolve_data(data: str | os.PathLike | None) -> Path:
    """The dataset folder: as given, else ``./cell_images``, else the download cache."""
    from .download import cache_dir

    if data is not None:
        return Path(data)
    for candidate in (Path("cell_images"), cache_dir() / "cell_images"):
        if candidate.is_dir():
            return candidate
    raise MalariaCellsError(
        "no dataset found in ./cell_images or the cache: pass --data DIR, or run "
        "`malaria-cells download` to fetch the NIH images (337 MiB)"
    )


def _say(verbose: int, message: str) -> None:
    if verbose:
        print(message, flush=True)


def train(
    config: TrainConfig | None = None,
    out: str | os.PathLike = "runs/latest",
    *,
    overwrite: bool = False,
    verbose: int = 1,
    strategy=None,
    **options,
) -> RunResult:
    """Train a model and write a complete run folder.

    Parameters
    ----------
    config : TrainConfig, optional
        The recipe; or give its fields as keyword arguments (``preset="tutorial"``,
        ``epochs=5``, ...), applied on top of the defaults and preset.
    out : path
        Run folder to create: ``model.keras`` (best checkpoint by validation loss, with
        its threshold), ``config.json``, ``history.csv``, ``metrics.json`` (test
        patients) and PNG plots.
    overwrite : bool
        Allow writing into a non-empty folder.
    verbose : int
        0 silent, 1 progress bar, 2 one line per epoch.
    strategy : {None, "default", "mirrored", "multi-worker"} or tf.distribute.Strategy
        Where training runs (see :mod:`malaria_cells.distribute`): ``None``/``default`` one
        process as always; ``mirrored`` all local GPUs (or the CPU); ``multi-worker`` the
        cluster in the ``TF_CONFIG`` environment variable, every worker running this same
        call. ``batch_size`` is then the global batch (a multiple of the replica count),
        split evenly between replicas. Only the chief writes ``out``; the other workers
        return a result with ``chief`` False.

    Returns
    -------
    RunResult
        ``run_dir``, ``model_path``, ``metrics`` (test split, or validation when there is
        no test split), ``threshold``, ``threshold_choice``, ``interrupted`` and
        ``onnx_path`` (the model's ONNX copy, see :func:`malaria_cells.export.write_onnx_copy`;
        None without tf2onnx).

    Examples
    --------
    >>> from malaria_cells import train
    >>> result = train(data="cell_images", out="runs/tutorial", preset="tutorial")  # doctest: +SKIP
    """
    import keras

    from .export import write_onnx_copy
    from .runtimes import KerasClassifier
    from .models import build_model, model_info_layer
    from .plots import plot_history

    config = (config or make_config(**options)).validate()
    # Before any other TensorFlow op: a multi-worker strategy must be made first.
    strategy = make_strategy(strategy)
    chief = is_chief(strategy)
    replicas = 1 if strategy is None else strategy.num_replicas_in_sync
    check_global_batch(config.batch_size, replicas)
    started = time.time()
    # The other workers save their (identical) checkpoints too, as saving takes every worker, but
    # to a folder of their own that is deleted (the TensorFlow multi-worker Keras guide's way).
    run_dir = check_run_dir(out, overwrite) if chief else Path(tempfile.mkdtemp(prefix="malaria-cells-worker-"))
    if not chief:  # removed at the end, or at exit if training fails
        atexit.register(shutil.rmtree, run_dir, True)
    files = list_cell_images(resolve_data(config.data))
    run_dir.mkdir(parents=True, exist_ok=True)
    _say(verbose, f"Reading {len(files.paths)} images from {files.root} ...")
    load_started = time.time()
    images, readable, skipped = read_images(files.paths, config.image_size)
    load_seconds = time.time() - load_started
    warn_skipped(files.ignored + skipped)
    files = files.subset(np.flatnonzero(readable))
    split = split_dataset(files, method=config.split, val_fraction=config.val_fraction,
                          test_fraction=config.test_fraction, seed=config.seed,
                          folds=config.folds, fold=config.fold)
    patients = split.patients(files)
    _say(verbose, f"Read in {load_seconds:.1f} s. Split by {config.split}: " + ", ".join(
        f"{part} {len(getattr(split, part))} cells / {len(patients[part])} patients"
        for part in ("train", "val", "test")))

    # The folder describes itself from now on: an interrupted run is marked as one and stays
    # usable (retune needs only this file and a checkpoint).
    record = {
        "status": "running", "config": dataclasses.asdict(config), "data_root": str(files.root),
        "class_counts": files.class_counts(),
        "split_counts": {part: len(getattr(split, part)) for part in ("train", "val", "test")},
        "patients": patients, "skipped_files": [list(s) for s in files.ignored + skipped], "versions": versions(),
        "machine": machine(),
    }
    if strategy is not None:
        record["distribution"] = {"strategy": type(strategy).__name__, "replicas": replicas,
                                  "workers": worker_count(strategy), "global_batch_size": config.batch_size}
    write_record(run_dir, record)
    keras.utils.set_random_seed(config.seed)
    train_data = training_dataset(images[split.train], files.labels[split.train],
                                  batch_size=config.batch_size, augment=config.augment, seed=config.seed,
                                  mixup=config.mixup)
    val_data = evaluation_dataset(images[split.val], files.labels[split.val])
    if strategy is not None:
        train_data, val_data = shard_by_data(train_data), shard_by_data(val_data)
    steps = int(np.ceil(len(split.train) / config.batch_size))
    with contextlib.nullcontext() if strategy is None else strategy.scope():
        model = build_model(config.model, image_size=config.image_size, color=config.color,
                            weights=config.weights, stain_normalization=config.stain_normalization)
        model.compile(optimizer=_optimizer(config, steps),
                      loss=keras.losses.BinaryCrossentropy(label_smoothing=config.label_smoothing),
                      metrics=["accuracy", keras.metrics.AUC(name="auc")])
    build_on_local_batch(model, strategy)

    model_path = run_dir / MODEL
    checkpoint = _best_checkpoint(model_path)
    history = keras.callbacks.History()
    interrupted = False
    train_started = time.time()
    try:
        model.fit(train_data, validation_data=val_data, epochs=config.epochs, verbose=verbose, shuffle=False,
                  callbacks=[*_ema_swap(config), checkpoint, history,
                             keras.callbacks.CSVLogger(str(run_dir / HISTORY))])
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: finishing the run folder with the best checkpoint so far", flush=True)
    train_seconds = time.time() - train_started
    if not chief:
        shutil.rmtree(run_dir, ignore_errors=True)
        _say(verbose, f"Worker done in {train_seconds:.1f} s; the chief writes the run folder {out}")
        return RunResult(run_dir=Path(out), model_path=Path(out) / MODEL, metrics={}, threshold=float("nan"),
                         threshold_choice={}, interrupted=interrupted, onnx_path=None, chief=False)
    if checkpoint.best_epoch is None:
        raise MalariaCellsError("training stopped before the first epoch ended; nothing was saved")

    best = KerasClassifier(keras.saving.load_model(model_path, compile=False), model_path)
    val_prob = best.probability(images[split.val])
    val_true = files.labels[split.val]
    threshold, threshold_choice, val_metrics = _operating_point(config, val_true, val_prob)

    info = {
        "name": config.model, "image_size": config.image_size, "color": config.color,
        "class_names": list(CLASS_NAMES), "threshold": threshold,
        "target_sensitivity": config.target_sensitivity, "threshold_choice": threshold_choice,
        "recipe": {k: v for k, v in dataclasses.asdict(config).items() if k != "data"},
        "validation": val_metrics,
        "data": {"root": str(files.root), "cells": len(files.paths), "patients": len(set(files.groups))},
        "best_epoch": checkpoint.best_epoch, "versions": versions(),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    best.set_threshold(threshold)
    best.info = model_info_layer(best.keras_model).info = info
    best.save(model_path)
    onnx_path = write_onnx_copy(best, images[split.val], val_prob)

    eval_part = split.test if len(split.test) else split.val
    eval_prob = val_prob if eval_part is split.val else best.probability(images[eval_part])
    metrics = score_run(run_dir, files.labels[eval_part], eval_prob, [files.groups[i] for i in eval_part],
                         threshold, "test" if len(split.test) else "validation")
    plot_history(history.history, run_dir / "training_curves.png")

    record.update({
        "status": "interrupted" if interrupted else "complete",
        "threshold": threshold, "threshold_choice": threshold_choice, "validation_metrics": val_metrics,
        "best_epoch": checkpoint.best_epoch, "epochs_run": len(history.history.get("loss", [])),
        "interrupted": interrupted,
        "seconds": {"load": round(load_seconds, 2), "train": round(train_seconds, 2),
                    "total": round(time.time() - started, 2)},
    })
    write_record(run_dir, record)
    return RunResult(run_dir=run_dir, model_path=model_path, metrics=metrics, threshold=threshold,
                     threshold_choice=threshold_choice, interrupted=interrupted,
                     onnx_path=None if onnx_path is None else Path(onnx_path))


def _operating_point(config: TrainConfig, val_true, val_prob) -> tuple[float, dict, dict]:
    """The threshold the recipe asks for, chosen on validation cells: (threshold, choice, metrics)."""
    from .evaluation import choose_threshold, compute_metrics

    threshold, threshold_choice = 0.5, {"threshold": 0.5, "limited_by": "fixed"}
    if config.target_sensitivity is not None:
        threshold_choice = choose_threshold(val_true, val_prob, config.target_sensitivity, config.min_specificity)
        threshold = threshold_choice["threshold"]
    val_metrics = compute_metrics(val_true, val_prob, threshold=threshold, resamples=0)
    return threshold, threshold_choice, {k: val_metrics[k] for k in ("n", "accuracy", "sensitivity", "specificity", "auc")}


def retune(
    run: str | os.PathLike,
    *,
    target_sensitivity: float | None = None,
    min_specificity: float | None = None,
    data: str | os.PathLike | None = None,
) -> RetuneResult:
    """Choose a trained run's screening threshold again, for another operating point.

    No retraining: the threshold is a choice made after training on the run's validation
    patients (listed in its ``config.json``), so this gives the same model ``train`` would
    have saved with these settings. ``model.keras``, ``config.json``, ``metrics.json``
    (its test patients, scored again) and the plots are rewritten, each atomically.

    Parameters
    ----------
    run : path
        A run folder written by :func:`train`.
    target_sensitivity, min_specificity : float, optional
        The new rule (see :class:`TrainConfig`); a value not given keeps the run's own.
    data : path, optional
        Where the run's images are now, if not where they were when it was trained.

    Returns
    -------
    RetuneResult
        ``threshold``, ``threshold_choice``, ``metrics`` and ``onnx_path`` (the rewritten
        ONNX copy, or None).
    """
    from .export import write_onnx_copy
    from .runtimes import KerasClassifier, load_model
    from .models import model_info_layer

    run_dir, saved = read_run(run)
    patients, data_root = saved["patients"], saved["data_root"]
    try:
        recipe = TrainConfig(**saved["config"])
    except TypeError as error:
        raise MalariaCellsError(f"{run_dir / 'config.json'}: not a config.json written by train ({error})") from None
    changes = {k: v for k, v in (("target_sensitivity", target_sensitivity), ("min_specificity", min_specificity))
               if v is not None}
    config = dataclasses.replace(recipe, **changes).validate()
    model = load_model(run_dir / MODEL)
    if not isinstance(model, KerasClassifier):
        raise MalariaCellsError(f"{run_dir}: retune needs the run's model.keras")
    files = list_cell_images(data if data is not None else data_root)
    groups = np.array(files.groups)
    parts, cells = {}, {}
    for part in ("val", "test"):
        index = np.flatnonzero(np.isin(groups, patients[part]))
        cells[part], readable, _ = read_images([files.paths[i] for i in index], model.image_size)
        parts[part] = (files.labels[index][readable], model.probability(cells[part]), list(groups[index][readable]))
    if len(parts["val"][0]) == 0:
        raise MalariaCellsError(f"{files.root}: none of the run's validation patients' images are here (use --data)")

    threshold, threshold_choice, val_metrics = _operating_point(config, *parts["val"][:2])
    info = {**model.info, "threshold": threshold, "target_sensitivity": config.target_sensitivity,
            "threshold_choice": threshold_choice, "validation": val_metrics,
            "recipe": {k: v for k, v in dataclasses.asdict(config).items() if k != "data"}}
    model.set_threshold(threshold)
    model.info = model_info_layer(model.keras_model).info = info
    model.save(run_dir / MODEL)
    onnx_path = write_onnx_copy(model, cells["val"], parts["val"][1])

    part = "test" if len(parts["test"][0]) else "val"
    metrics = score_run(run_dir, *parts[part], threshold, "test" if part == "test" else "validation")
    write_record(run_dir, {**saved, "config": dataclasses.asdict(config), "threshold": threshold,
                           "threshold_choice": threshold_choice, "validation_metrics": val_metrics})
    return RetuneResult(threshold=threshold, threshold_choice=threshold_choice, metrics=metrics,
                        onnx_path=None if onnx_path is None else Path(onnx_path))


def _optimizer(config: TrainConfig, steps_per_epoch: int):
    import keras

    learning_rate = config.learning_rate
    if config.schedule == "cosine":
        warmup = min(steps_per_epoch, config.epochs * steps_per_epoch // 4)
        learning_rate = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=max(1, config.epochs * steps_per_epoch - warmup),
            warmup_target=config.learning_rate, warmup_steps=warmup,
        )
    ema = dict(use_ema=True, ema_momentum=0.99) if config.ema else {}
    if config.weight_decay:
        return keras.optimizers.AdamW(learning_rate, weight_decay=config.weight_decay, **ema)
    return keras.optimizers.Adam(learning_rate, **ema)


def _ema_swap(config: TrainConfig) -> list:
    """With EMA, validation and the checkpoint (placed after this) see the averaged weights."""
    import keras

    return [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if config.ema else []


