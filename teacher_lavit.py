# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""What the teacher gives (paper section 4.1, equations 1-3, appendix C.1-C.2).

`extract_teacher_signals` runs **one** teacher-forced forward pass over [image, question, teacher response] on a
stock Qwen2.5-VL teacher with sdpa and LaViT's attention side channel. From that pass it takes

* the gaze S_j (equation 2): the attention of the chosen query rows T_text over each image token, averaged over all
  text layers, all heads and the rows. The rows' probabilities are recomputed from their own queries and all keys,
  so no (L x L) attention matrix is ever materialised (the official code runs eager attention with
  `output_attentions=True`);
* the visual semantics V_sem: the last-layer hidden states at the image positions, pooled as the mean (the official
  code) and weighted by the top-k of the min-max-normalised gaze (equation 3), from the same pass (the official
  code runs a second forward for them).

`s_focus` (equation 1) measures how much of the gaze falls inside the key region. The LaViT-15K builder that runs
all this over Visual-CoT is `builder_lavit`.
"""


from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cli_lavit import checkpoint_model_type
from data_lavit import gaze_topk_weights, merged_token_grids
from modeling_lavit import (
    LavitAttentionControl,
    enable_lavit_attention,
    image_attention_capture,
    model_device,
    padded_positions,
)
from processing_lavit import LavitBaseProcessor, user_turn


logger = logging.getLogger(__name__)

QUERY_ROWS = ("response", "prompt_and_response")



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


def load_qwen2_5_vl(
    name_or_path: str,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    device_map: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
):
    """Loads a stock Qwen2.5-VL model (a teacher, or a student's base) and its image-only processor, with LaViT's
    attention side channel switched on.

    Args:
        name_or_path: hub id or path (e.g. `Qwen/Qwen2.5-VL-32B-Instruct`).
        dtype: dtype to load in (`"auto"`: as stored).
        device: the device of a teacher that fits on one (ignored with `device_map`).
        device_map: e.g. `"auto"` to spread a teacher larger than one GPU over several.
        min_pixels, max_pixels: the image processor's pixel bounds (paper: 256*28*28 and 1280*28*28).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    model_type = checkpoint_model_type(name_or_path)  # names a missing local folder instead of the Hub's repo-id error
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
        processor.apply_chat_template([user_turn(q, int(images is not None))], add_generation_prompt=True)
        for q in questions
    ]
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, padding_side="left")
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
    prompts = [processor.apply_chat_template([user_turn(q)], add_generation_prompt=True) for q in questions]
    prompt = processor(text=prompts, images=images, return_tensors="pt", padding=True, padding_side="right")
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
        model: a stock Qwen2.5-VL teacher (`load_qwen2_5_vl` switches its text attention to `lavit_sdpa`).
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

__all__ = [
    "load_qwen2_5_vl",
    "check_teacher",
    "set_pixel_bounds",
    "generate_answers",
    "teacher_forced_inputs",
    "extract_teacher_signals",
    "forced_attention_pass",
    "ForcedPass",
    "TeacherSignals",
    "s_focus",
    "QUERY_ROWS",
]
