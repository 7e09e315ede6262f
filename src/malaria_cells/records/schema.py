"""The records' tables as SQLAlchemy 2 ORM classes: a screened sample, its fields, their cells,
the cells kept for a microscopist's review, and the reviews.

The automatic results are written once and never updated: a microscopist's review stands
beside them, keyed by the sample's id, with its own counts, call, reviewer and time, one row
per review and one per cell verdict (an append-only trail: a newer review supersedes an older
one, which stays).

The tables are made and changed only by the migrations in ``migrations/versions`` (Alembic),
never by ``create_all``; these classes describe them for queries and for Alembic's
autogenerate, which compares the two when a developer writes the next migration.
"""

from __future__ import annotations

import datetime

from sqlalchemy import (JSON, Boolean, CheckConstraint, Date, DateTime, Float, ForeignKey, Integer, LargeBinary,
                        MetaData, String, Text, UniqueConstraint)
from sqlalchemy import inspect as inspect_instance
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

__all__ = ["Base", "SampleRecord", "FieldRecord", "CellRecord", "ReviewCellRecord", "ReviewRecord", "VerdictRecord",
           "CALLS", "VERDICTS", "UTCDateTime"]

CALLS = ("positive", "negative", "review")
"""The calls a sample can have (:mod:`malaria_cells.fields.call`)."""
VERDICTS = ("confirm", "reject")
"""A reviewer's verdict on a cell shown for review: ``confirm`` (it is infected) or ``reject`` (it is not)."""

JSONValue = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator):
    """A point in time stored in UTC and read back as an aware UTC datetime on every backend
    (SQLite keeps no time zone: a naive value read there is UTC by construction)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("UTCDateTime needs an aware datetime")
        value = value.astimezone(datetime.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=datetime.timezone.utc)
        return value.astimezone(datetime.timezone.utc)


NAMING_CONVENTION = {"ix": "ix_%(column_0_label)s", "uq": "uq_%(table_name)s_%(column_0_name)s",
                     "ck": "ck_%(table_name)s_%(constraint_name)s",
                     "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s", "pk": "pk_%(table_name)s"}
"""Constraint names fixed by rule, so that a later migration can name what it changes (SQLite's
batch migrations rebuild a table and need every constraint's name)."""


class Base(DeclarativeBase):
    """Declarative base of the records' tables."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SampleRecord(Base):
    """One screened sample: its identifiers, pooled counts, parasitemia, call and provenance."""

    __tablename__ = "samples"
    __table_args__ = (CheckConstraint("call IN ('positive', 'negative', 'review')", name="call"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    screen_uid: Mapped[str] = mapped_column(String(36), index=True)
    """Samples screened together (one ``screen`` command, one request) share it."""
    screened_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, index=True)
    source: Mapped[str] = mapped_column(String(16))
    """What screened it: ``cli``, ``server`` or ``api``."""
    name: Mapped[str] = mapped_column(Text)
    patient: Mapped[str | None] = mapped_column(String(200), index=True)
    slide: Mapped[str | None] = mapped_column(String(200))
    operator: Mapped[str | None] = mapped_column(String(200))
    collected_on: Mapped[datetime.date | None] = mapped_column(Date)
    """The date the blood was taken (the metadata's ``date``)."""
    site: Mapped[str | None] = mapped_column(String(200))
    note: Mapped[str | None] = mapped_column(Text)
    n_fields: Mapped[int] = mapped_column(Integer)
    n_cells: Mapped[int] = mapped_column(Integer)
    n_parasitized: Mapped[int] = mapped_column(Integer)
    parasitemia: Mapped[float | None] = mapped_column(Float)
    parasitemia_low: Mapped[float | None] = mapped_column(Float)
    parasitemia_high: Mapped[float | None] = mapped_column(Float)
    corrected_parasitemia: Mapped[float | None] = mapped_column(Float)
    corrected_low: Mapped[float | None] = mapped_column(Float)
    corrected_high: Mapped[float | None] = mapped_column(Float)
    per_ul: Mapped[float | None] = mapped_column(Float)
    per_ul_low: Mapped[float | None] = mapped_column(Float)
    per_ul_high: Mapped[float | None] = mapped_column(Float)
    rbc_per_ul: Mapped[float | None] = mapped_column(Float)
    call: Mapped[str] = mapped_column(String(16), index=True)
    reasons: Mapped[list] = mapped_column(JSONValue)
    stages: Mapped[dict | None] = mapped_column(JSONValue)
    truth: Mapped[dict | None] = mapped_column(JSONValue)
    model_name: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[dict] = mapped_column(JSONValue)
    """The screen's whole ``model`` block: threshold, field figures, stage model, detector."""
    tool_version: Mapped[str] = mapped_column(String(32))
    report_path: Mapped[str | None] = mapped_column(Text)

    fields: Mapped[list[FieldRecord]] = relationship(back_populates="sample", order_by="FieldRecord.position",
                                                     cascade="all, delete-orphan", passive_deletes=True,
                                                     lazy="raise")

    latest_review = None
    """The review in force (the last written), set by :meth:`~.store.Records.samples` and
    :meth:`~.store.Records.sample`; None when the sample has not been reviewed (not a column)."""

    def __repr__(self) -> str:
        return f"SampleRecord(id={self.id!r}, name={self.name!r}, call={self.call!r})"

    @property
    def metadata_dict(self) -> dict:
        """The lab's identifiers, as :class:`~malaria_cells.fields.metadata.SampleMetadata` names them."""
        values = {"patient": self.patient, "slide": self.slide, "operator": self.operator,
                  "date": self.collected_on.isoformat() if self.collected_on else None, "site": self.site,
                  "note": self.note}
        return {key: value for key, value in values.items() if value}

    def to_dict(self) -> dict:
        """The record as JSON-ready values; ``fields`` (each with its ``cells``) where they were loaded
        (:meth:`~.store.Records.sample`), absent otherwise (:meth:`~.store.Records.samples`)."""
        out = {"id": self.id, "screen_uid": self.screen_uid, "screened_at": _iso(self.screened_at),
               "source": self.source, "name": self.name, "metadata": self.metadata_dict, "n_fields": self.n_fields,
               "n_cells": self.n_cells, "n_parasitized": self.n_parasitized, "parasitemia": self.parasitemia,
               "parasitemia_ci": _pair(self.parasitemia_low, self.parasitemia_high),
               "corrected_parasitemia": self.corrected_parasitemia,
               "corrected_parasitemia_ci": _pair(self.corrected_low, self.corrected_high),
               "density": None if self.per_ul is None else {
                   "per_ul": self.per_ul, "per_ul_ci": _pair(self.per_ul_low, self.per_ul_high),
                   "rbc_per_ul": self.rbc_per_ul},
               "call": self.call, "reasons": list(self.reasons), "stages": self.stages, "truth": self.truth,
               "model": {"name": self.model_name, "version": self.model_version, "details": self.model},
               "tool_version": self.tool_version, "report_path": self.report_path,
               "latest_review": None if self.latest_review is None else self.latest_review.to_dict()}
        if "fields" not in inspect_instance(self).unloaded:
            out["fields"] = [item.to_dict() for item in self.fields]
        return out


class FieldRecord(Base):
    """One field photograph of a sample: its counts and quality."""

    __tablename__ = "fields"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    """Order of the field within its sample, from 0."""
    path: Mapped[str] = mapped_column(Text)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    frame: Mapped[str] = mapped_column(String(32))
    n_cells: Mapped[int] = mapped_column(Integer)
    n_parasitized: Mapped[int] = mapped_column(Integer)
    parasitemia: Mapped[float | None] = mapped_column(Float)
    parasitemia_low: Mapped[float | None] = mapped_column(Float)
    parasitemia_high: Mapped[float | None] = mapped_column(Float)
    cell_diameter: Mapped[float] = mapped_column(Float)
    quality_ok: Mapped[bool] = mapped_column(Boolean)
    applicable: Mapped[bool] = mapped_column(Boolean)
    flags: Mapped[list] = mapped_column(JSONValue)
    quality: Mapped[dict] = mapped_column(JSONValue)
    """The field's whole quality block (focus, stain and the checks' measures, reasons)."""
    n_excluded: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)

    sample: Mapped[SampleRecord] = relationship(back_populates="fields", lazy="raise")
    cells: Mapped[list[CellRecord]] = relationship(back_populates="field", order_by="CellRecord.id",
                                                   cascade="all, delete-orphan", passive_deletes=True,
                                                   lazy="raise")

    def to_dict(self) -> dict:
        """The field as JSON-ready values; ``cells`` where loaded."""
        out = {"id": self.id, "position": self.position, "path": self.path, "width": self.width,
               "height": self.height, "frame": self.frame, "n_cells": self.n_cells,
               "n_parasitized": self.n_parasitized, "parasitemia": self.parasitemia,
               "parasitemia_ci": _pair(self.parasitemia_low, self.parasitemia_high),
               "cell_diameter": self.cell_diameter, "quality_ok": self.quality_ok, "applicable": self.applicable,
               "flags": list(self.flags), "quality": self.quality, "n_excluded": self.n_excluded,
               "seconds": self.seconds}
        if "cells" not in inspect_instance(self).unloaded:
            out["cells"] = [cell.to_dict() for cell in self.cells]
        return out


class CellRecord(Base):
    """One counted red cell: centre and box in pixels of its field, probability, label, stage."""

    __tablename__ = "cells"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    field_id: Mapped[int] = mapped_column(ForeignKey("fields.id", ondelete="CASCADE"), index=True)
    x: Mapped[float] = mapped_column(Float)
    y: Mapped[float] = mapped_column(Float)
    bbox_x0: Mapped[int] = mapped_column(Integer)
    bbox_y0: Mapped[int] = mapped_column(Integer)
    bbox_x1: Mapped[int] = mapped_column(Integer)
    bbox_y1: Mapped[int] = mapped_column(Integer)
    probability: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str | None] = mapped_column(String(16))
    stage_probability: Mapped[float | None] = mapped_column(Float)

    field: Mapped[FieldRecord] = relationship(back_populates="cells", lazy="raise")

    def to_dict(self) -> dict:
        """The cell as JSON-ready values (``bbox`` as ``[x0, y0, x1, y1]``)."""
        return {"x": self.x, "y": self.y, "bbox": [self.bbox_x0, self.bbox_y0, self.bbox_x1, self.bbox_y1],
                "probability": self.probability, "label": self.label, "stage": self.stage,
                "stage_probability": self.stage_probability}


class ReviewCellRecord(Base):
    """A cell kept for review when its sample was recorded: a counted Parasitized cell or a near
    miss, as the report's gallery chooses them, with its picture (PNG, the photograph's own pixels)."""

    __tablename__ = "review_cells"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    """Rank in the gallery, from 0: counted cells highest first, then near misses highest first."""
    counted: Mapped[bool] = mapped_column(Boolean)
    """Counted Parasitized (True) or a near miss below the counting threshold (False)."""
    probability: Mapped[float] = mapped_column(Float)
    field: Mapped[str] = mapped_column(Text)
    """The field photograph's file name."""
    x: Mapped[float] = mapped_column(Float)
    y: Mapped[float] = mapped_column(Float)
    stage: Mapped[str | None] = mapped_column(String(16))
    stage_probability: Mapped[float | None] = mapped_column(Float)
    image: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    """PNG bytes of the cell at its field's own resolution, with some context."""

    def to_dict(self, *, image: bool = False) -> dict:
        """The cell as JSON-ready values; with ``image``, its picture as a PNG data URL."""
        out = {"id": self.id, "position": self.position, "counted": self.counted, "probability": self.probability,
               "field": self.field, "x": self.x, "y": self.y, "stage": self.stage,
               "stage_probability": self.stage_probability}
        if image:
            import base64

            out["image"] = "data:image/png;base64," + base64.b64encode(self.image).decode()
        return out


class ReviewRecord(Base):
    """A microscopist's sign-off of a sample: the reviewed counts, parasitemia and call, who, when."""

    __tablename__ = "reviews"
    __table_args__ = (CheckConstraint("call IN ('positive', 'negative', 'review')", name="call"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    reviewed_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, index=True)
    reviewer: Mapped[str] = mapped_column(String(200))
    comment: Mapped[str | None] = mapped_column(Text)
    n_confirmed: Mapped[int] = mapped_column(Integer)
    """Counted cells the reviewer confirmed."""
    n_rejected: Mapped[int] = mapped_column(Integer)
    """Counted cells the reviewer rejected (not infected)."""
    n_added: Mapped[int] = mapped_column(Integer)
    """Near misses the reviewer marked infected."""
    n_cells: Mapped[int] = mapped_column(Integer)
    n_parasitized: Mapped[int] = mapped_column(Integer)
    """The reviewed count: the automatic count - rejected + near misses marked infected."""
    parasitemia: Mapped[float | None] = mapped_column(Float)
    parasitemia_low: Mapped[float | None] = mapped_column(Float)
    parasitemia_high: Mapped[float | None] = mapped_column(Float)
    call: Mapped[str] = mapped_column(String(16))
    call_given: Mapped[bool] = mapped_column(Boolean)
    """The reviewer gave the call (True) rather than the review rule deriving it."""

    verdicts: Mapped[list[VerdictRecord]] = relationship(back_populates="review", order_by="VerdictRecord.cell_id",
                                                         cascade="all, delete-orphan", passive_deletes=True,
                                                         lazy="raise")

    def to_dict(self) -> dict:
        """The review as JSON-ready values; ``verdicts`` (``{cell_id: verdict}``) where loaded."""
        out = {"id": self.id, "sample_id": self.sample_id, "reviewed_at": _iso(self.reviewed_at),
               "reviewer": self.reviewer, "comment": self.comment, "n_confirmed": self.n_confirmed,
               "n_rejected": self.n_rejected, "n_added": self.n_added, "n_cells": self.n_cells,
               "n_parasitized": self.n_parasitized, "parasitemia": self.parasitemia,
               "parasitemia_ci": _pair(self.parasitemia_low, self.parasitemia_high), "call": self.call,
               "call_given": self.call_given}
        if "verdicts" not in inspect_instance(self).unloaded:
            out["verdicts"] = {str(item.cell_id): item.verdict for item in self.verdicts}
        return out


class VerdictRecord(Base):
    """A reviewer's verdict on one cell shown for review."""

    __tablename__ = "review_verdicts"
    __table_args__ = (CheckConstraint("verdict IN ('confirm', 'reject')", name="verdict"),
                      UniqueConstraint("review_id", "cell_id", name="uq_review_verdicts_review_id_cell_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    review_id: Mapped[int] = mapped_column(ForeignKey("reviews.id", ondelete="CASCADE"), index=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("review_cells.id", ondelete="CASCADE"))
    verdict: Mapped[str] = mapped_column(String(16))

    review: Mapped[ReviewRecord] = relationship(back_populates="verdicts", lazy="raise")


def _pair(low, high) -> list[float] | None:
    return None if low is None or high is None else [low, high]


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
