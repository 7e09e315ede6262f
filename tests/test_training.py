import json

import numpy as np
import pytest

from malaria_cells import MalariaCellsError, evaluate, load_model, make_config, retune, train


def test_run_folder_holds_everything(trained_run):
    from pathlib import Path

    run = Path(trained_run["run_dir"])
    for name in ("model.keras", "config.json", "history.csv", "metrics.json", "training_curves.png",
                 "roc.png", "confusion_matrix.png", "precision_recall.png", "calibration.png",
                 "score_histogram.png"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["image_size"] == 32
    assert set(config["versions"]) >= {"malaria_cells", "tensorflow", "keras"}
    assert config["class_counts"] == {"Uninfected": 96, "Parasitized": 96}
    patients = config["patients"]
    assert not set(patients["train"]) & set(patients["test"])
    assert not set(patients["val"]) & set(patients["test"])
    assert len(list(run.glob(".*tmp*"))) == 0


def test_synthetic_cells_are_learned_and_metrics_match_evaluate(trained_run, tmp_path):
    metrics = trained_run["metrics"]
    assert metrics["auc"] > 0.9
    assert metrics["evaluated_on"] == "test"
    assert set(metrics["at_threshold_0.5"]) == {"accuracy", "sensitivity", "specificity", "confusion"}
    model = load_model(trained_run["model_path"])
    assert model.threshold == pytest.approx(trained_run["threshold"])
    assert model.info["recipe"]["model"] == "tutorial"
    assert 0 < model.threshold < 1


def test_same_seed_same_split_and_metrics(cell_dataset, tmp_path):
    options = dict(data=cell_dataset, model="tutorial", image_size=24, epochs=1, batch_size=32,
                   verbose=0, seed=7, color="gray")
    first = train(out=tmp_path / "a", **options)
    second = train(out=tmp_path / "b", **options)
    config_a = json.loads((tmp_path / "a" / "config.json").read_text())
    config_b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config_a["patients"] == config_b["patients"]
    for key in ("accuracy", "auc", "sensitivity"):
        assert first["metrics"][key] == pytest.approx(second["metrics"][key], abs=1e-6)


def test_preset_then_flags():
    config = make_config("tutorial", epochs=5, split="patient")
    assert (config.model, config.image_size, config.color, config.batch_size) == ("tutorial", 70, "gray", 64)
    assert (config.epochs, config.split, config.test_fraction) == (5, "patient", 0.1)
    assert config.target_sensitivity is None and not config.stain_normalization
    assert make_config().stain_normalization and make_config().min_specificity == 0.93
    assert make_config().ema and not config.ema
    with pytest.raises(MalariaCellsError, match="unknown preset"):
        make_config("nonsense")
    from malaria_cells.config import PRESET_NAMES
    from malaria_cells.training import PRESETS

    assert sorted(PRESET_NAMES) == sorted(PRESETS)  # the CLI offers exactly the recipes there are
    with pytest.raises(MalariaCellsError, match="image size"):
        make_config(image_size=4)
    assert make_config(weight_decay=0.05).weight_decay == 0.05
    with pytest.raises(MalariaCellsError, match="weight decay"):
        make_config(weight_decay=-0.1)
    assert (make_config(folds=5, fold=4).folds, make_config(folds=5, fold=4).fold) == (5, 4)
    for bad in (dict(fold=2), dict(folds=5, fold=5), dict(folds=1)):
        with pytest.raises(MalariaCellsError, match="fold"):
            make_config(**bad)


def test_existing_run_is_never_overwritten(trained_run):
    before = (np.fromfile(trained_run["model_path"], np.uint8)).tobytes()
    with pytest.raises(MalariaCellsError, match="not empty"):
        train(out=trained_run["run_dir"], epochs=1, verbose=0)
    assert np.fromfile(trained_run["model_path"], np.uint8).tobytes() == before


def test_missing_data_tells_the_user_to_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MALARIA_CELLS_HOME", str(tmp_path / "cache"))
    with pytest.raises(MalariaCellsError, match="malaria-cells download"):
        train(out=tmp_path / "run", verbose=0)


def test_interrupt_keeps_the_best_checkpoint(cell_dataset, tmp_path, monkeypatch):
    import keras

    class InterruptAtEpoch2(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt

    original_fit = keras.Model.fit

    def fit(self, *args, callbacks=(), **kwargs):
        return original_fit(self, *args, callbacks=[*callbacks, InterruptAtEpoch2()], **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit)
    result = train(data=cell_dataset, out=tmp_path / "run", model="tutorial", image_size=24,
                   epochs=5, verbose=0)
    assert result["interrupted"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["epochs_run"] == 2 and config["interrupted"]
    assert load_model(result["model_path"]).image_size == 24


def test_evaluate_on_a_folder_reports_patients_and_plots(trained_run, cell_dataset, tmp_path):
    metrics = evaluate(trained_run["model_path"], cell_dataset, plots=tmp_path / "plots")
    assert metrics["n"] == 192
    assert {row["patient"] for row in metrics["patients"]} >= {"C10", "C50"}
    assert (tmp_path / "plots" / "calibration.png").is_file()
    assert evaluate(trained_run["model_path"], cell_dataset, threshold=1.0, resamples=0)["sensitivity"] < 0.2


def test_train_with_mixup_and_focus_augmentation_records_them(tmp_path, cell_dataset):
    result = train(data=cell_dataset, out=tmp_path / "run", model="cellnet-slim", image_size=32, epochs=1,
                   batch_size=16, mixup=0.4, augment="flips+color+focus", verbose=0)
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["mixup"] == 0.4 and config["augment"] == "flips+color+focus"
    assert (tmp_path / "run" / "model.keras").is_file() and str(result["model_path"]).endswith("model.keras")


def test_train_returns_a_typed_run_result(trained_run):
    from pathlib import Path

    from malaria_cells import RunResult, load_model

    assert isinstance(trained_run, RunResult)
    assert isinstance(trained_run.model_path, Path) and trained_run.model_path.parent == trained_run.run_dir
    assert load_model(trained_run.model_path).threshold == pytest.approx(trained_run.threshold)
    assert trained_run.metrics["evaluated_on"] == "test" and not trained_run.interrupted
    # the older dict spelling still reads, with paths as strings
    assert trained_run["model_path"] == str(trained_run.model_path)
    with pytest.raises(KeyError):
        trained_run["nothing"]


def test_retune_rechooses_the_threshold_on_validation_patients_only(trained_run, tmp_path):
    import shutil
    from pathlib import Path

    from malaria_cells import retune

    run = tmp_path / "run"
    shutil.copytree(trained_run["run_dir"], run)
    anything = retune(run, target_sensitivity=1.0, min_specificity=0.0)
    choice = anything.threshold_choice
    assert choice["target_sensitivity"] == 1.0 and choice["sensitivity"] == 1.0
    assert anything.threshold <= trained_run.threshold
    model = load_model(run)
    assert model.threshold == pytest.approx(anything.threshold)
    assert model.info["recipe"]["target_sensitivity"] == 1.0
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["min_specificity"] == 0.0 and config["threshold"] == anything["threshold"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "test" and metrics["threshold"] == pytest.approx(anything["threshold"])
    # Back to the rule it was trained with: the very threshold train chose, and its test scores.
    again = retune(run, target_sensitivity=0.95, min_specificity=0.93)
    assert again["threshold"] == pytest.approx(trained_run["threshold"], abs=1e-6)
    assert again["metrics"]["sensitivity"] == pytest.approx(trained_run["metrics"]["sensitivity"])
    with pytest.raises(MalariaCellsError, match="not a training run folder"):
        retune(Path(tmp_path))


def _train_and_interrupt(cell_dataset, run, when):
    """Start `malaria-cells train` in a subprocess and press Ctrl-C when ``when(run)`` holds."""
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "malaria_cells", "train", "--data", str(cell_dataset), "--out", str(run),
         "--model", "tutorial", "--image-size", "32", "--epochs", "200", "--batch-size", "8", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell's background jobs inherit Ctrl-C ignored; the child must hear it as a user would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not when(run, process.pid) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=240)
    return process.returncode, out, err


def _loading_tensorflow(run, pid):
    """The child has begun loading TensorFlow's libraries (the command's own code is running:
    a Ctrl-C during Python's start-up, before any of it, is the interpreter's to report)."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return "tensorflow" in maps.read()
    except OSError:  # no /proc: a moment early in the import instead
        import time

        time.sleep(2)
        return True


@pytest.mark.parametrize("moment", ["importing", "after the split", "after the first checkpoint"])
def test_ctrl_c_anywhere_exits_130_with_one_line_and_a_self_describing_folder(cell_dataset, tmp_path, moment):
    import json

    run = tmp_path / "run"
    when = {"importing": _loading_tensorflow,
            "after the split": lambda run, pid: (run / "config.json").exists(),
            "after the first checkpoint": lambda run, pid: (run / "model.keras").exists()}[moment]
    code, out, err = _train_and_interrupt(cell_dataset, run, when)
    assert code == 130, (out, err)
    assert "Traceback" not in err and "interrupted" in err + out
    if run.exists() and any(run.iterdir()):
        record = json.loads((run / "config.json").read_text())
        assert record["status"] in ("running", "interrupted") and record["patients"]["val"]
    if moment == "after the first checkpoint":
        assert record["status"] == "interrupted"
        result = retune(run)
        assert 0 <= result["threshold"] <= 1
