"""Pool several ``compare.py`` runs (patient shuffles) into one table: mean ± std over all their fold runs.

    python benchmarks/pool_results.py benchmarks/seed0/results.json benchmarks/seed1/results.json ...

Each ``results.json`` is written by ``compare.py`` beside its RESULTS.md. Prints a Markdown
table of every metric over all fold runs together, and which of the cell-model floors the
default model's mean meets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROWS = (("accuracy_at_0.5", "accuracy at 0.5 %"), ("sensitivity_at_0.5", "sensitivity at 0.5 %"),
        ("specificity_at_0.5", "specificity at 0.5 %"), ("accuracy", "accuracy at own threshold %"),
        ("sensitivity", "sensitivity at own threshold %"), ("specificity", "specificity at own threshold %"),
        ("f1", "F1 %"), ("mcc", "MCC %"), ("auc", "ROC AUC %"))
FLOORS = (("accuracy_at_0.5", 96.5), ("auc", 99.3), ("sensitivity", 97.0), ("specificity", 92.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results.json files written by compare.py")
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {}
    for path in args.results:
        for name, runs in json.loads(path.read_text())["rows"].items():
            rows.setdefault(name, []).extend(runs)
    names = [n for n in ("tutorial-random", "tutorial", "malaria-cells") if n in rows]
    print(f"{len(rows[names[-1]])} fold runs from {len(args.results)} patient shuffles (mean ± std)\n")
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key, label in ROWS:
        cells = []
        for name in names:
            values = 100 * np.array([run[key] for run in rows[name]])
            cells.append(f"{values.mean():.2f} ± {values.std():.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    ours = rows["malaria-cells"]
    print()
    for key, floor in FLOORS:
        mean = 100 * np.mean([run[key] for run in ours])
        print(f"{key}: {mean:.2f} (floor {floor}: {'met' if mean >= floor else 'NOT met'})")
    better = sum(o["auc"] > t["auc"] for o, t in zip(ours, rows["tutorial"]))
    print(f"ours has the higher AUC on {better} of {len(ours)} folds")


if __name__ == "__main__":
    main()
