# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""A synthetic grounded-perception task where looking at the right place decides the answer, written in Visual-CoT's
format (so the real reader and builder use it) and, for evaluation, in MMVP's format (so the harness reads it).

The default design is the one measured to be learnable by tiny models on a CPU: 112-pixel images cut into a 4 x 4
grid of 28-pixel cells (one merged visual token each), a few objects each wholly inside its own cell, and a question
that picks one object by its colour and asks its size class, with the options always in the same order:
"(A) tiny (B) small (C) medium (D) large", answers balanced. Harder question types (shape, relation, counting),
shuffled options and larger images are options. Each record carries the key object's pixel box.

Written to disk by `write_task` (`examples/synthetic_grounding.py` is its command line; the quickstart calls it).
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from data_lavit import VISCOT_BOX_SUFFIX
from evaluation_lavit import LETTERS, EvalSample, build_prompt

CELL = 28
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
          "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245), "pink": (245, 120, 180)}
SIZES = {"tiny": 10, "small": 14, "medium": 19, "large": 24}  # object extent in pixels, inside a 28-pixel cell
# (with a 6-pixel "tiny" object, tried first, a tiny model trained from scratch with the quickstart's grounding loss
# was at chance on validation after 500 steps of a plain training loop with a short prompt, where these sizes gave
# 75%: a tiny object's colour is faint in its patches)
SHAPES = ("circle", "square", "triangle", "diamond")
QUESTION_TYPES = ("size", "shape", "relation", "count")
BACKGROUND = (40, 40, 40)


@dataclass
class SceneObject:
    cell: tuple[int, int]  # (row, col)
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]  # pixel x1, y1, x2, y2


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x1, y1, x2, y2 = obj.box
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
    else:  # diamond
        draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, (y1 + y2) / 2), ((x1 + x2) / 2, y2 - 1), (x1, (y1 + y2) / 2)],
                     fill=fill)


def place(rng: random.Random, cell: tuple[int, int], size: str, jitter: int | None = 2) -> tuple[int, int, int, int]:
    """A box of the size class's extent wholly inside the cell: centred, moved by up to `jitter` pixels each way
    (clipped to a 2-pixel margin), or anywhere in the cell when `jitter` is None."""
    extent = SIZES[size]
    room = CELL - 4 - extent
    if jitter is None:
        dx, dy = rng.randint(0, room), rng.randint(0, room)
    else:
        centre = room // 2
        dx = min(room, max(0, centre + rng.randint(-jitter, jitter)))
        dy = min(room, max(0, centre + rng.randint(-jitter, jitter)))
    x = cell[1] * CELL + 2 + dx
    y = cell[0] * CELL + 2 + dy
    return (x, y, x + extent, y + extent)


def make_scene(rng: random.Random, grid: int, n_objects: int, shapes=SHAPES, jitter: int | None = 2
               ) -> list[SceneObject]:
    """Objects in distinct cells, distinct colours, each wholly inside its cell, shapes drawn from `shapes`."""
    cells = rng.sample([(r, c) for r in range(grid) for c in range(grid)], n_objects)
    colors = rng.sample(sorted(COLORS), n_objects)
    objects = []
    for cell, color in zip(cells, colors):
        size = rng.choice(sorted(SIZES))
        objects.append(SceneObject(cell, rng.choice(shapes), color, size, place(rng, cell, size, jitter)))
    return objects


def ask(rng: random.Random, objects: list[SceneObject], kind: str, answer_index: int, shuffle: bool,
        jitter: int | None = 2, same_size: bool = False):
    """(question, options, answer letter, key object) with the answer option at `answer_index` before shuffling.
    `same_size` (size question only) gives every object the key object's size."""
    if kind == "size":
        target = objects[0]
        options = list(SIZES)
        # balanced answers: the target's size (every object's, with same_size) is set to the asked-for class
        for obj in objects if same_size else [target]:
            obj.size = options[answer_index]
            obj.box = place(rng, obj.cell, obj.size, jitter)
        question = f"What is the size of the {target.color} object?"
        correct = target.size
    elif kind == "shape":
        target = objects[0]
        options = list(SHAPES)
        target.shape = options[answer_index]
        question = f"What is the shape of the {target.color} object?"
        correct = target.shape
    elif kind == "relation":
        target, other = objects[0], objects[1]
        options = ["left", "right", "above", "below"]
        dr, dc = target.cell[0] - other.cell[0], target.cell[1] - other.cell[1]
        relation = ("left" if dc < 0 else "right") if abs(dc) >= abs(dr) and dc != 0 else ("above" if dr < 0 else "below")
        question = f"Where is the {target.color} object relative to the {other.color} object?"
        correct = relation
    else:  # count
        target = objects[0]
        options = ["one", "two", "three", "four"]
        for obj in objects[1 : answer_index + 1]:
            obj.shape = target.shape
        for obj in objects[answer_index + 1 :]:
            obj.shape = rng.choice([s for s in SHAPES if s != target.shape])
        question = f"How many {target.shape}s are there?"
        correct = options[answer_index]
    if shuffle:
        rng.shuffle(options)
    return question, options, LETTERS[options.index(correct)], target


def scene_key(objects: list[SceneObject]) -> tuple:
    return tuple(sorted((o.cell, o.shape, o.color, o.size, o.box) for o in objects))


def default_shapes(kind: str) -> tuple[str, ...]:
    """Squares only for the size question (a square's area separates the size classes by more than 2x; mixing in
    triangles makes a large triangle as big as a medium square), every shape otherwise."""
    return ("square",) if kind == "size" else SHAPES


def generate_split(n: int, seed: int, kind: str = "size", image_size: int = 112, n_objects: int = 4,
                   shuffle_options: bool = False, exclude: set | None = None,
                   shapes: tuple[str, ...] | None = None, jitter: int | None = 2, same_size: bool = False
                   ) -> list[dict]:
    """`n` samples: `{"image", "question", "options", "answer", "box", "objects", "kind", "key"}`, answers balanced
    (each option index in turn, the order then shuffled), scenes never repeated nor found in `exclude`. `shapes`
    (default: `default_shapes(kind)`) are the shapes objects are drawn with; objects sit centred in their cells, moved
    by up to `jitter` pixels (None: anywhere in the cell; centred objects spread over the cell's 2 x 2 patches alike,
    which is what makes the size class easy to see for a tiny vision tower). `same_size` (size question only) gives
    every object the asked size, so the answer needs perception but no look-up: a pre-training task."""
    if kind not in QUESTION_TYPES:
        raise ValueError(f"Question type {kind!r} is not one of {QUESTION_TYPES}.")
    shapes = tuple(shapes or default_shapes(kind))
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        raise ValueError(f"Unknown shapes {sorted(unknown)}; choose from {SHAPES}.")
    if same_size and kind != "size":
        raise ValueError(f"same_size applies to the size question only, not {kind!r}.")
    if kind in ("shape", "count") and len(shapes) < len(SHAPES):
        raise ValueError(f"The {kind} question needs every shape {SHAPES}; drop the shapes restriction.")
    if image_size % CELL:
        raise ValueError(f"image_size must be a multiple of {CELL} (one cell per visual token), got {image_size}.")
    grid = image_size // CELL
    rng = random.Random(seed)
    seen = set(exclude or ())
    samples = []
    order = [i % 4 for i in range(n)]
    rng.shuffle(order)
    repeats = 0
    while len(samples) < n:
        objects = make_scene(rng, grid, n_objects, shapes, jitter)
        question, options, answer, target = ask(rng, objects, kind, order[len(samples)], shuffle_options, jitter,
                                                same_size)
        key = scene_key(objects)
        if key in seen:
            repeats += 1
            if repeats > 10_000:
                raise ValueError(
                    f"Drew {len(samples)} distinct scenes of the {n} asked for, then only repeats: these settings "
                    f"({n_objects} objects, jitter {jitter}, image {image_size}) allow too few distinct scenes. Ask "
                    "for fewer samples, or allow more variety (more objects, a larger --jitter or -1, more shapes)."
                )
            continue
        repeats = 0
        seen.add(key)
        image = Image.new("RGB", (image_size, image_size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for obj in objects:
            draw_object(draw, obj)
        samples.append({"image": image, "question": question, "options": options, "answer": answer,
                        "box": list(target.box), "objects": objects, "kind": kind, "key": key})
    return samples


def prompt_of(sample: dict) -> str:
    """The question as every stage shows it: exactly the evaluation harness's prompt."""
    return build_prompt(EvalSample("synthetic", "", sample["question"], sample["options"], sample["answer"], []))


def write_visual_cot(samples: list[dict], output_dir: str, split: str, source: str = "synthetic") -> str:
    """Writes `<output_dir>/<split>.json` (Visual-CoT's layout) and the images under `<output_dir>/images/cot/`."""
    image_dir = os.path.join(output_dir, "images", "cot", source)
    os.makedirs(image_dir, exist_ok=True)
    records = []
    for i, sample in enumerate(samples):
        rel = f"cot/{source}/{split}_{i:05d}.jpg"
        sample["image"].save(os.path.join(output_dir, "images", rel), quality=100, subsampling=0)
        width, height = sample["image"].size
        x1, y1, x2, y2 = sample["box"]
        records.append({
            "dataset": source, "split": split, "question_id": i, "image": [rel, f"{rel}###[{x1}, {y1}, {x2}, {y2}]"],
            "conversations": [
                {"from": "human", "value": f"<image>\n{prompt_of(sample)}{VISCOT_BOX_SUFFIX}"},
                {"from": "gpt", "value": f"[{x1 / width:.3f}, {y1 / height:.3f}, {x2 / width:.3f}, {y2 / height:.3f}]"},
                {"from": "human", "value": "<image>"},
                {"from": "gpt", "value": sample["answer"]},
            ],
        })
    path = os.path.join(output_dir, f"{split}.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def write_mmvp(samples: list[dict], folder: str) -> str:
    """MMVP's layout: `Questions.csv` (`Index,Question,Options,Correct Answer`) and `MMVP Images/<Index>.jpg`."""
    os.makedirs(os.path.join(folder, "MMVP Images"), exist_ok=True)
    with open(os.path.join(folder, "Questions.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Index", "Question", "Options", "Correct Answer"])
        for i, sample in enumerate(samples, 1):
            options = " ".join(f"({LETTERS[k].lower()}) {o}" for k, o in enumerate(sample["options"]))
            writer.writerow([i, sample["question"], options, f"({sample['answer'].lower()})"])
            sample["image"].save(os.path.join(folder, "MMVP Images", f"{i}.jpg"), quality=100, subsampling=0)
    return folder


def write_task(output_dir: str, train: int, val: int, test: int, seed: int = 0, kind: str = "size",
               image_size: int = 112, n_objects: int = 4, shuffle_options: bool = False,
               shapes: tuple[str, ...] | None = None, jitter: int | None = 2) -> dict[str, str]:
    """All three splits (seeds `seed`, `seed + 1`, `seed + 2`; no scene shared between splits) in Visual-CoT's format,
    and validation and test also in MMVP's. Returns the paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths, seen = {}, set()
    for offset, (split, n) in enumerate((("train", train), ("val", val), ("test", test))):
        samples = generate_split(n, seed + offset, kind, image_size, n_objects, shuffle_options, exclude=seen,
                                 shapes=shapes, jitter=jitter)
        seen |= {s["key"] for s in samples}
        paths[split] = write_visual_cot(samples, output_dir, split)
        if split != "train":
            paths[f"{split}_mmvp"] = write_mmvp(samples, os.path.join(output_dir, f"{split}_mmvp"))
    paths["images"] = os.path.join(output_dir, "images")
    return paths
