"""Ground truth for field photographs, and scoring detections against it.

Two formats are read:

- NIH/NLM "Point Set" files: ``IMG_x.txt`` beside ``IMG_x.jpg``; line 1 ``N,width,height``,
  then ``id,Label,Comment,Point,1,x,y`` per cell (Label ``Parasitized``, ``Uninfected`` or
  ``White_Blood_Cell``; x, y the centre in stored pixels).
- IML-style JSON: a list of ``{"image_name", "objects": [{"type", "bbox": {"x", "y", "w", "h"}}]}``
  where ``type`` is ``red blood cell``, a parasite stage (``ring``, ``trophozoite``, ``schizont``,
  ``gametocyte``: an infected red cell) or ``difficult`` (left out of scores).

Detections are matched to true cells one to one, nearest first, by centre within half a cell
diameter.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MalariaCellsError

__all__ = ["TruthCell", "read_truth", "load_truth_index", "match_cells", "STAGES"]

STAGES = ("ring", "trophozoite", "schizont", "gametocyte")
"""Parasite stages of IML annotations: each marks an infected red cell."""


@dataclass(frozen=True)
class TruthCell:
    """One annotated object: centre (stored pixels), ``label`` (``Parasitized``, ``Uninfected``,
    ``White_Blood_Cell`` or ``difficult``) and, for IML infected cells, the parasite ``stage``."""

    x: float
    y: float
    label: str
    stage: str | None = None
    width: float | None = None


def _read_points(path: Path) -> list[TruthCell]:
    cells = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for line in lines[1:]:
            parts = line.strip().split(",")
            if len(parts) < 7:
                continue
            cells.append(TruthCell(float(parts[5]), float(parts[6]), parts[1].strip()))
    except (OSError, ValueError) as error:
        raise MalariaCellsError(f"{path}: not a readable NIH point file ({error})") from None
    return cells


def _read_iml_objects(objects: list) -> list[TruthCell]:
    cells = []
    for item in objects:
        box = item["bbox"]
        x, y, w, h = (float(box[k]) for k in ("x", "y", "w", "h"))
        kind = str(item["type"]).strip().lower()
        if kind == "red blood cell":
            label, stage = "Uninfected", None
        elif kind in STAGES:
            label, stage = "Parasitized", kind
        else:
            label, stage = "difficult", None
        cells.append(TruthCell(x + w / 2, y + h / 2, label, stage, max(w, h)))
    return cells


def load_truth_index(path: str | os.PathLike) -> dict[str, list[TruthCell]]:
    """Read an IML-style JSON file into ``{image file name: cells}``."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        return {str(entry["image_name"]): _read_iml_objects(entry["objects"]) for entry in entries}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise MalariaCellsError(f"{path}: not an annotations JSON file ({type(error).__name__}: {error})") from None


def read_truth(image_path: str | os.PathLike, truth: str | os.PathLike | None = None,
               _indexes: dict | None = None) -> list[TruthCell] | None:
    """The annotated cells of one field image, or None when it has no ground truth.

    Parameters
    ----------
    image_path : path
        The field photograph.
    truth : path, optional
        A JSON annotations file, or a folder holding point files or an ``annotations.json``.
        Without it, a point file beside the image (``IMG_x.txt``), then an
        ``annotations.json`` in the image's folder, are looked for.
    """
    image_path = Path(image_path)
    places = []
    if truth is not None:
        truth = Path(truth)
        places += [truth] if truth.is_file() else [truth / (image_path.stem + ".txt"), truth / "annotations.json"]
    places += [image_path.with_suffix(".txt"), image_path.parent / "annotations.json"]
    indexes = {} if _indexes is None else _indexes
    for place in places:
        if not place.is_file():
            continue
        if place.suffix.lower() == ".txt":
            return _read_points(place)
        if place not in indexes:
            indexes[place] = load_truth_index(place)
        if image_path.name in indexes[place]:
            return indexes[place][image_path.name]
    return None


def match_cells(found: np.ndarray, true: np.ndarray, max_distance: float) -> list[tuple[int, int]]:
    """Pairs ``(found index, true index)``, one to one, nearest first, within ``max_distance``.

    ``found`` and ``true`` are arrays of centres, shape ``(n, 2)``.
    """
    from scipy.spatial import cKDTree

    if len(found) == 0 or len(true) == 0:
        return []
    tree = cKDTree(true)
    candidates = []
    for i, neighbours in enumerate(tree.query_ball_point(found, max_distance)):
        for j in neighbours:
            candidates.append((float(np.hypot(*(found[i] - true[j]))), i, j))
    candidates.sort()
    used_found, used_true, pairs = set(), set(), []
    for _, i, j in candidates:
        if i not in used_found and j not in used_true:
            used_found.add(i)
            used_true.add(j)
            pairs.append((i, j))
    return pairs
