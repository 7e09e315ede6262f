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

See ``docs/records.md`` for the schema and migrations.
"""

from .export import CSV_COLUMNS, HISTORY_FORMATS, render_history, write_history
from .schema import CALLS, CellRecord, FieldRecord, SampleRecord
from .store import DB_ENV, DEFAULT_URL, SOURCES, Records, database_url, open_records, redact, schema_revision

__all__ = ["open_records", "Records", "database_url", "redact", "schema_revision", "SampleRecord", "FieldRecord",
           "CellRecord", "CALLS", "SOURCES", "DB_ENV", "DEFAULT_URL", "HISTORY_FORMATS", "CSV_COLUMNS",
           "write_history", "render_history"]
