"""Augmenting cells and batching them with tf.data, for training.

Every transformation is one a real cell undergoes between slides and cameras: rotations and
mirrors (it is the same cell), stain colour and density, illumination, focus. The black
surround of a crop stays black.
"""

from __future__ import annotations

import numpy as np

__all__ = ["augment_cell", "mix_batch", "training_dataset", "paired_dataset", "evaluation_dataset"]


def augment_cell(image, seed, mode: str):
    """Randomly transform one uint8 cell, deterministically for a given seed pair."""
    import tensorflow as tf

    if mode == "shifts":
        return _shift_cell(image, seed)
    seeds = tf.random.experimental.stateless_split(seed, 11)
    image = tf.cast(image, tf.float32) / 255.0
    transpose = tf.random.stateless_uniform([], seeds[0]) < 0.5
    image = tf.cond(transpose, lambda: tf.transpose(image, [1, 0, 2]), lambda: image)
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    image = tf.image.stateless_random_flip_up_down(image, seeds[2])
    # The black surround must stay black (contrast jitter would lift it), else it would
    # count as cell in the model's stain normalisation.
    surround_mask = tf.cast(tf.reduce_max(image, axis=-1, keepdims=True) > 20 / 255, tf.float32)
    if mode in ("flips+color", "flips+stain", "flips+color+focus", "flips+color+blur", "flips+color+restain"):
        # Stain and illumination differ between slides.
        # Patients' cells range from pink to violet: hue, saturation and per-channel gain.
        image = tf.image.stateless_random_hue(image, 0.08, seeds[3])
        image = tf.image.stateless_random_saturation(image, 0.6, 1.5, seeds[4])
        image = tf.image.stateless_random_contrast(image, 0.8, 1.2, seeds[5])
        image = image * tf.random.stateless_uniform([3], seeds[6], 0.9, 1.1)
        image = image * tf.random.stateless_uniform([], seeds[7], 0.8, 1.2)
    if mode == "flips+stain":
        # Stain density: by Beer-Lambert, a slide stained k times as densely has k times
        # the optical density -log(I), i.e. I ** k. Patients here span about 0.5x to 2x
        # (pale pink to deep violet), per channel as well as overall. Unlike a gain, this
        # changes the contrast between a parasite and its cell, so the per-cell stain
        # normalisation inside the model does not undo it.
        density = tf.exp(tf.random.stateless_uniform([], seeds[8], -0.7, 0.7))
        density *= tf.exp(tf.random.stateless_uniform([3], seeds[9], -0.2, 0.2))
        image = tf.pow(tf.clip_by_value(image, 0.0, 1.0), density)
    if mode == "flips+color+focus":
        # Focus differs between slides and fields: unsharp masking with a random signed
        # amount blurs (amount < 0) or sharpens (amount > 0) the whole cell.
        blurred = _gaussian_blur(image, sigma=1.0)
        amount = tf.random.stateless_uniform([], seeds[10], -1.0, 1.0)
        image = image + amount * (image - blurred)
    if mode == "flips+color+blur":
        # Defocus, as a field out of focus is cut: half the cells blurred with sigma up to 3 px
        # at a 64 px cell (1.5 px at the detector's 32 px cell, the shift suite's strongest),
        # against a plasma-coloured surround that bleeds into the rim as it does in a field.
        sigma = tf.where(tf.random.stateless_uniform([], seeds[8]) < 0.5,
                         tf.random.stateless_uniform([], seeds[9], 0.3, 3.0), 0.0)
        image = tf.clip_by_value(image, 0.0, 1.0)
        surround = tf.reduce_max(tf.reshape(image * surround_mask, [-1, 3]), axis=0)
        filled = image * surround_mask + surround * (1.0 - surround_mask)
        image = tf.cond(sigma > 0.05, lambda: _variable_blur(filled, sigma), lambda: filled)
    if mode == "flips+color+restain":
        image = _restain(tf.clip_by_value(image, 0.0, 1.0), surround_mask, seeds[8])
    return tf.clip_by_value(image, 0.0, 1.0) * surround_mask * 255.0


def _restain(image, inside, seed):
    """Another lab's stain, then ``screen``'s stain normalisation, on about 60% of the cells.

    A field stained with less eosin, or photographed less saturated, keeps its median cell's
    colour after :func:`malaria_cells.fields.stain.normalise_crops`, but not the contrast
    between a parasite and its cell: that is what the model must learn to read. So each cell
    is restained (haematoxylin and eosin optical densities each x0.5 to x1.6, saturation x0.5
    to x1.5, hue within 15 degrees), then its mean optical density per channel is brought
    back to what it was, with the same bounded gains as at screening.
    """
    import tensorflow as tf
    from skimage.color import hed_from_rgb, rgb_from_hed

    seeds = tf.random.experimental.stateless_split(seed, 6)
    count = tf.maximum(tf.reduce_sum(inside), 1.0)
    white = tf.maximum(tf.reduce_max(tf.reshape(image * inside, [-1, 3]), axis=0), 0.2)

    def optical(x):
        return -tf.math.log(tf.clip_by_value(x / white, 1e-3, 1.0))

    def mean_density(x):
        return tf.reduce_sum(tf.reshape(optical(x) * inside, [-1, 3]), axis=0) / count

    before = mean_density(image)
    factors = tf.exp(tf.random.stateless_uniform([2], seeds[0], np.log(0.5), np.log(1.6)))
    factors = tf.concat([factors, [1.0]], axis=0)
    to_hed = tf.constant(hed_from_rgb, tf.float32)
    to_rgb = tf.constant(rgb_from_hed, tf.float32)
    density = tf.reshape(optical(image), [-1, 3])
    change = tf.matmul(tf.matmul(density, to_hed) * (factors - 1.0), to_rgb)
    shifted = tf.clip_by_value(image * tf.exp(-tf.reshape(change, tf.shape(image))), 0.0, 1.0)
    shifted = tf.image.adjust_saturation(shifted, tf.random.stateless_uniform([], seeds[1], 0.5, 1.5))
    shifted = tf.image.adjust_hue(shifted, tf.random.stateless_uniform([], seeds[2], -15 / 360, 15 / 360))
    after = mean_density(shifted)
    measured = (before > 0.03) & (after > 0.03)
    gain = tf.where(measured, tf.clip_by_value(before / tf.maximum(after, 1e-3), 0.5, 2.0), 1.0)
    restained = white * tf.exp(-optical(shifted) * gain)
    return tf.cond(tf.random.stateless_uniform([], seeds[3]) < 0.6, lambda: restained, lambda: image)


def _shift_cell(image, seed):
    """Flips, then what differs between labs, at the strengths the shift suite tests
    (:data:`malaria_cells.shifts.RANGES`), each drawn at random: stain density (overall and
    per channel), hue, saturation, exposure and gamma, defocus (a Gaussian blur up to sigma 3
    px at a 64 px crop, 1.5 px at the detector's 32 px cell), sensor noise and JPEG
    compression. The blur runs on the cell against a plasma-coloured surround, as a blurred
    field is cut, and the surround is black again afterwards."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, 22)
    image = tf.cast(image, tf.float32) / 255.0
    transpose = tf.random.stateless_uniform([], seeds[0]) < 0.5
    image = tf.cond(transpose, lambda: tf.transpose(image, [1, 0, 2]), lambda: image)
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    image = tf.image.stateless_random_flip_up_down(image, seeds[2])
    inside = tf.cast(tf.reduce_max(image, axis=-1, keepdims=True) > 20 / 255, tf.float32)

    def uniform(k, low, high, shape=()):
        return tf.random.stateless_uniform(shape, seeds[k], low, high)

    def sometimes(k, transform):  # each shift on half the cells, so that extremes rarely compound
        return tf.cond(uniform(k, 0.0, 1.0) < 0.5, lambda: transform(image), lambda: image)

    # Stain density (Beer-Lambert: k times the dye, I ** k), 0.6x to 1.6x, a little per channel.
    density = tf.exp(uniform(3, np.log(0.6), np.log(1.6))) * tf.exp(uniform(4, -0.05, 0.05, [3]))
    image = sometimes(16, lambda x: tf.pow(tf.clip_by_value(x, 1e-3, 1.0), density))
    image = sometimes(17, lambda x: tf.image.stateless_random_hue(x, 15 / 360, seeds[5]))
    image = sometimes(18, lambda x: tf.image.stateless_random_saturation(x, 0.6, 1.4, seeds[6]))
    image = sometimes(19, lambda x: tf.clip_by_value(x * uniform(7, 0.85, 1.15, [3]), 0.0, 1.0))
    image = sometimes(20, lambda x: tf.clip_by_value(x * uniform(8, 0.7, 1.4), 0.0, 1.0))
    image = sometimes(21, lambda x: tf.pow(x + 1e-6, uniform(9, 0.7, 1.4)))
    # Defocus on half the cells: the surround filled with the cell's brightest colour first.
    sigma = tf.where(uniform(10, 0.0, 1.0) < 0.5, uniform(11, 0.1, 3.0), 0.0)
    surround = tf.reduce_max(tf.reshape(image * inside, [-1, 3]), axis=0)
    filled = image * inside + surround * (1.0 - inside)
    image = tf.cond(sigma > 0.05, lambda: _variable_blur(filled, sigma), lambda: filled)
    noise = tf.where(uniform(12, 0.0, 1.0) < 0.5, uniform(13, 0.0, 8 / 255), 0.0)
    image = image + noise * tf.random.stateless_normal(tf.shape(image), seeds[14])
    image = tf.clip_by_value(image, 0.0, 1.0)
    image = tf.cond(uniform(15, 0.0, 1.0) < 0.3,
                    lambda: tf.image.stateless_random_jpeg_quality(image, 40, 95, seeds[15]), lambda: image)
    return tf.clip_by_value(image, 0.0, 1.0) * inside * 255.0


def _variable_blur(image, sigma):
    """A Gaussian blur of a (size, size, 3) image with a tensor sigma (up to about 3), 19 taps."""
    import tensorflow as tf

    offsets = tf.range(-9.0, 10.0)
    taps = tf.exp(-0.5 * tf.square(offsets / sigma))
    taps = taps / tf.reduce_sum(taps)
    rows = tf.tile(tf.reshape(taps, [19, 1, 1, 1]), [1, 1, 3, 1])
    cols = tf.tile(tf.reshape(taps, [1, 19, 1, 1]), [1, 1, 3, 1])
    padded = tf.pad(image[tf.newaxis], [[0, 0], [9, 9], [9, 9], [0, 0]], mode="SYMMETRIC")
    blurred = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(blurred, cols, [1, 1, 1, 1], "VALID")[0]


def _gaussian_blur(image, sigma: float):
    import tensorflow as tf

    taps = np.exp(-0.5 * (np.arange(-2, 3) / sigma) ** 2)
    taps = tf.constant(taps / taps.sum(), tf.float32)
    channels = image.shape[-1]
    rows = tf.tile(tf.reshape(taps, [5, 1, 1, 1]), [1, 1, channels, 1])
    cols = tf.tile(tf.reshape(taps, [1, 5, 1, 1]), [1, 1, channels, 1])
    batch = tf.nn.depthwise_conv2d(image[tf.newaxis], rows, [1, 1, 1, 1], "SAME")
    return tf.nn.depthwise_conv2d(batch, cols, [1, 1, 1, 1], "SAME")[0]


def mix_batch(images, labels, seed, alpha: float):
    """Mixup: blend each cell (and its label) with the next one in the batch.

    The weight of a cell's own image is max(w, 1 - w), w ~ Beta(alpha, alpha), so
    every blend still mostly shows the cell its label mostly describes.
    """
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, 2)
    n = tf.shape(labels)[0]
    a = tf.random.stateless_gamma([n], seeds[0], alpha)
    b = tf.random.stateless_gamma([n], seeds[1], alpha)
    weight = a / (a + b + 1e-12)
    weight = tf.maximum(weight, 1.0 - weight)
    mixed = weight[:, None, None, None] * images + (1.0 - weight[:, None, None, None]) * tf.roll(images, 1, axis=0)
    return mixed, weight * labels + (1.0 - weight) * tf.roll(labels, 1, axis=0)


def training_dataset(images, labels, *, batch_size: int, augment: str, seed: int, mixup: float = 0.0):
    """Shuffled, augmented batches of (float RGB 0-255, label), reproducible for a seed."""
    import tensorflow as tf

    def view(x, s):
        return tf.cast(x, tf.float32) if augment == "none" else augment_cell(x, s, augment)

    dataset = _shuffled(images, labels, seed).map(lambda xy, s: (view(xy[0], s), xy[1]),
                                                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch_size)
    if mixup:
        seeds = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True).batch(2)
        dataset = tf.data.Dataset.zip(dataset, seeds).map(lambda xy, s: mix_batch(*xy, s, mixup))
    return dataset.prefetch(tf.data.AUTOTUNE)


def paired_dataset(images, labels, *, batch_size: int, augment: str, seed: int):
    """Shuffled batches of ((one view, another lab's view), label), reproducible for a seed.

    Each cell is augmented twice: once by ``augment``, once by ``"shifts"`` (another lab's
    stain, camera and focus, at the shift suite's strengths), for training that asks both views
    to score alike (:func:`malaria_cells.fields.training.finetune` with a ``consistency``
    weight).

    Parameters
    ----------
    images : numpy.ndarray
        uint8 cells ``(n, size, size, 3)``, black outside each cell.
    labels : numpy.ndarray
        0 or 1 per cell.
    batch_size : int
        Cells per batch (the last batch holds the rest).
    augment : str
        The first view's augmentation (:func:`augment_cell`; ``"none"``: the cell as it is).
    seed : int
        Seeds the shuffle and both views' randomness.

    Returns
    -------
    tf.data.Dataset
        ``((first, second), label)`` batches, float RGB 0-255.
    """
    import tensorflow as tf

    def views(x, y, s):
        first, second = tf.unstack(tf.random.experimental.stateless_split(s, 2))
        plain = tf.cast(x, tf.float32) if augment == "none" else augment_cell(x, first, augment)
        return (plain, augment_cell(x, second, "shifts")), y

    dataset = _shuffled(images, labels, seed).map(lambda xy, s: views(xy[0], xy[1], s),
                                                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _shuffled(images, labels, seed: int):
    """``((cell, label), seed pair)`` elements, reshuffled each epoch, reproducible for a seed."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.float32)))
    dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    return tf.data.Dataset.zip(dataset, seeds)


def evaluation_dataset(images, labels, batch_size: int = 256):
    import tensorflow as tf

    return (
        tf.data.Dataset.from_tensor_slices((images, labels.astype(np.float32)))
        .batch(batch_size)
        .map(lambda x, y: (tf.cast(x, tf.float32), y))
        .prefetch(tf.data.AUTOTUNE)
    )
