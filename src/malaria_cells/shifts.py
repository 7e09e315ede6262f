"""How another lab's fields differ: stain, colour, exposure, optics, camera and magnification shifts.

Each shift is a small function ``shift(image, strength, rng=None, ...)`` on a uint8 RGB
``(height, width, 3)`` array that returns a new uint8 RGB array; ``rng`` (a
:class:`numpy.random.Generator`) is used only by the shifts that are random (noise, the
replacement images) and accepted by all, so a training loop can call any of them alike. At the
neutral strength (1 for factors, 0 for offsets and sigmas) each returns the image unchanged.
:data:`RANGES` holds the ranges the shift suite (``benchmarks/shift_suite.py``) tests, which are
also the ranges meant for augmentation.

The images a screen must refuse (a grayscale image, a thumbnail, noise, a photograph of
something else) are made by :func:`grayscale`, :func:`downscale`, :func:`noise_image` and
:func:`non_smear`; :func:`make_morphology_field` draws fields of red cells of unusual shapes
(target, hypochromic, elliptocytes, stomatocytes), with many platelets, or lying on one another,
and returns where every cell is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

__all__ = ["RANGES", "stain", "hue", "saturation", "exposure", "gamma", "white_balance", "defocus", "jpeg",
           "gaussian_noise", "resample", "scale_truth", "grayscale", "downscale", "noise_image", "non_smear",
           "DrawnCell", "MORPHOLOGIES", "make_morphology_field"]

RANGES = {
    "stain": (0.6, 1.6),            # optical density of each stain (H, E, D) x
    "hue": (-15.0, 15.0),           # degrees
    "saturation": (0.6, 1.4),       # x
    "exposure": (0.5, 2.0),         # x light, in linear light, clipped at white
    "gamma": (0.7, 1.4),
    "white_balance": (0.85, 1.15),  # gain of each channel, in linear light
    "defocus": (0.0, 1.5),          # Gaussian sigma, pixels at a 32 px cell
    "jpeg": (40, 95),               # quality
    "gaussian_noise": (0.0, 8.0),   # sigma, of 255
    "resample": (0.5, 2.5),         # x magnification
}
"""The range of each shift's strength, as tested by the shift suite."""

PLASMA = np.array([236.0, 228.0, 222.0])
"""Plasma (background) colour of the drawn fields, as :func:`malaria_cells.synthetic.make_field`."""
CELL = np.array([214.0, 150.0, 160.0])
PLATELET = np.array([150.0, 90.0, 170.0])


def _check(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"a uint8 RGB (height, width, 3) image expected, got {image.dtype} {image.shape}")
    return image


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _triple(strength, name: str) -> np.ndarray:
    values = np.broadcast_to(np.asarray(strength, np.float64), (3,)).copy()
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"{name}: non-negative finite strengths expected, got {strength}")
    return values


def stain(image: np.ndarray, strength: float | Sequence[float] = 1.0, rng: np.random.Generator | None = None, *,
          white: Sequence[float] | None = None) -> np.ndarray:
    """Stronger or weaker staining: the optical density of each stain scaled.

    Colour deconvolution with scikit-image's haematoxylin-eosin-DAB stain vectors
    (``skimage.color.hed_from_rgb`` / ``rgb_from_hed``, those of ``rgb2hed`` and ``hed2rgb``):
    the optical density of each pixel against the illumination is split into the three stains,
    each is multiplied by its strength and the colour rebuilt. Unlike ``rgb2hed``, negative
    stain amounts are kept (Giemsa's purple and pink lie partly outside the H-E-DAB cone, and
    clipping them changes nearly every pixel of a smear even at strength 1), so strength 1
    returns the image.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 RGB ``(height, width, 3)``.
    strength : float or sequence of 3 floats
        Factor on the optical density of all stains, or of (H, E, D) each; 1 leaves the image
        unchanged, above 1 stains darker. Tested range :data:`RANGES` ``["stain"]``.
    rng : numpy.random.Generator, optional
        Not used (the shift is deterministic).
    white : sequence of 3 floats, optional
        The illumination (plasma-free light) per channel; default the 99th percentile of each
        channel, so the bright background keeps its colour.

    Returns
    -------
    numpy.ndarray
        uint8 RGB, the shape of ``image``.
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    image = _check(image)
    factors = _triple(strength, "stain")
    if np.all(factors == 1):
        return image.copy()
    pixels = image.astype(np.float32)
    if white is None:
        white = np.percentile(image[::4, ::4].reshape(-1, 3), 99, axis=0)
    white = np.maximum(np.asarray(white, np.float32), 1.0)
    density = -np.log(np.clip(np.maximum(pixels, 0.5) / white, None, 1.0))  # 0 at or above the illumination
    change = ((density @ hed_from_rgb.astype(np.float32)) * (factors - 1).astype(np.float32)) @ rgb_from_hed.astype(np.float32)
    return _to_uint8(pixels * np.exp(-change))


def _hsv(image: np.ndarray):
    import cv2

    return cv2.cvtColor(image.astype(np.float32) / 255, cv2.COLOR_RGB2HSV)  # H in degrees, S and V 0-1


def _rgb(hsv: np.ndarray) -> np.ndarray:
    import cv2

    return _to_uint8(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255)


def hue(image: np.ndarray, degrees: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Hue rotated by ``degrees`` (OpenCV's HSV), as another stain batch or camera tints a smear.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 RGB ``(height, width, 3)``.
    degrees : float
        Added to every pixel's hue; 0 leaves the image unchanged. Tested range :data:`RANGES` ``["hue"]``.
    rng : numpy.random.Generator, optional
        Not used.

    Returns
    -------
    numpy.ndarray
        uint8 RGB.
    """
    image = _check(image)
    if degrees == 0:
        return image.copy()
    hsv = _hsv(image)
    hsv[..., 0] = np.mod(hsv[..., 0] + degrees, 360.0)
    return _rgb(hsv)


def saturation(image: np.ndarray, factor: float = 1.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Saturation multiplied by ``factor`` (OpenCV's HSV, clipped at full saturation).

    Parameters
    ----------
    image : numpy.ndarray
        uint8 RGB ``(height, width, 3)``.
    factor : float
        1 leaves the image unchanged, 0 makes it grey. Tested range :data:`RANGES` ``["saturation"]``.
    rng : numpy.random.Generator, optional
        Not used.

    Returns
    -------
    numpy.ndarray
        uint8 RGB.
    """
    image = _check(image)
    if factor == 1:
        return image.copy()
    hsv = _hsv(image)
    hsv[..., 1] = np.clip(hsv[..., 1] * factor, 0, 1)
    return _rgb(hsv)


def _srgb_to_linear(values: np.ndarray) -> np.ndarray:
    return np.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(values: np.ndarray) -> np.ndarray:
    values = np.clip(values, 0, 1)
    return np.where(values <= 0.0031308, 12.92 * values, 1.055 * values ** (1 / 2.4) - 0.055)


def _linear_gains(image: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Each channel's light multiplied in linear light (sRGB transfer), clipped at white: one
    lookup table per channel (``cv2.LUT``)."""
    import cv2

    levels = _srgb_to_linear(np.arange(256) / 255)
    table = np.stack([_to_uint8(_linear_to_srgb(levels * gain) * 255) for gain in gains], axis=-1)
    return cv2.LUT(np.ascontiguousarray(image), table.reshape(256, 1, 3))


def exposure(image: np.ndarray, factor: float = 1.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Brighter or darker exposure: the light multiplied by ``factor``, clipped as a sensor saturates.

    The factor applies in linear light (the image's values are taken as sRGB-encoded, as a
    camera writes them): x2 is one stop more light, which raises a mid-grey value by about
    x1.37 and saturates everything that was above about half of white.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 RGB ``(height, width, 3)``.
    factor : float
        Light multiplier; 1 leaves the image unchanged. Tested range :data:`RANGES` ``["exposure"]``.
    rng : numpy.random.Generator, optional
        Not used.

    Returns
    -------
    numpy.ndarray
        uint8 RGB.
    """
    image = _check(image)
    if factor == 1:
        return image.copy()
    return _linear_gains(image, _triple(factor, "exposure"))


def white_balance(image: np.ndarray, gains: float | Sequence[float] = 1.0,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Another white balance: each channel's light multiplied by its gain (linear light, clipped).

    Parameters
    ----------
    image : numpy.ndarray
        uint8 RGB ``(height, width, 3)``.
    gains : float or sequence of 3 floats
        Gains of (R, G, B); 1 leaves the image unchanged. Tested range :data:`RANGES`
        ``["white_balance"]`` per channel, e.g. ``(1.15, 1, 0.85)`` for a warm lamp.
    rng : numpy.random.Generator, optional
        Not used.

    Returns
    -------
    numpy.ndarray
        uint8 RGB.
    """
    image = _check(image)
    gains = _triple(gains, "white_balance")
    if np.all(gains == 1):
        return image.copy()
    return _linear_gains(image, gains)


def gamma(image: np.ndarray, value: float = 1.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Another tone curve: ``255 * (image / 255) ** value`` (``skimage.exposure.adjust_gamma``).

    Parameters
    ----------
    image : numpy.ndarray
        uint8 RGB ``(height, width, 3)``.
    value : float
        The exponent; below 1 brightens the mid-tones, 1 leaves the image unchanged. Tested range
        :data:`RANGES` ``["gamma"]``.
    rng : numpy.random.Generator, optional
        Not used.

    Returns
    -------
    numpy.ndarray
        uint8 RGB.
    """
    from skimage.exposure import adjust_gamma

    image = _check(image)
    if value == 1:
        return image.copy()
    return adjust_gamma(image, value).astype(np.uint8)


def defocus(image: np.ndarray, sigma: float = 0.0, rng: np.random.Generator | None = None, *,
            cell_diameter: float = 32.0) -> np.ndarray:
    """Out of focus: a Gaussian blur (``cv2.GaussianBlur``) whose width is given at a 32 px cell.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 RGB ``(height, width, 3)``.
    sigma : float
        Blur sigma in pixels of an image whose red cells are 32 px across; 0 leaves the image
        unchanged. Tested range :data:`RANGES` ``["defocus"]``.
    rng : numpy.random.Generator, optional
        Not used.
    cell_diameter : float
        The red-cell diameter of ``image`` in pixels; the blur applied is
        ``sigma * cell_diameter / 32`` pixels.

    Returns
    -------
    numpy.ndarray
        uint8 RGB.
    """
    import cv2

    image = _check(image)
    width = float(sigma) * float(cell_diameter) / 32.0
    if width <= 0:
        return image.copy()
    return cv2.GaussianBlur(image, (0, 0), sigmaX=width, sigmaY=width, borderType=cv2.BORDER_REFLECT)


def jpeg(image: np.ndarray, quality: int = 95, rng: np.random.Generator | None = None) -> np.ndarray:
    """The image after a JPEG round trip at ``quality`` (OpenCV's libjpeg, 4:2:0 chroma).

    Parameters
    ----------
    image : numpy.ndarray
        uint8 RGB ``(height, width, 3)``.
    quality : int
        JPEG quality 1-100 (100 still loses a little). Tested range :data:`RANGES` ``["jpeg"]``.
    rng : numpy.random.Generator, optional
        Not used.

    Returns
    -------
    numpy.ndarray
        uint8 RGB, decoded.
    """
    import cv2

    image = _check(image)
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return np.ascontiguousarray(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])


def gaussian_noise(image: np.ndarray, sigma: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Sensor noise: independent Gaussian noise of ``sigma`` (of 255) on every value, clipped.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 RGB ``(height, width, 3)``.
    sigma : float
        Standard deviation in 0-255 units; 0 leaves the image unchanged. Tested range
        :data:`RANGES` ``["gaussian_noise"]``.
    rng : numpy.random.Generator, optional
        Source of the noise (default: a fresh unseeded one).

    Returns
    -------
    numpy.ndarray
        uint8 RGB.
    """
    image = _check(image)
    if sigma <= 0:
        return image.copy()
    rng = np.random.default_rng() if rng is None else rng
    return _to_uint8(image + rng.normal(0.0, float(sigma), image.shape).astype(np.float32))


def resample(image: np.ndarray, factor: float = 1.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Another magnification: the image resized by ``factor`` (``cv2.resize``; area averaging
    to shrink, bicubic to enlarge).

    The new size is ``round(width * factor)`` by ``round(height * factor)`` (at least 1 px);
    annotated coordinates follow with :func:`scale_truth`.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 RGB ``(height, width, 3)``.
    factor : float
        Scale; 1 leaves the image unchanged. Tested range :data:`RANGES` ``["resample"]``.
    rng : numpy.random.Generator, optional
        Not used.

    Returns
    -------
    numpy.ndarray
        uint8 RGB ``(round(height * factor), round(width * factor), 3)``.
    """
    import cv2

    image = _check(image)
    if factor <= 0:
        raise ValueError(f"resample: a positive factor expected, got {factor}")
    height, width = image.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    if size == (width, height):
        return image.copy()
    method = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, size, interpolation=method)


def scale_truth(cells, factor_x: float, factor_y: float | None = None) -> list:
    """Annotated cells (:class:`malaria_cells.fields.truth.TruthCell`) moved to an image resized by
    ``factor_x`` (and ``factor_y``, default the same): centres and widths scaled, copies returned."""
    factor_y = factor_x if factor_y is None else factor_y
    return [replace(cell, x=cell.x * factor_x, y=cell.y * factor_y,
                    width=None if cell.width is None else cell.width * (factor_x + factor_y) / 2) for cell in cells]


def grayscale(image: np.ndarray, strength: float = 1.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """A grayscale image (luma, ``cv2.COLOR_RGB2GRAY``) in three equal channels.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 RGB ``(height, width, 3)``.
    strength : float
        Fraction of the grey image mixed in: 1 grey (three equal channels), 0 unchanged.
    rng : numpy.random.Generator, optional
        Not used.

    Returns
    -------
    numpy.ndarray
        uint8 RGB.
    """
    import cv2

    image = _check(image)
    grey = np.repeat(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    if strength >= 1:
        return grey
    return _to_uint8((1 - strength) * image.astype(np.float32) + strength * grey)


def downscale(image: np.ndarray, factor: float = 8.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """A thumbnail: the image shrunk ``factor`` times on each side (:func:`resample` by ``1 / factor``).

    Parameters
    ----------
    image : numpy.ndarray
        uint8 RGB ``(height, width, 3)``.
    factor : float
        How many times smaller; 1 leaves the image unchanged.
    rng : numpy.random.Generator, optional
        Not used.

    Returns
    -------
    numpy.ndarray
        uint8 RGB, about ``1 / factor`` of each side.
    """
    return resample(image, 1.0 / factor)


def noise_image(image: np.ndarray, strength: float = 1.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Noise in place of the picture: uniform random values, mixed in at ``strength``.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 RGB ``(height, width, 3)``; with ``strength`` 1 only its shape is used.
    strength : float
        Fraction of noise: 1 pure noise, 0 unchanged.
    rng : numpy.random.Generator, optional
        Source of the noise (default: a fresh unseeded one).

    Returns
    -------
    numpy.ndarray
        uint8 RGB.
    """
    image = _check(image)
    rng = np.random.default_rng() if rng is None else rng
    noise = rng.integers(0, 256, image.shape, dtype=np.uint8)
    if strength >= 1:
        return noise
    return _to_uint8((1 - strength) * image.astype(np.float32) + strength * noise)


NON_SMEAR_KINDS = ("scene", "astronaut", "coffee", "chelsea")


def _scene(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A drawn outdoor photograph: a sky gradient, sun, hills, a house and a few round things."""
    import cv2

    rows = np.linspace(0, 1, height)[:, None, None]
    picture = (np.array([70, 130, 210]) * (1 - rows) + np.array([200, 225, 245]) * rows) * np.ones((1, width, 1))
    picture = np.ascontiguousarray(picture.astype(np.uint8))
    unit = min(height, width)
    cv2.circle(picture, (int(0.8 * width), int(0.2 * height)), int(0.08 * unit), (255, 230, 120), -1, cv2.LINE_AA)
    xs = np.arange(width)
    hills = (0.65 * height + 0.06 * height * np.sin(xs / width * 2 * np.pi * rng.uniform(1, 3) + rng.uniform(0, 6))).astype(int)
    for x, top in zip(xs, hills):
        picture[top:, x] = (60, 140, 60)
    x0, y0, side = int(0.2 * width), int(0.5 * height), int(0.18 * unit)
    cv2.rectangle(picture, (x0, y0), (x0 + side, y0 + side), (190, 80, 60), -1)
    cv2.fillPoly(picture, [np.array([(x0 - 10, y0), (x0 + side + 10, y0), (x0 + side // 2, y0 - side // 2)], np.int32)],
                 (120, 50, 40))
    cv2.rectangle(picture, (x0 + side // 3, y0 + side // 2), (x0 + 2 * side // 3, y0 + side), (80, 50, 30), -1)
    for _ in range(12):
        centre = (int(rng.uniform(0.05, 0.95) * width), int(rng.uniform(0.7, 0.95) * height))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.circle(picture, centre, int(rng.uniform(0.02, 0.05) * unit), colour, -1, cv2.LINE_AA)
    return picture


def non_smear(image: np.ndarray, strength: float = 1.0, rng: np.random.Generator | None = None, *,
              kind: str = "scene") -> np.ndarray:
    """A photograph of something other than a smear, at the size of ``image``.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 RGB ``(height, width, 3)``; with ``strength`` 1 only its shape is used.
    strength : float
        Fraction of the photograph mixed in: 1 only the photograph, 0 unchanged.
    rng : numpy.random.Generator, optional
        Places the shapes of the drawn scene (default: seed 0).
    kind : str
        ``"scene"``: a drawn outdoor picture (sky gradient, sun, hills, house, balls);
        ``"astronaut"``, ``"coffee"`` or ``"chelsea"``: that photograph shipped in
        ``skimage.data``. Resized (``cv2.resize``) to the image's size.

    Returns
    -------
    numpy.ndarray
        uint8 RGB.
    """
    import cv2

    image = _check(image)
    height, width = image.shape[:2]
    if kind == "scene":
        picture = _scene(height, width, np.random.default_rng(0) if rng is None else rng)
    elif kind in NON_SMEAR_KINDS:
        import skimage.data

        picture = cv2.resize(np.ascontiguousarray(getattr(skimage.data, kind)()[..., :3]), (width, height),
                             interpolation=cv2.INTER_CUBIC)
    else:
        raise ValueError(f"non_smear: kind must be one of {NON_SMEAR_KINDS}, got {kind!r}")
    if strength >= 1:
        return picture
    return _to_uint8((1 - strength) * image.astype(np.float32) + strength * picture)


# --- drawn fields of red cells of unusual shapes -------------------------------------------------

MORPHOLOGIES = ("normal", "target", "hypochromic", "elliptocyte", "stomatocyte", "platelets", "overlapping")
"""Kinds of :func:`make_morphology_field`."""


@dataclass(frozen=True)
class DrawnCell:
    """A drawn red cell: an ellipse centred at ``(x, y)`` (pixels) with semi-axes ``a`` (along
    ``angle``, radians from the x axis) and ``b``, and the ``kind`` it was drawn as."""

    x: float
    y: float
    a: float
    b: float
    angle: float
    kind: str

    def distance(self, x, y):
        """Normalised elliptical distance of points from the centre: 1 on the outline."""
        dx, dy = np.asarray(x, float) - self.x, np.asarray(y, float) - self.y
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos
        return np.hypot(u / self.a, v / self.b)

    def contains(self, x, y):
        """Whether points lie inside the cell's outline."""
        return self.distance(x, y) <= 1.0


def _thickness(kind: str, d: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """How much stain a cell holds at normalised distance ``d`` (0 at the centre, 1 at the
    outline), as a fraction of a normal cell's body; ``u``, ``v`` are normalised coordinates
    along and across the cell's axis."""
    if kind == "platelet":  # evenly stained
        t = np.ones_like(d)
    elif kind == "target":  # dark rim, pale annulus, dark central spot
        t = np.where(d > 0.78, 1.1, np.where(d > 0.34, 0.28, 0.95))
    elif kind == "hypochromic":  # thin rim, large pale centre
        t = np.where(d > 0.84, 0.85, 0.12)
    elif kind == "stomatocyte":  # a slit-like pale centre
        t = np.where((np.abs(u) < 0.5) & (np.abs(v) < 0.1), 0.3, 1.0)
        t = np.where(d > 0.85, 1.08, t)
    else:  # normal (and elliptocytes): a paler centre, a slightly darker rim, as make_field
        t = 1.0 - 0.5 * np.clip((0.35 - d) / 0.35, 0, 1)
        t = np.where(d > 0.85, 1.08, t)
    return t


def _draw(density: np.ndarray, cell: DrawnCell, profile: str, colour_density: np.ndarray) -> None:
    """Add one cell's optical density to ``density`` (height, width, 3), in a window around it."""
    height, width = density.shape[:2]
    reach = int(np.ceil(max(cell.a, cell.b))) + 2
    x0, x1 = max(0, int(cell.x) - reach), min(width, int(cell.x) + reach + 1)
    y0, y1 = max(0, int(cell.y) - reach), min(height, int(cell.y) + reach + 1)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dx, dy = xx - cell.x, yy - cell.y
    cos, sin = np.cos(cell.angle), np.sin(cell.angle)
    u, v = (dx * cos + dy * sin) / cell.a, (-dx * sin + dy * cos) / cell.b
    d = np.hypot(u, v)
    inside = d < 1
    t = _thickness(profile, d, u, v) * inside
    density[y0:y1, x0:x1] += t[..., None] * colour_density


def make_morphology_field(kind: str, rng: np.random.Generator, *, size: tuple[int, int] = (1000, 760),
                          radius: float = 26.0, rows: int = 6, cols: int = 8, blur: float = 1.0,
                          noise: float = 2.5) -> tuple[np.ndarray, list[DrawnCell]]:
    """A drawn thin-smear field of red cells of one unusual shape, in the style of
    :func:`malaria_cells.synthetic.make_field` (pale plasma, pink cells), drawn in optical density
    so that cells lying on one another add their stain.

    Parameters
    ----------
    kind : str
        One of :data:`MORPHOLOGIES`:

        - ``"normal"``: round cells with a paler centre (the control);
        - ``"target"``: target cells, a dark rim, a pale annulus and a dark central spot;
        - ``"hypochromic"``: a thin rim round a large pale centre;
        - ``"elliptocyte"``: ellipses of axis ratio 2 (the area of a round cell), at random angles;
        - ``"stomatocyte"``: a slit-like pale centre (mouth-shaped), at random angles;
        - ``"platelets"``: round cells and four platelets per cell (purple specks, some in
          clumps of six), scattered over plasma and cells alike;
        - ``"overlapping"``: pairs of round cells lying on each other, centres 1.1-1.5 radii apart.
    rng : numpy.random.Generator
        Positions, sizes, angles and noise.
    size : (int, int)
        ``(width, height)``.
    radius : float
        Radius of a round cell in pixels (each drawn 0.92-1.08 times it).
    rows, cols : int
        The grid of places; each holds one cell (a pair for ``"overlapping"``).
    blur : float
        Gaussian sigma (``cv2.GaussianBlur``) of the optics, pixels.
    noise : float
        Gaussian noise sigma of 255.

    Returns
    -------
    image : numpy.ndarray
        uint8 RGB ``(height, width, 3)``.
    cells : list of DrawnCell
        Every drawn red cell (platelets are not cells), all wholly inside the image.
    """
    import cv2

    if kind not in MORPHOLOGIES:
        raise ValueError(f"kind must be one of {MORPHOLOGIES}, got {kind!r}")
    width, height = size
    density = np.zeros((height, width, 3), np.float64)
    cell_density = np.log10(PLASMA / CELL)
    step_x, step_y = width / (cols + 1), height / (rows + 1)
    cells = []
    for row in range(rows):
        for col in range(cols):
            x = step_x * (col + 1) + rng.uniform(-3, 3)
            y = step_y * (row + 1) + rng.uniform(-3, 3)
            r = radius * rng.uniform(0.92, 1.08)
            angle = rng.uniform(0, np.pi)
            if kind == "elliptocyte":
                cells.append(DrawnCell(x, y, r * np.sqrt(2), r / np.sqrt(2), angle, kind))
            elif kind == "overlapping":
                gap = r * rng.uniform(1.1, 1.5) / 2
                second = radius * rng.uniform(0.92, 1.08)
                cells.append(DrawnCell(x - gap * np.cos(angle), y - gap * np.sin(angle), r, r, 0.0, kind))
                cells.append(DrawnCell(x + gap * np.cos(angle), y + gap * np.sin(angle), second, second, 0.0, kind))
            elif kind in ("target", "hypochromic", "stomatocyte"):
                cells.append(DrawnCell(x, y, r, r, angle, kind))
            else:
                cells.append(DrawnCell(x, y, r, r, 0.0, kind))
    for cell in cells:
        profile = cell.kind if cell.kind in ("target", "hypochromic", "stomatocyte") else "normal"
        _draw(density, cell, profile, cell_density)
    if kind == "platelets":
        platelet_density = np.log10(PLASMA / PLATELET)
        spots = [(rng.uniform(0.03, 0.97) * width, rng.uniform(0.03, 0.97) * height) for _ in range(3 * len(cells))]
        for _ in range(max(1, len(cells) // 6)):  # clumps of six
            cx, cy = rng.uniform(0.05, 0.95) * width, rng.uniform(0.05, 0.95) * height
            spots += [(cx + rng.normal(0, 0.25 * radius), cy + rng.normal(0, 0.25 * radius)) for _ in range(6)]
        for sx, sy in spots:
            speck = 0.18 * radius * rng.uniform(0.8, 1.2)
            _draw(density, DrawnCell(sx, sy, speck, speck, 0.0, "platelet"), "platelet", platelet_density * 0.9)
    image = PLASMA * np.power(10.0, -density)
    if noise > 0:
        image = image + rng.normal(0, noise, image.shape)
    image = _to_uint8(image)
    if blur > 0:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=blur)
    return image, cells
