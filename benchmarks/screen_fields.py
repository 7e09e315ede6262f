"""Screening figures on the shared fields: detection, classification, parasitemia and the calls.

    python benchmarks/screen_fields.py [--model PATH]

Screens the NIH photographs (one healthy patient) and the IML fields (P. vivax) with their
ground truth and prints, per set: detection precision / recall / F1, count error, sensitivity
and false-positive rate on matched cells, mean absolute per-field parasitemia error, how each
parasite stage fares, and the sample call. The IML fields are also scored by block of 23
consecutive names (the blocks of ``python -m malaria_cells.fields.training``).
"""

from __future__ import annotations

import argparse

from _common import SHARED_DATA

FIELDS = SHARED_DATA.parent / "fields"


def describe(name: str, truth: dict, call: str | None = None) -> str:
    stages = ", ".join(f"{stage} {s['called']}/{s['detected']}/{s['n']}" for stage, s in sorted(truth["stages"].items()))
    line = (f"{name}: {truth['fields']} fields, {truth['n_true']} annotated cells; detection P {truth['precision']:.3f} "
            f"R {truth['recall']:.3f} F1 {truth['f1']:.3f}, count error {truth['count_error']:+d}; "
            f"parasitemia found {100 * truth['n_found_parasitized'] / max(1, truth['n_found']):.2f}% vs true "
            f"{100 * (truth['true_parasitemia'] or 0):.2f}%, per-field MAE {100 * truth['field_parasitemia_mae']:.2f} points; "
            f"false-positive rate {100 * (truth['false_positive_rate'] or 0):.2f}%")
    if truth["sensitivity"] is not None:
        found = truth["matched_parasitized_called"]
        line += (f"; sensitivity on matched infected cells {100 * truth['sensitivity']:.1f}% "
                 f"({found} of {truth['matched_parasitized']} matched, {truth['n_true_parasitized']} annotated: "
                 f"{100 * found / max(1, truth['n_true_parasitized']):.1f}% of all infected cells found)")
    if stages:
        line += f"; stages called/detected/annotated: {stages}"
    return line + (f"; call {call}" if call else "")


def main() -> None:
    from malaria_cells.fields import pool_fields, screen

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="cell model (default: the shipped field model)")
    args = parser.parse_args()
    nih = screen(FIELDS / "nih" / "239C12NThinF", args.model, truth=True)
    print(describe("NIH, healthy patient C12", nih.summary.truth, nih.summary.call),
          f"(raw parasitemia {100 * nih.summary.parasitemia:.2f}%)")
    iml = screen(FIELDS / "iml", args.model, truth=True)
    print(describe("IML, all fields", iml.summary.truth, iml.summary.call))
    from malaria_cells.runtimes import default_model_path, load_model

    model = load_model(args.model or default_model_path(fields=True))
    for block in range(5):
        fields = iml.fields[23 * block:23 * (block + 1)]
        sample = pool_fields(f"block {block}", fields, model)
        print(describe(f"IML block {block} ({fields[0].path.split('/')[-1]}-{fields[-1].path.split('/')[-1]})",
                       sample.truth, sample.call))


if __name__ == "__main__":
    main()
