"""What every benchmark script shares: its command line's common part."""

from __future__ import annotations

import argparse
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cell_images"
"""The real NIH cells, where the workplace keeps them beside the checkout."""


def existing_folder(path: str) -> str:
    if not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"{path}: no such folder (the Parasitized/Uninfected cell images)")
    return path


def benchmark_parser(description: str | None, *, model: bool = True) -> argparse.ArgumentParser:
    """An argument parser with ``--data`` (default: ../shared/data/cell_images) and ``--model``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=existing_folder, default=str(SHARED_DATA), help="labelled cell images (default: %(default)s)")
    if model:
        parser.add_argument("--model", help="model to measure (default: the shipped one)")
    return parser


def run_folder(path: str) -> str:
    """A training run folder (``malaria-cells train --out``): it must hold config.json and model.keras."""
    missing = [name for name in ("config.json", "model.keras") if not (Path(path) / name).is_file()]
    if missing:
        raise argparse.ArgumentTypeError(f"{path}: not a training run folder (no {', '.join(missing)})")
    return path


def validation_cells(run: str):
    """The model of a run and its validation patients' cells (never its test patients).

    Returns (model, images, labels, patient ids), read with the model's own input size.
    """
    return patient_cells(run, "val")


def patient_cells(run: str, part: str, model=None):
    """The model of a run (or ``model``) and the cells of its ``part`` patients: "train",
    "val" or "test", as ``config.json`` lists them. Returns (model, images, labels, patient ids)."""
    import json

    import numpy as np

    from malaria_cells import list_cell_images, load_model
    from malaria_cells.pipeline import read_images

    config = json.loads((Path(run) / "config.json").read_text())
    model = load_model(run if model is None else model)
    files = list_cell_images(config["data_root"])
    groups = np.array(files.groups)
    index = np.flatnonzero(np.isin(groups, config["patients"][part]))
    images, readable, _ = read_images([files.paths[i] for i in index], model.image_size)
    return model, images, files.labels[index][readable], groups[index][readable]
