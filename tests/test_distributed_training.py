"""train(strategy=...): two local worker processes learn what one process learns, and only the chief writes."""

import csv
import json
import os
import subprocess
import sys
import time

import pytest

from malaria_cells import MalariaCellsError, train
from malaria_cells.distribute import check_global_batch, check_tf_config, is_chief, make_strategy

from conftest import free_ports

# The recipe of conftest's trained_run; batch_size is the global batch, 8 cells per worker.
RECIPE = dict(model="tutorial", image_size=32, epochs=8, batch_size=16, learning_rate=2e-3, val_fraction=0.3,
              test_fraction=0.25, target_sensitivity=0.95, seed=3)
# Two workers see the same global batches, augmented alike, as one process with the same strategy
# type and seed; only the order of summing their gradients differs. On the 48 validation cells:
TOLERANCE = {"val_auc": 0.03, "val_accuracy": 0.0625, "val_loss": 0.005}
# Under any tf.distribute strategy the random streams (augmentation, dropout) are not those of the
# default path, so a strategy run differs from a default run as much as another seed does:
SEED_NOISE = {"val_auc": 0.1, "val_accuracy": 0.15, "val_loss": 0.02}


def _cli_flags(data, out):
    flags = ["--data", str(data), "--out", str(out), "--quiet", "--strategy", "multi-worker"]
    for key, value in RECIPE.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def _quality(run_dir):
    """The last epoch's validation figures and the chosen checkpoint's validation AUC/accuracy."""
    with open(run_dir / "history.csv") as f:
        last = list(csv.DictReader(f))[-1]
    record = json.loads((run_dir / "config.json").read_text())
    return {"val_loss": float(last["val_loss"]), "val_auc": record["validation_metrics"]["auc"],
            "val_accuracy": record["validation_metrics"]["accuracy"], "record": record}


@pytest.fixture(scope="module")
def two_workers_and_one(cell_dataset, tmp_path_factory):
    """The same recipe trained by two worker processes (TF_CONFIG, localhost), and in this process
    by MirroredStrategy (one replica: the single-process reference) and by the default path."""
    root = tmp_path_factory.mktemp("distributed")
    workers_tmp = root / "tmp"
    workers_tmp.mkdir()
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
    processes = []
    for index in range(2):
        env = {**os.environ, "TMPDIR": str(workers_tmp), "CUDA_VISIBLE_DEVICES": "",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "malaria_cells", "train", *_cli_flags(cell_dataset, root / "two")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    started = time.time()
    # While the workers run:
    mirrored = train(data=cell_dataset, out=root / "one", verbose=0, strategy="mirrored", **RECIPE)
    default = train(data=cell_dataset, out=root / "default", verbose=0, **RECIPE)
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail("the two workers did not finish within 5 minutes")
    return dict(root=root, mirrored=mirrored, default=default, outputs=outputs, codes=[p.returncode for p in processes],
                workers_tmp=workers_tmp, seconds=time.time() - started)


def test_two_workers_exit_0_and_only_the_chief_writes(two_workers_and_one):
    run = two_workers_and_one
    assert run["codes"] == [0, 0], "\n\n".join(o[-3000:] for o in run["outputs"])
    assert "Run folder:" in run["outputs"][0] and "Run folder:" not in run["outputs"][1]
    two = run["root"] / "two"
    for name in ("model.keras", "config.json", "history.csv", "metrics.json", "training_curves.png"):
        assert (two / name).is_file(), name
    assert not list(two.glob(".*tmp*"))
    # Worker 1 wrote only to its own temporary folder, and removed it.
    assert not [p.name for p in run["workers_tmp"].iterdir() if p.name.startswith("malaria-cells-worker")]
    record = json.loads((two / "config.json").read_text())
    assert record["status"] == "complete"
    assert record["distribution"] == {"strategy": "CollectiveAllReduceStrategy", "replicas": 2, "workers": 2,
                                      "global_batch_size": 16}
    assert record["patients"] == json.loads((run["root"] / "one" / "config.json").read_text())["patients"]


def test_two_workers_learn_what_one_process_learns(two_workers_and_one):
    run = two_workers_and_one
    assert run["codes"] == [0, 0]
    one, two = _quality(run["root"] / "one"), _quality(run["root"] / "two")
    print("\none process (mirrored) vs two workers:", {k: (round(one[k], 4), round(two[k], 4)) for k in TOLERANCE})
    assert one["val_auc"] > 0.85 and two["val_auc"] > 0.85  # both learned the synthetic cells at all
    for key, tolerance in TOLERANCE.items():
        assert abs(one[key] - two[key]) <= tolerance, (key, one[key], two[key])


def test_mirrored_in_one_process_is_the_default_path_within_seed_noise(two_workers_and_one):
    run = two_workers_and_one
    assert run["mirrored"].chief and run["mirrored"].metrics["evaluated_on"] == "test"
    default, mirrored = _quality(run["root"] / "default"), _quality(run["root"] / "one")
    print("\ndefault vs mirrored:", {k: (round(default[k], 4), round(mirrored[k], 4)) for k in SEED_NOISE})
    assert mirrored["record"]["distribution"] == {"strategy": "MirroredStrategy", "replicas": 1, "workers": 1,
                                                  "global_batch_size": 16}
    assert "distribution" not in default["record"]
    for key, tolerance in SEED_NOISE.items():
        assert abs(default[key] - mirrored[key]) <= tolerance, (key, default[key], mirrored[key])


def test_global_batch_size_must_split_evenly():
    assert check_global_batch(16, 2) == 8 and check_global_batch(64, 1) == 64
    with pytest.raises(MalariaCellsError, match="batch size 15 is global: it must be a multiple of the 2 replicas"):
        check_global_batch(15, 2)


@pytest.mark.parametrize("value, message", [
    (None, "needs the TF_CONFIG environment variable"),
    ("  ", "needs the TF_CONFIG environment variable"),
    ("{cluster:", "TF_CONFIG is not JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"task": {"type": "worker", "index": 0}}', "TF_CONFIG has no 'cluster'"),
    ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', "non-empty list"),
    ('{"cluster": {"worker": ["localhost:1"]}}', "TF_CONFIG has no 'task'"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "ps", "index": 0}}', "task type 'ps' is not in"),
    ('{"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", "index": 2}}',
     "task index 2 is out of range: cluster 'worker' has 2 task"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": "0"}}', "task index '0'"),
])
def test_tf_config_errors_are_one_line(value, message):
    environ = {} if value is None else {"TF_CONFIG": value}
    with pytest.raises(MalariaCellsError, match=message) as error:
        check_tf_config(environ)
    assert "\n" not in str(error.value)


def test_cli_refuses_a_bad_tf_config_before_reading_data(tmp_path, capsys, monkeypatch):
    from malaria_cells.cli import main

    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 1}}')
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"),
                 "--strategy", "multi-worker"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "task index 1 is out of range" in err
    assert not (tmp_path / "run").exists()


def test_strategy_names():
    assert make_strategy(None) is None and make_strategy("default") is None
    with pytest.raises(MalariaCellsError, match="unknown strategy 'ring'"):
        make_strategy("ring")
    with pytest.raises(MalariaCellsError, match="tf.distribute.Strategy"):
        make_strategy(3)
    assert is_chief(None)
