"""What screening returns: typed results per cell, field, sample and screen, and their JSON.

The JSON form (``ScreenResult.to_dict``) is the one thing ``screen --format json``, the
report's ``report.json`` and ``POST /v1/screen`` all give.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

__all__ = ["CellResult", "FieldResult", "SampleResult", "ScreenResult", "dumps"]


@dataclass
class CellResult:
    """A counted red cell: centre and box in pixels of the frame named by its field."""

    x: float
    y: float
    bbox: list[int]
    probability: float
    label: str
    stage: str | None = None
    """Life stage of a Parasitized cell (ring, trophozoite, schizont, gametocyte), where staged."""
    stage_probability: float | None = None


@dataclass
class FieldResult:
    """One field photograph, screened."""

    path: str
    width: int
    height: int
    frame: str
    quality: dict
    n_cells: int
    n_parasitized: int
    parasitemia: float | None
    parasitemia_ci: list[float] | None
    corrected: dict | None
    cell_diameter: float
    cells: list[CellResult] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)
    truth: dict | None = None
    seconds: float = 0.0
    sample: str = ""
    """The sample the field belongs to."""


@dataclass
class SampleResult:
    """Fields of one sample (a slide or a patient), pooled, with the call."""

    name: str
    fields: int
    n_cells: int
    n_parasitized: int
    parasitemia: float | None
    parasitemia_ci: list[float] | None
    corrected: dict | None
    call: str
    reasons: list[str]
    truth: dict | None = None
    density: dict | None = None
    """Parasites per microlitre of blood: ``{"per_ul", "per_ul_ci", "rbc_per_ul"}``, the
    parasitemia and its interval times the red-cell count per microlitre."""
    stages: dict | None = None
    """Parasitized cells per life stage (``{"ring": n, ...}``), where a stage model ran."""
    metadata: dict | None = None
    """The lab's identifiers (patient, slide, operator, date, site, note; see
    :mod:`.metadata`), where given."""


@dataclass
class ScreenResult:
    """Every field, every sample and the summary of all, with the files skipped and the model."""

    fields: list[FieldResult]
    samples: list[SampleResult]
    summary: SampleResult
    skipped: list[tuple[str, str]]
    model: dict

    def to_dict(self, *, cells: bool = True) -> dict:
        """The JSON form: ``{"fields", "summary", "skipped", "model"}`` and, with several
        samples, ``"samples"``; ``cells=False`` leaves out each field's cell list."""
        fields = []
        for item in self.fields:
            entry = asdict(item)
            if not cells:
                entry.pop("cells")
            fields.append(entry)
        out = {"fields": fields, "summary": asdict(self.summary)}
        if len(self.samples) > 1:
            out["samples"] = [asdict(sample) for sample in self.samples]
        out["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        out["model"] = self.model
        return out


def dumps(result: ScreenResult) -> str:
    """The one JSON object ``screen --format json`` prints."""
    return json.dumps(result.to_dict(), default=float)
