import keras
import numpy as np
import pytest

from malaria_cells import MalariaCellsError, load_model
from malaria_cells.models import average_models, build_model, model_info_layer


def test_tutorial_network_is_the_tutorials():
    model = build_model("tutorial", image_size=70, color="gray")
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["InputLayer", "Grayscale", "Rescaling"] + ["Conv2D", "MaxPooling2D"] * 3 + [
        "Flatten", "Dense", "Dense", "Dense", "CellModelInfo"]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert all(c.filters == 64 and c.kernel_size == (3, 3) for c in convs)
    assert model.output_shape == (None, 1)


def test_gray_layer_uses_opencv_luma_weights():
    model = build_model("tutorial", image_size=70, color="gray")
    gray = model.get_layer("grayscale")
    pixel = np.array([[[[100.0, 50.0, 200.0]]]], np.float32)
    assert np.allclose(gray(pixel), 0.299 * 100 + 0.587 * 50 + 0.114 * 200, atol=1e-4)


def test_threshold_and_metadata_survive_save_and_load(tmp_path):
    model = build_model("cellnet", image_size=32, threshold=0.23, info={"recipe": {"epochs": 3}})
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = load_model(path)
    assert loaded.threshold == pytest.approx(0.23)
    assert loaded.info == {"recipe": {"epochs": 3}}
    assert loaded.image_size == 32
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3))
    assert np.allclose(loaded.probability(images), model.predict(images.astype("float32"), verbose=0).ravel(), atol=1e-5)


def test_cellnet_slim_is_the_same_network_narrower():
    full, slim = build_model("cellnet", image_size=64), build_model("cellnet-slim", image_size=64)
    assert full.output_shape == slim.output_shape == (None, 1)
    assert slim.count_params() < 0.6 * full.count_params()
    assert len(slim.layers) == len(full.layers)


def test_cellnet_lite_has_whole_blocks_of_16_channels():
    lite, slim = build_model("cellnet-lite", image_size=64), build_model("cellnet-slim", image_size=64)
    assert len(lite.layers) == len(slim.layers) and lite.output_shape == (None, 1)
    widths = [layer.filters for layer in lite.layers if isinstance(layer, keras.layers.Conv2D)]
    assert widths == [16, 16, 16, 48, 48, 96, 96]
    assert lite.count_params() < slim.count_params()


@pytest.mark.parametrize("name", ["mobilenetv3small", "efficientnetv2b0"])
def test_keras_applications_build_without_downloading(name):
    model = build_model(name, image_size=64, weights="none")
    assert model.output_shape == (None, 1)
    assert model_info_layer(model) is not None


def test_backbone_weights_load_from_a_local_file(tmp_path):
    donor = build_model("mobilenetv3small", image_size=64)
    backbone = next(layer for layer in donor.layers if isinstance(layer, keras.Model))
    path = tmp_path / "backbone.weights.h5"
    backbone.save_weights(path)
    model = build_model("mobilenetv3small", image_size=64, weights=str(path))
    loaded = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), backbone.get_weights()))


def test_bad_choices_are_clear_errors(tmp_path):
    with pytest.raises(MalariaCellsError, match="unknown model 'resnet9'"):
        build_model("resnet9")
    with pytest.raises(MalariaCellsError, match="unknown colour"):
        build_model("cellnet", color="cmyk")
    with pytest.raises(MalariaCellsError, match="weights file not found"):
        build_model("mobilenetv3small", weights=str(tmp_path / "missing.h5"))
    with pytest.raises(MalariaCellsError, match="Keras Applications models only"):
        build_model("cellnet", weights="imagenet")


def test_imagenet_weights_without_internet_say_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("URL fetch failure: no route to host")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    import keras.src.applications.mobilenet_v3 as mobilenet_v3

    monkeypatch.setattr(mobilenet_v3.file_utils, "get_file", offline)
    with pytest.raises(MalariaCellsError, match="--weights PATH"):
        build_model("mobilenetv3small", image_size=64, weights="imagenet")


def test_stain_normalization_removes_a_colour_cast_and_keeps_the_background_black():
    from malaria_cells.models import StainNormalization

    from conftest import make_cell

    cell = make_cell(True, np.random.default_rng(0), 40).astype(np.float32)
    cast = np.clip(cell * np.array([0.8, 0.9, 1.15], np.float32), 0, 255)
    layer = StainNormalization()
    a, b = np.asarray(layer(cell[None])), np.asarray(layer(cast[None]))
    assert np.allclose(a, b, atol=0.02)
    assert np.all(a[0, 0, 0] == 0)
    model = build_model("cellnet", image_size=40, stain_normalization=True)
    assert model.get_layer("stain_normalization") is not None


def test_stain_normalization_is_half_the_cell_divided_by_its_mean_colour():
    from malaria_cells.models import StainNormalization

    rng = np.random.default_rng(1)
    cells = rng.uniform(0, 255, (3, 12, 12, 3)).astype(np.float32)
    cells[:, :3] = 0  # black surround, outside the cell
    cells[2] = 0  # an empty image must not divide by zero
    inside = cells.max(axis=-1, keepdims=True) > 20
    mean = (cells * inside).sum(axis=(1, 2), keepdims=True) / np.maximum(inside.sum(axis=(1, 2), keepdims=True), 1)
    expected = 0.5 * cells / np.maximum(mean, 1.0)
    assert np.allclose(np.asarray(StainNormalization()(cells)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels", [3, 1])
def test_stain_normalizations_two_forms_give_the_same_numbers(channels, tmp_path):
    from malaria_cells.export import export_model
    from malaria_cells.models import StainNormalization, stain_normalization_by_matrices

    cells = np.random.default_rng(2).uniform(0, 255, (4, 10, 10, channels)).astype(np.float32)
    cells[:, :2] = 0
    layer, other = StainNormalization(), StainNormalization()
    by_planes = np.asarray(layer(cells))
    with stain_normalization_by_matrices(layer):
        by_matrices = np.asarray(layer(cells))
        assert other.by_planes and not layer.by_planes  # only the model exported changes
    assert layer.by_planes and StainNormalization.by_planes  # restored after the block
    np.testing.assert_allclose(by_planes, by_matrices, rtol=1e-6, atol=1e-6)

    if channels == 3:  # and TFLite exports are traced in the matrix form (no strided slices)
        from malaria_cells.runtimes import KerasClassifier

        interpreter = pytest.importorskip("ai_edge_litert.interpreter")
        model = build_model("cellnet-slim", image_size=16, stain_normalization=True)
        flat = export_model(KerasClassifier(model), tmp_path / "cells.tflite").read_bytes()
        ops = {op["op_name"] for op in interpreter.Interpreter(model_content=flat)._get_ops_details()}
        assert "BATCH_MATMUL" in ops and "STRIDED_SLICE" not in ops


@pytest.mark.parametrize("name", ["cellnet-slim", "tutorial", "mobilenetv3small"])
def test_fused_batch_norm_twin_predicts_the_same(name):
    from malaria_cells.models import fuse_batch_norm

    model = build_model(name, image_size=32, stain_normalization=name != "tutorial", threshold=0.3)
    rng = np.random.default_rng(2)
    for layer in model.layers:  # trained-looking statistics, not the identity of a new layer
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 2, gamma.shape), rng.normal(0, 0.5, beta.shape),
                               rng.normal(0, 0.5, mean.shape), rng.uniform(0.2, 3, variance.shape)])
    fused = fuse_batch_norm(model)
    cells = rng.uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    assert np.allclose(fused.predict(cells, verbose=0), model.predict(cells, verbose=0), atol=1e-5)
    batch_norms = [layer for layer in fused.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if name == "cellnet-slim":
        assert not batch_norms and model_info_layer(fused).threshold == 0.3
        assert len(fuse_batch_norm(model).layers) == len(fused.layers)  # the original is untouched
    if name == "mobilenetv3small":  # not a plain chain: left as it is
        assert fused is model


def test_an_averaging_model_scores_the_mean_of_its_members_and_saves_as_one_file(tmp_path):
    members = [build_model("cellnet", image_size=32) for _ in range(3)]
    images = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    expected = np.mean([m.predict(images, verbose=0) for m in members], axis=0)
    ensemble = average_models(members, threshold=0.61, info={"members": 3})
    path = tmp_path / "ensemble.keras"
    ensemble.save(path)
    loaded = load_model(path)
    assert loaded.threshold == pytest.approx(0.61) and loaded.info == {"members": 3}
    assert np.allclose(loaded.probability(images.astype(np.uint8)),
                       np.mean([m.predict(images.astype(np.uint8).astype(np.float32), verbose=0) for m in members],
                               axis=0).ravel(), atol=1e-5)
    assert np.allclose(ensemble.predict(images, verbose=0), expected, atol=1e-6)
    with pytest.raises(MalariaCellsError, match="input shape"):
        average_models([members[0], build_model("cellnet", image_size=40)])
