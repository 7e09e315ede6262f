"""Test fixtures: synthetic datasets (from malaria_cells.synthetic), a small trained run, the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from malaria_cells.synthetic import make_cell, make_field  # noqa: F401 - the tests import them from here

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cell_images"


def write_dataset(root: Path, patients: dict[str, tuple[int, int]], seed: int = 0,
                  size: int = 48) -> Path:
    """Write ``{patient: (n_parasitized, n_uninfected)}`` cells in the NIH layout."""
    rng = np.random.default_rng(seed)
    for name in ("Parasitized", "Uninfected"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for patient, (n_infected, n_healthy) in patients.items():
        for index in range(n_infected + n_healthy):
            infected = index < n_infected
            folder = "Parasitized" if infected else "Uninfected"
            side = size + int(rng.integers(-6, 7))
            Image.fromarray(make_cell(infected, rng, side)).save(
                root / folder / f"{patient}P1ThinF_IMG_2015_cell_{index}.png")
    return root


def nih_like_patients(n_infected=8, n_healthy=4, cells=12) -> dict[str, tuple[int, int]]:
    patients = {f"C{10 + i}": (cells, cells // 2) for i in range(n_infected)}
    patients.update({f"C{50 + i}": (0, cells) for i in range(n_healthy)})
    return patients


@pytest.fixture(scope="session")
def cell_dataset(tmp_path_factory) -> Path:
    """A small labelled dataset: 8 infected and 4 healthy synthetic patients."""
    return write_dataset(tmp_path_factory.mktemp("data") / "cell_images", nih_like_patients())


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, cell_dataset):
    """A small model trained once on the synthetic dataset, shared by the tests."""
    from malaria_cells import train

    return train(data=cell_dataset, out=tmp_path_factory.mktemp("run") / "run", model="tutorial",
                 image_size=32, epochs=8, batch_size=16, learning_rate=2e-3, verbose=0,
                 val_fraction=0.3, test_fraction=0.25, target_sensitivity=0.95)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data/cell_images is not available")
    return SHARED_DATA.resolve()


def encode(image, fmt: str, **options) -> bytes:
    """A PIL image (or an RGB array) encoded in memory as ``fmt`` (PNG, JPEG, ...)."""
    import io

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def free_ports(count):
    """``count`` free TCP ports on localhost (for tf.distribute workers)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
