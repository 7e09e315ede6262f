from pathlib import Path

import pytest

from malaria_cells import MalariaCellsError
from malaria_cells.datasets import find_dataset_root, list_cell_images, list_image_files, patient_id

from conftest import write_dataset


def test_patient_id_is_the_c_digits_prefix():
    assert patient_id("x/C100P61ThinF_IMG_20150918_144104_cell_162.png") == "C100"
    assert patient_id("C5NThinF_IMG_20150609_122108_cell_43.png") == "C5"
    assert patient_id("cell_12.png") is None
    assert patient_id("Cat_1.png") is None


def test_dataset_root_found_directly_nested_and_in_any_case(tmp_path):
    write_dataset(tmp_path / "flat", {"C1": (1, 1)})
    assert find_dataset_root(tmp_path / "flat") == tmp_path / "flat"
    write_dataset(tmp_path / "kaggle" / "cell_images", {"C1": (1, 1)})
    assert find_dataset_root(tmp_path / "kaggle") == tmp_path / "kaggle" / "cell_images"
    lower = tmp_path / "lower"
    write_dataset(lower, {"C1": (1, 1)})
    for name in ("Parasitized", "Uninfected"):
        (lower / name).rename(lower / name.lower())
    assert len(list_cell_images(lower).paths) == 2


def test_kaggle_duplicate_nested_copy_is_read_once(tmp_path):
    root = write_dataset(tmp_path / "cell_images", {"C1": (2, 3)})
    write_dataset(root / "cell_images", {"C1": (2, 3)})
    files = list_cell_images(root)
    assert len(files.paths) == 5
    assert not any("cell_images/cell_images" in p for p in files.paths)


def test_missing_layout_is_a_one_line_error_showing_the_layout(tmp_path):
    (tmp_path / "Parasitized").mkdir()
    with pytest.raises(MalariaCellsError, match="Parasitized/.*Uninfected/") as error:
        find_dataset_root(tmp_path)
    assert "\n" not in str(error.value)
    with pytest.raises(MalariaCellsError, match="no such folder"):
        find_dataset_root(tmp_path / "nope")


def test_empty_class_folder_is_an_error(tmp_path):
    write_dataset(tmp_path, {"C1": (0, 2)})
    with pytest.raises(MalariaCellsError, match="no images in the Parasitized folder"):
        list_cell_images(tmp_path)


def test_non_images_and_empty_files_are_ignored_and_reported(tmp_path):
    write_dataset(tmp_path, {"C1": (2, 2)})
    (tmp_path / "Parasitized" / "Thumbs.db").write_bytes(b"junk")
    (tmp_path / "Uninfected" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "Uninfected" / "C1_empty.png").write_bytes(b"")
    files = list_cell_images(tmp_path)
    assert len(files.paths) == 4
    reasons = {Path(p).name: why for p, why in files.ignored}
    assert reasons == {"Thumbs.db": "not an image file", ".DS_Store": "not an image file",
                       "C1_empty.png": "empty file"}


def test_list_image_files_expands_folders_and_reports_missing(tmp_path):
    root = write_dataset(tmp_path, {"C1": (2, 1)})
    files, ignored = list_image_files([root, tmp_path / "missing.png"])
    assert len(files) == 3
    assert ignored == [(str(tmp_path / "missing.png"), "no such file or folder")]
