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
