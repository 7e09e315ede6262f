"""Single-image latency from the Python API: read, decode, resize, predict one PNG.

    python benchmarks/latency.py [--model PATH] [--repeats 200]
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

import numpy as np
from _common import benchmark_parser

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    from malaria_cells import load_model
    from malaria_cells.pipeline import preprocess_many

    model = load_model(args.model)
    paths = sorted(glob.glob(os.path.join(args.data, "*", "*.png")))[: args.repeats]

    def once(path):
        images, _, _ = preprocess_many([Path(path).read_bytes()], model.image_size)
        return model.probability(images)

    for path in paths[:20]:
        once(path)
    times = []
    for path in paths:
        started = time.perf_counter()
        once(path)
        times.append(time.perf_counter() - started)
    print(f"{len(times)} single images, {os.cpu_count()} CPUs: p50 {1000 * np.median(times):.2f} ms, "
          f"p99 {1000 * np.percentile(times, 99):.2f} ms")


if __name__ == "__main__":
    main()
