"""A record of every screen in a database: which samples were screened, when, with which
model, with what result, down to each counted cell.

SQLite by default (a file: ``sqlite:///lab.db``), PostgreSQL by URL
(``postgresql+psycopg://USER:PASSWORD@HOST/DATABASE``); the schema is made and upgraded by
the Alembic migrations shipped in this package. The command line's ``screen --db`` and
``history``, and ``serve --db``, are thin layers over this API::

    from malaria_cells.fields import Screener
    from malaria_cells.records import open_records

    with open_records("sqlite:///lab.db") as records:
        ids = records.add(Screener().screen(["patient1/"]), report_path="report/")
        for sample in records.samples(since="2026-11-01", call="positive"):
            print(sample.id, sample.name, sample.parasitemia)
        full = records.sample(ids[0])          # with its fields and their cells

A microscopist's review and sign-off, beside the automatic result (append-only)::

    gallery = Gallery()                                 # malaria_cells.fields.Gallery
    result = Screener().screen(["patient1/"], on_field=gallery.add)
    with open_records("sqlite:///lab.db") as records:
        [sample_id] = records.add(result, gallery=gallery)   # keeps the cells to review
        cells = records.cells_for_review(sample_id)          # counted cells, then near misses
        records.review(sample_id, {cells[0].id: "reject"}, reviewer="A. Diallo", comment="stain debris")
        print(records.sample(sample_id).latest_review.call)

See ``docs/records.md`` for the schema, the review rule and migrations.
"""

from .export import CSV_COLUMNS, HISTORY_FORMATS, render_history, write_history
from .review import reviewed_figures
from .schema import CALLS, VERDICTS, CellRecord, FieldRecord, ReviewCellRecord, ReviewRecord, SampleRecord, VerdictRecord
from .store import (DB_ENV, DEFAULT_URL, SOURCES, Records, UnknownRecord, database_url, open_records, redact,
                    schema_revision)

__all__ = ["open_records", "Records", "database_url", "redact", "schema_revision", "SampleRecord", "FieldRecord",
           "CellRecord", "CALLS", "SOURCES", "DB_ENV", "DEFAULT_URL", "HISTORY_FORMATS", "CSV_COLUMNS",
           "write_history", "render_history", "ReviewCellRecord", "ReviewRecord", "VerdictRecord", "VERDICTS",
           "reviewed_figures", "UnknownRecord"]
