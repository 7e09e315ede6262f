"""Heat maps (malaria_cells.explain) on synthetic cells: a blue dot the models are built to look at."""

from __future__ import annotations

import numpy as np
import pytest

from malaria_cells import MalariaCellsError
from malaria_cells.explain import cell_mask, explain, grad_cam, heat_overlay, occlusion

SIZE = 32
DOT = (9, 21)  # (row, column) of the dot's centre
FAR = (23, 8)  # a cell pixel far from the dot
PINK, BLUE = (220, 160, 180), (40, 40, 210)


def make_crops(n: int = 2, dot: bool = True, seed: int = 0) -> np.ndarray:
    """Pink discs on black; with ``dot``, a blue dot of radius 2.5 at :data:`DOT`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = (yy - 16) ** 2 + (xx - 16) ** 2 < 13**2
    crops = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    for crop in crops:
        crop[disc] = np.clip(np.array(PINK) + rng.normal(0, 4, (disc.sum(), 3)), 0, 255)
        if dot:
            crop[(yy - DOT[0]) ** 2 + (xx - DOT[1]) ** 2 < 2.5**2] = BLUE
    return crops


class BlueDotScorer:
    """A classifier of any runtime: the more blue-dot pixels, the more Parasitized. Records its inputs."""

    image_size = SIZE

    def __init__(self):
        self.seen = []

    def probability(self, images):
        self.seen.append(images.copy())
        pixels = images.astype(int)
        blue = ((pixels[..., 2] - pixels[..., 0]) > 100).sum(axis=(1, 2))
        return 1 / (1 + np.exp(-(blue - 10) / 4))


def blue_dot_model(weight: float = 2.0):
    """A Keras model that sees the blue dot: 1x1 conv 'blueness' (B - R), ReLU, pooling, a 3x3 conv,
    ReLU ("features", 8x8), global average, sigmoid."""
    import keras
    from keras import layers

    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = layers.Rescaling(1 / 255)(inputs)
    blueness = layers.Conv2D(2, 1, name="blueness")
    x = layers.Activation("relu", name="blue_relu")(blueness(x))
    x = layers.MaxPooling2D(4)(x)
    spread = layers.Conv2D(1, 3, padding="same", name="spread")
    x = layers.Activation("relu", name="features")(spread(x))
    x = layers.GlobalAveragePooling2D()(x)
    dense = layers.Dense(1, activation="sigmoid", name="parasitized")
    outputs = dense(x)
    model = keras.Model(inputs, outputs)
    kernel = np.zeros((1, 1, 3, 2), np.float32)
    kernel[0, 0, :, 0] = [-1, 0, 1]  # B - R
    kernel[0, 0, :, 1] = [0.1, 0.1, 0.1]  # a channel the score ignores
    blueness.set_weights([kernel, np.zeros(2, np.float32)])
    spread_kernel = np.zeros((3, 3, 2, 1), np.float32)
    spread_kernel[1, 1, 0, 0] = 1.0
    spread.set_weights([spread_kernel, np.zeros(1, np.float32)])
    dense.set_weights([np.full((1, 1), weight, np.float32), np.full(1, -0.5, np.float32)])
    return model


@pytest.fixture(scope="module")
def keras_classifier():
    from malaria_cells.runtimes import KerasClassifier

    return KerasClassifier(blue_dot_model())


# --------------------------------------------------------------------------- occlusion


def test_occlusion_heat_peaks_at_the_dot():
    crops = make_crops(3)
    heat = occlusion(BlueDotScorer(), crops, patch_size=4, stride=2)
    assert heat.shape == (3, SIZE, SIZE) and heat.dtype == np.float32
    assert heat.min() >= 0 and np.allclose(heat.max(axis=(1, 2)), 1)
    for item in heat:
        peak = np.unravel_index(np.argmax(item), item.shape)
        assert np.hypot(peak[0] - DOT[0], peak[1] - DOT[1]) <= 3
        assert item[FAR] == 0


def test_occlusion_keeps_the_outline_and_fills_with_the_cells_median_colour():
    crops, scorer = make_crops(1), BlueDotScorer()
    occlusion(scorer, crops, patch_size=6, stride=3)
    copies = np.concatenate(scorer.seen[1:])  # the first call scores the crops themselves
    outline = cell_mask(crops[0])
    assert len(copies) > 0
    assert all((cell_mask(copy) == outline).all() for copy in copies)
    assert (copies[:, ~outline] == 0).all()
    median = np.median(crops[0][outline], axis=0).round()
    changed = (copies != crops[0]).any(axis=-1)
    assert np.allclose(copies[changed], median, atol=0)


def test_occlusion_batches_give_the_same_heat():
    crops = make_crops(3)
    whole = occlusion(BlueDotScorer(), crops, patch_size=4, stride=2)
    chunked = occlusion(BlueDotScorer(), crops, patch_size=4, stride=2, batch_size=7)
    assert np.allclose(whole, chunked, atol=1e-6)


def test_occlusion_is_zero_where_nothing_lowers_the_score():
    heat = occlusion(BlueDotScorer(), make_crops(1, dot=False), patch_size=4, stride=4)
    assert not heat.any()


def test_occlusion_runs_on_a_model_without_gradients_through_explain():
    crops = make_crops(2)
    assert np.array_equal(explain(BlueDotScorer(), crops, patch_size=4),
                          occlusion(BlueDotScorer(), crops, patch_size=4))


# --------------------------------------------------------------------------- Grad-CAM


def test_grad_cam_looks_at_the_dot(keras_classifier):
    crops = make_crops(2)
    heat = grad_cam(keras_classifier, crops)
    assert heat.shape == (2, SIZE, SIZE) and heat.dtype == np.float32
    assert 0 <= heat.min() and heat.max() == pytest.approx(1)
    for item in heat:
        assert item[DOT] > 0.5 and item[DOT] > 4 * item[FAR]
        assert not item[~cell_mask(crops[0])].any()


def test_grad_cam_picks_the_last_convolutional_feature_map(keras_classifier):
    crops = make_crops(2)
    assert np.allclose(grad_cam(keras_classifier, crops), grad_cam(keras_classifier, crops, layer="features"))
    assert not np.allclose(grad_cam(keras_classifier, crops), grad_cam(keras_classifier, crops, layer="blueness"))
    fine = grad_cam(keras_classifier, crops, min_side=SIZE)  # the last map at full resolution
    assert np.allclose(fine, grad_cam(keras_classifier, crops, layer="blue_relu"))
    assert fine[0][DOT] == pytest.approx(1) and fine[0][FAR] == 0
    from malaria_cells.models import build_model

    with pytest.raises(MalariaCellsError, match="at least"):  # cellnet's stem halves the side at once
        grad_cam(build_model("cellnet-slim", image_size=SIZE), crops, min_side=SIZE)
    with pytest.raises(MalariaCellsError, match="not both"):
        grad_cam(keras_classifier, crops, layer="features", min_side=8)


def test_grad_cam_in_a_nested_model_and_a_saturated_one():
    import keras

    inner = blue_dot_model(weight=1e4)  # probability exactly 1.0: only the logit has a gradient
    crops = make_crops(1)
    assert inner.predict(crops.astype(np.float32), verbose=0)[0, 0] == 1.0
    inputs = keras.Input((SIZE, SIZE, 3))
    outer = keras.Model(inputs, keras.layers.Dropout(0.1)(inner(inputs)))
    for model in (inner, outer):
        heat = grad_cam(model, crops)
        assert heat[0][DOT] > 4 * heat[0][FAR]
    # the model is left as it was: no capture hooks remain
    assert "call" not in vars(inner.get_layer("features"))


def test_grad_cam_without_evidence_is_all_zero(keras_classifier):
    assert not grad_cam(keras_classifier, make_crops(1, dot=False)).any()


def test_explain_auto_uses_grad_cam_for_keras(keras_classifier):
    crops = make_crops(2)
    assert np.array_equal(explain(keras_classifier, crops), grad_cam(keras_classifier, crops))
    assert np.array_equal(explain(keras_classifier, crops, method="occlusion", patch_size=4),
                          occlusion(keras_classifier, crops, patch_size=4))


def test_grad_cam_on_a_real_architecture():
    from malaria_cells.models import build_model

    model = build_model("cellnet-slim", image_size=SIZE, stain_normalization=True)
    heat = grad_cam(model, make_crops(3))
    assert heat.shape == (3, SIZE, SIZE) and heat.dtype == np.float32
    assert 0 <= heat.min() and heat.max() <= 1


# --------------------------------------------------------------------------- overlay


def test_overlay_leaves_the_surround_and_cold_cells_alone():
    crops = make_crops(2)
    heat = np.ones((2, SIZE, SIZE), np.float32)
    image = heat_overlay(crops, heat, colormap="jet")
    assert image.shape == crops.shape and image.dtype == np.uint8
    outside = ~cell_mask(crops)
    assert (image[outside] == 0).all()
    assert not np.array_equal(image[~outside], crops[~outside])
    assert np.array_equal(heat_overlay(crops[0], np.zeros((SIZE, SIZE))), crops[0])
    assert np.array_equal(heat_overlay(crops[0], heat[0], alpha=0), crops[0])


# --------------------------------------------------------------------------- refusals


def test_empty_input_gives_empty_heat(keras_classifier):
    empty = np.zeros((0, SIZE, SIZE, 3), np.uint8)
    for heat in (grad_cam(keras_classifier, empty), occlusion(BlueDotScorer(), empty), explain(BlueDotScorer(), empty)):
        assert heat.shape == (0, SIZE, SIZE) and heat.dtype == np.float32


@pytest.mark.parametrize("crops", [
    make_crops(1).astype(np.float32),  # not uint8
    make_crops(1)[0],  # one crop without its batch axis
    make_crops(1)[..., :2],  # two channels
    np.zeros((1, 16, 16, 3), np.uint8),  # not the model's size
    [[1, 2, 3]],  # not an array
])
def test_bad_crops_are_refused(keras_classifier, crops):
    with pytest.raises(MalariaCellsError):
        grad_cam(keras_classifier, crops)
    with pytest.raises(MalariaCellsError):
        occlusion(BlueDotScorer(), crops)


@pytest.mark.parametrize("options", [
    {"patch_size": 0}, {"patch_size": SIZE + 1}, {"patch_size": 4, "stride": 5}, {"stride": 0},
    {"score": "odds"}, {"batch_size": 0}, {"floor": 300}, {"patch_size": 2.5},
])
def test_bad_occlusion_options_are_refused(options):
    with pytest.raises(MalariaCellsError):
        occlusion(BlueDotScorer(), make_crops(1), **options)


def test_wrong_model_or_method_is_refused(keras_classifier):
    crops = make_crops(1)
    with pytest.raises(MalariaCellsError, match="Keras"):
        grad_cam(BlueDotScorer(), crops)
    with pytest.raises(MalariaCellsError, match="probability"):
        occlusion(object(), crops)
    with pytest.raises(MalariaCellsError, match="method"):
        explain(keras_classifier, crops, method="lime")
    with pytest.raises(MalariaCellsError, match="patch_size"):
        explain(keras_classifier, crops, patch_size=4)  # a Keras model: auto is Grad-CAM
    with pytest.raises(MalariaCellsError, match="not found"):
        grad_cam(keras_classifier, crops, layer="no-such-layer")
    with pytest.raises(MalariaCellsError, match="height, width"):
        grad_cam(keras_classifier, crops, layer="parasitized")


@pytest.mark.parametrize("heat, options", [
    (np.zeros((SIZE, 16)), {}), (np.full((SIZE, SIZE), np.nan), {}), (np.zeros((SIZE, SIZE)), {"alpha": 2}),
    (np.zeros((SIZE, SIZE)), {"colormap": "rainbow"}), (np.zeros((SIZE, SIZE), bool), {}),
])
def test_bad_overlays_are_refused(heat, options):
    with pytest.raises(MalariaCellsError):
        heat_overlay(make_crops(1)[0], heat, **options)
    with pytest.raises(MalariaCellsError):
        heat_overlay(make_crops(1)[0].astype(float), np.zeros((SIZE, SIZE)))
