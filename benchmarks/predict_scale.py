"""End-to-end ``malaria-cells predict`` over many files: throughput and memory over time.

    python benchmarks/predict_scale.py [--model PATH] [--count 100000]

Builds a folder of ``--count`` symbolic links to the dataset's PNGs (no pixel is copied),
runs ``malaria-cells predict FOLDER --format csv --output FILE`` and samples the process's
resident memory every half second: flat memory means the images are streamed.
"""

from __future__ import annotations

import glob
import os
import subprocess
import tempfile
import time
from pathlib import Path

from _common import benchmark_parser


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--count", type=int, default=100_000)
    args = parser.parse_args()
    sources = sorted(glob.glob(os.path.join(os.path.abspath(args.data), "*", "*.png")))
    folder = Path(tempfile.mkdtemp(prefix="malaria-scale-"))
    for i in range(args.count):
        shard = folder / f"{i // 5000:03d}"
        shard.mkdir(exist_ok=True)
        (shard / f"{i}.png").symlink_to(sources[i % len(sources)])
    output = folder / "predictions.csv"
    command = ["malaria-cells", "predict", str(folder), "--format", "csv", "--output", str(output)]
    if args.model:
        command += ["--model", args.model]
    started = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    samples = []
    while process.poll() is None:
        samples.append((time.perf_counter() - started, rss_mib(process.pid)))
        time.sleep(0.5)
    seconds = time.perf_counter() - started
    rows = sum(1 for _ in open(output)) - 1
    print(f"{rows} images in {seconds:.1f} s: {rows / seconds:.0f} cells/s end to end (process start included)")
    quarter = [m for t, m in samples if t > seconds / 4]
    print(f"resident memory: peak {max(m for _, m in samples):.0f} MiB; after the first quarter "
          f"min {min(quarter):.0f} / max {max(quarter):.0f} MiB")


if __name__ == "__main__":
    main()
