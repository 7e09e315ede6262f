"""PNG plots of training and evaluation (matplotlib, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .config import CLASS_NAMES
from .files import atomic_path


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5, 4.2), dpi=110)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png")
    plt.close(fig)


def plot_history(history: dict, path: str | os.PathLike) -> None:
    """Loss and accuracy per epoch, training vs validation."""
    fig, ax = _figure()
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for key, style in (("loss", "-"), ("val_loss", "-"), ("accuracy", "--"), ("val_accuracy", "--")):
        if key in history:
            ax.plot(epochs, history[key], style, marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_title("Training curves")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, Path(path))


def plot_evaluation(y_true, y_prob, threshold: float, folder: str | os.PathLike) -> list[Path]:
    """ROC, precision-recall, confusion matrix, score histogram and calibration curve."""
    from sklearn.calibration import CalibrationDisplay
    from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

    folder = Path(folder)
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    written = []

    def draw(name, plot):
        fig, ax = _figure()
        plot(ax)
        _save(fig, folder / name)
        written.append(folder / name)

    if len(np.unique(y_true)) == 2:
        draw("roc.png", lambda ax: RocCurveDisplay.from_predictions(
            y_true, y_prob, ax=ax, name="model", plot_chance_level=True))
        draw("precision_recall.png", lambda ax: PrecisionRecallDisplay.from_predictions(
            y_true, y_prob, ax=ax, name="model"))
        draw("calibration.png", lambda ax: CalibrationDisplay.from_predictions(
            y_true, y_prob, n_bins=10, ax=ax, name="model"))
    draw("confusion_matrix.png", lambda ax: ConfusionMatrixDisplay.from_predictions(
        y_true, (y_prob >= threshold).astype(int), labels=[1, 0],
        display_labels=[CLASS_NAMES[1], CLASS_NAMES[0]], ax=ax, colorbar=False, cmap="Blues"))

    def histogram(ax):
        bins = np.linspace(0, 1, 41)
        for label, name in enumerate(CLASS_NAMES):
            ax.hist(y_prob[y_true == label], bins=bins, alpha=0.6, label=f"true {name}")
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3f}")
        ax.set_yscale("log")
        ax.set_xlabel("probability of Parasitized")
        ax.set_ylabel("cells")
        ax.legend()

    draw("score_histogram.png", histogram)
    return written
