"""How well does a threshold chosen on some patients hold on others? Validation data only.

    python benchmarks/threshold_stability.py RUN_DIR [RUN_DIR ...] [--targets 0.98 0.99]
        [--min-specificity 0.95 0.93]

For each training run folder, splits its validation patients (from ``config.json``; the
test patients are never read) into two random halves many times, chooses the threshold
for each target sensitivity and specificity floor on one half exactly as ``train`` does
(:func:`malaria_cells.evaluation.choose_threshold`), and measures sensitivity and
specificity on the other half. If the held-out half falls well short of
the target, a more cautious threshold rule would pay; if not, a gap on test patients comes
from the patients, not from the threshold.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from _common import run_folder, validation_cells

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=run_folder, help="training run folders (model.keras + config.json)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.98, 0.99, 0.995])
    parser.add_argument("--min-specificity", type=float, nargs="+", default=[0.0],
                        help="specificity floors to try with each target (0: no floor, as before)")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    from malaria_cells.evaluation import choose_threshold

    rng = np.random.default_rng(0)
    rules = [(target, floor) for target in args.targets for floor in args.min_specificity]
    print("| run | target sensitivity | specificity floor | other half: sensitivity % | other half: specificity % |")
    print("|---|---|---|---|---|")
    totals = {rule: [] for rule in rules}
    for run in args.runs:
        model, images, labels, groups = validation_cells(run)
        scores = model.probability(images)
        patients = np.unique(groups)
        results = {rule: [] for rule in rules}
        for _ in range(args.repeats):
            chosen = np.isin(groups, rng.permutation(patients)[: len(patients) // 2])
            if len(set(labels[chosen])) < 2 or len(set(labels[~chosen])) < 2:
                continue
            other_scores, other_labels = scores[~chosen], labels[~chosen]
            for target, floor in rules:
                threshold = choose_threshold(labels[chosen], scores[chosen], target, floor)["threshold"]
                results[target, floor].append((np.mean(other_scores[other_labels == 1] >= threshold),
                                        np.mean(other_scores[other_labels == 0] < threshold)))
        for (target, floor), values in results.items():
            sensitivity, specificity = np.mean(values, axis=0)
            totals[target, floor].append((sensitivity, specificity))
            print(f"| {Path(run).parent.name}/{Path(run).name} | {target:.3f} | {floor:.3f} | {100 * sensitivity:.2f} "
                  f"| {100 * specificity:.2f} |", flush=True)
    for (target, floor), values in totals.items():
        sensitivity, specificity = np.mean(values, axis=0)
        print(f"| mean | {target:.3f} | {floor:.3f} | {100 * sensitivity:.2f} | {100 * specificity:.2f} "
              f"(lowest run {100 * np.min(values, axis=0)[1]:.2f}) |")


if __name__ == "__main__":
    main()
