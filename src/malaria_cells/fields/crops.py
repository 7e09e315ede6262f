"""Cutting cells out of a field the way the cell model's training crops look.

The NIH crops the model learned from are each one segmented cell: its bounding box, black
outside the cell's mask, stretched to a square. :func:`crop_cells` cuts every detected cell
of a field that way, so the cell model sees field cells as it saw its training cells.
"""

from __future__ import annotations

import numpy as np

from .detection import FieldDetection, FieldObject
from ..images import resize

__all__ = ["crop_cells", "CROP_MARGIN"]

CROP_MARGIN = 0.04
"""Extra border around the mask's bounding box, as a fraction of its side (the NIH crops keep
a pixel or two of black around the cell)."""


def crop_cells(image: np.ndarray, detection: FieldDetection, image_size: int,
               objects: list[FieldObject] | None = None) -> np.ndarray:
    """Crops of the given objects (default: the counted red cells), uint8 ``(n, size, size, 3)``.

    Parameters
    ----------
    image : numpy.ndarray
        The field, uint8 RGB, the same image the detection ran on.
    detection : FieldDetection
        Its detection (object masks and scale).
    image_size : int
        The cell model's input side.
    objects : list of FieldObject, optional
        Which objects to cut (default :attr:`FieldDetection.cells`).
    """
    import cv2

    objects = detection.cells if objects is None else objects
    out = np.zeros((len(objects), image_size, image_size, 3), np.uint8)
    height, width = image.shape[:2]
    labels, scale = detection.labels, detection.scale
    for row, item in enumerate(objects):
        x0, y0, x1, y1 = item.bbox
        pad = int(round(CROP_MARGIN * max(x1 - x0, y1 - y0)))
        x0, y0, x1, y1 = max(0, x0 - pad), max(0, y0 - pad), min(width, x1 + pad), min(height, y1 + pad)
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        # The object's mask, from the detection scale up to the image's pixels.
        lx0, ly0 = int(x0 / scale), int(y0 / scale)
        lx1, ly1 = max(lx0 + 1, int(np.ceil(x1 / scale))), max(ly0 + 1, int(np.ceil(y1 / scale)))
        patch = (labels[ly0:ly1, lx0:lx1] == item.label).astype(np.uint8)
        mask = cv2.resize(patch, (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST).astype(bool)
        cell = image[y0:y1, x0:x1] * mask[..., None]
        out[row] = resize(cell, image_size)
    return out
