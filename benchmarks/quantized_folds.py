"""Does int8 cost accuracy on held-out patients? The float model against its ONNX int8 export, run by run.

    python benchmarks/quantized_folds.py RUN_DIR [RUN_DIR ...]

For each training run folder (``compare.py``'s fold runs, say), exports the model to ONNX
int8 (calibrated on 512 of the run's training cells, as ``export --quantize int8`` does with
``--calibration``), then scores the run's test patients with both: at the run's own threshold,
and at a threshold chosen for the int8 scores on the run's validation patients by the run's
own rule (what ``train`` would have stored). Prints each run and the means.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from _common import patient_cells, run_folder

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=run_folder, help="training run folders (model.keras + config.json)")
    args = parser.parse_args()

    from sklearn.metrics import roc_auc_score

    from malaria_cells import load_model
    from malaria_cells.evaluation import choose_threshold
    from malaria_cells.export import export_model

    rows = []
    for run in args.runs:
        config = json.loads((Path(run) / "config.json").read_text())
        model, train_images, _, _ = patient_cells(run, "train")
        calibration = train_images[np.random.default_rng(0).choice(len(train_images), 512, replace=False)]
        with tempfile.TemporaryDirectory() as folder:
            int8 = load_model(export_model(model, Path(folder) / "int8.onnx", format="onnx", quantize="int8",
                                           calibration_images=calibration))
            scores = {}
            for part in ("val", "test"):
                _, images, labels, _ = patient_cells(run, part, model)
                scores[part] = labels, model.probability(images), int8.probability(images)
        rule = config["config"]
        val_labels, _, val_int8 = scores["val"]
        int8_threshold = choose_threshold(val_labels, val_int8, rule["target_sensitivity"],
                                          rule["min_specificity"])["threshold"]
        labels, float_scores, int8_scores = scores["test"]

        def metrics(probabilities, threshold):
            called = probabilities >= threshold
            return [100 * float((called == (labels == 1)).mean()), 100 * float(called[labels == 1].mean()),
                    100 * float((~called[labels == 0]).mean()), 100 * roc_auc_score(labels, probabilities)]

        row = {"float": metrics(float_scores, model.threshold), "int8": metrics(int8_scores, model.threshold),
               "int8, own threshold": metrics(int8_scores, int8_threshold)}
        rows.append(row)
        print(f"{run}: {len(labels)} test cells, same label {100 * np.mean((float_scores >= model.threshold) == (int8_scores >= model.threshold)):.2f}%")
        for name, values in row.items():
            print(f"  {name:20s} accuracy {values[0]:.2f}  sensitivity {values[1]:.2f}  "
                  f"specificity {values[2]:.2f}  AUC {values[3]:.3f}")
    print(f"means over {len(rows)} runs (test patients; accuracy, sensitivity, specificity at the threshold, AUC):")
    for name in rows[0]:
        means = np.mean([row[name] for row in rows], axis=0)
        print(f"  {name:20s} " + "  ".join(f"{value:.2f}" for value in means))


if __name__ == "__main__":
    main()
