"""Mutated files of every accepted format through the public decoders: each decodes to an
array of its declared size or raises UnreadableImage; none crashes, hangs or grows memory."""

import io
import resource
import time

import numpy as np
from PIL import Image

from malaria_cells.images import UnreadableImage, decode, dimensions, preprocess

from conftest import SHARED_DATA, encode, make_cell

FORMATS = [("PNG", {}), ("JPEG", {"quality": 90}), ("BMP", {}), ("GIF", {}), ("TIFF", {}),
           ("TIFF", {"compression": "tiff_lzw"}), ("WEBP", {"quality": 80})]
MAX_PIXELS = 4_000_000


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    cell = Image.fromarray(make_cell(True, rng, 64))
    seeds = [encode(cell, fmt, **options) for fmt, options in FORMATS]
    seeds.append(encode(cell.convert("P"), "PNG"))
    seeds.append(encode(cell.convert("L"), "PNG"))
    buffer = io.BytesIO()
    cell.save(buffer, "GIF", save_all=True, append_images=[cell.rotate(90), cell.rotate(180)])
    seeds.append(buffer.getvalue())
    if SHARED_DATA.is_dir():
        seeds += [path.read_bytes() for path in sorted((SHARED_DATA / "Parasitized").glob("*.png"))[:3]]
    return seeds


def _mutate(contents: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(contents)
    kind = rng.integers(5)
    if kind == 0:  # flip bytes anywhere
        for position in rng.integers(0, len(data), rng.integers(1, 9)):
            data[position] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # truncate
        data = data[: int(rng.integers(1, len(data)))]
    elif kind == 2:  # overwrite header fields (sizes, lengths, frame counts) with extreme values
        position = int(rng.integers(0, min(64, len(data) - 4)))
        data[position:position + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff",
                                                  b"\x00\x01\x00\x00", b"\x80\x00\x00\x00"])
    elif kind == 3:  # repeat a slice (chunks, frames)
        start = int(rng.integers(0, len(data)))
        piece = data[start:start + int(rng.integers(1, 200))]
        data[start:start] = piece * int(rng.integers(1, 20))
    else:  # chunk-length fields of a PNG, everywhere they might be
        for position in rng.integers(8, len(data) - 4, 3):
            data[position:position + 4] = int(rng.integers(0, 2**32)).to_bytes(4, "big")
    return bytes(data)


def test_mutated_images_decode_or_raise_the_one_error_within_bounds():
    rng = np.random.default_rng(20261203)
    seeds = _seeds()
    start, outcomes = time.monotonic(), {"decoded": 0, "refused": 0}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for index in range(3000):
        contents = _mutate(seeds[index % len(seeds)], rng)
        began = time.monotonic()
        try:
            pixels = decode(contents, max_pixels=MAX_PIXELS)
        except UnreadableImage:
            outcomes["refused"] += 1
        else:
            width, height = dimensions(contents)
            assert pixels.shape == (height, width, 3) and pixels.dtype == np.uint8
            assert width * height <= MAX_PIXELS
            assert preprocess(contents, 16, max_pixels=MAX_PIXELS).shape == (16, 16, 3)
            outcomes["decoded"] += 1
        assert time.monotonic() - began < 5, f"mutation {index} took too long"
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 300, f"peak memory grew by {grown_mib:.0f} MiB"
    assert outcomes["decoded"] > 100 and outcomes["refused"] > 100, outcomes
    assert time.monotonic() - start < 60


def test_field_sized_tiny_and_mutated_images_of_every_format_through_screening_cost_only_themselves():
    from malaria_cells.fields import Screener
    from malaria_cells.synthetic import make_field

    from test_fields import FIGURES, PurpleDotClassifier

    rng = np.random.default_rng(20261207)
    field = Image.fromarray(make_field(rng, size=(360, 280), radius=16, rows=5, cols=7)[0])
    inputs = {}
    for fmt, options in FORMATS:
        inputs[f"field.{fmt.lower()}"] = encode(field, fmt, **options)
        for size in ((1, 1), (3, 3), (2, 100), (15, 15)):
            inputs[f"tiny{size[0]}x{size[1]}.{fmt.lower()}"] = encode(field.resize(size), fmt, **options)
    seeds = [inputs[f"field.{fmt.lower()}"] for fmt, _ in FORMATS]
    for index in range(60):
        inputs[f"mutant{index}"] = _mutate(seeds[index % len(seeds)], rng)
    screener = Screener(PurpleDotClassifier(FIGURES), max_field_seconds=20)
    result = screener.screen_samples([("fuzz", [(name, lambda data=data: data) for name, data in inputs.items()])])
    screened = {f.path for f in result.fields}
    skipped = dict(result.skipped)
    assert screened | set(skipped) == set(inputs) and not screened & set(skipped)
    assert {f"field.{fmt.lower()}" for fmt, _ in FORMATS} <= screened  # every format's field is read...
    assert all(skipped[name].startswith("image too small") for name in inputs if name.startswith("tiny"))
    assert all("\n" not in reason and "Traceback" not in reason for reason in skipped.values())
    # ...the first counted, the others seen to be the same photograph (counted once)
    copies = [f for f in result.fields if f.path.startswith("field.")]
    assert copies[0].n_cells == 35 and all(f.quality["flags"] == ["duplicate"] for f in copies[1:])
