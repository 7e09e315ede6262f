"""A microscopist's review of a recorded sample: the reviewed count, parasitemia and call.

The reviewer sees the cells kept for review (the counted Parasitized cells and the near misses
of the sample's gallery) and gives some of them a verdict: ``confirm`` (infected) or
``reject`` (not infected). Cells without a verdict keep their automatic label.

**Reviewed count** = the automatic Parasitized count - the counted cells rejected + the near
misses confirmed (cells below the counting threshold that the reviewer marks infected).
Confirming a counted cell or rejecting a near miss changes no count. The reviewed
parasitemia is that count over the sample's counted cells, with its 95% Wilson interval
(:func:`malaria_cells.proportions.wilson_interval`).

**Reviewed call**, unless the reviewer gives one:

1. ``positive`` when the reviewer confirmed at least one cell as infected (a counted cell or a
   near miss): a parasite seen by a microscopist;
2. else, when the reviewed count is 0: ``negative``, except that an automatic ``review``
   stays ``review`` (too few cells, poor fields or a borderline count are not answered by the
   cells' verdicts: the reviewer says so by giving the call);
3. else (counted cells left that nobody confirmed): the automatic call, except that an
   automatic ``positive`` whose shown cells were rejected, none confirmed, becomes ``review``.
"""

from __future__ import annotations

from typing import Mapping

from ..errors import MalariaCellsError
from ..proportions import wilson_interval
from .schema import CALLS, VERDICTS

__all__ = ["reviewed_figures", "check_verdicts", "check_reviewer", "check_comment", "check_call",
           "MAX_COMMENT", "MAX_REVIEWER"]

MAX_REVIEWER = 200
"""Longest reviewer name (characters)."""
MAX_COMMENT = 4000
"""Longest review comment (characters)."""


def check_verdicts(verdicts, cells: Mapping[int, bool], sample_id: int) -> dict[int, str]:
    """The verdicts as ``{cell id: verdict}``, checked against the sample's cells for review.

    Parameters
    ----------
    verdicts : mapping or None
        ``{cell id: "confirm" | "reject"}``; ids as whole numbers (or their decimal text, as a
        JSON object's keys come).
    cells : mapping
        The sample's cells for review: ``{cell id: counted}``.
    sample_id : int
        For the messages.

    Raises
    ------
    MalariaCellsError
        Not a mapping, an id that is not a whole number or not one of the sample's cells for
        review, or a verdict other than confirm and reject.
    """
    if verdicts is None:
        return {}
    if not isinstance(verdicts, Mapping):
        raise MalariaCellsError(f"verdicts: expected a mapping of cell id to verdict, got {type(verdicts).__name__}")
    out = {}
    for key, verdict in verdicts.items():
        cell_id = _cell_id(key)
        if cell_id not in cells:
            raise MalariaCellsError(f"verdicts: cell {key!r} is not one of sample {sample_id}'s cells for review")
        if verdict not in VERDICTS:
            raise MalariaCellsError(f"verdicts: cell {cell_id}: verdict must be one of {', '.join(VERDICTS)}, "
                                    f"got {verdict!r}")
        out[cell_id] = verdict
    return out


def _cell_id(key) -> int:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.strip().isdecimal():
        return int(key.strip())
    raise MalariaCellsError(f"verdicts: cell ids are whole numbers, got {key!r}")


def check_reviewer(reviewer) -> str:
    """The reviewer's name: one line of text, at most :data:`MAX_REVIEWER` characters."""
    if not isinstance(reviewer, str) or not reviewer.strip():
        raise MalariaCellsError("reviewer: give the reviewer's name")
    reviewer = reviewer.strip()
    if len(reviewer) > MAX_REVIEWER or not reviewer.isprintable():
        raise MalariaCellsError(f"reviewer: one line of at most {MAX_REVIEWER} characters")
    return reviewer


def check_comment(comment) -> str | None:
    """The comment: None, or text of at most :data:`MAX_COMMENT` characters (blank is None)."""
    if comment is None:
        return None
    if not isinstance(comment, str):
        raise MalariaCellsError(f"comment: expected text, got {type(comment).__name__}")
    if len(comment) > MAX_COMMENT:
        raise MalariaCellsError(f"comment: at most {MAX_COMMENT} characters, got {len(comment)}")
    return comment.strip() or None


def check_call(call) -> str | None:
    """The reviewer's own call: None (derived by the rule) or one of :data:`~.schema.CALLS`."""
    if call is not None and call not in CALLS:
        raise MalariaCellsError(f"call must be one of {', '.join(CALLS)}, got {call!r}")
    return call


def reviewed_figures(*, n_cells: int, n_parasitized: int, automatic_call: str, cells: Mapping[int, bool],
                     verdicts: Mapping[int, str], call: str | None = None) -> dict:
    """The reviewed counts, parasitemia and call, by the rule in this module's docstring.

    Parameters
    ----------
    n_cells, n_parasitized : int
        The sample's automatic counts.
    automatic_call : str
        The sample's automatic call.
    cells : mapping
        The sample's cells for review: ``{cell id: counted}``.
    verdicts : mapping
        Checked verdicts (:func:`check_verdicts`).
    call : str, optional
        The reviewer's own call (checked: :func:`check_call`).

    Returns
    -------
    dict
        ``{"n_confirmed", "n_rejected", "n_added", "n_cells", "n_parasitized", "parasitemia",
        "parasitemia_low", "parasitemia_high", "call", "call_given"}``.
    """
    confirmed = sum(1 for cell, verdict in verdicts.items() if cells[cell] and verdict == "confirm")
    rejected = sum(1 for cell, verdict in verdicts.items() if cells[cell] and verdict == "reject")
    added = sum(1 for cell, verdict in verdicts.items() if not cells[cell] and verdict == "confirm")
    count = max(0, n_parasitized - rejected + added)
    low, high = wilson_interval(count, n_cells) if n_cells else (None, None)
    return {"n_confirmed": confirmed, "n_rejected": rejected, "n_added": added, "n_cells": n_cells,
            "n_parasitized": count, "parasitemia": count / n_cells if n_cells else None,
            "parasitemia_low": low, "parasitemia_high": high,
            "call": call or _call(count, confirmed + added, rejected, automatic_call), "call_given": call is not None}


def _call(count: int, seen_infected: int, rejected: int, automatic: str) -> str:
    if seen_infected:
        return "positive"
    if count == 0:
        return "review" if automatic == "review" else "negative"
    if automatic == "positive" and rejected:
        return "review"
    return automatic
