# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""Data formats of LaViT: the Visual-CoT reader, the LaViT-15K schema with its parquet writer and loader, the
bounding-box -> token-grid rule, and the dataset card (paper section 4.1, appendix C.4).

Visual-CoT (`viscot_363k.json`) is a JSON list of records such as::

    {"dataset": "gqa", "split": "train", "question_id": 201,
     "image": ["cot/gqa/2354786.jpg", "cot/gqa/2354786.jpg###[12, 40, 96, 160]"],
     "conversations": [
        {"from": "human", "value": "<image>\\nWhat is on the table? Please provide the bounding box coordinate ..."},
        {"from": "gpt", "value": "[0.03, 0.11, 0.25, 0.44]"},
        {"from": "human", "value": "<image>"},
        {"from": "gpt", "value": "A laptop."}]}

The part after `###` is the key region in integer pixels of the original image; turn 1 holds the same box
normalised to the padded square and is ignored when the pixel box is there. `question_id` is unique only within
a source, so samples are keyed on (`dataset`, `question_id`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


logger = logging.getLogger(__name__)

VISCOT_IMAGE_PREFIX = "<image>\n"
VISCOT_BOX_SUFFIX = (
    " Please provide the bounding box coordinate of the region that can help you answer the question better."
)


# ----------------------------------------------------------------------------------------------------------------
# Visual-CoT
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisualCoTSample:
    """One Visual-CoT question with its key-region box.

    Attributes:
        id: `"<dataset>/<question_id>"`, unique across sources.
        source: the source dataset (`"gqa"`, `"docvqa"`, ...).
        split: Visual-CoT's split name.
        image: the image path relative to the image root (`cot/<source>/<file>`).
        bbox: the key region `(x1, y1, x2, y2)` in pixels of the original image, or None.
        question: the question, without the `<image>` prefix and the box-request suffix.
        answer: the ground-truth answer.
    """

    id: str
    source: str
    split: str
    image: str
    bbox: tuple[float, float, float, float] | None
    question: str
    answer: str


class SkippedRecord(ValueError):
    """A Visual-CoT record that cannot become a sample; `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_BOX = re.compile(r"^\s*\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]\s*$")


def parse_visual_cot_record(record: dict[str, Any]) -> VisualCoTSample:
    """Turns one Visual-CoT record into a `VisualCoTSample`; raises `SkippedRecord` with the reason otherwise."""
    if not isinstance(record, dict):
        raise SkippedRecord("malformed_record",
                            f"a record is {type(record).__name__} {str(record)[:60]!r}, not an object")
    key = record_key(record)
    for field in ("dataset", "question_id", "image", "conversations"):
        if field not in record:
            raise SkippedRecord("malformed_record", f"{key}: no '{field}' field")
    turns = record["conversations"]
    if not isinstance(turns, list) or len(turns) < 4:
        raise SkippedRecord("malformed_record", f"{key}: {len(turns) if isinstance(turns, list) else 0} conversation turns, needs 4")
    bad_turns = [i for i, turn in enumerate(turns) if not isinstance(turn, dict)]
    if bad_turns:
        raise SkippedRecord("malformed_record", f"{key}: conversation turns {bad_turns} are not objects")
    images = record["image"] if isinstance(record["image"], list) else [record["image"]]
    if not images or not all(isinstance(entry, str) for entry in images):
        raise SkippedRecord("malformed_record",
                            f"{key}: 'image' must be a path or a list of paths, got {images!r:.80}")
    path, bbox = images[0].split("###")[0], None
    for entry in images:
        if "###" in entry:
            match = _BOX.match(entry.split("###", 1)[1])
            if match is None:
                raise SkippedRecord("malformed_record", f"{key}: unreadable box {entry.split('###', 1)[1]!r}")
            bbox = tuple(float(v) for v in match.groups())
    if bbox is None:
        raise SkippedRecord("no_box", f"{key}: no pixel box ('###[x1, y1, x2, y2]') in its image field")
    x1, y1, x2, y2 = bbox
    if not (x2 > x1 and y2 > y1):
        raise SkippedRecord("degenerate_box", f"{key}: box {list(bbox)} has no area")
    question = str(turns[0].get("value", ""))
    question = question[len(VISCOT_IMAGE_PREFIX):] if question.startswith(VISCOT_IMAGE_PREFIX) else question
    question = question.replace("<image>", "")
    question = question[: -len(VISCOT_BOX_SUFFIX)] if question.endswith(VISCOT_BOX_SUFFIX) else question
    question = question.strip()
    answer = str(turns[3].get("value", "")).strip()
    if not question:
        raise SkippedRecord("empty_question", f"{key}: empty question")
    if not answer:
        raise SkippedRecord("empty_answer", f"{key}: empty answer")
    return VisualCoTSample(
        id=key,
        source=str(record["dataset"]),
        split=str(record.get("split", "")),
        image=path,
        bbox=bbox,
        question=question,
        answer=answer,
    )


def record_key(record: Any) -> str:
    """`"<dataset>/<question_id>"` of a record, or a placeholder for a record that is not an object."""
    if not isinstance(record, dict):
        return f"<{type(record).__name__} record>"
    return f"{record.get('dataset')}/{record.get('question_id')}"


def read_visual_cot(
    path: str | os.PathLike,
    sources: list[str] | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> tuple[list[VisualCoTSample], list[dict[str, str]]]:
    """Reads `viscot_363k.json`, keeps the given sources and samples `max_samples` of them with `seed`.

    Returns:
        samples: in a deterministic order (the sampled order, or the file order when not sampling).
        skipped: `{"id", "reason", "detail"}` for every record of the kept sources that could not become a sample
            (malformed, no box, degenerate box, empty answer, duplicate key).
    """
    if not os.path.isfile(path):
        raise ValueError(
            f"The Visual-CoT file {path} does not exist; pass --viscot-json the path of viscot_363k.json (or a file "
            "of its format)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}. A download cut short "
            "ends like this; fetch the file again."
        ) from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); pass Visual-CoT's JSON file.") from err
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of Visual-CoT records, got {type(records).__name__}.")
    if not records:
        raise ValueError(f"{path} holds no records: there is nothing to build. Pass Visual-CoT's viscot_363k.json.")
    wanted = set(sources) if sources else None
    samples, skipped, seen = [], [], set()
    for record in records:
        if wanted is not None and isinstance(record, dict) and record.get("dataset") not in wanted:
            continue
        try:
            sample = parse_visual_cot_record(record)
        except SkippedRecord as err:
            skipped.append({"id": record_key(record), "reason": err.reason, "detail": err.detail})
            continue
        if sample.id in seen:
            skipped.append({"id": sample.id, "reason": "duplicate_id", "detail": f"{sample.id} appears twice"})
            continue
        seen.add(sample.id)
        samples.append(sample)
    if wanted is not None:
        missing = wanted - {s.source for s in samples} - {r["id"].split("/")[0] for r in skipped}
        if missing:
            raise ValueError(f"No records of sources {sorted(missing)} in {path}; check the names (e.g. 'gqa').")
    if max_samples is not None and max_samples < len(samples):
        samples = random.Random(seed).sample(samples, max_samples)
    return samples, skipped


# ----------------------------------------------------------------------------------------------------------------
# Box -> token grid
# ----------------------------------------------------------------------------------------------------------------


def clip_box(bbox, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """`bbox` clipped to the `(width, height)` image; a `ValueError` when nothing of it is left (a degenerate box,
    or one wholly outside the image)."""
    width, height = image_size
    x1, y1, x2, y2 = (float(v) for v in bbox)
    x1, x2 = max(0.0, x1), min(float(width), x2)
    y1, y2 = max(0.0, y1), min(float(height), y2)
    if not (x2 > x1 and y2 > y1):
        raise ValueError(
            f"Box {[float(v) for v in bbox]} has no area inside the {width} x {height} image (degenerate or "
            "outside); such a sample cannot be scored for focus."
        )
    return x1, y1, x2, y2


def box_to_token_mask(
    bbox: tuple[float, float, float, float] | list[float],
    image_size: tuple[int, int],
    grid: tuple[int, int],
    min_cover: float = 0.5,
) -> np.ndarray:
    """The merged visual tokens that a pixel box covers, as a `(rows, cols)` bool mask.

    The processor resizes the `(width, height)` image to `(cols * 28, rows * 28)` pixels and each merged token
    sees one 28 x 28 cell, so in original pixels cell `(r, c)` spans `x` in `[c * width / cols, (c + 1) * width /
    cols)` and `y` likewise. The rule:

    * the box is first clipped to the image; a box with no area after clipping (degenerate, or wholly outside the
      image) is rejected with a `ValueError`;
    * a cell belongs to the box when the box covers at least `min_cover` of the cell's area (partial cells count
      when half covered, by default);
    * a box that covers no cell that much (a box smaller than a cell) gets the one cell it overlaps most, so every
      valid box maps to at least one token.
    """
    width, height = image_size
    rows, cols = grid
    x1, y1, x2, y2 = clip_box(bbox, image_size)
    cell_w, cell_h = width / cols, height / rows
    xs = np.arange(cols) * cell_w  # left edges
    ys = np.arange(rows) * cell_h  # top edges
    overlap_x = np.clip(np.minimum(xs + cell_w, x2) - np.maximum(xs, x1), 0, None)  # (cols,)
    overlap_y = np.clip(np.minimum(ys + cell_h, y2) - np.maximum(ys, y1), 0, None)  # (rows,)
    cover = np.outer(overlap_y, overlap_x) / (cell_w * cell_h)  # (rows, cols) fraction of each cell covered
    mask = cover >= min_cover - 1e-9
    if not mask.any():
        mask = np.zeros_like(mask)
        mask[np.unravel_index(np.argmax(cover), cover.shape)] = True
    return mask


def gaze_topk_weights(gaze: torch.Tensor, mask: torch.Tensor, top_k: int = 8, eps: float = 1e-8) -> torch.Tensor:
    """Pooling weights of equation 3: the gaze min-max normalised over each sample's image tokens, sparsified to its
    `top_k` largest entries and normalised to sum to 1.

    Args:
        gaze: `(B, N)` raw S. mask: `(B, N)` bool, real image tokens.
    Returns:
        `(B, N)` weights, zero outside the top-k and on padding.
    """
    big = torch.finfo(gaze.dtype).max
    low = gaze.masked_fill(~mask, big).amin(dim=1, keepdim=True)  # (B, 1)
    high = gaze.masked_fill(~mask, -big).amax(dim=1, keepdim=True)  # (B, 1)
    normalised = ((gaze - low) / (high - low + eps)).masked_fill(~mask, -1.0)  # (B, N); padding sorts last
    k = min(top_k, gaze.shape[1])
    top = normalised.topk(k, dim=1)
    weights = torch.zeros_like(gaze).scatter(1, top.indices, top.values.clamp_min(0))
    weights = weights * mask
    total = weights.sum(dim=1, keepdim=True)
    # A flat gaze (all equal) normalises to zeros and names no top-k (topk would pick arbitrary, position-biased
    # ties): it falls back to uniform weights over every real token, favouring none. (The builder skips such
    # samples and the trainer refuses them; this keeps the pooling defined.)
    weights = torch.where(total > 0, weights, mask.to(weights.dtype))
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(eps)


def merged_token_grids(image_grid_thw, merge_size: int = 2) -> list[tuple[int, int]]:
    """Each image's grid of merged visual tokens, `(rows, cols)`, from the processor's `image_grid_thw` (patch counts
    `(t, h, w)` per image) and the vision tower's spatial merge size (`image_processor.merge_size`)."""
    rows = image_grid_thw.tolist() if hasattr(image_grid_thw, "tolist") else image_grid_thw
    return [(int(h) // merge_size, int(w) // merge_size) for _, h, w in rows]


def resize_gaze(gaze: torch.Tensor, source_grid: tuple[int, int], target_grid: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a gaze map from the teacher's token grid to the student's (`align_corners=False`, the
    convention of `torch.nn.functional.interpolate`).

    Args:
        gaze: `(rows_t * cols_t,)` or `(rows_t, cols_t)`. source_grid, target_grid: `(rows, cols)`.
    Returns:
        `(rows_s, cols_s)` float32.
    """
    rows, cols = source_grid
    gaze = torch.as_tensor(gaze, dtype=torch.float32)
    if gaze.numel() != rows * cols:
        raise ValueError(f"A gaze of {gaze.numel()} values does not fill its {rows} x {cols} grid.")
    grid = gaze.reshape(1, 1, rows, cols)
    if (rows, cols) == tuple(target_grid):
        return grid[0, 0].clone()
    return F.interpolate(grid, size=tuple(target_grid), mode="bilinear", align_corners=False)[0, 0]


# ----------------------------------------------------------------------------------------------------------------
# LaViT-15K schema
# ----------------------------------------------------------------------------------------------------------------

COLUMNS = {
    "id": "string: '<source>/<question_id>', unique",
    "source": "string: the Visual-CoT source dataset",
    "image": "image: the original image file (bytes, decoded to PIL by `datasets`)",
    "image_size": "list<int32>[2]: width, height in pixels",
    "question": "string: the question",
    "answer": "string: the ground-truth answer",
    "teacher_response": "string: the teacher's greedy answer with the image",
    "text_only_response": "string: the teacher's greedy answer with the image withheld (filter stage 2)",
    "bbox": "list<float32>[4] or null: the key region x1, y1, x2, y2 in pixels of the original image",
    "gaze": "list<float32>: raw aggregated attention S_j per image token, row-major over gaze_grid (equation 2)",
    "gaze_grid": "list<int32>[2]: rows, cols of the teacher's merged token grid",
    "v_sem_mean": "list<float16>: teacher last-layer hidden states at the image tokens, mean-pooled (official code)",
    "v_sem_gaze": "list<float16>: the same, pooled with the top-k of the min-max-normalised gaze (equation 3)",
    "s_focus": "float32 or null: attention mass inside the box over the total (equation 1)",
    "correct": "bool: filter stage 1, the teacher's answer matches the ground truth",
    "text_only_correct": "bool: filter stage 2, the teacher still answers without the image (then dropped)",
    "aligned": "bool: filter stage 3, s_focus >= the threshold (0.20)",
    "kept": "bool: passed all three stages (the `kept` config)",
    "reject_reason": "string or null: the first failed stage: incorrect, solvable_without_image or unfocused",
    "teacher_model": "string: the teacher checkpoint",
}


def _feature(kind: str):
    """The `datasets` feature of a column type as COLUMNS writes it (`string`, `bool`, `float32`, `image`,
    `list<float16>`, `list<int32>[2]`, each optionally `or null`)."""
    from datasets import Image, List, Value

    kind = kind.removesuffix(" or null")
    if kind == "image":
        return Image()
    match = re.fullmatch(r"list<(\w+)>(?:\[(\d+)\])?", kind)
    if match:
        return List(Value(match.group(1)), length=int(match.group(2)) if match.group(2) else -1)
    return Value(kind)


def features():
    """The `datasets.Features` of LaViT-15K, read from COLUMNS (each description starts with its type)."""
    from datasets import Features

    return Features({name: _feature(text.split(":", 1)[0]) for name, text in COLUMNS.items()})


def write_parquet_atomic(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Writes `rows` (LaViT-15K rows) as one parquet shard; the file appears complete or not at all."""
    import pyarrow.parquet as pq
    from datasets import Dataset

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    columns = {name: [row[name] for row in rows] for name in COLUMNS}
    # The Arrow table carries the `datasets` features in its schema metadata, so Image columns decode on load.
    pq.write_table(Dataset.from_dict(columns, features=features()).data.table, tmp)
    os.replace(tmp, path)


def write_json_atomic(data: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl_atomic(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def open_image(data: Any):
    """A PIL image, decoded now (corrupt data fails here, not later in a processor), from bytes, a path, a PIL image
    or a `datasets` image dict (`bytes`, else `path`). Raises PIL's errors (`UnidentifiedImageError`, `OSError`,
    `DecompressionBombError`) for data that does not decode, a `ValueError` for data that is none of these."""
    from PIL import Image

    if isinstance(data, Image.Image):
        return data
    if isinstance(data, dict):
        data = data.get("bytes") if data.get("bytes") is not None else data.get("path")
    if isinstance(data, (bytes, bytearray)):
        image = Image.open(io.BytesIO(data))
    elif isinstance(data, (str, os.PathLike)):
        image = Image.open(data)
    else:
        raise ValueError(f"an image is bytes, a path or a PIL image, got {type(data).__name__} {str(data)[:80]}")
    image.load()
    return image


# ----------------------------------------------------------------------------------------------------------------
# The manifest: what a finished LaViT-15K folder holds, by content
# ----------------------------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "lavit15k-manifest/1"
SHARD_FOLDERS = (("kept", ".parquet"), ("all", ".parquet"), ("rejections", ".jsonl"))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def commit_shard(folder: str | os.PathLike, name: str, counts: dict[str, int]) -> dict[str, Any]:
    """Records a shard whose files are written: `done/<name>.json` holds `counts` and, per file of the shard
    (`kept/`, `all/`, `rejections/`), its size and sha256. Written atomically, last: a shard is committed iff its
    record exists, and is intact iff its files still match it (`check_shard`)."""
    root = Path(folder)
    files = {}
    for sub, suffix in SHARD_FOLDERS:
        path = root / sub / f"{name}{suffix}"
        if path.exists():
            files[f"{sub}/{name}{suffix}"] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    record = {**counts, "files": files}
    write_json_atomic(record, root / "done" / f"{name}.json")
    return record


def read_shard_record(folder: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The shard's `done/` record, or None when the shard was never committed (or its record is unreadable)."""
    path = Path(folder) / "done" / f"{name}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def check_shard(folder: str | os.PathLike, name: str, record: dict[str, Any] | None = None,
                subfolders: tuple[str, ...] = ("kept", "all", "rejections")) -> str | None:
    """What is wrong with a committed shard's files (in `subfolders`), in words, or None when they match its record:
    a file missing, cut short, changed, or present where the record has none."""
    root = Path(folder)
    record = record if record is not None else read_shard_record(folder, name)
    if record is None:
        return "it was never finished (no done/ record)"
    files = record.get("files")
    if not isinstance(files, dict):
        return "its record predates content hashes"
    for sub, suffix in SHARD_FOLDERS:
        if sub not in subfolders:
            continue
        relative = f"{sub}/{name}{suffix}"
        path = root / relative
        expected = files.get(relative)
        if expected is None:
            if path.exists():
                return f"{relative} is not part of it as recorded"
            continue
        if not isinstance(expected, dict) or not {"bytes", "sha256"} <= set(expected):
            return f"its record of {relative} is damaged"
        if not path.exists():
            return f"{relative} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{relative} has {size} bytes, {expected['bytes']} were written"
        if file_sha256(path) != expected["sha256"]:
            return f"{relative} changed since it was written (sha256 differs)"
    return None


def write_manifest(folder: str | os.PathLike, shard_names: list[str], inputs: dict[str, Any]) -> dict[str, Any]:
    """Completes a build: checks every shard of the plan against its record and writes `manifest.json` (the
    input's fingerprint, and per shard its counts and files). Raises a `ValueError` naming the first shard that is
    missing or damaged."""
    shards = {}
    for name in shard_names:
        record = read_shard_record(folder, name)
        problem = check_shard(folder, name, record)
        if problem is not None:
            raise ValueError(
                f"Shard {name} of {folder} cannot be finalised: {problem}. Run the build again with the same "
                "arguments: it rebuilds exactly the missing or damaged shards."
            )
        shards[name] = record
    manifest = {
        "format": MANIFEST_FORMAT,
        "complete": True,
        "inputs": inputs,
        "shards": shards,
        "rows": sum(int(r.get("rows", 0)) for r in shards.values()),
        "kept": sum(int(r.get("kept", 0)) for r in shards.values()),
    }
    write_json_atomic(manifest, Path(folder) / MANIFEST)
    return manifest


def verify_lavit_folder(folder: str | os.PathLike, config: str = "kept") -> dict[str, Any]:
    """Checks a local LaViT-15K folder before it is read: a finished build (`manifest.json`), every shard of
    `config` present with the bytes it was written with, and no parquet file the build did not write. Returns the
    manifest; raises a `ValueError` naming the problem, the shard and the fix otherwise.

    The cost is one sha256 pass over the config's files, small beside reading them (benchmarks/RESULTS.md)."""
    root = Path(folder)
    path = root / MANIFEST
    if not path.exists():
        started = len(list(root.glob("done/*.json")))
        if started:
            raise ValueError(
                f"{folder} is an unfinished LaViT-15K build ({started} shards done, no {MANIFEST}): training on it "
                "would silently use part of the data. Run examples/build_lavit_dataset.py again with the same "
                "arguments to finish it (finished shards are kept)."
            )
        raise ValueError(
            f"{folder} has no {MANIFEST}, so it is not a finished LaViT-15K build. Build it with "
            f"examples/build_lavit_dataset.py --output-dir {folder} (a folder from an older build is finalised by "
            "running its build command again)."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is damaged ({err}); run the build command again to rewrite it.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not manifest.get("complete"):
        raise ValueError(f"{path} is not a complete {MANIFEST_FORMAT} manifest; run the build command again.")
    shards = manifest.get("shards")
    if not isinstance(shards, dict) or not all(isinstance(r, dict) and isinstance(r.get("files"), dict)
                                               for r in shards.values()):
        raise ValueError(f"{path} is damaged (its shard records are unreadable); run the build command again.")
    for name, record in sorted(shards.items()):
        problem = check_shard(folder, name, record, subfolders=(config,))
        if problem is not None:
            raise ValueError(
                f"{folder} is damaged: in shard {name}, {problem}. Run examples/build_lavit_dataset.py again with the "
                "same arguments: it rebuilds exactly the damaged shards."
            )
    recorded = {relative for record in shards.values() for relative in record["files"] if relative.startswith(config)}
    strays = sorted(p.relative_to(root).as_posix() for p in root.glob(f"{config}/*.parquet"))
    strays = [relative for relative in strays if relative not in recorded]
    if strays:
        raise ValueError(
            f"{folder} holds {strays}, which its build did not write; remove them (or rebuild in a new folder)."
        )
    return manifest


def lavit_cache_key(manifest: dict[str, Any], config: str) -> str:
    """A name for the content of a verified folder's `config`: the sha256 of its files' recorded sha256s (the
    manifest just checked against the files), so that a folder rebuilt or replaced under the same name gets another
    key and never the old rows."""
    digests = sorted((relative, entry["sha256"]) for record in manifest["shards"].values()
                     for relative, entry in record["files"].items() if relative.startswith(f"{config}/"))
    return hashlib.sha256(json.dumps(digests).encode("utf-8")).hexdigest()[:32]


def load_lavit_dataset(path: str | os.PathLike, config: str = "kept", cache_dir: str | os.PathLike | None = None):
    """Loads LaViT-15K (`config` `"kept"`: the training set, `"all"`: every processed sample with its flags) from a
    local folder or a hub id, as a `datasets.Dataset` with decoded PIL images. A local folder is verified first
    (`verify_lavit_folder`): an unfinished, damaged or altered build is refused with the fix.

    A local folder is read into Arrow files under `cache_dir` (default: the datasets cache) and memory-mapped, as
    `load_dataset` does: the processes of a multi-GPU run share one copy through the page cache instead of each
    holding the dataset in memory. The cache is named for the folder's content (`lavit_cache_key`), not its path: a
    rebuilt folder is read as it is now."""
    from datasets import load_dataset

    if config not in ("kept", "all"):
        raise ValueError(f"LaViT-15K has the configs 'kept' and 'all', not {config!r}.")
    if not os.path.isdir(path):
        if os.path.exists(path) or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
            raise ValueError(
                f"{path} is neither a LaViT-15K folder nor a Hub dataset id (owner/name); build a folder with "
                "examples/build_lavit_dataset.py --output-dir <folder>."
            )
        return load_dataset(str(path), config, split="train")
    manifest = verify_lavit_folder(path, config)
    shards = sorted(Path(path, config).glob("*.parquet"))
    if not shards:
        raise ValueError(
            f"{path} has no '{config}' rows (every sample of the build was rejected); see its README.md for why."
        )
    from datasets import Dataset
    from datasets import config as datasets_config

    root = Path(cache_dir if cache_dir is not None else datasets_config.HF_DATASETS_CACHE)
    # processes that load at once take datasets' lock on this folder: one writes the Arrow files, the rest read them
    return Dataset.from_parquet([str(shard) for shard in shards], split="train",
                                cache_dir=str(root / "lavit15k" / f"{config}-{lavit_cache_key(manifest, config)}"))


__all__ = [
    "VisualCoTSample",
    "SkippedRecord",
    "parse_visual_cot_record",
    "read_visual_cot",
    "clip_box",
    "box_to_token_mask",
    "merged_token_grids",
    "resize_gaze",
    "gaze_topk_weights",
    "COLUMNS",
    "features",
    "write_parquet_atomic",
    "open_image",
    "commit_shard",
    "check_shard",
    "write_manifest",
    "verify_lavit_folder",
    "lavit_cache_key",
    "load_lavit_dataset",
]
