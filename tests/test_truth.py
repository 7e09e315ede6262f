import json
from pathlib import Path

import numpy as np
import pytest

from malaria_cells import MalariaCellsError
from malaria_cells.fields import CellResult, FieldResult
from malaria_cells.fields.truth import load_truth_index, match_cells, pool_scores, read_truth, score_field

FIELDS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fields"


def test_nih_point_files_are_read(tmp_path):
    (tmp_path / "IMG_1.jpg").write_bytes(b"")
    (tmp_path / "IMG_1.txt").write_text("3,5312,2988\n1-1,White_Blood_Cell,No_Comment,Point,1,10.5,20\n"
                                        "1-2,Uninfected,No_Comment,Point,1,30,40.25\n1-3,Parasitized,No_Comment,Point,1,5,6\n")
    cells = read_truth(tmp_path / "IMG_1.jpg")
    assert [(c.x, c.y, c.label) for c in cells] == [(10.5, 20, "White_Blood_Cell"), (30, 40.25, "Uninfected"),
                                                   (5, 6, "Parasitized")]


def test_iml_json_is_read_with_stages_and_difficult_cells(tmp_path):
    entries = [{"image_name": "A.JPG", "objects": [
        {"type": "red blood cell", "bbox": {"x": "10", "y": "20", "w": "30", "h": "40"}},
        {"type": "gametocyte", "bbox": {"x": "0", "y": "0", "w": "10", "h": "10"}},
        {"type": "difficult", "bbox": {"x": "1", "y": "1", "w": "2", "h": "2"}}]}]
    (tmp_path / "annotations.json").write_text(json.dumps(entries))
    cells = read_truth(tmp_path / "A.JPG")
    assert [(c.x, c.y, c.label, c.stage) for c in cells] == [(25, 40, "Uninfected", None), (5, 5, "Parasitized", "gametocyte"),
                                                            (2, 2, "difficult", None)]
    assert read_truth(tmp_path / "B.JPG") is None
    assert read_truth(tmp_path / "A.JPG", tmp_path / "annotations.json")[1].stage == "gametocyte"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MalariaCellsError, match="bad.json"):
        load_truth_index(tmp_path / "bad.json")


def test_matching_is_one_to_one_and_nearest_first():
    found = np.array([[0, 0], [1, 0], [50, 50]])
    true = np.array([[0.5, 0], [100, 100]])
    assert match_cells(found, true, 5) == [(0, 0)]
    assert match_cells(found[:0], true, 5) == []


def _field(cells, width=200, height=200):
    return FieldResult("f.jpg", width, height, "stored", {"ok": True}, len(cells),
                       sum(c.label == "Parasitized" for c in cells), None, None, None, 20.0, cells)


def test_scores_count_matches_false_alarms_and_misses():
    from malaria_cells.fields.truth import TruthCell

    truth = [TruthCell(50, 50, "Uninfected", None, 20), TruthCell(100, 100, "Parasitized", "ring", 20),
             TruthCell(150, 50, "Uninfected", None, 20), TruthCell(1, 100, "Uninfected", None, 20)]  # cut by the edge
    cells = [CellResult(51, 50, [40, 40, 60, 60], 0.1, "Uninfected"),
             CellResult(100, 99, [90, 90, 110, 110], 0.9, "Parasitized"),
             CellResult(150, 150, [140, 140, 160, 160], 0.8, "Parasitized")]
    scores = score_field(_field(cells), truth)
    assert (scores["tp"], scores["fp"], scores["fn"], scores["n_true"]) == (2, 1, 1, 3)
    assert scores["sensitivity"] == 1.0 and scores["false_positive_rate"] == 0.0
    assert scores["stages"] == {"ring": {"n": 1, "detected": 1, "called": 1}}
    assert scores["parasitemia_error"] == pytest.approx(2 / 3 - 1 / 3)
    pooled = pool_scores([scores, scores])
    assert pooled["tp"] == 4 and pooled["f1"] == scores["f1"] and pooled["fields"] == 2


@pytest.mark.skipif(not FIELDS.is_dir(), reason="../shared/data/fields is not available")
def test_the_shared_ground_truth_reads_as_documented():
    nih = sorted((FIELDS / "nih").glob("*/*.jpg"))
    counts = [sum(c.label == "Uninfected" for c in read_truth(p)) for p in nih]
    assert counts == [292, 283, 256, 297]
    assert sum(c.label == "White_Blood_Cell" for p in nih for c in read_truth(p)) == 2
    index = load_truth_index(FIELDS / "iml" / "annotations.json")
    cells = [c for entry in index.values() for c in entry]
    assert len(index) == 115 and sum(c.label == "Uninfected" for c in cells) == 13075
    stages = [c.stage for c in cells if c.stage]
    assert (stages.count("gametocyte"), stages.count("ring"), stages.count("trophozoite"), stages.count("schizont")) \
        == (103, 62, 16, 2)
    assert sum(c.label == "difficult" for c in cells) == 11
