"""Scoring cell image files and folders with a trained model, streaming."""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from .config import CLASS_NAMES
from .datasets import list_image_files, warn_skipped
from .pipeline import iter_image_batches
from .runtimes import CellClassifier, check_threshold, load_model

__all__ = ["Prediction", "iter_predictions", "label_for", "predict", "predict_files"]


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image."""

    path: str
    probability: float
    label: str

    @property
    def parasitized(self) -> bool:
        return self.label == CLASS_NAMES[1]


def label_for(probability: float, threshold: float) -> str:
    return CLASS_NAMES[int(probability >= threshold)]


def iter_predictions(
    inputs: Iterable[str | os.PathLike],
    model: str | os.PathLike | CellClassifier | None = None,
    *,
    threshold: float | None = None,
    batch_size: int = 256,
    tta: bool = False,
    skipped: list | None = None,
    check_crop: bool = True,
) -> Iterator[Prediction]:
    """Score image files and folders (recursively), streaming: memory stays flat.

    Parameters
    ----------
    inputs : iterable of path
        Image files and folders.
    model : path or CellClassifier, optional
        Defaults to the model shipped with the package.
    threshold : float, optional
        Overrides the model's stored threshold.
    batch_size : int
        Images scored at once.
    tta : bool
        Average over the 8 rotations/mirrors of each cell.
    skipped : list, optional
        Receives ``(path, reason)`` for every file that could not be scored.
    check_crop : bool
        Refuse images that are not single red-cell crops (a field photograph, another
        picture, a blank image), with the reason in ``skipped``, instead of labelling them.
    """
    model = load_model(model)
    threshold = model.threshold if check_threshold(threshold) is None else threshold
    files, ignored = list_image_files(inputs)
    if skipped is not None:
        skipped += ignored
    yield from predict_files(files, model, threshold, batch_size=batch_size, tta=tta, skipped=skipped,
                             check_crop=check_crop)


def predict_files(files: Sequence[str], model: CellClassifier, threshold: float, *,
                  batch_size: int = 256, tta: bool = False, skipped: list | None = None, check_crop: bool = True):
    """Stream predictions for a list of image files (see :func:`iter_predictions`)."""
    if check_crop:  # a model trained on grayscale cells takes grayscale crops
        check_crop = "shape" if model.info.get("color") == "gray" else True
    batches = iter_image_batches(files, model.image_size, batch_size, check_crop=check_crop)
    scored = (_scored_ahead(batches, model, tta) if model.parallel_batches
              else ((paths, model.probability(images, tta=tta), bad) for paths, images, bad in batches))
    for paths, probabilities, bad in scored:
        if skipped is not None:
            skipped += bad
        for path, probability in zip(paths, probabilities):
            yield Prediction(path, float(probability), label_for(probability, threshold))


def _scored_ahead(batches, model: CellClassifier, tta: bool, ahead: int = 2):
    """``(paths, images, skipped)`` batches -> ``(paths, probabilities, skipped)``, in order,
    each batch scored on the shared threads while later ones are read.

    Scoring in this thread would cap the network at one core while decoding leaves the
    other half idle; queued with the decoding, both cores stay busy with whichever work
    is ready. Only for models whose calls may run side by side (``parallel_batches``).
    """
    from .runtimes import _scoring_pool

    pool, pending = _scoring_pool(), deque()
    for paths, images, skipped in batches:
        # batch_size = the whole batch: a scoring task must not wait on tasks queued behind it
        pending.append((paths, pool.submit(model.probability, images, tta=tta, batch_size=max(1, len(images))),
                        skipped))
        while len(pending) > ahead:
            paths, scores, skipped = pending.popleft()
            yield paths, scores.result(), skipped
    for paths, scores, skipped in pending:
        yield paths, scores.result(), skipped


def predict(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    model: str | os.PathLike | CellClassifier | None = None,
    *,
    threshold: float | None = None,
    batch_size: int = 256,
    tta: bool = False,
    check_crop: bool = True,
) -> list[Prediction]:
    """Score image files and folders; unreadable files are left out with a warning.

    >>> from malaria_cells import predict
    >>> predict("cell.png")  # doctest: +SKIP
    [Prediction(path='cell.png', probability=0.993, label='Parasitized')]
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    skipped: list = []
    results = list(
        iter_predictions(inputs, model, threshold=threshold, batch_size=batch_size, tta=tta,
                         skipped=skipped, check_crop=check_crop)
    )
    warn_skipped(skipped)
    return results
