"""Leave-slide-out under shifts: how field models score the cells of a block of fields they
never saw, as photographed and as another lab would photograph them.

    python benchmarks/fold_shifts.py --work W --block 0 --models W4/fold0.keras \\
        --train consistency=1.0 --cells cell_images --relabels relabels [--conditions NAME ...]

``--work`` is a ``python -m malaria_cells.fields.training crops`` folder: it names the fields
and their blocks of consecutive fields (neighbouring numbers are one slide). Each of
``--models`` must have been trained without block ``--block`` (``cv --save-models`` keeps
``fold{k}.keras``, trained without block k). ``--train KEY=VALUE ...`` trains one more such
model here, with those recipe settings (``Recipe``) on the other blocks and the NIH mix, and
saves it in ``--out``.

The block's fields are shifted (the shift suite's conditions, :mod:`benchmarks.shift_suite`),
screened with the shipped field model's detector and the stain normalisation the ``--work``
folder's crops were cut with (its references), and each cell matched to the ground truth;
every model then scores the same crops. A model's threshold is
the one calling 0.5% of the block's uninfected cells as photographed, so models are compared
by how far their infected cells sink under each shift, not by where their own thresholds lie.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from dataclasses import fields as dataclass_fields
from pathlib import Path

import numpy as np

import shift_suite as suite

DEFAULT_CONDITIONS = ["unshifted", "stainE_x0.6", "stain_x0.6", "exposure_x2", "blur_0.75", "blur_1.5", "jpeg_70",
                      "sat_x0.6", "noise_8"]


def block_crops(work: Path, block: int, blocks: int, names: list[str], seed: int = 0) -> dict:
    """{condition: (crops, labels "U" or a stage)} of the block's matched cells."""
    from dataclasses import replace

    from malaria_cells.fields import Screener
    from malaria_cells.fields.training import FieldCrops
    from malaria_cells.fields.truth import match_result
    from malaria_cells.runtimes import default_model_path, load_model

    data = FieldCrops.load(work)
    wanted = {data.records[f]["name"] for f, b in data.block_of(blocks).items() if b == block}
    fields = [f for f in suite.list_fields(suite.FIELDS, None) if f.kind == "iml" and f.name in wanted]
    screener = Screener(load_model(default_model_path(fields=True)))
    screener.figures = replace(screener.figures, stain_reference=data.stain_reference,
                               plasma_reference=data.plasma_reference)  # as the models were trained
    conditions = {c.name: c for c in suite.conditions()}
    diameters: dict = {}
    out = {}
    for name in ["unshifted"] + [n for n in names if n != "unshifted"]:
        condition, crops_of, labels = conditions[name], [], []
        for index, item in enumerate(fields):
            image, truth = suite.load_field(item)
            context = {"rng": np.random.default_rng([seed, zlib.crc32(name.encode()), index]), "index": index,
                       "cell_diameter": diameters.get(item.name, 32.0)}
            shifted = condition.shift(image, context) if condition.shift else image
            result, crops, _ = screener.screen_image(suite.encode(shifted, condition.jpeg), path=item.name,
                                                     keep_crops=True)
            if name == "unshifted":
                diameters[item.name] = result.cell_diameter
            counted, pairs = match_result(result, truth)
            for i, j in pairs:
                crops_of.append(crops[i])
                labels.append((counted[j].stage or "infected") if counted[j].label == "Parasitized" else "U")
        out[name] = (np.stack(crops_of), np.array(labels))
        print(f"block {block}, {name}: {len(fields)} fields, {len(labels)} matched cells", file=sys.stderr, flush=True)
    return out


def recipe_settings(items: list[str]) -> dict:
    """``KEY=VALUE`` recipe settings, each value of its setting's type; one line on a mistake."""
    from malaria_cells.fields.training import Recipe

    types = {item.name: type(item.default) for item in dataclass_fields(Recipe)}
    settings = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in types or not value:
            raise ValueError(f"{item!r}: give KEY=VALUE with KEY one of {', '.join(types)}")
        kind = types[key]
        settings[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return settings


def train_fold(work: Path, block: int, settings: dict, cells: str, relabels: str | None, out: Path) -> Path:
    from malaria_cells.fields.training import FieldCrops, Recipe, finetune, nih_mix, training_set

    data = FieldCrops.load(work)
    recipe = Recipe(**settings)
    mix = nih_mix(cells, recipe, relabels, data.crops.shape[1])
    x, y = training_set(data, [f for f, b in data.block_of(recipe.blocks).items() if b != block], mix, recipe)
    started = time.perf_counter()
    model = finetune(x, y, recipe)
    path = out / f"fold{block}-{'-'.join(f'{k}{v}' for k, v in settings.items())}.keras"
    model.save(path)
    print(f"trained {path.name} on {len(y)} crops in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return path


def score(models: list[Path], crops: dict) -> list[dict]:
    from malaria_cells.fields.screener import counting_probability
    from malaria_cells.runtimes import load_model

    rows = []
    for path in models:
        model = load_model(path)
        threshold = None
        for name, (images, labels) in crops.items():
            probability = counting_probability(model, images, tta_gate=0.1)
            infected = labels != "U"
            if threshold is None:  # 0.5% of the block's uninfected cells as photographed
                threshold = float(np.quantile(probability[~infected], 0.995))
            rows.append({"model": str(path), "condition": name, "threshold": threshold,
                         "found": int((probability[infected] >= threshold).sum()), "infected": int(infected.sum()),
                         "false_positive_rate_pct": 100 * float((probability[~infected] >= threshold).mean())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="a crops folder (fields and their blocks)")
    parser.add_argument("--block", type=int, required=True, help="the held-out block")
    parser.add_argument("--blocks", type=int, default=5, help="blocks of the cross-validation (default: 5)")
    parser.add_argument("--models", type=Path, nargs="*", default=[], help="models trained without the block")
    parser.add_argument("--train", nargs="*", metavar="KEY=VALUE", help="train one more model, with these recipe settings")
    parser.add_argument("--cells", help="--train: the NIH cell_images folder")
    parser.add_argument("--relabels", help="--train: the re-annotation folder")
    parser.add_argument("--conditions", nargs="+", default=DEFAULT_CONDITIONS, help="shift-suite conditions")
    parser.add_argument("--out", type=Path, default=Path("fold-shifts"), help="folder for the trained model and JSON")
    args = parser.parse_args()
    known = {c.name: c for c in suite.conditions()}
    for name in args.conditions:  # the block's own fields, shifted in place: same cells, same truth
        c = known.get(name)
        if c is None or c.factor != 1.0 or c.nih_only or c.morphology:
            parser.error(f"condition {name}: give a photometric shift-suite condition (stain, colour, exposure, "
                         "optics), not magnification, unreadable or drawn cells")
    if not args.models and args.train is None:
        parser.error("nothing to score: give --models, --train or both")
    settings = {}
    if args.train is not None:
        if not args.cells:
            parser.error("--train needs --cells (the NIH mix)")
        try:
            settings = recipe_settings(args.train)
        except ValueError as error:
            parser.error(f"--train {error}")
        if settings.setdefault("blocks", args.blocks) != args.blocks:
            parser.error("--train blocks must equal --blocks (the model must not see the block it is scored on)")
    missing = [str(p) for p in [args.work / "field_crops.npz", *args.models] if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)} (--work is a crops step's folder)")
    if not 0 <= args.block < args.blocks:
        parser.error(f"--block must be 0 to {args.blocks - 1}")
    from malaria_cells import MalariaCellsError

    args.out.mkdir(parents=True, exist_ok=True)
    models = list(args.models)
    names = ["unshifted"] + [c for c in args.conditions if c != "unshifted"]
    try:
        if args.train is not None:
            models.append(train_fold(args.work, args.block, settings, args.cells, args.relabels, args.out))
        rows = score(models, block_crops(args.work, args.block, args.blocks, names))
    except MalariaCellsError as error:
        sys.exit(f"error: {error}")
    print("| model | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for path in models:
        cells = {r["condition"]: r for r in rows if r["model"] == str(path)}
        print(f"| {path.resolve().parent.name}/{path.name} | " + " | ".join(
            f"{cells[c]['found']}/{cells[c]['infected']} ({cells[c]['false_positive_rate_pct']:.2f}%)" for c in names) + " |")
    (args.out / f"block{args.block}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
