"""Fine-tune the cell model on field crops and choose its counting operating point.

    python scripts/field_model.py crops --work W     # cut and label every shared field's cells once
    python scripts/field_model.py cv --work W        # 5-fold cross-validation over IML blocks (the report)
    python scripts/field_model.py final --work W     # the model to ship: W/field-model.keras
    python scripts/field_model.py ship --work W      # into the package, with its ONNX copy

An ensemble: ``cv`` and ``final`` in one folder per ``--seed``, then
``ensemble --work W --members W0 W1 W2`` (the averaged scores' nested report, and the averaging
model of the members' final models) and ``ship --work W``.

Crops are cut by the same detector and crop function as ``malaria-cells screen`` and labelled by
matching them to the ground truth.
The IML fields are split into 5 blocks of consecutive file names (neighbouring numbers are the
same slide); NIH cell crops whose label the published re-annotation disputes are left out of
the mix, which keeps the model's NIH performance, and the healthy NIH patients' cells (but
C12's) join it as sure negatives. Uninfected cells with a stain speck drawn on are the hard
negatives that real fields are full of. The NIH field photographs (one healthy
patient) are never trained on: they only check false alarms.

For each fold ``k``: train on the other four blocks, score everything, and keep the scores.
The counting threshold is the lowest whose false-positive rate on uninfected cells is at most ``--max-fpr``, chosen on out-of-fold
scores: for the report of block ``k``, on the other four blocks' (so block ``k`` chose
nothing); for the shipped model, on all five. ``final`` trains on all five blocks with the
same recipe and carries that threshold and the out-of-fold sensitivity and specificity at
it (the figures ``screen`` corrects parasitemia with and weighs a call against).

Every score is a counting score, as ``screen`` computes it: a cell whose crop scores at least
``--tta-gate`` is scored again as the mean of its 8 rotations and mirrors; the model carries
the gate beside the threshold. ``rescore`` scores the crops again with the fold models that
``cv --save-models`` kept, and ``final --trained PATH`` gives a model already trained by the
recipe new figures without training it again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BLOCKS = 5


def build_crops(work: Path) -> None:
    from malaria_cells.images import read_file
    from malaria_cells.runtimes import load_model
    from malaria_cells.screening import screen_image
    from malaria_cells.truth import _is_cut, match_cells, read_truth

    model = load_model()
    fields = sorted((SHARED / "fields" / "iml").glob("*.JPG")) + sorted((SHARED / "fields" / "nih").glob("*/*.jpg"))
    crops, labels, stages, field_index, records, boxes = [], [], [], [], [], []
    for number, path in enumerate(fields):
        result, field_crops, _ = screen_image(read_file(path), model, path=str(path), keep_crops=True)
        annotated = read_truth(path)
        truth = [c for c in annotated if c.label in ("Uninfected", "Parasitized")
                 and not _is_cut(c, result.width, result.height)]
        found = np.array([[c.x, c.y] for c in result.cells]).reshape(-1, 2)
        true = np.array([[c.x, c.y] for c in truth]).reshape(-1, 2)
        label, stage = np.full(len(found), -1), [""] * len(found)
        for i, j in match_cells(found, true, result.cell_diameter / 2):
            label[i] = int(truth[j].label == "Parasitized")
            stage[i] = truth[j].stage or ""
        # A fragment of an infected (or undecidable) cell that the detector split is neither a
        # clean positive nor a negative: it is kept out of training (label -2).
        unsure = [c for c in annotated if c.label in ("Parasitized", "difficult") and c.width]
        for i in np.flatnonzero(label == -1):
            if any(abs(found[i, 0] - c.x) < c.width / 2 and abs(found[i, 1] - c.y) < c.width / 2 for c in unsure):
                label[i] = -2
        crops.append(field_crops)
        boxes.append(np.array([c.bbox for c in result.cells], float).reshape(-1, 4))
        labels.append(label)
        stages += stage
        field_index.append(np.full(len(found), number))
        records.append({"name": path.name, "kind": "nih" if "nih" in str(path) else "iml", "n_true": len(truth),
                        "n_true_parasitized": sum(c.label == "Parasitized" for c in truth),
                        "stages_true": [c.stage for c in truth if c.stage]})
        print(f"{path.name}: {len(found)} cells", flush=True)
    np.savez_compressed(work / "field_crops.npz", crops=np.concatenate(crops), labels=np.concatenate(labels),
                        stages=np.array(stages), field=np.concatenate(field_index),
                        boxes=np.concatenate(boxes))
    (work / "fields.json").write_text(json.dumps(records, indent=1))


def load_crops(work: Path):
    data = np.load(work / "field_crops.npz")
    records = json.loads((work / "fields.json").read_text())
    iml = [i for i, r in enumerate(records) if r["kind"] == "iml"]
    block_of = {field: b for b, part in enumerate(np.array_split(np.array(iml), BLOCKS)) for field in part}
    return data, records, block_of


def nih_cells(seed: int, count: int, parasitized_share: float, healthy_repeat: int = 1):
    """A sample of the NIH crops whose label the re-annotation does not dispute, ``parasitized_share``
    of them Parasitized, plus every cell of the healthy patients (``NThinF`` in the name: all truly
    uninfected, no label noise) but C12, whose fields check false alarms, ``healthy_repeat`` times."""
    from malaria_cells.datasets import list_cell_images
    from malaria_cells.pipeline import read_images

    disputed = set()
    for name in ("disputed_parasitized.txt", "disputed_uninfected.txt"):
        disputed |= set((SHARED / "relabels" / name).read_text().split())
    files = list_cell_images(SHARED / "cell_images")
    names = [Path(p).name for p in files.paths]
    keep = np.array([name not in disputed for name in names])
    healthy = np.array(["NThinF" in name and not name.startswith("C12N") for name in names])
    keep &= ~healthy
    rng = np.random.default_rng(seed)
    chosen = list(np.flatnonzero(healthy)) * healthy_repeat
    for label, share in ((0, 1 - parasitized_share), (1, parasitized_share)):
        pool = np.flatnonzero(keep & (files.labels == label))
        chosen += list(rng.choice(pool, int(count * share), replace=False))
    chosen = np.array(chosen)
    unique, inverse = np.unique(chosen, return_inverse=True)
    images, readable, _ = read_images([files.paths[i] for i in unique], 64)
    assert readable.all()
    return images[inverse], files.labels[chosen].astype(np.float32)


def soften(nih, weight: float):
    """Blend the NIH labels with the shipped model's own scores (distillation): the NIH crops
    then hold the field model to what the shipped model says of NIH-looking cells."""
    from malaria_cells.runtimes import load_model

    if weight <= 0:
        return nih
    scores = load_model().probability(nih[0], batch_size=512)
    return nih[0], (1 - weight) * nih[1] + weight * scores


def finetune(train_x, train_y, *, epochs: int, seed: int, learning_rate: float):
    import keras

    from malaria_cells.runtimes import DEFAULT_MODEL, KerasClassifier, load_model
    from malaria_cells.augment import training_dataset

    keras.utils.set_random_seed(seed)
    model = load_model(DEFAULT_MODEL).keras_model
    steps = int(np.ceil(len(train_y) / 64)) * epochs
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=keras.losses.BinaryCrossentropy(label_smoothing=0.05))
    data = training_dataset(train_x, train_y, batch_size=64, augment="flips+color", seed=seed)
    model.fit(data, epochs=epochs, verbose=0)
    return KerasClassifier(model)


def add_specks(cells: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uninfected cells with a stain speck or platelet fragment on top: one or two short, thin,
    straight dark rods (no parasite stage looks like that: a ring is a ring with a dot, a
    gametocyte fills much of the cell). The hard negatives of real fields."""
    import cv2

    out = cells.copy()
    size = cells.shape[1]
    for image in out:
        inside = image.max(axis=2) > 20
        ys, xs = np.nonzero(inside)
        if len(ys) < 50:
            continue
        for _ in range(rng.integers(1, 3)):
            k = rng.integers(len(ys))
            angle, length = rng.uniform(0, np.pi), rng.uniform(0.06, 0.16) * size
            dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
            colour = tuple(int(v) for v in rng.uniform([60, 10, 70], [130, 55, 130]))
            rod = image.copy()
            cv2.line(rod, (int(xs[k] - dx), int(ys[k] - dy)), (int(xs[k] + dx), int(ys[k] + dy)), colour,
                     int(rng.integers(1, 3)), cv2.LINE_AA)
            alpha = rng.uniform(0.6, 0.95)
            image[:] = (alpha * rod + (1 - alpha) * image).astype(np.uint8)
        image[~inside] = 0
    return out


def add_clumps(cells: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uninfected cells overlapped by one or two others and cut along a straight line: the
    crowded patches a watershed cannot split cleanly, whose pale overlaps and gaps look like
    parasites to a model that has only seen single cells."""
    import cv2

    size = cells.shape[1]
    out = np.zeros_like(cells)
    kernel = np.ones((3, 3), np.uint8)
    for n, image in enumerate(cells):
        canvas = image.copy()
        covered = cv2.erode((image.max(axis=2) > 40).astype(np.uint8), kernel, iterations=2)
        canvas[covered == 0] = 0
        for _ in range(rng.integers(1, 3)):
            other = cells[rng.integers(len(cells))]
            shift = rng.uniform(0.3, 0.6) * size
            angle = rng.uniform(0, 2 * np.pi)
            matrix = np.float32([[1, 0, shift * np.cos(angle)], [0, 1, shift * np.sin(angle)]])
            moved = cv2.warpAffine(other, matrix, (size, size), flags=cv2.INTER_NEAREST)
            on = cv2.erode((moved.max(axis=2) > 40).astype(np.uint8), kernel, iterations=2) > 0
            if rng.random() < 0.5:  # an overlap is paler where two cells lie on each other
                both = on & (covered > 0)
                canvas[both] = np.clip(0.55 * moved[both] + 0.55 * canvas[both], 0, 255).astype(np.uint8)
                on &= ~both
            canvas[on] = moved[on]
            covered = np.maximum(covered, on.astype(np.uint8))
        # the background between cells of a clump is inside its outline: pale, as in the field
        points = cv2.findNonZero(covered)
        if points is not None:
            hull = np.zeros_like(covered)
            cv2.fillConvexPoly(hull, cv2.convexHull(points), 1)
            gap = (hull > 0) & (covered == 0)
            bright = np.percentile(image[image.max(axis=2) > 40].reshape(-1, 3), 95, axis=0)
            canvas[gap] = np.clip(bright * rng.uniform(1.05, 1.2), 0, 255).astype(np.uint8)
        scale = rng.uniform(0.7, 1.0)
        matrix = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(0, 360), scale)
        canvas = cv2.warpAffine(canvas, matrix, (size, size))
        if rng.random() < 0.7:  # a watershed line through the clump
            yy, xx = np.mgrid[:size, :size]
            angle, offset = rng.uniform(0, np.pi), rng.uniform(-0.25, 0.25) * size
            side = (xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle) > offset
            canvas[side] = 0
        out[n] = canvas
    return out


def training_set(data, block_of, blocks, nih, oversample: int, specks: int = 0, seed: int = 0, clumps: int = 0):
    """Crops of the given blocks' fields. Detections that match no annotation are mostly
    fragments of split clumps and unannotated uninfected cells (every infected cell carries
    its stage): they train as Uninfected, which is what the model must say of them in use,
    except pieces of an infected cell (their centre inside its box), which are left out."""
    in_blocks = np.array([block_of.get(f, -1) in blocks for f in data["field"]]) & (data["labels"] != -2)
    x, y = data["crops"][in_blocks], np.maximum(data["labels"][in_blocks], 0)
    infected = np.flatnonzero(y == 1)
    x = np.concatenate([x, np.repeat(x[infected], oversample - 1, axis=0), nih[0]])
    y = np.concatenate([y, np.ones(len(infected) * (oversample - 1)), nih[1]]).astype(np.float32)
    if specks:
        rng = np.random.default_rng(seed)
        negatives = np.flatnonzero(y == 0)
        chosen = rng.choice(negatives, min(specks, len(negatives)), replace=False)
        x = np.concatenate([x, add_specks(x[chosen], rng)])
        y = np.concatenate([y, np.zeros(len(chosen), np.float32)])
    if clumps:
        rng = np.random.default_rng(seed + 1)
        field_negatives = np.flatnonzero(y[:in_blocks.sum()] == 0)
        chosen = rng.choice(field_negatives, min(clumps, len(field_negatives)), replace=False)
        x = np.concatenate([x, add_clumps(x[chosen], rng)])
        y = np.concatenate([y, np.zeros(len(chosen), np.float32)])
    return x, y


def choose_threshold(probability, labels, max_fpr: float) -> float:
    """The lowest threshold at which at most ``max_fpr`` of the uninfected validation cells are
    called Parasitized. False alarms are what make parasitemia meaningless, and with thousands
    of uninfected cells their rate is measured far more steadily than a sensitivity on the few
    dozen infected cells a validation block holds."""
    uninfected = np.sort(probability[labels == 0])[::-1]
    if len(uninfected) == 0:
        return 0.5
    allowed = int(np.floor(max_fpr * len(uninfected)))
    return float(np.nextafter(uninfected[allowed], 1.0)) if allowed < len(uninfected) else 0.0


def field_report(data, records, fields, probability, threshold) -> dict:
    """Cell and field figures at ``threshold`` over the given fields (from cached crops)."""
    mask = np.isin(data["field"], fields)
    labels, stages, called = data["labels"][mask], data["stages"][mask], probability[mask] >= threshold
    field_of = data["field"][mask]
    errors, per_field = [], []
    for f in fields:
        here = field_of == f
        found = called[here].sum() / max(1, here.sum())
        truth = records[f]["n_true_parasitized"] / max(1, records[f]["n_true"])
        errors.append(abs(found - truth))
        per_field.append((records[f]["name"], int(here.sum()), int(called[here].sum()), round(100 * found, 2),
                          round(100 * truth, 2)))
    stage_report = {}
    for stage in ("ring", "trophozoite", "schizont", "gametocyte"):
        true_total = sum(records[f]["stages_true"].count(stage) for f in fields)
        found = int((called & (stages == stage)).sum())
        stage_report[stage] = {"annotated": true_total, "detected": int((stages == stage).sum()), "called": found}
    infected, healthy = labels == 1, labels == 0
    return {"fields": len(fields), "cells": int(mask.sum()), "threshold": threshold,
            "sensitivity": float(called[infected].mean()) if infected.any() else None,
            "infected_matched": int(infected.sum()),
            "false_positive_rate": float(called[healthy].mean()) if healthy.any() else None,
            "parasitemia_mae_points": 100 * float(np.mean(errors)),
            "found_of_annotated_infected": (int((called & infected).sum()),
                                            sum(records[f]["n_true_parasitized"] for f in fields)),
            "stages": stage_report, "per_field": per_field}


def out_of_fold(data, block_of, probabilities) -> np.ndarray:
    """Each IML cell scored by the fold model that held its block out (-1 elsewhere)."""
    oof = np.full(len(data["labels"]), -1.0)
    for k, probability in enumerate(probabilities):
        here = np.isin(data["field"], [f for f, b in block_of.items() if b == k])
        oof[here] = probability[here]
    return oof


def pooled_threshold(data, block_of, oof, blocks, max_fpr: float) -> float:
    """The counting threshold chosen on the out-of-fold scores of ``blocks``' uninfected cells."""
    mask = np.isin(data["field"], [f for f, b in block_of.items() if b in blocks]) & (data["labels"] >= 0)
    return choose_threshold(oof[mask], data["labels"][mask], max_fpr)


def nested_report(data, records, block_of, probabilities, max_fpr: float) -> dict:
    """Every block scored at a threshold chosen without it: for block ``k``, the threshold comes
    from the other four blocks' out-of-fold scores and is applied to fold ``k``'s model, which
    never saw block ``k``. Pooled over the 115 fields: what the recipe does on fields it did not see."""
    from malaria_cells.screening import _corrected

    oof = out_of_fold(data, block_of, probabilities)
    nih_fields = [i for i, r in enumerate(records) if r["kind"] == "nih"]
    called, errors, corrected_errors, per_fold, nih = np.zeros(len(oof), bool), [], [], [], []
    stages = {}
    for k, probability in enumerate(probabilities):
        others = [b for b in range(BLOCKS) if b != k]
        threshold = pooled_threshold(data, block_of, oof, others, max_fpr)
        fields = [f for f, b in block_of.items() if b == k]
        report = field_report(data, records, fields, probability, threshold)
        # Rogan-Gladen as screen corrects, with the figures measured on the other blocks
        seen = np.isin(data["field"], [f for f, b in block_of.items() if b in others])
        figures = {"sensitivity": float((oof[seen & (data["labels"] == 1)] >= threshold).mean()),
                   "specificity": float((oof[seen & (data["labels"] == 0)] < threshold).mean())}
        corrected_errors += [abs(100 * _corrected(called_here, cells, figures)["parasitemia"] - truth)
                             for _, cells, called_here, _, truth in report["per_field"]]
        here = np.isin(data["field"], fields)
        called[here] = probability[here] >= threshold
        errors += [abs(row[3] - row[4]) for row in report["per_field"]]
        for stage, counts in report["stages"].items():
            stages[stage] = {key: stages.get(stage, {}).get(key, 0) + value for key, value in counts.items()}
        per_fold.append({key: report[key] for key in ("threshold", "sensitivity", "false_positive_rate",
                                                      "parasitemia_mae_points")})
        nih.append(field_report(data, records, nih_fields, probability, threshold)["false_positive_rate"])
    labels, iml = data["labels"], oof >= 0
    found = int((called & (labels == 1)).sum())
    annotated = sum(records[f]["n_true_parasitized"] for f in block_of)
    return {"max_fpr": max_fpr, "fields": len(errors), "sensitivity": float(called[iml & (labels == 1)].mean()),
            "false_positive_rate": float(called[iml & (labels == 0)].mean()),
            "parasitemia_mae_points": float(np.mean(errors)),
            "corrected_parasitemia_mae_points": float(np.mean(corrected_errors)),
            "found_of_annotated_infected": [found, annotated],
            "stages": stages, "nih_healthy_false_positive_rate": {"mean": float(np.mean(nih)), "max": float(np.max(nih))},
            "folds": per_fold}


def score(model, crops, args) -> np.ndarray:
    """Counting scores of ``crops``, as ``screen`` computes them with ``--tta-gate``."""
    from malaria_cells.screening import counting_probability

    return counting_probability(model, crops, tta_gate=args.tta_gate)


def run_fold(data, block_of, train_blocks, nih, args):
    """Fine-tune on ``train_blocks``' fields (and the NIH mix); score every cached crop."""
    x, y = training_set(data, block_of, train_blocks, nih, args.oversample, args.specks, args.seed, args.clumps)
    model = finetune(x, y, epochs=args.epochs, seed=args.seed, learning_rate=args.learning_rate)
    return model, score(model, data["crops"], args)


def rescore(data, records, block_of, args) -> None:
    """Score the crops again with the fold models ``cv --save-models`` kept (a new ``--tta-gate``
    without training again) and print the nested reports."""
    from malaria_cells.runtimes import load_model

    missing = [f"fold{k}.keras" for k in range(BLOCKS) if not (args.work / f"fold{k}.keras").is_file()]
    if missing:
        raise SystemExit(f"{args.work}: no {', '.join(missing)}; run `cv --work {args.work} --save-models` first")
    probabilities = []
    for k in range(BLOCKS):
        probabilities.append(score(load_model(args.work / f"fold{k}.keras"), data["crops"], args))
        np.save(args.work / f"fold{k}-probability.npy", probabilities[-1])
    nested = [nested_report(data, records, block_of, probabilities, rate) for rate in (0.003, 0.004, 0.005, 0.006, 0.008)]
    for row in nested:
        print(json.dumps({k: v for k, v in row.items() if k not in ("folds", "stages")}), flush=True)
    (args.work / "nested.json").write_text(json.dumps(nested, indent=1))


def ship(path: Path) -> None:
    """Put the field model in the package (``malaria-cells-fields.keras``, its metadata JSON and
    its ONNX copy, kept only if both label every development cell alike)."""
    import shutil

    from malaria_cells.export import check_parity, export_model, sidecar_path
    from malaria_cells.files import atomic_path, write_json
    from malaria_cells.runtimes import FIELD_MODEL, load_model

    model = load_model(path)
    with atomic_path(FIELD_MODEL) as temporary:
        shutil.copyfile(path, temporary)
    write_json(FIELD_MODEL.with_suffix(".json"), {**model.info, "file": FIELD_MODEL.name,
                                                   "threshold": model.threshold})
    onnx_copy = FIELD_MODEL.with_suffix(".onnx")
    export_model(FIELD_MODEL, onnx_copy, format="onnx")
    parity = check_parity(FIELD_MODEL, onnx_copy, SHARED / "cell_images")
    if parity["agreement"] < 1.0:
        onnx_copy.unlink()
        sidecar_path(onnx_copy).unlink()
        raise SystemExit(f"the ONNX copy disagreed with the .keras model: {parity}; not shipped")
    print(f"shipped {FIELD_MODEL} and {onnx_copy}: threshold {model.threshold:.4f}, same label on all "
          f"{parity['n']} development cells (largest difference {parity['max_probability_difference']:.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("crops", "cv", "rescore", "final", "ensemble", "ship"))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--oversample", type=int, default=20)
    parser.add_argument("--nih-cells", type=int, default=8000)
    parser.add_argument("--nih-parasitized", type=float, default=0.25, help="share of Parasitized NIH crops in the mix")
    parser.add_argument("--nih-soft", type=float, default=0.0, help="weight of the shipped model's scores in the NIH labels")
    parser.add_argument("--specks", type=int, default=6000, help="hard negatives: uninfected cells with a stain speck drawn on")
    parser.add_argument("--clumps", type=int, default=0, help="hard negatives: uninfected field cells overlapped and cut")
    parser.add_argument("--save-models", action="store_true", help="keep each fold's model in --work")
    parser.add_argument("--nih-healthy-repeat", type=int, default=4, help="times the healthy patients' cells are in the mix")
    parser.add_argument("--max-fpr", type=float, default=0.005,
                        help="false-positive rate on validation fields' uninfected cells the threshold allows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tta-gate", type=float, default=0.1,
                        help="cells scoring at least this get the mean of their 8 rotations and mirrors (1: never)")
    parser.add_argument("--trained", type=Path,
                        help="final: a model this recipe already trained, given new figures instead of training one")
    parser.add_argument("--members", type=Path, nargs="+", help="ensemble: the --work folders of the members' runs")
    parser.add_argument("--soup", action="store_true", help="ensemble: average the fold models' weights, not their scores")
    parser.add_argument("--folds", type=int, nargs="*", default=list(range(BLOCKS)))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step == "crops":
        return build_crops(args.work)
    if args.step == "ship":
        return ship(args.work / "field-model.keras")
    if args.step == "ensemble":
        return ensemble(args)
    data, records, block_of = load_crops(args.work)
    if args.step == "rescore":
        return rescore(data, records, block_of, args)
    nih_fields = [i for i, r in enumerate(records) if r["kind"] == "nih"]
    nih = soften(nih_cells(args.seed, args.nih_cells, args.nih_parasitized, args.nih_healthy_repeat), args.nih_soft)
    if args.step == "cv":
        from malaria_cells.runtimes import load_model

        from malaria_cells.screening import counting_probability

        shipped_model = load_model()
        shipped = counting_probability(shipped_model, data["crops"])  # as screen scores with it
        reports = []
        for k in args.folds:
            model, probability = run_fold(data, block_of, [b for b in range(BLOCKS) if b != k], nih, args)
            np.save(args.work / f"fold{k}-probability.npy", probability)
            if args.save_models:
                model.save(args.work / f"fold{k}.keras")
            test_fields = [f for f, b in block_of.items() if b == k]
            sweep = {f"{t:.2f}": {"test": {key: field_report(data, records, test_fields, probability, t)[key]
                                           for key in ("sensitivity", "false_positive_rate", "parasitemia_mae_points")},
                                  "nih_fpr": field_report(data, records, nih_fields, probability, t)["false_positive_rate"]}
                     for t in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97)}
            report = {"fold": k, "sweep": sweep,
                      "shipped_at_its_threshold": field_report(data, records, test_fields, shipped, shipped_model.threshold)}
            reports.append(report)
            print(json.dumps({"fold": k, "sweep": sweep}), flush=True)
            (args.work / "cv.json").write_text(json.dumps(reports, indent=1, default=str))
        if sorted(args.folds) == list(range(BLOCKS)):
            probabilities = [np.load(args.work / f"fold{k}-probability.npy") for k in range(BLOCKS)]
            nested = [nested_report(data, records, block_of, probabilities, rate)
                      for rate in (0.003, 0.004, 0.005, 0.006, 0.008)]
            for row in nested:
                print(json.dumps({k: v for k, v in row.items() if k not in ("folds", "stages")}), flush=True)
            (args.work / "nested.json").write_text(json.dumps(nested, indent=1))
        return
    probabilities = [np.load(args.work / f"fold{k}-probability.npy") for k in range(BLOCKS)]
    if args.trained:  # the same weights, new figures
        from malaria_cells.runtimes import load_model

        model = load_model(args.trained)
        info = {key: value for key, value in model.info.items() if key != "field"}
        return save_field_model(model, info, data, records, block_of, probabilities, args)
    x, y = training_set(data, block_of, list(range(BLOCKS)), nih, args.oversample, args.specks, args.seed, args.clumps)
    model = finetune(x, y, epochs=args.epochs, seed=args.seed, learning_rate=args.learning_rate)
    info = dict(model.info)
    info["base"] = "malaria-cells-default.keras, fine-tuned by scripts/field_model.py"
    save_field_model(model, info, data, records, block_of, probabilities, args)


def save_field_model(model, info, data, records, block_of, probabilities, args) -> None:
    """Give ``model`` its counting threshold (chosen on the out-of-fold ``probabilities`` of all
    five blocks), the out-of-fold sensitivity and specificity at it, the nested figures and its
    recipe, and save it as ``--work``/field-model.keras."""
    from malaria_cells.models import model_info_layer

    nih_fields = [i for i, r in enumerate(records) if r["kind"] == "nih"]
    oof = out_of_fold(data, block_of, probabilities)
    threshold = pooled_threshold(data, block_of, oof, list(range(BLOCKS)), args.max_fpr)
    labelled = (oof >= 0) & (data["labels"] >= 0)
    called, labels = oof[labelled] >= threshold, data["labels"][labelled]
    sensitivity, false_positives = float(called[labels == 1].mean()), float(called[labels == 0].mean())
    probability = score(model, data["crops"], args)
    info["field"] = {"threshold": threshold, "tta_gate": args.tta_gate, "sensitivity": sensitivity, "specificity": 1 - false_positives,
                     "chosen_on": f"out-of-fold scores of the {len(block_of)} IML fields (5 blocks), "
                                  f"at most {args.max_fpr:.1%} of their uninfected cells called",
                     "cells": {"infected": int((labels == 1).sum()), "uninfected": int((labels == 0).sum())},
                     "nested": {k: v for k, v in nested_report(data, records, block_of, probabilities,
                                                              args.max_fpr).items() if k != "folds"},
                     "nih_healthy": {k: v for k, v in field_report(data, records, nih_fields, probability, threshold).items()
                                     if k in ("fields", "cells", "false_positive_rate")},
                     "recipe": {k: (str(v) if isinstance(v, Path) else [str(m) for m in v] if k == "members" else v)
                                for k, v in vars(args).items()
                                if k not in ("work", "step", "folds", "save_models", "trained") and v is not None}}
    if not args.trained:
        info["trained_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    model_info_layer(model.keras_model).info = model.info = info
    model.set_threshold(threshold)  # the model's own threshold is its counting threshold
    model.save(args.work / "field-model.keras")
    print(json.dumps(info["field"], indent=1, default=str))


def average_weights(models):
    """A copy of ``models[0]`` whose every weight is the mean of the members' (a "model soup")."""
    import keras

    soup = keras.models.clone_model(models[0])
    soup.set_weights([np.mean(weights, axis=0) for weights in zip(*[m.get_weights() for m in models])])
    return soup


def ensemble(args) -> None:
    """Average the members' (``cv`` runs of one recipe, different ``--seed``) fold scores and
    report the mean by the same nested cross-validation; where every member also ran ``final``,
    save the averaging model of their final models with a threshold chosen on the averaged
    out-of-fold scores."""
    from malaria_cells.models import average_models
    from malaria_cells.runtimes import KerasClassifier, load_model

    data, records, block_of = load_crops(args.members[0])
    if args.soup:  # one model per fold whose weights are the members' mean (needs --save-models)
        probabilities = [KerasClassifier(average_weights([load_model(m / f"fold{k}.keras").keras_model
                                                          for m in args.members])).probability(data["crops"], batch_size=512)
                         for k in range(BLOCKS)]
    else:
        probabilities = [np.mean([np.load(m / f"fold{k}-probability.npy") for m in args.members], axis=0)
                         for k in range(BLOCKS)]
    for k, probability in enumerate(probabilities):
        np.save(args.work / f"fold{k}-probability.npy", probability)
    nested = [nested_report(data, records, block_of, probabilities, rate) for rate in (0.003, 0.004, 0.005, 0.006, 0.008)]
    for row in nested:
        print(json.dumps({k: v for k, v in row.items() if k not in ("folds",)}), flush=True)
    (args.work / "nested.json").write_text(json.dumps(nested, indent=1))
    finals = [m / "field-model.keras" for m in args.members]
    if args.soup or not all(path.is_file() for path in finals):
        return
    members = [load_model(path) for path in finals]
    model = KerasClassifier(average_models([m.keras_model for m in members]))
    info = {key: value for key, value in members[0].info.items() if key not in ("field", "trained_at")}
    info["base"] = (f"mean of {len(members)} copies of malaria-cells-default.keras, each fine-tuned by "
                    f"scripts/field_model.py with its own seed")
    save_field_model(model, info, data, records, block_of, probabilities, args)

if __name__ == "__main__":
    from malaria_cells import MalariaCellsError

    try:
        sys.exit(main())
    except MalariaCellsError as error:  # a missing or broken model file: one line, not a traceback
        raise SystemExit(f"field_model.py: {error}") from None
