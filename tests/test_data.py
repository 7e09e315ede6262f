import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from malaria_cells import MalariaCellsError
from malaria_cells.data import (
    find_dataset_root, list_cell_images, list_image_files, patient_id, preprocess_image,
    read_images, split_dataset,
)

from conftest import make_cell, nih_like_patients, write_dataset


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_patient_id_is_the_c_digits_prefix():
    assert patient_id("x/C100P61ThinF_IMG_20150918_144104_cell_162.png") == "C100"
    assert patient_id("C5NThinF_IMG_20150609_122108_cell_43.png") == "C5"
    assert patient_id("cell_12.png") is None
    assert patient_id("Cat_1.png") is None


def test_dataset_root_found_directly_nested_and_in_any_case(tmp_path):
    write_dataset(tmp_path / "flat", {"C1": (1, 1)})
    assert find_dataset_root(tmp_path / "flat") == tmp_path / "flat"
    write_dataset(tmp_path / "kaggle" / "cell_images", {"C1": (1, 1)})
    assert find_dataset_root(tmp_path / "kaggle") == tmp_path / "kaggle" / "cell_images"
    lower = tmp_path / "lower"
    write_dataset(lower, {"C1": (1, 1)})
    for name in ("Parasitized", "Uninfected"):
        (lower / name).rename(lower / name.lower())
    assert len(list_cell_images(lower).paths) == 2


def test_kaggle_duplicate_nested_copy_is_read_once(tmp_path):
    root = write_dataset(tmp_path / "cell_images", {"C1": (2, 3)})
    write_dataset(root / "cell_images", {"C1": (2, 3)})
    files = list_cell_images(root)
    assert len(files.paths) == 5
    assert not any("cell_images/cell_images" in p for p in files.paths)


def test_missing_layout_is_a_one_line_error_showing_the_layout(tmp_path):
    (tmp_path / "Parasitized").mkdir()
    with pytest.raises(MalariaCellsError, match="Parasitized/.*Uninfected/") as error:
        find_dataset_root(tmp_path)
    assert "\n" not in str(error.value)
    with pytest.raises(MalariaCellsError, match="no such folder"):
        find_dataset_root(tmp_path / "nope")


def test_empty_class_folder_is_an_error(tmp_path):
    write_dataset(tmp_path, {"C1": (0, 2)})
    with pytest.raises(MalariaCellsError, match="no images in the Parasitized folder"):
        list_cell_images(tmp_path)


def test_non_images_and_empty_files_are_ignored_and_reported(tmp_path):
    write_dataset(tmp_path, {"C1": (2, 2)})
    (tmp_path / "Parasitized" / "Thumbs.db").write_bytes(b"junk")
    (tmp_path / "Uninfected" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "Uninfected" / "C1_empty.png").write_bytes(b"")
    files = list_cell_images(tmp_path)
    assert len(files.paths) == 4
    reasons = {Path(p).name: why for p, why in files.ignored}
    assert reasons == {"Thumbs.db": "not an image file", ".DS_Store": "not an image file",
                       "C1_empty.png": "empty file"}


@pytest.mark.parametrize("mode, fmt", [
    ("RGB", "PNG"), ("RGB", "JPEG"), ("RGB", "BMP"), ("RGB", "TIFF"), ("RGBA", "PNG"),
    ("L", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("L", "TIFF"), ("RGB", "GIF"),
])
def test_every_format_and_mode_decodes_to_rgb_of_the_asked_size(mode, fmt):
    rgb = Image.fromarray(make_cell(True, np.random.default_rng(0), 57))
    if mode == "I;16":
        image = Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257))
    else:
        image = rgb.convert(mode)
    out = preprocess_image(encode(image, fmt), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    reference = np.asarray(rgb.convert("L").resize((32, 32)), float)
    assert np.corrcoef(out.mean(axis=2).ravel(), reference.ravel())[0, 1] > 0.9


def test_sixteen_bit_keeps_its_brightness():
    image = Image.fromarray(np.full((20, 20), 40000, np.uint16))
    out = preprocess_image(encode(image, "PNG"), 8)
    assert abs(int(out[0, 0, 0]) - round(40000 / 257)) <= 1


def test_read_images_skips_corrupt_files_and_keeps_order(tmp_path):
    root = write_dataset(tmp_path, {"C1": (3, 3)})
    files = list_cell_images(root)
    broken = files.paths[2]
    Path(broken).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    images, readable, skipped = read_images(files.paths, 24)
    assert images.shape == (5, 24, 24, 3)
    assert readable.tolist() == [True, True, False, True, True, True]
    assert skipped == [(broken, "corrupt PNG (no image header)")]


@pytest.mark.parametrize("contents, reason", [
    (b"", "empty file"),
    (b"just some text, not pixels", "not an image (PNG, JPEG, BMP, GIF, WebP or TIFF expected)"),
    (b"\xff\xd8\xff\xe0 half a jpeg", "corrupt JPEG"),
])
def test_unreadable_files_are_skipped_with_the_reason(tmp_path, contents, reason):
    good = tmp_path / "good.png"
    Image.fromarray(make_cell(True, np.random.default_rng(0), 30)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(contents)
    images, readable, skipped = read_images([str(good), str(bad)], 16)
    assert readable.tolist() == [True, False] and len(images) == 1
    assert skipped[0][0] == str(bad) and skipped[0][1].startswith(reason)


def test_truncated_png_and_decompression_bomb_are_refused_before_harm():
    import struct
    import zlib

    from malaria_cells.data import UnreadableImage

    whole = encode(Image.fromarray(make_cell(True, np.random.default_rng(0), 40)), "PNG")
    with pytest.raises(UnreadableImage, match="corrupt or truncated PNG"):
        preprocess_image(whole[: len(whole) // 2], 16)
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    with pytest.raises(UnreadableImage, match="too large"):
        preprocess_image(bomb, 16)


@pytest.mark.parametrize("height, width, size", [(128, 128, 64), (57, 91, 32), (20, 33, 64), (64, 64, 64)])
def test_preprocessing_is_tensorflows_decode_and_bilinear_resize_pixel_for_pixel(height, width, size):
    # Models trained before the decoder moved to imagecodecs saw exactly these pixels.
    import tensorflow as tf

    pixels = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    png = encode(Image.fromarray(pixels), "PNG")
    resized = tf.image.resize(tf.io.decode_png(png, channels=3), (size, size), method="bilinear")
    expected = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8).numpy()
    assert np.array_equal(preprocess_image(png, size), expected)


@pytest.mark.parametrize("height, width, size", [(128, 128, 64), (46, 46, 23), (64, 64, 64), (130, 130, 64)])
def test_every_resize_path_gives_tensorflows_bilinear_pixels(height, width, size):
    # Half size and same size skip TensorFlow (integer 2x2 means, copies); others go through it.
    import tensorflow as tf

    from malaria_cells.data import _resize_bilinear, resize_images

    images = np.random.default_rng(height).integers(0, 256, (6, height, width, 3), dtype=np.uint8)
    images[0], images[1] = 255, 0  # the largest and smallest block sums
    images[2] = ((np.arange(width) + 1) // 2 % 256)[:, None].astype(np.uint8)  # 2x2 sums 4k + 2: rounding ties
    resized = tf.image.resize(images, (size, size), method="bilinear")
    expected = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8).numpy()
    assert np.array_equal(resize_images(list(images), size), expected)
    # the numpy twin, which resizes when TensorFlow is not loaded (an ONNX or TFLite model)
    assert np.array_equal(_resize_bilinear(images, size), expected)


def test_single_images_and_batches_resize_to_the_same_pixels():
    # Groups under 4 images skip TensorFlow's call overhead with the same arithmetic in numpy.
    from malaria_cells.data import resize_images

    rng = np.random.default_rng(0)
    for height, width, size in [(128, 128, 64), (1, 1, 8), (3, 200, 24), (64, 64, 64), (31, 17, 70), (150, 97, 32)]:
        images = list(rng.integers(0, 256, (5, height, width, 3), dtype=np.uint8))
        batched = resize_images(images, size)
        one_by_one = np.stack([resize_images([image], size)[0] for image in images])
        assert np.array_equal(batched, one_by_one), (height, width, size)


def test_batches_stream_in_order_at_the_asked_size_reporting_skips_once(tmp_path):
    from malaria_cells.data import iter_image_batches

    rng = np.random.default_rng(0)
    paths = []
    for i in range(37):
        path = tmp_path / f"{i:02d}.png"
        if i in (5, 20):
            path.write_bytes(b"broken")
        else:
            Image.fromarray(make_cell(i % 2 == 0, rng, 30 + i % 7)).save(path)
        paths.append(str(path))
    batches = list(iter_image_batches(paths, 12, batch_size=8, chunk=3))
    assert [len(p) for p, _, _ in batches] == [8, 8, 8, 8, 3]
    assert [p for b in batches for p in b[0]] == [p for i, p in enumerate(paths) if i not in (5, 20)]
    assert [s[0] for b in batches for s in b[2]] == [paths[5], paths[20]]
    first = batches[0]
    assert np.array_equal(first[1][1], preprocess_image(Path(first[0][1]).read_bytes(), 12))


def test_list_image_files_expands_folders_and_reports_missing(tmp_path):
    root = write_dataset(tmp_path, {"C1": (2, 1)})
    files, ignored = list_image_files([root, tmp_path / "missing.png"])
    assert len(files) == 3
    assert ignored == [(str(tmp_path / "missing.png"), "no such file or folder")]


def test_patient_split_keeps_each_patient_in_one_part_with_both_classes(cell_dataset):
    files = list_cell_images(cell_dataset)
    split = split_dataset(files, method="patient", val_fraction=0.25, test_fraction=0.25, seed=3)
    patients = split.patients(files)
    assert not set(patients["train"]) & set(patients["val"])
    assert not set(patients["train"]) & set(patients["test"])
    assert not set(patients["val"]) & set(patients["test"])
    healthy = {p for p in files.groups if p.startswith("C5")}
    for part in ("train", "val", "test"):
        index = getattr(split, part)
        assert set(files.labels[index]) == {0, 1}
        assert set(patients[part]) & healthy and set(patients[part]) - healthy
    assert sorted(np.concatenate([split.train, split.val, split.test])) == list(range(len(files.paths)))


def test_split_is_deterministic_for_a_seed_and_changes_with_it(cell_dataset):
    files = list_cell_images(cell_dataset)
    first = split_dataset(files, seed=1)
    again = split_dataset(files, seed=1)
    other = split_dataset(files, seed=2)
    assert first.patients(files) == again.patients(files)
    assert first.patients(files) != other.patients(files)


def test_random_split_is_per_image_and_stratified(cell_dataset):
    files = list_cell_images(cell_dataset)
    split = split_dataset(files, method="random", val_fraction=0.2, test_fraction=0.1, seed=0)
    n = len(files.paths)
    assert abs(len(split.test) - 0.1 * n) <= 1
    assert abs(len(split.val) - 0.2 * 0.9 * n) <= 1
    assert abs(files.labels[split.test].mean() - files.labels.mean()) < 0.05


def test_patient_split_refuses_too_few_patients(tmp_path):
    files = list_cell_images(write_dataset(tmp_path, {"C1": (3, 3), "C2": (0, 3)}))
    with pytest.raises(MalariaCellsError, match="too few patients"):
        split_dataset(files, method="patient")


def test_files_without_patient_id_are_their_own_group(tmp_path):
    root = write_dataset(tmp_path, nih_like_patients(6, 4, 4))
    Image.fromarray(make_cell(True, np.random.default_rng(1))).save(root / "Parasitized" / "anon.png")
    files = list_cell_images(root)
    assert any(g.startswith("file:") for g in files.groups)
    split = split_dataset(files, seed=0)
    assert len(split.train) + len(split.val) + len(split.test) == len(files.paths)


def test_preprocess_many_keeps_order_and_flags_corrupt_images():
    from malaria_cells.data import preprocess_many

    rng = np.random.default_rng(0)
    good = [encode(Image.fromarray(make_cell(i % 2 == 0, rng, 40 + i)), "PNG") for i in range(3)]
    images, decoded, reasons = preprocess_many([good[0], b"\x89PNG\r\n\x1a\nbroken", good[1], good[2]], 24)
    assert decoded.tolist() == [True, False, True, True]
    assert reasons == [None, "corrupt PNG (no image header)", None, None]
    assert images.shape == (3, 24, 24, 3)
    assert np.array_equal(images[1], preprocess_image(good[1], 24))
    assert preprocess_many([], 24)[0].shape == (0, 24, 24, 3)
    # all readable: the batched path gives the same pixels as image by image
    together, decoded, _ = preprocess_many(good, 24)
    assert decoded.all() and np.array_equal(together, images)


@pytest.mark.parametrize("method", ["patient", "random"])
def test_cross_validation_folds_test_everyone_once(cell_dataset, method):
    files = list_cell_images(cell_dataset)
    splits = [split_dataset(files, method=method, folds=3, fold=k, seed=5) for k in range(3)]
    tests = [s.test for s in splits]
    assert sorted(np.concatenate(tests)) == list(range(len(files.paths)))  # disjoint, cover all
    for split in splits:
        assert sorted(np.concatenate([split.train, split.val, split.test])) == list(range(len(files.paths)))
        assert set(files.labels[split.test]) == {0, 1} and len(split.val)
        if method == "patient":
            patients = split.patients(files)
            assert not set(patients["test"]) & (set(patients["train"]) | set(patients["val"]))
    if method == "patient":  # each fold chooses its epoch and threshold on other patients
        validation = [set(split.patients(files)["val"]) for split in splits]
        assert all(not validation[i] & validation[j] for i in range(3) for j in range(i + 1, 3))
    with pytest.raises(MalariaCellsError, match="fold"):
        split_dataset(files, method=method, folds=3, fold=3)
