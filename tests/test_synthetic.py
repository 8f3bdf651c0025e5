"""The synthetic grounding task the quickstart runs on (`synthetic_lavit`): its scenes, answers, splits and the real
loaders reading them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import synthetic_lavit as task
from data_lavit import read_visual_cot
from evaluation_lavit import load_mmvp


@pytest.mark.parametrize("kind", task.QUESTION_TYPES)
def test_boxes_contain_their_objects_one_per_cell(kind):
    samples = task.generate_split(40, seed=3, kind=kind)
    for sample in samples:
        cells = [o.cell for o in sample["objects"]]
        assert len(cells) == len(set(cells))  # one object per cell
        for obj in sample["objects"]:
            x1, y1, x2, y2 = obj.box
            r, c = obj.cell
            assert c * 28 <= x1 < x2 <= (c + 1) * 28 and r * 28 <= y1 < y2 <= (r + 1) * 28  # wholly inside its cell
        target_color = np.array(task.COLORS[sample["objects"][0].color])
        pixels = np.asarray(sample["image"]).astype(int)
        painted = np.abs(pixels - target_color).sum(-1) < 30
        ys, xs = painted.nonzero()
        x1, y1, x2, y2 = sample["box"]
        assert len(xs) > 0
        assert xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2  # the box holds the key object


@pytest.mark.parametrize("kind", ["size", "shape", "count"])
def test_answers_are_balanced(kind):
    counts = Counter(s["answer"] for s in task.generate_split(80, seed=5, kind=kind))
    assert counts == {"A": 20, "B": 20, "C": 20, "D": 20}


def test_size_answers_match_the_drawn_objects():
    for sample in task.generate_split(20, seed=9):
        target = sample["objects"][0]
        x1, y1, x2, y2 = target.box
        assert x2 - x1 == task.SIZES[target.size]
        assert sample["options"][ord(sample["answer"]) - ord("A")] == target.size


def test_splits_are_disjoint_and_read_by_the_real_loaders(tmp_path):
    paths = task.write_task(str(tmp_path), train=24, val=8, test=12, seed=1)
    train, skipped = read_visual_cot(paths["train"])
    assert len(train) == 24 and skipped == []
    assert all(s.bbox is not None and s.question.endswith("directly.") for s in train)
    records = {split: json.loads(Path(paths[split]).read_text()) for split in ("train", "val", "test")}
    # no scene in two splits: compare what was drawn, not the file names
    from PIL import Image

    drawn = {split: {Image.open(Path(paths["images"]) / r["image"][0]).tobytes() for r in rs}
             for split, rs in records.items()}
    assert len(drawn["train"]) == 24
    assert not (drawn["train"] & drawn["val"]) and not (drawn["train"] & drawn["test"])
    assert not (drawn["val"] & drawn["test"])
    test = load_mmvp(paths["test_mmvp"])
    assert len(test) == 12 and all(t.options == ["tiny", "small", "medium", "large"] for t in test)
    test_records = records["test"]
    assert [t.answer for t in test] == [r["conversations"][3]["value"] for r in test_records]
    # The harness prompt is the training prompt: the same text reaches the model in every stage.
    from evaluation_lavit import build_prompt

    viscot_test, _ = read_visual_cot(paths["test"])
    assert [build_prompt(t) for t in test] == [s.question for s in viscot_test]


def test_size_question_draws_squares_and_shapes_are_validated():
    assert {o.shape for s in task.generate_split(20, seed=4) for o in s["objects"]} == {"square"}
    mixed = task.generate_split(40, seed=4, shapes=task.SHAPES)
    assert len({o.shape for s in mixed for o in s["objects"]}) > 1
    with pytest.raises(ValueError, match="Unknown shapes"):
        task.generate_split(4, seed=0, shapes=("hexagon",))
    with pytest.raises(ValueError, match="needs every shape"):
        task.generate_split(4, seed=0, kind="count", shapes=("square",))
    with pytest.raises(ValueError, match="multiple of 28"):
        task.generate_split(4, seed=0, image_size=100)


def test_same_size_scenes_need_no_look_up():
    samples = task.generate_split(40, seed=7, same_size=True)
    for sample in samples:
        sizes = {o.size for o in sample["objects"]}
        assert len(sizes) == 1  # any object shows the answer
        assert sample["options"][ord(sample["answer"]) - ord("A")] == sizes.pop()
        for obj in sample["objects"]:
            x1, y1, x2, y2 = obj.box
            assert x2 - x1 == task.SIZES[obj.size]
    assert Counter(s["answer"] for s in samples) == {"A": 10, "B": 10, "C": 10, "D": 10}
    with pytest.raises(ValueError, match="size question only"):
        task.generate_split(4, seed=7, kind="shape", same_size=True)


def test_too_few_distinct_scenes_is_an_error_not_a_hang():
    # one object, centred (jitter 0): 16 cells x 8 colours per answer, so 600 scenes cannot be distinct
    with pytest.raises(ValueError, match="too few distinct scenes"):
        task.generate_split(600, seed=0, n_objects=1, jitter=0)
    assert len(task.generate_split(100, seed=0, n_objects=1, jitter=0)) == 100


def test_scene_exclusion_keeps_splits_apart():
    first = task.generate_split(30, seed=0)
    keys = {s["key"] for s in first}
    second = task.generate_split(30, seed=0, exclude=keys)  # the same seed would repeat every scene
    assert not keys & {s["key"] for s in second}
