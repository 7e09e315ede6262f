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

from ..errors import MalariaCellsError

__all__ = ["TruthCell", "read_truth", "load_truth_index", "match_cells", "match_result", "score_field", "pool_scores",
           "is_cut", "STAGES"]

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


def is_cut(cell: TruthCell, width: int, height: int, margin: float = 3.0) -> bool:
    """Whether an annotated box reaches the image edge (such cells are not counted)."""
    if cell.width is None:
        return False
    half = cell.width / 2
    return (cell.x - half < margin or cell.y - half < margin
            or cell.x + half > width - margin or cell.y + half > height - margin)


def match_result(result, truth: list[TruthCell]) -> tuple[list[TruthCell], list[tuple[int, int]]]:
    """The annotated cells a screen counts (red cells, infected or not, not cut by the image
    edge) and the pairs ``(index in result.cells, index in those)`` matched within half the
    field's cell diameter."""
    counted = [c for c in truth if c.label in ("Uninfected", "Parasitized")
               and not is_cut(c, result.width, result.height)]
    found = np.array([[c.x, c.y] for c in result.cells]).reshape(-1, 2)
    true = np.array([[c.x, c.y] for c in counted]).reshape(-1, 2)
    return counted, match_cells(found, true, result.cell_diameter / 2)


def score_field(result, truth: list[TruthCell]) -> dict:
    """Detection and classification figures of one screened field against its ground truth.

    Annotated red cells cut by the image edge, ``difficult`` cells and white cells are left
    out (the screen does not count cut cells either). Returns counts (``tp``, ``fp``, ``fn``,
    true and found parasitized) and the figures they give.
    """
    counted, pairs = match_result(result, truth)
    scores = {"tp": len(pairs), "fp": len(result.cells) - len(pairs), "fn": len(counted) - len(pairs),
              "n_true": len(counted), "n_true_parasitized": sum(c.label == "Parasitized" for c in counted),
              "n_found": len(result.cells), "n_found_parasitized": result.n_parasitized,
              "matched_parasitized": 0, "matched_parasitized_called": 0,
              "matched_uninfected": 0, "matched_uninfected_called": 0, "stages": {}}
    for i, j in pairs:
        called = result.cells[i].label == "Parasitized"
        if counted[j].label == "Parasitized":
            scores["matched_parasitized"] += 1
            scores["matched_parasitized_called"] += called
        else:
            scores["matched_uninfected"] += 1
            scores["matched_uninfected_called"] += called
    matched_true = {j: i for i, j in pairs}
    for j, cell in enumerate(counted):
        if cell.stage:
            stage = scores["stages"].setdefault(cell.stage, {"n": 0, "detected": 0, "called": 0})
            stage["n"] += 1
            if j in matched_true:
                stage["detected"] += 1
                stage["called"] += result.cells[matched_true[j]].label == "Parasitized"
    return _figures(scores)


def _figures(scores: dict) -> dict:
    def ratio(a, b):
        return a / b if b else None

    tp, fp, fn = scores["tp"], scores["fp"], scores["fn"]
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    true_parasitemia = ratio(scores["n_true_parasitized"], scores["n_true"])
    found_parasitemia = ratio(scores["n_found_parasitized"], scores["n_found"])
    scores.update(
        precision=precision, recall=recall,
        f1=ratio(2 * precision * recall, precision + recall) if precision and recall else 0.0,
        count_error=scores["n_found"] - scores["n_true"],
        sensitivity=ratio(scores["matched_parasitized_called"], scores["matched_parasitized"]),
        false_positive_rate=ratio(scores["matched_uninfected_called"], scores["matched_uninfected"]),
        true_parasitemia=true_parasitemia,
        parasitemia_error=(found_parasitemia - true_parasitemia
                           if found_parasitemia is not None and true_parasitemia is not None else None))
    return scores


def pool_scores(fields: list[dict]) -> dict:
    """Field scores of a sample added up, with the figures recomputed (and the mean absolute
    per-field parasitemia error)."""
    keys = ("tp", "fp", "fn", "n_true", "n_true_parasitized", "n_found", "n_found_parasitized",
            "matched_parasitized", "matched_parasitized_called", "matched_uninfected", "matched_uninfected_called")
    pooled = {key: sum(f[key] for f in fields) for key in keys}
    pooled["stages"] = {}
    for item in fields:
        for stage, counts in item["stages"].items():
            total = pooled["stages"].setdefault(stage, {"n": 0, "detected": 0, "called": 0})
            for key in total:
                total[key] += counts[key]
    pooled = _figures(pooled)
    errors = [abs(f["parasitemia_error"]) for f in fields if f["parasitemia_error"] is not None]
    pooled["field_parasitemia_mae"] = float(np.mean(errors)) if errors else None
    pooled["fields"] = len(fields)
    return pooled
