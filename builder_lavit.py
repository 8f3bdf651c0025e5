# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""The LaViT-15K builder (paper section 4.1, appendix C.4): the teacher's signals on Visual-CoT, the three-stage
filter, parquet shards that resume after a kill, the manifest, the dataset card and the push to the Hub.

The filter: (1) correctness of the teacher's greedy answer (`answer_matches`: exact match after normalisation, ANLS
for document sources), (2) difficulty, the same teacher without the image, (3) alignment, S_focus (equation 1) >=
0.20. Every flag is stored; `kept` marks the samples that pass the chosen stages.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from cli_lavit import changed_settings
from data_lavit import (
    COLUMNS,
    MANIFEST,
    box_to_token_mask,
    check_shard,
    clip_box,
    commit_shard,
    file_sha256,
    open_image,
    read_shard_record,
    read_visual_cot,
    verify_lavit_folder,
    write_json_atomic,
    write_jsonl_atomic,
    write_manifest,
    write_parquet_atomic,
)
from modeling_lavit import enable_lavit_attention
from teacher_lavit import (
    QUERY_ROWS,
    check_teacher,
    extract_teacher_signals,
    generate_answers,
    load_qwen2_5_vl,
    s_focus,
    set_pixel_bounds,
)


logger = logging.getLogger(__name__)

DOCUMENT_SOURCES = frozenset({"docvqa", "infographicsvqa", "dude", "sroie"})


# ----------------------------------------------------------------------------------------------------------------
# The answer judge and the filter
# ----------------------------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str, drop_articles: bool = True) -> str:
    """Lower case, NFKC, punctuation and (by default) the articles a/an/the removed, white space collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCT.sub(" ", text)
    if drop_articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def anls(prediction: str, answer: str) -> float:
    """1 - normalised Levenshtein distance between the lower-cased, stripped strings (the DocVQA metric's core)."""
    a, b = " ".join(prediction.lower().split()), " ".join(answer.lower().split())
    if not a and not b:
        return 1.0
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return 1.0 - previous[-1] / max(len(a), len(b))


def answer_matches(prediction: str, answer: str, source: str = "") -> bool:
    """The default correctness judge of filter stage 1.

    * document sources (DocVQA, InfographicsVQA, DUDE, SROIE): ANLS >= 0.5;
    * otherwise: after `normalize_answer`, the prediction equals the answer or contains it as whole words (articles
      are kept when the answer is nothing but one, so the option letter "A" is judged like "B").

    Empty answers never match. Pass another callable `(prediction, answer, source) -> bool` to the builder to judge
    differently (e.g. an LLM judge for free-form captions).
    """
    if not prediction.strip() or not answer.strip():
        return False
    if source.lower() in DOCUMENT_SOURCES:
        return anls(prediction, answer) >= 0.5
    p, a = normalize_answer(prediction), normalize_answer(answer)
    if not a:  # the answer is itself an article-like word, such as the option letter "A": keep the articles
        p, a = normalize_answer(prediction, drop_articles=False), normalize_answer(answer, drop_articles=False)
    if not p or not a:
        return False
    return p == a or f" {a} " in f" {p} "


STAGES = ("correctness", "difficulty", "alignment")
REJECT_REASONS = {"correctness": "incorrect", "difficulty": "solvable_without_image", "alignment": "unfocused"}


def filter_stages(
    correct: bool,
    text_only_correct: bool,
    focus: float,
    threshold: float = 0.20,
    stages: tuple[str, ...] = STAGES,
) -> tuple[bool, bool, str | None]:
    """The three-stage filter of section 4.1 for one sample.

    Stage 1 (correctness) keeps samples the teacher answers correctly; stage 2 (difficulty) drops those it still
    answers without the image; stage 3 (alignment) drops those with S_focus below `threshold`. Only the `stages`
    given decide; the flags are computed regardless.

    Returns:
        `(aligned, kept, reason)`: reason is the first failed stage's tag (`incorrect`, `solvable_without_image`,
        `unfocused`), None when kept.
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"Unknown filter stages {sorted(unknown)}; choose from {STAGES}.")
    aligned = focus >= threshold
    passed = {"correctness": correct, "difficulty": not text_only_correct, "alignment": aligned}
    for stage in STAGES:
        if stage in stages and not passed[stage]:
            return aligned, False, REJECT_REASONS[stage]
    return aligned, True, None


# ----------------------------------------------------------------------------------------------------------------
# The builder
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BuilderConfig:
    """Everything that decides the content of a LaViT-15K build (stored in `builder_config.json`; a resumed run
    must match it)."""

    teacher: str
    viscot_json: str
    image_root: str
    sources: list[str] | None = None
    max_samples: int | None = None
    seed: int = 0
    batch_size: int = 4
    shard_size: int = 64
    min_pixels: int = 256 * 28 * 28
    max_pixels: int = 1280 * 28 * 28
    max_new_tokens: int = 64
    query_rows: str = "response"
    top_k: int = 8
    focus_threshold: float = 0.20
    stages: tuple[str, ...] = STAGES
    dtype: str = "auto"

    def __post_init__(self):
        self.stages = tuple(self.stages)
        filter_stages(True, False, 1.0, stages=self.stages)  # validates the stage names
        if self.query_rows not in QUERY_ROWS:
            raise ValueError(f"query_rows must be one of {QUERY_ROWS}, got {self.query_rows!r}.")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("batch_size and shard_size must be positive.")

    def fingerprint(self) -> dict[str, Any]:
        """The settings, and the Visual-CoT file by its content (sha256 of its bytes), not only its path: a file
        edited in place between a killed run and its resume must not be resumed as if unchanged."""
        data = asdict(self)
        data["viscot_json"] = os.path.abspath(self.viscot_json)
        data["viscot_json_sha256"] = file_sha256(self.viscot_json)
        data["image_root"] = os.path.abspath(self.image_root)
        data["stages"] = list(self.stages)
        return data


@dataclass
class BuildSummary:
    processed: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    shards_done: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0


def _load_image(root: str, relative: str) -> tuple[Image.Image, bytes]:
    path = Path(root) / relative
    data = path.read_bytes()  # FileNotFoundError for a missing image
    return open_image(data).convert("RGB"), data


def _process_batch(model, processor, samples, config: BuilderConfig, judge) -> tuple[list[dict], list[dict]]:
    """Runs the teacher on a batch; returns (rows, rejections of unusable inputs)."""
    loaded, rejections = [], []
    for sample in samples:
        try:
            image, data = _load_image(config.image_root, sample.image)
        except FileNotFoundError:
            rejections.append({"id": sample.id, "reason": "missing_image", "detail": sample.image})
            continue
        except Image.DecompressionBombError as err:  # larger than PIL's Image.MAX_IMAGE_PIXELS allows
            rejections.append({"id": sample.id, "reason": "image_too_large", "detail": f"{sample.image}: {err}"})
            continue
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            rejections.append({"id": sample.id, "reason": "corrupt_image", "detail": f"{sample.image}: {err}"})
            continue
        try:
            clip_box(sample.bbox, image.size)
        except ValueError as err:
            rejections.append({"id": sample.id, "reason": "box_outside_image", "detail": str(err)})
            continue
        loaded.append((sample, image, data))
    if not loaded:
        return [], rejections
    samples = [s for s, _, _ in loaded]
    images = [im for _, im, _ in loaded]
    questions = [s.question for s in samples]
    responses, response_ids = generate_answers(model, processor, questions, images, config.max_new_tokens)
    text_only, _ = generate_answers(model, processor, questions, None, config.max_new_tokens)
    signals = extract_teacher_signals(model, processor, images, questions, response_ids, config.query_rows, config.top_k)
    rows = []
    for b, (sample, image, data) in enumerate(loaded):
        grid_rows, grid_cols = signals.grid[b]
        gaze = signals.gaze[b]
        if not np.isfinite(gaze).all():
            rejections.append({"id": sample.id, "reason": "nonfinite_gaze",
                               "detail": f"{sample.image}: the teacher's gaze holds NaN or inf"})
            continue
        if not float(gaze.max() - gaze.min()) > 0:
            # Equal attention everywhere says nothing about where to look, and its top-k target would be arbitrary.
            rejections.append({"id": sample.id, "reason": "flat_gaze",
                               "detail": f"{sample.image}: the teacher's gaze is {float(gaze[0])} on all {gaze.size} "
                                         "image tokens"})
            continue
        box_mask = box_to_token_mask(sample.bbox, image.size, (grid_rows, grid_cols))
        focus = s_focus(signals.gaze[b], box_mask)
        correct = bool(judge(responses[b], sample.answer, sample.source))
        text_only_correct = bool(judge(text_only[b], sample.answer, sample.source))
        aligned, kept, reason = filter_stages(correct, text_only_correct, focus, config.focus_threshold, config.stages)
        rows.append(
            {
                "id": sample.id,
                "source": sample.source,
                "image": {"bytes": data, "path": None},
                "image_size": list(image.size),
                "question": sample.question,
                "answer": sample.answer,
                "teacher_response": responses[b],
                "text_only_response": text_only[b],
                "bbox": [float(v) for v in sample.bbox] if sample.bbox is not None else None,
                "gaze": signals.gaze[b].tolist(),
                "gaze_grid": [grid_rows, grid_cols],
                "v_sem_mean": signals.v_sem_mean[b].astype(np.float16).tolist(),
                "v_sem_gaze": signals.v_sem_gaze[b].astype(np.float16).tolist(),
                "s_focus": focus,
                "correct": correct,
                "text_only_correct": text_only_correct,
                "aligned": aligned,
                "kept": kept,
                "reject_reason": reason,
                "teacher_model": config.teacher,
            }
        )
    return rows, rejections


def _write_shard(output_dir: str, name: str, rows: list[dict], rejections: list[dict]) -> None:
    """Writes one shard's files, each atomically, then its `done/` record with each file's size and sha256
    (`data_lavit.commit_shard`): a shard is finished iff its record exists and intact iff its files match it. Empty
    parquet files are not written (`datasets` cannot read them); a stale one is removed."""
    kept = [r for r in rows if r["kept"]]
    for folder, subset in (("kept", kept), ("all", rows)):
        path = Path(output_dir) / folder / f"{name}.parquet"
        if subset:
            write_parquet_atomic(subset, path)
        elif path.exists():
            path.unlink()
    write_jsonl_atomic(rejections, Path(output_dir) / "rejections" / f"{name}.jsonl")
    commit_shard(output_dir, name, {"rows": len(rows), "kept": len(kept), "rejections": len(rejections)})


def _adopt_legacy_shard(output_dir: str, name: str, record: dict) -> None:
    """A shard finished by an older builder has a record without content hashes: if its parquet files read with
    the row counts it recorded, its hashes are recorded now; otherwise it stays unverified (and is rebuilt)."""
    import pyarrow.parquet as pq

    for sub, count in (("kept", record.get("kept")), ("all", record.get("rows"))):
        path = Path(output_dir) / sub / f"{name}.parquet"
        try:
            rows = pq.ParquetFile(path).metadata.num_rows if path.exists() else 0
        except Exception:  # noqa: BLE001 - any unreadable file means: not adoptable; the shard is rebuilt
            return
        if rows != count:
            return
    commit_shard(output_dir, name, {k: record[k] for k in ("rows", "kept", "rejections") if k in record})


def _record_adopting_legacy(output_dir: str, name: str) -> dict | None:
    """Shard `name`'s record, with the hashes of a shard an older builder finished recorded first (when it reads)."""
    record = read_shard_record(output_dir, name)
    if record is not None and not isinstance(record.get("files"), dict):
        _adopt_legacy_shard(output_dir, name, record)
        record = read_shard_record(output_dir, name)
    return record


def shard_status(output_dir: str, name: str) -> str | None:
    """None when shard `name` is finished and intact; otherwise why it must be (re)built."""
    return check_shard(output_dir, name, _record_adopting_legacy(output_dir, name))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def check_output_dir(output_dir: str, config: BuilderConfig, write: bool = True) -> dict[str, Any]:
    """Refuses an output folder that holds shards of another configuration or of another input file content;
    records the configuration otherwise (with `write`). Returns the fingerprint."""
    path = Path(output_dir) / "builder_config.json"
    fingerprint = config.fingerprint()
    if path.exists():
        existing = json.loads(path.read_text(encoding="utf-8"))
        if "viscot_json_sha256" not in existing and {**existing, "viscot_json_sha256": None} == {
                **fingerprint, "viscot_json_sha256": None}:
            # A folder an older builder started, before the input was fingerprinted by content: same arguments, so
            # its content fingerprint is recorded from now on (its shards are checked as they are resumed).
            existing["viscot_json_sha256"] = fingerprint["viscot_json_sha256"]
            if write:
                write_json_atomic(existing, path)
        if existing != fingerprint:
            diff = changed_settings(existing, fingerprint)
            if diff == ["viscot_json_sha256"] and "viscot_json_sha256" in existing:
                raise ValueError(
                    f"{config.viscot_json} changed since {output_dir} was started (its content differs, same path): "
                    "the finished shards hold records of the old file. Restore the file, or build in a new "
                    "--output-dir."
                )
            raise ValueError(
                f"{output_dir} holds shards built with other arguments (they differ in {diff}); refusing to mix them. "
                "Resume with the same arguments, or choose a new --output-dir."
            )
    elif any(Path(output_dir).glob("done/*.json")):
        raise ValueError(f"{output_dir} holds shards but no builder_config.json; choose a new --output-dir.")
    elif write:
        write_json_atomic(fingerprint, path)
    return fingerprint


def _planned_shards(config: BuilderConfig) -> list[str]:
    samples, _ = read_visual_cot(config.viscot_json, config.sources, config.max_samples, config.seed)
    return [shard_name(i) for i in range(-(-len(samples) // config.shard_size))]


def build_lavit_dataset(
    config: BuilderConfig,
    output_dir: str,
    model=None,
    processor=None,
    process_index: int = 0,
    num_processes: int = 1,
    judge: Callable[[str, str, str], bool] = answer_matches,
    device: str | None = None,
    device_map: str | None = None,
    progress: bool = True,
) -> BuildSummary:
    """Builds (or resumes) this process's shards of LaViT-15K in `output_dir`.

    The sampled records are cut into shards of `config.shard_size`; process `p` of `P` builds the shards `i` with
    `i % P == p`. A shard is written atomically (`kept/`, `all/`, `rejections/`, then the marker
    `done/<shard>.json`), so a killed run, restarted with the same arguments, redoes only unfinished shards and neither loses nor
    duplicates a sample; and the rows do not depend on the number of processes.
    """
    from tqdm.auto import tqdm

    # The inputs are read and checked before anything is written: a wrong path must not leave a folder that a
    # corrected rerun would refuse as "built with other arguments".
    samples, skipped = read_visual_cot(config.viscot_json, config.sources, config.max_samples, config.seed)
    if not os.path.isdir(config.image_root):
        raise ValueError(f"--image-root {config.image_root} is not a folder; pass the folder holding cot/<source>/.")
    os.makedirs(output_dir, exist_ok=True)
    check_output_dir(output_dir, config)
    if process_index == 0:
        write_jsonl_atomic(skipped, Path(output_dir) / "skipped_records.jsonl")
    shards = [samples[i : i + config.shard_size] for i in range(0, len(samples), config.shard_size)]
    mine = [i for i in range(len(shards)) if i % num_processes == process_index]
    todo = []
    for i in mine:
        problem = shard_status(output_dir, shard_name(i))
        if problem is not None and read_shard_record(output_dir, shard_name(i)) is not None:
            logger.warning("Shard %s is rebuilt: %s.", shard_name(i), problem)
            (Path(output_dir) / "done" / f"{shard_name(i)}.json").unlink()
        if problem is not None:
            todo.append(i)
    summary = BuildSummary(shards_skipped=len(mine) - len(todo))
    if not todo:
        return summary
    (Path(output_dir) / MANIFEST).unlink(missing_ok=True)  # the folder is unfinished again until finalize
    if model is None:
        model, processor = load_qwen2_5_vl(config.teacher, config.dtype, device, device_map, config.min_pixels,
                                        config.max_pixels)
    else:
        check_teacher(model)
        enable_lavit_attention(model)
        set_pixel_bounds(processor, config.min_pixels, config.max_pixels)
    start = time.time()
    bar = tqdm(total=sum(len(shards[i]) for i in todo), unit="sample", disable=not progress,
               desc=f"teacher signals [{process_index + 1}/{num_processes}]", position=process_index)
    for index in todo:
        rows, rejections = [], []
        shard = shards[index]
        for offset in range(0, len(shard), config.batch_size):
            batch = shard[offset : offset + config.batch_size]
            batch_rows, batch_rejections = _process_batch(model, processor, batch, config, judge)
            rows += batch_rows
            rejections += batch_rejections
            bar.update(len(batch))
        _write_shard(output_dir, shard_name(index), rows, rejections)
        summary.processed += len(rows)
        summary.kept += sum(r["kept"] for r in rows)
        summary.rejected.update(r["reject_reason"] for r in rows if not r["kept"])
        summary.skipped.update(r["reason"] for r in rejections)
        summary.shards_done += 1
    bar.close()
    summary.seconds = time.time() - start
    return summary


def finalize_dataset(output_dir: str, config: BuilderConfig, command: str) -> dict[str, Any]:
    """Once every shard is built: the manifest (every shard checked against its record), the dataset card
    (README.md, with Tables A3 and A4) and a licence note.

    Returns the overall summary (processed = kept + rejected; skipped inputs apart).
    """
    import pyarrow.parquet as pq

    for leftover in Path(output_dir).rglob(".*.tmp-*"):  # partial files of a killed run
        leftover.unlink()
    inputs = check_output_dir(output_dir, config, write=False)
    # the manifest is published with the data: the inputs by name and content, not by this machine's paths
    inputs = {**inputs, "viscot_json": os.path.basename(inputs["viscot_json"]),
              "image_root": os.path.basename(os.path.normpath(inputs["image_root"]))}
    names = _planned_shards(config)
    for name in names:
        _record_adopting_legacy(output_dir, name)
    # one hashing pass over the shards: write_manifest checks each against its record and refuses a missing or
    # damaged one, naming it
    manifest = write_manifest(output_dir, names, inputs)
    files = sorted(f for record in manifest["shards"].values() for f in record["files"])  # the build's, no strays
    columns = ["source", "question", "answer", "image_size", "gaze_grid", "v_sem_mean", "kept", "reject_reason"]
    all_rows = []
    for relative in (f for f in files if f.startswith("all/")):
        all_rows += pq.read_table(Path(output_dir, relative), columns=columns).to_pylist()
    kept_rows = [r for r in all_rows if r["kept"]]
    skipped = Counter()
    rejections = [Path(output_dir, f) for f in files if f.startswith("rejections/")]
    for path in [Path(output_dir, "skipped_records.jsonl"), *rejections]:
        if path.exists():
            skipped.update(json.loads(line)["reason"] for line in path.read_text().splitlines() if line.strip())
    summary = {
        "processed": len(all_rows),
        "kept": len(kept_rows),
        "rejected": dict(Counter(r["reject_reason"] for r in all_rows if not r["kept"])),
        "skipped": sum(skipped.values()),
        "skipped_reasons": dict(skipped),
    }
    for reason in ("incorrect", "solvable_without_image", "unfocused"):
        summary["rejected"].setdefault(reason, 0)
    card = render_dataset_card(dataset_statistics(kept_rows), dataset_statistics(all_rows), summary, command,
                               config.teacher)
    Path(output_dir, "README.md").write_text(card, encoding="utf-8")
    Path(output_dir, "LICENSE.md").write_text(
        "# Licences\n\nThis dataset derives from Visual-CoT (deepcs233/Visual-CoT) and the source datasets it gathers; "
        "each part keeps the licence and terms of use of its origin. The teacher signals are outputs of "
        f"{config.teacher}, under that model's licence.\n",
        encoding="utf-8",
    )
    return summary

# ----------------------------------------------------------------------------------------------------------------
# Statistics and the dataset card
# ----------------------------------------------------------------------------------------------------------------


def dataset_statistics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Tables A3 and A4 of the paper for `rows` (dicts with `source`, `question`, `answer`, `image_size`,
    `gaze_grid`, `v_sem_mean`)."""
    n = len(rows)
    counts = Counter(r["source"] for r in rows)
    words = lambda text: len(text.split())  # noqa: E731
    stats = {
        "samples": n,
        "sources": {s: {"samples": c, "percent": 100.0 * c / n} for s, c in counts.most_common()},
    }
    if n:
        stats.update(
            avg_question_words=float(np.mean([words(r["question"]) for r in rows])),
            max_question_words=int(max(words(r["question"]) for r in rows)),
            avg_answer_words=float(np.mean([words(r["answer"]) for r in rows])),
            avg_width=float(np.mean([r["image_size"][0] for r in rows])),
            avg_height=float(np.mean([r["image_size"][1] for r in rows])),
            avg_visual_tokens=float(np.mean([r["gaze_grid"][0] * r["gaze_grid"][1] for r in rows])),
            feature_dim=int(len(rows[0]["v_sem_mean"])),
        )
    return stats


def size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return name
    return "n>1M"


def render_dataset_card(
    kept_stats: dict[str, Any],
    all_stats: dict[str, Any],
    summary: dict[str, Any],
    command: str,
    teacher: str,
    pretty_name: str = "LaViT-15K",
) -> str:
    """The dataset card (README.md) of a built LaViT-15K folder: YAML header, summary, columns, generation,
    statistics (Tables A3, A4), licences and citation."""
    sources = sorted(all_stats["sources"])
    lines = [
        "---",
        "license: other",
        "license_name: upstream-licences",
        "license_link: LICENSE.md",
        "task_categories:",
        "- visual-question-answering",
        "- image-text-to-text",
        "language:",
        "- en",
        "size_categories:",
        f"- {size_category(kept_stats['samples'])}",
        f"pretty_name: {pretty_name}",
        "tags:",
        "- lavit",
        "- knowledge-distillation",
        "- visual-grounding",
        "- attention",
        "source_datasets:",
        "- deepcs233/Visual-CoT",
        "configs:",
        "- config_name: kept",
        "  default: true",
        "  data_files:",
        "  - split: train",
        "    path: kept/*.parquet",
        "- config_name: all",
        "  data_files:",
        "  - split: train",
        "    path: all/*.parquet",
        "---",
        "",
        f"# {pretty_name}",
        "",
        "## Summary",
        "",
        f"Visual-CoT questions with the white-box signals of the teacher `{teacher}`, as LaViT (Aligning Latent "
        "Visual Thoughts for Multi-modal Reasoning, section 4.1) distils them: for every image token the teacher's "
        "aggregated attention while it answers (the gaze, equation 2) and its last-layer visual semantics pooled two "
        "ways. Samples pass a three-stage filter: (1) the teacher answers correctly, (2) it cannot answer without "
        "the image, (3) at least 20% of its attention falls inside the annotated key region (S_focus, equation 1).",
        "",
        f"- `kept` (default): the {kept_stats['samples']} samples that pass all three stages, the training set.",
        f"- `all`: all {all_stats['samples']} processed samples with their filter flags and rejection reason, for "
        "analyses such as accuracy against visual focus.",
        "",
        "| processed | kept | " + " | ".join(f"rejected: {k}" for k in sorted(summary["rejected"])) + " | skipped (input) |",
        "|---|---|" + "---|" * len(summary["rejected"]) + "---|",
        f"| {summary['processed']} | {summary['kept']} | "
        + " | ".join(str(summary["rejected"][k]) for k in sorted(summary["rejected"]))
        + f" | {summary['skipped']} |",
        "",
        "Skipped inputs (missing or corrupt images, malformed records, boxes outside the image, ...) are listed with "
        "their reason in `skipped_records.jsonl` and `rejections/*.jsonl`.",
        "",
        "## Data structure",
        "",
        "| column | type and meaning |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | {meaning} |" for name, meaning in COLUMNS.items()]
    lines += [
        "",
        "```python",
        "from datasets import load_dataset",
        f'kept = load_dataset("<this repo or folder>", "kept", split="train")',
        "```",
        "",
        "## How it was generated",
        "",
        "```bash",
        command,
        "```",
        "",
        "One teacher-forced forward pass over [image, question, teacher response] per sample gives both signals: "
        "attention probabilities of the chosen query rows over the image keys are recomputed from those rows only "
        "(no attention matrix is materialised) and averaged over all text layers, heads and rows; the last-layer "
        "hidden states at the image positions come from the same pass.",
        "",
        "## Statistics (`kept`)",
        "",
        "| source | samples | percent |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {v['samples']} | {v['percent']:.2f}% |" for s, v in kept_stats["sources"].items()]
    lines += [f"| **total** | **{kept_stats['samples']}** | **100.00%** |", ""]
    if kept_stats["samples"]:
        lines += [
            "| statistic | value |",
            "|---|---|",
            f"| avg. question length | {kept_stats['avg_question_words']:.2f} words |",
            f"| max. question length | {kept_stats['max_question_words']} words |",
            f"| avg. answer length | {kept_stats['avg_answer_words']:.2f} words |",
            f"| avg. image resolution | {kept_stats['avg_width']:.0f} x {kept_stats['avg_height']:.0f} pixels |",
            f"| avg. visual tokens | {kept_stats['avg_visual_tokens']:.2f} |",
            f"| feature dimension | {kept_stats['feature_dim']} |",
            "",
        ]
    lines += [
        "## Licences",
        "",
        "The questions, answers, boxes and images come from Visual-CoT (`deepcs233/Visual-CoT`), which gathers them "
        f"from the source datasets present here ({', '.join(sources)}). Each keeps the licence and terms of use of "
        "its origin, several of which restrict commercial use or redistribution of the images; check them before "
        "you publish or use this dataset. The teacher signals are outputs of the teacher model, under its licence.",
        "",
        "## Citation",
        "",
        "```bibtex",
        "@article{lavit,",
        "  title  = {LaViT: Aligning Latent Visual Thoughts for Multi-modal Reasoning},",
        "  author = {Wu, Linquan and Jiang, Tianxiang and Dong, Yifei and Yang, Haoyu and Zhang, Fengji and Meng, "
        "Shichang and Xuan, Ai and Song, Linqi and Keung, Jacky}",
        "}",
        "@inproceedings{shao2024visualcot,",
        "  title     = {Visual CoT: Advancing Multi-Modal Language Models with a Comprehensive Dataset and Benchmark for "
        "Chain-of-Thought Reasoning},",
        "  author    = {Shao, Hao and Qian, Shengju and Xiao, Han and Song, Guanglu and Zong, Zhuofan and Wang, Letian "
        "and Liu, Yu and Li, Hongsheng},",
        "  booktitle = {NeurIPS Datasets and Benchmarks},",
        "  year      = {2024}",
        "}",
        "```",
        "",
    ]
    return "\n".join(lines)

# ----------------------------------------------------------------------------------------------------------------
# Publishing
# ----------------------------------------------------------------------------------------------------------------

UPLOAD_PATTERNS = ["README.md", "LICENSE.md", "manifest.json", "builder_config.json", "skipped_records.jsonl", "kept/*.parquet",
                   "all/*.parquet", "rejections/*.jsonl"]


def upload_plan(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """The files a push of `folder` uploads, as `(relative path, bytes)`, in upload order."""
    import fnmatch

    root = Path(folder)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    chosen = [f for f in files if any(fnmatch.fnmatch(f, pattern) for pattern in UPLOAD_PATTERNS)]
    return [(f, (root / f).stat().st_size) for f in chosen]


def push_dataset_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False, dry_run: bool = False):
    """Uploads a built LaViT-15K folder to the Hub as a dataset repository with `huggingface_hub`.

    With `dry_run` nothing touches the network: the returned plan lists exactly what would be uploaded.
    """
    if not (Path(folder) / "README.md").exists():
        raise ValueError(f"{folder} has no dataset card (README.md); finish the build before pushing.")
    for config in ("kept", "all"):
        verify_lavit_folder(folder, config)  # an unfinished or damaged build is not published
    plan = upload_plan(folder)
    if dry_run:
        return plan
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="dataset",
        allow_patterns=[f for f, _ in plan],
        commit_message="Upload LaViT-15K built with examples/build_lavit_dataset.py",
    )
    return plan

__all__ = [
    "normalize_answer",
    "anls",
    "answer_matches",
    "filter_stages",
    "BuilderConfig",
    "build_lavit_dataset",
    "finalize_dataset",
    "dataset_statistics",
    "render_dataset_card",
    "upload_plan",
    "push_dataset_to_hub",
]
