"""Visual-CoT-format records and images, generated for the tests in the real file layout."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

SUFFIX = " Please provide the bounding box coordinate of the region that can help you answer the question better."
SIZES = [(84, 56), (112, 140), (140, 84), (56, 56)]


def record(source, question_id, image, box, question="what color is the object?", answer="red", turns=4):
    conversations = [
        {"from": "human", "value": f"<image>\n{question}{SUFFIX}"},
        {"from": "gpt", "value": "[0.1, 0.1, 0.5, 0.5]"},
        {"from": "human", "value": "<image>"},
        {"from": "gpt", "value": answer},
    ][:turns]
    images = [image] if box is None else [image, f"{image}###{box}"]
    return {"dataset": source, "split": "train", "question_id": question_id, "image": images,
            "conversations": conversations}


def write_viscot(folder, n=12, sources=("gqa", "docvqa", "flickr30k"), bad=False, seed=0):
    """Writes `folder/viscot.json` and `folder/images/cot/<source>/<file>`; returns (json path, image root).

    With `bad`, adds one record of every kind of bad input after the good ones."""
    rng = np.random.default_rng(seed)
    root = os.path.join(folder, "images")
    records = []
    for i in range(n):
        source = sources[i % len(sources)]
        width, height = SIZES[i % len(SIZES)]
        rel = f"cot/{source}/img{i:03d}.jpg"
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(os.path.join(root, rel))
        box = [int(v) for v in (4 + i % 5, 6, min(width - 2, 40 + i), min(height - 2, 30 + i))]
        records.append(record(source, i, rel, box, question=f"what color is object {i}?", answer=["red", "blue"][i % 2]))
    if bad:
        good_image = records[0]["image"][0]
        os.makedirs(os.path.join(root, "cot/gqa"), exist_ok=True)
        with open(os.path.join(root, "cot/gqa/corrupt.jpg"), "wb") as f:
            f.write(b"this is not a jpeg")
        records += [
            record("gqa", 900, "cot/gqa/missing.jpg", [1, 1, 20, 20]),  # missing image
            record("gqa", 901, "cot/gqa/corrupt.jpg", [1, 1, 20, 20]),  # corrupt image
            record("gqa", 902, good_image, [500, 500, 600, 600]),  # box wholly outside the image
            record("gqa", 903, good_image, [1, 1, 20, 20], turns=3),  # fewer than four turns
            record("gqa", 904, good_image, None),  # no box
            record("gqa", 905, good_image, [1, 1, 20, 20], answer="  "),  # empty answer
            record("gqa", 906, good_image, [30, 30, 10, 40]),  # degenerate box
            record("gqa", 0, good_image, [1, 1, 20, 20]),  # duplicate (gqa, 0)
        ]
    path = os.path.join(folder, "viscot.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path, root
