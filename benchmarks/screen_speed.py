"""Whole-command speed and memory of ``malaria-cells screen`` on real fields.

    python benchmarks/screen_speed.py [--model PATH] [--repeats 3]

Times, each in a fresh process (start-up, imports and model load included): one 5312x2988 NIH
phone photograph, one 1280x960 IML camera field, and a sample of 100 IML fields (a folder of
links to them). Peak memory is the process's max RSS; for the 100-field sample, memory stays
flat if its peak is close to the one-field peak. Then, in one process that has loaded the model
(as the server and a many-field sample do), the time to screen each of those two fields again
(median of ``--warm`` runs): what a field costs once start-up is paid.

The package is byte-compiled first, as ``pip install`` does: an editable checkout run with
PYTHONDONTWRITEBYTECODE set would otherwise recompile its modules in every command. The bare
interpreter's start-up on the machine is printed too, since it is part of every figure.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from _common import SHARED_DATA
from compare import timed

FIELDS = SHARED_DATA.parent / "fields"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="cell model (default: the shipped one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warm", type=int, default=10, help="in-process runs per field")
    args = parser.parse_args()
    nih = sorted((FIELDS / "nih").glob("*/*.jpg"))[0]
    iml = sorted((FIELDS / "iml").glob("*.JPG"))
    sample = Path(tempfile.mkdtemp(prefix="malaria-screen-")) / "sample"
    sample.mkdir()
    for path in iml[:100]:
        (sample / path.name).symlink_to(path)
    model = ["--model", args.model] if args.model else []
    byte_compile()
    bare = statistics.median(timed([sys.executable, "-c", "pass"])[0] for _ in range(5))
    print(f"bare interpreter start-up: {bare:.2f} s", flush=True)
    for name, target in (("NIH photograph 5312x2988", nih), ("IML field 1280x960", iml[0]),
                         ("100 IML fields", sample)):
        runs = [timed(["malaria-cells", "screen", str(target), "--format", "json", *model])
                for _ in range(args.repeats)]
        seconds = [s for s, _ in runs]
        print(f"{name}: median {statistics.median(seconds):.2f} s (runs {', '.join(f'{s:.2f}' for s in seconds)}), "
              f"peak {max(p for _, p in runs):.0f} MiB", flush=True)
    warm(args.model, {"NIH photograph 5312x2988": nih, "IML field 1280x960": iml[0]}, args.warm)


def byte_compile() -> None:
    import compileall

    import malaria_cells

    compileall.compile_dir(Path(malaria_cells.__file__).parent, quiet=1)


def warm(model_path, fields: dict, runs: int) -> None:
    import time

    from malaria_cells.images import read_file
    from malaria_cells.runtimes import default_model_path, load_model
    from malaria_cells.fields import screen_image

    model = load_model(model_path or default_model_path(fields=True))
    for name, path in fields.items():
        contents = read_file(path)
        screen_image(contents, model, path=str(path))
        seconds = []
        for _ in range(runs):
            started = time.perf_counter()
            screen_image(contents, model, path=str(path))
            seconds.append(time.perf_counter() - started)
        print(f"{name}, in a warm process: median {statistics.median(seconds):.3f} s "
              f"(min {min(seconds):.3f}, max {max(seconds):.3f}, {runs} runs)", flush=True)


if __name__ == "__main__":
    main()
