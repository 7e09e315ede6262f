"""Dataset folders: the class-folder layout, listing image files, patient ids."""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .config import CLASS_NAMES, IMAGE_EXTENSIONS
from .errors import MalariaCellsError

__all__ = ["CellImageFiles", "EXPECTED_LAYOUT", "find_dataset_root", "list_cell_images", "list_image_files",
           "patient_id", "warn_skipped"]

EXPECTED_LAYOUT = (
    "expected a folder holding one sub-folder per class, e.g. "
    "cell_images/Parasitized/*.png and cell_images/Uninfected/*.png"
)

_PATIENT_ID = re.compile(r"^(C\d+)(?=[A-Za-z_])")


def patient_id(path: str | os.PathLike) -> str | None:
    """Return the NIH patient id (the ``C<digits>`` file-name prefix), or None.

    >>> patient_id("Parasitized/C100P61ThinF_IMG_20150918_144104_cell_162.png")
    'C100'
    """
    match = _PATIENT_ID.match(Path(path).name)
    return match.group(1) if match else None


@dataclass
class CellImageFiles:
    """The labelled image files of a dataset folder.

    Attributes
    ----------
    root : Path
        The folder that holds the class sub-folders.
    paths : list of str
        Image files, sorted, Uninfected first.
    labels : numpy.ndarray of int
        1 for Parasitized, 0 for Uninfected.
    ignored : list of (str, str)
        Files skipped while listing (not an image, empty), with the reason.
    """

    root: Path
    paths: list[str]
    labels: np.ndarray
    ignored: list[tuple[str, str]] = field(default_factory=list)

    @cached_property
    def groups(self) -> list[str]:
        """Patient id of each file; a file without one is its own group."""
        return [patient_id(p) or f"file:{p}" for p in self.paths]

    def subset(self, index: Sequence[int] | np.ndarray) -> "CellImageFiles":
        index = np.asarray(index, dtype=int)
        return CellImageFiles(
            self.root, [self.paths[i] for i in index], self.labels[index], []
        )

    def class_counts(self) -> dict[str, int]:
        return {
            name: int(np.sum(self.labels == label))
            for label, name in enumerate(CLASS_NAMES)
        }


def _class_folders(folder: Path) -> dict[str, Path] | None:
    """Map class name -> sub-folder when ``folder`` holds both (any case)."""
    if not folder.is_dir():
        return None
    found = {}
    for child in folder.iterdir():
        for name in CLASS_NAMES:
            if child.is_dir() and child.name.lower() == name.lower():
                found[name] = child
    return found if len(found) == len(CLASS_NAMES) else None


def find_dataset_root(path: str | os.PathLike) -> Path:
    """Return the folder under ``path`` that holds the ``Parasitized`` and ``Uninfected`` folders.

    Accepts the folder itself or one nested a level or two deeper (the Kaggle archive
    unpacks to ``cell_images/cell_images/``; when both levels hold the classes, the
    outer one is used and the duplicate is never read twice).

    Raises
    ------
    MalariaCellsError
        When no such folder exists, with the expected layout.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MalariaCellsError(f"{path}: no such folder ({EXPECTED_LAYOUT})")
    if not path.is_dir():
        raise MalariaCellsError(f"{path}: not a folder ({EXPECTED_LAYOUT})")
    candidates = [path]
    for _ in range(2):
        for folder in candidates:
            if _class_folders(folder):
                return folder
        candidates = [c for f in candidates for c in sorted(f.iterdir()) if c.is_dir()]
    raise MalariaCellsError(
        f"{path}: no Parasitized/ and Uninfected/ folders found ({EXPECTED_LAYOUT})"
    )


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith("._")


def list_image_files(
    inputs: Iterable[str | os.PathLike],
) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand files and folders (recursively) into image files.

    Returns
    -------
    files : list of str
        Image files in a stable order (folders sorted, given files in the given order).
    ignored : list of (str, str)
        Paths that cannot be images, with the reason: missing paths, empty files, and
        files in folders whose name is not an image type (``Thumbs.db``, ``.DS_Store``).
    """
    files: list[str] = []
    ignored: list[tuple[str, str]] = []
    for item in inputs:
        item = Path(item).expanduser()
        if item.is_dir():
            # Plain strings, not Path objects: several times faster over large folders.
            for dirpath, dirnames, filenames in os.walk(item):
                dirnames.sort()
                for name in sorted(filenames):
                    _add_file(os.path.join(dirpath, name), name, files, ignored, from_folder=True)
        elif item.exists():
            _add_file(str(item), item.name, files, ignored, from_folder=False)
        else:
            ignored.append((str(item), "no such file or folder"))
    return files, ignored


def _add_file(path: str, name: str, files: list, ignored: list, from_folder: bool) -> None:
    if from_folder and not _is_image_name(name):
        ignored.append((path, "not an image file"))
    elif os.stat(path).st_size == 0:
        ignored.append((path, "empty file"))
    else:
        files.append(path)


def list_cell_images(path: str | os.PathLike) -> CellImageFiles:
    """List the labelled images of a dataset folder (see :func:`find_dataset_root`).

    Raises
    ------
    MalariaCellsError
        When the layout is wrong or a class folder holds no images.
    """
    root = find_dataset_root(path)
    folders = _class_folders(root)
    paths: list[str] = []
    labels: list[int] = []
    ignored: list[tuple[str, str]] = []
    for label, name in enumerate(CLASS_NAMES):
        files, skipped = list_image_files([folders[name]])
        if not files:
            raise MalariaCellsError(
                f"{folders[name]}: no images in the {name} folder ({EXPECTED_LAYOUT})"
            )
        paths += files
        labels += [label] * len(files)
        ignored += skipped
    return CellImageFiles(root, paths, np.array(labels, dtype=np.int64), ignored)


def warn_skipped(skipped: Sequence[tuple[str, str]], what: str = "files") -> None:
    """Report skipped files in one warning that counts them and names the first few."""
    if not skipped:
        return
    shown = "; ".join(f"{p} ({why})" for p, why in skipped[:3])
    more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    warnings.warn(f"skipped {len(skipped)} {what}: {shown}{more}", stacklevel=2)
