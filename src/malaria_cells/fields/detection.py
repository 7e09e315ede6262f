"""Finding the red cells of a thin-smear field photograph.

:class:`Detector` is what the screening loop needs of any detector; :class:`ClassicalDetector`
(OpenCV and scikit-image, every threshold a documented parameter) is the one shipped.

The steps, each robust to what varies between labs, cameras and slides:

1. **Field of view.** A photograph through the eyepiece is a bright disc on black; cells cut
   by its edge (or the image's) are not counted.
2. **Background.** A grey-level closing far wider than a cell fills every cell with the plasma
   around it; dividing by it turns pixels into optical density. Vignetting, a dark rim or an
   uneven lamp then no longer move the threshold, which is chosen by Otsu's method on the
   density inside the field of view.
3. **Cell size.** The typical cell radius is the median height of the taller half of the
   distance-transform peaks: each cell, alone or touching others, has one peak about its
   radius high, whatever white cells, platelets or clumps are also present. Where small
   objects outnumber the cells (a 1000x frame of a dozen cells among platelets, or pale cells
   whose rims break into pieces), the median by area takes over: each peak weighs as the disc
   it centres. Round pale centres up to a tenth of the frame are filled first.
4. **Splitting.** Peaks at least a radius apart seed a watershed of the distance transform,
   which splits touching and overlapping cells; holes are filled first (before a small opening
   clears specks, as that wears thin rims into dashes), so pale cells with a
   light centre stay whole (a hole that is still stained, or round and convex like the clear
   centre of a target or hypochromic cell, is a cell's centre; plasma enclosed by touching
   cells is concave). Touching pieces whose union has no notch are joined again (a long cell
   has a ridge of peaks, and the watershed cuts it across). A region of overlapping cells that
   kept one peak is cut into cells by k-means where its outline has a notch, into as many
   cells as its area holds (the disc of the cell's width; where the median object is far
   larger, as elliptocytes are, about twice it, the median object's area); a convex one is one
   elongated cell.
5. **Sorting objects.** Much smaller than a cell: platelet or debris. Holding part of a large
   very dark (nucleus-stained) blob, or sharing a fifth of its border with such an object: a
   white blood cell, or a piece of one. Largely black (darker than any stain in every channel):
   a printed mark such as a camera's scale bar. Touching the field's edge: cut.
   More than three median cells' area: a clump of overlapping cells that splitting left whole
   (one count would stand for several cells, and the gaps between them look like parasites).
   Less than about a third of the median cell: a fragment, never counted as a cell.
   The rest are counted; enlarged cells (P. vivax gametocytes and schizonts) are kept.

Coordinates are pixels of the image as stored (EXIF orientation not applied).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields as dataclass_fields
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Detector", "ClassicalDetector", "FieldObject", "FieldDetection", "detect_cells", "DETECTION_SIDE",
           "DETECTION_CELL_DIAMETER", "FOCUS_FLOOR", "CLUMP_CELLS"]

DETECTION_CELL_DIAMETER = 32
"""Cell diameter, in pixels, at which the detector works: enough to split touching cells."""
FOCUS_FLOOR = 0.18
"""Border sharpness (see ``_quality``) below which a field is flagged as out of focus."""
CLUMP_CELLS = 3.0
"""An object larger than this many median cells is a clump of overlapping cells, not counted:
an enlarged P. vivax cell reaches about twice a cell's area."""
DETECTION_SIDE = 1024
"""Longer side of the first, coarse look that measures the cell size."""


@dataclass
class FieldObject:
    """One object found in a field.

    Attributes
    ----------
    x, y : float
        Centre, in pixels of the stored image.
    bbox : tuple of int
        ``(x0, y0, x1, y1)``, pixels of the stored image, ``x1`` and ``y1`` exclusive.
    area : float
        In square pixels of the stored image.
    kind : str
        ``"red_cell"`` (counted), ``"white_cell"``, ``"platelet"`` (small debris included),
        ``"mark"`` (a printed scale bar or label), ``"clump"`` (overlapping cells left whole),
        ``"fragment"`` (much smaller than the field's median cell) or ``"edge"`` (cut by the
        image or field-of-view edge).
    """

    x: float
    y: float
    bbox: tuple[int, int, int, int]
    area: float
    kind: str
    label: int = field(default=0, repr=False)


@dataclass
class FieldDetection:
    """What the detector found in one field.

    Attributes
    ----------
    objects : list of FieldObject
        Every object; :attr:`cells` are the counted red cells among them.
    cell_diameter : float
        Typical red-cell diameter, pixels of the stored image.
    labels : numpy.ndarray of int32
        Object masks at the detection scale (``FieldObject.label`` values; 0 is background).
    scale : float
        Stored-image pixels per detection pixel.
    quality : dict
        ``{"ok": bool, "reasons": [...], "focus": float, "coverage": float}``.
    field_of_view : numpy.ndarray of bool, optional
        The bright field of view at the detection scale (None: the whole image).
    """

    objects: list[FieldObject]
    cell_diameter: float
    labels: np.ndarray
    scale: float
    quality: dict
    field_of_view: np.ndarray | None = None

    @property
    def cells(self) -> list[FieldObject]:
        return [o for o in self.objects if o.kind == "red_cell"]

    @property
    def excluded(self) -> list[FieldObject]:
        return [o for o in self.objects if o.kind != "red_cell"]


@runtime_checkable
class Detector(Protocol):
    """What :class:`~malaria_cells.fields.Screener` needs of a detector.

    ``detect(image)`` takes a uint8 RGB field and returns a :class:`FieldDetection`: every
    object with its kind (only ``"red_cell"`` objects are counted), the object masks as a
    label image at some scale (cell crops are cut through them), the typical cell diameter
    and a quality verdict. ``describe()`` returns a JSON-able description (its name and
    settings) that travels with every result.
    """

    def detect(self, image: np.ndarray) -> FieldDetection: ...

    def describe(self) -> dict: ...


@dataclass(frozen=True)
class ClassicalDetector:
    """The classical detector: density thresholding, a distance-transform watershed and rules
    that sort the objects (see the module's docstring for the steps).

    Every setting is a ratio to something the field itself measures (its cell size, its
    plasma's brightness, its cells' stain), so one setting serves every magnification and
    exposure; the defaults are those validated on the shared fields.

    Parameters
    ----------
    working_diameter : float
        Cell diameter (pixels) the field is resampled to before splitting: enough for touching
        cells to show a neck. Larger is slower and no better.
    coarse_side : int
        Longer side (pixels) of the first, coarse look that measures the cell size.
    fallback_diameter : float
        Cell diameter (pixels of the coarse look) assumed where none can be measured, and the
        scale of the coarse look's background estimate.
    surround_level, surround_share : float
        A pixel darker than ``surround_level`` of the brightest is the black surround of a
        photograph through the eyepiece, if at least ``surround_share`` of the image is.
    background_width : float
        Width of the background closing, in cell diameters: wider than any cell, so each cell
        is filled with the plasma around it.
    stain_percentile : float
        Percentile of optical density above which pixels (nuclei, parasites) are left out of
        the Otsu choice between plasma and cells.
    pale_centre_area, pale_centre_stain, tiny_hole_area : float
        A hole in a cell's mask is its pale centre, and filled, if smaller than
        ``pale_centre_area`` cells and stained above ``pale_centre_stain`` of the threshold, or
        smaller than ``tiny_hole_area`` cells.
    pale_centre_solidity, pale_centre_roundness : float
        A clearer hole smaller than a cell is still a pale centre (of a target or hypochromic
        cell) if it is convex (area over its convex hull's at least ``pale_centre_solidity``)
        and round (``4 pi area / perimeter**2`` at least ``pale_centre_roundness``); plasma
        enclosed by touching cells is bounded by their curves, so concave.
    by_area_ratio : float
        The cell size is the median of the taller half of the objects' inscribed radii, so that
        platelets and debris do not drag it down; where they outnumber the cells (a few large
        cells a frame, at high magnification), the median by area (each radius weighted by its
        disc) is more than this many times that, and is used instead.
    hollow_ratio : float
        When the cell size measured with every object filled out to its convex hull is this
        many times the ordinary measure, the cells are seen as rims (over-exposed, or pale
        with a broken outline) and the filled measure is used.
    rim_solidity, rim_min_area, rim_max_area : float
        An object whose area is under ``rim_solidity`` of its convex hull's, the hull being
        ``rim_min_area`` to ``rim_max_area`` cells, is a cell's broken rim, filled out to its
        hull.
    seed_spacing, seed_height : float
        Watershed seeds are distance-transform peaks at least ``seed_spacing`` radii apart and
        ``seed_height`` radii high.
    split_area, disc_ratio, clump_notch : float
        A region over ``split_area`` cells that is not a disc (area above ``disc_ratio`` times
        the disc its widest point allows) is overlapping cells, divided by k-means into as many
        cells as its area holds, if its outline has a notch at least ``clump_notch`` radii deep
        (where overlapping cells' outlines cross); a convex region is one elongated cell.
    elongated_ratio : float
        Where the median object holds this many discs of the cell's width or more (long cells:
        elliptocytes hold about two; round cells about one), a cell's area is the median
        object's, not that disc's, when counting the cells a region holds.
    platelet_area : float
        Objects smaller than this many cells are platelets or debris.
    ink_level, mark_share : float
        A pixel darker than ``ink_level`` of the plasma in every channel is ink, not stain; an
        object over ``mark_share`` ink is a printed mark (a scale bar or label).
    nucleus_contrast, nucleus_step, nucleus_area : float
        White-cell nuclei: density above ``nucleus_contrast`` times the cells' median (and at
        least ``nucleus_step`` above it), in blobs over ``nucleus_area`` cells.
    nucleus_share, white_contact : float
        An object holding ``nucleus_share`` of its area in a nucleus, or sharing
        ``white_contact`` of its perimeter with a white cell, is (a piece of) a white cell.
    clump_cells : float
        Counted objects larger than this many median cells are clumps, not counted.
    fragment_area : float
        Counted objects smaller than this many median cells are fragments (of a cell cut by
        the splitting, or debris), not counted: a whole microcyte is about two thirds of a
        median cell.
    min_cells, max_coverage, focus_floor : float
        A field is of low quality with fewer than ``min_cells`` counted cells, over
        ``max_coverage`` of it covered, or border sharpness under ``focus_floor``.
    """

    working_diameter: float = DETECTION_CELL_DIAMETER
    coarse_side: int = DETECTION_SIDE
    fallback_diameter: float = 40.0
    surround_level: float = 0.25
    surround_share: float = 0.02
    background_width: float = 2.5
    stain_percentile: float = 98.0
    pale_centre_area: float = 0.5
    pale_centre_stain: float = 0.5
    tiny_hole_area: float = 0.1
    pale_centre_solidity: float = 0.9
    pale_centre_roundness: float = 0.7
    by_area_ratio: float = 1.5
    hollow_ratio: float = 2.0
    rim_solidity: float = 0.6
    rim_min_area: float = 0.4
    rim_max_area: float = 1.8
    seed_spacing: float = 0.7
    seed_height: float = 0.35
    split_area: float = 1.7
    disc_ratio: float = 1.4
    clump_notch: float = 0.08
    elongated_ratio: float = 1.5
    platelet_area: float = 0.2
    ink_level: float = 0.35
    mark_share: float = 0.25
    nucleus_contrast: float = 3.0
    nucleus_step: float = 0.6
    nucleus_area: float = 0.15
    nucleus_share: float = 0.02
    white_contact: float = 0.2
    clump_cells: float = CLUMP_CELLS
    fragment_area: float = 0.35
    min_cells: int = 50
    max_coverage: float = 0.75
    focus_floor: float = FOCUS_FLOOR

    def __post_init__(self):
        from ..errors import MalariaCellsError

        for item in dataclass_fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise MalariaCellsError(f"detector setting {item.name} must be a number >= 0, got {value!r}")
        if self.working_diameter < 8 or self.coarse_side < 64:
            raise MalariaCellsError("detector: working_diameter must be at least 8 and coarse_side at least 64")

    def detect(self, image: np.ndarray) -> FieldDetection:
        """Find, split and sort the objects of a uint8 RGB field (see :class:`Detector`)."""
        return _detect(image, self)

    def describe(self) -> dict:
        """``{"name": "classical", "settings": {...}}``, the settings that differ from the defaults."""
        changed = {item.name: getattr(self, item.name) for item in dataclass_fields(self)
                   if getattr(self, item.name) != item.default}
        return {"name": "classical", "settings": changed}


def _density(image: np.ndarray, cell_diameter: float, fov: np.ndarray, background_width: float) -> np.ndarray:
    """Optical density of the green channel against a local background estimate."""
    import cv2

    green = image[..., 1].astype(np.float32)
    inside = green[fov]
    filled = green.copy()
    filled[~fov] = np.median(inside) if inside.size else 255.0
    # The closing runs on a 4x smaller copy: the background varies slowly.
    small = cv2.resize(filled, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA)
    size = max(3, int(round(cell_diameter * background_width / 4)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    background = cv2.morphologyEx(small, cv2.MORPH_CLOSE, kernel)
    background = cv2.GaussianBlur(background, (0, 0), size / 3)
    background = cv2.resize(background, (green.shape[1], green.shape[0]), interpolation=cv2.INTER_LINEAR)
    return np.log(np.maximum(background, 1.0) / np.maximum(green, 1.0))


def _brightest(image: np.ndarray) -> np.ndarray:
    """The brightest channel of each pixel (``image.max(axis=2)``, which is many times slower
    over a last axis of three)."""
    return np.maximum(np.maximum(image[..., 0], image[..., 1]), image[..., 2])


def _field_of_view(image: np.ndarray, dark_level: float, min_dark_share: float) -> np.ndarray:
    """Pixels inside the bright field of view (all of them for a camera image with no surround)."""
    import cv2

    brightness = _brightest(image)
    top = _percentile_uint8(brightness, 99)
    dark = brightness < dark_level * top
    if dark.mean() < min_dark_share:  # no black surround
        return np.ones(brightness.shape, bool)
    bright = cv2.medianBlur((~dark).astype(np.uint8) * 255, 5) > 0
    count, labels, stats, _ = cv2.connectedComponentsWithStats(bright.astype(np.uint8), connectivity=4)
    if count < 2:
        return np.ones(brightness.shape, bool)
    disc = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    holes, _ = _holes(disc)
    return disc | (holes > 0)


def _percentile_uint8(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` of uint8 values from their histogram, without sorting."""
    cumulative = np.cumsum(np.bincount(values.ravel(), minlength=256))
    index = q / 100 * (cumulative[-1] - 1)
    low = int(np.floor(index))
    below, above = (int(np.searchsorted(cumulative, k, side="right")) for k in (low, min(low + 1, cumulative[-1] - 1)))
    return float(below + (index - low) * (above - below))


def _holes(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The holes of ``mask`` (background not 4-connected to the image's edge), labelled 1..n."""
    import cv2

    count, labels = cv2.connectedComponents((~mask).astype(np.uint8), connectivity=4)
    outside = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    number = np.ones(count, bool)
    number[0] = False  # cv2's label 0 is the mask itself
    number[outside] = False
    relabel = np.zeros(count, np.int32)
    relabel[number] = np.arange(1, number.sum() + 1)
    return relabel[labels], int(number.sum())


def _foreground(density: np.ndarray, fov: np.ndarray, stain_percentile: float) -> tuple[np.ndarray, float]:
    values = density[fov]
    # The threshold is chosen between plasma and cells; the darkest stain (white-cell nuclei,
    # parasites) would pull Otsu's split upwards, so the darkest pixels are left out of the choice.
    values = values[values < np.percentile(values, stain_percentile)]
    threshold = _otsu(values) if values.size else 0.1
    return (density > threshold) & fov, threshold


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of float values over 256 bins (scikit-image's ``threshold_otsu``).

    OpenCV's Otsu takes 8-bit images only; scikit-image's thresholding module would add its
    import (and SciPy's) to every command's start-up.
    """
    if np.all(values == values[0]):
        return float(values[0])
    counts, edges = np.histogram(values, bins=256)
    counts = counts.astype(np.float32)
    centres = (edges[:-1] + edges[1:]) / 2
    weight1, weight2 = np.cumsum(counts), np.cumsum(counts[::-1])[::-1]
    mean1 = np.cumsum(counts * centres) / weight1
    mean2 = (np.cumsum((counts * centres)[::-1]) / weight2[::-1])[::-1]
    variance = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centres[np.argmax(variance)])


def _peaks(image: np.ndarray, min_distance: int, threshold: float, region: np.ndarray | None = None) -> np.ndarray:
    """Local maxima above ``threshold``, at least ``min_distance`` apart (Chebyshev), highest first.

    scikit-image's ``peak_local_max`` with ``exclude_border=False``: a pixel is a peak where
    it equals the maximum of the square of side ``2 * min_distance + 1`` around it; of peaks
    closer than ``min_distance``, the higher (the first in raster order among equals) is kept.
    With ``region``, only its pixels count, as for one object of a labelled image.
    """
    import cv2

    image = np.asarray(image, np.float32)
    if region is not None:
        image = np.where(region, image, np.finfo(np.float32).min).astype(np.float32)
    size = 2 * min_distance + 1
    maxima = image == cv2.dilate(image, np.ones((size, size), np.uint8))
    inside = maxima if region is None else maxima[region]
    if inside.all():  # a flat image or object has no peak but its isolated pixels
        maxima[:] = False
        if region is not None:
            cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
            opened = cv2.morphologyEx(region.astype(np.uint8), cv2.MORPH_OPEN, cross,
                                      borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0
            maxima[region & ~opened] = True
    maxima &= image > threshold
    coordinates = np.argwhere(maxima)
    coordinates = coordinates[np.argsort(-image[maxima], kind="stable")]
    if min_distance <= 1 or len(coordinates) < 2:
        return coordinates
    return coordinates[_spaced(coordinates, image.shape, min_distance)]


def _spaced(coordinates: np.ndarray, shape: tuple, min_distance: int) -> np.ndarray:
    """Which peaks (sorted highest first) survive when each suppresses the later ones closer
    than ``min_distance``.

    Two maxima of windows of side ``2 * min_distance + 1`` that close lie in each other's
    window and so are equally high: the close pairs are found by comparing all pairs for a
    few peaks, by looking up each peak's neighbours at every offset for many.
    """
    n = len(coordinates)
    if n <= 256:  # few peaks (one object's): compare all pairs
        close = np.abs(coordinates[:, None] - coordinates[None]).max(axis=2) < min_distance
        first, later = np.nonzero(np.triu(close, 1))
    elif (2 * min_distance - 1) ** 2 > 8 * n:  # a few peaks far apart (a plateau of a huge object)
        return _spaced_by_grid(coordinates, min_distance)
    else:
        first, later = _close_pairs(coordinates, shape, min_distance)
    kept = np.ones(n, bool)
    if not len(first):
        return kept
    order = np.argsort(first, kind="stable")
    first, later = first[order], later[order]
    bounds = np.flatnonzero(np.r_[True, first[1:] != first[:-1], True])
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if kept[first[start]]:
            kept[later[start:stop]] = False
    return kept


def _spaced_by_grid(coordinates: np.ndarray, min_distance: int) -> np.ndarray:
    """:func:`_spaced` peak by peak, each checked against the kept ones in the 3x3 squares of
    side ``min_distance`` around it (at most 4 kept peaks fit in a square): linear in the peaks
    whatever ``min_distance``."""
    kept = np.zeros(len(coordinates), bool)
    squares: dict = {}
    for i, (y, x) in enumerate(coordinates.tolist()):
        sy, sx = y // min_distance, x // min_distance
        if not any(abs(py - y) < min_distance and abs(px - x) < min_distance
                   for ky in (sy - 1, sy, sy + 1) for kx in (sx - 1, sx, sx + 1)
                   for py, px in squares.get((ky, kx), ())):
            kept[i] = True
            squares.setdefault((sy, sx), []).append((y, x))
    return kept


def _close_pairs(coordinates, shape, min_distance):
    """Pairs (i < j) of peaks closer than ``min_distance``, by looking up every offset."""
    n = len(coordinates)
    index = np.full(shape, -1, np.int64)
    index[coordinates[:, 0], coordinates[:, 1]] = np.arange(n)
    first, later = [], []
    for dy in range(-min_distance + 1, min_distance):
        for dx in range(-min_distance + 1, min_distance):
            if (dy, dx) <= (0, 0):  # each pair once, from its upper-left member
                continue
            y, x = coordinates[:, 0] + dy, coordinates[:, 1] + dx
            inside = (y >= 0) & (y < shape[0]) & (x >= 0) & (x < shape[1])
            other = np.full(n, -1, np.int64)
            other[inside] = index[y[inside], x[inside]]
            found = np.flatnonzero(other >= 0)
            first.append(np.minimum(found, other[found]))
            later.append(np.maximum(found, other[found]))
    return np.concatenate(first), np.concatenate(later)


def _radius(distance: np.ndarray, mask: np.ndarray, by_area_ratio: float) -> float:
    # Outside the mask the distance is 0, below the threshold: the mask needs no region.
    peaks = _peaks(distance, 3, 2.0)
    if len(peaks) == 0:
        return 0.0
    heights = np.sort(distance[tuple(peaks.T)])
    # Median of the taller half: small debris and platelet peaks do not drag it down...
    typical = float(np.median(heights[len(heights) // 2:]))
    # ...unless they outnumber the cells (a few large cells among many specks, at high
    # magnification); each peak then weighs as the disc it centres, and the cells' area wins.
    weight = np.cumsum(heights ** 2)
    by_area = float(heights[np.searchsorted(weight, weight[-1] / 2)])
    return by_area if by_area > by_area_ratio * typical else typical


def _boxes(labels: np.ndarray) -> list:
    """Bounding slices of labels 1..max (None for an absent label), as ``ndimage.find_objects``."""
    n = int(labels.max()) + 1
    # A region's extremes lie on its outline: only pixels beside another label (or the image
    # edge) are visited, a fraction of the image.
    edge = np.zeros(labels.shape, bool)
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    rows, columns = np.nonzero(edge & (labels > 0))
    flat = labels[rows, columns]
    low_y, low_x = np.full(n, labels.shape[0]), np.full(n, labels.shape[1])
    high_y, high_x = np.full(n, -1), np.full(n, -1)
    np.minimum.at(low_y, flat, rows)
    np.minimum.at(low_x, flat, columns)
    np.maximum.at(high_y, flat, rows)
    np.maximum.at(high_x, flat, columns)
    return [None if high_y[k] < 0 else (slice(low_y[k], high_y[k] + 1), slice(low_x[k], high_x[k] + 1))
            for k in range(1, n)]


def detect_cells(image: np.ndarray, **settings) -> FieldDetection:
    """Find, split and sort the objects of a field photograph with the classical detector.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 RGB ``(height, width, 3)``, as :func:`malaria_cells.images.decode` gives.
    **settings
        Any parameter of :class:`ClassicalDetector` (default: its documented defaults).

    Returns
    -------
    FieldDetection
    """
    return ClassicalDetector(**settings).detect(image)


def _detect(image: np.ndarray, s: "ClassicalDetector") -> FieldDetection:
    import cv2

    from ..images import resize

    height, width = image.shape[:2]
    # A coarse first look measures the cell size; then the field is analysed at the scale
    # where a cell is ``working_diameter`` pixels across.
    coarse_scale = max(1.0, max(height, width) / s.coarse_side)
    coarse = resize(image, (round(width / coarse_scale), round(height / coarse_scale)))
    diameter = _cell_diameter(coarse, s) * coarse_scale
    if diameter <= 0:
        diameter = s.fallback_diameter * coarse_scale
    scale = max(1.0, diameter / s.working_diameter)
    work = resize(image, (round(width / scale), round(height / scale))) if scale > 1 else image
    fov = _field_of_view(work, s.surround_level, s.surround_share)
    density = _density(work, diameter / scale, fov, s.background_width)
    mask, threshold = _foreground(density, fov, s.stain_percentile)
    # Pale centres are filled before the opening as well as after: the opening wears a thin rim
    # (a hypochromic cell's, at this scale) into dashes that no longer enclose its centre.
    mask = _fill_pale_centres(mask, density, threshold, np.pi * (diameter / scale / 2) ** 2, s, round_only=True)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN,
                            cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))) > 0
    mask = _fill_pale_centres(mask, density, threshold, np.pi * (diameter / scale / 2) ** 2, s)
    mask = _close_rims(mask, np.pi * (diameter / scale / 2) ** 2, s)
    distance = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    radius = _radius(distance, mask, s.by_area_ratio) or s.working_diameter / 2
    labels = _split(distance, mask, radius, s)
    labels = _merge_convex(labels, radius, s)
    labels = _split_clumps(labels, distance, radius, s)
    objects = _sort_objects(labels, density, _black(work, fov & ~mask, s.ink_level), fov, radius, scale,
                            (width, height), s)
    quality = _quality(density, fov, mask, objects, s)
    return FieldDetection(objects, 2 * radius * scale, labels, scale, quality, fov)


def _cell_diameter(image: np.ndarray, settings) -> float:
    import cv2

    fov = _field_of_view(image, settings.surround_level, settings.surround_share)
    density = _density(image, settings.fallback_diameter, fov, settings.background_width)
    mask, threshold = _foreground(density, fov, settings.stain_percentile)
    # Hollow-looking cells make the first estimate low, so the holes it allows are generous.
    first = _radius(cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5), mask, settings.by_area_ratio)
    # Round holes of any size a cell could have are pale centres here: with hollow-looking cells
    # the first radius is the rim's, far too small to bound them. At high magnification a small
    # frame holds a dozen cells, each pale centre a few percent of it.
    filled = _fill_pale_centres(mask, density, threshold, np.pi * (1.5 * first) ** 2, settings,
                                largest=mask.size / 10)
    radius = _radius(cv2.distanceTransform(filled.astype(np.uint8), cv2.DIST_L2, 5), filled, settings.by_area_ratio)
    # Cells seen as rims only (over-exposed, or pale with a dark outline, their rims broken):
    # with each object replaced by its convex hull, the radius comes out several times
    # larger. It is measured per object (the median over the taller half of the objects of
    # each one's largest inscribed radius), so one large object counts once.
    solid = _hulls(mask, mask.size / 50)
    solid_radius = _object_radius(cv2.distanceTransform(solid.astype(np.uint8), cv2.DIST_L2, 5), solid)
    if solid_radius > settings.hollow_ratio * radius:
        return 2 * solid_radius
    return 2 * radius


def _close_rims(mask: np.ndarray, cell_area: float, settings) -> np.ndarray:
    """Fill out each rim of a cell: an object far from convex (solidity under
    ``rim_solidity``) whose convex hull is about one cell (``rim_min_area`` to
    ``rim_max_area`` cells) is a cell seen
    as its outline only, broken open (over-exposed, or pale-centred)."""
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    out = mask.astype(np.uint8).copy()
    low, high = settings.rim_min_area, settings.rim_max_area
    areas = stats[1:, cv2.CC_STAT_AREA]
    for k in np.flatnonzero((areas >= 0.05 * cell_area) & (areas < high * cell_area))[:_MAX_ROUND_HOLES]:
        x, y, w, h = stats[k + 1, :4]
        contours, _ = cv2.findContours((labels[y:y + h, x:x + w] == k + 1).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        hull = cv2.convexHull(np.concatenate(contours))
        hull_area = cv2.contourArea(hull)
        if low * cell_area <= hull_area <= high * cell_area and areas[k] < settings.rim_solidity * hull_area:
            cv2.fillConvexPoly(out[y:y + h, x:x + w], hull, 1)
    return out > 0


def _round_convex(region: np.ndarray, settings) -> bool:
    """Whether a hole is shaped like a pale centre: convex and round (see :func:`_fill_pale_centres`)."""
    import cv2

    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = max(contours, key=cv2.contourArea)
    inner, hull = cv2.contourArea(outline), cv2.contourArea(cv2.convexHull(outline))
    perimeter = cv2.arcLength(outline, True)
    return bool(hull > 0 and perimeter > 0 and inner / hull >= settings.pale_centre_solidity
                and 4 * np.pi * inner / perimeter**2 >= settings.pale_centre_roundness)


def _object_radius(distance: np.ndarray, mask: np.ndarray) -> float:
    """The median, over the taller half of the objects of ``mask``, of each one's peak distance."""
    import cv2

    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if count < 2:
        return 0.0
    # An object's peak is a local maximum (objects are 8-connected, so apart by background),
    # and local maxima are few.
    top = (distance >= 2.0) & (distance >= cv2.dilate(distance, np.ones((3, 3), np.uint8)))
    peaks = np.zeros(count)
    np.maximum.at(peaks, labels[top], distance[top])
    peaks = np.sort(peaks[1:][peaks[1:] >= 2.0])
    return float(np.median(peaks[len(peaks) // 2:])) if len(peaks) else 0.0


def _hulls(mask: np.ndarray, largest: float) -> np.ndarray:
    """``mask`` with each object whose convex hull is smaller than ``largest`` pixels filled out
    to it (at most :data:`_MAX_ROUND_HOLES` objects, the largest first)."""
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    out = mask.astype(np.uint8).copy()
    areas = stats[1:, cv2.CC_STAT_AREA]
    chosen = np.flatnonzero((areas >= 20) & (areas < largest))
    for k in chosen[np.argsort(-areas[chosen])][:_MAX_ROUND_HOLES]:
        x, y, w, h = stats[k + 1, :4]
        contours, _ = cv2.findContours((labels[y:y + h, x:x + w] == k + 1).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        hull = cv2.convexHull(np.concatenate(contours))
        if cv2.contourArea(hull) < largest:  # an arc along the field of view's edge spans it all
            cv2.fillConvexPoly(out[y:y + h, x:x + w], hull, 1)
    return out > 0


def _fill_pale_centres(mask, density, threshold, cell_area, settings, largest: float | None = None,
                       round_only: bool = False):
    """Fill the holes that are the pale centres of cells, not the plasma enclosed by a clump.

    A pale centre is smaller than ``pale_centre_area`` cells and still stained a little
    (density above ``pale_centre_stain`` of the threshold), or tiny, or round and convex
    whatever its stain (the clear centre of a hypochromic or target cell, inside a thin rim):
    plasma enclosed by a ring of touching cells is as clear as the background but bounded by
    their curves, so concave. Round holes larger than ``largest`` (default: ``cell_area``)
    are left open. With ``round_only``, only round convex holes are filled (in a rough mask,
    the plasma enclosed where cells touch is small, and looks stained with their blurred rims
    about it).
    """
    import cv2

    labels, count = _holes(mask)
    if count == 0:
        return mask
    flat = labels.ravel()
    area = np.bincount(flat, minlength=count + 1)[1:]
    mean = np.bincount(flat, weights=density.ravel(), minlength=count + 1)[1:] / area
    stained = (mean > settings.pale_centre_stain * threshold) & (area < settings.pale_centre_area * cell_area)
    stained |= area < settings.tiny_hole_area * cell_area
    if round_only:
        stained[:] = False
    largest = cell_area if largest is None else largest
    candidates = np.flatnonzero(~stained & (area >= max(12, settings.tiny_hole_area * cell_area)) & (area < largest))
    if len(candidates):
        boxes = _boxes(labels)
        for k in candidates[:_MAX_ROUND_HOLES]:
            stained[k] |= _round_convex(labels[boxes[k]] == k + 1, settings)
    keep = np.zeros(count + 1, bool)
    keep[1:] = stained
    return mask | keep[labels]


_MAX_ROUND_HOLES = 20000
"""Holes whose shape is measured per field at most (bounds the time on a noise image)."""


def _watershed(relief: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """scikit-image's 4-connected marker watershed, called through its compiled kernel.

    ``skimage.segmentation.watershed`` imports all of SciPy, a slower import than the rest of
    a one-field screen's start-up, only to prepare the kernel's arguments; they are prepared
    here the same way. Where the kernel is missing or its signature differs, the public
    function runs instead.
    """
    try:
        from skimage.segmentation._watershed_cy import watershed_raveled
    except ImportError:
        watershed_raveled = None
    if watershed_raveled is not None:
        image = np.pad(relief.astype(np.float64), 1)
        output = np.pad((markers * mask).astype(np.int32), 1)
        stride = image.shape[1]
        try:
            watershed_raveled(image.ravel(), np.flatnonzero(output), np.array([-stride, -1, 1, stride], np.intp),
                              np.pad(mask, 1).astype(np.int8).ravel(), np.array([stride, 1], np.intp), 0.0,
                              output.ravel(), False)
            return output[1:-1, 1:-1].copy()
        except (TypeError, ValueError):
            pass
    from skimage.segmentation import watershed

    return watershed(relief, markers, mask=mask)


def _split(distance: np.ndarray, mask: np.ndarray, radius: float, settings) -> np.ndarray:
    import cv2

    count, components, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    min_distance, threshold = max(2, int(settings.seed_spacing * radius)), settings.seed_height * radius
    markers = np.zeros(mask.shape, np.int32)
    n = 0
    for label in range(1, count):
        x, y, w, h = stats[label, :4]
        window = (slice(y, y + h), slice(x, x + w))
        peaks = _peaks(distance[window], min_distance, threshold, components[window] == label)
        markers[peaks[:, 0] + y, peaks[:, 1] + x] = np.arange(n + 1, n + 1 + len(peaks))
        n += len(peaks)
    labels = _watershed(-distance, markers, mask)
    # Components without a peak tall enough (specks) keep a label of their own.
    unlabelled = mask & (labels == 0)
    if unlabelled.any():
        _, extra = cv2.connectedComponents(unlabelled.astype(np.uint8), connectivity=4)
        labels[unlabelled] = extra[unlabelled] + labels.max()
    return labels.astype(np.int32)


def _merge_convex(labels: np.ndarray, radius: float, settings, max_pairs: int = 5000) -> np.ndarray:
    """Join touching watershed pieces whose union has no notch: a long cell (an elliptocyte)
    has a ridge of distance peaks and is cut across it, while cells that merely touch or
    overlap meet in a notch where their outlines cross. Pieces of at least ``platelet_area``
    cells whose union is at most ``split_area`` + 1 cells are tried, the first ``max_pairs``
    of them at most (the cost stays bounded on noise)."""
    horizontal = (labels[:, :-1], labels[:, 1:])
    vertical = (labels[:-1, :], labels[1:, :])
    pairs = []
    for a, b in (horizontal, vertical):
        touching = (a != b) & (a > 0) & (b > 0)
        pairs.append(np.column_stack([np.minimum(a[touching], b[touching]), np.maximum(a[touching], b[touching])]))
    pairs = np.unique(np.concatenate(pairs), axis=0)
    if not len(pairs):
        return labels
    cell_area = np.pi * radius**2
    areas = np.bincount(labels.ravel())
    small, union = areas[pairs].min(axis=1), areas[pairs].sum(axis=1)
    pairs = pairs[(small >= settings.platelet_area * cell_area) & (union <= (settings.split_area + 1) * cell_area)]
    pairs = pairs[:max_pairs]
    if not len(pairs):
        return labels
    slices = _boxes(labels)
    parent = np.arange(len(areas))

    def root(k):
        while parent[k] != k:
            k = parent[k]
        return k

    labels = labels.copy()
    for a, b in pairs:
        a, b = root(a), root(b)
        if a == b or slices[a - 1] is None or slices[b - 1] is None:
            continue
        (ya, xa), (yb, xb) = slices[a - 1], slices[b - 1]
        window = (slice(min(ya.start, yb.start), max(ya.stop, yb.stop)),
                  slice(min(xa.start, xb.start), max(xa.stop, xb.stop)))
        patch = labels[window]
        region = (patch == a) | (patch == b)
        if region.sum() > (settings.split_area + 1) * cell_area or _notch(region) >= settings.clump_notch * radius:
            continue
        patch[patch == b] = a
        parent[b] = a
        slices[a - 1] = window
        slices[b - 1] = None
    return labels


def _split_clumps(labels: np.ndarray, distance: np.ndarray, radius: float, settings) -> np.ndarray:
    """Split regions of several overlapping cells that the distance transform left whole.

    Overlapping cells form one convex blob with a single distance peak. Such a region, far
    larger than a cell and far from a disc (an enlarged infected cell is one round cell and
    stays whole), is divided into as many compact parts as the cells its area holds (k-means
    on its pixel positions), each a cell's share.
    """
    import cv2

    areas = np.bincount(labels.ravel())
    areas[0] = 0
    cell_area = _typical_area(areas[1:], radius, settings.elongated_ratio)
    big = np.flatnonzero(areas > settings.split_area * cell_area)
    if len(big) == 0:
        return labels
    labels = labels.copy()
    next_label = int(labels.max()) + 1
    slices = _boxes(labels)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
    cv2.setRNGSeed(0)
    for label in big:
        window = slices[label - 1]
        region = labels[window] == label
        if areas[label] < settings.disc_ratio * np.pi * distance[window][region].max() ** 2:  # a disc: one cell, however large
            continue
        if _notch(region) < settings.clump_notch * radius:  # convex all round: one elongated cell
            continue
        ys, xs = np.nonzero(region)
        parts = int(round(areas[label] / cell_area))
        if parts < 2:
            continue
        points = np.column_stack([xs, ys]).astype(np.float32)
        _, assigned, _ = cv2.kmeans(points, parts, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
        assigned = assigned.ravel()
        new = np.where(assigned == 0, label, next_label + assigned - 1)
        patch = labels[window]
        patch[ys, xs] = new
        next_label += parts - 1
    return labels


def _typical_area(areas: np.ndarray, radius: float, elongated_ratio: float) -> float:
    """A cell's area: the disc of the inscribed radius, or, where the median object of at least
    half that holds ``elongated_ratio`` such discs or more (long cells: an elliptocyte holds
    about two), the median object's area."""
    disc = np.pi * radius**2
    sizeable = areas[areas >= 0.5 * disc]
    median = float(np.median(sizeable)) if len(sizeable) else disc
    return median if median >= elongated_ratio * disc else disc


def _notch(region: np.ndarray) -> float:
    """The deepest notch of a region's outline into its convex hull, in pixels: where
    overlapping cells meet, their outlines cross in a notch; an elongated cell has none."""
    import cv2

    contours, _ = cv2.findContours(np.pad(region, 1).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = max(contours, key=cv2.contourArea)
    hull = cv2.convexHull(outline, returnPoints=False)
    if len(outline) < 4 or len(hull) < 3:
        return 0.0
    try:
        defects = cv2.convexityDefects(outline, np.sort(hull, axis=0))
    except cv2.error:  # a self-touching outline
        return float("inf")
    if defects is None or not len(defects):
        return 0.0
    return float(np.asarray(defects).reshape(-1, 4)[:, 3].max()) / 256


def _black(image: np.ndarray, plasma: np.ndarray, ink_level: float) -> np.ndarray:
    """Pixels dark in every channel against the plasma: ink, not stain (Giemsa's darkest purple
    still lets the red and blue through)."""
    brightest = _brightest(image)
    reference = float(np.median(brightest[plasma])) if plasma.any() else 255.0
    return brightest < ink_level * reference


def _sort_objects(labels, density, black, fov, radius, scale, size, settings) -> list[FieldObject]:
    import cv2

    width, height = size
    cell_area = np.pi * radius**2
    inner = cv2.erode(fov.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2) > 0
    inner[:2], inner[-2:], inner[:, :2], inner[:, -2:] = False, False, False, False
    cell_density = np.median(density[labels > 0]) if (labels > 0).any() else 0.3
    # White-cell nuclei: large blobs of the darkest stain. Parasites are as dark but far
    # smaller, even a gametocyte filling an enlarged cell.
    dark = (density > max(settings.nucleus_contrast * cell_density, cell_density + settings.nucleus_step)).astype(np.uint8)
    count, dark = cv2.connectedComponents(dark, connectivity=4)
    nucleus = np.bincount(dark.ravel(), minlength=count) > settings.nucleus_area * cell_area
    nucleus[0] = False
    nucleus = nucleus[dark]
    # Every per-object figure is a count (or a sum) per label, in one pass over the image each.
    n = int(labels.max()) + 1
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n).astype(float)
    rows, columns = np.indices(labels.shape, dtype=np.float64)
    centre_y = np.bincount(flat, weights=rows.ravel(), minlength=n)
    centre_x = np.bincount(flat, weights=columns.ravel(), minlength=n)
    cut = np.bincount(labels[~inner], minlength=n) > 0
    black_share = np.bincount(labels[black], minlength=n)
    nucleus_share = np.bincount(labels[nucleus], minlength=n)
    objects = []
    for label, window in enumerate(_boxes(labels), start=1):
        if window is None:
            continue
        if cut[label]:
            kind = "edge"
        elif area[label] < settings.platelet_area * cell_area:
            kind = "platelet"
        elif black_share[label] / area[label] > settings.mark_share:
            kind = "mark"
        elif nucleus_share[label] / area[label] > settings.nucleus_share:  # a white cell, or a piece holding some of its nucleus
            kind = "white_cell"
        else:
            kind = "red_cell"
        (y0, y1), (x0, x1) = (window[0].start, window[0].stop), (window[1].start, window[1].stop)
        cy, cx = centre_y[label] / area[label], centre_x[label] / area[label]
        box = (int(np.floor(x0 * scale)), int(np.floor(y0 * scale)),
               min(width, int(np.ceil(x1 * scale))), min(height, int(np.ceil(y1 * scale))))
        objects.append(FieldObject(float((cx + 0.5) * scale), float((cy + 0.5) * scale), box,
                                   float(area[label]) * scale**2, kind, label))
    # Pieces the splitting cut from a white cell share a long border with it (a red cell that
    # leans on one touches it along a short arc): they go with it.
    white = np.zeros(n, bool)
    white[[o.label for o in objects if o.kind == "white_cell"]] = True
    if white.any():
        inside = white[labels]
        ring = (cv2.dilate(inside.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0) & ~inside
        contact = np.bincount(labels[ring], minlength=n)
        for o in objects:
            perimeter = 2 * np.sqrt(np.pi * area[o.label])
            if o.kind == "red_cell" and contact[o.label] > settings.white_contact * perimeter:
                o.kind = "white_cell"
    counted = [o.area for o in objects if o.kind == "red_cell"]
    if counted:
        largest = settings.clump_cells * float(np.median(counted))
        smallest = settings.fragment_area * float(np.median(counted))
        for o in objects:
            if o.kind == "red_cell" and o.area > largest:
                o.kind = "clump"
            elif o.kind == "red_cell" and o.area < smallest:
                o.kind = "fragment"
    return objects


def _quality(density, fov, mask, objects, settings) -> dict:
    import cv2

    # Sharpness: the steepest density steps at cell borders, against the step from plasma to
    # cell. At the detection scale (cells ``working_diameter`` wide) a focused border rises
    # within a few pixels; a blurred one spreads over many.
    gx = cv2.Sobel(density, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy = cv2.Sobel(density, cv2.CV_32F, 0, 1, ksize=3) / 8
    border = mask & ~(cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)
    plasma = fov & ~mask
    focus = 0.0
    if border.any() and plasma.any():
        step = float(np.median(density[mask]) - np.median(density[plasma]))
        focus = float(np.percentile(np.hypot(gx, gy)[border], 90) / max(step, 1e-3))
    coverage = float(mask[fov].mean()) if fov.any() else 0.0
    counted = sum(o.kind == "red_cell" for o in objects)
    reasons = []
    if counted < settings.min_cells:
        reasons.append(f"too few cells ({counted})")
    if coverage > settings.max_coverage:
        reasons.append(f"too dense ({coverage:.0%} of the field covered)")
    if counted and focus < settings.focus_floor:
        reasons.append(f"out of focus (sharpness {focus:.2f}, below {settings.focus_floor})")
    return {"ok": not reasons, "reasons": reasons, "focus": round(focus, 4), "coverage": round(coverage, 4)}
