import numpy as np
import pytest
from PIL import Image

from malaria_cells import MalariaCellsError
from malaria_cells.datasets import list_cell_images
from malaria_cells.splits import split_dataset

from conftest import make_cell, nih_like_patients, write_dataset


def test_patient_split_keeps_each_patient_in_one_part_with_both_classes(cell_dataset):
    files = list_cell_images(cell_dataset)
    split = split_dataset(files, method="patient", val_fraction=0.25, test_fraction=0.25, seed=3)
    patients = split.patients(files)
    assert not set(patients["train"]) & set(patients["val"])
    assert not set(patients["train"]) & set(patients["test"])
    assert not set(patients["val"]) & set(patients["test"])
    healthy = {p for p in files.groups if p.startswith("C5")}
    for part in ("train", "val", "test"):
        index = getattr(split, part)
        assert set(files.labels[index]) == {0, 1}
        assert set(patients[part]) & healthy and set(patients[part]) - healthy
    assert sorted(np.concatenate([split.train, split.val, split.test])) == list(range(len(files.paths)))


def test_split_is_deterministic_for_a_seed_and_changes_with_it(cell_dataset):
    files = list_cell_images(cell_dataset)
    first = split_dataset(files, seed=1)
    again = split_dataset(files, seed=1)
    other = split_dataset(files, seed=2)
    assert first.patients(files) == again.patients(files)
    assert first.patients(files) != other.patients(files)


def test_random_split_is_per_image_and_stratified(cell_dataset):
    files = list_cell_images(cell_dataset)
    split = split_dataset(files, method="random", val_fraction=0.2, test_fraction=0.1, seed=0)
    n = len(files.paths)
    assert abs(len(split.test) - 0.1 * n) <= 1
    assert abs(len(split.val) - 0.2 * 0.9 * n) <= 1
    assert abs(files.labels[split.test].mean() - files.labels.mean()) < 0.05


def test_patient_split_refuses_too_few_patients(tmp_path):
    files = list_cell_images(write_dataset(tmp_path, {"C1": (3, 3), "C2": (0, 3)}))
    with pytest.raises(MalariaCellsError, match="too few patients"):
        split_dataset(files, method="patient")


def test_files_without_patient_id_are_their_own_group(tmp_path):
    root = write_dataset(tmp_path, nih_like_patients(6, 4, 4))
    Image.fromarray(make_cell(True, np.random.default_rng(1))).save(root / "Parasitized" / "anon.png")
    files = list_cell_images(root)
    assert any(g.startswith("file:") for g in files.groups)
    split = split_dataset(files, seed=0)
    assert len(split.train) + len(split.val) + len(split.test) == len(files.paths)


@pytest.mark.parametrize("method", ["patient", "random"])
def test_cross_validation_folds_test_everyone_once(cell_dataset, method):
    files = list_cell_images(cell_dataset)
    splits = [split_dataset(files, method=method, folds=3, fold=k, seed=5) for k in range(3)]
    tests = [s.test for s in splits]
    assert sorted(np.concatenate(tests)) == list(range(len(files.paths)))  # disjoint, cover all
    for split in splits:
        assert sorted(np.concatenate([split.train, split.val, split.test])) == list(range(len(files.paths)))
        assert set(files.labels[split.test]) == {0, 1} and len(split.val)
        if method == "patient":
            patients = split.patients(files)
            assert not set(patients["test"]) & (set(patients["train"]) | set(patients["val"]))
    if method == "patient":  # each fold chooses its epoch and threshold on other patients
        validation = [set(split.patients(files)["val"]) for split in splits]
        assert all(not validation[i] & validation[j] for i in range(3) for j in range(i + 1, 3))
    with pytest.raises(MalariaCellsError, match="fold"):
        split_dataset(files, method=method, folds=3, fold=3)
