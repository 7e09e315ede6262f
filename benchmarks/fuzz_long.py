"""The suite's image fuzzer (tests/test_fuzz.py), run for longer: N minutes of seeded mutations.

    python benchmarks/fuzz_long.py --minutes 10 [--seed 1]

Every mutated file must decode to an array of its declared size or raise UnreadableImage;
anything else (another exception, a crash of the process, a hang) is a finding. The package
has no C code of its own (PNG goes to libpng through OpenCV, the rest to Pillow), so there is
no extension to rebuild under AddressSanitizer; the decoders' own fuzzing is their projects'.
What a sanitizer would see from here, a binding that mishandles Python references, is
watched instead: the reference count of ``None`` must not fall while files are refused (on
Python 3.11, where None is not immortal). Prints the counts.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    from test_fuzz import MAX_PIXELS, _mutate, _seeds

    from malaria_cells.images import UnreadableImage, decode, dimensions

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng, seeds = np.random.default_rng(args.seed), _seeds()
    gc.collect()
    none_before = sys.getrefcount(None)
    counts = {"decoded": 0, "refused": 0, "findings": 0}
    slowest, end = 0.0, time.monotonic() + 60 * args.minutes
    while time.monotonic() < end:
        contents = _mutate(seeds[int(rng.integers(len(seeds)))], rng)
        began = time.monotonic()
        try:
            pixels = decode(contents, max_pixels=MAX_PIXELS)
            width, height = dimensions(contents)
            assert pixels.shape == (height, width, 3)
            counts["decoded"] += 1
        except UnreadableImage:
            counts["refused"] += 1
        except Exception as error:  # noqa: BLE001 - a finding, reported and counted
            counts["findings"] += 1
            print(f"finding: {type(error).__name__}: {error}", flush=True)
        slowest = max(slowest, time.monotonic() - began)
    gc.collect()
    none_change = sys.getrefcount(None) - none_before
    if none_change < -1000:
        counts["findings"] += 1
        print(f"finding: references to None fell by {-none_change}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{sum(counts.values())} mutated files in {args.minutes:g} min: {counts['decoded']} decoded, "
          f"{counts['refused']} refused with UnreadableImage, {counts['findings']} findings; slowest "
          f"{slowest:.2f} s, peak memory {peak:.0f} MiB, references to None {none_change:+d}")


if __name__ == "__main__":
    main()
