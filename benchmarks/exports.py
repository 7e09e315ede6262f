"""Size, accuracy, agreement and CPU throughput of every export format, on the same images.

    python benchmarks/exports.py [--model PATH] [--data ../shared/data/cell_images] [--limit 4000]

Exports the model (default: the shipped one) to each format into a temporary folder,
reads ``--limit`` labelled images once, and scores them with every runtime (batches of
256, preprocessed arrays, so this measures the model runtime alone).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import benchmark_parser

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VARIANTS = [("keras", None, "none"), ("tflite", "tflite", "none"), ("tflite", "tflite", "float16"),
            ("tflite", "tflite", "int8"), ("onnx", "onnx", "none"), ("onnx", "onnx", "int8")]


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--limit", type=int, default=4000)
    args = parser.parse_args()

    from malaria_cells import load_model
    from malaria_cells.inference import default_model_path
    from malaria_cells.datasets import list_cell_images
    from malaria_cells.pipeline import read_images
    from malaria_cells.export import export_model

    reference = load_model(args.model or default_model_path(fast_start=False))  # the .keras file
    files = list_cell_images(args.data)
    chosen = np.sort(np.random.default_rng(0).permutation(len(files.paths))[: args.limit])
    images, readable, _ = read_images([files.paths[i] for i in chosen], reference.image_size)
    labels = files.labels[chosen][readable]
    calibration = images[:: max(1, len(images) // 400)]
    folder = Path(tempfile.mkdtemp(prefix="malaria-exports-"))
    rows, keras_labels = [], None
    for name, fmt, quantize in VARIANTS:
        if fmt is None:
            model, size = reference, Path(reference.path).stat().st_size
        else:
            path = export_model(reference, folder / f"model-{quantize}.{fmt}", format=fmt, quantize=quantize,
                                calibration_images=calibration)
            model, size = load_model(path), path.stat().st_size
        model.probability(images[:256])
        started = time.perf_counter()
        scores = model.probability(images, batch_size=256)
        rate = len(images) / (time.perf_counter() - started)
        called = scores >= model.threshold
        keras_labels = called if keras_labels is None else keras_labels
        rows.append((f"{name} {quantize}", size / 1e6, 100 * np.mean(called == labels),
                     100 * np.mean(called == keras_labels), rate))
    print(f"{len(labels)} images of {args.data}, {os.cpu_count()} CPUs, model {reference.path}\n")
    print("| format | file, MB | accuracy % | same label as Keras % | images/s |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| {} | {:.2f} | {:.2f} | {:.2f} | {:.0f} |".format(*row))


if __name__ == "__main__":
    main()
