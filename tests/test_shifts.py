"""The shifts of malaria_cells.shifts on drawn images: neutral strengths, directions, shapes, dtypes."""

from __future__ import annotations

import numpy as np
import pytest

from malaria_cells import shifts
from malaria_cells.synthetic import make_field
from malaria_cells.fields.truth import TruthCell


@pytest.fixture(scope="module")
def field():
    image, _ = make_field(np.random.default_rng(0), size=(240, 180), radius=14, rows=4, cols=5, infected=(3, 7))
    return image


def _od(image, white):
    return -np.log(np.maximum(image.astype(float), 1) / white).mean()


SHIFTS = [
    (shifts.stain, 1.0, 1.6), (shifts.hue, 0.0, 15.0), (shifts.saturation, 1.0, 0.6), (shifts.exposure, 1.0, 0.5),
    (shifts.white_balance, 1.0, (1.15, 1.0, 0.85)), (shifts.gamma, 1.0, 1.4), (shifts.defocus, 0.0, 1.5),
    (shifts.gaussian_noise, 0.0, 8.0), (shifts.grayscale, 0.0, 1.0), (shifts.resample, 1.0, 1.5),
]


@pytest.mark.parametrize("shift, neutral, strong", SHIFTS, ids=[s[0].__name__ for s in SHIFTS])
def test_neutral_strength_is_identity_and_strong_one_changes_uint8(field, shift, neutral, strong):
    same = shift(field, neutral, np.random.default_rng(1))
    assert same.dtype == np.uint8 and np.array_equal(same, field) and same is not field
    changed = shift(field, strong, np.random.default_rng(1))
    assert changed.dtype == np.uint8 and changed.ndim == 3 and changed.shape[2] == 3
    assert changed.shape != field.shape or np.abs(changed.astype(int) - field).mean() > 0.5


def test_stain_scales_optical_density_and_keeps_the_illumination(field):
    white = np.percentile(field.reshape(-1, 3), 99, axis=0)
    darker, lighter = shifts.stain(field, 1.6), shifts.stain(field, 0.6)
    assert _od(darker, white) > _od(field, white) * 1.3 > _od(lighter, white) * 1.3
    plasma = field.sum(-1) >= np.percentile(field.sum(-1), 99.5)  # the brightest light changes by a level at most
    assert np.abs(darker[plasma].astype(int) - field[plasma]).max() <= 6
    # close to identity near strength 1 (negative stain amounts are not clipped as rgb2hed does)
    assert np.abs(shifts.stain(field, 1.01).astype(int) - field).max() <= 3
    only_h = shifts.stain(field, (1.6, 1.0, 1.0))
    assert not np.array_equal(only_h, darker) and _od(only_h, white) > _od(field, white)
    with pytest.raises(ValueError):
        shifts.stain(field, -1)
    with pytest.raises(ValueError):
        shifts.stain(field.astype(np.float32), 1.2)


def test_hue_saturation_exposure_gamma_white_balance_directions(field):
    def hsv(image):
        import cv2

        return cv2.cvtColor(image.astype(np.float32) / 255, cv2.COLOR_RGB2HSV)

    cells = hsv(field)[..., 1] > 0.2  # the pink cells
    assert np.abs(shifts.hue(shifts.hue(field, 15), -15).astype(int) - field).max() <= 2
    rotated = hsv(shifts.hue(field, 15))[..., 0]
    assert np.median(np.mod(rotated[cells] - hsv(field)[..., 0][cells] + 180, 360) - 180) == pytest.approx(15, abs=1)
    assert hsv(shifts.saturation(field, 0.6))[..., 1][cells].mean() < hsv(field)[..., 1][cells].mean() * 0.7
    assert hsv(shifts.saturation(field, 1.4))[..., 1][cells].mean() > hsv(field)[..., 1][cells].mean() * 1.2
    dark, bright = shifts.exposure(field, 0.5), shifts.exposure(field, 2.0)
    assert dark.mean() < field.mean() < bright.mean()
    assert (bright == 255).mean() > 0.5  # one stop more light saturates the plasma, as a sensor clips
    assert shifts.gamma(field, 0.7).mean() > field.mean() > shifts.gamma(field, 1.4).mean()
    warm = shifts.white_balance(field, (1.15, 1.0, 0.85))
    assert warm[..., 0].mean() >= field[..., 0].mean() and warm[..., 2].mean() < field[..., 2].mean()
    assert np.array_equal(warm[..., 1], field[..., 1])


def test_defocus_scales_with_the_cell_diameter_and_jpeg_and_noise_degrade(field):
    def sharpness(image):
        return np.abs(np.diff(image.astype(float), axis=1)).mean()

    small, large = shifts.defocus(field, 1.5, cell_diameter=32), shifts.defocus(field, 1.5, cell_diameter=96)
    assert sharpness(large) < sharpness(small) < sharpness(field)
    assert np.abs(shifts.jpeg(field, 40).astype(int) - field).mean() > np.abs(shifts.jpeg(field, 95).astype(int) - field).mean()
    assert shifts.jpeg(field, 40).shape == field.shape
    noisy = shifts.gaussian_noise(field, 8.0, np.random.default_rng(0))
    assert np.std(noisy.astype(float) - field) == pytest.approx(8.0, rel=0.15)
    assert np.array_equal(noisy, shifts.gaussian_noise(field, 8.0, np.random.default_rng(0)))


def test_resample_changes_shape_by_the_factor_and_truth_follows(field):
    height, width = field.shape[:2]
    for factor in (0.5, 0.75, 2.0, 2.5):
        out = shifts.resample(field, factor)
        assert out.shape == (round(height * factor), round(width * factor), 3) and out.dtype == np.uint8
    assert shifts.downscale(field, 8).shape == (round(height / 8), round(width / 8), 3)
    cells = [TruthCell(10.0, 20.0, "Uninfected", None, 30.0), TruthCell(5.0, 6.0, "Parasitized", "ring")]
    moved = shifts.scale_truth(cells, 2.0)
    assert [(c.x, c.y, c.width, c.label, c.stage) for c in moved] == [(20, 40, 60, "Uninfected", None),
                                                                    (10, 12, None, "Parasitized", "ring")]
    assert cells[0].x == 10.0  # copies
    with pytest.raises(ValueError):
        shifts.resample(field, 0)


def test_unreadable_inputs(field):
    grey = shifts.grayscale(field)
    assert grey.dtype == np.uint8 and np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    noise = shifts.noise_image(field, 1.0, np.random.default_rng(0))
    assert noise.shape == field.shape and noise.dtype == np.uint8 and noise.std() > 60
    for kind in ("scene", "astronaut", "coffee", "chelsea"):
        photo = shifts.non_smear(field, 1.0, np.random.default_rng(0), kind=kind)
        assert photo.shape == field.shape and photo.dtype == np.uint8 and photo.std() > 20
    with pytest.raises(ValueError):
        shifts.non_smear(field, kind="smear")


@pytest.mark.parametrize("kind", shifts.MORPHOLOGIES)
def test_morphology_fields_return_the_cells_they_draw(kind):
    from skimage.measure import label, regionprops

    image, cells = shifts.make_morphology_field(kind, np.random.default_rng(3), size=(420, 320), radius=20,
                                                rows=2, cols=3)
    assert image.dtype == np.uint8 and image.shape == (320, 420, 3)
    assert len(cells) == (12 if kind == "overlapping" else 6) and all(c.kind == kind for c in cells)
    height, width = image.shape[:2]
    yy, xx = np.mgrid[:height, :width]
    inside = np.zeros((height, width), bool)
    for cell in cells:
        assert cell.a <= cell.x <= width - cell.a and cell.a <= cell.y <= height - cell.a
        inside |= cell.contains(xx, yy)
    plasma = np.array([236, 228, 222])
    green = image[..., 1].astype(float)
    outside = ~inside
    if kind != "platelets":
        assert np.abs(np.median(image[outside], axis=0) - plasma).max() <= 3
    rims = np.array([[c.x + 0.92 * c.a * np.cos(c.angle), c.y + 0.92 * c.a * np.sin(c.angle)] for c in cells])
    assert (green[rims[:, 1].round().astype(int), rims[:, 0].round().astype(int)] < plasma[1] - 40).all()
    centres = green[np.array([round(c.y) for c in cells]), np.array([round(c.x) for c in cells])]
    if kind == "target":  # dark central spot inside a pale annulus
        annulus = np.array([green[round(c.y), round(c.x + 0.55 * c.a)] for c in cells])
        assert (centres < annulus - 25).all()
    if kind == "hypochromic":  # large pale centre
        assert (centres > plasma[1] - 15).all()
    if kind not in ("target", "hypochromic"):  # one solid object per place (a pair lying on each other is one)
        objects = regionprops(label(green < plasma[1] - 25))
        big = [o for o in objects if o.area > 0.5 * np.pi * 20**2]
        assert len(big) == 6
        if kind == "elliptocyte":
            ratios = [o.axis_major_length / o.axis_minor_length for o in big]
            assert np.median(ratios) == pytest.approx(2.0, rel=0.15)
    with pytest.raises(ValueError):
        shifts.make_morphology_field("sickle", np.random.default_rng(0))
