"""Streaming many images through :func:`.images.preprocess` on every core, in bounded memory.

The decoders release the GIL, so a pool of threads decodes in parallel. The pool here only
decodes: scoring runs elsewhere (:mod:`.inference`), so no task of this pool ever waits on
another task of it.
"""

from __future__ import annotations

import os
from collections import deque
from functools import lru_cache
from typing import Sequence

import numpy as np

from .images import UnreadableImage, preprocess, read_file

__all__ = ["iter_image_batches", "read_images", "preprocess_many", "workers"]


def workers() -> int:
    """Threads used for decoding (and, elsewhere, scoring): the cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


@lru_cache(maxsize=1)
def _decode_pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(workers(), thread_name_prefix="malaria-cells-decode")


def _preprocess_part(items: Sequence, image_size: int, files: bool, check_crop: bool | str = False):
    """(images of the items that decoded, in order; [(position, reason)] of the others).

    With ``check_crop``, images that are not single-cell crops are refused too (a field
    photograph from its header, before decoding); ``"shape"`` leaves out the colour checks.
    """
    from functools import partial

    from .crop_check import MAX_CROP_SIDE, check_cell_crop
    from .images import dimensions

    check = partial(check_cell_crop, colour=check_crop != "shape") if check_crop else None
    images = np.empty((len(items), image_size, image_size, 3), np.uint8)
    failures: list[tuple[int, str]] = []
    for position, item in enumerate(items):
        try:
            contents = read_file(item) if files else bytes(item)
            if check_crop:
                width, height = dimensions(contents)
                if max(width, height) > MAX_CROP_SIDE:
                    raise UnreadableImage(f"not a single-cell crop ({width}x{height} pixels: a field photograph?); "
                                          "use `malaria-cells screen` for smear photographs")
            images[position] = preprocess(contents, image_size, check=check)
        except UnreadableImage as error:
            failures.append((position, str(error)))
    if failures:
        images = np.delete(images, [position for position, _ in failures], axis=0)
    return images, failures


def _chunks(items: Sequence, size: int) -> list:
    return [items[i : i + size] for i in range(0, len(items), size)]


def preprocess_many(contents: Sequence[bytes], image_size: int, *,
                    check_crop: bool | str = False) -> tuple[np.ndarray, np.ndarray, list]:
    """Decode and resize encoded images held in memory (what a web request carries), in parallel;
    with ``check_crop``, images that are not single-cell crops are refused.

    Returns
    -------
    images : numpy.ndarray
        uint8 (n_decoded, image_size, image_size, 3), in input order.
    decoded : numpy.ndarray of bool
        Which inputs decoded.
    reasons : list of str or None
        Why each input that did not decode was refused (None for the others).
    """
    decoded = np.ones(len(contents), bool)
    reasons: list = [None] * len(contents)
    size = max(1, -(-len(contents) // workers()))
    parts = _chunks(list(contents), size)

    def run(part):
        return _preprocess_part(part, image_size, files=False, check_crop=check_crop)

    # One image is decoded here: handing it to a thread would only add latency.
    results = list(_decode_pool().map(run, parts) if len(parts) > 1 else map(run, parts))
    for offset, (_, failures) in zip(range(0, len(contents), size), results):
        for position, reason in failures:
            decoded[offset + position], reasons[offset + position] = False, reason
    if not results:
        return np.zeros((0, image_size, image_size, 3), np.uint8), decoded, reasons
    return np.concatenate([part_images for part_images, _ in results]), decoded, reasons


def _load_files(paths: Sequence[str], image_size: int, check_crop: bool | str = False):
    images, failures = _preprocess_part(paths, image_size, files=True, check_crop=check_crop)
    bad = {position for position, _ in failures}
    return ([p for i, p in enumerate(paths) if i not in bad], images,
            [(paths[position], reason) for position, reason in failures])


def iter_image_batches(paths: Sequence[str], image_size: int, batch_size: int = 256, *, chunk: int = 32,
                       check_crop: bool | str = False):
    """Yield ``(paths, images, skipped)`` per batch, streaming over any number of files.

    Files are read and decoded on all cores, ``chunk`` files per task, a bounded number
    of tasks ahead, so memory stays flat however many files there are. ``images`` is a
    uint8 array (n, image_size, image_size, 3) in the order of ``paths``; ``skipped``
    lists the ``(path, reason)`` of files left out since the previous batch (with
    ``check_crop``, also the images that are not single-cell crops).
    """
    pool = _decode_pool()
    pending: deque = deque()
    tasks = iter(_chunks(list(paths), chunk))

    def submit():
        part = next(tasks, None)
        if part is not None:
            pending.append(pool.submit(_load_files, part, image_size, check_crop))

    for _ in range(2 * workers() + batch_size // chunk):
        submit()
    ready_paths: list[str] = []
    ready_images: list[np.ndarray] = [np.zeros((0, image_size, image_size, 3), np.uint8)]
    skipped: list[tuple[str, str]] = []
    while pending:
        part_paths, part_images, part_skipped = pending.popleft().result()
        submit()
        ready_paths += part_paths
        ready_images.append(part_images)  # joined once per batch: each cell is copied once
        skipped += part_skipped
        while len(ready_paths) >= batch_size or (not pending and (ready_paths or skipped)):
            images = np.concatenate(ready_images) if len(ready_images) > 1 else ready_images[0]
            yield ready_paths[:batch_size], images[:batch_size], skipped
            ready_paths, ready_images, skipped = ready_paths[batch_size:], [images[batch_size:]], []


def read_images(
    paths: Sequence[str], image_size: int, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Read and preprocess many images into memory.

    Returns
    -------
    images : numpy.ndarray
        uint8 array (n_readable, image_size, image_size, 3).
    readable : numpy.ndarray of bool
        Which of ``paths`` were read (the rows of ``images``, in order).
    skipped : list of (str, str)
        Unreadable files with the reason.
    """
    images = np.empty((len(paths), image_size, image_size, 3), np.uint8)
    readable = np.zeros(len(paths), bool)
    position = {p: i for i, p in enumerate(paths)}
    skipped: list[tuple[str, str]] = []
    count = 0
    for batch_paths, batch, batch_skipped in iter_image_batches(paths, image_size, batch_size):
        images[count : count + len(batch)] = batch
        count += len(batch)
        readable[[position[p] for p in batch_paths]] = True
        skipped += batch_skipped
    return images[:count], readable, skipped
