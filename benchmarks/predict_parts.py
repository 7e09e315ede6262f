"""Where prediction time goes: the read-decode-resize pipeline and the network, timed apart.

    python benchmarks/predict_parts.py [--model PATH] [--data ../shared/data/cell_images]

Runs every PNG of ``--data`` through ``iter_image_batches`` (read, decode, resize; no network),
then the model alone over batches of 256 preprocessed cells. Each uses all the cores on its own; ``predict`` has to share them, so it cannot pass 1 / (1 / pipeline + 1 / network).
CPU time per cell is printed too: on a shared virtual machine it varies less than wall time.
"""

from __future__ import annotations

import glob
import os
import time

import numpy as np
from _common import benchmark_parser

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batches", type=int, default=40, help="network batches of 256 to time")
    args = parser.parse_args()

    from malaria_cells import load_model
    from malaria_cells.pipeline import iter_image_batches

    model = load_model(args.model)
    paths = sorted(glob.glob(os.path.join(args.data, "*", "*.png")))

    def time_pipeline():
        started, cpu, count = time.perf_counter(), cpu_seconds(), 0
        for batch_paths, _, _ in iter_image_batches(paths, model.image_size, 256):
            count += len(batch_paths)
        return count, count / (time.perf_counter() - started), (cpu_seconds() - cpu) / count

    print(f"{len(paths)} PNGs, {os.cpu_count()} CPUs, model {model.path} ({model.runtime})")
    count, pipeline, pipeline_cpu = time_pipeline()
    print(f"read-decode-resize pipeline alone: {pipeline:.0f} cells/s, {1e6 * pipeline_cpu:.0f} us of CPU per cell")

    cells = np.random.default_rng(0).integers(0, 256, (256, model.image_size, model.image_size, 3), dtype=np.uint8)
    model.probability(cells)
    started, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(args.batches):
        model.probability(cells)
    network = args.batches * len(cells) / (time.perf_counter() - started)
    network_cpu = (cpu_seconds() - cpu) / (args.batches * len(cells))

    print(f"network alone (batches of 256, one call at a time; onnxruntime runs each on one thread): "
          f"{network:.0f} cells/s, {1e6 * network_cpu:.0f} us of CPU per cell")
    print(f"both sharing the cores, at best: {1 / (1 / pipeline + 1 / network):.0f} cells/s; "
          f"all {os.cpu_count()} CPUs busy: {os.cpu_count() / (pipeline_cpu + network_cpu):.0f} cells/s")


def cpu_seconds() -> float:
    """CPU time of this process, all threads (steadier than wall time on a shared machine)."""
    times = os.times()
    return times.user + times.system


if __name__ == "__main__":
    main()
