"""Does test-time augmentation (``--tta``) pay for itself? Measured on validation patients.

    python benchmarks/tta.py RUN_DIR [RUN_DIR ...]

For each training run folder, scores its validation patients (read from ``config.json``;
never its test patients) with and without TTA, and prints ROC AUC and the sensitivity
reached at 95% and 97% specificity: the question is whether the 8 rotations/mirrors find
more infected cells at the same false-alarm rate.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from _common import run_folder, validation_cells

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SPECIFICITIES = (0.95, 0.97)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=run_folder, help="training run folders (model.keras + config.json)")
    args = parser.parse_args()

    from sklearn.metrics import roc_auc_score, roc_curve

    print("| run | TTA | val cells | ROC AUC % | " + " | ".join(f"sensitivity at {s:.0%} specificity %"
                                                             for s in SPECIFICITIES) + " |")
    print("|---|---|---|---|" + "---|" * len(SPECIFICITIES))
    for run in args.runs:
        model, images, labels, _ = validation_cells(run)
        for tta in (False, True):
            scores = model.probability(images, tta=tta)
            fpr, tpr, _ = roc_curve(labels, scores)
            # the best sensitivity whose false-positive rate stays within 1 - specificity
            sensitivity = [tpr[fpr <= 1 - s].max() for s in SPECIFICITIES]
            print(f"| {Path(run).name} | {'yes' if tta else 'no'} | {len(labels)} | "
                  f"{100 * roc_auc_score(labels, scores):.2f} | "
                  + " | ".join(f"{100 * v:.2f}" for v in sensitivity) + " |", flush=True)


if __name__ == "__main__":
    main()
