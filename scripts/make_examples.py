"""Write the synthetic example images that ship with the package (src/malaria_cells/examples/).

    python scripts/make_examples.py

Drawn, not photographed: real smear images stay out of the repository. The cells imitate
the NIH crops (a stained disc on black, 128 px); the infected one carries a ring-stage-like
dark dot with a pale centre. The fields (``examples/fields/``, one sample of two photographs)
come from :func:`malaria_cells.synthetic.make_field`: red cells, a few with a dark dot, a white
cell and platelets inside the round field of view of an eyepiece photograph.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

OUT = Path(__file__).resolve().parents[1] / "src" / "malaria_cells" / "examples"


def cell(rng: np.random.Generator, infected: bool, size: int = 128) -> Image.Image:
    yy, xx = np.mgrid[:size, :size]
    centre, radius = size / 2, size * 0.42
    distance = np.hypot(yy - centre, xx - centre) / radius
    image = np.zeros((size, size, 3))
    inside = distance < 1
    # a paler centre and a darker rim, as a biconcave red cell looks
    shade = 0.9 + 0.1 * np.clip(distance, 0, 1) ** 2
    image[inside] = (np.array([205, 140, 150]) * shade[inside, None])
    if infected:
        spot = np.hypot(yy - centre - 14, xx - centre + 10)
        ring = (spot > 3) & (spot < 8)
        image[ring & inside] = [80, 30, 110]
        image[(spot <= 3) & inside] = [150, 90, 140]
    image[inside] += rng.normal(0, 3, (inside.sum(), 3))
    return Image.fromarray(image.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))


def main() -> None:
    rng = np.random.default_rng(0)
    (OUT / "cells").mkdir(parents=True, exist_ok=True)
    cell(rng, True).save(OUT / "cells" / "parasitized.png")
    cell(rng, False).save(OUT / "cells" / "uninfected.png")

    from malaria_cells.synthetic import make_field

    (OUT / "fields").mkdir(parents=True, exist_ok=True)
    for number in range(2):
        image, _ = make_field(np.random.default_rng(number), size=(1400, 1050), radius=30, rows=11, cols=15,
                              infected=(5, 40, 77), white_cells=1, platelets=10, surround=True)
        Image.fromarray(image).save(OUT / "fields" / f"field{number + 1}.jpg", quality=90)


if __name__ == "__main__":
    main()
