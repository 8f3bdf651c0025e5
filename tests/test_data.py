"""Visual-CoT reading, the box -> token-grid rule and S_focus, on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from data_lavit import box_to_token_mask, parse_visual_cot_record, read_visual_cot, SkippedRecord
from teacher_lavit import s_focus
from viscot_fixture import record, write_viscot


def test_record_is_parsed_and_stripped():
    sample = parse_visual_cot_record(record("textvqa", 17, "cot/textvqa/a.jpg", [10, 20, 30, 45], "What brand?", "Sony"))
    assert sample.id == "textvqa/17" and sample.source == "textvqa"
    assert sample.question == "What brand?"  # no <image> prefix, no box-request suffix
    assert sample.answer == "Sony"
    assert sample.image == "cot/textvqa/a.jpg"
    assert sample.bbox == (10.0, 20.0, 30.0, 45.0)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (record("gqa", 1, "a.jpg", [1, 2, 3, 4], turns=3), "malformed_record"),
        (record("gqa", 1, "a.jpg", None), "no_box"),
        (record("gqa", 1, "a.jpg", [5, 5, 5, 9]), "degenerate_box"),
        (record("gqa", 1, "a.jpg", [1, 2, 3, 4], answer=""), "empty_answer"),
        ({"dataset": "gqa", "question_id": 3, "image": ["a.jpg"]}, "malformed_record"),
    ],
)
def test_bad_records_name_their_reason(bad, reason):
    with pytest.raises(SkippedRecord) as err:
        parse_visual_cot_record(bad)
    assert err.value.reason == reason


def test_reader_keys_on_source_and_id_filters_and_samples(tmp_path):
    path, _ = write_viscot(tmp_path, n=12, bad=True)
    samples, skipped = read_visual_cot(path)
    # 12 good ones and 3 whose problems show only with the image (missing, corrupt, box outside): the builder's
    assert len(samples) == 15 and len({s.id for s in samples}) == 15
    reasons = sorted(r["reason"] for r in skipped)
    assert reasons == ["degenerate_box", "duplicate_id", "empty_answer", "malformed_record", "no_box"]
    # question ids repeat across sources (0..11 over three sources), the keys do not
    only_gqa, _ = read_visual_cot(path, sources=["gqa"])
    assert {s.source for s in only_gqa} == {"gqa"} and len(only_gqa) == 4 + 3
    first, _ = read_visual_cot(path, max_samples=5, seed=3)
    again, _ = read_visual_cot(path, max_samples=5, seed=3)
    other, _ = read_visual_cot(path, max_samples=5, seed=4)
    assert [s.id for s in first] == [s.id for s in again] and [s.id for s in first] != [s.id for s in other]
    with pytest.raises(ValueError, match=r"No records of sources \['vqav2'\]"):
        read_visual_cot(path, sources=["gqa", "vqav2"])


# A 112 x 84 image resized by the processor to 4 x 3 cells of 28 px: each cell is 28 x 28 original pixels.
GRID = (3, 4)
SIZE = (112, 84)


def test_box_on_whole_cells():
    mask = box_to_token_mask([28, 0, 84, 56], SIZE, GRID)
    expected = np.zeros(GRID, bool)
    expected[0:2, 1:3] = True
    assert (mask == expected).all()


def test_partial_cells_count_when_half_covered():
    # x from 14 to 70: column 0 half covered (in), column 1 whole, column 2 half (70 - 56 = 14 of 28: in)
    assert box_to_token_mask([14, 0, 70, 28], SIZE, GRID)[0].tolist() == [True, True, True, False]
    # x from 15 to 69: columns 0 and 2 covered 13/28 < 1/2: out
    assert box_to_token_mask([15, 0, 69, 28], SIZE, GRID)[0].tolist() == [False, True, False, False]
    assert box_to_token_mask([15, 0, 69, 28], SIZE, GRID, min_cover=0.4)[0].tolist() == [True, True, True, False]


def test_box_smaller_than_a_cell_gets_its_cell():
    mask = box_to_token_mask([60, 30, 66, 35], SIZE, GRID)  # 6 x 5 pixels inside cell (1, 2)
    assert mask.sum() == 1 and mask[1, 2]
    straddling = box_to_token_mask([50, 30, 60, 35], SIZE, GRID)  # mostly in column 1 (50..56), less in 2
    assert straddling.sum() == 1 and straddling[1, 1]


def test_box_leaving_the_image_is_clipped():
    assert (box_to_token_mask([-50, -50, 28, 28], SIZE, GRID) == box_to_token_mask([0, 0, 28, 28], SIZE, GRID)).all()
    touching = box_to_token_mask([84, 56, 400, 400], SIZE, GRID)  # from the last cell's corner to beyond the image
    assert touching.sum() == 1 and touching[2, 3]


def test_scaled_grids_map_proportionally():
    # A 1000 x 500 image resized to 10 x 5 cells: each cell is 100 x 100 original pixels.
    mask = box_to_token_mask([200, 100, 400, 300], (1000, 500), (5, 10))
    assert mask.sum() == 4 and mask[1:3, 2:4].all()


@pytest.mark.parametrize("box", [[30, 30, 30, 50], [40, 10, 20, 30], [200, 10, 300, 50], [-10, -10, -1, -1]])
def test_degenerate_or_outside_boxes_are_rejected(box):
    with pytest.raises(ValueError, match="no area inside the 112 x 84 image"):
        box_to_token_mask(box, SIZE, GRID)


def test_s_focus_on_hand_made_maps():
    gaze = np.zeros(GRID)
    gaze[0, 1] = 3.0
    gaze[2, 3] = 1.0
    inside = box_to_token_mask([28, 0, 56, 28], SIZE, GRID)
    assert s_focus(gaze, inside) == pytest.approx(0.75)
    assert s_focus(gaze, ~inside) == pytest.approx(0.25)
    assert s_focus(np.full(12, 0.5), inside) == pytest.approx(1 / 12)
    with pytest.raises(ValueError, match="same size"):
        s_focus(np.ones(11), inside)
    with pytest.raises(ValueError, match="no attention mass"):
        s_focus(np.zeros(12), inside)
