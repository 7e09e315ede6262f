"""Screening many samples in one process against a local Dask cluster of worker processes.

    python benchmarks/screen_distributed.py [--fields 1000] [--per-sample 10] [--workers 2] [--model PATH]

``--fields`` synthetic 900x700 fields (:func:`malaria_cells.synthetic.make_field`, a few of
them infected) in samples of ``--per-sample`` fields each: each sample is a folder holding the
same ``--per-sample`` distinct fields (a field is compared for duplicates with the other
fields of its own sample only, so none is dropped). The same folders are screened

- in one process (a fresh one: :class:`~malaria_cells.fields.Screener` built, then
  ``screen``), and
- on a local cluster of ``--workers`` worker processes, one thread each
  (:func:`~malaria_cells.fields.distributed.screen_distributed` given a client of a cluster
  already started; the workers build their screeners inside the timing),

and the two results are checked to be the same (counts and calls). Fields per second are over
the screen (model load included, cluster start-up not: it is printed apart); peak memory is
the maximum resident set size of the single process, and of each worker process. Life stages
are off (``--stages`` turns them on: each worker then loads TensorFlow's stage model).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_samples(root: Path, n_fields: int, per_sample: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    from malaria_cells.synthetic import make_field

    base = root / "base"
    base.mkdir()
    for k in range(per_sample):
        infected = tuple(range(3, 3 + 7 * (k % 3), 7))  # 0, 1 or 2 infected cells
        image, _ = make_field(np.random.default_rng(1000 + k), infected=infected)
        Image.fromarray(image).save(base / f"field{k:02d}.jpg", quality=92)
    samples = []
    for s in range(-(-n_fields // per_sample)):
        folder = root / f"sample{s:04d}"
        folder.mkdir()
        for path in sorted(base.iterdir())[:min(per_sample, n_fields - s * per_sample)]:
            (folder / path.name).symlink_to(path)
        samples.append(folder)
    return samples


def options(model, stages: bool) -> dict:
    return {"classifier": model, "stages": stages}


def single(paths: list[str], model, stages: bool) -> dict:
    """In this (fresh) process: build the screener, screen, and report."""
    import resource

    from malaria_cells.fields import Screener

    started = time.perf_counter()
    result = Screener(**options(model, stages)).screen(paths)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "fields": len(result.fields), "calls": [s.call for s in result.samples],
            "cells": [f.n_cells for f in result.fields], "parasitized": [f.n_parasitized for f in result.fields],
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fields", type=int, default=1000)
    parser.add_argument("--per-sample", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", help="cell model (default: the shipped field model)")
    parser.add_argument("--stages", action="store_true", help="give life stages (loads the stage model)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # the single-process run, in a process of its own
        print(json.dumps(single(json.loads(args.child), args.model, args.stages)))
        return

    import dask
    from distributed import Client, LocalCluster

    from malaria_cells.fields.distributed import screen_distributed

    root = Path(tempfile.mkdtemp(prefix="malaria-dask-"))
    paths = [str(p) for p in write_samples(root, args.fields, args.per_sample)]
    command = [sys.executable, __file__, "--child", json.dumps(paths)] + (["--model", args.model] if args.model else []) \
        + (["--stages"] if args.stages else [])
    one = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)

    started = time.perf_counter()
    with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}):
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=40)
    client = Client(cluster)
    start_up = time.perf_counter() - started
    try:
        started = time.perf_counter()
        result = screen_distributed(paths, client=client, screener_options=options(args.model, args.stages))
        seconds = time.perf_counter() - started
        peaks = client.run(peak_mib)
    finally:
        client.close()
        cluster.close()
    same = ([s.call for s in result.samples] == one["calls"] and [f.n_cells for f in result.fields] == one["cells"]
            and [f.n_parasitized for f in result.fields] == one["parasitized"])
    n = len(result.fields)
    print(f"{n} fields in {len(paths)} samples of {args.per_sample}; the same counts and calls: {same}; "
          f"cluster start-up {start_up:.1f} s (not in the times below)\n")
    print("| run | seconds | fields / s | peak RSS per process (MiB) |")
    print("|---|---:|---:|---|")
    print(f"| one process | {one['seconds']:.1f} | {one['fields'] / one['seconds']:.1f} | {one['peak_mib']:.0f} |")
    print(f"| Dask, {args.workers} workers x 1 thread | {seconds:.1f} | {n / seconds:.1f} | "
          f"{', '.join(f'{p:.0f}' for p in peaks.values())} (each worker) |")
    if not same:
        sys.exit("the distributed screen's counts or calls differ from one process's")


if __name__ == "__main__":
    main()
