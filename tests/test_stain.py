"""Stain normalisation of cell crops (malaria_cells.fields.stain)."""

import numpy as np

from malaria_cells.fields.stain import MAX_GAIN, normalise_crops

PLASMA = np.array([230.0, 220.0, 215.0])


def _crops(density):
    """Two 8x8 crops of a uniform cell of optical ``density`` against PLASMA, black around it."""
    colour = PLASMA * np.exp(-np.asarray(density))
    crops = np.zeros((2, 8, 8, 3), np.uint8)
    crops[:, 2:6, 2:6] = np.rint(colour)
    return crops


def _measured(crops):
    return -np.log(crops[0, 3, 3].astype(float) / PLASMA)


def test_a_paler_field_is_brought_to_the_reference_and_its_surround_stays_black():
    reference = np.array([0.25, 0.40, 0.28])
    pale = _crops(0.6 * reference)
    out = normalise_crops(pale, PLASMA, 0.6 * reference, reference)
    np.testing.assert_allclose(_measured(out), reference, atol=0.01)
    assert (out[:, :2] == 0).all() and (out[:, :, 6:] == 0).all() and out.dtype == np.uint8


def test_gains_are_bounded_and_an_unstained_channel_is_left_alone():
    reference = np.array([0.25, 0.40, 0.28])
    faint = np.array([0.05, 0.10, 0.01])  # far paler than any validated slide; blue barely absorbed
    out = normalise_crops(_crops(faint), PLASMA, faint, reference)
    measured = _measured(out)
    assert measured[1] <= MAX_GAIN * faint[1] + 0.01  # at most doubled, not quadrupled
    np.testing.assert_allclose(measured[2], _measured(_crops(faint))[2], atol=1e-9)


def test_the_reference_field_itself_is_unchanged():
    reference = np.array([0.25, 0.40, 0.28])
    crops = _crops(reference)
    assert np.array_equal(normalise_crops(crops, PLASMA, reference, reference), crops)


def _cell_with_spot(plasma, density, spot, exposure=1.0):
    """One 8x8 crop: a cell of optical ``density`` with a darker 2x2 ``spot`` (a parasite's
    chromatin), photographed against ``plasma`` at ``exposure`` times the light, clipped at 255."""
    crop = np.zeros((1, 8, 8, 3))
    crop[:, 2:6, 2:6] = plasma * np.exp(-np.asarray(density))
    crop[:, 3:5, 3:5] = plasma * np.exp(-np.asarray(spot))
    return np.clip(np.rint(crop * exposure), 0, 255).astype(np.uint8)


def test_an_over_exposed_photograph_is_rebuilt_like_the_plain_one():
    reference = np.array([0.25, 0.40, 0.28])
    spot = np.array([0.9, 1.3, 0.7])
    plain = normalise_crops(_cell_with_spot(PLASMA, reference, spot), PLASMA, reference, reference, PLASMA)
    bright = _cell_with_spot(PLASMA, reference, spot, exposure=1.3)  # every plasma channel blown out
    plasma = np.minimum(PLASMA * 1.3, 255)
    density = -np.log(bright[0, 2, 2].astype(float) / plasma)  # what the field's median cell measures
    assert (plasma >= 250).all() and (density < reference - 0.05).all()
    out = normalise_crops(bright, plasma, density, reference, PLASMA)
    assert np.abs(out.astype(int) - plain.astype(int)).max() <= 3
    # without a plasma reference every channel is scaled: the spot darkens far more than the cell
    scaled = normalise_crops(bright, plasma, density, reference)
    assert np.abs(scaled[0, 3, 3].astype(int) - plain[0, 3, 3].astype(int)).max() > 10


def test_a_tinted_photograph_is_rebuilt_on_the_reference_plasma():
    reference = np.array([0.25, 0.40, 0.28])
    spot = np.array([0.9, 1.3, 0.7])
    plain = normalise_crops(_cell_with_spot(PLASMA, reference, spot), PLASMA, reference, reference, PLASMA)
    tint = np.array([0.85, 1.0, 1.1])
    tinted = _cell_with_spot(PLASMA * tint, reference, spot)
    out = normalise_crops(tinted, PLASMA * tint, reference, reference, PLASMA)
    assert np.abs(out.astype(int) - plain.astype(int)).max() <= 2
    assert np.abs(tinted.astype(int) - plain.astype(int)).max() > 20  # the tint was there to remove
