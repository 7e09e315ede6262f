"""Whole-command speed of ``malaria-cells predict`` against the tutorial's loop, in one run.

    python benchmarks/predict_speed.py --repeats 3

Each repeat times, alternately and each in a fresh process (start-up, imports and model
load included), (1) the tutorial's way of labelling every PNG of the folder (a cv2 loop
reading each file as 70x70 grayscale, then ``model.predict`` on the tutorial's network) and
(2) ``malaria-cells predict DIR --format csv --output FILE`` with the shipped model. The
tutorial's network is built untrained: its speed does not depend on its weights.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from _common import benchmark_parser
from compare import TUTORIAL_PREDICT, timed


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n_files = sum(1 for _ in Path(args.data).glob("*/*.png"))
    work = Path(tempfile.mkdtemp(prefix="malaria-speed-"))
    tutorial_model = work / "tutorial.keras"
    build = ("import sys, os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\n"
             "from malaria_cells.models import build_model\n"
             "build_model('tutorial', image_size=70, color='gray').save(sys.argv[1])")
    import subprocess

    subprocess.run([sys.executable, "-c", build, str(tutorial_model)], check=True)
    ours_command = ["malaria-cells", "predict", args.data, "--format", "csv", "--output", str(work / "ours.csv")]
    if args.model:
        ours_command += ["--model", args.model]
    rates: dict[str, list[float]] = {"tutorial": [], "malaria-cells": []}
    peaks: dict[str, list[float]] = {"tutorial": [], "malaria-cells": []}
    for _ in range(args.repeats):
        for name, command in (("tutorial", [sys.executable, "-c", TUTORIAL_PREDICT, str(tutorial_model), args.data,
                                            str(work / "tutorial.csv")]), ("malaria-cells", ours_command)):
            (work / "ours.csv").unlink(missing_ok=True)
            seconds, peak = timed(command)
            rates[name].append(n_files / seconds)
            peaks[name].append(peak)
            print(f"{name}: {seconds:.2f} s, {n_files / seconds:.0f} cells/s, {peak:.0f} MiB", flush=True)
    tutorial, ours = statistics.median(rates["tutorial"]), statistics.median(rates["malaria-cells"])
    print(f"\n{n_files} PNGs, median of {args.repeats}: tutorial {tutorial:.0f} cells/s "
          f"({max(peaks['tutorial']):.0f} MiB), malaria-cells {ours:.0f} cells/s "
          f"({max(peaks['malaria-cells']):.0f} MiB): {ours / tutorial:.1f}x")


if __name__ == "__main__":
    main()
