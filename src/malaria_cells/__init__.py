"""malaria-cells: tell Parasitized from Uninfected red blood cells in thin blood smears.

The command line (``malaria-cells``) is a thin layer over this API::

    from malaria_cells import train, evaluate, predict, load_model

    result = train(data="cell_images", out="runs/first")       # writes a run folder
    report = evaluate(result["model_path"], data="other_patients")
    for p in predict(["cell.png", "more_cells/"]):              # shipped model by default
        print(p.path, p.probability, p.label)
"""

__version__ = "0.1.0"

from .data import CLASS_NAMES, list_cell_images, patient_id, preprocess_image, split_dataset
from .download import download
from .errors import MalariaCellsError
from .evaluation import compute_metrics, evaluate
from .inference import CellClassifier, Prediction, iter_predictions, load_model, predict
from .training import PRESETS, TrainConfig, make_config, retune, train

__all__ = [
    "CLASS_NAMES", "CellClassifier", "MalariaCellsError", "PRESETS", "Prediction", "TrainConfig",
    "compute_metrics", "download", "evaluate", "iter_predictions", "list_cell_images",
    "load_model", "make_config", "patient_id", "predict", "preprocess_image", "retune",
    "split_dataset", "train",
]
