"""The tutorial's pipeline vs malaria-cells' default recipe, same machine, same patients.

    python benchmarks/compare.py --folds 5          # 5-fold patient cross-validation
    python benchmarks/compare.py --seeds 0 1 2      # 3 random 60/20/20 patient splits

For each fold (or seed), both recipes are trained with ``malaria-cells train`` on the same patient
split (the split depends only on the files, the seed and the fractions), in separate
processes so that wall time and peak memory (max RSS) are measured per run. Then each
model labels every PNG of the dataset folder end to end: the tutorial's way (cv2 loop +
``model.predict``) and ours (``malaria-cells predict DIR --format csv --output FILE``).
Writes ``RESULTS.md`` (and a JSON of the raw numbers) into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import benchmark_parser

KEYS = ("accuracy", "sensitivity", "specificity", "auc", "f1", "mcc")


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one command, via a fresh wrapper process."""
    wrapper = (
        "import resource, subprocess, sys, time, json;"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL);"
        "s = time.perf_counter() - t;"
        "print(json.dumps([r.returncode, s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, check=True)
    code, seconds, peak = json.loads(out.stdout.strip().splitlines()[-1])
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(command)}")
    return seconds, peak


TUTORIAL_PREDICT = r"""
import glob, os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import cv2, numpy as np, keras
from malaria_cells import models  # registers the layers the saved model uses
model = keras.saving.load_model(sys.argv[1], compile=False)
paths = sorted(glob.glob(os.path.join(sys.argv[2], "*", "*.png")))
t = time.perf_counter()
images = [cv2.resize(cv2.imread(p, cv2.IMREAD_GRAYSCALE), (70, 70)) for p in paths]
x = np.array(images).reshape(-1, 70, 70, 1)
x = np.repeat(x, 3, axis=-1).astype("float32")  # our tutorial model takes RGB and grays it inside
p = model.predict(x, batch_size=64, verbose=0)
with open(sys.argv[3], "w") as f:
    for path, prob in zip(paths, p.ravel()):
        f.write(f"{path},{prob:.6f}\n")
print(len(paths) / (time.perf_counter() - t))
"""


def main() -> None:
    parser = benchmark_parser(__doc__, model=False)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one random patient split per seed (20%% test); with --folds, the first seed "
                        "shuffles patients into the folds")
    parser.add_argument("--folds", type=int, default=0,
                        help="K-fold patient cross-validation: every patient is tested exactly once")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "seed0"))
    parser.add_argument("--work", default=None,
                        help="folder for run folders (default: a temporary one); finished runs found "
                        "there are reused, so an interrupted benchmark can be resumed")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="extra flags for our recipe's train command")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="malaria-compare-"))
    if args.folds:
        parts = [(f"fold{k}", ["--seed", str(args.seeds[0]), "--folds", str(args.folds), "--fold", str(k),
                               "--val-fraction", "0.2"]) for k in range(args.folds)]
    else:
        parts = [(f"seed{seed}", ["--seed", str(seed), "--test-fraction", "0.2", "--val-fraction", "0.2"])
                 for seed in args.seeds]
    recipes = {
        "tutorial-random": ["--preset", "tutorial", "--split", "random"],
        "tutorial": ["--preset", "tutorial", "--split", "patient"],
        "malaria-cells": [*args.extra],
    }
    rows: dict[str, list[dict]] = {name: [] for name in recipes}
    for part, split_flags in parts:
        for name, flags in recipes.items():
            run_dir = work / f"{name}-{part}"
            if (run_dir / "metrics.json").is_file():  # finished earlier: reuse (see --work)
                seconds, peak = json.loads((run_dir / "benchmark.json").read_text())
            else:
                seconds, peak = timed(["malaria-cells", "train", "--data", args.data, "--out", str(run_dir),
                                       "--quiet", "--overwrite", *split_flags, *flags])
                (run_dir / "benchmark.json").write_text(json.dumps([seconds, peak]))
            metrics = json.loads((run_dir / "metrics.json").read_text())
            config = json.loads((run_dir / "config.json").read_text())
            at_half = metrics.get("at_threshold_0.5", metrics)
            rows[name].append({"part": part, "train_seconds": seconds, "train_peak_mib": peak,
                               "threshold": metrics["threshold"], "test_patients": config["patients"]["test"],
                               "threshold_rule": [config["config"]["target_sensitivity"], config["config"]["min_specificity"]],
                               "model_bytes": (run_dir / "model.keras").stat().st_size,
                               **{k: metrics[k] for k in KEYS},
                               **{f"{k}_at_0.5": at_half[k] for k in ("accuracy", "sensitivity", "specificity")}})
            print(name, part, {k: round(v, 4) if isinstance(v, float) else v
                               for k, v in rows[name][-1].items() if k != "test_patients"}, flush=True)
    assert rows["tutorial"][0]["test_patients"] == rows["malaria-cells"][0]["test_patients"]

    n_files = sum(1 for _ in Path(args.data).glob("*/*.png"))
    last = parts[-1][0]
    throughput = {}
    seconds, peak = timed([sys.executable, "-c", TUTORIAL_PREDICT, str(work / f"tutorial-{last}" / "model.keras"),
                           args.data, str(work / "tutorial-predictions.csv")])
    throughput["tutorial"] = (n_files / seconds, peak)
    output = work / "ours-predictions.csv"
    output.unlink(missing_ok=True)
    seconds, peak = timed(["malaria-cells", "predict", args.data, "--model",
                           str(work / f"malaria-cells-{last}" / "model.keras"), "--format", "csv",
                           "--output", str(output)])
    throughput["malaria-cells"] = (n_files / seconds, peak)
    exported = work / f"malaria-cells-{last}" / "model.onnx"
    if not exported.is_file():  # what the shipped model runs: its ONNX copy (needs tf2onnx)
        subprocess.run(["malaria-cells", "export", "--model", str(exported.with_suffix(".keras")), "--format", "onnx",
                        "--out", str(exported)], check=False, capture_output=True)
    if exported.is_file():
        output.unlink(missing_ok=True)
        seconds, peak = timed(["malaria-cells", "predict", args.data, "--model", str(exported), "--format", "csv",
                               "--output", str(output)])
        throughput["malaria-cells, ONNX"] = (n_files / seconds, peak)

    write_report(args, rows, throughput, n_files, len(parts))


def write_report(args, rows, throughput, n_files, n_parts) -> None:
    def summary(name, key, scale=1.0, digits=1):
        values = np.array([r[key] for r in rows[name]]) * scale
        return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}" if len(values) > 1 else f"{values[0]:.{digits}f}"

    target, floor = rows["malaria-cells"][0]["threshold_rule"]
    lines = [
        f"# Tutorial vs malaria-cells ({datetime.date.today().isoformat()})", "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}. Data: {args.data} ({n_files} cells).",
        "Command: `python benchmarks/compare.py "
        + (f"--folds {args.folds} --seeds {args.seeds[0]}" if args.folds else f"--seeds {' '.join(map(str, args.seeds))}")
        + (f" --extra {' '.join(args.extra)}" if args.extra else "") + "`", "",
        (f"Test metrics: mean ± std over {args.folds} folds of patient cross-validation (patients shuffled with seed "
         f"{args.seeds[0]}; each patient is in the test part of exactly one fold; 20% of the others, taken from the next fold, "
         "validate, so no two folds validate on the same patients)"
         if args.folds else
         f"Test metrics: mean ± std over {n_parts} patient splits (seeds {', '.join(map(str, args.seeds))}; 20% of "
         "patients held out for test, 20% of the rest for validation)")
        + ". Rows \"at 0.5\" put both models at the same threshold; the other rows use each model's own "
        "threshold (tutorial: 0.5; ours: chosen on validation patients for "
        f"{100 * target:g}% sensitivity, never below {100 * floor:g}% validation specificity).", "",
        "The first column is what the tutorial's own per-image random split reports (its test "
        "cells come from patients seen in training); the other two are scored on the same "
        "held-out patients.", "",
        "| | tutorial, random split (leaky) | tutorial pipeline | malaria-cells "
        + (" ".join(args.extra) if args.extra else "default") + " |",
        "|---|---|---|---|",
    ]
    for key, label in (("accuracy_at_0.5", "accuracy at 0.5 %"), ("sensitivity_at_0.5", "sensitivity at 0.5 %"),
                       ("specificity_at_0.5", "specificity at 0.5 %"), ("accuracy", "accuracy %"), ("sensitivity", "sensitivity %"), ("specificity", "specificity %"),
                       ("f1", "F1 %"), ("mcc", "MCC %"), ("auc", "ROC AUC %")):
        lines.append(f"| {label} | " + " | ".join(summary(name, key, 100, 2) for name in rows) + " |")
    for key, label, scale, digits in (("train_seconds", "train wall time, s", 1, 1),
                                      ("train_peak_mib", "train peak memory, MiB", 1, 0),
                                      ("model_bytes", "model file, MB", 1e-6, 2)):
        lines.append(f"| {label} | " + " | ".join(summary(name, key, scale, digits) for name in rows) + " |")
    lines.append(f"| predict {n_files} PNGs end to end, cells/s | | {throughput['tutorial'][0]:.0f} | {throughput['malaria-cells'][0]:.0f} |")
    lines.append(f"| predict peak memory, MiB | | {throughput['tutorial'][1]:.0f} | {throughput['malaria-cells'][1]:.0f} |")
    if "malaria-cells, ONNX" in throughput:
        rate, peak = throughput["malaria-cells, ONNX"]
        lines.append(f"| the same model's ONNX export (as the shipped model runs): cells/s, peak MiB | | | {rate:.0f}, {peak:.0f} |")
    lines += ["", "Predict times are whole commands (process start, model load and, for .keras, the TensorFlow import included)."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "throughput": throughput}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
