"""Wall time to load a whole dataset: the tutorial's cv2 loop vs read_images (our multi-core pipeline).

    python benchmarks/loading.py [--data ../shared/data/cell_images] [--image-size 70]

Both read the same files with a warm page cache (every file is read once first), and
produce the array each training run needs: the tutorial 70x70 gray, ours image-size RGB.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def tutorial_loop(root: str, size: int):
    """The tutorial's loader, as published: glob, cv2 gray read, resize, append."""
    import cv2
    import numpy as np

    images, labels = [], []
    for label, name in ((1, "Parasitized"), (0, "Uninfected")):
        for path in glob.glob(os.path.join(root, name, "*.png")):
            image = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
            images.append(cv2.resize(image, (size, size)))
            labels.append(label)
    return np.array(images).reshape(-1, size, size, 1) / 255.0, np.array(labels)


def our_pipeline(root: str, size: int):
    from malaria_cells.datasets import list_cell_images
    from malaria_cells.pipeline import read_images

    files = list_cell_images(root)
    images, readable, _ = read_images(files.paths, size)
    return images, files.labels[readable]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cell_images"))
    parser.add_argument("--image-size", type=int, default=70)
    args = parser.parse_args()
    for path in glob.glob(os.path.join(args.data, "*", "*")):
        with open(path, "rb") as handle:
            handle.read()
    import tensorflow  # noqa: F401 - import time is not loading time

    print(f"{platform.node()}: {os.cpu_count()} CPUs, {args.data}, {args.image_size} px")
    for name, load in (("tutorial cv2 loop", tutorial_loop), ("malaria-cells read_images", our_pipeline)):
        started = time.perf_counter()
        images, labels = load(args.data, args.image_size)
        seconds = time.perf_counter() - started
        print(f"{name:<24} {len(labels):>6} images  {seconds:6.2f} s  {len(labels) / seconds:8.0f} images/s")


if __name__ == "__main__":
    main()
