"""Screening on Dask distributed (malaria_cells.fields.distributed): the same results as one
process, in input order; a worker that dies is replaced and its sample retried; a sample that
cannot be screened is reported while the others finish; the command line's --workers."""

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_field
from PIL import Image
from test_fields import FIGURES, PurpleDotClassifier

from malaria_cells import MalariaCellsError
from malaria_cells.cli import main
from malaria_cells.fields import Gallery, Screener

pytest.importorskip("distributed")

from malaria_cells.fields.distributed import screen_distributed

OPTIONS = {"classifier": PurpleDotClassifier(FIGURES), "stages": False}


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask")
    for name, infected, seed in (("a", [5, 5], 1), ("b", [0, 0, 0], 20), ("c", [1, 0], 40), ("d", [3], 60)):
        (root / name).mkdir()
        for k, n in enumerate(infected):
            image, _ = make_field(np.random.default_rng(seed + k), infected=tuple(range(3, 3 + 7 * n, 7)))
            Image.fromarray(image).save(root / name / f"field{k}.png")
    return root


@pytest.fixture(scope="module")
def client():
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 1, "distributed.scheduler.worker-saturation": 1.0}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=40)
    with Client(cluster) as client:
        yield client
    cluster.close()


def _plain(result):
    """The result's JSON without the seconds each field took."""
    out = result.to_dict()
    for item in out["fields"]:
        item.pop("seconds")
    return out


def _read_or_die(path, marker, always=False):
    """A field's bytes; the first time (every time with ``always``) it kills its worker instead."""
    if always or not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return Path(path).read_bytes()


def test_results_are_those_of_one_process_in_input_order(samples, client):
    paths = [samples / "d", samples / "a", samples / "b", samples / "c", samples / "a" / "field0.png",
             samples / "missing"]
    single = Screener(**OPTIONS).screen(paths)
    arrived, counted, gallery = [], [], Gallery()
    result = screen_distributed(paths, client=client, screener_options=OPTIONS, gallery=gallery,
                                on_sample=lambda part: arrived.append(part.samples[0].name), progress=counted.append)
    assert _plain(result) == _plain(single)
    assert [s.name for s in result.samples] == ["d", "a", "b", "c", "fields"]
    assert [s.call for s in result.samples] == [s.call for s in single.samples]
    assert sorted(arrived) == sorted(s.name for s in result.samples) and sum(counted) == len(result.fields)
    assert result.skipped == single.skipped and "no such file" in result.skipped[0][1]
    assert gallery.cells("a") and all(c.counted for c in gallery.cells("a")[:10])
    one = screen_distributed([samples / "a"], client=client, screener_options=OPTIONS)
    assert one.summary is one.samples[0] and _plain(one) == _plain(Screener(**OPTIONS).screen([samples / "a"]))


def test_a_running_scheduler_by_address_keeps_no_screener_afterwards(samples, client):
    result = screen_distributed([samples / "d"], scheduler=client.scheduler.address, screener_options=OPTIONS)
    assert _plain(result) == _plain(Screener(**OPTIONS).screen([samples / "d"]))
    left = client.run(lambda dask_worker: [name for name in dask_worker.plugins if name.startswith("malaria")])
    assert all(names == [] for names in left.values())


def test_parameters_are_checked_before_any_cluster_starts(samples):
    for kwargs, words in (({"workers": 0}, "workers"), ({"retries": -1}, "retries"),
                          ({"screener_options": {"model": "x"}}, "unknown option"),
                          ({"client": object(), "scheduler": "tcp://x:1"}, "not both")):
        with pytest.raises(MalariaCellsError, match=words):
            screen_distributed([samples / "a"], **kwargs)


def test_a_screener_the_workers_cannot_build_is_one_line(samples, client, tmp_path):
    with pytest.raises(MalariaCellsError, match="could not build the screener.*no-model.onnx"):
        screen_distributed([samples / "a"], client=client, screener_options={"classifier": str(tmp_path / "no-model.onnx")})


def test_a_killed_worker_s_sample_is_retried_and_a_failing_one_reported_while_the_others_finish(samples, tmp_path):
    def fields(name, read=Path.read_bytes):
        return [(str(p), functools.partial(read, p)) for p in sorted((samples / name).glob("*.png"))]

    once = functools.partial(_read_or_die, marker=str(tmp_path / "killed-once"))
    inputs = [("a", fields("a")), ("killed once", fields("b", once)), ("broken", [42]), ("d", fields("d"))]
    result = screen_distributed(inputs, workers=2, screener_options=OPTIONS, retries=1)
    assert [s.name for s in result.samples] == ["a", "killed once", "d"], result.skipped
    assert (tmp_path / "killed-once").exists()
    assert [name for name, _ in result.skipped] == ["broken"] and "TypeError" in result.skipped[0][1]
    single = Screener(**OPTIONS).screen_samples([("a", fields("a")), ("killed once", fields("b")), ("d", fields("d"))])
    assert [dataclasses.astuple(s) for s in result.samples] == [dataclasses.astuple(s) for s in single.samples]


def test_a_sample_that_kills_every_worker_it_meets_is_reported_not_lost(samples, client, tmp_path):
    always = functools.partial(_read_or_die, marker=str(tmp_path / "killed"), always=True)
    fields = [(str(p), functools.partial(always, p)) for p in sorted((samples / "c").glob("*.png"))]
    result = screen_distributed([("killed always", fields)], client=client, screener_options=OPTIONS)
    assert result.samples == [] and result.fields == []
    assert [name for name, _ in result.skipped] == ["killed always"] and "KilledWorker" in result.skipped[0][1]


def test_cli_workers_records_each_sample(samples, tmp_path, capsys):
    healthy = samples / "b"
    db = tmp_path / "lab.db"
    assert main(["screen", str(healthy), str(samples / "d"), "--workers", "2", "--format", "json",
                 "--output", str(tmp_path / "dask.json"), "--db", str(db), "--patient", "P-1"]) == 0
    assert main(["screen", str(healthy), str(samples / "d"), "--format", "json",
                 "--output", str(tmp_path / "one.json")]) == 0
    err = capsys.readouterr().err
    assert err.count("recorded: sample") == 2
    import json

    dask_out, one_out = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("dask", "one"))
    assert [s["call"] for s in dask_out["samples"]] == [s["call"] for s in one_out["samples"]]
    assert [f["n_cells"] for f in dask_out["fields"]] == [f["n_cells"] for f in one_out["fields"]]
    assert dask_out["samples"][0]["metadata"] == {"patient": "P-1"}
    from malaria_cells.records import open_records

    with open_records(str(db)) as records:
        recorded = {s.name: s.id for s in records.samples()}
        assert sorted(recorded) == ["b", "d"]
        assert records.cells_for_review(recorded["d"], images=False)  # its gallery came back from the worker


def test_cli_workers_writes_the_report_a_single_process_writes(samples, tmp_path, capsys):
    paths = [str(samples / "b"), str(samples / "d")]
    assert main(["screen", *paths, "--workers", "2", "--out", str(tmp_path / "dask"), "--no-pdf",
                 "--format", "json", "--output", str(tmp_path / "dask.json")]) == 0
    assert main(["screen", *paths, "--out", str(tmp_path / "one"), "--no-pdf",
                 "--format", "json", "--output", str(tmp_path / "one.json")]) == 0
    assert "report: " in capsys.readouterr().err
    import json
    import re

    def listing(folder):  # overlays are numbered as they arrive: on Dask, as samples finish
        return sorted(re.sub(r"/\d{3}-", "/", p.relative_to(folder).as_posix()) for p in folder.rglob("*")
                      if p.is_file())

    dask, one = tmp_path / "dask", tmp_path / "one"
    assert listing(dask) == listing(one)  # overlays (drawn on the workers), pages, cells.csv, report.json
    assert (dask / "cells.csv").read_text() == (one / "cells.csv").read_text()
    fields = {f["path"]: f for f in json.loads((dask / "report.json").read_text())["fields"]}
    assert all((dask / f["overlay"]).is_file() for f in fields.values())
    for name in ("b", "d"):  # each sample's page shows its own fields' overlays and its gallery
        page = (dask / f"{name}.html").read_text()
        mine = [f["overlay"] for f in fields.values() if f["sample"] == name]
        assert mine and all(overlay in page for overlay in mine)
        assert page.count("data:image/png") == (one / f"{name}.html").read_text().count("data:image/png")
