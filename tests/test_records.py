"""The records database: every screened sample, its fields and counted cells, written whole or
not at all, by the command line, the server and the Python API, on SQLite and on a real
PostgreSQL (``$MALARIA_CELLS_TEST_POSTGRES``, which .ci/run sets; skipped where it is unset).

Synthetic samples only, screened by the rule classifier of test_fields.py and a stand-in stage
model, so nothing here loads TensorFlow or a trained model.
"""

import copy
import csv
import datetime
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import malaria_cells.fields
from malaria_cells import MalariaCellsError
from malaria_cells.cli import main
from malaria_cells.fields import Gallery, Screener
from malaria_cells.fields.metadata import SampleMetadata, attach_metadata
from malaria_cells.proportions import wilson_interval
from malaria_cells.records import (CSV_COLUMNS, CellRecord, FieldRecord, Records, ReviewCellRecord, ReviewRecord,
                                   SampleRecord, UnknownRecord, VerdictRecord, database_url, open_records,
                                   render_history, reviewed_figures, schema_revision)
from malaria_cells.records.store import MIGRATIONS
from malaria_cells.serving import create_app

from conftest import encode, make_field
from test_fields import FIGURES, PurpleDotClassifier, _write_sample

POSTGRES_ENV = "MALARIA_CELLS_TEST_POSTGRES"
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


class RingStages:
    """A stand-in stage model: every Parasitized cell is a ring, with probability 0.9."""

    image_size = 64
    info = {"trained_at": "2026-01-01T00:00:00"}
    path = "ring-stages.keras"

    def predict(self, crops):
        return ["ring"] * len(crops), [0.9] * len(crops)


def screener(**options) -> Screener:
    return Screener(PurpleDotClassifier(FIGURES), stages=RingStages(), **options)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    _write_sample(root / "infected", 4, [5] * 4, 100)  # 20 of ~250 cells: positive
    _write_sample(root / "healthy", 8, [0] * 8, 200)   # none of ~500: negative
    return root


@pytest.fixture(scope="module")
def screened(samples):
    """One screen of two samples, labelled as a lab would label them."""
    result = screener().screen([samples / "infected", samples / "healthy"])
    attach_metadata(result, {"infected": SampleMetadata(patient="P-1", slide="S-1", date="2026-11-30")},
                    SampleMetadata(operator="A. Diallo", site="Kisumu"))
    assert [(s.name, s.call) for s in result.samples] == [("infected", "positive"), ("healthy", "negative")]
    return result


@pytest.fixture(scope="module")
def galleried(samples):
    """The same screen, with the gallery a reviewer will see kept as the fields were screened."""
    gallery = Gallery()
    result = screener().screen([samples / "infected", samples / "healthy"], on_field=gallery.add)
    return result, gallery


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A new, empty database: a SQLite file, or a database made for this test on the PostgreSQL
    server that ``$MALARIA_CELLS_TEST_POSTGRES`` names (its user needs CREATEDB)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lab.db'}"
        return
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"${POSTGRES_ENV} is not set: a postgresql+psycopg:// URL whose user may create databases "
                    "(.ci/run starts a server and sets it)")
    name = f"malaria_cells_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(database_url(base), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield database_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def counts(url, tables=(SampleRecord, FieldRecord, CellRecord)) -> tuple[int, ...]:
    """Samples, fields and cells in the database, counted by a connection of the test's own."""
    engine = create_engine(database_url(url))
    try:
        with Session(engine) as session:
            return tuple(session.scalar(select(func.count()).select_from(table)) for table in tables)
    finally:
        engine.dispose()


def expected_counts(result, times: int = 1) -> tuple[int, int, int]:
    return (times * len(result.samples), times * len(result.fields),
            times * sum(len(f.cells) for f in result.fields))


# --------------------------------------------------------------------------- the schema


def test_migrations_make_the_schema_from_empty_and_match_the_tables_declared(db_url):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    if database_url(db_url).get_backend_name() == "sqlite":
        open(database_url(db_url).database, "wb").close()  # an empty file is an empty SQLite database
    assert schema_revision(db_url)[0] is None
    open_records(db_url).close()
    current, head = schema_revision(db_url)
    assert current == head == "0002"
    engine = create_engine(database_url(db_url))
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, SampleRecord.metadata) == []  # no migration missing
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with engine.begin() as connection:  # down and up again: each migration can be undone
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
        with engine.connect() as connection:
            assert set(connection.dialect.get_table_names(connection)) <= {"alembic_version"}
    finally:
        engine.dispose()
    open_records(db_url).close()
    assert schema_revision(db_url)[0] == head


def test_a_sample_is_recorded_whole_and_read_back(db_url, screened, tmp_path):
    with open_records(db_url) as records:
        ids = records.add(screened, report_path=tmp_path / "report")
        assert len(ids) == 2 and ids[0] < ids[1]
        infected = records.sample(ids[0])
        source = screened.samples[0]
        assert (infected.name, infected.call, infected.n_cells, infected.n_parasitized) == \
               (source.name, "positive", source.n_cells, source.n_parasitized)
        assert infected.parasitemia == pytest.approx(source.parasitemia)
        assert [infected.parasitemia_low, infected.parasitemia_high] == pytest.approx(source.parasitemia_ci)
        assert infected.corrected_parasitemia == pytest.approx(source.corrected["parasitemia"])
        assert infected.per_ul == pytest.approx(source.density["per_ul"])
        assert infected.stages == {"ring": 20, "trophozoite": 0, "schizont": 0, "gametocyte": 0}
        assert infected.metadata_dict == {"patient": "P-1", "slide": "S-1", "operator": "A. Diallo",
                                          "date": "2026-11-30", "site": "Kisumu"}
        assert infected.collected_on == datetime.date(2026, 11, 30)
        assert infected.model_name == "purple-dot-rule" and infected.model["stage_model"]["path"] == "ring-stages.keras"
        assert infected.tool_version == malaria_cells.__version__ and infected.source == "api"
        assert infected.report_path == str((tmp_path / "report").resolve())
        age = datetime.datetime.now(datetime.timezone.utc) - infected.screened_at
        assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=1)
        assert [f.path for f in infected.fields] == [f.path for f in screened.fields[:4]]
        field = infected.fields[0]
        assert len(field.cells) == field.n_cells == screened.fields[0].n_cells
        cell, original = field.cells[0].to_dict(), screened.fields[0].cells[0]
        assert cell["bbox"] == list(original.bbox) and cell["probability"] == pytest.approx(original.probability)
        assert sum(c.label == "Parasitized" and c.stage == "ring" for f in infected.fields for c in f.cells) == 20
        whole = json.loads(json.dumps(infected.to_dict()))  # JSON-ready, fields and cells included
        assert whole["screened_at"].endswith("Z") and len(whole["fields"]) == 4 and "cells" in whole["fields"][0]
        listed = records.samples()
        assert [s.id for s in listed] == ids[::-1] and "fields" not in listed[0].to_dict()
        assert records.samples(call="negative")[0].metadata_dict == {"operator": "A. Diallo", "site": "Kisumu"}
        with pytest.raises(MalariaCellsError, match="no sample record 999"):
            records.sample(999)
    assert counts(db_url) == expected_counts(screened)


# --------------------------------------------------------------------------- whole samples or none


def test_a_failure_after_the_sample_row_is_written_leaves_no_part_of_that_sample(db_url, screened):
    seen = []

    def fail_on_the_second_sample(session, context):
        rows = session.scalar(select(func.count()).select_from(SampleRecord))
        seen.append(rows)
        if len(seen) == 2:  # the second sample's row and fields are in the database, uncommitted
            raise RuntimeError("the lights went out")

    with open_records(db_url) as records:
        event.listen(Session, "after_flush", fail_on_the_second_sample)
        try:
            with pytest.raises(RuntimeError, match="lights"):
                records.add(screened)
        finally:
            event.remove(Session, "after_flush", fail_on_the_second_sample)
        assert seen == [1, 2]
        first = screened.samples[0]
        assert counts(db_url) == (1, first.fields, sum(len(f.cells) for f in screened.fields[:first.fields]))
        records.add(screened)  # and the database goes on
    first_cells = sum(len(f.cells) for f in screened.fields[:first.fields])
    assert counts(db_url) == (3, first.fields + len(screened.fields),
                              first_cells + sum(len(f.cells) for f in screened.fields))


def _python(script: str, *args) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


KILLED_MID_WRITE = """
    import os, pickle, signal, sys
    from sqlalchemy import event
    from sqlalchemy.orm import Session
    from malaria_cells.records import open_records

    result = pickle.load(open(sys.argv[1], "rb"))
    records = open_records(sys.argv[2])
    flushes = []

    def die(session, context):  # no exception, no rollback: the process is gone
        flushes.append(1)
        if len(flushes) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    event.listen(Session, "after_flush", die)
    records.add(result)
"""


def test_a_process_killed_mid_write_leaves_the_samples_it_finished_and_nothing_of_the_next(db_url, screened,
                                                                                          tmp_path):
    (tmp_path / "result.pickle").write_bytes(pickle.dumps(screened))
    process = _python(KILLED_MID_WRITE, tmp_path / "result.pickle", db_url)
    _, err = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL, err
    first = screened.samples[0]
    assert counts(db_url) == (1, first.fields, sum(len(f.cells) for f in screened.fields[:first.fields]))
    with open_records(db_url) as records:
        assert [s.name for s in records.samples()] == ["infected"]
        assert records.add(screened)  # nothing left locked


CONCURRENT_WRITER = """
    import os, pickle, sys, time
    from malaria_cells.records import open_records

    result_path, url, go, times = sys.argv[1:]
    result = pickle.load(open(result_path, "rb"))
    deadline = time.time() + 60
    while not os.path.exists(go) and time.time() < deadline:
        time.sleep(0.01)
    with open_records(url) as records:  # both open the new database at once: one migrates it
        ids = [i for _ in range(int(times)) for i in records.add(result, source="cli")]
    print(" ".join(map(str, ids)))
"""


def test_two_processes_write_to_one_new_database_at_once(db_url, screened, tmp_path):
    (tmp_path / "result.pickle").write_bytes(pickle.dumps(screened))
    go, times = tmp_path / "go", 8
    writers = [_python(CONCURRENT_WRITER, tmp_path / "result.pickle", db_url, go, times) for _ in range(2)]
    go.write_text("go")
    outputs = []
    for process in writers:
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, err
        outputs.append([int(i) for i in out.split()])
    ids = outputs[0] + outputs[1]
    assert len(ids) == len(set(ids)) == 2 * times * len(screened.samples)
    assert counts(db_url) == expected_counts(screened, 2 * times)
    if db_url.startswith("sqlite"):  # readers and one writer at a time, writers waiting their turn
        engine = create_engine(database_url(db_url))
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        engine.dispose()
    with open_records(db_url) as records:
        assert schema_revision(db_url)[0] == "0002"
        for record_id in (min(ids), max(ids)):
            sample = records.sample(record_id)
            assert sum(len(f.cells) for f in sample.fields) == sum(f.n_cells for f in sample.fields)


# --------------------------------------------------------------------------- the command line


@pytest.fixture
def rule_screener(monkeypatch):
    """``screen`` run as it is, with the rule classifier and stand-in stages in place of the
    shipped models (the command line builds its Screener from malaria_cells.fields)."""
    monkeypatch.setattr(malaria_cells.fields, "Screener", lambda classifier=None, **options: screener(**options))


def test_screen_db_records_each_sample_and_history_lists_and_exports_them(db_url, samples, rule_screener, tmp_path,
                                                                          capsys):
    out = tmp_path / "report"
    assert main(["screen", str(samples / "infected"), str(samples / "healthy"), "--db", db_url, "--out", str(out),
                 "--no-pdf", "--operator", "A. Diallo", "--format", "json", "--output", str(tmp_path / "s.json")]) == 0
    err = capsys.readouterr().err
    assert "recorded: sample infected as record 1 in " in err and "recorded: sample healthy as record 2" in err
    password = database_url(db_url).password
    assert not password or password not in err  # the password is never printed
    screen_json = json.loads((tmp_path / "s.json").read_text())
    with open_records(db_url) as records:
        infected = records.sample(1)
        assert infected.source == "cli" and infected.report_path == str(out.resolve())
        assert infected.operator == "A. Diallo" and infected.n_cells == screen_json["samples"][0]["n_cells"]
        assert sum(len(f.cells) for f in infected.fields) == infected.n_cells
        review_cells = records.cells_for_review(1)  # the report's gallery, kept for a reviewer
        assert sum(c.counted for c in review_cells) == 20 and review_cells[0].image.startswith(b"\x89PNG")

    assert main(["history", "--db", db_url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["id", "screened", "(UTC)"]
    assert [line.split()[0] for line in table[1:3]] == ["2", "1"]
    assert "POSITIVE" in table[2] and "NEGATIVE" in table[1] and "purple-dot-rule" in table[2]
    assert table[-1] == "2 samples"

    assert main(["history", "--db", db_url, "--call", "positive", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["name"] for row in rows] == ["infected"] and list(rows[0]) == list(CSV_COLUMNS)
    assert rows[0]["stages"].startswith("ring=20;") and rows[0]["operator"] == "A. Diallo"
    assert float(rows[0]["parasitemia"]) == pytest.approx(screen_json["samples"][0]["parasitemia"])

    export = tmp_path / "history.json"
    assert main(["history", "--db", db_url, "--format", "json", "--output", str(export)]) == 0
    exported = json.loads(export.read_text())["samples"]
    assert [s["name"] for s in exported] == ["healthy", "infected"] and exported[1]["stages"]["ring"] == 20
    assert main(["history", "--db", db_url, "--format", "json", "--output", str(export)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["history", "--db", db_url, "--format", "csv", "--output", str(export), "--overwrite"]) == 0
    assert export.read_text().startswith("id,screened_at,name")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".history")]  # no temporary file left


def test_history_filters_by_day_call_and_count(db_url, screened, capsys):
    with open_records(db_url) as records:
        ids = records.add(screened) + records.add(screened)
    engine = create_engine(database_url(db_url))
    try:  # the first two were screened a month ago
        with engine.begin() as connection:
            connection.execute(SampleRecord.__table__.update().where(SampleRecord.id.in_(ids[:2])).values(
                screened_at=datetime.datetime(2026, 10, 15, 9, 30, tzinfo=datetime.timezone.utc)))
    finally:
        engine.dispose()
    with open_records(db_url) as records:
        assert [s.id for s in records.samples(since="2026-10-15")] == ids[::-1]
        assert [s.id for s in records.samples(since=datetime.date(2026, 10, 16))] == ids[:1:-1]
        assert [s.id for s in records.samples(call="positive")] == [ids[2], ids[0]]
        assert [s.id for s in records.samples(limit=1)] == [ids[3]]
        for bad, match in (({"since": "last week"}, "YYYY-MM-DD"), ({"call": "maybe"}, "call must be"),
                           ({"limit": 0}, "limit")):
            with pytest.raises(MalariaCellsError, match=match):
                records.samples(**bad)
    assert main(["history", "--db", db_url, "--since", "2026-10-16", "--call", "positive", "--format", "json"]) == 0
    assert [s["id"] for s in json.loads(capsys.readouterr().out)["samples"]] == [ids[2]]
    assert main(["history", "--db", db_url, "--since", "16/10/2026"]) == 2
    err = capsys.readouterr().err
    assert err == "malaria-cells history: error: since: expected YYYY-MM-DD, got '16/10/2026'\n"
    assert "no samples recorded" in render_history([], "table")


def test_screen_records_where_malaria_cells_db_says(samples, rule_screener, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MALARIA_CELLS_DB", str(tmp_path / "lab.db"))  # a plain path is a SQLite file
    assert main(["screen", str(samples / "healthy")]) == 0
    assert "recorded: sample healthy as record 1" in capsys.readouterr().err
    with open_records(tmp_path / "lab.db") as records:  # no report: a gallery kept for the records alone
        assert len(records.cells_for_review(1)) == 8 and not any(c.counted for c in records.cells_for_review(1))
    assert main(["history"]) == 0
    assert "healthy" in capsys.readouterr().out
    monkeypatch.delenv("MALARIA_CELLS_DB")
    monkeypatch.chdir(samples)
    assert main(["history"]) == 2  # neither names one: ./lab.db, which is not there
    assert "lab.db: no such database file" in capsys.readouterr().err


# --------------------------------------------------------------------------- the server


def test_the_server_records_each_screened_sample_and_answers_its_id(db_url):
    image, _ = make_field(np.random.default_rng(7))
    files = [("files", ("f1.png", encode(image, "PNG"), "image/png"))]
    client = TestClient(create_app(PurpleDotClassifier(FIGURES), db=db_url))
    body = client.post("/v1/screen?patient=PT-7&site=Kisumu", files=files).json()
    first = body["record_id"]
    table = client.post("/v1/screen?format=table", files=files)
    assert table.status_code == 200 and int(table.headers["X-Record-Id"]) == first + 1
    with open_records(db_url) as records:
        sample = records.sample(first)
        assert sample.source == "server" and sample.patient == "PT-7" and sample.site == "Kisumu"
        assert sample.n_cells == body["summary"]["n_cells"] and [f.path for f in sample.fields] == ["f1.png"]
        assert len(sample.fields[0].cells) == body["fields"][0]["n_cells"]
    assert "record_id" not in TestClient(create_app(PurpleDotClassifier(FIGURES))).post(
        "/v1/screen", files=files).json()
    engine = create_engine(database_url(db_url))
    try:  # a database that can no longer take the cells: no answer goes out unrecorded
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE cells")
    finally:
        engine.dispose()
    refused = client.post("/v1/screen", files=files)
    assert refused.status_code == 503 and refused.json()["detail"].startswith("not recorded: ")
    assert counts(db_url, tables=(SampleRecord, FieldRecord)) == (2, 2)  # the third sample was rolled back


# --------------------------------------------------------------------------- bad databases


@pytest.mark.parametrize("url, message", [
    ("mysql://lab@dbhost/malaria", "unknown database scheme 'mysql'"),
    ("postgresql+psycopg2://lab:secret@dbhost/malaria", "driver 'psycopg2' is not supported"),
    ("sqlite://", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
    ("postgresql+psycopg://lab:secret@dbhost", "name the database"),
    ("   ", "empty"),
])
def test_urls_malaria_cells_cannot_use_are_refused_at_once(url, message):
    with pytest.raises(MalariaCellsError, match=message) as error:
        open_records(url)
    assert "secret" not in str(error.value) and "\n" not in str(error.value)


def test_files_that_are_not_records_databases_are_refused(tmp_path):
    (tmp_path / "notes.db").write_text("patient list\n")
    with pytest.raises(MalariaCellsError, match="not a SQLite database"):
        open_records(f"sqlite:///{tmp_path / 'notes.db'}")
    with pytest.raises(MalariaCellsError, match="does not exist"):
        open_records(f"sqlite:///{tmp_path / 'no' / 'lab.db'}")
    with pytest.raises(MalariaCellsError, match="a folder"):
        open_records(str(tmp_path))
    with pytest.raises(MalariaCellsError, match="no such database file"):
        open_records(tmp_path / "missing.db", create=False)
    other = create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    with other.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE patients (id INTEGER)")
    other.dispose()
    with pytest.raises(MalariaCellsError, match="not malaria-cells records .*patients"):
        open_records(tmp_path / "other.db")


def test_an_unreachable_server_is_one_line_without_the_password(capsys, samples, tmp_path):
    url = "postgresql+psycopg://lab:secret@127.0.0.1:1/malaria"
    with pytest.raises(MalariaCellsError, match=r"cannot reach the PostgreSQL server at 127\.0\.0\.1:1") as error:
        open_records(url)
    assert "secret" not in str(error.value) and "lab:***@" in str(error.value) and "\n" not in str(error.value)
    assert main(["screen", str(samples / "healthy"), "--db", url]) == 2  # before any screening
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("malaria-cells screen: error: ") and "secret" not in err
    assert main(["history", "--db", "mysql://lab@dbhost/malaria"]) == 2
    assert "unknown database scheme" in capsys.readouterr().err
    assert main(["history", "--db", str(tmp_path / "missing.db")]) == 2
    assert "no such database file" in capsys.readouterr().err


def test_a_schema_newer_than_the_code_is_refused(db_url, screened):
    open_records(db_url).close()
    engine = create_engine(database_url(db_url))
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    finally:
        engine.dispose()
    with pytest.raises(MalariaCellsError, match="schema revision '0099' is newer than this malaria-cells"):
        open_records(db_url)


def test_records_refuse_what_is_not_a_screen(tmp_path, screened):
    with open_records(tmp_path / "lab.db") as records:
        with pytest.raises(MalariaCellsError, match="expected a ScreenResult"):
            records.add({"fields": []})
        with pytest.raises(MalariaCellsError, match="source must be"):
            records.add(screened, source="robot")
        changed = copy.deepcopy(screened)
        changed.fields.reverse()
        with pytest.raises(MalariaCellsError, match="not where the screen lists them"):
            records.add(changed)
        assert records.samples() == []


# --------------------------------------------------------------------------- the microscopist's review


def _migrate_to(url, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(database_url(url))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            (command.upgrade if revision != "base" else command.downgrade)(config, revision)
    finally:
        engine.dispose()


def test_migration_0002_upgrades_a_database_of_0001_with_its_samples_and_back(db_url, screened):
    if database_url(db_url).get_backend_name() == "sqlite":
        open(database_url(db_url).database, "wb").close()
    _migrate_to(db_url, "0001")
    assert schema_revision(db_url)[0] == "0001"
    old = Records(create_engine(database_url(db_url)))  # what malaria-cells of schema 0001 wrote
    try:
        ids = old.add(screened)
    finally:
        old.close()
    with open_records(db_url) as records:  # upgraded on opening
        assert schema_revision(db_url)[0] == "0002"
        assert counts(db_url) == expected_counts(screened)
        assert records.cells_for_review(ids[0]) == [] and records.reviews(ids[0]) == []
        assert records.samples()[0].latest_review is None
        review = records.review(ids[0], reviewer="A. Diallo", call="negative", comment="read by hand")
        assert records.sample(ids[0]).latest_review.id == review
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(database_url(db_url))
    try:
        with engine.begin() as connection:  # 0002 undone: the reviews go, the samples stay
            config.attributes["connection"] = connection
            command.downgrade(config, "0001")
        with engine.connect() as connection:
            assert not {"reviews", "review_cells", "review_verdicts"} & set(inspect_tables(connection))
    finally:
        engine.dispose()
    assert counts(db_url) == expected_counts(screened)


def inspect_tables(connection) -> list[str]:
    from sqlalchemy import inspect

    return inspect(connection).get_table_names()


def test_recording_keeps_each_samples_gallery_as_cells_for_review(db_url, galleried):
    import cv2

    result, gallery = galleried
    with open_records(db_url) as records:
        ids = records.add(result, gallery=gallery)
        infected, healthy = (records.cells_for_review(record_id) for record_id in ids)
    kept = gallery.cells("infected")
    assert [c.probability for c in infected] == pytest.approx([c.probability for c in kept])
    assert sum(c.counted for c in infected) == 20 and 0 < sum(not c.counted for c in infected) <= 8
    assert [c.position for c in infected] == list(range(len(infected)))
    assert all(c.counted for c in infected[:20]) and not any(c.counted for c in infected[20:])
    assert all(c.stage == "ring" for c in infected[:20])
    picture = cv2.imdecode(np.frombuffer(infected[0].image, np.uint8), cv2.IMREAD_COLOR)
    assert infected[0].image.startswith(b"\x89PNG") and picture.shape[:2] == kept[0].native.shape[:2]
    assert healthy and not any(c.counted for c in healthy) and len(healthy) <= 8
    as_json = infected[0].to_dict(image=True)
    assert as_json["image"].startswith("data:image/png;base64,") and as_json["counted"] is True
    assert counts(db_url, tables=(ReviewCellRecord,)) == (len(infected) + len(healthy),)


@pytest.mark.parametrize("verdicts, call, automatic, expected", [
    ({}, None, "positive", (20, "positive")),                                   # signed as it was
    ({1: "confirm", 2: "reject", 3: "reject", 30: "confirm"}, None, "positive", (19, "positive")),
    ({k: "reject" for k in range(1, 21)}, None, "positive", (0, "negative")),   # every flagged cell rejected
    ({k: "reject" for k in range(1, 6)}, None, "positive", (15, "review")),     # unseen counted cells remain
    ({k: "reject" for k in range(1, 21)}, None, "review", (0, "review")),       # too few cells stays review
    ({30: "reject"}, None, "negative", (20, "negative")),                       # a near miss rejected: no change
    ({1: "reject"}, "positive", "positive", (19, "positive")),                  # the reviewer's own call
])
def test_the_reviewed_count_and_call_follow_the_documented_rule(verdicts, call, automatic, expected):
    cells = {k: k <= 20 for k in range(1, 33)}  # 20 counted cells, 12 near misses
    figures = reviewed_figures(n_cells=400, n_parasitized=20, automatic_call=automatic, cells=cells,
                               verdicts=verdicts, call=call)
    assert (figures["n_parasitized"], figures["call"]) == expected
    assert figures["parasitemia"] == expected[0] / 400
    assert [figures["parasitemia_low"], figures["parasitemia_high"]] == wilson_interval(expected[0], 400)
    assert figures["call_given"] is (call is not None)


def test_reviews_are_appended_beside_the_automatic_result_and_the_newest_is_in_force(db_url, galleried):
    result, gallery = galleried
    statements = []

    def remember(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement.lstrip().split()[0].upper())

    with open_records(db_url) as records:
        infected_id, healthy_id = records.add(result, gallery=gallery)
        cells = records.cells_for_review(infected_id)
        counted = [c.id for c in cells if c.counted]
        near = [c.id for c in cells if not c.counted]
        event.listen(Engine, "before_cursor_execute", remember)
        try:
            first = records.review(infected_id, {counted[0]: "reject", counted[1]: "reject", counted[2]: "confirm",
                                                 str(near[0]): "confirm"}, reviewer="A. Diallo", comment="two debris")
            second = records.review(infected_id, {cell: "reject" for cell in counted}, reviewer="B. Okello")
        finally:
            event.remove(Engine, "before_cursor_execute", remember)
        assert "UPDATE" not in statements and "DELETE" not in statements  # append-only
        sample = records.sample(infected_id)
        assert (sample.call, sample.n_parasitized) == ("positive", 20)  # the automatic result is never changed
        assert sample.latest_review.id == second and sample.latest_review.call == "negative"
        newest, older = records.reviews(infected_id)
        assert [newest.id, older.id] == [second, first]
        assert (older.reviewer, older.comment, older.n_rejected, older.n_confirmed, older.n_added) == \
               ("A. Diallo", "two debris", 2, 1, 1)
        assert older.n_parasitized == 19 and older.call == "positive" and not older.call_given
        assert [older.parasitemia_low, older.parasitemia_high] == pytest.approx(wilson_interval(19, sample.n_cells))
        assert older.to_dict()["verdicts"] == {str(counted[0]): "reject", str(counted[1]): "reject",
                                               str(counted[2]): "confirm", str(near[0]): "confirm"}
        age = datetime.datetime.now(datetime.timezone.utc) - newest.reviewed_at
        assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=1)
        assert (newest.n_parasitized, newest.n_rejected) == (0, 20)
        listed = {item.id: item for item in records.samples()}
        assert listed[infected_id].latest_review.reviewer == "B. Okello" and listed[healthy_id].latest_review is None
        assert json.loads(json.dumps(listed[infected_id].to_dict()))["latest_review"]["call"] == "negative"
        healthy_review = records.review(healthy_id, reviewer="A. Diallo", call="review", comment="thick film too")
        assert records.reviews(healthy_id)[0].call_given and records.sample(healthy_id).latest_review.id == healthy_review
    assert counts(db_url, tables=(ReviewRecord, VerdictRecord)) == (3, 24)


def test_a_review_is_checked_at_the_entrance_and_a_refused_one_writes_nothing(db_url, galleried):
    result, gallery = galleried
    with open_records(db_url) as records:
        infected_id, healthy_id = records.add(result, gallery=gallery)
        other_sample_cell = records.cells_for_review(healthy_id)[0].id
        cell = records.cells_for_review(infected_id)[0].id
        for arguments, match in (
                ((999, {}), "no sample record 999"),
                ((infected_id, {other_sample_cell: "reject"}), f"is not one of sample {infected_id}'s cells"),
                ((infected_id, {cell: "maybe"}), "verdict must be one of confirm, reject"),
                ((infected_id, {"first": "reject"}), "cell ids are whole numbers"),
                ((infected_id, [cell]), "expected a mapping"),
                (("1", {}), "sample id must be a whole number")):
            with pytest.raises(MalariaCellsError, match=match) as error:
                records.review(*arguments, reviewer="A. Diallo")
            assert "\n" not in str(error.value)
        with pytest.raises(UnknownRecord):
            records.cells_for_review(999)
        for options, match in (({"reviewer": "  "}, "give the reviewer's name"),
                               ({"reviewer": "A.\nDiallo"}, "one line"),
                               ({"reviewer": "A. Diallo", "call": "maybe"}, "call must be one of"),
                               ({"reviewer": "A. Diallo", "comment": "x" * 5000}, "at most 4000 characters")):
            with pytest.raises(MalariaCellsError, match=match):
                records.review(infected_id, {cell: "reject"}, **options)
        assert records.reviews(infected_id) == []
    assert counts(db_url, tables=(ReviewRecord, VerdictRecord)) == (0, 0)


def test_history_shows_the_latest_reviewed_call_reviewer_and_time(db_url, galleried, capsys):
    result, gallery = galleried
    with open_records(db_url) as records:
        infected_id, _ = records.add(result, gallery=gallery)
        records.review(infected_id, reviewer="A. Diallo", call="review")
        records.review(infected_id, {c.id: "reject" for c in records.cells_for_review(infected_id) if c.counted},
                       reviewer="B. Okello")
    assert main(["history", "--db", db_url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "reviewed" in table[0] and "reviewer" in table[0]
    assert " infected - POSITIVE NEGATIVE " in " ".join(table[2].split()) and "B. Okello" in table[2]
    assert " healthy - NEGATIVE - " in " ".join(table[1].split())
    assert main(["history", "--db", db_url, "--format", "csv"]) == 0
    rows = {row["name"]: row for row in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert (rows["infected"]["reviewed_call"], rows["infected"]["reviewer"]) == ("negative", "B. Okello")
    assert rows["infected"]["reviewed_at"].endswith("Z") and rows["healthy"]["reviewed_call"] == ""
    assert main(["history", "--db", db_url, "--format", "json"]) == 0
    exported = {s["name"]: s for s in json.loads(capsys.readouterr().out)["samples"]}
    assert exported["infected"]["latest_review"]["reviewer"] == "B. Okello"
    assert exported["healthy"]["latest_review"] is None


def test_the_server_lists_records_and_takes_reviews_under_per_user_keys(db_url, tmp_path):
    image, _ = make_field(np.random.default_rng(7), infected=(3, 10, 17))
    files = [("files", ("f1.png", encode(image, "PNG"), "image/png"))]
    keys = tmp_path / "reviewers.csv"
    keys.write_text("name,key\nDr. A. Diallo,diallo-key-0193\nB. Okello,okello-key-4471\n")
    client = TestClient(create_app(PurpleDotClassifier(FIGURES), db=db_url, api_key="shared-key-1", user_keys=keys))
    shared, diallo = {"X-API-Key": "shared-key-1"}, {"X-API-Key": "diallo-key-0193"}
    first = client.post("/v1/screen", files=files, headers=shared).json()["record_id"]
    second = client.post("/v1/screen?report=true", files=files, headers=diallo).json()["record_id"]
    listed = client.get("/v1/records", headers=shared).json()["samples"]
    assert [s["id"] for s in listed] == [second, first] and listed[0]["latest_review"] is None
    assert client.get("/v1/records").status_code == 401
    detail = client.get(f"/v1/records/{first}", headers=diallo).json()
    assert detail["reviewer"] == "Dr. A. Diallo" and detail["reviews"] == []
    cells = detail["cells"]
    assert cells and all(c["image"].startswith("data:image/png;base64,") for c in cells)
    counted = [c["id"] for c in cells if c["counted"]]
    assert len(counted) == detail["sample"]["n_parasitized"] == 3
    assert [c["probability"] for c in client.get(f"/v1/records/{second}", headers=shared).json()["cells"]] == \
           [c["probability"] for c in cells]  # the report's gallery and the records' are one selection
    body = {"verdicts": {str(counted[0]): "reject"}, "comment": "stain debris"}
    refused = client.post(f"/v1/records/{first}/review", json=body, headers=shared)
    assert refused.status_code == 403 and "reviewer's own key" in refused.json()["detail"]
    assert client.post(f"/v1/records/{first}/review", json=body).status_code == 401
    signed = client.post(f"/v1/records/{first}/review", json=body, headers=diallo)
    assert signed.status_code == 201
    answer = signed.json()
    assert answer["reviews"][0]["reviewer"] == "Dr. A. Diallo" and answer["reviews"][0]["comment"] == "stain debris"
    assert answer["sample"]["call"] == detail["sample"]["call"]  # the automatic call stands beside the review
    assert answer["sample"]["latest_review"]["n_parasitized"] == 2
    again = client.post(f"/v1/records/{first}/review", json={"call": "positive"},
                        headers={"X-API-Key": "okello-key-4471"}).json()
    assert [r["reviewer"] for r in again["reviews"]] == ["B. Okello", "Dr. A. Diallo"]
    assert again["sample"]["latest_review"]["call"] == "positive" and again["sample"]["latest_review"]["call_given"]
    listed = client.get("/v1/records", headers=shared).json()["samples"]
    assert listed[1]["latest_review"]["reviewer"] == "B. Okello"
    for sample_id, payload, status, match in (
            (999, {}, 404, "no sample record 999"),
            (first, {"verdicts": {"12345": "reject"}}, 422, "is not one of sample"),
            (first, {"verdicts": {str(counted[0]): "maybe"}}, 422, "verdict must be one of"),
            (first, {"call": "maybe"}, 422, "call must be one of")):
        response = client.post(f"/v1/records/{sample_id}/review", json=payload, headers=diallo)
        assert response.status_code == status and match in response.json()["detail"]
    assert client.get("/v1/records/999", headers=shared).status_code == 404
    with open_records(db_url) as records:
        assert [r.reviewer for r in records.reviews(first)] == ["B. Okello", "Dr. A. Diallo"]
    no_reviewers = TestClient(create_app(PurpleDotClassifier(FIGURES), db=db_url))
    refused = no_reviewers.post(f"/v1/records/{first}/review", json={})
    assert refused.status_code == 403 and "--user-keys" in refused.json()["detail"]
    assert TestClient(create_app(PurpleDotClassifier(FIGURES))).get("/v1/records").status_code == 404


def test_a_new_sqlite_database_locked_for_a_moment_is_waited_for(tmp_path, monkeypatch):
    # SQLite answers "database is locked" at once, skipping its busy timeout, while another
    # process turns a new database to WAL mode; opening it waits that out instead of failing
    import sqlite3

    import malaria_cells.records.store as store

    calls, connect = [], store._sqlite_connect

    def flaky(connection, record):
        calls.append(1)
        if len(calls) <= 3:
            raise sqlite3.OperationalError("database is locked")
        connect(connection, record)

    monkeypatch.setattr(store, "_sqlite_connect", flaky)
    with open_records(f"sqlite:///{tmp_path / 'lab.db'}") as records:
        assert records.samples() == []
    assert len(calls) >= 4
    calls.clear()
    monkeypatch.setattr(store, "SQLITE_BUSY_SECONDS", 0.0)  # a lock that outlasts the wait is reported
    with pytest.raises(MalariaCellsError, match="database is locked"):
        open_records(f"sqlite:///{tmp_path / 'other.db'}")
