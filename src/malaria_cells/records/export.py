"""The ``history`` listing of recorded samples: a table for a terminal, CSV and JSON for export."""

from __future__ import annotations

import csv
import json
from typing import Sequence, TextIO

from ..errors import MalariaCellsError
from .schema import SampleRecord

__all__ = ["HISTORY_FORMATS", "CSV_COLUMNS", "write_history", "render_history"]

HISTORY_FORMATS = ("table", "csv", "json")
"""``table`` (for a terminal), ``csv`` (one row per sample) and ``json`` (``{"samples": [...]}``, each
with its ``latest_review``)."""
CSV_COLUMNS = ("id", "screened_at", "name", "patient", "slide", "operator", "date", "site", "note", "call", "reasons",
               "n_fields", "n_cells", "n_parasitized", "parasitemia", "parasitemia_low", "parasitemia_high",
               "corrected_parasitemia", "corrected_low", "corrected_high", "per_ul", "per_ul_low", "per_ul_high",
               "rbc_per_ul", "stages", "model_name", "model_version", "tool_version", "source", "report_path",
               "screen_uid", "reviewed_call", "reviewer", "reviewed_at")
"""The columns of ``history --format csv``, in order; the last three are the latest review's
(empty for a sample not reviewed)."""
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def render_history(samples: Sequence[SampleRecord], format: str = "table") -> str:
    """The samples as text in ``format`` (one of :data:`HISTORY_FORMATS`)."""
    import io

    stream = io.StringIO(newline="")
    write_history(samples, stream, format)
    return stream.getvalue()


def write_history(samples: Sequence[SampleRecord], stream: TextIO, format: str = "table") -> None:
    """Write the samples (as :meth:`~.store.Records.samples` gives them) to ``stream``.

    Raises
    ------
    MalariaCellsError
        An unknown format.
    """
    if format not in HISTORY_FORMATS:
        raise MalariaCellsError(f"unknown format {format!r} (choose from {', '.join(HISTORY_FORMATS)})")
    {"table": _table, "csv": _csv, "json": _json}[format](samples, stream)


def _table(samples: Sequence[SampleRecord], stream: TextIO) -> None:
    if not samples:
        stream.write("no samples recorded (that match)\n")
        return
    stream.write(f"{'id':>6}  {'screened (UTC)':<16}  {'sample':<20} {'patient':<12} {'call':<8} {'reviewed':<8} "
                 f"{'parasitemia':>11} {'parasites/uL':>12} {'cells':>7}  {'reviewer, when (UTC)':<28}  model\n")
    for item in samples:
        percent = "-" if item.parasitemia is None else f"{100 * item.parasitemia:.2f}%"
        per_ul = "-" if item.per_ul is None else f"{item.per_ul:,.0f}"
        model = item.model_name + (f" ({item.model_version})" if item.model_version else "")
        review = item.latest_review
        reviewed = "-" if review is None else review.call.upper()
        signed = "-" if review is None else f"{_cut(review.reviewer, 11)} {review.reviewed_at:%Y-%m-%d %H:%M}"
        stream.write(f"{item.id:>6}  {item.screened_at:%Y-%m-%d %H:%M}  {_cut(item.name, 20):<20} "
                     f"{_cut(item.patient or '-', 12):<12} {item.call.upper():<8} {reviewed:<8} {percent:>11} "
                     f"{per_ul:>12} {item.n_cells:>7}  {signed:<28}  {model}\n")
    stream.write(f"{len(samples)} sample{'s' if len(samples) != 1 else ''}\n")


def _csv(samples: Sequence[SampleRecord], stream: TextIO) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for item in samples:
        values = {column: getattr(item, column, None) for column in CSV_COLUMNS}
        values.update(screened_at=item.screened_at.isoformat().replace("+00:00", "Z"),
                      date=item.collected_on.isoformat() if item.collected_on else None,
                      reasons="; ".join(item.reasons),
                      stages=";".join(f"{stage}={n}" for stage, n in item.stages.items()) if item.stages else None,
                      **_review_columns(item.latest_review))
        writer.writerow([_cell(values[column]) for column in CSV_COLUMNS])


def _review_columns(review) -> dict:
    if review is None:
        return {"reviewed_call": None, "reviewer": None, "reviewed_at": None}
    return {"reviewed_call": review.call, "reviewer": review.reviewer,
            "reviewed_at": review.reviewed_at.isoformat().replace("+00:00", "Z")}


def _json(samples: Sequence[SampleRecord], stream: TextIO) -> None:
    stream.write(json.dumps({"samples": [item.to_dict() for item in samples]}, indent=1))
    stream.write("\n")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "~"


def _cell(value) -> str:
    """A CSV value; text that a spreadsheet would run as a formula is quoted with a leading '."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text
