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
from sqlalchemy.orm import Session

import malaria_cells.fields
from malaria_cells import MalariaCellsError
from malaria_cells.cli import main
from malaria_cells.fields import Screener
from malaria_cells.fields.metadata import SampleMetadata, attach_metadata
from malaria_cells.records import (CSV_COLUMNS, CellRecord, FieldRecord, SampleRecord, database_url, open_records,
                                   render_history, schema_revision)
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
    monkeypatch.setattr(malaria_cells.fields, "Screener", lambda model=None, **options: screener(**options))


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
