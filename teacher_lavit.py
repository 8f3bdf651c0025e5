# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""What the teacher gives (paper section 4.1, equations 1-3, appendix C.1-C.2), and the LaViT-15K builder.

`extract_teacher_signals` runs **one** teacher-forced forward pass over [image, question, teacher response] on a
stock Qwen2.5-VL teacher with sdpa and LaViT's attention side channel. From that pass it takes

* the gaze S_j (equation 2): the attention of the chosen query rows T_text over each image token, averaged over all
  text layers, all heads and the rows. The rows' probabilities are recomputed from their own queries and all keys,
  so no (L x L) attention matrix is ever materialised (the official code runs eager attention with
  `output_attentions=True`);
* the visual semantics V_sem: the last-layer hidden states at the image positions, pooled as the mean (the official
  code) and weighted by the top-k of the min-max-normalised gaze (equation 3), from the same pass (the official
  code runs a second forward for them).

The three-stage filter: (1) correctness of the teacher's greedy answer, (2) difficulty, the same teacher without
the image, (3) alignment, S_focus (equation 1) >= 0.20.
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
import torch
from PIL import Image, UnidentifiedImageError

from data_lavit import (
    VisualCoTSample,
    box_to_token_mask,
    check_shard,
    clip_box,
    commit_shard,
    dataset_statistics,
    file_sha256,
    merged_token_grids,
    read_shard_record,
    read_visual_cot,
    render_dataset_card,
    write_json_atomic,
    write_jsonl_atomic,
    write_manifest,
    write_parquet_atomic,
)
from modeling_lavit import LavitAttentionControl, enable_lavit_attention, image_attention_capture, padded_positions
from processing_lavit import LavitBaseProcessor


logger = logging.getLogger(__name__)

QUERY_ROWS = ("response", "prompt_and_response")
DOCUMENT_SOURCES = frozenset({"docvqa", "infographicsvqa", "dude", "sroie"})


# ----------------------------------------------------------------------------------------------------------------
# Loading and checking a teacher
# ----------------------------------------------------------------------------------------------------------------


def check_teacher(model) -> None:
    """Raises a `ValueError` unless `model` is a Qwen2.5-VL model (whose text attention LaViT can read)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if not isinstance(model, Qwen2_5_VLForConditionalGeneration):
        raise ValueError(
            f"The teacher must be a Qwen2.5-VL model (Qwen2_5_VLForConditionalGeneration), got "
            f"{type(model).__name__}; use e.g. Qwen/Qwen2.5-VL-32B-Instruct."
        )


def load_teacher(
    name_or_path: str,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    device_map: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
):
    """Loads a Qwen2.5-VL teacher and its image-only processor, with LaViT's attention side channel switched on.

    Args:
        name_or_path: hub id or path (e.g. `Qwen/Qwen2.5-VL-32B-Instruct`).
        dtype: dtype to load in (`"auto"`: as stored).
        device: the device of a teacher that fits on one (ignored with `device_map`).
        device_map: e.g. `"auto"` to spread a teacher larger than one GPU over several.
        min_pixels, max_pixels: the image processor's pixel bounds (paper: 256*28*28 and 1280*28*28).
    """
    from transformers import PretrainedConfig, Qwen2_5_VLForConditionalGeneration

    model_type = PretrainedConfig.get_config_dict(name_or_path)[0].get("model_type")
    if model_type != "qwen2_5_vl":
        raise ValueError(
            f"The teacher {name_or_path} is a '{model_type}' model; the teacher must be a stock Qwen2.5-VL model "
            "(model_type 'qwen2_5_vl'), e.g. Qwen/Qwen2.5-VL-32B-Instruct."
        )
    kwargs = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(name_or_path, **kwargs).eval()
    if device_map is None and device is not None:
        model.to(device)
    enable_lavit_attention(model)
    processor = LavitBaseProcessor.from_pretrained(name_or_path)
    set_pixel_bounds(processor, min_pixels, max_pixels)
    return model, processor


def set_pixel_bounds(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Sets the image processor's bounds on the resized image area (in pixels)."""
    size = dict(processor.image_processor.size)
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
    if size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"min_pixels {size['shortest_edge']} exceeds max_pixels {size['longest_edge']}.")
    processor.image_processor.size = size


# ----------------------------------------------------------------------------------------------------------------
# Generation and teacher forcing
# ----------------------------------------------------------------------------------------------------------------


def _messages(question: str, with_image: bool) -> list[dict[str, Any]]:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def model_device(model) -> torch.device:
    """The device of the model's input embeddings: where its inputs go, also under a device map."""
    return model.get_input_embeddings().weight.device


@torch.inference_mode()
def generate_answers(
    model,
    processor,
    questions: list[str],
    images: list[Image.Image] | None = None,
    max_new_tokens: int = 64,
) -> tuple[list[str], list[list[int]]]:
    """The teacher's greedy answers, batched with left padding; `images=None` withholds the image (stage 2).

    Returns:
        texts: the decoded answers (special tokens removed).
        token_ids: each answer's generated ids up to and including the end-of-turn token (when produced).
    """
    prompts = [
        processor.apply_chat_template(_messages(q, images is not None), add_generation_prompt=True) for q in questions
    ]
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    inputs = {k: v.to(model_device(model)) for k, v in inputs.items()}
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
    new = generated[:, inputs["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    pad = processor.tokenizer.pad_token_id
    token_ids = []
    for ids in new:
        kept = []
        for token in ids:
            kept.append(token)
            if token in eos:
                break
        while kept and kept[-1] == pad and pad not in eos:
            kept.pop()
        token_ids.append(kept)
    texts = [processor.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]
    return texts, token_ids


def teacher_forced_inputs(processor, images, questions, response_ids: list[list[int]]):
    """The batch [image, question, teacher response], right-padded.

    Returns:
        inputs: `input_ids`, `attention_mask`, `mm_token_type_ids`, `pixel_values`, `image_grid_thw`.
        response_mask: `(B, L)` bool, True on the response tokens.
    """
    prompts = [processor.apply_chat_template(_messages(q, True), add_generation_prompt=True) for q in questions]
    processor.tokenizer.padding_side = "right"
    prompt = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    pad = processor.tokenizer.pad_token_id
    lengths = prompt["attention_mask"].sum(dim=1).tolist()
    total = max(int(n) + len(r) for n, r in zip(lengths, response_ids))
    batch = len(questions)
    input_ids = torch.full((batch, total), pad, dtype=torch.long)
    attention_mask = torch.zeros(batch, total, dtype=torch.long)
    mm_types = torch.zeros(batch, total, dtype=prompt["mm_token_type_ids"].dtype)
    response_mask = torch.zeros(batch, total, dtype=torch.bool)
    for b, (n, response) in enumerate(zip(lengths, response_ids)):
        n = int(n)
        input_ids[b, :n] = prompt["input_ids"][b, :n]
        input_ids[b, n : n + len(response)] = torch.tensor(response, dtype=torch.long)
        attention_mask[b, : n + len(response)] = 1
        mm_types[b, :n] = prompt["mm_token_type_ids"][b, :n]
        response_mask[b, n : n + len(response)] = True
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": mm_types,
        "pixel_values": prompt["pixel_values"],
        "image_grid_thw": prompt["image_grid_thw"],
    }
    return inputs, response_mask


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


@dataclass
class TeacherSignals:
    """Per-sample outputs of `extract_teacher_signals` (lists of length B)."""

    gaze: list[np.ndarray]  # (N_i,) float32 raw S_j, row-major over grid
    grid: list[tuple[int, int]]  # (rows, cols) of the merged token grid
    v_sem_mean: np.ndarray  # (B, D) float32
    v_sem_gaze: np.ndarray  # (B, D) float32


@dataclass
class ForcedPass:
    """The outputs of `forced_attention_pass`."""

    capture: object  # the AttentionCapture: per-layer records, `key_index`/`key_mask` of the image tokens
    hidden: torch.Tensor  # (B, L, D) last hidden states
    inputs: dict  # the batch that was run
    rows: torch.Tensor  # (B, L) bool, the query rows
    grids: list[tuple[int, int]]  # (rows, cols) of each sample's merged image grid


@torch.inference_mode()
def forced_attention_pass(
    model,
    processor,
    images: list[Image.Image],
    questions: list[str],
    response_ids: list[list[int]],
    query_rows: str = "response",
    reduce_queries: bool = True,
) -> ForcedPass:
    """One teacher-forced sdpa pass over [image, question, response] of a Qwen2.5-VL or LaViT model, recording the
    chosen rows' attention over the image tokens through the side channel (no attention matrix is materialised).

    Args:
        query_rows: `"response"` (the response tokens), `"prompt_and_response"` (every text token after the image)
            or `"latents"` (a LaViT model's latent tokens; the processor must append them).
        reduce_queries: average the rows (`(B, N)` per layer) or keep them (`(B, R, N)`).
    """
    if query_rows not in QUERY_ROWS + ("latents",):
        raise ValueError(f"query_rows must be one of {QUERY_ROWS + ('latents',)}, got {query_rows!r}.")
    if any(image is None for image in images):
        raise ValueError("Every sample needs an image in its prompt to read attention over it; one has none.")
    if model.config.text_config._attn_implementation != "lavit_sdpa":
        enable_lavit_attention(model)
    inputs, response_mask = teacher_forced_inputs(processor, images, questions, response_ids)
    ids = inputs["input_ids"]
    is_image = ids == model.config.image_token_id
    if not bool(is_image.any(dim=1).all()):
        raise ValueError("Every sample needs an image in its prompt to read attention over it.")
    if query_rows == "response":
        rows = response_mask
    elif query_rows == "latents":
        latent_ids = getattr(model.config, "latent_token_ids", None)
        if latent_ids is None:
            raise ValueError("query_rows='latents' needs a LaViT model (its config names the latent tokens).")
        rows = torch.isin(ids, torch.tensor(latent_ids))
    else:
        rows = (is_image.cumsum(dim=1) > 0) & ~is_image & inputs["attention_mask"].bool()
    if not bool(rows.any(dim=1).all()):
        raise ValueError(f"A sample has no {query_rows} rows (an empty response, or no latent tokens in its prompt).")
    row_index, row_mask = padded_positions(rows)
    capture = image_attention_capture(ids, model.config.image_token_id, row_index, row_mask,
                                      reduce_queries=reduce_queries)
    device = model_device(model)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    # The base model only: what is read here is attention and last hidden states, not the vocabulary logits.
    out = model.model(**inputs, use_cache=False, lavit_control=LavitAttentionControl(capture=capture))
    grids = merged_token_grids(inputs["image_grid_thw"], processor.image_processor.merge_size)
    return ForcedPass(capture=capture, hidden=out.last_hidden_state, inputs=inputs, rows=rows, grids=grids)


@torch.inference_mode()
def extract_teacher_signals(
    model,
    processor,
    images: list[Image.Image],
    questions: list[str],
    response_ids: list[list[int]],
    query_rows: str = "response",
    top_k: int = 8,
) -> TeacherSignals:
    """The gaze (equation 2) and both poolings of V_sem (mean; equation 3) from one teacher-forced forward pass.

    Args:
        model: a stock Qwen2.5-VL teacher (`load_teacher` switches its text attention to `lavit_sdpa`).
        processor: its image-only processor (`LavitBaseProcessor`).
        images, questions: one image per sample.
        response_ids: the teacher's answer token ids per sample (`generate_answers`).
        query_rows: T_text of equation 2: `"response"` (the response tokens, the paper's reading) or
            `"prompt_and_response"` (every text token after the image, as the official code aggregates).
        top_k: k of the gaze-weighted pooling (paper: 8).
    """
    check_teacher(model)
    if query_rows not in QUERY_ROWS:
        raise ValueError(f"query_rows must be one of {QUERY_ROWS}, got {query_rows!r}.")
    run = forced_attention_pass(model, processor, images, questions, response_ids, query_rows)
    gaze = run.capture.mean_over_layers()  # (B, N) averaged over layers, heads and rows
    hidden = run.hidden  # (B, L, D)
    image_index = run.capture.key_index.to(hidden.device)
    image_hidden = hidden.gather(1, image_index[:, :, None].expand(-1, -1, hidden.shape[-1])).float()  # (B, N, D)
    mask = run.capture.key_mask.to(hidden.device)
    v_mean = (image_hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # (B, D)
    weights = gaze_topk_weights(gaze.to(hidden.device), mask, top_k)  # (B, N)
    v_gaze = (image_hidden * weights[:, :, None]).sum(1)  # (B, D)
    counts = mask.sum(1).tolist()
    gaze_np = gaze.float().cpu().numpy()
    return TeacherSignals(
        gaze=[gaze_np[b, : int(n)].astype(np.float32) for b, n in enumerate(counts)],
        grid=run.grids,
        v_sem_mean=v_mean.cpu().numpy(),
        v_sem_gaze=v_gaze.cpu().numpy(),
    )


# ----------------------------------------------------------------------------------------------------------------
# Focus and the filter
# ----------------------------------------------------------------------------------------------------------------


def s_focus(gaze: np.ndarray | torch.Tensor, box_mask: np.ndarray | torch.Tensor) -> float:
    """Equation 1: the attention mass inside the box over the total mass on the image.

    Args:
        gaze: `(N,)` or `(rows, cols)` non-negative attention over the image tokens (raw S, not normalised).
        box_mask: bool of the same number of elements, True inside the box (`box_to_token_mask`).
    """
    gaze = np.asarray(gaze, dtype=np.float64).reshape(-1)
    box_mask = np.asarray(box_mask, dtype=bool).reshape(-1)
    if gaze.shape != box_mask.shape:
        raise ValueError(f"s_focus needs a map and a box mask of the same size, got {gaze.size} and {box_mask.size}.")
    total = gaze.sum()
    if total <= 0:
        raise ValueError("s_focus of a map with no attention mass is undefined.")
    return float(gaze[box_mask].sum() / total)


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
    image = Image.open(path)
    image.load()  # decode now: corrupt files fail here, not later in the processor
    return image.convert("RGB"), data


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
        rows_, cols_ = signals.grid[b]
        gaze = signals.gaze[b]
        if not float(gaze.max() - gaze.min()) > 0:
            # Equal attention everywhere says nothing about where to look, and its top-k target would be arbitrary.
            rejections.append({"id": sample.id, "reason": "flat_gaze",
                               "detail": f"{sample.image}: the teacher's gaze is {float(gaze[0])} on all {gaze.size} "
                                         "image tokens"})
            continue
        box_mask = box_to_token_mask(sample.bbox, image.size, (rows_, cols_))
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
                "gaze_grid": [rows_, cols_],
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


def shard_status(output_dir: str, name: str) -> str | None:
    """None when shard `name` is finished and intact; otherwise why it must be (re)built."""
    record = read_shard_record(output_dir, name)
    if record is not None and not isinstance(record.get("files"), dict):
        _adopt_legacy_shard(output_dir, name, record)
        record = read_shard_record(output_dir, name)
    return check_shard(output_dir, name, record)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def check_output_dir(output_dir: str, config: BuilderConfig, write: bool = True) -> dict[str, Any]:
    """Refuses an output folder that holds shards of another configuration or of another input file content;
    records the configuration otherwise (with `write`). Returns the fingerprint."""
    path = Path(output_dir) / "builder_config.json"
    fingerprint = config.fingerprint()
    if path.exists():
        existing = json.loads(path.read_text(encoding="utf-8"))
        if existing != fingerprint:
            diff = sorted(k for k in set(existing) | set(fingerprint) if existing.get(k) != fingerprint.get(k))
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


def plan_shards(config: BuilderConfig, output_dir: str) -> tuple[int, int]:
    """`(shards in the plan, shards finished and intact in output_dir)`."""
    names = _planned_shards(config)
    return len(names), sum(shard_status(output_dir, name) is None for name in names)


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
    if model is None:
        model, processor = load_teacher(config.teacher, config.dtype, device, device_map, config.min_pixels,
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
    names = _planned_shards(config)
    for name in names:
        shard_status(output_dir, name)  # records the hashes of a shard an older builder finished
    manifest = write_manifest(output_dir, names, inputs)  # refuses a missing or damaged shard, naming it
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


__all__ = [
    "load_teacher",
    "check_teacher",
    "generate_answers",
    "teacher_forced_inputs",
    "extract_teacher_signals",
    "forced_attention_pass",
    "ForcedPass",
    "TeacherSignals",
    "gaze_topk_weights",
    "s_focus",
    "normalize_answer",
    "anls",
    "answer_matches",
    "filter_stages",
    "BuilderConfig",
    "build_lavit_dataset",
    "plan_shards",
    "finalize_dataset",
]
