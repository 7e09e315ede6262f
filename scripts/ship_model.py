"""Put a trained model inside the package as the default model.

    malaria-cells train --data ../shared/data/cell_images --out runs/shipped --test-fraction 0
    python scripts/ship_model.py runs/shipped

Copies RUN_DIR/model.keras to src/malaria_cells/pretrained/ and writes the metadata JSON
beside it (recipe, data, patients, threshold, input size, colour, validation metrics,
versions), both atomically. ``predict``, ``evaluate``, ``info`` and the Python API use it
when no model is named.

Then exports its ONNX copy (``malaria-cells-default.onnx``, needs ``pip install
'.[export]'``), which ``predict`` runs to start without TensorFlow, and checks on every
cell of the training data that both give the same label; a copy that disagrees is removed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from malaria_cells.export import check_parity, export_model, sidecar_path
from malaria_cells.files import atomic_path, write_json
from malaria_cells.runtimes import DEFAULT_MODEL, DEFAULT_MODEL_ONNX, load_model


def main(run_dir: str) -> None:
    run = Path(run_dir)
    model = load_model(run / "model.keras")
    config = json.loads((run / "config.json").read_text())
    metadata = {
        **model.info,
        "file": DEFAULT_MODEL.name,
        "validation_metrics": json.loads((run / "metrics.json").read_text()),
        "patients": config["patients"],
        "class_counts": config["class_counts"],
        "seconds": config["seconds"],
        "note": "validation_metrics are on the validation patients that chose the threshold and "
                "the best epoch: optimistic; see benchmarks/RESULTS.md for held-out patients",
    }
    metadata["validation_metrics"].pop("patients", None)
    with atomic_path(DEFAULT_MODEL) as temporary:
        shutil.copyfile(run / "model.keras", temporary)
    write_json(DEFAULT_MODEL.with_suffix(".json"), metadata)
    print(f"shipped {DEFAULT_MODEL} ({DEFAULT_MODEL.stat().st_size / 1e6:.2f} MB), threshold {model.threshold:.4f}")
    ship_onnx_copy(config["data_root"])


def ship_onnx_copy(data: str) -> None:
    """Export the shipped model to ONNX beside it, if it labels all of ``data`` alike."""
    export_model(DEFAULT_MODEL, DEFAULT_MODEL_ONNX, format="onnx")
    sidecar = sidecar_path(DEFAULT_MODEL_ONNX)
    parity = check_parity(DEFAULT_MODEL, DEFAULT_MODEL_ONNX, data)
    if parity["agreement"] < 1.0:
        DEFAULT_MODEL_ONNX.unlink()
        sidecar.unlink()
        raise SystemExit(f"the ONNX copy disagreed with the .keras model: {parity}; not shipped")
    print(f"shipped its ONNX copy {DEFAULT_MODEL_ONNX} ({DEFAULT_MODEL_ONNX.stat().st_size / 1e6:.2f} MB): "
          f"same label on all {parity['n']} cells of {data}, largest probability difference "
          f"{parity['max_probability_difference']:.1e}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
