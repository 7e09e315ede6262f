"""malaria-cells: tell Parasitized from Uninfected red blood cells in thin blood smears.

The command line (``malaria-cells``) is a thin layer over this API::

    from malaria_cells import train, evaluate, predict, load_model

    result = train(data="cell_images", out="runs/first")       # writes a run folder
    report = evaluate(result["model_path"], data="other_patients")
    for p in predict(["cell.png", "more_cells/"]):              # shipped model by default
        print(p.path, p.probability, p.label)
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

# The API is imported on first use (PEP 562): a command or a server loads only the modules
# it needs (importing all of them took ~30 ms more at each start of `malaria-cells`).
_EXPORTS = {
    "CLASS_NAMES": "data", "list_cell_images": "data", "patient_id": "data", "preprocess_image": "data",
    "split_dataset": "data", "download": "download", "MalariaCellsError": "errors",
    "compute_metrics": "evaluation", "evaluate": "evaluation", "CellClassifier": "inference",
    "Prediction": "inference", "iter_predictions": "inference", "load_model": "inference",
    "predict": "inference", "PRESETS": "training", "TrainConfig": "training", "make_config": "training",
    "retune": "training", "train": "training",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .data import CLASS_NAMES, list_cell_images, patient_id, preprocess_image, split_dataset
    from .download import download
    from .errors import MalariaCellsError
    from .evaluation import compute_metrics, evaluate
    from .inference import CellClassifier, Prediction, iter_predictions, load_model, predict
    from .training import PRESETS, TrainConfig, make_config, retune, train


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
