"""The cells a microscopist looks at: each sample's highest-scoring counted cells and its near
misses (the highest below the counting threshold), kept as fields are screened.

One selection serves the report's gallery (:class:`~.report.ReportWriter`) and the records'
cells for review (:meth:`malaria_cells.records.Records.add` with ``gallery=``), so a reviewer
signs off exactly the cells the report shows. Pass :meth:`Gallery.add` as the screen's
``on_field`` (or let a :class:`~.report.ReportWriter` do it: it keeps one).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MalariaCellsError
from .results import FieldResult

__all__ = ["Gallery", "GalleryCell", "GALLERY_SIZE", "NEAR_MISSES", "CROP_MARGIN", "native_crop", "png_bytes"]

GALLERY_SIZE = 24
"""Highest-scoring counted cells of each sample shown in its gallery, for a microscopist to confirm."""
NEAR_MISSES = 8
"""Highest-scoring cells below the counting threshold shown after them."""
CROP_MARGIN = 0.3
"""Context around a gallery cell, as a share of its box."""


def native_crop(image: np.ndarray, item: FieldResult, bbox) -> np.ndarray:
    """The cell as the photograph shows it (its own resolution), with some context around it."""
    factor = image.shape[1] / item.width
    x0, y0, x1, y1 = (v * factor for v in bbox)
    margin = CROP_MARGIN * max(x1 - x0, y1 - y0)
    x0, y0 = max(0, int(x0 - margin)), max(0, int(y0 - margin))
    x1, y1 = min(image.shape[1], int(np.ceil(x1 + margin))), min(image.shape[0], int(np.ceil(y1 + margin)))
    return np.ascontiguousarray(image[y0:y1, x0:x1])


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB picture as PNG bytes."""
    import cv2

    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    return buffer.tobytes()


@dataclass
class GalleryCell:
    """A cell kept for the gallery: its score, whether it was counted, where it is, its pictures
    (``native``: the photograph's own pixels; ``crop``: what the classifier saw)."""

    probability: float
    counted: bool
    field: str
    x: float
    y: float
    stage: str | None
    stage_probability: float | None
    native: np.ndarray
    crop: np.ndarray

    def __lt__(self, other):  # heapq keeps the highest-scoring cells
        return self.probability < other.probability


class Gallery:
    """Each sample's best counted cells and near misses, kept as its fields are screened.

    A sample's counts come from its good fields, or (if none is good) its readable ones
    (:meth:`~.screener.Screener.pool`): cells of the two kinds are kept apart, so the gallery
    shows only cells that were counted.
    """

    def __init__(self):
        self.counted: dict[tuple[str, bool], list[GalleryCell]] = {}
        self.near: dict[tuple[str, bool], list[GalleryCell]] = {}
        self.any_good: dict[str, bool] = {}

    def add(self, item: FieldResult, crops: np.ndarray, image: np.ndarray) -> None:
        """Keep the field's cells that rank among its sample's best (``on_field``'s signature)."""
        good = bool(item.quality.get("ok"))
        self.any_good[item.sample] = self.any_good.get(item.sample, False) or good
        for cell, crop in zip(item.cells, crops):
            counted = cell.label == "Parasitized"
            heap, size = ((self.counted, GALLERY_SIZE) if counted else (self.near, NEAR_MISSES))
            heap = heap.setdefault((item.sample, good), [])
            if len(heap) < size or cell.probability > heap[0].probability:
                entry = GalleryCell(cell.probability, counted, Path(item.path).name, cell.x, cell.y,
                                    getattr(cell, "stage", None), getattr(cell, "stage_probability", None),
                                    native_crop(image, item, cell.bbox), np.array(crop))
                (heapq.heappush if len(heap) < size else heapq.heapreplace)(heap, entry)

    def update(self, other: "Gallery") -> None:
        """Take in another gallery's cells (one kept where other fields were screened, e.g. on a
        Dask worker): each sample keeps its best counted cells and near misses of both."""
        if not isinstance(other, Gallery):
            raise MalariaCellsError(f"Gallery.update: expected a Gallery, got {type(other).__name__}")
        for mine, theirs, size in ((self.counted, other.counted, GALLERY_SIZE), (self.near, other.near, NEAR_MISSES)):
            for key, heap in theirs.items():
                merged = heapq.nlargest(size, mine.get(key, []) + list(heap), key=lambda c: c.probability)
                heapq.heapify(merged)
                mine[key] = merged
        for name, good in other.any_good.items():
            self.any_good[name] = self.any_good.get(name, False) or good

    def cells(self, sample: str | None = None) -> list[GalleryCell]:
        """The sample's gallery (every sample's with None): counted cells highest first, then
        near misses highest first."""
        def pooled(pool):
            return [c for (name, good), heap in pool.items()
                    if (sample is None or name == sample) and good == self.any_good.get(name, False) for c in heap]

        counted = sorted(pooled(self.counted), key=lambda c: -c.probability)[:GALLERY_SIZE]
        near = sorted(pooled(self.near), key=lambda c: -c.probability)[:NEAR_MISSES]
        return counted + near

    def review_cells(self, sample: str) -> list[dict]:
        """The sample's gallery as the records store it for review: each cell as
        ``{"position", "counted", "probability", "field", "x", "y", "stage", "stage_probability",
        "image"}`` with ``image`` the native-resolution crop as PNG bytes."""
        return [{"position": position, "counted": bool(cell.counted), "probability": float(cell.probability),
                 "field": cell.field, "x": float(cell.x), "y": float(cell.y), "stage": cell.stage,
                 "stage_probability": None if cell.stage_probability is None else float(cell.stage_probability),
                 "image": png_bytes(cell.native)}
                for position, cell in enumerate(self.cells(sample))]
