"""Screen every shared field and keep what a change must not move: per field the counted cells,
their labels and probabilities, the excluded objects, quality and the sample calls.

    python benchmarks/screen_snapshot.py --out before.json          # on the code before a change
    python benchmarks/screen_snapshot.py --out after.json --compare before.json

``--compare`` prints every difference and exits 1 if there is any: the same cells (centres and
boxes), labels, excluded objects, quality verdicts and calls, and probabilities within
``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fields"


def snapshot(root: Path) -> dict:
    from malaria_cells import screen

    result = screen([root / "nih", root / "iml"]).to_dict()
    fields = {Path(f["path"]).name: {"n_cells": f["n_cells"], "n_parasitized": f["n_parasitized"],
                                     "quality": f["quality"], "cell_diameter": f["cell_diameter"],
                                     "cells": [[c["x"], c["y"], *c["bbox"], c["label"], c["probability"]]
                                               for c in f["cells"]],
                                     "excluded": [[o["x"], o["y"], o["kind"]] for o in f["excluded"]]}
              for f in result["fields"]}
    calls = {s["name"]: [s["call"], s["n_cells"], s["n_parasitized"]] for s in result.get("samples", [])}
    return {"fields": fields, "calls": calls}


def compare(before: dict, after: dict, tolerance: float) -> list[str]:
    problems = []
    if before["calls"] != after["calls"]:
        problems.append(f"calls: {before['calls']} -> {after['calls']}")
    for name, old in before["fields"].items():
        new = after["fields"].get(name)
        if new is None:
            problems.append(f"{name}: missing")
            continue
        for key in ("n_cells", "n_parasitized", "quality", "cell_diameter", "excluded"):
            if old[key] != new[key]:
                problems.append(f"{name}: {key} {old[key]} -> {new[key]}")
        if [c[:-1] for c in old["cells"]] != [c[:-1] for c in new["cells"]]:
            problems.append(f"{name}: counted cells or labels differ")
        elif any(abs(a[-1] - b[-1]) > tolerance for a, b in zip(old["cells"], new["cells"])):
            problems.append(f"{name}: a probability moved by more than {tolerance}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fields", type=Path, default=SHARED, help="folder with nih/ and iml/ (default: ../shared)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, help="a snapshot to compare with")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args()
    data = snapshot(args.fields)
    args.out.write_text(json.dumps(data))
    n_cells = sum(f["n_cells"] for f in data["fields"].values())
    print(f"{len(data['fields'])} fields, {n_cells} counted cells, calls {data['calls']}")
    if args.compare:
        problems = compare(json.loads(args.compare.read_text()), data, args.tolerance)
        print("\n".join(problems) or "identical: every field's cells, labels, excluded objects, quality and the calls")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
