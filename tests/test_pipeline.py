from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from malaria_cells.datasets import list_cell_images
from malaria_cells.images import preprocess
from malaria_cells.pipeline import iter_image_batches, preprocess_many, read_images

from conftest import encode, make_cell, write_dataset


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


def test_batches_stream_in_order_at_the_asked_size_reporting_skips_once(tmp_path):
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
    assert np.array_equal(first[1][1], preprocess(Path(first[0][1]).read_bytes(), 12))


def test_preprocess_many_keeps_order_and_flags_corrupt_images():
    rng = np.random.default_rng(0)
    good = [encode(Image.fromarray(make_cell(i % 2 == 0, rng, 40 + i)), "PNG") for i in range(3)]
    images, decoded, reasons = preprocess_many([good[0], b"\x89PNG\r\n\x1a\nbroken", good[1], good[2]], 24)
    assert decoded.tolist() == [True, False, True, True]
    assert reasons == [None, "corrupt PNG (no image header)", None, None]
    assert images.shape == (3, 24, 24, 3)
    assert np.array_equal(images[1], preprocess(good[1], 24))
    assert preprocess_many([], 24)[0].shape == (0, 24, 24, 3)
    # all readable: the batched path gives the same pixels as image by image
    together, decoded, _ = preprocess_many(good, 24)
    assert decoded.all() and np.array_equal(together, images)
