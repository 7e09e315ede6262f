"""Synthetic cells and fields, drawn (not photographed), like scikit-learn's ``make_*`` data.

They exercise the pipeline where no real smear images may go: the package's examples and its
tests. Nothing here resembles a real parasite well enough to train on.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["make_cell", "make_field"]


def make_cell(infected: bool, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """An RGB cell crop: black surround, pink disc, and for infected cells 1-3 purple dots."""
    yy, xx = np.mgrid[:size, :size]
    centre = size / 2 + rng.uniform(-2, 2, 2)
    radius = size * rng.uniform(0.36, 0.45)
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2
    image = np.zeros((size, size, 3), np.float64)
    image[disc] = np.array([225, 150, 160]) + rng.normal(0, 6, 3)
    if infected:
        for _ in range(rng.integers(1, 4)):
            spot = centre + rng.uniform(-0.6, 0.6, 2) * radius
            dot = (yy - spot[0]) ** 2 + (xx - spot[1]) ** 2 < (size * rng.uniform(0.05, 0.09)) ** 2
            image[dot & disc] = [95, 40, 120]
    image += rng.normal(0, 4, image.shape) * disc[..., None]
    return image.clip(0, 255).astype(np.uint8)


def make_field(rng: np.random.Generator, *, size=(900, 700), radius=22, rows=7, cols=9, infected=(),
               touching_pairs=0, white_cells=0, platelets=0, surround=False, scale_bar=False, blur=1.0,
               enlarged=(), clumps=0, pressed=False):
    """A synthetic thin-smear field: pale plasma, pink red cells with a darker rim and paler
    centre, infected ones with a dark ring-stage dot, white cells (a large cell with a big dark
    lobed nucleus), platelets (small purple specks), with ``scale_bar`` a camera's black scale
    bar and label in the bottom margin and, with ``surround``, the black surround of a
    photograph through the eyepiece. Cells numbered in ``enlarged`` are drawn a third wider (as
    P. vivax enlarges the cells it infects); ``clumps`` rosettes of seven overlapping cells
    (not counted) replace as many cells of the middle row. With ``pressed``, a red cell leans
    on each white cell.

    Returns ``(image, cells)``: uint8 RGB ``(height, width, 3)`` and a list of
    ``(x, y, infected)`` for every whole red cell placed inside the field of view.
    """
    from PIL import ImageFilter


    width, height = size
    yy, xx = np.mgrid[:height, :width]
    image = np.empty((height, width, 3), np.float64)
    image[:] = [236, 228, 222]
    cells, spots = [], []
    step_x, step_y = width / (cols + 1), height / (rows + 1)
    index = 0
    for row in range(rows):
        for col in range(cols):
            x = step_x * (col + 1) + rng.uniform(-3, 3)
            y = step_y * (row + 1) + rng.uniform(-3, 3)
            spots.append((x, y))
    for pair in range(touching_pairs):  # a second cell 1.75 radii from the first
        x, y = spots[pair * 3]
        spots.append((x + 1.75 * radius, y + 0.3 * radius))
        spots[pair * 3 + 1] = None  # keep the neighbour clear
    rosettes = []
    for k in range(clumps):  # a cell and six neighbours a radius around it, in place of a grid cell
        x, y = spots[(rows // 2) * cols + 1 + 3 * k]
        spots[(rows // 2) * cols + 1 + 3 * k] = None
        rosettes += [(x, y)] + [(x + radius * np.cos(a), y + radius * np.sin(a))
                                for a in np.arange(6) * np.pi / 3]
    spots = [s for s in spots if s is not None]
    white = [(rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height) for _ in range(white_cells)]
    spots = [(x, y) for x, y in spots if all(np.hypot(x - wx, y - wy) > 2.8 * radius for wx, wy in white)]
    spots += [(wx + 2.2 * radius, wy) for wx, wy in white] if pressed else []
    centre, fov_radius = np.array([width / 2, height / 2]), 0.48 * min(width, height)
    for x, y in white:
        r = 1.6 * radius
        distance = np.hypot(yy - y, xx - x)
        image[distance < r] = [222, 200, 215]
        for k in range(3):  # a lobed nucleus
            a = 2 * np.pi * k / 3
            lobe = np.hypot(yy - (y + 0.35 * r * np.sin(a)), xx - (x + 0.35 * r * np.cos(a))) < 0.42 * r
            image[lobe] = [80, 30, 120]
    for number, (x, y) in enumerate(spots + rosettes):
        whole = not surround or np.hypot(x - centre[0], y - centre[1]) < fov_radius - radius * 1.2
        if surround and np.hypot(x - centre[0], y - centre[1]) > fov_radius + radius * 0.5:
            continue
        r = radius * rng.uniform(0.92, 1.08) * (1.35 if index in enlarged else 1.0)
        distance = np.hypot(yy - y, xx - x) / r
        inside = distance < 1
        body = np.array([214, 150, 160])
        pale = np.clip(0.35 - distance, 0, None) / 0.35  # paler centre
        image[inside] = body + (np.array([236, 228, 222]) - body) * 0.5 * pale[inside, None]
        rim = inside & (distance > 0.85)
        image[rim] *= 0.93
        is_infected = index in infected
        if is_infected:
            angle = rng.uniform(0, 2 * np.pi)
            sx, sy = x + 0.45 * r * np.cos(angle), y + 0.45 * r * np.sin(angle)
            dot = np.hypot(yy - sy, xx - sx) < 0.22 * r
            image[dot] = [95, 35, 125]
        if whole and number < len(spots):  # cells cut by the field of view's edge, or clumped, are not counted
            cells.append((float(x), float(y), is_infected))
        index += 1
    for _ in range(platelets):
        x, y = rng.uniform(0.05, 0.95) * width, rng.uniform(0.05, 0.95) * height
        image[np.hypot(yy - y, xx - x) < 0.18 * radius] = [150, 90, 170]
    if scale_bar:
        import cv2

        ink = np.zeros((height, width), np.uint8)
        x1, y = int(0.93 * width), height - 45
        cv2.rectangle(ink, (x1 - 140, y - 3), (x1, y + 3), 255, -1)
        cv2.putText(ink, "50 um", (x1 - 110, height - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2)
        image[ink > 0] = 0
    if surround:
        outside = np.hypot(yy - centre[1], xx - centre[0]) > fov_radius
        image[outside] = 8
    image += rng.normal(0, 2.5, image.shape)
    picture = Image.fromarray(image.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(picture), cells
