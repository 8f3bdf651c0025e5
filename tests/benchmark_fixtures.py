"""MMVP, V*Bench, BLINK and MMStar fixtures written in each benchmark's published schema, with generated images."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def _image(seed: int, size=(56, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png(seed: int, size=(56, 56)) -> bytes:
    buffer = io.BytesIO()
    _image(seed, size).save(buffer, format="PNG")
    return buffer.getvalue()


def write_mmvp(root, n: int = 8, corrupt: bool = False) -> str:
    os.makedirs(os.path.join(root, "MMVP Images"), exist_ok=True)
    with open(os.path.join(root, "Questions.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Index", "Question", "Options", "Correct Answer"])
        for i in range(1, n + 1):
            writer.writerow([i, f"Is the dog facing left in picture {i}?", "(a) Yes (b) No", "(a)" if i % 2 else "(b)"])
            _image(i).save(os.path.join(root, "MMVP Images", f"{i}.jpg"))
    if corrupt:
        with open(os.path.join(root, "MMVP Images", "2.jpg"), "wb") as f:
            f.write(b"not an image")
        os.remove(os.path.join(root, "MMVP Images", "3.jpg"))
    return str(root)


def write_vstar(root, n_attributes: int = 4, n_relative: int = 2) -> str:
    os.makedirs(os.path.join(root, "direct_attributes"), exist_ok=True)
    os.makedirs(os.path.join(root, "relative_position"), exist_ok=True)
    lines = []
    for i in range(n_attributes + n_relative):
        category = "direct_attributes" if i < n_attributes else "relative_position"
        image = f"{category}/sa_{i}.jpg"
        _image(100 + i, (84, 56)).save(os.path.join(root, image))
        text = (f"What is the color of the cup {i}?\n(A) red\n(B) blue\n(C) green\n(D) white\n"
                "Answer with the option's letter from the given choices directly.")
        lines.append(json.dumps({"image": image, "text": text, "category": category, "question_id": i,
                                 "label": "ABCD"[i % 4]}))
    with open(os.path.join(root, "test_questions.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(root)


BLINK_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_blink(root, tasks=("Relative_Depth", "IQ_Test", "Relative_Reflectance", "Spatial_Relation"), n: int = 3) -> str:
    for t, task in enumerate(tasks):
        os.makedirs(os.path.join(root, task), exist_ok=True)
        images_per = 2 if task == "Relative_Depth" else 1
        rows = {k: [] for k in ("idx", "question", "sub_task", "image_1", "image_2", "image_3", "image_4", "choices",
                                "answer", "prompt")}
        for i in range(n):
            choices = ["A", "B"] if task != "IQ_Test" else ["shape 1", "shape 2", "shape 3", "shape 4"]
            rows["idx"].append(f"val_{task}_{i}")
            rows["question"].append(f"Which point is closer to the camera in {task} {i}?")
            rows["sub_task"].append(task)
            for k in range(1, 5):
                rows[f"image_{k}"].append({"bytes": _png(1000 * t + 10 * i + k), "path": None} if k <= images_per else None)
            rows["choices"].append(choices)
            rows["answer"].append(f"({'ABCD'[i % len(choices)]})")
            rows["prompt"].append("...")
        schema = pa.schema([("idx", pa.string()), ("question", pa.string()), ("sub_task", pa.string()),
                            *[(f"image_{k}", BLINK_IMAGE) for k in range(1, 5)], ("choices", pa.list_(pa.string())),
                            ("answer", pa.string()), ("prompt", pa.string())])
        pq.write_table(pa.table(rows, schema=schema), os.path.join(root, task, "val-00000-of-00001.parquet"))
    return str(root)


def write_mmstar(path, n: int = 4) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    categories = ["coarse perception", "fine-grained perception"]
    rows = {"index": [], "question": [], "image": [], "answer": [], "category": [], "l2_category": []}
    for i in range(n):
        rows["index"].append(i)
        rows["question"].append(
            f"Which option describes the object relationship in image {i} correctly?\nOptions: A: The suitcase is on "
            "the book., B: The suitcase is beneath the cat., C: The suitcase is beneath the bed., D: The suitcase is "
            "beneath the book.")
        rows["image"].append({"bytes": _png(500 + i), "path": None})
        rows["answer"].append("ABCD"[i % 4])
        rows["category"].append(categories[i % 2])
        rows["l2_category"].append("relation reasoning")
    schema = pa.schema([("index", pa.int64()), ("question", pa.string()), ("image", BLINK_IMAGE),
                        ("answer", pa.string()), ("category", pa.string()), ("l2_category", pa.string())])
    pq.write_table(pa.table(rows, schema=schema), path)
    return str(path)
