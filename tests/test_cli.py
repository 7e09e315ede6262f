import csv
import io
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from malaria_cells.cli import main

from conftest import make_cell


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cells"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(make_cell(True, rng)).save(folder / "a.png")
    Image.fromarray(make_cell(False, rng)).convert("L").save(folder / "sub" / "b.jpg")
    return folder


def test_predict_csv_to_stdout(trained_run, images, capsys):
    assert main(["predict", str(images), "--model", trained_run["model_path"], "--format", "csv", "--any-image"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.jpg"]
    assert all(r["label"] in ("Parasitized", "Uninfected") and 0 <= float(r["probability"]) <= 1 for r in rows)


def test_predict_refuses_what_is_not_a_cell_crop_and_says_why(trained_run, images, tmp_path, capsys):
    from conftest import make_field

    field, _ = make_field(np.random.default_rng(1), size=(700, 500))
    Image.fromarray(field).save(images / "field.png")
    Image.new("RGB", (90, 90), (200, 180, 190)).save(images / "blank.png")
    assert main(["predict", str(images), "--model", trained_run["model_path"], "--format", "csv"]) == 1
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert [Path(r["path"]).name for r in rows] == ["a.png"]
    assert "b.jpg: not a single-cell crop (a grayscale image" in captured.err
    assert "field.png: not a single-cell crop (" in captured.err and "separate objects" in captured.err
    assert "blank.png: not a single-cell crop (a blank image)" in captured.err


def test_predict_json_to_file_and_refuses_to_overwrite(trained_run, images, tmp_path, capsys):
    out = tmp_path / "out.json"
    args = ["predict", str(images), "--model", trained_run["model_path"], "--format", "json", "--output", str(out),
            "--any-image"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert len(result["predictions"]) == 2 and result["skipped"] == []
    assert result["threshold"] == pytest.approx(trained_run["threshold"])
    before = out.read_text()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == before
    assert main(args + ["--overwrite", "--threshold", "0"]) == 0
    assert {p["label"] for p in json.loads(out.read_text())["predictions"]} == {"Parasitized"}


def test_predict_skips_bad_files_with_exit_status_1(trained_run, images, capsys):
    (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    status = main(["predict", str(images), str(images / "missing.tif"), "--model", trained_run["model_path"]])
    captured = capsys.readouterr()
    assert status == 1
    assert "a.png" in captured.out and "bad.png" not in captured.out
    assert "skipped: " in captured.err and "bad.png: corrupt PNG" in captured.err
    assert "missing.tif: no such file or folder" in captured.err


def test_evaluate_json_is_one_object_with_the_documented_keys(trained_run, cell_dataset, capsys):
    assert main(["evaluate", "--model", trained_run["model_path"], "--data", str(cell_dataset), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"n", "accuracy", "sensitivity", "specificity", "precision", "f1", "auc", "mcc",
            "threshold", "confusion"} <= set(metrics)
    assert set(metrics["confusion"]) == {"tp", "fp", "tn", "fn"}
    assert sum(metrics["confusion"].values()) == metrics["n"]


def test_evaluate_text_report(trained_run, cell_dataset, capsys):
    assert main(["evaluate", "--model", trained_run["model_path"], "--data", str(cell_dataset)]) == 0
    out = capsys.readouterr().out
    assert "sensitivity" in out and "95% CI" in out and "C50" in out


def test_info_shows_the_model(trained_run, capsys):
    assert main(["info", "--model", trained_run["model_path"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["image_size"] == 32 and info["info"]["recipe"]["epochs"] == 8 and "field_model" not in info


def test_info_of_the_shipped_models_shows_the_field_model_and_its_figures(capsys):
    from malaria_cells.fields import Screener

    assert main(["info", "--json"]) == 0
    fields = json.loads(capsys.readouterr().out)["field_model"]
    assert fields["counting_threshold"] == pytest.approx(Screener().threshold)
    assert fields["model"].endswith("malaria-cells-fields.onnx") and "infected cells found" in fields["measured"]
    assert fields["stage_model"]["path"] == "malaria-cells-stages.keras"
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "\nfield model " in out and "stage model malaria-cells-stages.keras: leave-slide-out recall ring" in out


@pytest.mark.parametrize("args, message", [
    (["evaluate", "--model", "nope.keras", "--data", "."], "model file not found"),
    (["train", "--data", "no/such/dir", "--out", "x"], "no such folder"),
    (["predict", "x.png", "--model", "nope.keras"], "model file not found"),
    (["download", "--dest", "/proc/no/such", "--url", "http://127.0.0.1:9/x.zip"], "No such file or directory"),
    (["export", "--format", "tflite", "--out", "m.tflite", "--check", "missing"], "no such folder"),
    (["train", "--data", ".", "--out", "x", "--weight-decay", "-1"], "weight decay must be in [0, 1)"),
    (["retune", "."], "not a training run folder"),
    (["retune", "run"], "not a config.json written by train"),
    (["serve", "--host", "0.0.0.0"], "no API key is set; set one (--api-key KEY or $MALARIA_CELLS_API_KEY), or pass --no-auth"),
    (["serve", "--user-keys", "keys.csv"], "--user-keys: reviews are of recorded samples; name the records database"),
    (["serve", "--user-keys", "keys.csv", "--db", "lab.db"], "user keys keys.csv: cannot read"),
])
def test_user_errors_are_one_line_without_traceback(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MALARIA_CELLS_API_KEY", raising=False)
    monkeypatch.delenv("MALARIA_CELLS_DB", raising=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{not json")
    (tmp_path / "run" / "model.keras").write_bytes(b"")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_serve_on_an_open_address_without_a_key_starts_only_with_no_auth_and_warns(capsys, monkeypatch):
    import uvicorn

    started = []
    monkeypatch.delenv("MALARIA_CELLS_API_KEY", raising=False)
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.append(options))
    assert main(["serve", "--host", "0.0.0.0", "--no-auth"]) == 0
    assert started and started[0]["host"] == "0.0.0.0"
    assert "without an API key (--no-auth)" in capsys.readouterr().err
    monkeypatch.setenv("MALARIA_CELLS_API_KEY", "k")
    assert main(["serve", "--host", "0.0.0.0"]) == 0 and len(started) == 2
    assert "warning" not in capsys.readouterr().err


def test_retune_prints_the_new_threshold_and_test_scores(trained_run, tmp_path, capsys):
    import shutil

    shutil.copytree(trained_run["run_dir"], tmp_path / "run")
    assert main(["retune", str(tmp_path / "run"), "--target-sensitivity", "1", "--min-specificity", "0"]) == 0
    out = capsys.readouterr().out
    assert "set by the validation sensitivity target 1.0: on validation patients sensitivity 1.0000" in out
    assert "Scores on the test split" in out
    if importlib.util.find_spec("tf2onnx"):
        assert f"ONNX copy: {tmp_path / 'run' / 'model.onnx'}" in out


def test_bad_flag_values_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", "x", "--val-fraction", "2"])
    assert exit_info.value.code == 2
    assert "must be between 0 and 1" in capsys.readouterr().err
    for args in (["screen", "x.png", "--max-field-seconds", "0"], ["serve", "--max-seconds", "inf"]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2 and "must be a number of seconds above 0" in capsys.readouterr().err


def test_console_script_and_module_run(tmp_path):
    out = subprocess.run([sys.executable, "-m", "malaria_cells", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "predict" in out.stdout
    out = subprocess.run(["malaria-cells", "evaluate", "--data", str(tmp_path), "--model", str(tmp_path / "m.keras")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.strip().startswith("malaria-cells evaluate: error:")


def test_the_program_entry_returns_mains_status_and_skips_the_exit_collection(monkeypatch, tmp_path, capsys):
    import gc

    from malaria_cells.cli import main, run

    argv = ["predict", str(tmp_path / "missing.png")]
    expected = main(argv)
    monkeypatch.setattr(sys, "argv", ["malaria-cells", *argv])
    try:
        assert run() == expected == 1
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert "missing.png" in capsys.readouterr().err


@pytest.fixture(scope="module")
def fields(tmp_path_factory):
    from conftest import make_field

    root = tmp_path_factory.mktemp("screen")
    for k in range(2):
        image, _ = make_field(np.random.default_rng(k), infected=(4, 20))
        Image.fromarray(image).save(root / f"field{k}.png")
    return root


def test_screen_prints_a_table_with_the_call(fields, capsys):
    assert main(["screen", str(fields)]) == 0
    out = capsys.readouterr().out
    assert "parasitemia" in out and str(fields / "field0.png") in out
    assert any(word in out for word in ("POSITIVE", "NEGATIVE", "REVIEW"))


@pytest.mark.parametrize("terminal", [True, False])
def test_screen_shows_a_progress_bar_over_fields_only_on_a_terminal(fields, capsys, monkeypatch, terminal):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    assert main(["screen", str(fields), "--format", "json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # the bar never mixes into the output
    assert ("2/2" in captured.err and "field" in captured.err) == terminal


def test_predict_shows_no_progress_bar_for_a_few_cells(capsys, monkeypatch, tmp_path):
    from malaria_cells.synthetic import make_cell

    Image.fromarray(make_cell(True, np.random.default_rng(0), 40)).save(tmp_path / "a.png")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["predict", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "cell/s" not in err and "%|" not in err


def test_screen_json_is_one_object_and_csv_one_row_per_cell(fields, capsys, tmp_path):
    assert main(["screen", str(fields), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["fields"]) == 2 and data["summary"]["call"] == "review"  # two synthetic fields: ~126 cells
    assert "cells counted on good fields" in data["summary"]["reasons"][0]
    assert main(["screen", str(fields), "--format", "csv", "--output", str(tmp_path / "cells.csv")]) == 0
    rows = (tmp_path / "cells.csv").read_text().splitlines()
    assert rows[0] == "field,frame,x,y,x0,y0,x1,y1,probability,label,stage,stage_probability,sample"
    assert len(rows) - 1 == sum(f["n_cells"] for f in data["fields"])
    assert main(["screen", str(fields), "--format", "csv", "--output", str(tmp_path / "cells.csv")]) == 2


def test_screen_writes_a_report_folder_and_never_into_a_full_one(fields, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["screen", str(fields), "--out", str(out), "--patient", "PT-1", "--date", "2026-11-30"]) == 0
    assert {p.name for p in out.iterdir()} == {"overlays", "cells.csv", "report.json", "report.html", "report.pdf"}
    assert len(list((out / "overlays").glob("*.jpg"))) == 2
    page = (out / "report.html").read_text()
    assert "Cells that drove the call" in page and "overlays/" in page and "data:image/png;base64," in page
    assert "PT-1" in page and "2026-11-30" in page
    report = json.loads((out / "report.json").read_text())
    assert all(entry["overlay"].startswith("overlays/") for entry in report["fields"])
    capsys.readouterr()
    assert main(["screen", str(fields), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["screen", str(fields), "--date", "yesterday"]) == 2
    assert "date: expected YYYY-MM-DD, got 'yesterday'" in capsys.readouterr().err


def test_screen_of_several_samples_writes_an_index_and_a_report_each_labelled_from_a_manifest(fields, tmp_path,
                                                                                                capsys):
    import shutil

    for name in ("alpha", "beta"):
        shutil.copytree(fields, tmp_path / name)
    (tmp_path / "m.csv").write_text("sample,patient,site\nalpha,PT-A,Kisumu\nbeta,PT-B,Kisumu\n")
    out = tmp_path / "reports"
    assert main(["screen", str(tmp_path / "alpha"), str(tmp_path / "beta"), "--out", str(out), "--no-pdf",
                 "--manifest", str(tmp_path / "m.csv"), "--operator", "A. Diallo"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().endswith(f"report: {out / 'index.html'}")
    assert {p.name for p in out.glob("*.html")} == {"index.html", "alpha.html", "beta.html"}
    assert "PT-A" in (out / "alpha.html").read_text() and "PT-B" in (out / "beta.html").read_text()
    assert "A. Diallo" in (out / "beta.html").read_text()
    assert "patient PT-A, operator A. Diallo, site Kisumu" in captured.out
    assert "all" not in [line.split()[0] for line in captured.out.splitlines() if line.strip()]  # no pooled row
    assert main(["screen", str(tmp_path / "alpha"), str(tmp_path / "beta"), "--pooled"]) == 0
    assert any(line.startswith("all ") for line in capsys.readouterr().out.splitlines())


def test_screen_skips_bad_files_with_exit_status_1(fields, tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"nope")
    assert main(["screen", str(fields / "field0.png"), str(tmp_path / "broken.jpg")]) == 1
    assert "skipped: " in capsys.readouterr().err
    assert main(["screen", str(tmp_path / "broken.jpg")]) == 2


def test_screen_writes_its_report_for_long_and_non_utf8_file_names(fields, capsys, tmp_path):
    import os
    import shutil

    folder = tmp_path / "odd names"
    folder.mkdir()
    shutil.copy(fields / "field0.png", folder / ("a" * 240 + ".png"))
    shutil.copy(fields / "field1.png", os.fsdecode(os.fsencode(folder) + b"/bad\xff\xfe.png"))
    assert main(["screen", str(folder), "--out", str(tmp_path / "report")]) == 0
    overlays = sorted(p.name for p in (tmp_path / "report" / "overlays").glob("*.jpg"))
    assert len(overlays) == 2 and all(len(name) < 100 for name in overlays), overlays
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(data["fields"]) == 2
    assert "bad" in (tmp_path / "report" / "cells.csv").read_text(errors="replace")
    assert "bad" in _pdf_text(tmp_path / "report" / "report.pdf")  # undecodable bytes shown, not a crash


def test_screen_refuses_a_missing_truth_file_and_prints_no_table_when_nothing_was_screened(fields, tmp_path, capsys):
    field = str(next(p for p in sorted(fields.iterdir()) if p.suffix == ".png"))
    assert main(["screen", field, "--truth", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert "--truth" in err and "nope.json: no such file or folder" in err and err.count("\n") == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main(["screen", str(tmp_path / "bad")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "skipped:" in err and "no field could be screened" in err and "REVIEW" not in out + err


def _pdf_text(path) -> str:
    from pypdf import PdfReader

    return "\n".join(page.extract_text() for page in PdfReader(path).pages)


def test_an_interrupt_that_surfaces_as_another_error_still_exits_130(monkeypatch, capsys):
    from malaria_cells import cli

    def interrupted_inside_a_library(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise TypeError("could not trace the function") from None

    def crashed(args):
        raise TypeError("a real bug")

    monkeypatch.setattr(cli, "run_history", interrupted_inside_a_library)
    assert main(["history"]) == 130 and capsys.readouterr().err.strip() == "interrupted"
    monkeypatch.setattr(cli, "run_history", crashed)
    with pytest.raises(TypeError, match="a real bug"):
        main(["history"])
