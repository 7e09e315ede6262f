"""Shift suite: the shared fields screened as another lab's would differ, and drawn odd-shaped cells.

    python benchmarks/shift_suite.py [--fields N] [--conditions NAME ...] [--out benchmarks/shift-suite.json]
                                     [--model PATH] [--data FOLDER] [--seed 0] [--jobs 2]

Every IML field (P. vivax, JSON truth) and the 4 NIH photographs of a healthy patient (point
truth) are transformed by one shift of :mod:`malaria_cells.shifts` at a time, encoded losslessly
as PNG (JPEG at the condition's quality for the JPEG conditions) and screened by
``screen_image`` with their truth (coordinates scaled with the image). The NIH photographs are
taken as the screen decodes them (half size, cells ~60 px, as the IML cells). Per condition:
detection precision / recall / F1 (all fields pooled), infected cells found (called
Parasitized of all annotated infected IML cells, and per stage), false-positive rate on matched
uninfected cells (all fields), mean per-field parasitemia error (points, all fields), counted
vs true cells (% error, IML and NIH apart) and the call on the NIH healthy sample (for pure
noise and non-smear inputs: on the sample of those 4 images). Then fields of drawn red cells of
unusual shapes (:func:`malaria_cells.shifts.make_morphology_field`): how many of the N drawn
cells are counted exactly once, missed, counted twice or more, and counted objects in no cell.

Conditions (names for ``--conditions``; fnmatch patterns and family names work too: staining,
colour, exposure, optics, magnification, unreadable, morphology):

- staining: ``stain_x0.6`` ... ``stain_x1.6`` (all stains), ``stainH_x0.6/1.6``, ``stainE_x0.6/1.6``
- colour: ``hue_-15``, ``hue_+15``, ``sat_x0.6``, ``sat_x1.4``
- exposure: ``exposure_x0.5``, ``exposure_x2`` (light, in linear light, clipped at white),
  ``gamma_0.7/1.4``, ``wb_warm``, ``wb_cool``
- optics: ``blur_0.75``, ``blur_1.5`` (sigma at a 32 px cell, scaled by each field's cell
  diameter as the detector measured it unshifted), ``jpeg_95/70/40``, ``noise_4``, ``noise_8``
- magnification: ``mag_0.5x`` ... ``mag_2.5x``
- unreadable: ``grayscale``, ``downscale_8x``, ``pure_noise``, ``non_smear``
- morphology: ``synth_normal`` (control), ``synth_target``, ``synth_hypochromic``,
  ``synth_elliptocyte``, ``synth_stomatocyte``, ``synth_platelets``, ``synth_overlapping``
  (1000x760 fields of 52 px cells); ``synth_normal_frame``, ``synth_target_frame``,
  ``synth_hypochromic_frame``, ``synth_platelets_frame`` (a 1000x camera's 640x480 frames of
  six 100 px cells: specks and broken rims outnumber the cells); ``synth_hypochromic_packed_frame``
  and ``synth_elliptocyte_packed_frame`` (such frames packed with touching cells)

Floors (shown as PASS/FAIL, never tuned on): on every stain, exposure (brightness),
white-balance, blur, JPEG and noise condition, infected found within 5 points and the
false-positive rate within 0.3 points of the unshifted, or else both samples (IML and NIH)
called ``review`` because their fields cannot be read (out of focus, or not read), never for a
borderline count; counted cells within 10% of the truth
at magnifications 0.5x-2x (NIH against its point truth; IML against its unshifted count, as
its boxes miss some cells, so the unshifted count already reads ~10% above them); every drawn
target, hypochromic, elliptocyte and stomatocyte counted exactly once; grayscale, 8x-downscaled,
noise and non-smear inputs called ``review`` with a reason. Gamma and hue / saturation are reported without a floor.

The unshifted condition always runs first (its figures are the reference and its cell
diameters scale the blur); with ``--jobs N`` the other field conditions then run in N
processes at once (the same figures, in about 1/N of the time on N free cores). ``--fields N`` screens N IML fields spread evenly over the names
(and always the 4 NIH photographs).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

FIELDS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fields"
"""The shared field photographs, beside the checkout (read-only)."""

FOUND_POINTS, FPR_POINTS, COUNT_PERCENT = 5.0, 0.3, 10.0
PALE_OR_ODD = ("target", "hypochromic", "elliptocyte", "stomatocyte")


@dataclass
class Field:
    name: str
    kind: str  # "iml" or "nih"
    path: Path


@dataclass
class Condition:
    name: str
    family: str
    description: str
    shift: Callable | None = None  # (image, field context) -> image
    factor: float = 1.0  # image scale (truth follows)
    jpeg: int | None = None  # encode as JPEG at this quality
    floor: str | None = None  # "photometric", "count", "review", "once"
    nih_only: bool = False  # applies to the 4 NIH photographs only (no truth)
    morphology: str | None = None
    extra: dict = field(default_factory=dict)


def conditions() -> list[Condition]:
    from malaria_cells import shifts as S

    def c(name, family, description, fn=None, **kwargs):
        return Condition(name, family, description, fn, **kwargs)

    out = [c("unshifted", "unshifted", "the fields as photographed")]
    for k in (0.6, 0.8, 1.25, 1.6):
        out.append(c(f"stain_x{k:g}", "staining", f"optical density of every stain (HED) x{k:g}",
                     lambda im, ctx, k=k: S.stain(im, k), floor="photometric"))
    for channel, index in (("H", 0), ("E", 1)):
        for k in (0.6, 1.6):
            strength = [1.0, 1.0, 1.0]
            strength[index] = k
            out.append(c(f"stain{channel}_x{k:g}", "staining", f"{channel} optical density only x{k:g}",
                         lambda im, ctx, s=tuple(strength): S.stain(im, s), floor="photometric"))
    for degrees in (-15, 15):
        out.append(c(f"hue_{degrees:+d}", "colour", f"hue {degrees:+d} degrees", lambda im, ctx, d=degrees: S.hue(im, d)))
    for k in (0.6, 1.4):
        out.append(c(f"sat_x{k:g}", "colour", f"saturation x{k:g}", lambda im, ctx, k=k: S.saturation(im, k)))
    for k in (0.5, 2.0):
        out.append(c(f"exposure_x{k:g}", "exposure", f"light x{k:g} (linear light, clipped at white)",
                     lambda im, ctx, k=k: S.exposure(im, k), floor="photometric"))
    for g in (0.7, 1.4):
        out.append(c(f"gamma_{g:g}", "exposure", f"gamma {g:g}", lambda im, ctx, g=g: S.gamma(im, g)))
    for name, gains in (("warm", (1.15, 1.0, 0.85)), ("cool", (0.85, 1.0, 1.15))):
        out.append(c(f"wb_{name}", "exposure", f"white balance, gains R {gains[0]:g} G {gains[1]:g} B {gains[2]:g}",
                     lambda im, ctx, g=gains: S.white_balance(im, g), floor="photometric"))
    for sigma in (0.75, 1.5):
        out.append(c(f"blur_{sigma:g}", "optics", f"Gaussian blur sigma {sigma:g} px at a 32 px cell",
                     lambda im, ctx, s=sigma: S.defocus(im, s, cell_diameter=ctx["cell_diameter"]), floor="photometric"))
    for quality in (95, 70, 40):
        out.append(c(f"jpeg_{quality}", "optics", f"JPEG quality {quality}", jpeg=quality, floor="photometric"))
    for sigma in (4, 8):
        out.append(c(f"noise_{sigma}", "optics", f"Gaussian noise sigma {sigma}/255",
                     lambda im, ctx, s=sigma: S.gaussian_noise(im, s, ctx["rng"]), floor="photometric"))
    for factor in (0.5, 0.75, 1.5, 2.0, 2.5):
        out.append(c(f"mag_{factor:g}x", "magnification", f"resampled x{factor:g}",
                     lambda im, ctx, f=factor: S.resample(im, f), factor=factor,
                     floor="count" if factor <= 2.0 else None))
    out.append(c("grayscale", "unreadable", "grayscale (3 equal channels)", lambda im, ctx: S.grayscale(im), floor="review"))
    out.append(c("downscale_8x", "unreadable", "8x smaller on each side", lambda im, ctx: S.downscale(im, 8),
                 factor=1 / 8, floor="review"))
    out.append(c("pure_noise", "unreadable", "uniform noise in place of the 4 NIH photographs",
                 lambda im, ctx: S.noise_image(im, 1.0, ctx["rng"]), floor="review", nih_only=True))
    out.append(c("non_smear", "unreadable", "a drawn scene, astronaut, coffee, chelsea (skimage.data) at the NIH size",
                 lambda im, ctx: S.non_smear(im, 1.0, ctx["rng"], kind=S.NON_SMEAR_KINDS[ctx["index"] % 4]),
                 floor="review", nih_only=True))
    for kind in S.MORPHOLOGIES:
        out.append(c(f"synth_{kind}", "morphology", f"drawn {kind} cells", morphology=kind,
                     floor="once" if kind in PALE_OR_ODD else None))
    for kind in ("normal", "target", "hypochromic", "platelets"):  # a 1000x camera's small frames
        out.append(c(f"synth_{kind}_frame", "morphology", f"drawn {kind} cells, six of 100 px in a 640x480 frame",
                     morphology=kind, floor="once" if kind in PALE_OR_ODD else None,
                     extra={"draw": {"size": (640, 480), "radius": 50.0, "rows": 2, "cols": 3}, "fields": 8}))
    for kind, radius, rows, cols in (("hypochromic", 44.0, 4, 6), ("elliptocyte", 30.0, 6, 8)):  # touching
        out.append(c(f"synth_{kind}_packed_frame", "morphology",
                     f"drawn {kind} cells, {rows * cols} of {2 * radius:g} px packed touching in a 640x480 frame",
                     morphology=kind, floor="once",
                     extra={"draw": {"size": (640, 480), "radius": radius, "rows": rows, "cols": cols}, "fields": 3}))
    return out


FAMILIES = ("staining", "colour", "exposure", "optics", "magnification", "unreadable")


def select(all_conditions: list[Condition], patterns: list[str] | None) -> list[Condition]:
    if not patterns:
        return all_conditions
    chosen = [c for c in all_conditions
              if c.name == "unshifted" or any(fnmatch.fnmatch(c.name, p) or c.family == p for p in patterns)]
    unknown = [p for p in patterns if not any(fnmatch.fnmatch(c.name, p) or c.family == p for c in all_conditions)]
    if unknown:
        sys.exit(f"unknown conditions: {', '.join(unknown)} (names: {', '.join(c.name for c in all_conditions)})")
    return chosen


def list_fields(root: Path, n_iml: int | None) -> list[Field]:
    iml = sorted((root / "iml").glob("*.JPG"))
    if n_iml is not None and n_iml < len(iml):
        iml = [iml[i] for i in np.linspace(0, len(iml) - 1, n_iml).round().astype(int)] if n_iml > 0 else []
    nih = sorted((root / "nih" / "239C12NThinF").glob("*.jpg"))
    return [Field(p.name, "iml", p) for p in iml] + [Field(p.name, "nih", p) for p in nih]


def load_field(item: Field):
    """The field as the screen decodes it (NIH photographs at half size) and its truth, in that frame."""
    from PIL import Image

    from malaria_cells.shifts import scale_truth
    from malaria_cells.fields.truth import read_truth

    with Image.open(item.path) as picture:
        width, height = picture.size
        if item.kind == "nih":
            picture.draft("RGB", (-(-width // 2), -(-height // 2)))  # as screen_image decodes a 16 MP photograph
        image = np.asarray(picture.convert("RGB"))
    truth = read_truth(item.path)
    truth = scale_truth(truth, image.shape[1] / width, image.shape[0] / height)
    return np.ascontiguousarray(image), truth


def encode(image: np.ndarray, jpeg: int | None = None) -> bytes:
    import cv2

    bgr = np.ascontiguousarray(image[..., ::-1])
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg]) if jpeg else cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError("encoding failed")
    return data.tobytes()


def _pct(value):
    return None if value is None else 100.0 * value


def summarise(results: list, kinds: list[str], model) -> dict:
    """Pooled figures of one condition's screened fields."""
    from malaria_cells.screening import pool_fields
    from malaria_cells.fields.truth import pool_scores

    out: dict = {}
    sets = {"all": [r for r in results if r.truth], "iml": [r for r, k in zip(results, kinds) if k == "iml" and r.truth],
            "nih": [r for r, k in zip(results, kinds) if k == "nih" and r.truth]}
    pooled = {name: pool_scores([r.truth for r in items]) for name, items in sets.items() if items}
    for name, truth in pooled.items():
        out[name] = {key: truth[key] for key in ("fields", "tp", "fp", "fn", "n_true", "n_found", "n_true_parasitized",
                                                 "n_found_parasitized", "matched_parasitized", "matched_parasitized_called",
                                                 "matched_uninfected", "matched_uninfected_called", "stages")}
        out[name].update(precision=truth["precision"], recall=truth["recall"], f1=truth["f1"],
                         false_positive_rate_pct=_pct(truth["false_positive_rate"]),
                         parasitemia_mae_points=_pct(truth["field_parasitemia_mae"]),
                         count_error_pct=100.0 * (truth["n_found"] - truth["n_true"]) / truth["n_true"] if truth["n_true"] else None,
                         infected_found_pct=(100.0 * truth["matched_parasitized_called"] / truth["n_true_parasitized"]
                                             if truth["n_true_parasitized"] else None))
    nih = [r for r, k in zip(results, kinds) if k == "nih"]
    if nih:
        sample = pool_fields("nih", nih, model)
        out["nih_call"] = {"call": sample.call, "reasons": sample.reasons, "n_cells": sample.n_cells,
                           "n_parasitized": sample.n_parasitized, "parasitemia_pct": _pct(sample.parasitemia)}
    iml = [r for r, k in zip(results, kinds) if k == "iml"]
    if iml:
        sample = pool_fields("iml", iml, model)
        out["iml_call"] = {"call": sample.call, "reasons": sample.reasons}
    out["low_quality_fields"] = sum(not r.quality.get("ok") for r in results)
    out["unread_fields"] = sum(not r.quality.get("applicable", True) for r in results)
    out["median_cell_diameter"] = float(np.median([r.cell_diameter for r in results])) if results else None
    return out


def run_fields(condition: Condition, fields: list[Field], model, diameters: dict, seed: int) -> dict:
    from malaria_cells.screening import screen_image
    from malaria_cells.shifts import scale_truth

    started = time.perf_counter()
    results, kinds, per_field, errors = [], [], [], []
    tag = zlib.crc32(condition.name.encode())
    chosen = [f for f in fields if f.kind == "nih"] if condition.nih_only else fields
    for index, item in enumerate(chosen):
        image, truth = load_field(item)
        context = {"rng": np.random.default_rng([seed, tag, index]), "index": index,
                   "cell_diameter": diameters.get(item.name) or float(np.median(list(diameters.values()) or [32.0]))}
        shifted = condition.shift(image, context) if condition.shift else image
        if condition.nih_only:
            truth = None  # nothing of the smear is left
        elif shifted.shape != image.shape:
            truth = scale_truth(truth, shifted.shape[1] / image.shape[1], shifted.shape[0] / image.shape[0])
        try:
            result = screen_image(encode(shifted, condition.jpeg), model, path=item.name, truth_cells=truth)
        except Exception as error:  # noqa: BLE001 - a failure is a result here
            errors.append({"field": item.name, "error": f"{type(error).__name__}: {error}"})
            continue
        results.append(result)
        kinds.append(item.kind)
        entry = {"field": item.name, "set": item.kind, "n_cells": result.n_cells, "n_parasitized": result.n_parasitized,
                 "cell_diameter": result.cell_diameter, "quality_ok": result.quality.get("ok"),
                 "quality_reasons": result.quality.get("reasons")}
        if result.truth:
            entry.update({key: result.truth[key] for key in ("n_true", "tp", "fp", "fn", "n_true_parasitized",
                                                             "matched_parasitized_called", "matched_uninfected_called",
                                                             "parasitemia_error")})
        per_field.append(entry)
    out = summarise(results, kinds, model)
    out.update(errors=errors, per_field=per_field, seconds=round(time.perf_counter() - started, 1))
    return out


def run_morphology(condition: Condition, model, seed: int) -> dict:
    from malaria_cells.screening import screen_image
    from malaria_cells.shifts import make_morphology_field

    started = time.perf_counter()
    n_fields = condition.extra.get("fields", 3)
    tally = {"drawn": 0, "exactly_once": 0, "missed": 0, "two_or_more": 0, "fragments": 0, "fields": n_fields,
             "cell_diameters": []}
    for index in range(n_fields):
        image, cells = make_morphology_field(condition.morphology, np.random.default_rng([seed, 7, index]),
                                             **condition.extra.get("draw", {}))
        result = screen_image(encode(image), model, path=f"{condition.name}-{index}")
        hits = np.zeros(len(cells), int)
        for found in result.cells:
            distances = np.array([cell.distance(found.x, found.y) for cell in cells])
            if distances.min() <= 1.0:
                hits[distances.argmin()] += 1  # in overlaps, the cell it is deepest in
            else:
                tally["fragments"] += 1
        tally["drawn"] += len(cells)
        tally["exactly_once"] += int((hits == 1).sum())
        tally["missed"] += int((hits == 0).sum())
        tally["two_or_more"] += int((hits >= 2).sum())
        tally["cell_diameters"].append(result.cell_diameter)
    tally["seconds"] = round(time.perf_counter() - started, 1)
    return tally


def _declined(call: dict) -> bool:
    """Whether a sample was called ``review`` because its fields cannot be read (the tool says
    it cannot answer), not for a borderline count (whatever else its reasons list)."""
    reasons = call.get("reasons", [])
    return (call.get("call") == "review" and not any(reason.startswith("borderline") for reason in reasons)
            and any(word in reason for reason in reasons for word in ("out of focus", "over-exposed", "not read")))


def judge(condition: Condition, row: dict, base: dict) -> tuple[bool | None, str]:
    """The floor of a condition: (passed, what decided it); None where it has no floor."""
    if condition.floor is None:
        return None, ""
    if condition.floor == "once":
        ok = row["exactly_once"] == row["drawn"]
        return ok, f"{row['exactly_once']}/{row['drawn']} counted once"
    if condition.floor == "review":
        call = row.get("nih_call", {})
        ok = call.get("call") == "review" and bool(call.get("reasons"))
        return ok, f"NIH call {call.get('call', 'none')}"
    if not row.get("all"):
        return False, "no field screened"
    if condition.floor == "photometric":
        found = row["iml"]["infected_found_pct"] - base["iml"]["infected_found_pct"]
        fpr = row["all"]["false_positive_rate_pct"] - base["all"]["false_positive_rate_pct"]
        ok = abs(found) <= FOUND_POINTS and abs(fpr) <= FPR_POINTS
        text = f"found {found:+.1f}, FPR {fpr:+.2f} pts"
        if not ok and _declined(row.get("iml_call", {})) and _declined(row.get("nih_call", {})):
            return True, text + "; both samples review, fields unreadable"
        return ok, text
    if condition.floor == "count":
        # NIH against its truth (every whole cell is annotated); IML against its unshifted count,
        # since its boxes miss cells (the unshifted count already reads above them).
        checks, text = [], []
        if "nih" in row:
            checks.append(abs(row["nih"]["count_error_pct"]) <= COUNT_PERCENT)
            text.append(f"NIH {row['nih']['count_error_pct']:+.1f}% of truth")
        if "iml" in row:
            change = 100.0 * (row["iml"]["n_found"] / base["iml"]["n_found"] - 1)
            checks.append(abs(change) <= COUNT_PERCENT)
            text.append(f"IML {change:+.1f}% of unshifted ({row['iml']['count_error_pct']:+.1f}% of truth)")
        return all(checks), ", ".join(text)
    raise ValueError(condition.floor)


# --- printing ------------------------------------------------------------------------------------

METRICS = {  # name: (how to read it from a row, worse is "low", "high" or "far" from the unshifted)
    "F1": (lambda r: r.get("all", {}).get("f1"), "low"),
    "found": (lambda r: r.get("iml", {}).get("infected_found_pct"), "low"),
    "FPR": (lambda r: r.get("all", {}).get("false_positive_rate_pct"), "high"),
    "MAE": (lambda r: r.get("all", {}).get("parasitemia_mae_points"), "high"),
    "count IML": (lambda r: r.get("iml", {}).get("count_error_pct"), "far"),
    "count NIH": (lambda r: r.get("nih", {}).get("count_error_pct"), "far"),
}


def worst_by_family(rows: list[dict]) -> dict:
    base = next(r for r in rows if r["name"] == "unshifted")
    worst: dict = {}
    for family in FAMILIES:
        members = [r for r in rows if r["family"] == family]
        for metric, (read, direction) in METRICS.items():
            values = [(read(r), r["name"]) for r in members if read(r) is not None]
            if not values:
                continue
            reference = read(base) or 0.0
            key = {"low": lambda v: v[0], "high": lambda v: -v[0], "far": lambda v: -abs(v[0] - reference)}[direction]
            value, name = min(values, key=key)
            worst.setdefault(family, {})[metric] = {"value": value, "condition": name}
    return worst


def _f(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def stage_text(row: dict) -> str:
    stages = row.get("iml", {}).get("stages", {})
    return " ".join(f"{s[0]} {stages[s]['called']}/{stages[s]['n']}" for s in ("ring", "trophozoite", "schizont", "gametocyte")
                    if s in stages)


def field_row(row: dict, worst: dict | None = None) -> str:
    marks = {m for m, w in (worst or {}).get(row["family"], {}).items() if w["condition"] == row["name"]}

    def cell(metric, spec):
        text = _f(METRICS[metric][0](row), spec)
        return f"**{text}**" if metric in marks else text

    call = row.get("nih_call", {})
    precision, recall = row.get("all", {}).get("precision"), row.get("all", {}).get("recall")
    found = METRICS["found"][0](row)
    found_text = cell("found", ".1f") + (f" ({stage_text(row)})" if found is not None else "")
    parasitemia = call.get("parasitemia_pct")
    call_text = call.get("call", "-") + (f" ({parasitemia:.2f}%)" if parasitemia is not None else "")
    floor = {True: "PASS", False: "FAIL", None: ""}[row["passed"]]
    return (f"| {row['name']} | {row.get('unread_fields', 0)} | {_f(precision, '.3f')} | {_f(recall, '.3f')} | {cell('F1', '.3f')} | {found_text} | "
            f"{cell('FPR', '.2f')} | {cell('MAE', '.2f')} | {cell('count IML', '+.1f')} / {cell('count NIH', '+.1f')} | "
            f"{call_text} | {(floor + ' ' + row['floor_detail']).strip()} |")


FIELD_HEADER = ("| condition | fields not read | P | R | F1 | infected found % (ring, troph., schizont, gametocyte called/annotated) | "
                "FPR % | MAE pts | count % IML / NIH | NIH call (raw parasitemia) | floor |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|")
MORPH_HEADER = ("| drawn cells | N | counted exactly once | missed | counted 2+ times | fragments (in no cell) | "
                "cell diameter found, px | floor |\n|---|---|---|---|---|---|---|---|")


def morph_row(row: dict) -> str:
    floor = {True: "PASS", False: "FAIL", None: ""}[row["passed"]]
    return (f"| {row['name'].removeprefix('synth_')} | {row['drawn']} | {row['exactly_once']} | {row['missed']} | "
            f"{row['two_or_more']} | {row['fragments']} | {', '.join(f'{d:.0f}' for d in row['cell_diameters'])} | "
            f"{floor} |")


def worst_table(rows: list[dict], worst: dict) -> str:
    base = next(r for r in rows if r["name"] == "unshifted")
    lines = ["| family | " + " | ".join(f"{m} (worst)" for m in METRICS) + " | NIH calls |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    specs = {"F1": ".3f", "found": ".1f", "FPR": ".2f", "MAE": ".2f", "count IML": "+.1f", "count NIH": "+.1f"}
    lines.append("| unshifted | " + " | ".join(_f(METRICS[m][0](base), specs[m]) for m in METRICS) +
                 f" | {base.get('nih_call', {}).get('call', '-')} |")
    for family in FAMILIES:
        if family not in worst:
            continue
        members = [r for r in rows if r["family"] == family]
        calls = sorted({r.get("nih_call", {}).get("call", "-") for r in members})
        cells = [f"{_f(worst[family][m]['value'], specs[m])} ({worst[family][m]['condition']})" if m in worst[family] else "-"
                 for m in METRICS]
        lines.append(f"| {family} | " + " | ".join(cells) + f" | {', '.join(calls)} |")
    return "\n".join(lines)


_worker_model = None


def _load_worker(model_path: str) -> None:
    global _worker_model
    from malaria_cells.runtimes import load_model

    _worker_model = load_model(model_path)


def _run_named(name: str, fields: list, diameters: dict, seed: int) -> dict:
    condition, = [c for c in conditions() if c.name == name]
    return run_fields(condition, fields, _worker_model, diameters, seed)


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fields", type=int, help="IML fields to screen, spread over the names (default: all)")
    parser.add_argument("--conditions", nargs="+", metavar="NAME", help="conditions or families (default: all)")
    parser.add_argument("--out", default="benchmarks/shift-suite.json", help="JSON results (default: %(default)s)")
    parser.add_argument("--model", help="cell model (default: the shipped field model)")
    parser.add_argument("--data", default=str(FIELDS), help="the shared fields folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="noise seeds (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="processes for the field conditions (default: 1)")
    args = parser.parse_args()

    from malaria_cells.runtimes import default_model_path, load_model

    model = load_model(args.model or default_model_path(fields=True))
    fields = list_fields(Path(args.data), args.fields)
    chosen = select(conditions(), args.conditions)
    started = time.perf_counter()
    print(f"{sum(f.kind == 'iml' for f in fields)} IML fields, {sum(f.kind == 'nih' for f in fields)} NIH photographs, "
          f"{len(chosen)} conditions; model {model.path}", flush=True)
    rows, diameters, base = [], {}, None
    print(FIELD_HEADER, flush=True)

    def finish(condition, measured):
        row = {"name": condition.name, "family": condition.family, "description": condition.description, **measured}
        row["passed"], row["floor_detail"] = judge(condition, row, base)
        rows.append(row)
        print(field_row(row), f"[{row['seconds']:.0f} s{', ' + str(len(row['errors'])) + ' errors' if row['errors'] else ''}]",
              flush=True)
        return row

    field_conditions = [c for c in chosen if not c.morphology]
    if field_conditions and field_conditions[0].name == "unshifted":
        base = finish(field_conditions[0], run_fields(field_conditions[0], fields, model, diameters, args.seed))
        diameters = {entry["field"]: entry["cell_diameter"] for entry in base["per_field"]}
        field_conditions = field_conditions[1:]
    if args.jobs > 1 and len(field_conditions) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawned, not forked: a fork of a process whose runtimes have started threads can hang
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_load_worker, initargs=(str(model.path),)) as pool:
            measured = pool.map(_run_named, [c.name for c in field_conditions], [fields] * len(field_conditions),
                                [diameters] * len(field_conditions), [args.seed] * len(field_conditions))
            for condition, one in zip(field_conditions, measured):
                finish(condition, one)
    else:
        for condition in field_conditions:
            finish(condition, run_fields(condition, fields, model, diameters, args.seed))
    morph = []
    if any(c.morphology for c in chosen):
        print("\n" + MORPH_HEADER, flush=True)
    for condition in chosen:
        if not condition.morphology:
            continue
        row = {"name": condition.name, "family": condition.family, "description": condition.description,
               **run_morphology(condition, model, args.seed)}
        row["passed"], row["floor_detail"] = judge(condition, row, base)
        morph.append(row)
        print(morph_row(row), flush=True)
    worst = worst_by_family(rows)
    print("\n## All conditions (worst of each family in bold)\n\n" + FIELD_HEADER)
    for row in rows:
        print(field_row(row, worst))
    print("\n## Worst of each family beside the unshifted\n\n" + worst_table(rows, worst))
    if morph:
        print("\n## Drawn cells\n\n" + MORPH_HEADER + "\n" + "\n".join(morph_row(r) for r in morph))
    failed = [r["name"] for r in rows + morph if r["passed"] is False]
    print(f"\nfloors failed ({len(failed)}): {', '.join(failed) or 'none'}; {time.perf_counter() - started:.0f} s in all")
    report = {"command": " ".join(["python", "benchmarks/shift_suite.py", *sys.argv[1:]]),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "model": str(model.path), "fields": {"iml": sum(f.kind == "iml" for f in fields),
                                                  "nih": sum(f.kind == "nih" for f in fields)},
              "floors": {"infected_found_points": FOUND_POINTS, "false_positive_rate_points": FPR_POINTS,
                         "count_percent": COUNT_PERCENT},
              "seconds": round(time.perf_counter() - started, 1), "conditions": rows, "morphology": morph,
              "worst": worst, "failed": failed}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
