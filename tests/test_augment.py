import numpy as np
import pytest



@pytest.mark.parametrize("mode", ["flips", "flips+color", "flips+stain", "flips+color+focus", "flips+color+blur",
                                  "flips+color+restain"])
def test_augmentation_is_reproducible_and_keeps_the_surround_black(mode):
    import tensorflow as tf

    from malaria_cells.augment import augment_cell

    yy, xx = np.mgrid[:32, :32]
    disc = (yy - 15.5) ** 2 + (xx - 15.5) ** 2 < 12 ** 2
    cell = np.zeros((32, 32, 3), np.uint8)
    cell[disc] = (200, 120, 140)
    cell[14:18, 14:18] = (90, 30, 110)  # a dark "parasite"
    outputs = [augment_cell(tf.constant(cell), tf.constant([s, 1], tf.int64), mode).numpy() for s in range(12)]
    again = augment_cell(tf.constant(cell), tf.constant([3, 1], tf.int64), mode).numpy()
    np.testing.assert_array_equal(outputs[3], again)
    for out in outputs:  # the cell is symmetric, so flips keep the surround where it was
        assert out.shape == (32, 32, 3) and out.min() >= 0 and out.max() <= 255
        assert np.all(out[~disc] == 0)
    if mode == "flips":
        assert all(np.array_equal(out, cell) for out in outputs)
        return
    # colour modes change the cell, differently per seed
    assert len({out[disc].mean().round(3) for out in outputs}) > 6
    if mode in ("flips+stain", "flips+color+restain"):
        # stain density changes the parasite's contrast to its cell, which a gain cannot
        contrast = [out[16, 16].mean() / out[8, 16].mean() for out in outputs]
        assert max(contrast) - min(contrast) > 0.2


def test_flips_give_each_cell_one_of_its_8_rotations_or_mirrors():
    import tensorflow as tf

    from malaria_cells.augment import augment_cell

    cell = (40 + np.arange(8 * 8 * 3)).astype(np.uint8).reshape(8, 8, 3)  # no symmetry, no black
    views = [np.rot90(cell, k) for k in range(4)]
    views += [np.fliplr(view) for view in views]
    outputs = [augment_cell(tf.constant(cell), tf.constant([s, 9], tf.int64), "flips").numpy() for s in range(64)]
    seen = {next(i for i, view in enumerate(views) if np.allclose(out, view, atol=1e-3)) for out in outputs}
    assert len(seen) == 8


def test_mixup_blends_each_cell_mostly_with_its_own_label():
    import tensorflow as tf

    from malaria_cells.augment import mix_batch

    images = tf.constant(np.stack([np.full((4, 4, 3), v, np.float32) for v in (0.0, 100.0, 200.0, 50.0)]))
    labels = tf.constant([0.0, 1.0, 1.0, 0.0])
    mixed, targets = mix_batch(images, labels, tf.constant([5, 2], tf.int64), alpha=0.4)
    again, _ = mix_batch(images, labels, tf.constant([5, 2], tf.int64), alpha=0.4)
    np.testing.assert_array_equal(mixed.numpy(), again.numpy())
    own = images.numpy()[:, 0, 0, 0]
    other = np.roll(own, 1)
    weight = (mixed.numpy()[:, 0, 0, 0] - other) / (own - other)
    assert np.all(weight >= 0.5 - 1e-5) and np.all(weight <= 1 + 1e-5)
    np.testing.assert_allclose(targets.numpy(), weight * labels.numpy() + (1 - weight) * np.roll(labels.numpy(), 1),
                               atol=1e-5)
    assert not np.allclose(weight, 1.0)  # it does blend


def test_paired_views_are_one_cell_seen_two_ways_with_its_label():
    from malaria_cells.augment import paired_dataset

    yy, xx = np.mgrid[:32, :32]
    disc = (yy - 15.5) ** 2 + (xx - 15.5) ** 2 < 12 ** 2
    cells = np.zeros((6, 32, 32, 3), np.uint8)
    for k in range(6):
        cells[k][disc] = (200, 120 + 10 * k, 140)
    labels = np.array([0, 1, 0, 1, 1, 0])
    batches = list(paired_dataset(cells, labels, batch_size=4, augment="flips", seed=3))
    assert [len(y) for _, y in batches] == [4, 2]
    firsts = np.concatenate([a.numpy() for (a, _), _ in batches])
    seconds = np.concatenate([b.numpy() for (_, b), _ in batches])
    got = np.concatenate([y.numpy() for _, y in batches])
    # "flips" leaves a symmetric cell as it is: the first view tells which cell (and label) it is
    which = [int(np.argmin([np.abs(first - cell).sum() for cell in cells.astype(np.float32)])) for first in firsts]
    assert sorted(which) == list(range(6)) and np.array_equal(got, labels[which])
    assert not np.allclose(firsts, seconds)  # the second view is another lab's
    assert np.all(seconds[:, ~disc] == 0)
