"""Whether an image is a single red-cell crop, as the cell model expects, and why not.

``predict`` and the page's cell mode label single-cell crops: one red cell, segmented on black
(the NIH crops) or on its plasma. Given a whole field photograph, a landscape, a drawing or a
blank image, a cell model still returns a probability, often a confident one; these checks
refuse such images with a reason instead (``screen`` reads field photographs).
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_cell_crop", "MAX_CROP_SIDE"]

CHECK_SIDE = 64
"""Longer side (pixels) of the copy the checks look at."""
MAX_CROP_SIDE = 1000
"""A crop wider or taller than this (pixels) is a photograph of many cells, not a crop."""
MIN_CONTRAST = 4.0
"""A crop whose grey levels spread less than this (standard deviation, 0-255) is blank."""
MIN_COLOUR = 3
"""Grayscale below this: the 99th percentile of each pixel's channel spread (0-255)."""
MIN_MAIN_SHARE = 0.5
"""The largest object holds at least this share of the crop's foreground (one cell; a crop
may hold a piece of a neighbour as large as about two thirds of its cell, as some NIH crops do)."""
MIN_MAIN_AREA = 0.15
"""...and covers at least this share of the crop."""
MAX_LIT_FRAME = 0.6
"""A segmented crop's frame is at most this share lit (the rest is its black surround); an
unsegmented crop's frame is at most this share cell (the rest is plasma)."""
MIN_SOLIDITY = 0.6
"""A cell is convex, or nearly: its area over its convex hull's at least this."""


def check_cell_crop(image: np.ndarray, *, colour: bool = True) -> str | None:
    """Why ``image`` (uint8 RGB, as decoded) is not a single red-cell crop, or None if it is.

    Parameters
    ----------
    image : numpy.ndarray
        The decoded image at its stored size.
    colour : bool
        Whether the crop must be in colour (for a model that reads colour; a model trained on
        grayscale cells takes grayscale crops).
    """
    import cv2

    height, width = image.shape[:2]
    if max(height, width) > MAX_CROP_SIDE:
        return (f"not a single-cell crop ({width}x{height} pixels: a field photograph?); "
                "use `malaria-cells screen` for smear photographs")
    # The checks look at shapes and colours, not detail: a copy at most CHECK_SIDE wide will do.
    scale = CHECK_SIDE / max(height, width)
    if scale < 1:
        from .images import resize

        image = resize(image, (max(1, round(width * scale)), max(1, round(height * scale))))
        height, width = image.shape[:2]
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    if float(grey.std()) < MIN_CONTRAST:
        return "not a single-cell crop (a blank image)"
    brightest = np.maximum(np.maximum(image[..., 0], image[..., 1]), image[..., 2])
    darkest = np.minimum(np.minimum(image[..., 0], image[..., 1]), image[..., 2])
    spread = brightest.astype(np.int16) - darkest
    if colour and np.count_nonzero(spread >= MIN_COLOUR) <= 0.01 * spread.size:  # the 99th percentile is under it
        return "not a single-cell crop (a grayscale image: the model reads the stain's colour)"
    # A segmented crop (the NIH crops) is a cell on black, and its frame is mostly black; an
    # unsegmented one is a cell on its plasma, darker than the plasma around it.
    lit = brightest > 20
    frame = np.concatenate([lit[0], lit[-1], lit[:, 0], lit[:, -1]])
    if frame.mean() < MAX_LIT_FRAME:
        foreground = lit
    else:
        threshold, _ = cv2.threshold(grey.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        foreground = grey < threshold
        edge = np.concatenate([foreground[0], foreground[-1], foreground[:, 0], foreground[:, -1]])
        if edge.mean() > MAX_LIT_FRAME:
            return "not a single-cell crop (no cell against a background: a photograph of something else?)"
    foreground = cv2.morphologyEx(foreground.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    if count < 2:
        return "not a single-cell crop (no cell found)"
    areas = stats[1:, cv2.CC_STAT_AREA]
    main = int(np.argmax(areas))
    if areas[main] < MIN_MAIN_SHARE * areas.sum() or areas[main] < MIN_MAIN_AREA * height * width:
        return (f"not a single-cell crop ({count - 1} separate objects, not one cell: a field photograph or "
                "another picture?); use `malaria-cells screen` for smear photographs")
    contours, _ = cv2.findContours((labels == main + 1).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = max(contours, key=cv2.contourArea)
    hull = cv2.contourArea(cv2.convexHull(outline))
    solidity = cv2.contourArea(outline) / hull if hull else 0.0
    if solidity < MIN_SOLIDITY:
        return f"not a single-cell crop (its main object is not cell-shaped: solidity {solidity:.2f})"
    red, green, blue = cv2.mean(np.ascontiguousarray(image), (labels == main + 1).astype(np.uint8))[:3]
    # Stained red cells range from orange-pink to lilac, but green is never their brightest
    # channel (haemoglobin and eosin absorb it), nor is blue far above red.
    if colour and (green > max(red, blue) + 8 or red < 0.6 * blue):
        return f"not a single-cell crop (its colour, RGB {red:.0f}, {green:.0f}, {blue:.0f}, is not a stained cell's)"
    return None
