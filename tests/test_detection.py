import numpy as np
import pytest

from malaria_cells.fields import detect_cells
from malaria_cells.fields.truth import match_cells

from conftest import make_field


def _found(kwargs, seed=1):
    image, cells = make_field(np.random.default_rng(seed), **kwargs)
    detection = detect_cells(image)
    found = np.array([[c.x, c.y] for c in detection.cells]).reshape(-1, 2)
    true = np.array([[x, y] for x, y, _ in cells]).reshape(-1, 2)
    return detection, cells, match_cells(found, true, detection.cell_diameter / 2)


def test_every_cell_of_a_clean_field_is_found_once_and_its_size_measured():
    detection, cells, pairs = _found({})
    assert len(detection.cells) == len(cells) == len(pairs)
    assert 0.9 * 44 < detection.cell_diameter < 1.1 * 44
    assert detection.quality["ok"], detection.quality


def test_touching_cells_are_split():
    detection, cells, pairs = _found({"touching_pairs": 3})
    assert len(pairs) == len(cells) and len(detection.cells) == len(cells)


def test_a_white_cell_is_excluded_not_counted():
    detection, cells, pairs = _found({"white_cells": 1})
    assert [o.kind for o in detection.objects].count("white_cell") == 1
    assert len(detection.cells) == len(cells) == len(pairs)


def test_a_cell_touching_a_white_cell_is_still_counted():
    # pieces cut from a white cell share a long border with it and go with it; a red cell
    # leaning on one touches it along a short arc
    detection, cells, pairs = _found({"white_cells": 1, "pressed": True})
    assert [o.kind for o in detection.objects].count("white_cell") == 1
    assert len(detection.cells) == len(cells) == len(pairs)


def test_a_printed_scale_bar_is_excluded_not_counted():
    detection, cells, pairs = _found({"scale_bar": True})
    assert any(o.kind == "mark" for o in detection.objects)
    assert len(detection.cells) == len(cells) == len(pairs)


def test_platelets_are_not_counted():
    detection, cells, pairs = _found({"platelets": 15})
    assert len(detection.cells) == len(cells) == len(pairs)


def test_cells_cut_by_the_field_of_view_edge_are_excluded():
    detection, cells, pairs = _found({"surround": True, "size": (1100, 900), "rows": 9, "cols": 12})
    assert len(pairs) == len(cells) and len(detection.cells) <= len(cells) + 1
    assert any(o.kind == "edge" for o in detection.objects)


def test_a_clump_of_overlapping_cells_is_excluded_and_an_enlarged_cell_counted():
    detection, cells, pairs = _found({"clumps": 2, "enlarged": (5, 40)})
    assert [o.kind for o in detection.objects].count("clump") == 2
    assert len(detection.cells) == len(cells) == len(pairs)
    enlarged = [cells[5][:2], cells[40][:2]]
    counted = np.array([[c.x, c.y] for c in detection.cells])
    assert all(np.hypot(*(counted - point).T).min() < 5 for point in enlarged)


def test_infected_cells_are_still_found():
    detection, cells, pairs = _found({"infected": (3, 10, 20, 30)})
    matched = {j for _, j in pairs}
    assert all(j in matched for j, (_, _, infected) in enumerate(cells) if infected)


@pytest.mark.parametrize("scale", [0.6, 1.7])
def test_cell_size_is_measured_at_any_magnification(scale):
    radius = round(22 * scale)
    size = (round(900 * scale), round(700 * scale))
    detection, cells, pairs = _found({"radius": radius, "size": size})
    assert abs(detection.cell_diameter - 2 * radius) < 0.15 * 2 * radius
    assert len(pairs) >= len(cells) - 1


def test_an_empty_or_blurred_field_is_flagged():
    blank = np.full((400, 500, 3), 230, np.uint8)
    detection = detect_cells(blank)
    assert not detection.quality["ok"] and detection.cells == []
    image, _ = make_field(np.random.default_rng(0), blur=9)
    assert not detect_cells(image).quality["ok"]


def test_the_fast_watershed_matches_scikit_image():
    # Detection calls scikit-image's compiled kernel directly (the public function imports
    # SciPy); a change of that private signature must not change a single label.
    from skimage.segmentation import watershed

    from malaria_cells.fields.detection import _watershed

    rng = np.random.default_rng(3)
    relief = -cv2_blur(rng.random((120, 150)))
    mask = relief < np.percentile(relief, 70)
    markers = np.zeros(mask.shape, np.int32)
    points = rng.integers(0, mask.shape, (12, 2))
    markers[points[:, 0], points[:, 1]] = np.arange(1, 13)
    assert np.array_equal(_watershed(relief, markers, mask), watershed(relief, markers, mask=mask))


def cv2_blur(values):
    import cv2

    return cv2.GaussianBlur(values.astype(np.float32), (0, 0), 6)


@pytest.mark.parametrize("kind, seed", [("target", 7), ("hypochromic", 7), ("elliptocyte", 7), ("stomatocyte", 7),
                                        ("platelets", 7), ("normal", 7), ("elliptocyte", [0, 7, 0])])
def test_every_drawn_cell_of_an_unusual_shape_is_counted_exactly_once(kind, seed):
    # pale-centred cells stay whole, elongated ones are not split (the second elliptocyte
    # field holds one twice as long as wide, which the watershed cuts across its ridge),
    # platelets are not counted
    from malaria_cells.shifts import make_morphology_field

    image, cells = make_morphology_field(kind, np.random.default_rng(seed))
    detection = detect_cells(image)
    found = np.array([[c.x, c.y] for c in detection.cells]).reshape(-1, 2)
    inside = np.array([cell.contains(found[:, 0], found[:, 1]) for cell in cells])
    assert (inside.sum(axis=1) == 1).all(), (kind, np.bincount(inside.sum(axis=1)))
    assert len(detection.cells) == len(cells), (kind, len(detection.cells), len(cells))
    if kind != "elliptocyte":  # an elongated cell's measure is its width
        assert abs(detection.cell_diameter - 2 * np.median([np.sqrt(c.a * c.b) for c in cells])) < 0.15 * 2 * 26


@pytest.mark.parametrize("kind, seed", [("hypochromic", 2), ("hypochromic", 4), ("platelets", 1), ("platelets", 2),
                                        ("target", 2)])
def test_a_small_frame_of_a_few_large_cells_among_specks_is_counted_cell_by_cell(kind, seed):
    # A 640x480 frame at high magnification: six 100 px cells, and (platelets) about 30 specks,
    # or (hypochromic) pale centres whose rims break into many small pieces. The specks
    # outnumber the cells; the cell size must still be the cells', or each cell is cut into
    # dozens of pieces (hundreds of objects were counted for these six cells).
    from malaria_cells.shifts import make_morphology_field

    image, cells = make_morphology_field(kind, np.random.default_rng(seed), size=(640, 480), radius=50, rows=2, cols=3)
    detection = detect_cells(image)
    found = np.array([[c.x, c.y] for c in detection.cells]).reshape(-1, 2)
    inside = np.array([cell.contains(found[:, 0], found[:, 1]) for cell in cells])
    assert len(detection.cells) == len(cells) == 6 and (inside.sum(axis=1) == 1).all()
    assert 80 < detection.cell_diameter < 120


def test_a_frame_of_a_dozen_touching_hypochromic_cells_is_never_cut_into_pieces():
    # 120 px cells, rims touching into one network: each pale centre is about 2% of the frame
    # (it was left open, the cell size came out as the rim's, and 850-odd pieces were counted)
    from malaria_cells.shifts import make_morphology_field

    image, cells = make_morphology_field("hypochromic", np.random.default_rng(0), size=(640, 480), radius=60,
                                         rows=3, cols=4)
    detection = detect_cells(image)
    found = np.array([[c.x, c.y] for c in detection.cells]).reshape(-1, 2)
    inside = np.array([cell.contains(found[:, 0], found[:, 1]) for cell in cells])
    assert 100 < detection.cell_diameter < 140
    assert inside.sum(axis=1).max() == 1 and len(detection.cells) <= len(cells)  # no cell in pieces


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_hypochromic_cells_with_broken_rims_are_each_counted_once(seed):
    # 24 touching 88 px hypochromic cells: at the working scale their thin rims are two pixels
    # wide, so the opening that clears specks would wear them into dashes (and the watershed
    # share each open ring among its neighbours) if their centres were not filled before it
    from malaria_cells.shifts import make_morphology_field

    image, cells = make_morphology_field("hypochromic", np.random.default_rng(seed), size=(640, 480), radius=44,
                                         rows=4, cols=6)
    detection = detect_cells(image)
    found = np.array([[c.x, c.y] for c in detection.cells]).reshape(-1, 2)
    inside = np.array([cell.contains(found[:, 0], found[:, 1]) for cell in cells])
    assert (inside.sum(axis=1) == 1).all() and len(detection.cells) == len(cells) == 24


@pytest.mark.parametrize("seed", [0, 1])
def test_packed_elliptocytes_are_each_counted_once(seed):
    # 48 touching 60 px elliptocytes: each holds about twice the disc of its width, so with a
    # neighbour's sliver attached it would look like two overlapping cells, and be cut in two,
    # were a cell's area taken as that disc rather than from the objects themselves
    from malaria_cells.shifts import make_morphology_field

    image, cells = make_morphology_field("elliptocyte", np.random.default_rng([0, 7, seed]), size=(640, 480),
                                         radius=30, rows=6, cols=8)
    detection = detect_cells(image)
    found = np.array([[c.x, c.y] for c in detection.cells]).reshape(-1, 2)
    inside = np.array([cell.contains(found[:, 0], found[:, 1]) for cell in cells])
    assert (inside.sum(axis=1) == 1).sum() >= 46 and inside.sum(axis=1).max() <= 2


def test_a_fragment_far_smaller_than_the_fields_cells_is_not_counted():
    import cv2

    image, cells = make_field(np.random.default_rng(2))
    image = image.copy()
    cv2.circle(image, (40, 40), 6, (214, 150, 160), -1)  # a sliver of a cell in the plasma
    detection = detect_cells(image)
    assert len(detection.cells) == len(cells)
    assert any(o.kind in ("fragment", "platelet") and abs(o.x - 40) < 5 and abs(o.y - 40) < 5 for o in detection.objects)


def test_peak_spacing_by_grid_keeps_the_same_peaks_as_by_pairs():
    # the grid serves a few peaks far apart (a flat image's one huge object), pairs the rest
    from malaria_cells.fields.detection import _spaced_by_grid, _close_pairs

    rng = np.random.default_rng(0)
    for _ in range(20):
        spacing = int(rng.integers(2, 40))
        points = np.unique(np.column_stack([rng.integers(0, 300, 800), rng.integers(0, 400, 800)]), axis=0)
        points = points[rng.permutation(len(points))]
        first, later = _close_pairs(points, (300, 400), spacing)
        kept = np.ones(len(points), bool)
        for i in np.argsort(first, kind="stable"):
            if kept[first[i]]:
                kept[later[i]] = False
        assert np.array_equal(_spaced_by_grid(points, spacing), kept)


def test_a_flat_image_has_no_cells():
    detection = detect_cells(np.full((1024, 1024, 3), 200, np.uint8))
    assert detection.cells == []
