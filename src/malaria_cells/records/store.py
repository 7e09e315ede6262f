"""Opening a records database and writing and reading screened samples.

:func:`open_records` checks the URL once, at the entrance (a scheme malaria-cells speaks, a
file that is a SQLite database, a server that answers, a schema this code knows), brings the
schema to the newest migration, and returns :class:`Records`. Each sample is written in one
transaction with its fields and cells, so a crash mid-screen leaves whole samples or none.

SQLite runs in WAL mode with a busy timeout, and every write transaction begins with ``BEGIN
IMMEDIATE`` (it takes the write lock first, so a second process waits its turn instead of
failing halfway); PostgreSQL serialises migrations with an advisory lock.
"""

from __future__ import annotations

import datetime
import os
import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from sqlalchemy import create_engine, event, func, insert, inspect, select
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, selectinload, undefer

from ..errors import MalariaCellsError
from .review import check_call, check_comment, check_reviewer, check_verdicts, reviewed_figures
from .schema import CALLS, CellRecord, FieldRecord, ReviewCellRecord, ReviewRecord, SampleRecord, VerdictRecord

if TYPE_CHECKING:
    from ..fields.gallery import Gallery
    from ..fields.results import FieldResult, SampleResult, ScreenResult

__all__ = ["open_records", "Records", "database_url", "DB_ENV", "DEFAULT_URL", "SOURCES", "MIGRATIONS", "UnknownRecord"]

DB_ENV = "MALARIA_CELLS_DB"
"""Environment variable naming the records database (a URL, or a SQLite file's path)."""
DEFAULT_URL = "sqlite:///lab.db"
"""The database used when none is named: ``lab.db`` in the working folder."""
SOURCES = ("cli", "server", "api")
"""What screened a sample: the command line, the web server, or a Python program."""
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
"""The Alembic migrations, shipped inside the package."""
SQLITE_BUSY_SECONDS = 30.0
"""How long a SQLite writer waits for another process's write to finish."""
CONNECT_SECONDS = 10
"""How long connecting to a PostgreSQL server may take."""
_MIGRATION_LOCK = 0x6D616C61  # pg_advisory_xact_lock key held while migrating ("mala")
_SQLITE_HEADER = b"SQLite format 3\x00"
_WRITE = {"malaria_cells_write": True}
_URL_HELP = "sqlite:///FILE (a file on this computer) or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"


class UnknownRecord(MalariaCellsError):
    """No sample record has the id asked for."""


def database_url(url: str | os.PathLike | None = None) -> URL:
    """The records database's URL, checked and normalised (nothing is opened).

    Parameters
    ----------
    url : str or path, optional
        ``sqlite:///FILE`` (relative to the working folder; ``sqlite:////abs/path`` for an
        absolute one), ``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE`` (``postgresql://``
        and ``postgres://`` mean the same), or a plain file path (SQLite). Default:
        ``$MALARIA_CELLS_DB``, else :data:`DEFAULT_URL`.

    Raises
    ------
    MalariaCellsError
        An empty or malformed URL, an unknown scheme or driver, or an in-memory SQLite database
        (it would forget every record).
    """
    if url is None:
        url = os.environ.get(DB_ENV) or DEFAULT_URL
    text = os.fspath(url).strip() if isinstance(url, (str, os.PathLike)) else None
    if text is None:
        raise MalariaCellsError(f"database URL: expected text, got {type(url).__name__}")
    if not text:
        raise MalariaCellsError(f"database URL is empty (use {_URL_HELP})")
    if "://" not in text:
        return URL.create("sqlite+pysqlite", database=text)
    try:
        parsed = make_url(text)
    except (ArgumentError, ValueError):
        raise MalariaCellsError(f"{redact(text)}: not a database URL (use {_URL_HELP})") from None
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    if backend == "sqlite":
        if driver not in ("pysqlite",):
            raise MalariaCellsError(f"{redact(text)}: SQLite driver {driver!r} is not supported (use sqlite:///FILE)")
        if parsed.database in (None, "", ":memory:") or parsed.database.startswith("file:"):
            raise MalariaCellsError(f"{redact(text)}: name a database file (sqlite:///lab.db); an in-memory "
                                    "database would forget every record")
        return parsed.set(drivername="sqlite+pysqlite")
    if backend in ("postgresql", "postgres"):
        if "+" in parsed.drivername and driver != "psycopg":
            raise MalariaCellsError(f"{redact(text)}: PostgreSQL driver {driver!r} is not supported "
                                    "(use postgresql+psycopg://..., psycopg 3)")
        if not parsed.database:
            raise MalariaCellsError(f"{redact(text)}: name the database (postgresql+psycopg://USER@HOST/DATABASE)")
        return parsed.set(drivername="postgresql+psycopg")
    raise MalariaCellsError(f"{redact(text)}: unknown database scheme {parsed.drivername.split('+')[0]!r} "
                            f"(use {_URL_HELP})")


def redact(url: str | URL) -> str:
    """A URL as it may be printed: its password replaced by ``***``."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def open_records(url: str | os.PathLike | None = None, *, create: bool = True) -> Records:
    """Open (and bring up to date) a records database.

    Parameters
    ----------
    url : str or path, optional
        See :func:`database_url` (default ``$MALARIA_CELLS_DB``, else ``sqlite:///lab.db``).
    create : bool
        Make a missing SQLite file, and the schema in an empty database. ``False`` (for
        reading: ``history``) refuses a missing file. Either way a database made by an older
        malaria-cells is upgraded to this one's newest migration.

    Returns
    -------
    Records

    Raises
    ------
    MalariaCellsError
        One line naming the problem: an unknown scheme, a missing folder or file, a file that
        is not a SQLite database, a database that is not malaria-cells' records, a server that
        cannot be reached, or a schema newer than this code.

    Examples
    --------
    >>> from malaria_cells.records import open_records          # doctest: +SKIP
    >>> with open_records("sqlite:///lab.db") as records:         # doctest: +SKIP
    ...     ids = records.add(screen_result, report_path="report/")
    ...     latest = records.samples(call="positive", limit=10)
    """
    parsed = database_url(url)
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_file(parsed, create)
    engine = _engine(parsed)
    try:
        _bring_up_to_date(engine, create)
    except BaseException:
        engine.dispose()
        raise
    return Records(engine)


class Records:
    """The records database: samples written by :meth:`add`, read by :meth:`samples` and
    :meth:`sample`; reviewed by :meth:`review`, with :meth:`cells_for_review` and :meth:`reviews`.
    Made by :func:`open_records`; close it (or use ``with``) when done.

    Safe to share between threads (each call uses its own connection and transaction).
    """

    def __init__(self, engine: Engine):
        self._engine = engine
        self._writer = engine.execution_options(**_WRITE)

    @property
    def url(self) -> str:
        """The database's URL, with its password hidden."""
        return redact(self._engine.url)

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engine.dialect.name

    def __repr__(self) -> str:
        return f"Records({self.url!r})"

    def __enter__(self) -> Records:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the database's connections."""
        self._engine.dispose()

    def add(self, result: ScreenResult, report_path: str | os.PathLike | None = None, *,
            source: str = "api", gallery: Gallery | None = None) -> list[int]:
        """Record every sample of a screen, each in its own transaction with its fields, cells and
        cells for review.

        Parameters
        ----------
        result : ScreenResult
            A screen's result (:meth:`~malaria_cells.fields.Screener.screen`); the pooled
            ``summary`` of several samples is not a sample and is not recorded.
        report_path : str or path, optional
            Where the report was written (``screen --out``), stored as an absolute path.
        source : str
            What screened it: one of :data:`SOURCES`.
        gallery : Gallery, optional
            The screen's gallery (:class:`malaria_cells.fields.Gallery`, or a
            :class:`~malaria_cells.fields.report.ReportWriter`'s ``gallery``), given the fields
            as they were screened (``on_field``): each sample's counted cells and near misses are
            kept with their pictures for a reviewer (:meth:`cells_for_review`). Without it, a
            sample can be reviewed only by its call.

        Returns
        -------
        list of int
            The new samples' ids, in the order of ``result.samples``.

        Raises
        ------
        MalariaCellsError
            When the database cannot be written; samples already written stay, the one being
            written is not there at all.
        """
        from .. import __version__
        from ..fields.results import ScreenResult

        if not isinstance(result, ScreenResult):
            raise MalariaCellsError(f"records: expected a ScreenResult, got {type(result).__name__}")
        if source not in SOURCES:
            raise MalariaCellsError(f"records: source must be one of {', '.join(SOURCES)}, got {source!r}")
        if gallery is not None and not callable(getattr(gallery, "review_cells", None)):
            raise MalariaCellsError(f"records: gallery must be a malaria_cells.fields.Gallery, got "
                                    f"{type(gallery).__name__}")
        report = str(Path(report_path).expanduser().resolve()) if report_path is not None else None
        common = {"screen_uid": str(uuid.uuid4()), "screened_at": datetime.datetime.now(datetime.timezone.utc),
                  "source": source, "tool_version": __version__, "report_path": report,
                  "model": _jsonable(result.model), "model_name": str(result.model.get("path") or "unknown")[:255],
                  "model_version": _text_or_none(result.model.get("trained_at"), 64)}
        return [self._write(sample_row(sample, fields, common), [[cell_values(cell) for cell in item.cells]
                                                                 for item in fields],
                            gallery.review_cells(sample.name) if gallery is not None else [])
                for sample, fields in split_fields(result)]

    def _write(self, row: SampleRecord, cells: list[list[dict]], review_cells: list[dict]) -> int:
        """One sample, its fields, (in bulk) its cells and its cells for review, in one transaction."""
        try:
            with Session(self._writer) as session, session.begin():
                session.add(row)
                session.flush()  # the sample's and its fields' ids
                rows = [{"field_id": item.id, **values} for item, field_cells in zip(row.fields, cells)
                        for values in field_cells]
                if rows:
                    session.execute(insert(CellRecord), rows)
                if review_cells:
                    session.execute(insert(ReviewCellRecord), [{"sample_id": row.id, **values}
                                                               for values in review_cells])
                return row.id
        except DBAPIError as error:
            raise MalariaCellsError(f"{self.url}: could not write sample {row.name!r} ({_one_line(error)})") from None

    def samples(self, *, since: datetime.date | str | None = None, call: str | None = None,
                limit: int | None = None) -> list[SampleRecord]:
        """Recorded samples, newest first, without their fields (see :meth:`sample`).

        Parameters
        ----------
        since : date, datetime or ``YYYY-MM-DD``, optional
            Only samples screened then or later (a date means its start, in UTC; a naive
            datetime is taken as UTC).
        call : str, optional
            Only samples with this call: ``positive``, ``negative`` or ``review``.
        limit : int, optional
            At most this many (the newest).
        """
        query = select(SampleRecord).order_by(SampleRecord.screened_at.desc(), SampleRecord.id.desc())
        if since is not None:
            query = query.where(SampleRecord.screened_at >= _moment(since))
        if call is not None:
            if call not in CALLS:
                raise MalariaCellsError(f"call must be one of {', '.join(CALLS)}, got {call!r}")
            query = query.where(SampleRecord.call == call)
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise MalariaCellsError(f"limit must be a whole number of at least 1, got {limit!r}")
            query = query.limit(limit)

        def run(session):
            found = list(session.scalars(query))
            _attach_latest_reviews(session, found)
            return found

        return self._read(run)

    def sample(self, sample_id: int, *, fields: bool = True) -> SampleRecord:
        """One recorded sample with its fields and their cells (``fields=False``: without them),
        and its ``latest_review``.

        Raises
        ------
        MalariaCellsError
            When no sample has this id.
        """
        _check_id(sample_id)
        query = select(SampleRecord).where(SampleRecord.id == sample_id)
        if fields:
            query = query.options(selectinload(SampleRecord.fields).selectinload(FieldRecord.cells))

        def run(session):
            found = session.scalars(query).one_or_none()
            if found is not None:
                _attach_latest_reviews(session, [found])
            return found

        found = self._read(run)
        if found is None:
            raise UnknownRecord(f"{self.url}: no sample record {sample_id}")
        return found

    def cells_for_review(self, sample_id: int, *, images: bool = True) -> list[ReviewCellRecord]:
        """The sample's cells kept for review, in gallery order (counted cells highest first, then
        near misses); with ``images``, each with its PNG picture loaded (``image``).

        Raises
        ------
        MalariaCellsError
            When no sample has this id.
        """
        self._check_sample(sample_id)
        query = (select(ReviewCellRecord).where(ReviewCellRecord.sample_id == sample_id)
                 .order_by(ReviewCellRecord.position, ReviewCellRecord.id))
        if images:
            query = query.options(undefer(ReviewCellRecord.image))
        return self._read(lambda session: list(session.scalars(query)))

    def review(self, sample_id: int, verdicts: dict | None = None, *, reviewer: str, comment: str | None = None,
               call: str | None = None) -> int:
        """Sign off a sample: record a review, beside (never in place of) the automatic result.

        Reviews are appended, never changed: a newer review supersedes an older one as the
        sample's ``latest_review``, and both stay (:meth:`reviews`). The reviewed count and call
        follow the rule of :mod:`malaria_cells.records.review`.

        Parameters
        ----------
        sample_id : int
            The recorded sample.
        verdicts : dict, optional
            ``{cell id: "confirm" | "reject"}`` for cells of :meth:`cells_for_review`; cells
            without a verdict keep their automatic label.
        reviewer : str
            Who signs (one line).
        comment : str, optional
            A free comment.
        call : str, optional
            The reviewer's own call (``positive``, ``negative``, ``review``); without it, the
            call is derived from the verdicts.

        Returns
        -------
        int
            The review's id.

        Raises
        ------
        MalariaCellsError
            An unknown sample, a cell id not among its cells for review, an unknown verdict or
            call, a missing reviewer, or a database that cannot be written.
        """
        _check_id(sample_id)
        reviewer, comment, call = check_reviewer(reviewer), check_comment(comment), check_call(call)
        sample = self.sample(sample_id, fields=False)
        cells = {cell.id: cell.counted for cell in self.cells_for_review(sample_id, images=False)}
        checked = check_verdicts(verdicts, cells, sample_id)
        figures = reviewed_figures(n_cells=sample.n_cells, n_parasitized=sample.n_parasitized,
                                   automatic_call=sample.call, cells=cells, verdicts=checked, call=call)
        row = ReviewRecord(sample_id=sample_id, reviewed_at=datetime.datetime.now(datetime.timezone.utc),
                           reviewer=reviewer, comment=comment, **figures)
        row.verdicts = [VerdictRecord(cell_id=cell, verdict=verdict) for cell, verdict in sorted(checked.items())]
        try:
            with Session(self._writer) as session, session.begin():
                session.add(row)
                session.flush()
                return row.id
        except DBAPIError as error:
            raise MalariaCellsError(f"{self.url}: could not write the review of sample {sample_id} "
                                    f"({_one_line(error)})") from None

    def reviews(self, sample_id: int) -> list[ReviewRecord]:
        """The sample's reviews, newest first (the first is the one in force), each with its
        ``verdicts``.

        Raises
        ------
        MalariaCellsError
            When no sample has this id.
        """
        self._check_sample(sample_id)
        query = (select(ReviewRecord).where(ReviewRecord.sample_id == sample_id)
                 .order_by(ReviewRecord.id.desc()).options(selectinload(ReviewRecord.verdicts)))
        return self._read(lambda session: list(session.scalars(query)))

    def _check_sample(self, sample_id: int) -> None:
        _check_id(sample_id)
        query = select(SampleRecord.id).where(SampleRecord.id == sample_id)
        if self._read(lambda session: session.scalar(query)) is None:
            raise UnknownRecord(f"{self.url}: no sample record {sample_id}")

    def _read(self, run):
        try:
            with Session(self._engine, expire_on_commit=False) as session, session.begin():
                return run(session)
        except DBAPIError as error:
            raise MalariaCellsError(f"{self.url}: could not read the records ({_one_line(error)})") from None


def _check_id(sample_id) -> None:
    if isinstance(sample_id, bool) or not isinstance(sample_id, int):
        raise MalariaCellsError(f"sample id must be a whole number, got {sample_id!r}")


_IN_LIST = 500
"""Samples up to which their latest reviews are looked up by id (more: every sample's latest)."""


def _attach_latest_reviews(session: Session, samples: list[SampleRecord]) -> None:
    """Set each sample's ``latest_review``: its review with the highest id (the last written)."""
    if not samples:
        return
    latest = select(func.max(ReviewRecord.id)).group_by(ReviewRecord.sample_id)
    ids = [item.id for item in samples]
    if len(ids) <= _IN_LIST:
        latest = latest.where(ReviewRecord.sample_id.in_(ids))
    found = {review.sample_id: review for review in session.scalars(select(ReviewRecord).where(
        ReviewRecord.id.in_(latest.scalar_subquery())))}
    for item in samples:
        item.latest_review = found.get(item.id)


# --------------------------------------------------------------------------- from results to rows


def split_fields(result: ScreenResult) -> list[tuple[SampleResult, list[FieldResult]]]:
    """Each sample of a screen with its own fields (the loop lists them sample after sample)."""
    pairs, start = [], 0
    for sample in result.samples:
        fields = result.fields[start:start + sample.fields]
        start += sample.fields
        if len(fields) != sample.fields or any(item.sample != sample.name for item in fields):
            raise MalariaCellsError(f"records: the fields of sample {sample.name!r} are not where the screen "
                                    "lists them; was the result changed after screening?")
        pairs.append((sample, fields))
    return pairs


def sample_row(sample: SampleResult, fields: Iterable[FieldResult], common: dict) -> SampleRecord:
    """The sample's row, with its fields' rows (cells are written apart, in bulk)."""
    metadata = sample.metadata or {}
    low, high = sample.parasitemia_ci or (None, None)
    corrected = sample.corrected or {}
    corrected_low, corrected_high = corrected.get("parasitemia_ci") or (None, None)
    density = sample.density or {}
    per_ul_low, per_ul_high = density.get("per_ul_ci") or (None, None)
    collected = metadata.get("date")
    row = SampleRecord(
        **common, name=sample.name, patient=metadata.get("patient"), slide=metadata.get("slide"),
        operator=metadata.get("operator"), site=metadata.get("site"), note=metadata.get("note"),
        collected_on=datetime.date.fromisoformat(collected) if collected else None,
        n_fields=sample.fields, n_cells=sample.n_cells, n_parasitized=sample.n_parasitized,
        parasitemia=_float(sample.parasitemia), parasitemia_low=_float(low), parasitemia_high=_float(high),
        corrected_parasitemia=_float(corrected.get("parasitemia")), corrected_low=_float(corrected_low),
        corrected_high=_float(corrected_high), per_ul=_float(density.get("per_ul")), per_ul_low=_float(per_ul_low),
        per_ul_high=_float(per_ul_high), rbc_per_ul=_float(density.get("rbc_per_ul")), call=sample.call,
        reasons=[str(reason) for reason in sample.reasons], stages=_jsonable(sample.stages),
        truth=_jsonable(sample.truth))
    row.fields = [field_row(position, item) for position, item in enumerate(fields)]
    return row


def field_row(position: int, item: FieldResult) -> FieldRecord:
    """A field's row (its cells are written apart, in bulk: :func:`cell_values`)."""
    low, high = item.parasitemia_ci or (None, None)
    return FieldRecord(position=position, path=item.path, width=item.width, height=item.height, frame=item.frame,
                       n_cells=item.n_cells, n_parasitized=item.n_parasitized, parasitemia=_float(item.parasitemia),
                       parasitemia_low=_float(low), parasitemia_high=_float(high),
                       cell_diameter=float(item.cell_diameter), quality_ok=bool(item.quality.get("ok")),
                       applicable=bool(item.quality.get("applicable", True)),
                       flags=[str(flag) for flag in item.quality.get("flags", [])],
                       quality=_jsonable(item.quality), n_excluded=len(item.excluded), seconds=float(item.seconds))


def cell_values(cell) -> dict:
    """A counted cell's column values."""
    x0, y0, x1, y1 = (int(v) for v in cell.bbox)
    return {"x": float(cell.x), "y": float(cell.y), "bbox_x0": x0, "bbox_y0": y0, "bbox_x1": x1, "bbox_y1": y1,
            "probability": float(cell.probability), "label": str(cell.label), "stage": cell.stage,
            "stage_probability": _float(cell.stage_probability)}


# --------------------------------------------------------------------------- opening and migrating


def _check_sqlite_file(url: URL, create: bool) -> None:
    path = Path(url.database).expanduser()
    where = str(url.database)
    if path.is_dir():
        raise MalariaCellsError(f"{where}: a folder, not a database file")
    if not path.exists():
        if not create:
            raise MalariaCellsError(f"{where}: no such database file (screen --db {where} makes it)")
        if not path.parent.is_dir():
            raise MalariaCellsError(f"{where}: folder {path.parent} does not exist")
        return
    try:
        with open(path, "rb") as stream:
            header = stream.read(len(_SQLITE_HEADER))
    except OSError as error:
        raise MalariaCellsError(f"{where}: cannot read ({error.strerror or error})") from None
    if header and header != _SQLITE_HEADER:
        raise MalariaCellsError(f"{where}: not a SQLite database (the file holds something else)")


def _engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_SECONDS})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    try:
        return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": CONNECT_SECONDS})
    except NoSuchModuleError:
        raise MalariaCellsError(f"{redact(url)}: the PostgreSQL driver psycopg is not installed "
                                "(pip install 'psycopg[binary]')") from None


def _sqlite_connect(connection, record) -> None:
    connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (_sqlite_begin)
    cursor = connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
    finally:
        cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    immediate = connection.get_execution_options().get("malaria_cells_write")
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _bring_up_to_date(engine: Engine, create: bool) -> None:
    """Check the schema's revision; run the migrations that are due, one process at a time."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    where = redact(engine.url)
    script = ScriptDirectory(str(MIGRATIONS))
    head = script.get_current_head()

    def look():
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
            return current, [] if current is not None else \
                [name for name in inspect(connection).get_table_names() if name != "alembic_version"]

    try:
        current, tables = _while_locked(engine, look)
    except DBAPIError as error:
        raise MalariaCellsError(_connect_problem(engine, error)) from None
    if current is None and tables:
        raise MalariaCellsError(f"{where}: a database, but not malaria-cells records (it has tables "
                                f"{', '.join(sorted(tables)[:5])} and no schema revision); name another database")
    if current is not None and _unknown(script, current):
        from .. import __version__

        raise MalariaCellsError(f"{where}: schema revision {current!r} is newer than this malaria-cells "
                                f"({__version__}, schema {head}) knows; upgrade malaria-cells to use it")
    if current == head:
        return
    if current is None and not create:
        raise MalariaCellsError(f"{where}: no records yet (an empty database)")
    try:
        _migrate(engine)
    except DBAPIError as error:
        raise MalariaCellsError(f"{where}: could not bring the schema up to date ({_one_line(error)})") from None


def _while_locked(engine: Engine, action):
    """``action()``, tried again for up to :data:`SQLITE_BUSY_SECONDS` while SQLite answers
    "database is locked" at once: it does so without waiting out its busy timeout while another
    process is turning a new database to WAL mode (two processes opening it at once)."""
    deadline = time.monotonic() + SQLITE_BUSY_SECONDS
    while True:
        try:
            return action()
        except DBAPIError as error:
            if engine.dialect.name != "sqlite" or "database is locked" not in str(error.orig) \
                    or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _unknown(script, revision: str) -> bool:
    from alembic.util import CommandError

    try:
        return script.get_revision(revision) is None
    except CommandError:
        return True


def _migrate(engine: Engine) -> None:
    """``alembic upgrade head`` on one connection, inside a transaction holding the write lock
    (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an advisory lock), so that two processes opening
    a new database at once migrate it once."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.execution_options(**_WRITE).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def schema_revision(url: str | os.PathLike | None = None) -> tuple[str | None, str]:
    """The schema revision of a database and the newest one this code knows, opening nothing
    for writing and migrating nothing: ``(current or None, head)``."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    parsed = database_url(url)
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_file(parsed, create=False)
    engine = _engine(parsed)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except DBAPIError as error:
        raise MalariaCellsError(_connect_problem(engine, error)) from None
    finally:
        engine.dispose()
    return current, ScriptDirectory(str(MIGRATIONS)).get_current_head()


def _connect_problem(engine: Engine, error: SQLAlchemyError) -> str:
    where = redact(engine.url)
    if engine.dialect.name == "sqlite":
        return f"{engine.url.database}: not a usable SQLite database ({_one_line(error)})"
    host = f"{engine.url.host or 'localhost'}:{engine.url.port or 5432}"
    return f"{where}: cannot reach the PostgreSQL server at {host} ({_one_line(error)})"


# --------------------------------------------------------------------------- small helpers


def _one_line(error: SQLAlchemyError) -> str:
    original = getattr(error, "orig", None) or error
    text = " ".join(str(original).split())
    return text[:300] or type(original).__name__


def _moment(since) -> datetime.datetime:
    if isinstance(since, str):
        try:
            since = datetime.date.fromisoformat(since)
        except ValueError:
            raise MalariaCellsError(f"since: expected YYYY-MM-DD, got {since!r}") from None
    if isinstance(since, datetime.datetime):
        return since if since.tzinfo else since.replace(tzinfo=datetime.timezone.utc)
    if isinstance(since, datetime.date):
        return datetime.datetime.combine(since, datetime.time(), datetime.timezone.utc)
    raise MalariaCellsError(f"since: expected a date, got {type(since).__name__}")


def _float(value) -> float | None:
    return None if value is None else float(value)


def _text_or_none(value, limit: int) -> str | None:
    return None if value is None else str(value)[:limit]


def _jsonable(value):
    """Plain JSON values (numpy numbers and tuples as Python numbers and lists)."""
    import json

    if value is None:
        return None
    return json.loads(json.dumps(value, default=_plain))


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)
