# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""The LaViT trainer: TRL's `SFTTrainer` with curriculum sensory gating and the distillation losses (paper
sections 4.2-4.2.3, 5.1, Table 3, appendix A.2 and C.2).

    L_total = L_ntp + lambda_c * L_concept + lambda_t * L_traj                                   (equation 9)

* `LavitSFTConfig`: `SFTConfig` whose defaults are the paper's recipe (Table A1), plus the LaViT fields; every
  baseline and ablation of Table 3 and Table A2 is a setting of it.
* `sensory_gate` and `SensoryGateCallback`: gamma(t) of equation 5 (or the ablations' step and constant schedules),
  set on the model from `state.global_step` at every step, so a resumed run continues exactly.
* `LavitDataCollator`: TRL's vision-language collator on the prompt/completion form of each LaViT-15K row (the
  latent tokens lead the completion, so the labels cover them and the answer, never the prompt or image pads) plus
  the teacher targets: V_sem, and the gaze resized bilinearly to the student's token grid, min-max normalised,
  top-k sparsified and normalised (C.2).
* `LavitSFTTrainer`: `compute_loss` adds the concept and trajectory losses, logs every component and gamma.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from cli_lavit import changed_settings
from configuration_lavit import parse_latent_layers, resolve_latent_layers
from data_lavit import gaze_topk_weights, merged_token_grids, open_image, resize_gaze, write_json_atomic
from modeling_lavit import (
    LAVIT_ATTENTION,
    LavitForConditionalGeneration,
    concept_loss,
    summed_token_loss,
    token_statistics,
    trajectory_loss,
)
from processing_lavit import LavitProcessor, add_latent_tokens_to_chat_template, set_default_system_prompt


logger = logging.getLogger(__name__)

GATE_SCHEDULES = ("cosine", "step", "none")
CONCEPT_TARGETS = {"mean": "v_sem_mean", "gaze": "v_sem_gaze"}
TRAJECTORY_TOKENS = ("all_latents", "last_latent")


# ----------------------------------------------------------------------------------------------------------------
# Curriculum sensory gating
# ----------------------------------------------------------------------------------------------------------------


def sensory_gate(step: int, warmup_steps: int, epsilon: float = 1e-6, schedule: str = "cosine") -> float:
    """gamma(t), the sensory gate at optimizer step `step`.

    * `"cosine"` (equation 5): epsilon + (1 - epsilon) / 2 * (1 - cos(pi * t / T_w)) for t < T_w, then 1;
    * `"step"` (Table 3, "w/o curriculum gating"): 0 (a hard mask) for t < T_w, then 1;
    * `"none"` (Table 3, "single stage"): always 1.
    """
    if schedule not in GATE_SCHEDULES:
        raise ValueError(f"gate_schedule must be one of {GATE_SCHEDULES}, got {schedule!r}.")
    if schedule == "none" or step >= warmup_steps:
        return 1.0
    if schedule == "step":
        return 0.0
    return epsilon + (1.0 - epsilon) / 2.0 * (1.0 - math.cos(math.pi * step / warmup_steps))


def is_lavit_model(model) -> bool:
    """Whether `model` is a LaViT model, this repository's class or the same class loaded as a checkpoint's remote
    code (a distinct Python class of the same name)."""
    if isinstance(model, LavitForConditionalGeneration):
        return True
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "lavit" and callable(getattr(model, "set_sensory_gate", None))


def unwrap_lavit(model) -> LavitForConditionalGeneration | None:
    """The LaViT model inside DDP / DeepSpeed / FSDP / PEFT wrappers, or None."""
    seen = 0
    while seen < 8:
        if is_lavit_model(model):
            return model
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        elif hasattr(model, "module"):  # DDP, DeepSpeed
            model = model.module
        elif hasattr(model, "_fsdp_wrapped_module"):
            model = model._fsdp_wrapped_module
        else:
            return None
        seen += 1
    return None


class SensoryGateCallback(TrainerCallback):
    """Sets the model's sensory gate to gamma(`state.global_step`) at the start of every optimizer step (and of
    training, so a resumed run starts from the gate its step calls for)."""

    def __init__(self, warmup_steps: int, epsilon: float = 1e-6, schedule: str = "cosine"):
        sensory_gate(0, warmup_steps, epsilon, schedule)  # validates
        self.warmup_steps = warmup_steps
        self.epsilon = epsilon
        self.schedule = schedule

    def gamma(self, step: int) -> float:
        return sensory_gate(step, self.warmup_steps, self.epsilon, self.schedule)

    def _set(self, state, model) -> None:
        lavit = unwrap_lavit(model)
        if lavit is not None:
            lavit.set_sensory_gate(self.gamma(state.global_step))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._set(state, model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._set(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # The trained model runs with the gate open, as at inference (the buffer is not saved either).
        lavit = unwrap_lavit(model)
        if lavit is not None:
            lavit.set_sensory_gate(1.0)


# ----------------------------------------------------------------------------------------------------------------
# Teacher targets (C.2)
# ----------------------------------------------------------------------------------------------------------------


def sparsify_gaze(gaze: torch.Tensor, top_k: int = 8, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalises a map (equation 3), keeps its `top_k` largest entries and normalises them to a
    distribution (the trajectory target of equation 7). A flat map (which the builder skips and the trainer refuses)
    spreads evenly over all its entries, favouring none.

    Args:
        gaze: any shape. Returns: same shape, non-negative, summing to 1, at most `top_k` non-zeros (a flat map:
            all).
    """
    flat = torch.as_tensor(gaze, dtype=torch.float32).reshape(1, -1)
    weights = gaze_topk_weights(flat, torch.ones_like(flat, dtype=torch.bool), top_k, eps)  # equation 3's pooling
    return weights.reshape(torch.as_tensor(gaze).shape)


def trajectory_target(gaze, teacher_grid, student_grid, top_k: int = 8) -> torch.Tensor:
    """C.2: the teacher's gaze resized to the student's grid, min-max normalised, top-k sparsified and normalised;
    `(rows_s * cols_s,)` row-major, as the student's image tokens are ordered."""
    return sparsify_gaze(resize_gaze(gaze, teacher_grid, student_grid), top_k).reshape(-1)


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LavitSFTConfig(SFTConfig):
    r"""
    Configuration of [`LavitSFTTrainer`]: TRL's `SFTConfig` with the paper's recipe as defaults (Table A1) and the
    LaViT fields. Every row of Table 3 and Table A2 is a setting:

    | run | setting |
    |---|---|
    | LaViT (paper) | the defaults |
    | w/o trajectory alignment | `trajectory_loss_coef=0` |
    | w/o semantic reconstruction | `concept_loss_coef=0` |
    | w/o curriculum sensory gating | `gate_schedule="step"` |
    | single stage | `gate_schedule="none"` |
    | K = 4, 6, 8 | a student converted with that K |
    | Naive SFT | `distill=False` |

    Parameters:
        concept_loss_coef (`float`, *optional*, defaults to `0.3`):
            lambda of L_concept in equation 9.
        trajectory_loss_coef (`float`, *optional*, defaults to `0.3`):
            lambda of L_traj in equation 9.
        gate_schedule (`str`, *optional*, defaults to `"cosine"`):
            `"cosine"` (equation 5), `"step"` (gamma = 0, a hard mask, for t < T_w, then 1) or `"none"` (gamma = 1).
        gate_warmup_steps (`int`, *optional*, defaults to `400`):
            T_w, the length of phase 1 in optimizer steps.
        gate_epsilon (`float`, *optional*, defaults to `1e-6`):
            epsilon, the gate at step 0 of the cosine schedule.
        concept_target (`str`, *optional*, defaults to `"gaze"`):
            Which pooling of V_sem L_concept reconstructs: `"gaze"` (top-k of the gaze, equation 3) or `"mean"` (the
            official code's mean over the image tokens).
        trajectory_target_tokens (`str`, *optional*, defaults to `"all_latents"`):
            `"all_latents"`: equation 7 sums the KL over the K latent tokens; `"last_latent"`: the last one only.
        trajectory_topk (`int`, *optional*, defaults to `8`):
            k of the top-k sparsification of the trajectory target.
        distill (`bool`, *optional*, defaults to `True`):
            `False` trains the Naive-SFT baseline: the same data, text-only supervision, no latent tokens. With
            `distill=False` or `concept_loss_coef=0` the trainer freezes the concept head, which no loss reaches
            then, so that DDP (which the Trainer runs without looking for unused parameters when activation
            checkpointing is on) does not stop at the second step; a multi-process `train()` refuses to start if the
            head was made trainable again without `ddp_find_unused_parameters=True`, and refuses
            `ddp_find_unused_parameters=True` with reentrant checkpointing (DDP stops on both).
        freeze_vision_tower (`bool`, *optional*, defaults to `True`):
            Whether the vision encoder is frozen (the language model is trained).
        response_column (`str`, *optional*, defaults to `"answer"`):
            The dataset column the model learns to answer with (`"answer"`, or `"teacher_response"`).
        cache_preprocessing (`bool`, *optional*, defaults to `False`):
            Keep each sample's processed form (rendered and tokenized prompt and completion, processed image, teacher
            targets) in memory after its first batch and reuse it at every later epoch (`PreprocessingCache`); the
            batches are the same. Pass `preprocessing_cache=` to the trainer to share one cache between trainers.
        cache_preprocessing_max_gb (`float`, *optional*, defaults to `4.0`):
            The cache's budget; samples past it are processed at every batch (counted, logged once).
        latent_attention_layers (`str`, *optional*):
            Sets the student's `latent_attention_layers` (the layers L_traj reads the latent tokens' attention from)
            for this training, saved with the model: `"all"` (the paper), `"last_half"`, `"last"`, `"last_<n>"` or
            comma-separated indices such as `"2,3"`. Default: what the student was converted with.
        learning_rate, lr_scheduler_type, warmup_ratio, weight_decay, max_steps, per_device_train_batch_size:
            The paper's 5e-6, linear decay, 0.03, 0, 1000 and 16.
    """

    concept_loss_coef: float = field(default=0.3, metadata={"help": "lambda of L_concept (equation 9)."})
    trajectory_loss_coef: float = field(default=0.3, metadata={"help": "lambda of L_traj (equation 9)."})
    gate_schedule: str = field(
        default="cosine", metadata={"help": "Sensory gate schedule: cosine (eq. 5), step (hard mask, then open) or none."}
    )
    gate_warmup_steps: int = field(default=400, metadata={"help": "T_w, the length of phase 1 in optimizer steps."})
    gate_epsilon: float = field(default=1e-6, metadata={"help": "epsilon, the gate at step 0 of the cosine schedule."})
    concept_target: str = field(
        default="gaze", metadata={"help": "V_sem pooling to reconstruct: gaze (top-k, eq. 3) or mean (official)."}
    )
    trajectory_target_tokens: str = field(
        default="all_latents", metadata={"help": "all_latents (eq. 7 sums over K) or last_latent."}
    )
    trajectory_topk: int = field(default=8, metadata={"help": "k of the trajectory target's top-k sparsification."})
    distill: bool = field(default=True, metadata={"help": "False trains the Naive-SFT baseline (no latent tokens)."})
    freeze_vision_tower: bool = field(default=True, metadata={"help": "Freeze the vision encoder."})
    response_column: str = field(default="answer", metadata={"help": "Dataset column holding the target answer."})
    cache_preprocessing: bool = field(
        default=False, metadata={"help": "Keep each sample's processed form in memory and reuse it every epoch."}
    )
    cache_preprocessing_max_gb: float = field(
        default=4.0, metadata={"help": "Memory budget of cache_preprocessing, in GB (past it: processed anew)."}
    )
    latent_attention_layers: str | None = field(
        default=None,
        metadata={"help": "Layers L_traj reads: all (paper), last_half, last, last_<n> or indices '2,3'; default: "
                          "the student's own setting."},
    )
    # The paper's recipe (Table A1)
    learning_rate: float = field(default=5e-6, metadata={"help": "Initial learning rate (paper: 5e-6)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Learning-rate schedule (paper: linear)."})
    warmup_ratio: float | None = field(default=0.03, metadata={"help": "Learning-rate warm-up ratio (paper: 0.03)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (paper: 0)."})
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps (paper: 1000)."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Per-device batch size (paper: 16)."})
    # What the LaViT data path needs
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator reads the teacher columns."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Truncation length; None keeps every image token (images reach 1280)."}
    )
    prediction_loss_only: bool = field(default=True, metadata={"help": "Evaluation reports losses only."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; default: on when CUDA has it."})
    activation_checkpointing: bool | None = field(
        default=True, metadata={"help": "Recompute activations in the backward (non-reentrant; saves memory)."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in an output_dir that holds another run (its checkpoints are removed first); "
                          "without it such a folder is refused unless resume_from_checkpoint is given."},
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and not self.fp16
        if self.activation_checkpointing_kwargs is None and self.gradient_checkpointing_kwargs is None:
            self.activation_checkpointing_kwargs = {"use_reentrant": False}
        super().__post_init__()
        self.validate_lavit()

    def reentrant_checkpointing(self) -> bool:
        """Whether activation checkpointing is on in its reentrant form."""
        return bool(self.gradient_checkpointing and (self.gradient_checkpointing_kwargs or {}).get("use_reentrant"))

    def cuts_trajectory_gradients(self) -> bool:
        """Whether L_traj is on while reentrant gradient checkpointing would cut its gradients (the side channel's
        attention is recomputed outside the autograd graph). Checked here and again once the trainer (TRL may force
        reentrant checkpointing for PEFT under DeepSpeed ZeRO-3) has settled the checkpointing arguments."""
        return bool(self.distill and self.trajectory_loss_coef > 0 and self.reentrant_checkpointing())

    def validate_lavit(self) -> None:
        """Raises a `ValueError` naming the field and the fix."""
        for name in ("concept_loss_coef", "trajectory_loss_coef"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}; 0 removes the loss (an ablation).")
        if self.gate_schedule not in GATE_SCHEDULES:
            raise ValueError(f"gate_schedule must be one of {GATE_SCHEDULES}, got {self.gate_schedule!r}.")
        if self.gate_warmup_steps < 0:
            raise ValueError(f"gate_warmup_steps must be >= 0, got {self.gate_warmup_steps} (paper: 400).")
        if not 0 < self.gate_epsilon < 1:
            raise ValueError(f"gate_epsilon must lie in (0, 1), got {self.gate_epsilon} (paper: 1e-6).")
        if self.concept_target not in CONCEPT_TARGETS:
            raise ValueError(f"concept_target must be one of {sorted(CONCEPT_TARGETS)}, got {self.concept_target!r}.")
        if self.trajectory_target_tokens not in TRAJECTORY_TOKENS:
            raise ValueError(
                f"trajectory_target_tokens must be one of {TRAJECTORY_TOKENS}, got {self.trajectory_target_tokens!r}."
            )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be a positive number of optimizer steps (or -1: train num_train_epochs), "
                             f"got {self.max_steps} (paper: 1000).")
        if self.trajectory_topk < 1:
            raise ValueError(f"trajectory_topk must be >= 1, got {self.trajectory_topk} (paper: 8).")
        if self.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns must be False: the LaViT collator reads the image, question and teacher columns."
            )
        if not self.cache_preprocessing_max_gb > 0:
            raise ValueError(f"cache_preprocessing_max_gb must be positive, got {self.cache_preprocessing_max_gb}.")
        if self.latent_attention_layers is not None:
            parse_latent_layers(self.latent_attention_layers)  # the form here; the depth against the model, later
        if self.cuts_trajectory_gradients():
            raise ValueError(
                "Reentrant gradient checkpointing (use_reentrant=True) silently cuts the gradients of the latent "
                "tokens' attention, so L_traj would not train the model. Use gradient_checkpointing_kwargs="
                "{'use_reentrant': False} (the default here) or gradient_checkpointing=False."
            )


# ----------------------------------------------------------------------------------------------------------------
# Checks of the teacher's targets
# ----------------------------------------------------------------------------------------------------------------


def gaze_problem(gaze: np.ndarray, grid: tuple[int, int]) -> str | None:
    """Why a sample's gaze cannot make a trajectory target, or None."""
    if grid[0] < 1 or grid[1] < 1:
        return f"its gaze_grid {list(grid)} has no cells"
    if gaze.size != grid[0] * grid[1]:
        return f"its gaze has {gaze.size} values but its gaze_grid {list(grid)} holds {grid[0] * grid[1]}"
    if not np.isfinite(gaze).all():
        return "its gaze holds NaN or inf"
    if not float(gaze.max() - gaze.min()) > 0:
        return (f"its gaze is flat ({float(gaze[0])} on every cell): it says nothing about where to look, and its "
                "top-k target would be arbitrary")
    return None


def check_gaze_columns(table, name: str) -> None:
    """Scans a dataset's `gaze` and `gaze_grid` (a pyarrow table of the dataset's own rows, with `id` if it has one)
    once, before training: every sample must give a trajectory target. Raises a `ValueError` naming the samples
    (up to 5), their count and the fix."""
    gaze_column = table.column("gaze").combine_chunks()
    grids = table.column("gaze_grid").to_pylist()
    ids = table.column("id").to_pylist() if "id" in table.column_names else None
    offsets = np.asarray(gaze_column.offsets)  # absolute positions in .values, also for a sliced array
    values = np.asarray(gaze_column.values.to_numpy(zero_copy_only=False), dtype=np.float64)
    # Every row at once (no Python loop over a dataset of 15,000): the rows any check flags are then described one by
    # one by gaze_problem, which decides.
    lengths = np.diff(offsets)
    shape = np.array([g if g is not None and len(g) == 2 else (0, 0) for g in grids], dtype=np.int64).reshape(-1, 2)
    flagged = np.asarray(gaze_column.is_null()) | (lengths == 0) | (shape.min(axis=1) < 1)
    flagged |= lengths != shape[:, 0] * shape[:, 1]
    used = values[: offsets[-1]] if len(offsets) else values[:0]  # a sliced array's child may run on
    if used.size:
        starts = np.minimum(offsets[:-1], used.size - 1)  # an empty row's segment is flagged above already
        finite = np.isfinite(used)
        flagged |= ~np.logical_and.reduceat(finite, starts)
        spread = np.maximum.reduceat(np.where(finite, used, -np.inf), starts) - np.minimum.reduceat(
            np.where(finite, used, np.inf), starts)
        flagged |= ~(spread > 0)
    bad = []
    for i in np.flatnonzero(flagged):
        grid = grids[i]
        if grid is None or len(grid) != 2 or gaze_column[int(i)].as_py() is None:
            problem = "it has no gaze or no gaze_grid"
        else:
            problem = gaze_problem(values[offsets[i]:offsets[i + 1]], (int(grid[0]), int(grid[1])))
        if problem is not None:
            bad.append((ids[i] if ids is not None else f"#{i}", problem))
    if bad:
        shown = "; ".join(f"sample {sample}: {problem}" for sample, problem in bad[:5])
        raise ValueError(
            f"{len(bad)} samples of the {name} dataset cannot give a trajectory target ({shown}). Rebuild the dataset "
            "with examples/build_lavit_dataset.py (which skips such samples with their reason), or filter them out."
        )


RUN_RECORD = "lavit_run.json"
RUN_SETTINGS = ("distill", "concept_loss_coef", "trajectory_loss_coef", "gate_schedule", "gate_warmup_steps",
                "gate_epsilon", "concept_target", "trajectory_target_tokens", "trajectory_topk", "response_column",
                "latent_attention_layers", "freeze_vision_tower", "learning_rate", "lr_scheduler_type", "max_steps",
                "per_device_train_batch_size", "gradient_accumulation_steps", "seed")
RESUME_MAY_CHANGE = ("max_steps",)  # extending a finished run is a resume too
RUN_FILES = ("trainer_state.json", "model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
             "training_args.bin", RUN_RECORD)


def run_settings(args) -> dict[str, Any]:
    """The settings that make a LaViT run what it is, recorded in output_dir as `lavit_run.json`."""
    return {name: getattr(args, name) for name in RUN_SETTINGS}


def dataset_digest(dataset) -> str | None:
    """A digest of a `datasets.Dataset`'s content (every column's Arrow buffers, images included, and the index
    mapping a `select`, `filter` or `shuffle` leaves), recorded with a run so that a resume on other data is refused;
    None for data it cannot read whole (an `IterableDataset`, a plain list)."""
    import hashlib

    table = getattr(getattr(dataset, "data", None), "table", None)
    if table is None or not hasattr(dataset, "_indices"):
        return None
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(f"{dataset.num_rows}".encode())
    arrays = [(name, table.column(name)) for name in sorted(table.column_names)]
    if dataset._indices is not None:
        arrays.append(("<indices>", dataset._indices.table.column(0)))
    for name, column in arrays:
        hasher.update(name.encode("utf-8"))
        for chunk in column.chunks:
            hasher.update(f"{chunk.offset}:{len(chunk)}".encode())
            for buffer in chunk.buffers():
                if buffer is not None:
                    hasher.update(memoryview(buffer))
    return hasher.hexdigest()


def previous_run_files(folder: Path) -> list[str]:
    """The files and checkpoints of an earlier training run in `folder` (empty when there is none)."""
    if not folder.is_dir():
        return []
    found = sorted(p.name for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir())
    found += [name for name in RUN_FILES if name != RUN_RECORD and (folder / name).exists()]
    # a record alone is a run that stopped before it saved anything: nothing of it would be overwritten
    return found + [RUN_RECORD] if found and (folder / RUN_RECORD).exists() else found


def resolve_resume(value: str | bool | None, output_dir: str) -> str | None:
    """`resume_from_checkpoint` as a path or None: True (or "true", as a command line gives it) means the latest
    checkpoint in `output_dir`; "false" or "" means none; a path must exist."""
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1"):
        value = True
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false", "no", "0")):
        return None
    if value is True:
        latest = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if latest is None:
            raise ValueError(
                f"resume_from_checkpoint=True, but {output_dir} holds no {PREFIX_CHECKPOINT_DIR}-<step> folder to "
                "resume from; train without it (a new run), or pass the checkpoint's path."
            )
        return latest
    if not os.path.isdir(value):
        raise ValueError(f"resume_from_checkpoint={value!r} is not a folder; pass a checkpoint folder or true.")
    return str(value)


def undecoded_images(dataset):
    """`dataset` with its `image` column left as bytes when it is a decoding `datasets.Image` feature: the collator
    decodes each image itself (`decoded_image`), so that one that does not decode is named with its sample."""
    from datasets import Image as ImageFeature

    features = getattr(dataset, "features", None)
    feature = features.get("image") if features else None
    if isinstance(feature, ImageFeature) and feature.decode and hasattr(dataset, "cast_column"):
        return dataset.cast_column("image", ImageFeature(decode=False))
    return dataset


def decoded_image(image, sample: str):
    """A row's image as PIL: decoded here (the trainer leaves LaViT-15K's image column undecoded), so that bytes
    that do not decode are named with their sample."""
    from PIL import Image, UnidentifiedImageError

    try:
        return open_image(image)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"Sample {sample}: its image does not decode ({err}); drop the sample or rebuild it with "
            "examples/build_lavit_dataset.py (which skips such images with their reason)."
        ) from err
    except ValueError as err:
        raise ValueError(f"Sample {sample}: its image holds neither bytes nor a path ({err}).") from err


# ----------------------------------------------------------------------------------------------------------------
# Collator
# ----------------------------------------------------------------------------------------------------------------


class PreprocessingCache:
    """Each sample's processed form, kept in memory the first time a `LavitDataCollator` meets it and reused by every
    later batch that holds it: later epochs, and other collators given the same cache (the seeds of one experiment).

    What is kept is what TRL's collator makes of the sample alone (its rendered, tokenized prompt and completion,
    labels, `mm_token_type_ids`, processed image and grid) and, when distilling, its teacher targets; batches are
    assembled from these by padding only, and equal the uncached batches exactly (tested). A sample is known by its
    content (image bytes or path, question, response, teacher columns) together with the collator's settings and its
    processor's, so two collators of different processors never share an entry. Past `max_gb` of kept tensors, new
    samples are processed each time instead, counted in `over_budget` and logged once.

    A real LaViT-15K image may hold over a thousand visual tokens (a few MB of pixel values each): size `max_gb` to
    the host's memory, remembering that every DDP process keeps its own cache.
    """

    def __init__(self, max_gb: float = 4.0):
        if not max_gb > 0:
            raise ValueError(f"max_gb must be positive, got {max_gb}.")
        self.max_bytes = int(max_gb * 2**30)
        self.entries: dict[bytes, dict[str, torch.Tensor]] = {}
        self.bytes = 0
        self.hits = self.misses = self.over_budget = 0
        self._warned = False

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: bytes) -> dict[str, torch.Tensor] | None:
        item = self.entries.get(key)
        if item is None:
            self.misses += 1
        else:
            self.hits += 1
        return item

    def put(self, key: bytes, item: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in item.values())
        if self.bytes + size > self.max_bytes:
            self.over_budget += 1
            if not self._warned:
                self._warned = True
                logger.warning("The preprocessing cache is full (%d samples, %.2f GB of max_gb=%.2f); further samples "
                               "are processed at every batch. Raise cache_preprocessing_max_gb to keep them all.",
                               len(self.entries), self.bytes / 2**30, self.max_bytes / 2**30)
            return
        self.entries[key] = item
        self.bytes += size

    def stats(self) -> dict[str, int]:
        """`{"samples", "bytes", "hits", "misses", "over_budget"}`."""
        return {"samples": len(self.entries), "bytes": self.bytes, "hits": self.hits, "misses": self.misses,
                "over_budget": self.over_budget}


def _content_digest(hasher, value) -> None:
    """Feeds `value` (bytes, text, a number, an array, an image dict, a PIL image, a list of these) to `hasher`,
    tagged by kind, so that different values never feed the same bytes."""
    from PIL import Image

    if value is None:
        hasher.update(b"N")
    elif isinstance(value, dict):
        hasher.update(b"D")
        for key in sorted(value):
            _content_digest(hasher, key)
            _content_digest(hasher, value[key])
    elif isinstance(value, (bytes, bytearray)):
        hasher.update(b"B%d:" % len(value))
        hasher.update(value)
    elif isinstance(value, str):
        _content_digest(hasher, value.encode("utf-8"))
    elif isinstance(value, Image.Image):
        hasher.update(f"I{value.mode}{value.size}".encode())
        hasher.update(value.tobytes())
    elif isinstance(value, os.PathLike):
        _content_digest(hasher, os.fspath(value))
    else:  # numbers, lists, arrays
        array = np.asarray(value)
        if array.dtype == object:
            hasher.update(b"L%d:" % len(array))
            for element in array:
                _content_digest(hasher, element)
        else:
            hasher.update(f"A{array.dtype.str}{array.shape}".encode())
            hasher.update(np.ascontiguousarray(array).tobytes())


# Per-token batch keys of TRL's vision collator and the value that pads each
_SEQUENCE_PADDING = {"attention_mask": 0, "labels": -100, "mm_token_type_ids": 0, "token_type_ids": 0}


class LavitDataCollator:
    """Turns LaViT-15K rows into a training batch.

    Each row becomes the prompt/completion form of `LavitProcessor.to_prompt_completion` (the latent tokens lead the
    completion when distilling; none for Naive SFT) and goes through TRL's `DataCollatorForVisionLanguageModeling`,
    which keeps `mm_token_type_ids` and labels the completion only. When distilling, the batch also carries
    `teacher_semantics` `(B, D_t)` and `teacher_trajectory` `(B, N)`: each sample's target distribution over its
    student image tokens, right-padded with zeros.

    With a `cache` (`PreprocessingCache`), each sample's processed form is kept the first time it is met (the samples
    a batch misses are processed together, then split); a batch is then those forms padded together, equal to what
    TRL's collator makes of the batch.

    Args:
        processor: the student's `LavitProcessor`.
        distill: whether to add latent tokens and teacher targets.
        concept_target: `"gaze"` or `"mean"` (which V_sem column).
        teacher_hidden_size: the expected width of V_sem (the model's concept head output).
        trajectory_topk: k of the trajectory target.
        response_column: the answer column.
        max_length: truncation length of TRL's collator (None: none).
        cache: a `PreprocessingCache` to keep each sample's processed form in (None: every batch processed anew).
    """

    def __init__(
        self,
        processor: LavitProcessor,
        distill: bool = True,
        concept_target: str = "gaze",
        teacher_hidden_size: int | None = None,
        trajectory_topk: int = 8,
        response_column: str = "answer",
        max_length: int | None = None,
        cache: PreprocessingCache | None = None,
        completion_only_loss: bool = True,
        pad_to_multiple_of: int | None = None,
    ):
        self.processor = processor
        # TRL renders the prompt with the generation prompt: it must not bring the latent tokens itself, or they
        # would land in the (unlabelled) prompt instead of leading the completion. Truncation is done here, after
        # TRL's collation (the same cut), so that a cut through the image or the latent block is named.
        template_processor = copy.copy(processor)
        template_processor.add_latent_tokens = False
        self.vision_collator = DataCollatorForVisionLanguageModeling(
            processor=template_processor, completion_only_loss=completion_only_loss, max_length=None
        )
        self.completion_only_loss = completion_only_loss
        self.pad_to_multiple_of = pad_to_multiple_of
        self.truncated_samples = 0  # samples whose completion max_length cut (counted once each with a cache)
        self.distill = distill
        self.semantics_column = CONCEPT_TARGETS[concept_target]
        self.teacher_hidden_size = teacher_hidden_size
        self.trajectory_topk = trajectory_topk
        self.response_column = response_column
        self.max_length = max_length
        self.cache = cache
        self._settings_digest = self._settings_fingerprint() if cache is not None else b""

    def _settings_fingerprint(self) -> bytes:
        """What a sample's processed form depends on besides the sample: this collator's settings and its
        processor's (template, image processing, vocabulary, latent tokens)."""
        import hashlib

        tokenizer = self.processor.tokenizer
        hasher = hashlib.blake2b(digest_size=16)
        for value in (self.distill, self.semantics_column, self.teacher_hidden_size, self.trajectory_topk,
                      self.response_column, self.max_length, self.completion_only_loss, self.processor.chat_template,
                      self.processor.image_processor.to_json_string(), type(tokenizer).__name__, len(tokenizer),
                      tokenizer.pad_token_id, self.processor.latent_string):
            _content_digest(hasher, str(value))
        return hasher.digest()

    def _sample_key(self, row: dict[str, Any]) -> bytes:
        import hashlib

        hasher = hashlib.blake2b(self._settings_digest, digest_size=20)
        columns = ["image", "question", self.response_column]
        if self.distill:
            columns += ["gaze", "gaze_grid", self.semantics_column]
        for column in columns:
            _content_digest(hasher, row.get(column))
        return hasher.digest()

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self._process(rows) if self.cache is None else self._from_cache(rows)
        if self.pad_to_multiple_of:
            width = batch["input_ids"].shape[1]
            extra = -width % self.pad_to_multiple_of
            if extra:
                padding = {"input_ids": self.processor.tokenizer.pad_token_id, **_SEQUENCE_PADDING}
                for key, value in padding.items():
                    if key in batch:
                        batch[key] = torch.nn.functional.pad(batch[key], (0, extra), value=value)
        return batch

    def _from_cache(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        keys = [self._sample_key(row) for row in rows]
        items = [self.cache.get(key) for key in keys]
        missing = [b for b, item in enumerate(items) if item is None]
        if missing:  # processed together, as TRL would, then kept one by one
            batch = self._process([rows[b] for b in missing], [rows[b].get("id", f"#{b}") for b in missing])
            for b, item in zip(missing, self._split(batch)):
                self.cache.put(keys[b], item)
                items[b] = item
        return self._assemble(items)

    def _truncate(self, batch: dict[str, Any], names: list[str]) -> dict[str, Any]:
        """TRL's `max_length` cut (every sequence key sliced after the left flush), refusing a cut through a sample's
        image or latent block, and counting the samples whose completion it shortens."""
        if self.max_length is None or batch["input_ids"].shape[1] <= self.max_length:
            return batch
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        protected = [self.processor.image_token_id] + (list(self.processor.latent_token_ids) if self.distill else [])
        for b, length in enumerate(lengths):
            if length <= self.max_length:
                continue
            ids = batch["input_ids"][b, :length]
            where = torch.isin(ids, torch.tensor(protected)).nonzero()
            needed = int(where[-1, 0]) + 1 if len(where) else 0
            if needed > self.max_length:
                part = "image and latent block" if self.distill else "image"
                raise ValueError(
                    f"Sample {names[b]}: max_length={self.max_length} cuts through its {part}, which end at token "
                    f"{needed} (the whole sample is {length} tokens). Raise max_length to at least {length} (or "
                    f"{needed} to cut only the answer), or set it to None."
                )
            self.truncated_samples += 1
            if self.truncated_samples == 1:
                logger.warning("max_length=%d cuts the answer of sample %s (%d tokens): its labels lose the end of the "
                               "answer and the end-of-turn token. The trainer reports how many samples were cut.",
                               self.max_length, names[b], length)
        for key in ("input_ids", *_SEQUENCE_PADDING):
            if key in batch:
                batch[key] = batch[key][:, : self.max_length]
        return batch

    def _split(self, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Each sample's part of a processed batch, as TRL's collator makes it of the sample alone: its sequence
        without the right padding, its image's pixel rows and grid, its trajectory target without the zeros that pad
        it to the widest image."""
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        patches = batch["image_grid_thw"].prod(dim=1).tolist()
        starts = np.cumsum([0] + patches).tolist()
        grids = merged_token_grids(batch["image_grid_thw"], self.processor.image_processor.merge_size)
        items = []
        for b, length in enumerate(lengths):
            item = {}
            for key, value in batch.items():
                if key == "input_ids" or key in _SEQUENCE_PADDING:
                    item[key] = value[b : b + 1, :length].clone()
                elif key == "pixel_values":
                    item[key] = value[starts[b] : starts[b + 1]].clone()
                elif key == "teacher_trajectory":
                    item[key] = value[b : b + 1, : grids[b][0] * grids[b][1]].clone()
                else:
                    item[key] = value[b : b + 1].clone()
            items.append(item)
        return items

    def _process(self, rows: list[dict[str, Any]], names: list[str] | None = None) -> dict[str, Any]:
        """TRL's batch of `rows`, plus the teacher targets when distilling; `names` name the samples in errors."""
        names = names or [row.get("id", f"#{b}") for b, row in enumerate(rows)]
        examples = [
            self.processor.to_prompt_completion(
                [decoded_image(row["image"], name)], row["question"], row[self.response_column],
                use_latent_tokens=self.distill,
            )
            for name, row in zip(names, rows)
        ]
        batch = self._truncate(self.vision_collator(examples), names)
        if not self.distill:
            return batch
        grids = merged_token_grids(batch["image_grid_thw"], self.processor.image_processor.merge_size)
        width = max(r * c for r, c in grids)
        trajectory = torch.zeros(len(rows), width)
        semantics = []
        for b, (row, grid, sample) in enumerate(zip(rows, grids, names)):
            gaze = np.asarray(row["gaze"], dtype=np.float32)
            teacher_grid = tuple(int(v) for v in row["gaze_grid"])
            problem = gaze_problem(gaze, teacher_grid)  # datasets scanned up front; streamed rows checked here
            if problem is not None:
                raise ValueError(f"Sample {sample}: {problem}; drop the sample or rebuild it with "
                                 "examples/build_lavit_dataset.py.")
            vector = np.asarray(row[self.semantics_column], dtype=np.float32)
            if not np.isfinite(vector).all():
                raise ValueError(f"Sample {sample}: its {self.semantics_column} holds NaN or inf; drop or rebuild the "
                                 "sample.")
            if self.teacher_hidden_size is not None and vector.size != self.teacher_hidden_size:
                raise ValueError(
                    f"Sample {sample}: V_sem ({self.semantics_column}) has width {vector.size} but the model's concept "
                    f"head outputs teacher_hidden_size={self.teacher_hidden_size}; convert the student with "
                    f"teacher_hidden_size={vector.size} (the teacher's width)."
                )
            target = trajectory_target(gaze, teacher_grid, grid, self.trajectory_topk)
            trajectory[b, : target.numel()] = target
            semantics.append(torch.from_numpy(vector))
        batch["teacher_semantics"] = torch.stack(semantics)
        batch["teacher_trajectory"] = trajectory
        return batch

    def _assemble(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """One batch from single-sample batches, as TRL's collator lays a batch out: every sequence starts at
        position 0 and is right-padded (pad token, attention 0, label -100, token type 0) to the longest; images and
        per-sample rows are concatenated; trajectory targets right-padded with zeros."""
        from transformers import BatchFeature

        width = max(item["input_ids"].shape[1] for item in items)
        padding = {"input_ids": self.processor.tokenizer.pad_token_id, **_SEQUENCE_PADDING}
        batch = {}
        for key in items[0]:
            values = [item[key] for item in items]
            if key in padding:
                batch[key] = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1]), value=padding[key])
                                        for v in values])
            elif key == "teacher_trajectory":
                wide = max(v.shape[1] for v in values)
                batch[key] = torch.cat([torch.nn.functional.pad(v, (0, wide - v.shape[1])) for v in values])
            else:
                batch[key] = torch.cat(values)
        return BatchFeature(batch)


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------

TEACHER_COLUMNS = ("image", "question", "gaze", "gaze_grid")


class LavitSFTTrainer(SFTTrainer):
    """`SFTTrainer` with LaViT's curriculum sensory gating and distillation losses.

    `compute_loss` = L_ntp + concept_loss_coef * L_concept + trajectory_loss_coef * L_traj (equation 9), each term and
    gamma logged in the trainer's metrics. With `distill=False` it trains the Naive-SFT baseline on the same data and
    the same converted student (no latent tokens, no teacher targets, gate open). Takes the same arguments as `SFTTrainer`; `processing_class` must be the student's
    `LavitProcessor` and `train_dataset` a LaViT-15K dataset (`load_lavit_dataset(path, "kept")`).
    """

    _tag_names = ["trl", "sft", "lavit"]

    def __init__(self, model, args: LavitSFTConfig | None = None, train_dataset=None, processing_class=None,
                 data_collator=None, callbacks=None, preprocessing_cache: PreprocessingCache | None = None, **kwargs):
        if args is None:
            args = LavitSFTConfig("lavit-sft")
        if not isinstance(args, LavitSFTConfig):
            raise TypeError(f"args must be a LavitSFTConfig, got {type(args).__name__}.")
        if preprocessing_cache is not None and not args.cache_preprocessing:
            raise ValueError("preprocessing_cache was given but cache_preprocessing is False; set "
                             "cache_preprocessing=True to use it (or leave preprocessing_cache out).")
        if preprocessing_cache is not None and data_collator is not None:
            raise ValueError("preprocessing_cache is used by LaViT's own collator, but a data_collator was given; pass "
                             "the cache to that collator (LavitDataCollator(..., cache=...)) instead.")
        budget = int(args.cache_preprocessing_max_gb * 2**30)
        if preprocessing_cache is not None and preprocessing_cache.max_bytes != budget:
            raise ValueError(
                f"cache_preprocessing_max_gb={args.cache_preprocessing_max_gb} differs from the budget of the "
                f"preprocessing_cache given ({preprocessing_cache.max_bytes / 2**30:g} GB), the one used; make them "
                "equal (or leave preprocessing_cache out)."
            )
        if args.cache_preprocessing and data_collator is not None and getattr(data_collator, "cache", None) is None:
            raise ValueError("cache_preprocessing applies to LaViT's own collator, but a data_collator without a cache "
                             "was given; give that collator a PreprocessingCache (LavitDataCollator(..., cache=...)), "
                             "or leave data_collator out.")
        if args.cache_preprocessing and preprocessing_cache is None and data_collator is None:
            preprocessing_cache = PreprocessingCache(args.cache_preprocessing_max_gb)
        self.preprocessing_cache = preprocessing_cache
        if not callable(getattr(processing_class, "to_prompt_completion", None)):
            raise ValueError(
                "LavitSFTTrainer needs the student's LavitProcessor as processing_class "
                "(AutoProcessor.from_pretrained(student_path, trust_remote_code=True))."
            )
        if isinstance(model, str):
            raise ValueError("Pass a loaded model (e.g. AutoModelForImageTextToText.from_pretrained(path, "
                             "trust_remote_code=True)), not a name.")
        lavit = unwrap_lavit(model)
        if lavit is None:
            raise ValueError(
                f"LavitSFTTrainer trains a LaViT model (convert the student with convert_qwen2_5_vl_to_lavit), got "
                f"{type(model).__name__}. The Naive-SFT baseline trains the same converted student with distill=False; "
                "export_to_qwen2_5_vl turns any of them into a stock checkpoint."
            )
        processing_class.check_model(lavit.config)
        if args.latent_attention_layers is not None:
            layers = parse_latent_layers(args.latent_attention_layers)
            indices = resolve_latent_layers(layers, lavit.config.text_config.num_hidden_layers)  # names the fix
            # "all" or the indices: what every version of the configuration reads (a checkpoint's remote code may
            # predate the relative forms)
            lavit.config.latent_attention_layers = "all" if layers == "all" else indices
        if data_collator is None:  # LaViT's collator decodes the images itself, naming a sample whose bytes fail
            train_dataset = undecoded_images(train_dataset) if train_dataset is not None else None
            eval_dataset = kwargs.get("eval_dataset")
            if isinstance(eval_dataset, dict):
                kwargs["eval_dataset"] = {name: undecoded_images(d) for name, d in eval_dataset.items()}
            elif eval_dataset is not None:
                kwargs["eval_dataset"] = undecoded_images(eval_dataset)
        if train_dataset is not None:
            self._check_columns(train_dataset, args, "train")
        for name, eval_set in _eval_sets_by_name(kwargs.get("eval_dataset")):
            self._check_columns(eval_set, args, name)
        self._check_trl_settings(lavit, args)
        chat_template_path = args.chat_template_path
        if chat_template_path is not None:  # the template the collator renders is the one save_model writes
            with open(chat_template_path, encoding="utf-8") as file:
                template = set_default_system_prompt(file.read(), processing_class.system_prompt)
            template = add_latent_tokens_to_chat_template(template, processing_class.latent_string)
            processing_class.chat_template = processing_class.tokenizer.chat_template = template
        if args.freeze_vision_tower:
            lavit.model.visual.requires_grad_(False)
        if data_collator is None:
            data_collator = LavitDataCollator(
                processing_class,
                distill=args.distill,
                concept_target=args.concept_target,
                teacher_hidden_size=lavit.config.teacher_hidden_size,
                trajectory_topk=args.trajectory_topk,
                response_column=args.response_column,
                max_length=args.max_length,
                cache=preprocessing_cache,
                completion_only_loss=args.completion_only_loss is not False,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        callbacks = list(callbacks or [])
        if args.distill and not any(isinstance(c, SensoryGateCallback) for c in callbacks):
            callbacks.append(SensoryGateCallback(args.gate_warmup_steps, args.gate_epsilon, args.gate_schedule))
        args.chat_template_path = None  # applied above (TRL would put the file in without the latent tokens)
        try:
            super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                             data_collator=data_collator, callbacks=callbacks, **kwargs)
        finally:
            args.chat_template_path = chat_template_path
        if not (args.distill and args.concept_loss_coef > 0):
            # No loss reaches the concept head here (Naive SFT, "w/o semantic reconstruction"): a trainable parameter
            # without a gradient stops DDP at the second step when it does not look for unused parameters (the
            # Trainer's choice under activation checkpointing), so the head is frozen, after PEFT has wrapped the
            # model (its modules_to_save copy included). This changes the model passed in: a later distilling
            # trainer on the same object must unfreeze it. The head is saved unchanged.
            unwrap_lavit(self.model).concept_head.requires_grad_(False)
        if self.args.cuts_trajectory_gradients():
            raise ValueError(
                "This configuration forces reentrant gradient checkpointing (TRL does so for PEFT with DeepSpeed "
                "ZeRO-3), which cuts the gradients of L_traj. Use ZeRO-2, full fine-tuning under ZeRO-3, or "
                "gradient_checkpointing=False."
            )
        # compute_loss normalises the next-token loss by the Trainer's token count itself
        self.model_accepts_loss_kwargs = True

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, after the checks a multi-process or resumed run needs before its first step:
        `resume_from_checkpoint` may be True or "true" (the latest checkpoint in output_dir, as in transformers); an
        output_dir holding another run is refused unless resuming or `overwrite_output_dir`, and a resume with other
        LaViT settings than the run it continues is refused."""
        resume = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        self._check_output_dir(resume)
        self._check_ddp_settings()
        output = super().train(resume, *args, **kwargs)
        truncated = getattr(self.data_collator, "truncated_samples", 0)
        if truncated:
            logger.warning("max_length=%s cut the answers of %d samples (their labels lack the end of the answer and "
                           "the end-of-turn token); raise max_length to keep them whole.", self.args.max_length,
                           truncated)
        cache = getattr(self.data_collator, "cache", None)
        if cache is not None:
            stats = cache.stats()
            logger.info("Preprocessing cache: %d samples kept (%.1f MB), %d batch rows served from it, %d processed, "
                        "%d past the budget.", stats["samples"], stats["bytes"] / 2**20, stats["hits"], stats["misses"],
                        stats["over_budget"])
        return output

    def _check_output_dir(self, resume: str | None) -> None:
        """Decided on the main process and shared with every rank (ranks that see different file systems must not
        disagree and leave some waiting); raises the same error everywhere."""
        problem = self._output_dir_problem(resume) if self.is_world_process_zero() else None
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            problem = broadcast_object_list([problem])[0]
        if problem is not None:
            raise ValueError(problem)
        folder = Path(self.args.output_dir)
        if resume is None and self.is_world_process_zero():
            for checkpoint in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):  # only with overwrite_output_dir
                logger.warning("overwrite_output_dir: removing the earlier run's %s", checkpoint)
                shutil.rmtree(checkpoint)
        if self.is_world_process_zero():
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic({**run_settings(self.args), "train_data": self._train_data_digest()}, folder / RUN_RECORD)
        self.accelerator.wait_for_everyone()

    def _train_data_digest(self) -> str | None:
        if not hasattr(self, "_data_digest"):
            self._data_digest = dataset_digest(self.train_dataset)
        return self._data_digest

    def _output_dir_problem(self, resume: str | None) -> str | None:
        folder = Path(self.args.output_dir)
        source = getattr(unwrap_lavit(self.model).config, "_name_or_path", None) or ""
        if source and os.path.isdir(source) and Path(source).resolve() == folder.resolve():
            return (f"output_dir {folder} is the folder the model was loaded from: training there would overwrite the "
                    "student in place (and overwrite_output_dir would delete its files). Choose another output_dir.")
        if resume is not None:
            # the record of the run the checkpoint belongs to: next to it, else in this output_dir
            records = [Path(resume).parent / RUN_RECORD, folder / RUN_RECORD]
            record = next((r for r in records if r.is_file()), None)
            if record is None:
                return None
            before, now = json.loads(record.read_text(encoding="utf-8")), run_settings(self.args)
            data_then, data_now = before.pop("train_data", None), self._train_data_digest()
            if data_then is not None and data_now is not None and data_then != data_now:
                return (f"Resuming {resume} on other training data than its run had (content digest {data_then} "
                        f"then, {data_now} now): the result would be trained on neither dataset. Resume with the "
                        "run's own dataset, or start a new output_dir.")
            changed = changed_settings(before, now, ignore=RESUME_MAY_CHANGE)
            if changed:
                return (f"Resuming {resume} with other settings than its run had (they differ in {changed}): the "
                        "result would be neither run. Resume with the same settings, or start a new output_dir.")
            return None
        found = previous_run_files(folder)
        if found and not self.args.overwrite_output_dir:
            return (f"{folder} holds another run ({', '.join(found[:4])}{' ...' if len(found) > 4 else ''}); training "
                    "into it would overwrite part of that run and leave the rest beside this one. Pass "
                    "resume_from_checkpoint=True (--resume_from_checkpoint true) to continue it, overwrite_output_dir="
                    "True to replace it, or choose a new output_dir.")
        return None

    def _check_ddp_settings(self) -> None:
        """Before the first step: the DDP settings that would stop a multi-process run at its first or second
        backward, named with their fix. (DeepSpeed and FSDP do not look for unused parameters.)"""
        if self.accelerator.num_processes < 2 or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return
        handler = getattr(self.accelerator, "ddp_handler", None)
        find_unused = bool(handler is not None and handler.find_unused_parameters)
        if find_unused and self.args.reentrant_checkpointing():
            raise ValueError(
                "ddp_find_unused_parameters=True with reentrant activation checkpointing stops DDP at the first "
                "backward ('Expected to mark a variable ready only once'). Use activation_checkpointing_kwargs="
                "{'use_reentrant': False} (the default here) or leave ddp_find_unused_parameters unset."
            )
        if not find_unused and not (self.args.distill and self.args.concept_loss_coef > 0):
            head = unwrap_lavit(self.model).concept_head
            trainable = [name for name, p in head.named_parameters() if p.requires_grad]
            if trainable:
                raise ValueError(
                    f"The concept head's parameters {trainable} are trainable, but no loss reaches them here "
                    f"(distill={self.args.distill}, concept_loss_coef={self.args.concept_loss_coef}) and DDP runs "
                    "without find_unused_parameters (the Trainer's choice under activation checkpointing): it would "
                    "stop at the second step. Keep the head frozen (this trainer froze it when it was built) or set "
                    "ddp_find_unused_parameters=True."
                )

    @staticmethod
    def _check_trl_settings(lavit, args: LavitSFTConfig) -> None:
        """SFTConfig/TrainingArguments fields LaViT cannot honour, refused before anything runs, naming the field."""
        attention = lavit.config.text_config._attn_implementation
        if attention != LAVIT_ATTENTION:
            raise ValueError(
                f"The model runs the text attention {attention!r}, but LaViT's gate and latent attention live in "
                f"{LAVIT_ATTENTION!r}: load the model without attn_implementation (LaViT's default), or call "
                "modeling_lavit.enable_lavit_attention(model) before training."
            )
        if args.train_sampling_strategy in ("group_by_length", "batch_rebalance"):
            raise ValueError(
                f"train_sampling_strategy={args.train_sampling_strategy!r} reads each sample's token length, which "
                "LaViT-15K rows do not hold (their images are tokenized by the collator); use 'random' or "
                "'sequential'."
            )
        path = args.chat_template_path
        if path is not None and not (os.path.isfile(path) and path.endswith((".jinja", ".j2"))):
            raise ValueError(
                f"chat_template_path={path!r}: LaViT takes a chat template as a .jinja (or .j2) file; cloning one from "
                "another tokenizer would change the vocabulary that holds the latent tokens."
            )
        if args.pad_to_multiple_of is not None and args.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive number of tokens, got {args.pad_to_multiple_of}.")

    @staticmethod
    def _check_columns(dataset, args: LavitSFTConfig, name: str) -> None:
        columns = set(getattr(dataset, "column_names", None) or next(iter(dataset)).keys())
        needed = {"image", "question", args.response_column}
        if args.distill:
            needed |= {"gaze", "gaze_grid", CONCEPT_TARGETS[args.concept_target]}
        missing = sorted(needed - columns)
        if missing:
            what = "teacher columns " if args.distill and set(missing) - {"image", "question", args.response_column} else "columns "
            raise ValueError(
                f"The {name} dataset lacks the {what}{missing} that {'distillation' if args.distill else 'SFT'} "
                f"needs (it has {sorted(columns)}). Build LaViT-15K with examples/build_lavit_dataset.py, or set "
                "distill=False for Naive SFT."
            )
        if args.distill and hasattr(dataset, "select_columns") and hasattr(dataset, "with_format") and not hasattr(
                dataset, "n_shards"):  # a map-style datasets.Dataset (streamed rows are checked by the collator)
            wanted = ["gaze", "gaze_grid"] + (["id"] if "id" in columns else [])
            # the dataset's own rows (after any filter, shuffle or split), as one arrow table
            check_gaze_columns(dataset.select_columns(wanted).with_format("arrow")[:], name)

    def _metric(self, mode: str, name: str, value: torch.Tensor | float) -> None:
        if torch.is_tensor(value):
            value = self.accelerator.gather_for_metrics(value.detach().float().reshape(1)).mean().item()
        self._metrics[mode][name].append(float(value))

    def _needs_logits(self) -> bool:
        """Whether the next-token loss needs the full logits, as in TRL: a `compute_loss_func`, or label smoothing
        with the "nll" loss (TRL applies no smoothing to "dft")."""
        return self.compute_loss_func is not None or (self.label_smoother is not None and self.args.loss_type == "nll")

    def next_token_loss(self, outputs, inputs, num_items_in_batch, mode: str) -> tuple[torch.Tensor, int]:
        """`(L_ntp as the backward needs it, the accumulation steps that per-batch means added to it must be divided
        by)`, computed as `SFTTrainer.compute_loss` computes its loss (`loss_type` "nll" or "dft", label smoothing,
        `compute_loss_func`); logs `ntp_loss` (the mean over this batch's labelled tokens) and TRL's `entropy`,
        `mean_token_accuracy` and `num_tokens`.

        The Trainer skips its division by the accumulation steps when the loss is normalised by the token count of the
        whole accumulated batch (`num_items_in_batch`); per-batch means must then be divided by the caller."""
        labels = inputs["labels"]
        if self.compute_loss_func is not None:
            ntp = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        elif self._needs_logits():
            ntp = self.label_smoother(outputs, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)
        else:
            ntp = outputs.loss  # the model's labelled-token loss of loss_type, over num_items_in_batch
        if outputs.label_count is None:  # the forward built the logits: the statistics from them
            logits, targets = labelled_logits(outputs.logits, labels)
            count = targets.new_tensor(targets.numel())
            entropy, top1 = token_statistics(logits, targets)
        else:
            count, entropy, top1 = outputs.label_count, outputs.label_entropy_sum, outputs.label_top1_count
        steps, ntp_value = 1, ntp
        if num_items_in_batch is not None:
            steps = self.current_gradient_accumulation_steps
            if self.args.average_tokens_across_devices:
                ntp = ntp * self.accelerator.num_processes  # DDP averages gradients; the count spans every rank
            counted = (labels[:, 1:] != -100).sum().clamp_min(1)
            ntp_value = ntp_value * num_items_in_batch / counted  # comparable across settings
        self._metric(mode, "ntp_loss", ntp_value)
        valid = self.accelerator.gather_for_metrics(count.detach().reshape(1)).sum()
        entropy = self.accelerator.gather_for_metrics(entropy.detach().float().reshape(1)).sum()
        top1 = self.accelerator.gather_for_metrics(top1.detach().reshape(1)).sum()
        self._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((top1 / valid).item() if valid > 0 else 0.0)
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum().reshape(1)).sum().item()
            self._total_train_tokens += tokens
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return ntp, steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        semantics = inputs.pop("teacher_semantics", None)
        trajectory = inputs.pop("teacher_trajectory", None)
        args = self.args
        want_trajectory = args.distill and args.trajectory_loss_coef > 0
        want_concept = args.distill and args.concept_loss_coef > 0
        with_logits = self._needs_logits() or return_outputs
        outputs = model(
            **inputs,
            use_cache=False,
            return_logits=with_logits,
            token_loss_type="nll" if with_logits else args.loss_type,
            num_items_in_batch=num_items_in_batch,
            output_latent_states=args.distill,
            output_latent_attention=want_trajectory,
        )
        if with_logits and not self._needs_logits() and args.loss_type != "nll":
            # evaluation with logits for compute_metrics: the loss of loss_type from those logits, as TRL computes it
            outputs.loss = dft_loss(outputs.logits, inputs["labels"], num_items_in_batch)
        loss, steps = self.next_token_loss(outputs, inputs, num_items_in_batch, mode)
        if want_concept:
            concept = concept_loss(outputs.concept_embeds, semantics.to(outputs.concept_embeds.device))
            loss = loss + args.concept_loss_coef * concept / steps
            self._metric(mode, "concept_loss", concept)
        if want_trajectory:
            student = outputs.latent_image_attention  # (B, K, N)
            if args.trajectory_target_tokens == "last_latent":
                student = student[:, -1:]
            traj = trajectory_loss(trajectory.to(student.device), student, outputs.image_token_mask)
            loss = loss + args.trajectory_loss_coef * traj / steps
            self._metric(mode, "trajectory_loss", traj)
        if args.distill:
            self._metric(mode, "sensory_gate", outputs.sensory_gate)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The evaluation step: the loss, and with `prediction_loss_only=False` the logits and labels that
        `compute_metrics` receives (the teacher targets stay out of them)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only:
                return self.compute_loss(model, inputs), None, None
            labels = inputs.get("labels")
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), outputs.logits, labels


def labelled_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(n, vocab)` float logits of the positions whose next token is labelled, and those `(n,)` labels."""
    targets = labels[:, 1:].to(logits.device)
    keep = targets != -100
    return logits[:, :-1][keep].float(), targets[keep]


def dft_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """TRL's "dft" loss from full logits (`modeling_lavit.summed_token_loss`) over `num_items_in_batch` (default:
    the labelled tokens)."""
    kept, targets = labelled_logits(logits, labels)
    divisor = num_items_in_batch if num_items_in_batch is not None else max(1, targets.numel())
    return summed_token_loss(kept, targets, "dft") / divisor


def _eval_sets_by_name(eval_dataset) -> list[tuple[str, Any]]:
    """`(name, dataset)` for each evaluation set (one unnamed set is \"eval\")."""
    if eval_dataset is None:
        return []
    if isinstance(eval_dataset, dict):
        return list(eval_dataset.items())
    return [("eval", eval_dataset)]


# ----------------------------------------------------------------------------------------------------------------
# PEFT
# ----------------------------------------------------------------------------------------------------------------

LANGUAGE_LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def lavit_lora_config(model, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05, **kwargs):
    """A PEFT `LoraConfig` for LaViT: LoRA on the language model's attention and MLP projections (the regex leaves
    the vision tower alone, whose MLP uses the same names), the latent tokens' embedding rows trainable, and the
    concept head trained in full and saved with the adapter."""
    from peft import LoraConfig

    lavit = unwrap_lavit(model)
    if lavit is None:
        raise ValueError("lavit_lora_config needs a LaViT model.")
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=LANGUAGE_LORA_TARGETS,
        trainable_token_indices={"embed_tokens": list(lavit.config.latent_token_ids)},
        modules_to_save=["concept_head"],
        **kwargs,
    )


__all__ = [
    "sensory_gate",
    "SensoryGateCallback",
    "is_lavit_model",
    "unwrap_lavit",
    "resize_gaze",
    "sparsify_gaze",
    "trajectory_target",
    "LavitSFTConfig",
    "LavitDataCollator",
    "PreprocessingCache",
    "LavitSFTTrainer",
    "lavit_lora_config",
    "concept_loss",
    "trajectory_loss",
]
