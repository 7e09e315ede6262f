"""Whether a field can be read at all, and why not.

A screening tool may say "I cannot read this"; it must not give a confident answer about an
image it was never made for. Each check measures what the detector already sees, against a
limit stated in :class:`ApplicabilityLimits`:

- **colour**: a Giemsa smear is a colour image; a grayscale one hides the stain that tells a
  parasite from a cell;
- **magnification**: the cells must be large enough in the image for a parasite to be seen
  (a ring's chromatin dot is about a tenth of a cell), and small enough for a field to hold
  many;
- **a stained blood smear**: red cells are darker than the plasma in red and green (in blue,
  about as dark or darker) and absorb green far more than red (pink on a pale background);
  photographs of anything else, and noise, fail this;
- **stain**: the cells' colour against the plasma (optical density, which a white-balance or
  exposure change does not move) inside the range validated on;
- **segmentation**: a field the detector cut into many fragments (cells of a shape it does not
  know) is not counted;
- **duplicates**: a field identical or nearly identical to an earlier one of the same sample
  (the same photograph twice, or re-saved) is not counted twice;
- **focus**: blur hides ring stages (a chromatin dot a tenth of a cell wide) but adds no false
  alarm, so a field softer than every field validated on still counts, and what it cannot
  support is a negative call: a sample whose fields are mostly that soft is ``review``
  rather than negative (see :meth:`~.screener.Screener.pool`);
- **glare**: where the plasma is blown out (white in most channels), every pale detail within
  the glare is lost too, a ring's faint cytoplasm first; such a field still counts (the model
  reads it through :mod:`.stain`), and, as for blur, a sample whose fields are mostly
  over-exposed or soft is not called negative.

A field that fails is listed with its reasons, not counted; a sample without enough readable
cells is ``review`` (see :mod:`.call`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields as dataclass_fields

import numpy as np

from ..errors import MalariaCellsError
from .stain import CLIPPED

__all__ = ["ApplicabilityLimits", "assess_field", "fingerprint", "same_field"]


@dataclass(frozen=True)
class ApplicabilityLimits:
    """The limits of what a field may look like to be read.

    Parameters
    ----------
    min_colour : float
        Grayscale below this: the 99th percentile, over the field, of each pixel's spread
        between its brightest and darkest channel (0-255).
    min_cell_diameter, max_cell_diameter : float
        Supported red-cell diameter, in pixels of the image as decoded (the image as stored,
        or halved, thirded... for photographs over 4,000 pixels wide). The shift suite
        validates cells of about 30 to 170 px (the shared fields' ~65 px at 0.5x to 2.5x;
        its smallest measure 29 px); smaller cells are refused with a margin, larger ones
        are read as they are.
    min_green_red, max_green_red : float
        Supported ratio of the cells' optical density (against the plasma) in the green
        channel to the red: a Giemsa- or Wright-stained red cell is pink, absorbing green.
    min_density, max_density : float
        Supported length of the cells' optical-density vector (all three channels), measured
        on the darker quarter of the cells' pixels so that pale centres do not count: the
        shared fields span 0.43 to 0.87, and the shift suite checks 0.6 to 1.6 times their
        staining; paler and darker staining than that was not validated.
    min_plasma : float
        Under-exposed below this: the plasma's brightest channel (0-255), where the stain's
        colours are lost in the dark and the sensor's noise.
    max_plasma : float
        A plasma channel (its median, 0-255) at or above this is blown out, as the stain
        normalisation takes it: no field the model was validated on reaches it (the shared
        fields' brightest plasma channel reads 249).
    blown_channels : int
        A field is over-exposed when at least this many of its plasma's channels are blown
        out (see ``min_sharpness`` for what that does to a sample's call).
    max_fragments : float
        Fragments (objects far smaller than the median cell) per counted cell above which the
        field is taken as wrongly cut into pieces.
    min_sharpness : float
        Border sharpness (the detector's ``focus``: the steepest steps at cell borders against
        the plasma-to-cell step, at a 32 px cell) below which a field is softer than every field
        the field model was validated on (the shared IML fields read 0.35 to 0.55, the NIH
        phone photographs 0.32 to 0.34). A sample whose good fields are mostly below it, or
        over-exposed, is not called negative.
    duplicate_correlation : float
        Two fields of a sample whose 64x64 grey thumbnails correlate at least this much are
        the same field (a photograph re-saved at JPEG quality 60, or at half size: 0.9999;
        two fields of one smear: about 0; two drawn fields of cells on the same grid: 0.96).
    """

    min_colour: float = 4.0
    min_cell_diameter: float = 25.0
    max_cell_diameter: float = 300.0
    min_green_red: float = 1.1
    max_green_red: float = 6.0
    min_density: float = 0.2
    max_density: float = 1.5
    min_plasma: float = 60.0
    max_plasma: float = CLIPPED
    blown_channels: int = 2
    max_fragments: float = 0.25
    min_sharpness: float = 0.30
    duplicate_correlation: float = 0.99

    def __post_init__(self):
        for item in dataclass_fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise MalariaCellsError(f"applicability limit {item.name} must be a number >= 0, got {value!r}")
        if self.min_cell_diameter >= self.max_cell_diameter or self.min_green_red >= self.max_green_red \
                or self.min_density >= self.max_density:
            raise MalariaCellsError("applicability limits: each minimum must be below its maximum")


def assess_field(image: np.ndarray, detection, limits: ApplicabilityLimits | None = None) -> dict:
    """Measure a field against ``limits``.

    Parameters
    ----------
    image : numpy.ndarray
        The field, uint8 RGB, as the detector saw it.
    detection : FieldDetection
        What the detector found in it.

    Returns
    -------
    dict
        ``{"applicable": bool, "reasons": [...], "flags": [...], "measures": {...}}``: a
        sentence per failed check, a short name per failed check (``grayscale``,
        ``magnification``, ``no_cells``, ``exposure``, ``not_a_smear``, ``stain``,
        ``fragments``) and every measure.
    """
    from ..images import resize

    limits = limits or ApplicabilityLimits()
    reasons, flags, measures = [], [], {}

    def fail(flag, reason):
        flags.append(flag)
        reasons.append(reason)

    spread = _percentile_spread(image)
    measures["colour"] = round(spread, 1)
    if spread < limits.min_colour:
        fail("grayscale", f"grayscale image (no colour to tell the stain by; colour spread {spread:.0f} of 255, "
                          f"at least {limits.min_colour:.0f} needed): photograph in colour")
    diameter = float(detection.cell_diameter)
    measures["cell_diameter"] = round(diameter, 1)
    if not any(o.kind == "red_cell" for o in detection.objects):
        pass  # no cell to measure: the diameter is the detector's fallback
    elif diameter < limits.min_cell_diameter:
        fail("magnification", f"cells about {diameter:.0f} px across, too small to see parasites (at least "
                              f"{limits.min_cell_diameter:.0f} px): use a higher magnification or resolution")
    elif diameter > limits.max_cell_diameter:
        fail("magnification", f"cells about {diameter:.0f} px across (at most {limits.max_cell_diameter:.0f} px "
                              "supported): use a lower magnification")
    cells = [o for o in detection.objects if o.kind == "red_cell"]
    if not cells:
        fail("no_cells", "no red cells found: not a blood smear, an empty area, or far out of focus")
    fragments = sum(o.kind == "fragment" for o in detection.objects)
    measures["fragments_per_cell"] = round(fragments / max(1, len(cells)), 3)
    if cells and fragments > limits.max_fragments * len(cells):
        fail("fragments", f"{fragments} fragments for {len(cells)} cells: the cells were cut into pieces "
                          "(an unusual cell shape or stain)")
    labels = detection.labels
    if cells and "grayscale" not in flags:
        small = resize(image, (labels.shape[1], labels.shape[0])) if image.shape[:2] != labels.shape else image
        inside = np.zeros(int(labels.max()) + 1, bool)
        inside[[o.label for o in cells]] = True
        cell_pixels = small[inside[labels]]
        plasma = labels == 0
        if detection.field_of_view is not None:
            plasma &= detection.field_of_view
        background = np.median(small[plasma].reshape(-1, 3), axis=0) if plasma.any() else None
        density = _density(cell_pixels, small[plasma]) if plasma.any() else None
        if density is None:
            fail("not_a_smear", "no plasma between the cells: not a thin blood smear")
        else:
            # the darker quarter of the cells' pixels: pale centres (target, hypochromic cells)
            # do not make a normally stained slide read pale
            strength = float(np.linalg.norm(_density(cell_pixels, small[plasma], percentile=25)))
            ratio = float(density[1] / density[0]) if density[0] > 0 else float("inf")
            measures.update(density=[round(float(v), 4) for v in density], density_strength=round(strength, 3),
                            green_red=round(ratio, 2) if np.isfinite(ratio) else None,
                            plasma=[round(float(v), 1) for v in background])
            clipped = background >= limits.max_plasma  # a channel blown out in the plasma measures no density
            measures["blown_channels"] = int(clipped.sum())
            if background.max() < limits.min_plasma:
                fail("exposure", f"under-exposed (the plasma's brightest channel is {background.max():.0f} of 255, "
                                 f"at least {limits.min_plasma:.0f} needed): more light or a longer exposure")
            elif strength < limits.min_density and clipped.sum() >= limits.blown_channels:
                # the glare, not the stain: the cells' density is measured against a white it cannot exceed
                fail("exposure", f"over-exposed (the plasma is blown out in {int(clipped.sum())} of 3 channels and "
                                 f"the cells read {strength:.2f} dense): less light or a shorter exposure")
            elif (density[0] <= 0 and not clipped[0]) or density[1] <= 0 or density[2] < -0.1:
                fail("not_a_smear", "the objects found are not darker than the background in red and green: "
                                    "not a stained blood smear")
            elif not clipped[0] and not limits.min_green_red <= ratio <= limits.max_green_red:
                fail("not_a_smear", f"the objects found are not coloured like stained red cells (green/red "
                                    f"density {ratio:.2f}, {limits.min_green_red}-{limits.max_green_red} expected): "
                                    "not a Giemsa- or Wright-stained blood smear")
            elif not limits.min_density <= strength <= limits.max_density:
                word = "paler" if strength < limits.min_density else "darker"
                fail("stain", f"staining {word} than validated (cell density {strength:.2f}, "
                              f"{limits.min_density}-{limits.max_density} validated)")
    return {"applicable": not flags, "reasons": reasons, "flags": flags, "measures": measures}


def _percentile_spread(image: np.ndarray) -> float:
    """The 99th percentile of each pixel's channel spread, on a subsample of at most ~250k pixels."""
    step = max(1, int(np.sqrt(image.shape[0] * image.shape[1] / 250_000)))
    sample = image[::step, ::step].astype(np.int16)
    spread = (sample.max(axis=2) - sample.min(axis=2)).ravel()
    return float(np.percentile(spread, 99))


def _density(cells: np.ndarray, plasma: np.ndarray, percentile: float = 50) -> np.ndarray:
    """Optical density of the cells' pixels (their ``percentile``-th brightest per channel:
    the median by default) against the plasma's median, per channel."""
    reference = np.maximum(np.median(plasma.reshape(-1, 3), axis=0), 1.0)
    return -np.log(np.maximum(np.percentile(cells.reshape(-1, 3), percentile, axis=0), 1.0) / reference)


def fingerprint(image: np.ndarray) -> np.ndarray:
    """A field's fine detail on a 64x64 thumbnail, zero-mean and unit-length: two photographs
    of the same field (re-saved, recompressed, rescaled) correlate near 1, two fields of a
    smear near 0. Only the inside of the lit field of view counts (the black surround of a
    photograph through a fixed eyepiece, and its edge, are the same in every field), and only
    detail finer than an eighth of the field (not the lamp's unevenness)."""
    import cv2

    from ..images import resize

    grey = resize(image, (64, 64)).astype(np.float32).mean(axis=2)
    coarse = cv2.GaussianBlur(grey, (0, 0), 4)
    lit = coarse > 0.5 * float(coarse.max())
    lit = cv2.erode(lit.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    detail = np.where(lit, grey - coarse, 0.0).astype(np.float64).ravel()
    detail[lit.ravel()] -= detail[lit.ravel()].mean() if lit.any() else 0.0
    norm = np.linalg.norm(detail)
    return detail / norm if norm > 0 else detail


def same_field(print_a: np.ndarray, print_b: np.ndarray, limits: ApplicabilityLimits | None = None) -> bool:
    """Whether two fingerprints are of the same field."""
    limits = limits or ApplicabilityLimits()
    if not np.any(print_a) or not np.any(print_b):
        return False
    return float(print_a @ print_b) >= limits.duplicate_correlation
