"""malaria-cells: screen thin blood smears for malaria; tell Parasitized from Uninfected red cells.

The command line (``malaria-cells``) is a thin layer over this API::

    from malaria_cells import screen, train, evaluate, predict, load_model

    report = screen(["patient1/", "patient2/"])                 # smear photographs: counts, a call

    result = train(data="cell_images", out="runs/first")       # writes a run folder
    report = evaluate(result.model_path, data="other_patients")
    for p in predict(["cell.png", "more_cells/"]):              # shipped model by default
        print(p.path, p.probability, p.label)
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

# The API is imported on first use (PEP 562): a command or a server loads only the modules it needs.
_EXPORTS = {
    "CLASS_NAMES": "config", "list_cell_images": "datasets", "patient_id": "datasets",
    "preprocess": "images", "decode": "images", "resize": "images", "UnreadableImage": "images",
    "split_dataset": "splits", "download": "download", "MalariaCellsError": "errors",
    "compute_metrics": "evaluation", "evaluate": "evaluation", "CellClassifier": "runtimes",
    "load_model": "runtimes", "Prediction": "inference", "iter_predictions": "inference",
    "predict": "inference", "PRESETS": "training", "TrainConfig": "training", "make_config": "training",
    "retune": "training", "train": "training", "RunResult": "runs", "RetuneResult": "runs", "screen": "fields", "ScreenResult": "fields",
    "FieldResult": "fields", "SampleResult": "fields", "CellResult": "fields", "Screener": "fields",
    "ClassicalDetector": "fields", "FieldFigures": "fields",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .config import CLASS_NAMES
    from .datasets import list_cell_images, patient_id
    from .download import download
    from .errors import MalariaCellsError
    from .evaluation import compute_metrics, evaluate
    from .images import UnreadableImage, decode, preprocess, resize
    from .inference import Prediction, iter_predictions, predict
    from .runs import RetuneResult, RunResult
    from .runtimes import CellClassifier, load_model
    from .fields import CellResult, ClassicalDetector, FieldFigures, FieldResult, SampleResult, ScreenResult, Screener, screen
    from .splits import split_dataset
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
