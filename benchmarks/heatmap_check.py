"""Do the heat maps point at the parasite, or at the cell's rim? Grad-CAM and occlusion on infected crops.

    python benchmarks/heatmap_check.py [--model PATH] [--nih 300] [--limit N] [--json OUT] [--figure OUT.png]

Data: a fixed-seed sample of the shared NIH Parasitized crops (read and resized to the model's
input with the package's own reading path, :func:`malaria_cells.images.read_file` and
:func:`malaria_cells.images.preprocess`), and every infected IML field crop in ``--iml``
(``crops``/``labels`` arrays as screening cuts them; labels == 1 are infected).

Per crop, without the model:

- cell: the non-black pixels (:func:`malaria_cells.explain.cell_mask`), largest component,
  holes filled; diameter d = 2 sqrt(area / pi).
- parasite: the most stained blob. Stain = Giemsa chromatin's colour, OD_G - OD_R (optical
  density in green less that in red: purple-red chromatin absorbs green far more than red,
  pink haemoglobin less so; a difference of densities ignores a darkening of all channels
  alike, so pixels blended with the black surround and shading do not pass for stain;
  ``--stain`` offers total density, red density and rgb2hed's haematoxylin instead), smoothed
  (Gaussian, sigma 0.75 px) and looked at more than ``--inset`` px inside the cell. Seeds: the
  top ``--top`` percent of those pixels that are also ``--contrast`` robust standard deviations
  (1.4826 MAD) above the cell's median; grown by hysteresis to half that contrast; the
  component holding the most stained pixel is the parasite (``--blob largest``: the largest
  component). Crops where it has fewer than ``--min-pixels`` pixels show no clear parasite
  and are left out (counted).
- rim: the outer band of the cell of width ``--rim`` x d, less the parasite.

Per method (Grad-CAM, occlusion) and data set, it reports the share of crops whose heat-map
peak (its highest pixel; ties broken at random with a fixed seed) falls in the parasite and in
the rim, the mean heat per pixel in each and their ratio, and a chance baseline: a random
pixel of the cell (share = region area / cell area; heat ratio 1). "flagged" rows keep the
crops the model calls Parasitized at its threshold: those a screening report's gallery shows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from _common import SHARED_DATA, existing_folder

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

IML_CROPS = Path("/tmp/W3/field_crops.npz")


# --------------------------------------------------------------------------- regions (no model)


def stain_density(crop: np.ndarray, kind: str) -> np.ndarray:
    """Per-pixel stain of one crop.

    "chromatin": optical density in green less that in red, OD_G - OD_R = log((R + 1) / (G + 1)).
    Giemsa colours parasite chromatin purple-red: it absorbs green far more than red, more so
    than the pink haemoglobin around it. A difference of densities is blind to a darkening of
    all channels alike (a pixel blended with the black surround, shading). "od": total optical
    density (darkness); "red": density in the red channel; "hed": the haematoxylin channel of
    ``skimage.color.rgb2hed`` (an H&E colour model; on these crops it marks pale areas too).
    """
    if kind == "hed":
        from skimage.color import rgb2hed

        return rgb2hed(crop)[..., 0]
    density = -np.log((crop.astype(np.float64) + 1) / 256)
    if kind == "chromatin":
        return density[..., 1] - density[..., 0]
    return density[..., 0] if kind == "red" else density.sum(axis=-1)


def regions(crop: np.ndarray, *, stain_kind: str, inset: float, rim: float, top: float, contrast: float,
            min_pixels: int, blob: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(cell, parasite, rim) boolean masks of one crop, or None when no clear parasite shows."""
    from scipy import ndimage
    from skimage.filters import apply_hysteresis_threshold

    from malaria_cells.explain import cell_mask

    labels, count = ndimage.label(cell_mask(crop))
    if count == 0:
        return None
    cell = labels == 1 + np.argmax(ndimage.sum_labels(np.ones_like(labels), labels, range(1, count + 1)))
    cell = ndimage.binary_fill_holes(cell)
    diameter = 2 * np.sqrt(cell.sum() / np.pi)
    depth = ndimage.distance_transform_edt(np.pad(cell, 1))[1:-1, 1:-1]  # distance to the surround
    inner = depth > inset
    if inner.sum() < 4 * min_pixels:
        return None
    stain = ndimage.gaussian_filter(stain_density(crop, stain_kind), 0.75)
    values = stain[inner]
    median = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - median)) + 1e-6
    high = max(np.percentile(values, 100 - top), median + contrast * spread)
    low = min(high, median + 0.5 * contrast * spread)
    blobs, count = ndimage.label(apply_hysteresis_threshold(np.where(inner, stain, -np.inf), low, high))
    if count == 0:
        return None
    if blob == "largest":
        chosen = 1 + np.argmax(ndimage.sum_labels(np.ones_like(blobs), blobs, range(1, count + 1)))
    else:  # the blob holding the most stained pixel
        chosen = blobs.flat[np.argmax(np.where(blobs > 0, stain, -np.inf))]
    parasite = blobs == chosen
    if parasite.sum() < min_pixels:
        return None
    band = cell & (depth <= max(1.0, rim * diameter)) & ~parasite
    return cell, parasite, band


# --------------------------------------------------------------------------- data


def nih_crops(folder: Path, count: int, size: int, seed: int) -> np.ndarray:
    from malaria_cells.images import UnreadableImage, preprocess, read_file

    files = sorted(str(path) for path in (folder / "Parasitized").iterdir() if path.suffix.lower() == ".png")
    picked = np.random.default_rng(seed).choice(len(files), min(count, len(files)), replace=False)
    crops = []
    for index in sorted(picked):
        try:
            crops.append(preprocess(read_file(files[index]), size))
        except UnreadableImage as error:
            print(f"skipped {files[index]}: {error}", file=sys.stderr)
    return np.stack(crops)


def iml_crops(path: Path) -> np.ndarray:
    with np.load(path) as data:
        return data["crops"][data["labels"] == 1]


# --------------------------------------------------------------------------- scoring


def peaks(heat: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int] | None]:
    out = []
    for item in heat:
        top = item.max()
        if top <= 0:
            out.append(None)
            continue
        ys, xs = np.nonzero(item >= top - 1e-6)
        pick = rng.integers(len(ys))
        out.append((ys[pick], xs[pick]))
    return out


def summarise(heat: np.ndarray | None, masks: list, rows: np.ndarray, rng) -> dict:
    """Shares of peaks in parasite / rim and mean heat per pixel there, over crops ``rows``."""
    if heat is None:  # chance: a random pixel of the cell
        in_parasite = [masks[i][1].sum() / masks[i][0].sum() for i in rows]
        in_rim = [masks[i][2].sum() / masks[i][0].sum() for i in rows]
        return {"n": len(rows), "peak_in_parasite": float(np.mean(in_parasite)), "peak_in_rim": float(np.mean(in_rim)),
                "heat_parasite": None, "heat_rim": None, "heat_ratio": 1.0, "no_heat": 0}
    found = peaks(heat[rows], rng)
    hits_parasite = [masks[i][1][p] for i, p in zip(rows, found) if p is not None]
    hits_rim = [masks[i][2][p] for i, p in zip(rows, found) if p is not None]
    parasite_heat = np.mean([heat[i][masks[i][1]].mean() for i in rows])
    rim_heat = np.mean([heat[i][masks[i][2]].mean() for i in rows])
    return {"n": len(rows), "peak_in_parasite": float(np.sum(hits_parasite) / len(rows)),
            "peak_in_rim": float(np.sum(hits_rim) / len(rows)), "heat_parasite": float(parasite_heat),
            "heat_rim": float(rim_heat), "heat_ratio": float(parasite_heat / max(rim_heat, 1e-9)),
            "no_heat": sum(p is None for p in found)}


def figure(path: str, crops, masks, heats: dict, count: int = 12) -> None:
    """Rows of crop | regions (parasite red, rim blue) | each method's overlay, for a look."""
    import cv2

    from malaria_cells.explain import heat_overlay

    rows = []
    for index in range(min(count, len(crops))):
        crop, (cell, parasite, band) = crops[index], masks[index]
        marked = crop.copy()
        marked[band] = (0.5 * marked[band] + [0, 0, 127]).astype(np.uint8)
        marked[parasite] = [255, 0, 0]
        rows.append(np.concatenate([crop, marked] + [heat_overlay(crop, heat[index]) for heat in heats.values()], 1))
    image = np.concatenate(rows, 0)
    cv2.imwrite(path, cv2.resize(image[..., ::-1], None, fx=3, fy=3, interpolation=cv2.INTER_NEAREST))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Keras cell model (default: the shipped field model)")
    parser.add_argument("--data", type=existing_folder, default=str(SHARED_DATA),
                        help="NIH cell images with a Parasitized folder (default: %(default)s)")
    parser.add_argument("--iml", default=str(IML_CROPS), help="IML field crops .npz (default: %(default)s)")
    parser.add_argument("--nih", type=int, default=300, help="NIH Parasitized crops sampled (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="at most this many crops per data set (a quick run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer", help="Grad-CAM layer (default: the last convolutional feature map)")
    parser.add_argument("--min-side", type=int, help="Grad-CAM on the last feature map at least this side")
    parser.add_argument("--patch-size", type=int, help="occlusion patch side (default: size // 8)")
    parser.add_argument("--stride", type=int, help="occlusion stride (default: patch // 2)")
    parser.add_argument("--stain", choices=("chromatin", "od", "red", "hed"), default="chromatin",
                        help="stain measure for the parasite (default: %(default)s; see stain_density)")
    parser.add_argument("--inset", type=float, default=2.0, help="parasite search: pixels deeper than this in the cell")
    parser.add_argument("--rim", type=float, default=0.10, help="rim band width, x cell diameter d")
    parser.add_argument("--blob", choices=("peak", "largest"), default="peak",
                        help="which stained component is the parasite: the one with the most stained pixel, "
                             "or the largest (default: %(default)s)")
    parser.add_argument("--top", type=float, default=2.0, help="stain seeds: top percent of the cell's pixels")
    parser.add_argument("--contrast", type=float, default=4.0, help="stain seeds: robust SDs above the median")
    parser.add_argument("--min-pixels", type=int, default=4, help="smallest parasite blob (pixels)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--figure", help="write a PNG of the first crops' regions and heat maps here")
    args = parser.parse_args()

    from malaria_cells.explain import grad_cam, occlusion
    from malaria_cells.runtimes import default_model_path, load_model

    model = load_model(args.model or default_model_path(fast_start=False, fields=True))
    if model.keras_model is None:
        parser.error("--model must be a .keras model (Grad-CAM needs gradients)")
    sets = {"NIH Parasitized": nih_crops(Path(args.data), args.nih, model.image_size, args.seed)}
    if Path(args.iml).is_file():
        sets["IML infected"] = iml_crops(Path(args.iml))
    else:
        print(f"{args.iml}: not found, IML crops left out", file=sys.stderr)
    options = {"stain_kind": args.stain, "inset": args.inset, "rim": args.rim, "top": args.top, "contrast": args.contrast,
               "min_pixels": args.min_pixels, "blob": args.blob}
    methods = {"Grad-CAM": lambda crops: grad_cam(model, crops, layer=args.layer, min_side=args.min_side),
               "occlusion": lambda crops: occlusion(model, crops, patch_size=args.patch_size, stride=args.stride)}
    results, lines = {"model": str(model.path), "args": vars(args), "sets": {}}, []
    lines.append("| data | crops | method | peak in parasite | peak in rim | heat/px parasite | heat/px rim | ratio | ms/crop |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, crops in sets.items():
        if args.limit:
            crops = crops[:args.limit]
        masks = [regions(crop, **options) for crop in crops]
        kept = np.array([m is not None for m in masks])
        crops, masks = crops[kept], [m for m in masks if m is not None]
        flagged = model.probability(crops) >= model.threshold
        heats, seconds = {}, {}
        methods[next(iter(methods))](crops[:2])  # warm-up: tracing is not per-crop cost
        for method, run in methods.items():
            start = time.perf_counter()
            heats[method] = run(crops)
            seconds[method] = (time.perf_counter() - start) / max(1, len(crops))
        entry = {"crops": int(len(kept)), "no_clear_parasite": int((~kept).sum()), "flagged": int(flagged.sum()),
                 "parasite_area": float(np.mean([m[1].sum() / m[0].sum() for m in masks])),
                 "rim_area": float(np.mean([m[2].sum() / m[0].sum() for m in masks])), "rows": {}}
        for subset, rows in (("all", np.arange(len(crops))), ("flagged", np.flatnonzero(flagged))):
            if len(rows) == 0:
                continue
            for method in ("chance", *methods):
                rng = np.random.default_rng(args.seed)
                figures = summarise(heats.get(method), masks, rows, rng)
                figures["ms_per_crop"] = 1000 * seconds[method] if method in seconds else None
                entry["rows"][f"{subset}/{method}"] = figures

                def cell(value, percent=False, digits=2):
                    return "-" if value is None else f"{100 * value:.0f}%" if percent else f"{value:.{digits}f}"

                lines.append(f"| {name} ({subset}) | {figures['n']} | {method} | {cell(figures['peak_in_parasite'], True)} "
                             f"| {cell(figures['peak_in_rim'], True)} | {cell(figures['heat_parasite'])} "
                             f"| {cell(figures['heat_rim'])} | {cell(figures['heat_ratio'])} "
                             f"| {cell(figures['ms_per_crop'], digits=1)} |")
        results["sets"][name] = entry
        print(f"{name}: {entry['crops']} crops, {entry['no_clear_parasite']} without a clear stained blob (left out), "
              f"{entry['flagged']} of the rest flagged; parasite {100 * entry['parasite_area']:.1f}% and rim "
              f"{100 * entry['rim_area']:.1f}% of the cell's area on average", file=sys.stderr)
        if args.figure:
            stem = Path(args.figure)
            figure(str(stem.with_name(f"{stem.stem}-{name.split()[0].lower()}{stem.suffix}")), crops, masks, heats)
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
