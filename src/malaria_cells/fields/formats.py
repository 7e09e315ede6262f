"""Output formats of a screen, in one registry that the command line and the server share.

Each format renders a :class:`~.results.ScreenResult` as text: ``table`` (per field and per
sample, for a terminal), ``json`` (everything, :meth:`~.results.ScreenResult.to_dict`) and
``csv`` (one row per counted cell).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Callable, TextIO

from .results import ScreenResult, dumps

__all__ = ["FORMATS", "OutputFormat", "render", "format_table", "write_cells_csv", "format_percent",
           "format_interval"]


def format_percent(value, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def format_interval(ci) -> str:
    return "-" if not ci else f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"


def format_table(result: ScreenResult, *, pooled: bool = False) -> str:
    """Per field and per sample: counts, parasitemia with its interval, quality; the calls.
    ``pooled`` adds the figures of all samples together (when there are several)."""
    lines = [f"{'cells':>6} {'parasitized':>11} {'parasitemia':>11} {'raw 95% CI %':>15}  {'quality':<8} field"]
    for item in result.fields:
        quality = "ok" if item.quality.get("ok") else "low"
        lines.append(f"{item.n_cells:>6} {item.n_parasitized:>11} {format_percent(item.parasitemia):>11} "
                     f"{format_interval(item.parasitemia_ci):>15}  {quality:<8} {item.path}")
        if not item.quality.get("ok"):
            for reason in item.quality.get("reasons", []):
                lines.append(f"{'':>6} {reason}")
        if item.truth:
            t = item.truth
            lines.append(f"{'':>6} truth: {t['n_true']} cells, {format_percent(t['true_parasitemia'])} parasitized; "
                         f"detection F1 {t['f1']:.3f} (precision {t['precision'] or 0:.3f}, recall {t['recall'] or 0:.3f})")
    lines.append("")
    samples = result.samples if len(result.samples) > 1 else [result.summary]
    lines.append(f"{'sample':<20} {'fields':>6} {'cells':>7} {'parasitized':>11} {'parasitemia':>11} "
                 f"{'raw 95% CI %':>15} {'corrected':>10}  call")
    for sample in samples + ([result.summary] if pooled and len(result.samples) > 1 else []):
        corrected = format_percent(sample.corrected["parasitemia"]) if sample.corrected else "-"
        lines.append(f"{sample.name[:20]:<20} {sample.fields:>6} {sample.n_cells:>7} {sample.n_parasitized:>11} "
                     f"{format_percent(sample.parasitemia):>11} {format_interval(sample.parasitemia_ci):>15} {corrected:>10}  "
                     f"{sample.call.upper()}")
        if sample.metadata:
            lines.append(f"{'':<20} " + ", ".join(f"{key} {value}" for key, value in sample.metadata.items()
                                                  if key != "note"))
        if sample.density:
            lines.append(f"{'':<20} {format_density(sample.density)}")
        if sample.stages:
            lines.append(f"{'':<20} stages: " + ", ".join(f"{stage} {n}" for stage, n in sample.stages.items()))
        for reason in sample.reasons:
            lines.append(f"{'':<20} {reason}")
    return "\n".join(lines) + "\n"


def format_density(density: dict) -> str:
    """Parasites per microlitre with its interval and the red-cell count it assumes, in words."""
    low, high = density["per_ul_ci"]
    return (f"parasites/uL {density['per_ul']:,.0f} (95% CI {low:,.0f}-{high:,.0f}; "
            f"{density['rbc_per_ul']:,.0f} red cells/uL)")


def write_cells_csv(result: ScreenResult, stream, **options) -> None:
    """One row per counted cell: sample, field, centre, box, probability, label, and the life stage
    of a Parasitized cell with its probability."""
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["field", "frame", "x", "y", "x0", "y0", "x1", "y1", "probability", "label", "stage",
                     "stage_probability", "sample"])
    for item in result.fields:
        for cell in item.cells:
            writer.writerow([item.path, item.frame, cell.x, cell.y, *cell.bbox, f"{cell.probability:.6f}", cell.label,
                             cell.stage or "", "" if cell.stage_probability is None else f"{cell.stage_probability:.4f}",
                             item.sample])


def _write_table(result: ScreenResult, stream: TextIO, *, pooled: bool = False) -> None:
    stream.write(format_table(result, pooled=pooled))


def _write_json(result: ScreenResult, stream: TextIO, **options) -> None:
    stream.write(dumps(result) + "\n")


@dataclass(frozen=True)
class OutputFormat:
    """One output format: how to write it, and what it is as a download."""

    write: Callable[..., None]
    """``write(result, stream, **options)``; options a format does not use are ignored."""
    media_type: str
    suffix: str
    description: str


FORMATS: dict[str, OutputFormat] = {
    "table": OutputFormat(_write_table, "text/plain", ".txt", "counts, parasitemia and calls per field and sample"),
    "json": OutputFormat(_write_json, "application/json", ".json", "every field, cell, sample and the model"),
    "csv": OutputFormat(write_cells_csv, "text/csv", ".csv", "one row per counted cell"),
}
"""Every output format by name (``screen --format NAME``, ``POST /v1/screen?format=NAME``)."""


def render(result: ScreenResult, name: str) -> str:
    """``result`` in the format ``name`` (a key of :data:`FORMATS`)."""
    from ..errors import MalariaCellsError

    if name not in FORMATS:
        raise MalariaCellsError(f"unknown format {name!r} (choose from {', '.join(FORMATS)})")
    buffer = io.StringIO()
    FORMATS[name].write(result, buffer)
    return buffer.getvalue()
