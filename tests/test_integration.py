"""End to end on real NIH cells (skipped when ../shared/data is absent)."""

import json

import numpy as np
import pytest

from malaria_cells.cli import main


@pytest.fixture(scope="module")
def real_sample(shared_data, tmp_path_factory):
    """About 3,200 real cells of 60 patients, linked (not copied) into a dataset folder."""
    from malaria_cells.datasets import list_cell_images

    files = list_cell_images(shared_data)
    patients = sorted(set(files.groups))[:60]
    root = tmp_path_factory.mktemp("real") / "cell_images"
    rng = np.random.default_rng(0)
    for path, group, label in zip(files.paths, files.groups, files.labels):
        if group in patients and rng.random() < 0.4:
            target = root / ("Parasitized" if label else "Uninfected") / path.rsplit("/", 1)[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    return root


@pytest.mark.slow
def test_tutorial_preset_learns_real_cells(real_sample, tmp_path, capsys):
    run = tmp_path / "run"
    status = main(["train", "--preset", "tutorial", "--data", str(real_sample), "--out", str(run),
                   "--epochs", "1", "--batch-size", "16", "--split", "patient", "--quiet"])
    assert status == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(run / "model.keras"), "--data", str(real_sample), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] > 1000
    print({k: metrics[k] for k in ("auc", "accuracy", "sensitivity", "specificity")}, metrics["ci"]["auc"])
    # Above chance with confidence: the whole 95% interval of the AUC clears 0.5 by a margin.
    assert metrics["ci"]["auc"][0] > 0.55
