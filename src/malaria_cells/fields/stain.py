"""Stain normalisation: each field's cells brought to the colour of the cells a model learned.

Slides differ in stain strength and hue far more than in what a parasite looks like. Measured
against the field's own plasma (optical density, which exposure and white balance do not
move), a field's median red cell has a colour; :func:`normalise_crops` scales every cell crop's
optical density, channel by channel, so that median matches the ``reference`` the model
carries (the median cell of the fields it was validated on). A darker- or paler-stained slide
is then scored as if stained like those. The gains are bounded (:data:`MAX_GAIN`): a field far
outside is flagged by the stain check rather than bent into shape.

With a ``plasma_reference`` (a model trained with ``plasma_normalise`` carries one), the
crops are also rebuilt on that plasma colour, so a brighter, darker or tinted photograph of
the same slide gives the same crops; and a channel whose plasma is blown out (at least
:data:`CLIPPED`) is shifted rather than scaled. Over-exposure takes the same optical density
from every pixel of such a channel (the true plasma lies somewhere above 255), so a gain would
darken a parasite's dark chromatin by much more than the pale cell it sits in.
"""

from __future__ import annotations

import numpy as np

__all__ = ["normalise_crops", "MAX_GAIN", "CLIPPED"]

MAX_GAIN = 2.0
"""Largest factor (and smallest, its inverse) applied to any channel's optical density."""
MIN_DENSITY = 0.03
"""A channel whose median cell density is below this is left as it is."""
CLIPPED = 250.0
"""A plasma channel at or above this level (0-255) is taken as blown out."""
MAX_SHIFT = 0.7
"""Largest optical density added to or taken from a blown-out channel."""


def normalise_crops(crops: np.ndarray, plasma, density, reference, plasma_reference=None) -> np.ndarray:
    """Cell crops with their optical density scaled so the field's median cell matches ``reference``.

    Parameters
    ----------
    crops : numpy.ndarray
        uint8 ``(n, size, size, 3)``, black outside each cell (as :func:`.crops.crop_cells` cuts them).
    plasma : sequence of 3 floats
        The field's plasma colour (RGB, 0-255).
    density : sequence of 3 floats
        The field's median cell optical density against its plasma, per channel.
    reference : sequence of 3 floats
        The optical density to bring it to.
    plasma_reference : sequence of 3 floats, optional
        The plasma colour (RGB, 0-255) to rebuild the crops on; with it, blown-out channels
        are shifted rather than scaled. None: the field's own plasma, every channel scaled.

    Returns
    -------
    numpy.ndarray
        uint8, the same shape; pixels outside the cells stay black.
    """
    density, reference = np.asarray(density, np.float64), np.asarray(reference, np.float64)
    if len(crops) == 0:
        return crops
    # A channel the cells barely absorb (blue, on some slides) carries no stain to scale.
    measured = (density > MIN_DENSITY) & (reference > MIN_DENSITY)
    gain = np.where(measured, np.clip(reference / np.where(measured, density, 1.0), 1 / MAX_GAIN, MAX_GAIN), 1.0)
    shift = np.zeros(3)
    plasma = np.maximum(np.asarray(plasma, np.float32), 1.0)
    target = plasma
    if plasma_reference is not None:
        target = np.maximum(np.asarray(plasma_reference, np.float32), 1.0)
        clipped = plasma >= CLIPPED
        shift = np.where(clipped, np.clip(reference - density, -MAX_SHIFT, MAX_SHIFT), 0.0)
        gain = np.where(clipped, 1.0, gain)
    gain, shift = gain.astype(np.float32), shift.astype(np.float32)
    if np.allclose(gain, 1.0) and np.allclose(shift, 0.0) and np.allclose(target, plasma):
        return crops
    # Each channel's 256 levels map to 256 levels: a table, not a logarithm per pixel.
    levels = np.arange(256, dtype=np.float32)[:, None]
    optical = -np.log(np.maximum(levels, 1.0) / plasma)
    table = np.clip(np.rint(target * np.exp(-(optical * gain + shift))), 0, 255).astype(np.uint8)  # (256, 3)
    out = np.empty_like(crops)
    for channel in range(3):
        out[..., channel] = table[crops[..., channel], channel]
    out[crops.max(axis=-1) == 0] = 0  # outside the cells stays black
    return out
