# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""LaViT end to end on a CPU: a synthetic grounding task where looking at the right place decides the answer, a tiny
teacher trained on it (with a grounding loss standing in for a large pretrained teacher's grounding, see
`GroundedSFTTrainer`), its signals extracted and filtered by the real builder, a student base pre-trained to see sizes
(but not to find the named object), Naive-SFT and LaViT students trained from it on the same limited data over several
seeds, every model evaluated by the harness (latent modes included), the attention analysis, and an honest report.

Every stage runs through the project's own code (the Visual-CoT reader, `convert_qwen2_5_vl_to_lavit`, the LaViT-15K
builder, `LavitSFTTrainer`, the evaluation harness, the analysis) and keeps its artefacts under --output-dir; a
finished stage is not run again. Tested with (2 CPU cores):

    python examples/quickstart.py --output-dir quickstart_output     # the default run (make demo), ~16 minutes
    python examples/quickstart.py --output-dir quickstart_output --ablations   # adds Table 3's rows, ~6 minutes more
    python examples/quickstart.py --output-dir quickstart-smoke --smoke   # every stage at toy size, under a minute
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

import synthetic_lavit as task
from cli_lavit import changed_settings, output_folder
from configuration_lavit import parse_latent_layers, resolve_latent_layers
from data_lavit import box_to_token_mask, merged_token_grids, write_json_atomic
from evaluation_lavit import LATENT_MODES
from modeling_lavit import LavitAttentionControl, image_attention_capture, trajectory_loss
from trainer_lavit import LavitDataCollator, LavitSFTTrainer, unwrap_lavit


log = logging.getLogger("quickstart")


# ----------------------------------------------------------------------------------------------------------------
# The teacher's grounding loss
# ----------------------------------------------------------------------------------------------------------------
#
# Supervised fine-tuning plus a pull of the attention of the word that names the key object towards that object's
# cell. Why the quickstart's teacher needs it: the real teacher is a large pretrained model that already looks at the
# object a question names. A tiny model trained from scratch on the synthetic size question learns the perception part
# fast (one object per image: 100% on validation within 500 steps, measured) but not the look-up: finding the object
# whose colour the question names takes a two-step circuit (carry the colour word to the answer, then match it against
# the image tokens), and from random weights it stays near 50% for thousands of steps (measured: 47.5% after 2,500
# steps with the earlier 6-pixel tiny class, 51-53% after 1,500 steps with the current sizes; a wider or deeper text
# model, higher learning rates, fewer colours or mixed object counts did not change that). Adding the term below, the
# KL divergence from the key object's cells to the first text layer's attention of the colour word over the image
# tokens (the students' trajectory loss with the box as its target), makes the look-up one step and the teacher
# accurate in about a thousand steps. It stands in for pretraining; the students never see the boxes, only what the
# trained teacher's attention shows the builder.
#
# Tested by tests/test_quickstart.py (the target cells and query row against the boxes and the token ids; the loss
# against the same attention computed by eager attention).

REFERRING = re.compile(r"\bthe (\w+) object\b")  # the synthetic questions name the key object by its colour


def referring_word(question: str) -> str:
    match = REFERRING.search(question)
    if match is None:
        raise ValueError(
            f"The question {question!r} names no object as 'the <colour> object'; the grounding loss needs the "
            "synthetic task's questions (or set --teacher-grounding-weight 0)."
        )
    return match.group(1)


class GroundingCollator:
    """The Naive-SFT batch of `LavitDataCollator(distill=False)`, plus `grounding_query` `(B, 1)`: the position of the
    question's colour word, and `grounding_target` `(B, N)`: a distribution over each sample's merged image tokens,
    uniform over the cells the key object's box covers (`box_to_token_mask`), right-padded with zeros. Rows need an
    `image`, `question`, `answer` and `box` (pixels of the original image)."""

    def __init__(self, processor, max_length: int | None = None, response_column: str = "answer"):
        self.inner = LavitDataCollator(processor, distill=False, max_length=max_length, response_column=response_column)
        self.tokenizer = processor.tokenizer
        self.merge_size = processor.image_processor.merge_size

    def word_id(self, word: str) -> int:
        ids = self.tokenizer(" " + word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(
                f"The colour word {word!r} is {len(ids)} tokens for this tokenizer; the grounding loss needs it to be "
                "one (train the tokenizer on the task's questions)."
            )
        return ids[0]

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.inner(rows)
        grids = merged_token_grids(batch["image_grid_thw"], self.merge_size)
        query = torch.zeros(len(rows), 1, dtype=torch.long)
        target = torch.zeros(len(rows), max(r * c for r, c in grids))
        for b, (row, grid) in enumerate(zip(rows, grids)):
            word = referring_word(row["question"])
            hits = (batch["input_ids"][b] == self.word_id(word)).nonzero()
            if len(hits) != 1:
                raise ValueError(f"The colour word {word!r} occurs {len(hits)} times in sample {b}'s tokens, not once.")
            query[b, 0] = hits[0, 0]
            mask = torch.from_numpy(box_to_token_mask(row["box"], row["image"].size, grid).reshape(-1))
            target[b, : mask.numel()] = mask.float() / mask.sum()
        batch["grounding_query"] = query
        batch["grounding_target"] = target
        return batch


class GroundedSFTTrainer(LavitSFTTrainer):
    """Naive SFT (`distill=False`) with the grounding term: loss = L_ntp + weight * KL(target || attention), the
    attention being text layer `layer`'s (head-averaged, renormalised over the image tokens) at the colour word."""

    def __init__(self, model, args=None, train_dataset=None, processing_class=None, data_collator=None,
                 callbacks=None, grounding_weight: float = 1.0, grounding_layer: int = 0, **kwargs):
        if args is not None and getattr(args, "distill", False):
            raise ValueError("The grounding loss trains a teacher with plain SFT; set distill=False.")
        if data_collator is None and processing_class is not None:
            data_collator = GroundingCollator(processing_class, max_length=getattr(args, "max_length", None),
                                              response_column=getattr(args, "response_column", "answer"))
        super().__init__(model, args, train_dataset, processing_class, data_collator, callbacks, **kwargs)
        self.grounding_weight = grounding_weight
        self.grounding_layer = grounding_layer

    def grounding_attention(self, model, inputs, num_items_in_batch=None):
        """The forward pass: `(outputs, attention (B, N) renormalised over the image tokens, image-token mask)`."""
        query = inputs.pop("grounding_query")
        capture = image_attention_capture(inputs["input_ids"], self.model.config.image_token_id, query,
                                          layers=[self.grounding_layer], reduce_queries=True)
        outputs = model(**inputs, use_cache=False, return_logits=False, num_items_in_batch=num_items_in_batch,
                        lavit_control=LavitAttentionControl(capture=capture))
        if self.grounding_layer not in capture.per_layer:
            raise RuntimeError("No attention was recorded: the text attention is not 'lavit_sdpa'.")
        attention = capture.per_layer[self.grounding_layer]  # (B, N)
        attention = attention / attention.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return outputs, attention, capture.key_mask

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        target = inputs.pop("grounding_target")  # (B, N): the collator pads as the capture does
        outputs, attention, mask = self.grounding_attention(model, inputs, num_items_in_batch)
        target = target.to(attention.device)
        grounding = trajectory_loss(target, attention[:, None, :], mask)
        ntp, steps = self.next_token_loss(outputs, inputs, num_items_in_batch, mode)
        loss = ntp + self.grounding_weight * grounding / steps  # the grounding term is a mean over this batch
        self._metric(mode, "grounding_loss", grounding)
        self._metric(mode, "grounding_focus", (attention * (target > 0)).sum(-1).mean())
        return (loss, outputs) if return_outputs else loss


# ----------------------------------------------------------------------------------------------------------------
# Progress on the console, numbers in the run's log
# ----------------------------------------------------------------------------------------------------------------

train_log = logging.getLogger("quickstart.train")  # every Trainer log dict, to <output>/run.log only


def progress_bar(total: int, description: str, unit: str):
    """A tqdm bar (count, rate and ETA) on stderr; redrawn every second on a terminal, every 30 s in a log."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, leave=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


class TrainingProgress(TrainerCallback):
    """One bar per training (steps, rate, ETA, the latest loss beside it) in place of the log dicts the Trainer
    prints; the dicts go to the run's log file, tagged with the training's name."""

    def __init__(self, description: str, validation: "ValidationCurve | None" = None):
        self.description, self.validation = description, validation
        self.bar = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = progress_bar(state.max_steps, self.description, "step")
        self.bar.update(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.validation is not None and self.validation.curve:
            self.postfix["val"] = f"{self.validation.curve[-1]['val_accuracy']:.1f}%"
            self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {k: v for k, v in (logs or {}).items() if k != "total_flos"}
        train_log.debug("%s step %d: %s", self.description, state.global_step, json.dumps(logs))
        if "loss" in logs and self.bar is not None:
            self.postfix["loss"] = f"{logs['loss']:.3f}"
            self.bar.set_postfix(self.postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


def show_progress(trainer, description: str, validation: "ValidationCurve | None" = None) -> None:
    """Swaps the Trainer's printer for a `TrainingProgress` bar (added last, so it shows this step's validation)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(TrainingProgress(description, validation))


class ValidationCurve(TrainerCallback):
    """Accuracy on the validation split every `every` steps and at the last step, with the sensory gate open as at
    inference (and put back after); optionally stops the training once `target` (%) is reached. `curve` holds
    `{"step", "val_accuracy"}` rows."""

    def __init__(self, every: int, evaluate, target: float | None = None, name: str = "model"):
        self.every, self.evaluate, self.target, self.name = every, evaluate, target, name
        self.curve: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        lavit = unwrap_lavit(model)
        gate = lavit.sensory_gate.item()
        lavit.set_sensory_gate(1.0)
        lavit.eval()
        accuracy = self.evaluate(lavit)
        lavit.train()
        lavit.set_sensory_gate(gate)
        self.curve.append({"step": state.global_step, "val_accuracy": accuracy})
        train_log.debug("%s step %d: validation accuracy %.1f%%", self.name, state.global_step, accuracy)
        if self.target is not None and accuracy >= self.target:
            log.info("  %s: %.1f%% on validation at step %d, target reached", self.name, accuracy, state.global_step)
            control.should_training_stop = True


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


# The students' learning rates, chosen on validation (benchmarks/RESULTS.md, the students' validation sweep)
DEFAULT_LR = {"student_lr": 1e-3, "naive_lr": 5e-4}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=output_folder, default="quickstart",
                        help="where every stage's artefacts go")
    parser.add_argument("--smoke", action="store_true", help="every stage at toy size (a CI check, not a result)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3, help="student seeds per method")
    parser.add_argument("--teacher-pool", type=int, default=20000, help="generated samples the teacher trains on")
    parser.add_argument("--distill-samples", type=int, default=2000, help="samples the teacher's signals are built on")
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--teacher-steps", type=int, default=2500, help="at most this many teacher steps")
    parser.add_argument("--teacher-target", type=float, default=0.90, help="stop the teacher at this val accuracy")
    parser.add_argument("--teacher-eval-every", type=int, default=250,
                        help="the teacher's validation accuracy every this many steps (it stops at the target)")
    parser.add_argument("--student-steps", type=int, default=750,
                        help="steps of each student (chosen on validation: see benchmarks/RESULTS.md)")
    parser.add_argument("--student-eval-every", type=int, default=250,
                        help="the students' validation accuracy every this many steps (the report's learning curves)")
    parser.add_argument("--latent-attention-layers", default="all",
                        help="the student layers whose latent-token attention L_traj reads: all (the paper), "
                             "last_half, last, last_<n> or comma-separated indices (see LavitConfig)")
    parser.add_argument("--gate-warmup-fraction", type=float, default=0.4,
                        help="T_w as a share of the student steps (the paper: 400 of 1000)")
    parser.add_argument("--batch-size", type=int, default=32, help="the teacher's batch")
    parser.add_argument("--student-batch-size", type=int, default=16,
                        help="the students' batch (their data are the few hundred samples the filter kept)")
    parser.add_argument("--teacher-lr", type=float, default=1e-3)
    parser.add_argument("--teacher-grounding-weight", type=float, default=1.0,
                        help="weight of the teacher's grounding loss (GroundedSFTTrainer below); 0: plain SFT")
    parser.add_argument("--student-lr", type=float, default=DEFAULT_LR["student_lr"],
                        help="learning rate of LaViT (and its ablations) and of the student base's pre-training")
    parser.add_argument("--naive-lr", type=float, default=DEFAULT_LR["naive_lr"],
                        help="learning rate of Naive SFT, chosen on validation like LaViT's (at 1e-3 one of three "
                             "Naive-SFT seeds collapsed to a single answer; see benchmarks/RESULTS.md)")
    parser.add_argument("--student-pretrain-steps", type=int, default=400,
                        help="steps of pre-training the student base on scenes whose objects all have the asked size "
                             "(perception without the look-up; the paper's students are pretrained too); 0: none")
    parser.add_argument("--student-pretrain-pool", type=int, default=6400, help="samples of that pre-training task")
    parser.add_argument("--text-hidden", type=int, default=64)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--vision-hidden", type=int, default=64)
    parser.add_argument("--teacher-text-hidden", type=int, default=None, help="default: --text-hidden")
    parser.add_argument("--teacher-text-layers", type=int, default=None, help="default: --text-layers")
    parser.add_argument("--ablations", action="store_true", help="also train the Table 3 ablations (one seed each)")
    parser.add_argument("--analysis-samples", type=int, default=100, help="test questions the attention analysis reads")
    parser.add_argument("--filter-stages", nargs="*", default=["correctness", "difficulty", "alignment"],
                        help="the builder's filter stages (none: keep every sample the teacher processed)")
    parser.add_argument("--focus-threshold", type=float, default=0.15, help="the alignment stage's S_focus threshold")
    parser.add_argument("--query-rows", default="prompt_and_response", choices=("response", "prompt_and_response"),
                        help="the text rows whose attention makes the teacher's gaze (this tiny teacher grounds at the "
                             "question's colour word, so its answer rows alone look almost uniform)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.teacher_pool, args.distill_samples, args.val, args.test = 2, 64, 24, 8, 8
        args.teacher_steps, args.teacher_eval_every, args.student_steps, args.batch_size = 4, 2, 3, 4
        args.student_eval_every = 2
        args.student_batch_size = 4
        args.student_pretrain_steps, args.student_pretrain_pool = 3, 16
        args.analysis_samples, args.text_hidden, args.vision_hidden = 4, 32, 32
        args.filter_stages = []  # a 4-step teacher answers nothing right; the filter would keep nothing
    args.teacher_text_hidden = args.teacher_text_hidden or args.text_hidden
    try:
        resolve_latent_layers(parse_latent_layers(args.latent_attention_layers), args.text_layers)
    except ValueError as err:
        parser.error(f"--latent-attention-layers: {err}")
    for name in ("student_lr", "naive_lr", "teacher_lr"):
        if not 0 < getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must lie in (0, 1), got {getattr(args, name)}.")
    if not 0 <= args.gate_warmup_fraction <= 1:
        parser.error(f"--gate-warmup-fraction must lie in [0, 1], got {args.gate_warmup_fraction}.")
    for name in ("seeds", "student_steps", "student_eval_every", "teacher_steps", "teacher_eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    args.teacher_text_layers = args.teacher_text_layers or args.text_layers
    return args


# ----------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------


class Stages:
    """Runs each stage once: its result is stored in `<output>/stages/<name>.json` and read back on a rerun."""

    def __init__(self, root: Path):
        self.root = root

    def run(self, name: str, function, *args, **kwargs) -> dict:
        marker = self.root / "stages" / f"{name}.json"
        if marker.exists():
            result = json.loads(marker.read_text())
            log.info("[%s] done before, resumed (%.1f s then)", name, result.get("_seconds", 0.0))
            return result
        log.info("[%s] ...", name)
        start = time.time()
        result = function(*args, **kwargs)
        result["_seconds"] = time.time() - start
        write_json_atomic(result, marker)
        log.info("[%s] %.1f s", name, result["_seconds"])
        return result


def check_settings(root: Path, args) -> None:
    """A rerun resumes only a run of the same settings: a folder made with others is refused, naming them."""
    # --ablations only adds a stage, so a finished run takes it without retraining anything
    settings = {k: v for k, v in vars(args).items() if k not in ("output_dir", "ablations")}
    path = root / "settings.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = changed_settings(before, settings)
        if changed:
            differences = ", ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
            raise SystemExit(
                f"{root} holds a run made with other settings ({differences}); its finished stages would not match. "
                "Use another --output-dir, or delete this one to start over."
            )
        return
    write_json_atomic(settings, path)


def stage_task(args, root: Path) -> dict:
    """The synthetic task: a large pool for the teacher, a limited set to distil on, validation and test splits (the
    latter two also in MMVP's format), from separate seeds, with no scene shared between splits."""
    folder = root / "task"
    seen: set = set()
    paths = {}
    splits = [("teacher_pool", args.teacher_pool), ("distill", args.distill_samples), ("val", args.val),
              ("test", args.test)]
    if args.student_pretrain_steps > 0:
        splits.append(("student_pretrain", args.student_pretrain_pool))
    for offset, (split, n) in enumerate(splits):
        samples = task.generate_split(n, args.seed + offset, exclude=seen, same_size=split == "student_pretrain")
        seen |= {s["key"] for s in samples}
        paths[split] = task.write_visual_cot(samples, str(folder), split)
        if split in ("val", "test"):
            paths[f"{split}_mmvp"] = task.write_mmvp(samples, str(folder / f"{split}_mmvp"))
    paths["images"] = str(folder / "images")
    return paths


def stage_models(args, root: Path, paths: dict) -> dict:
    """A tokenizer trained here on the task's text, then a tiny teacher and a tiny student base (stock Qwen2.5-VL)."""
    from data_lavit import read_visual_cot
    from processing_lavit import LAVIT_SYSTEM_PROMPT
    from testing_lavit import build_tiny_qwen2_5_vl, tiny_corpus, train_tiny_tokenizer

    samples, _ = read_visual_cot(paths["teacher_pool"])
    corpus = [LAVIT_SYSTEM_PROMPT] * 20 + [s.question for s in samples[:2000]] + tiny_corpus(300, seed=args.seed)
    tokenizer = train_tiny_tokenizer(vocab_size=600, corpus=corpus)
    out = {}
    for name, hidden, layers, seed in (("teacher_base", args.teacher_text_hidden, args.teacher_text_layers, 1),
                                       ("student_base", args.text_hidden, args.text_layers, 2)):
        model, _, image_processor = build_tiny_qwen2_5_vl(
            seed=args.seed * 100 + seed, tokenizer=tokenizer, text_hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden,
            vision_hidden_size=args.vision_hidden, vision_depth=2, vision_heads=4)
        path = root / "models" / name
        for part in (model, tokenizer, image_processor):
            part.save_pretrained(path)
        out[name] = str(path)
        out[f"{name}_parameters"] = sum(p.numel() for p in model.parameters())
    return out


def sft_dataset(viscot_json: str, image_root: str):
    """A Visual-CoT file as the trainer's rows (image, question, answer)."""
    from datasets import Dataset, Image

    from data_lavit import read_visual_cot

    samples, _ = read_visual_cot(viscot_json)
    return Dataset.from_dict({
        "image": [os.path.join(image_root, s.image) for s in samples],
        "question": [s.question for s in samples],
        "answer": [s.answer for s in samples],
        "box": [list(s.bbox) for s in samples],
        "id": [s.id for s in samples],
    }).cast_column("image", Image())


def accuracy(model, processor, samples, path: str, mode: str, batch_size: int = 50) -> dict:
    from evaluation_lavit import evaluate, score

    if os.path.exists(path):
        os.remove(path)
    result = evaluate(model, processor, samples, path, mode=mode, batch_size=batch_size, max_new_tokens=3,
                      model_name=str(getattr(model.config, "_name_or_path", "model")), progress=False)
    scores = score(result.records)
    benchmark = next(iter(scores))
    return {"accuracy": scores[benchmark]["accuracy"], "unparseable": scores[benchmark]["unparseable"]}


def cpu_config(output_dir, steps: int, batch_size: int, lr: float, seed: int, logging_steps: int, **overrides):
    """The quickstart's `LavitSFTConfig`: CPU, cosine schedule with 5% warm-up, no weight decay, no checkpointing, the
    vision tower trained, no saving or reporting, and a stage restarted after a kill starts its run afresh
    (`overwrite_output_dir`); `overrides` set the rest (e.g. distill=False)."""
    from trainer_lavit import LavitSFTConfig

    settings = dict(
        use_cpu=True, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_ratio=0.05, weight_decay=0.0, activation_checkpointing=False,
        freeze_vision_tower=False, logging_steps=max(1, logging_steps), save_strategy="no", report_to="none",
        seed=seed, dataloader_num_workers=0, disable_tqdm=True, overwrite_output_dir=True,
    )
    settings.update(overrides)
    return LavitSFTConfig(str(output_dir), **settings)


def stage_teacher(args, root: Path, paths: dict, models: dict) -> dict:
    """Supervised fine-tuning of the teacher on the large pool (the trainer's Naive-SFT mode on a converted copy, with
    `GroundedSFTTrainer`'s grounding loss unless --teacher-grounding-weight is 0), evaluated on validation every few
    hundred steps and stopped at the target accuracy; exported as a stock model."""
    from conversion_lavit import convert_qwen2_5_vl_to_lavit, export_to_qwen2_5_vl
    from evaluation_lavit import load_mmvp
    from modeling_lavit import LavitForConditionalGeneration
    from processing_lavit import LavitProcessor

    work = root / "models" / "teacher_training"
    lavit_dir = convert_qwen2_5_vl_to_lavit(models["teacher_base"], work / "converted",
                                            teacher_hidden_size=args.teacher_text_hidden, seed=args.seed)
    model = LavitForConditionalGeneration.from_pretrained(lavit_dir)
    processor = LavitProcessor.from_pretrained(lavit_dir)
    val = load_mmvp(paths["val_mmvp"])
    validation = ValidationCurve(
        args.teacher_eval_every, lambda m: accuracy(m, processor, val, str(work / "val_predictions.jsonl"),
                                                    mode="none")["accuracy"],
        target=100 * args.teacher_target, name="teacher")
    config = cpu_config(work / "run", args.teacher_steps, args.batch_size, args.teacher_lr, args.seed,
                        args.teacher_eval_every, distill=False)
    extra = {}
    if args.teacher_grounding_weight > 0:
        Trainer = GroundedSFTTrainer
        extra = {"grounding_weight": args.teacher_grounding_weight}
    else:
        Trainer = LavitSFTTrainer
    trainer = Trainer(model=model, args=config, train_dataset=sft_dataset(paths["teacher_pool"], paths["images"]),
                      processing_class=processor, callbacks=[validation], **extra)
    show_progress(trainer, "teacher", validation)
    trainer.train()
    trainer.save_model(str(work / "trained"))
    processor.save_pretrained(str(work / "trained"))
    # trained without latent tokens, so exported without the chat template forcing them
    teacher_dir = export_to_qwen2_5_vl(work / "trained", root / "models" / "teacher", force_latent_tokens=False)
    curve = validation.curve
    final = curve[-1]["val_accuracy"] if curve else float("nan")
    if final < 100 * args.teacher_target:
        log.warning("The teacher reached %.1f%% on validation, below the %.0f%% target; its signals are weaker than "
                    "intended (raise --teacher-steps).", final, 100 * args.teacher_target)
    return {"teacher": teacher_dir, "curve": curve, "steps": trainer.state.global_step, "val_accuracy": final}


def stage_student(args, root: Path, paths: dict, models: dict) -> dict:
    """The student base converted to LaViT and, with --student-pretrain-steps, pre-trained (Naive SFT, no latent
    tokens) on scenes whose objects all have the asked size: it learns to see sizes and the answer format but not
    which object a question names. Both students start from this checkpoint."""
    from conversion_lavit import convert_qwen2_5_vl_to_lavit
    from evaluation_lavit import load_mmvp
    from modeling_lavit import LavitForConditionalGeneration
    from processing_lavit import LavitProcessor

    converted = root / "models" / ("student_converted" if args.student_pretrain_steps > 0 else "student_lavit")
    path = convert_qwen2_5_vl_to_lavit(models["student_base"], converted,
                                       teacher_hidden_size=args.teacher_text_hidden, seed=args.seed)
    if args.student_pretrain_steps <= 0:
        return {"student_lavit": path, "pretrain": None}
    model = LavitForConditionalGeneration.from_pretrained(path)
    processor = LavitProcessor.from_pretrained(path)
    config = cpu_config(root / "models" / "student_pretrain_run", args.student_pretrain_steps, args.batch_size,
                        args.student_lr, args.seed, args.student_pretrain_steps, distill=False)
    trainer = LavitSFTTrainer(model=model, args=config, processing_class=processor,
                              train_dataset=sft_dataset(paths["student_pretrain"], paths["images"]))
    show_progress(trainer, "student base pre-training")
    trainer.train()
    out = root / "models" / "student_lavit"
    trainer.save_model(str(out))
    processor.save_pretrained(str(out))
    model.eval()
    val = accuracy(model, processor, load_mmvp(paths["val_mmvp"]), str(root / "models" / "student_pretrain_val.jsonl"),
                   mode="none")
    log.info("  pre-trained student: %.1f%% on validation (objects of mixed sizes)", val["accuracy"])
    pretrain = {"steps": args.student_pretrain_steps, "val_accuracy": val["accuracy"]}
    return {"student_lavit": str(out), "pretrain": pretrain}


def stage_dataset(args, root: Path, paths: dict, teacher: dict) -> dict:
    """The real LaViT-15K builder on the distillation split: teacher answers with and without the image, gaze and
    V_sem from one forced pass, the three-stage filter."""
    from builder_lavit import BuilderConfig, build_lavit_dataset, finalize_dataset

    out = str(root / "lavit15k")
    config = BuilderConfig(teacher=teacher["teacher"], viscot_json=paths["distill"], image_root=paths["images"],
                           batch_size=50, shard_size=500, min_pixels=4 * 784, max_pixels=256 * 784, max_new_tokens=3,
                           seed=args.seed, stages=tuple(args.filter_stages), focus_threshold=args.focus_threshold,
                           query_rows=args.query_rows)
    build_lavit_dataset(config, out, progress=True)
    summary = finalize_dataset(out, config, "python examples/quickstart.py (stage: dataset)")
    if not summary["kept"]:
        raise RuntimeError(
            f"The builder kept none of the {summary['processed']} samples (rejected: {summary['rejected']}), so there "
            f"is nothing to distil; the teacher reached {teacher['val_accuracy']:.1f}% on validation. Train it longer "
            "(--teacher-steps) or relax the filter (--filter-stages, --focus-threshold), then delete "
            f"{out} and {Path(out).parent / 'stages' / 'dataset.json'} if present and rerun."
        )
    from collections import Counter

    from data_lavit import load_lavit_dataset

    answers = Counter(load_lavit_dataset(out, "kept").select_columns(["answer"])["answer"])
    return {"dataset": out, "filter_stages": list(args.filter_stages), "focus_threshold": args.focus_threshold,
            "query_rows": args.query_rows, "kept_answers": dict(sorted(answers.items())), **summary}


def log_every(steps: int, times: int) -> int:
    """The largest logging interval that divides `steps` and logs at least `times` times (so that the last step is
    logged and "final loss" is the last step's)."""
    return max([d for d in range(1, max(1, steps // times) + 1) if steps % d == 0])


def train_student(args, root: Path, name: str, student_dir: str, dataset_dir: str, val_mmvp: str, seed: int,
                  description: str, **overrides) -> dict:
    """One student on the kept samples: Naive SFT (`distill=False` in `overrides`) or LaViT, its latent tokens' image
    attention read from --latent-attention-layers; its validation accuracy every --student-eval-every steps."""
    from data_lavit import load_lavit_dataset
    from evaluation_lavit import load_mmvp
    from modeling_lavit import LavitForConditionalGeneration
    from processing_lavit import LavitProcessor

    out = root / "students" / f"{name}-seed{seed}"
    distill = overrides.get("distill", True)
    model = LavitForConditionalGeneration.from_pretrained(
        student_dir, latent_attention_layers=parse_latent_layers(args.latent_attention_layers))
    processor = LavitProcessor.from_pretrained(student_dir)
    val = load_mmvp(val_mmvp)
    mode = "forced" if distill else "none"
    validation = ValidationCurve(
        args.student_eval_every,
        lambda m: accuracy(m, processor, val, str(out / "run" / "val_predictions.jsonl"), mode=mode)["accuracy"],
        name=f"{name} seed {seed}")
    lr = args.student_lr if distill else args.naive_lr
    config = cpu_config(out / "run", args.student_steps, args.student_batch_size, lr, seed,
                        log_every(args.student_steps, 20), data_seed=seed,
                        **{"gate_warmup_steps": max(1, int(args.gate_warmup_fraction * args.student_steps)),
                           **overrides})
    trainer = LavitSFTTrainer(model=model, args=config, callbacks=[validation],
                              train_dataset=load_lavit_dataset(dataset_dir, "kept"), processing_class=processor)
    show_progress(trainer, description, validation)
    trainer.train()
    trainer.save_model(str(out))
    processor.save_pretrained(str(out))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"path": str(out), "final_loss": logs[-1]["loss"] if logs else None, "val_curve": validation.curve,
            "log": [{k: h.get(k) for k in ("step", "loss", "ntp_loss", "concept_loss", "trajectory_loss",
                                           "sensory_gate")} for h in logs]}


# LaViT at inference: its latent tokens as trained, left out, masked from the answer, zeroed, or swapped between samples

ABLATIONS = {
    "no_trajectory": {"trajectory_loss_coef": 0.0},
    "no_semantic": {"concept_loss_coef": 0.0},
    "no_curriculum": {"gate_schedule": "step"},
    "single_stage": {"gate_schedule": "none"},
}


def train_runs(args, root: Path, student: dict, dataset: dict, paths: dict, plan: list) -> dict:
    runs = {}
    for i, (name, seed, overrides) in enumerate(plan, 1):
        start = time.time()
        runs[f"{name}-seed{seed}"] = info = train_student(
            args, root, name, student["student_lavit"], dataset["dataset"], paths["val_mmvp"], seed,
            f"{name} seed {seed} ({i}/{len(plan)})", **overrides)
        curve = info["val_curve"]
        log.info("  %s seed %d: %d steps in %.0f s, final loss %.3f, validation %s", name, seed, args.student_steps,
                 time.time() - start, info["final_loss"] or math.nan,
                 " ".join(f"{c['val_accuracy']:.1f}" for c in curve))
    return runs


def stage_students(args, root: Path, student: dict, dataset: dict, paths: dict) -> dict:
    """Naive SFT and LaViT on the same kept samples, the same steps and the same seeds."""
    plan = [(name, seed, overrides) for seed in range(args.seeds)
            for name, overrides in (("naive_sft", {"distill": False}), ("lavit", {}))]
    return {"runs": train_runs(args, root, student, dataset, paths, plan)}


def stage_ablations(args, root: Path, student: dict, dataset: dict, paths: dict) -> dict:
    """Table 3's ablations of LaViT, one seed each, trained and scored on test like the full method (--ablations;
    added to a finished run without retraining anything)."""
    from evaluation_lavit import load_mmvp

    plan = [(name, 0, overrides) for name, overrides in ABLATIONS.items()]
    runs = train_runs(args, root, student, dataset, paths, plan)
    test = load_mmvp(paths["test_mmvp"])
    results = {run: score_modes(*load_run(info["path"]), test, root / "evaluation", run, ["forced", "shuffled"])
               for run, info in runs.items()}
    return {"runs": runs, "results": results}


def load_run(path: str):
    """A trained LaViT checkpoint of this run, `(model in eval mode, processor)`."""
    from modeling_lavit import LavitForConditionalGeneration
    from processing_lavit import LavitProcessor

    return LavitForConditionalGeneration.from_pretrained(path).eval(), LavitProcessor.from_pretrained(path)


def score_modes(model, processor, test, folder: Path, name: str, modes: list[str], bar=None) -> dict:
    """Test accuracy of one model in each latent mode, the predictions in `<folder>/<name>-<mode>.jsonl`."""
    results = {}
    for mode in modes:
        results[mode] = accuracy(model, processor, test, str(folder / f"{name.replace(' ', '_')}-{mode}.jsonl"), mode)
        if bar is not None:
            bar.update()
    return results


def load_student_base(models: dict, student: dict):
    """The students' starting point, `(model, processor)`: the pre-trained base when there is one (its processor adds
    no latent tokens, which it never saw), else the untrained stock base."""
    from teacher_lavit import load_qwen2_5_vl

    if student.get("pretrain"):
        model, processor = load_run(student["student_lavit"])
        processor.add_latent_tokens = False
        return model, processor
    return load_qwen2_5_vl(models["student_base"])  # a model and its image-only processor


def stage_evaluate(args, root: Path, paths: dict, models: dict, teacher: dict, student: dict, students: dict) -> dict:
    """Test accuracy of every model with the harness: the teacher and the students' starting point ("student base",
    pre-trained or not) in mode none, the students in their modes (LaViT also with its latents masked, zeroed and
    shuffled)."""
    from evaluation_lavit import load_mmvp
    from teacher_lavit import load_qwen2_5_vl

    test = load_mmvp(paths["test_mmvp"])
    folder = root / "evaluation"
    folder.mkdir(exist_ok=True)
    jobs = [("teacher", ["none"]), ("student base", ["none"])]
    jobs += [(run, ["none"] if run.startswith("naive_sft") else LATENT_MODES) for run in students["runs"]]
    bar = progress_bar(sum(len(modes) for _, modes in jobs), "evaluate on test", "run")
    results = {}
    for name, modes in jobs:
        if name == "teacher":
            loaded = load_qwen2_5_vl(teacher["teacher"])
        elif name == "student base":
            loaded = load_student_base(models, student)
        else:
            loaded = load_run(students["runs"][name]["path"])
        results[name] = score_modes(*loaded, test, folder, name, modes, bar)
    bar.close()
    return {"results": results}


FOCUS_THRESHOLDS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4]


def stage_analysis(args, root: Path, paths: dict, models: dict, teacher: dict, student: dict, students: dict,
                   dataset: dict) -> dict:
    """The attention analysis on the first --analysis-samples test questions: each model's attention while it answers
    (S_focus on the key object's cell, entropy, salient regions), Figure 2 (accuracy against S_focus, for the models
    that err: the student base and both students, seeds pooled), Figure 3 (the perception gap of Naive SFT and LaViT,
    seed 0, against the teacher), Figures 4 and 5."""
    from analysis_lavit import (answer_trajectories, attention_entropy, attention_statistics, focus_curve, focus_of,
                                perception_gap, plot_entropy_histograms, plot_focus_curves, plot_heatmaps,
                                plot_perception_gaps)
    from data_lavit import read_visual_cot
    from builder_lavit import answer_matches
    from teacher_lavit import load_qwen2_5_vl

    folder = root / "analysis"
    folder.mkdir(exist_ok=True)
    samples, _ = read_visual_cot(paths["test"])
    samples = samples[: args.analysis_samples]
    from PIL import Image

    images = [Image.open(os.path.join(paths["images"], s.image)).convert("RGB") for s in samples]
    questions = [s.question for s in samples]
    boxes = [s.bbox for s in samples]

    rows = args.query_rows  # the text rows the builder read the teacher's gaze from
    loaded = {"teacher": (*load_qwen2_5_vl(teacher["teacher"]), rows),
              "student base": (*load_student_base(models, student), rows)}
    for run, info in students["runs"].items():
        model, processor = load_run(info["path"])
        processor.add_latent_tokens = not run.startswith("naive_sft")  # Naive SFT never saw latent tokens
        loaded[run] = (model, processor, rows)
        if run.startswith("lavit"):
            loaded[f"{run} (latents)"] = (model, loaded[run][1], "latents")
    per_model, maps, grids, entropies, focus, correct = {}, {}, {}, {}, {}, {}
    bar = progress_bar(len(loaded) + 2, "attention analysis", "model")
    for name, (model, processor, model_rows) in loaded.items():
        run = answer_trajectories(model, processor, images, questions, 3, model_rows, batch_size=20)
        pairs = [(f, answer_matches(text, s.answer))
                 for f, text, s in zip(focus_of(run["maps"], run["grids"], images, boxes), run["answers"], samples)
                 if f is not None]  # a sample without a box has no S_focus
        focus[name], correct[name] = [f for f, _ in pairs], [c for _, c in pairs]
        per_model[name] = {**attention_statistics(run["maps"]), "s_focus": float(np.mean(focus[name])),
                           "rows": model_rows, "accuracy": 100 * float(np.mean(correct[name]))}
        maps[name], grids[name] = run["maps"], run["grids"]
        entropies[name] = [attention_entropy(m) for m in run["maps"]]
        bar.update()

    figure2 = {}
    for label, prefix in (("student base", "student base"), ("Naive SFT", "naive_sft-seed"), ("LaViT", "lavit-seed")):
        names = [n for n in loaded if n.startswith(prefix) and not n.endswith("(latents)")]
        pooled_focus = [f for n in names for f in focus[n]]
        pooled_correct = [c for n in names for c in correct[n]]
        right = [f for f, c in zip(pooled_focus, pooled_correct) if c]
        wrong = [f for f, c in zip(pooled_focus, pooled_correct) if not c]
        figure2[label] = {"curve": focus_curve(pooled_focus, pooled_correct, FOCUS_THRESHOLDS), "runs": names,
                          "mean_focus_correct": float(np.mean(right)) if right else None,
                          "mean_focus_incorrect": float(np.mean(wrong)) if wrong else None}
    plot_focus_curves(figure2, folder / "figure2_accuracy_vs_focus.png")

    shown = ["teacher", "student base", "naive_sft-seed0", "lavit-seed0", "lavit-seed0 (latents)"]
    plot_entropy_histograms({n: entropies[n] for n in shown}, folder / "figure4_entropy.png")
    plot_heatmaps(images[:3], {n: maps[n][:3] for n in shown}, {n: grids[n][:3] for n in shown},
                  folder / "figure5_heatmaps.png", boxes[:3])
    gaps = {}
    teacher_model, teacher_processor, _ = loaded["teacher"]
    responses = [s.answer for s in samples]
    for label, run in (("Naive SFT (seed 0)", "naive_sft-seed0"), ("LaViT (seed 0)", "lavit-seed0")):
        model, processor, _ = loaded[run]
        gap = perception_gap(teacher_model, teacher_processor, model, processor, images, questions, responses)
        gaps[label] = {"per_category": gap["per_category"], "cosine_through": gap["cosine_through"]}
        bar.update()
    bar.close()
    plot_perception_gaps(gaps, folder / "figure3_perception_gap.png")
    return {"figure2": figure2, "per_model": per_model, "perception_gap": gaps,
            "figures": ["analysis/figure2_accuracy_vs_focus.png", "analysis/figure3_perception_gap.png",
                        "analysis/figure4_entropy.png", "analysis/figure5_heatmaps.png"]}


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def mean_std(values) -> dict:
    """`analysis_lavit.spread` of the values given (None dropped) with the values themselves; empty: no mean."""
    from analysis_lavit import spread

    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {**{k: v for k, v in spread(values).items() if k != "cv"}, "values": values}


LATENT_MODE_MEANING = {
    "forced": "the latent tokens written before the answer, as trained",
    "none": "no latent tokens at all: the answer straight after the question",
    "masked": "the latent tokens written, but no later token may attend to them (the first answer token is still "
              "predicted at the last latent position, so a one-letter answer keeps that position's state)",
    "zeroed": "the latent tokens' input embeddings set to zero",
    "shuffled": "at every layer, each sample's latent states swapped with another sample's: the answer reads "
                "another image's latent thoughts",
}


def summarise(args, stages: dict) -> dict:
    """results.json: every number the report shows."""
    evaluation = stages["evaluate"]["results"]
    analysis = stages["analysis"]["per_model"]
    runs = stages["students"]["runs"]
    seeds = range(args.seeds)

    def row(names: list[str], accuracy: list[float]) -> dict:
        """Mean and spread over `names` of the accuracy given and of the attention statistics of the analysis."""
        return {"accuracy": mean_std(accuracy),
                "s_focus": mean_std([analysis[r]["s_focus"] for r in names]),
                "entropy": mean_std([analysis[r]["entropy"]["mean"] for r in names]),
                "salient_regions": mean_std([analysis[r]["salient_regions"]["mean"] for r in names]),
                "salient_regions_cv": mean_std([analysis[r]["salient_regions"]["cv"] for r in names])}

    per_seed = {"naive_sft": [evaluation[f"naive_sft-seed{s}"]["none"]["accuracy"] for s in seeds],
                "lavit": [evaluation[f"lavit-seed{s}"]["forced"]["accuracy"] for s in seeds]}
    methods = {method: row([f"{method}-seed{s}" for s in seeds], per_seed[method]) for method in per_seed}
    methods["lavit (latent tokens)"] = row([f"lavit-seed{s} (latents)" for s in seeds], [])
    for mode in LATENT_MODES[1:]:
        methods[f"lavit [{mode}]"] = {"accuracy": mean_std([evaluation[f"lavit-seed{s}"][mode]["accuracy"]
                                                            for s in seeds])}
    for name in ("teacher", "student base"):
        methods[name] = row([name], [evaluation[name]["none"]["accuracy"]])
    ablations = (stages.get("ablations") or {}).get("results", {})
    for name in ABLATIONS:
        if f"{name}-seed0" in ablations:
            methods[f"ablation: {name}"] = {
                "accuracy": mean_std([ablations[f"{name}-seed0"]["forced"]["accuracy"]]),
                "shuffled": mean_std([ablations[f"{name}-seed0"]["shuffled"]["accuracy"]])}
    lavit, naive = methods["lavit"], methods["naive_sft"]
    teacher = methods["teacher"]["accuracy"]["mean"]

    def diff(key):
        if lavit[key]["mean"] is None or naive[key]["mean"] is None:
            return None
        return lavit[key]["mean"] - naive[key]["mean"]

    # the share of the Naive-to-teacher gap that LaViT closes, seed by seed (the same seed's Naive SFT run)
    shares = [(lv - nv) / (teacher - nv) if teacher - nv > 0 else None
              for lv, nv in zip(per_seed["lavit"], per_seed["naive_sft"])]
    shuffled_drop = [evaluation[f"lavit-seed{s}"]["forced"]["accuracy"] - evaluation[f"lavit-seed{s}"]["shuffled"]
                     ["accuracy"] for s in seeds]
    curves = {}
    for method in per_seed:
        by_step: dict[int, list[float]] = {}
        for s in seeds:
            for point in runs[f"{method}-seed{s}"].get("val_curve", []):
                by_step.setdefault(point["step"], []).append(point["val_accuracy"])
        curves[method] = [{"step": step, "val_accuracy": mean_std(values)} for step, values in sorted(by_step.items())]
    return {
        "smoke": args.smoke,
        "settings": {k: v for k, v in vars(args).items()},
        "teacher": {"val_accuracy": stages["teacher"]["val_accuracy"], "steps": stages["teacher"]["steps"],
                    "curve": stages["teacher"]["curve"], "target": 100 * args.teacher_target,
                    "grounding_weight": args.teacher_grounding_weight},
        "student_pretrain": stages["student"].get("pretrain"),
        "parameters": {"teacher": stages["models"]["teacher_base_parameters"],
                       "student": stages["models"]["student_base_parameters"]},
        "dataset": {**{k: stages["dataset"][k] for k in ("processed", "kept", "rejected", "skipped", "filter_stages",
                                                          "focus_threshold", "query_rows")},
                    "kept_answers": stages["dataset"].get("kept_answers")},
        "methods": methods,
        "per_seed": {method: [{"seed": s, "test_accuracy": per_seed[method][s],
                               "final_train_loss": runs[f"{method}-seed{s}"]["final_loss"]} for s in seeds]
                     for method in per_seed},
        "lavit_minus_naive": {"accuracy": diff("accuracy"), "s_focus": diff("s_focus")},
        "gap_closed": mean_std(shares),
        "gap_closed_per_seed": shares,
        "shuffled_drop": mean_std(shuffled_drop),
        "val_curves": curves,
        "figure2": stages["analysis"]["figure2"],
        "perception_gap": stages["analysis"]["perception_gap"],
        "figures": stages["analysis"]["figures"],
        "stage_seconds": {name: stages[name]["_seconds"] for name in stages},
    }


def fmt(stat, scale: float = 1.0, digits: int = 1) -> str:
    """`mean ± std` (or the mean alone for one value); "—" where there is no number (e.g. a CV of a zero mean)."""
    if stat is None or stat.get("mean") is None or not math.isfinite(stat["mean"]):
        return "—"
    if stat["n"] > 1 and not math.isfinite(stat["std"]):
        return f"{stat['mean'] * scale:.{digits}f}"
    if stat["n"] > 1:
        return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f}"


def verdict(results: dict) -> list[str]:
    """One plain sentence per measure: who is ahead, by how much, and whether the gap exceeds twice the larger
    seed-to-seed standard deviation; the share of the gap closed; whether the answers need the latents; whether the
    students had levelled off; whether the seeds varied the runs."""
    methods = results["methods"]
    lavit, naive = methods["lavit"], methods["naive_sft"]
    n = lavit["accuracy"]["n"]
    lines = []
    clear_accuracy = False
    for key, label, unit in (("accuracy", "test accuracy", " points"),
                             ("s_focus", "S_focus (attention on the key object's cell)", "")):
        d = results["lavit_minus_naive"][key]
        if d is None:
            continue
        spread = max(lavit[key]["std"] or 0.0, naive[key]["std"] or 0.0)
        if abs(d) < 1e-9:
            outcome = "tied with"
        else:
            outcome = "beat" if d > 0 else "did not beat"
        clear = abs(d) > 2 * spread and abs(d) >= 1e-9
        if key == "accuracy":
            clear_accuracy = clear and d > 0
        lines.append(f"- On {label}, LaViT {outcome} Naive SFT here: {lavit[key]['mean']:.3f} against "
                     f"{naive[key]['mean']:.3f}, a difference of {d:+.3f}{unit}, "
                     f"{'larger than' if clear else 'within'} twice the larger seed-to-seed standard deviation "
                     f"({spread:.3f}) over {n} seeds.")
    share = results.get("gap_closed") or {}
    teacher = methods["teacher"]["accuracy"]["mean"]
    if share.get("mean") is not None:
        per_seed = results.get("gap_closed_per_seed") or share["values"]
        lines.append(f"- Of the gap between Naive SFT ({naive['accuracy']['mean']:.1f}%) and the teacher "
                     f"({teacher:.1f}%), LaViT closes {100 * share['mean']:.0f}% ± {100 * share['std']:.0f}% over "
                     f"{share['n']} seeds (per seed: "
                     + ", ".join("n/a (Naive SFT not below the teacher)" if v is None else f"{100 * v:.0f}%"
                                 for v in per_seed) + ").")
    drop = results.get("shuffled_drop") or {}
    if drop.get("mean") is not None:
        needed = drop["mean"] >= 15.0
        lines.append(f"- Swapping LaViT's latent states between samples costs it {drop['mean']:.1f} ± {drop['std']:.1f} "
                     "points of test accuracy: "
                     + ("its answers read the latent tokens of their own image (at least 15 points)." if needed else
                        "less than 15 points, so its answers do not depend much on the content of its latent tokens."))
        if clear_accuracy and needed:
            lines.append("- Both conditions of the demo's goal hold: LaViT ahead of Naive SFT by more than twice the "
                         "larger seed spread, and its latent tokens necessary.")
    curves = results.get("val_curves") or {}
    for method, label in (("naive_sft", "Naive SFT"), ("lavit", "LaViT")):
        curve = curves.get(method) or []
        if len(curve) >= 2:
            last, before = curve[-1]["val_accuracy"]["mean"], curve[-2]["val_accuracy"]["mean"]
            change = last - before
            trend = ("still rising at the end of training; more steps may move it." if change > 2.0 else
                     f"fell by {-change:.1f} points at the end of training." if change < -2.0 else "levelled off.")
            lines.append(f"- {label} on validation: {before:.1f}% at step {curve[-2]['step']}, {last:.1f}% at step "
                         f"{curve[-1]['step']}: {trend}")
    for method, label in (("naive_sft", "Naive SFT"), ("lavit", "LaViT")):
        runs = (results.get("per_seed") or {}).get(method) or []
        if len(runs) > 1 and len({(r["test_accuracy"], r["final_train_loss"]) for r in runs}) == 1:
            lines.append(f"- {label}'s {len(runs)} seeds gave the same run (accuracy and final loss): its spread "
                         "says nothing about seed-to-seed variation.")
    chance = 100.0 / 4
    at_chance = [name for name, row in (("Naive SFT", naive), ("LaViT", lavit))
                 if row["accuracy"]["mean"] is not None and abs(row["accuracy"]["mean"] - chance) <= 5.0]
    if at_chance:
        lines.append(f"- {' and '.join(at_chance)} {'are' if len(at_chance) > 1 else 'is'} within 5 points of chance "
                     f"({chance:.0f}%): {'neither has' if len(at_chance) > 1 else 'it has not'} learned the task from "
                     f"the {results['dataset']['kept']} kept samples in {results['settings']['student_steps']} steps, "
                     "so the accuracy comparison says nothing about distillation here.")
    start = methods["student base"]["accuracy"]["mean"]
    if start is not None and start > chance + 5.0:
        gains = {name: row["accuracy"]["mean"] - start for name, row in (("Naive SFT", naive), ("LaViT", lavit))
                 if row["accuracy"]["mean"] is not None}
        lines.append("- Against their common starting point (the student base, "
                     f"{start:.1f}%): " + ", ".join(f"{name} {gain:+.1f} points" for name, gain in gains.items())
                     + (". Neither moved more than 5 points from it: the kept samples changed neither student's "
                        "accuracy much, so the accuracy comparison says little about distillation here."
                        if all(abs(g) <= 5.0 for g in gains.values()) else "."))
    return lines


def results_table(methods: dict) -> list[str]:
    """The main table of the report (and of RESULTS.md): accuracy and attention statistics per model."""
    lines = ["| model | accuracy (%) | S_focus | entropy | salient regions | salient CV |", "|---|---|---|---|---|---|"]
    for name in ("teacher", "student base", "naive_sft", "lavit", "lavit (latent tokens)"):
        row = methods[name]
        lines.append(f"| {name} | {fmt(row['accuracy'])} | {fmt(row['s_focus'], digits=3)} | "
                     f"{fmt(row['entropy'], digits=3)} | {fmt(row['salient_regions'], digits=2)} | "
                     f"{fmt(row['salient_regions_cv'], digits=3)} |")
    return lines


def curves_table(curves: dict) -> list[str]:
    """The students' validation accuracy along training (mean ± std over seeds): the sweep of step counts."""
    steps = sorted({p["step"] for curve in curves.values() for p in curve})
    at = {method: {p["step"]: p["val_accuracy"] for p in curve} for method, curve in curves.items()}
    lines = ["| step | Naive SFT (%) | LaViT (%) |", "|---|---|---|"]
    lines += [f"| {step} | {fmt(at.get('naive_sft', {}).get(step))} | {fmt(at.get('lavit', {}).get(step))} |"
              for step in steps]
    return lines


def ablations_table(methods: dict) -> list[str]:
    """Table 3's rows beside the full method's seed 0 (the ablations' seed): accuracy, and with latents shuffled."""
    lines = ["| run (seed 0) | accuracy (%) | latents shuffled (%) |", "|---|---|---|",
             f"| full method | {methods['lavit']['accuracy']['values'][0]:.1f} | "
             f"{methods['lavit [shuffled]']['accuracy']['values'][0]:.1f} |"]
    lines += [f"| {k[len('ablation: '):]} | {fmt(methods[k]['accuracy'])} | {fmt(methods[k].get('shuffled'))} |"
              for k in methods if k.startswith("ablation: ")]
    return lines


def modes_table(methods: dict) -> list[str]:
    lines = ["| mode | what the answer sees | accuracy (%) |", "|---|---|---|"]
    for mode in LATENT_MODES:
        stat = methods["lavit" if mode == "forced" else f"lavit [{mode}]"]["accuracy"]
        lines.append(f"| {mode} | {LATENT_MODE_MEANING[mode]} | {fmt(stat)} |")
    return lines


def size_note(parameters: dict) -> str:
    ratio = parameters["teacher"] / parameters["student"]
    if ratio < 1.5:
        return "a teacher the size of its student (the paper distils a 32B teacher into a 3B student)"
    return f"a teacher {ratio:.1f} times its student's size (the paper's is about 10 times)"


def render_report(results: dict) -> str:
    m = results["methods"]
    smoke = results["smoke"]
    lines = ["# LaViT quickstart report", ""]
    if smoke:
        lines += ["**Smoke run**: every stage at toy size to check the pipeline; the numbers below mean nothing.", ""]
    t = results["teacher"]
    d = results["dataset"]
    lines += [
        "## The task and the teacher", "",
        "112-pixel images cut into 4 x 4 cells of 28 pixels (one visual token each); each object sits wholly inside "
        "its own cell; the question names an object by its colour and asks its size class, options (A) tiny (B) small "
        "(C) medium (D) large, answers balanced (chance: 25%).", "",
        f"The teacher ({results['parameters']['teacher']:,} parameters) reached {t['val_accuracy']:.1f}% on "
        f"validation after {t['steps']} steps of "
        + ("plain supervised fine-tuning" if not t["grounding_weight"] else
           f"supervised fine-tuning with a grounding loss (weight {t['grounding_weight']:g}: the KL from the key "
           "object's cell to its first layer's attention at the question's colour word, standing in for the "
           "grounding a large pretrained teacher brings; the students never see the boxes, see "
           "GroundedSFTTrainer in quickstart_lavit.py)")
        + (f", short of the {t['target']:.0f}% target: its answers, gaze and semantics are those of a partly "
           "trained teacher, and the filter keeps only the samples it got right." if t["val_accuracy"] < t["target"]
           else f", above the {t['target']:.0f}% target.")
        + f" Each student has {results['parameters']['student']:,} parameters"
        + (". Both start from the same random student base." if not results.get("student_pretrain") else
           f" and starts from the same base pre-trained for {results['student_pretrain']['steps']} steps on scenes "
           "whose objects all have the asked size (seeing sizes without finding the named object), which answers "
           f"{results['student_pretrain']['val_accuracy']:.1f}% of the validation questions."), "",
        f"The builder processed {d['processed']} samples of the distillation split with the filter stages "
        f"{', '.join(d['filter_stages']) or 'none'} (S_focus threshold {d['focus_threshold']}, the teacher's gaze "
        f"read from its {d['query_rows'].replace('_', ' ')} rows) and kept {d['kept']} "
        f"(rejected as {', '.join(f'{k}: {v}' for k, v in sorted(d['rejected'].items())) or 'nothing'}; inputs "
        f"skipped: {d['skipped']}). Both students train on the kept samples only"
        + (". Their answers by option: " + ", ".join(f"{k} {v}" for k, v in d["kept_answers"].items())
           + (" (the difficulty stage drops what the teacher answers right without the image, so the option it "
              "guesses blind is rare among the kept samples; validation and test stay balanced)."
              if "difficulty" in d["filter_stages"] else " (validation and test are balanced).")
           if d.get("kept_answers") else "."), "",
        f"Each student trains {results['settings']['student_steps']} steps (batch "
        f"{results['settings']['student_batch_size']}, cosine schedule; learning rate "
        f"{results['settings']['student_lr']:g} for LaViT and {results['settings']['naive_lr']:g} for Naive SFT"
        + (", each chosen on validation" if (results["settings"]["student_lr"], results["settings"]["naive_lr"])
           == (DEFAULT_LR["student_lr"], DEFAULT_LR["naive_lr"]) else "") + ") "
        f"on those samples, with {results['settings']['seeds']} seeds per method (a seed sets the order of the "
        "samples). LaViT's trajectory loss reads its latent tokens' attention from the layers "
        f"`{results['settings']['latent_attention_layers']}` (in the first layer a latent token's query depends on "
        "its own embedding only, so it cannot look at the object a question names there); the sensory gate opens "
        f"over the first {100 * results['settings']['gate_warmup_fraction']:.0f}% of the steps.", "",
        "## Results on the test split", "",
        *results_table(m),
    ]
    lines += ["", "Accuracy: greedy answers read by the harness's option extractor. S_focus: the share of the image "
              "attention (averaged over heads, layers and text rows) that falls in the key object's cell, read from "
              f"the same text rows as the teacher's gaze ({results['dataset']['query_rows'].replace('_', ' ')}, "
              "each model's own greedy answer), or for the last row from the latent tokens. Entropy, salient "
              "regions and their coefficient of variation as in Table 2 of the paper. Mean ± standard deviation over "
              "seeds. Per seed (test accuracy %): Naive SFT "
              + ", ".join(f"{r['test_accuracy']:.1f}" for r in results["per_seed"]["naive_sft"]) + "; LaViT "
              + ", ".join(f"{r['test_accuracy']:.1f}" for r in results["per_seed"]["lavit"]) + ".", "",
              "### LaViT with its latent tokens changed at inference", "",
              *modes_table(m)]
    if any(k.startswith("ablation: ") for k in m):
        lines += ["", "### Table 3 ablations (one seed each, same steps and data)", "", *ablations_table(m)]
    curves = results.get("val_curves") or {}
    if any(curves.values()):
        lines += ["", "## Validation accuracy along training", "",
                  "Each student's accuracy on the validation split during its training (mean ± std over seeds): the "
                  "sweep the step count was chosen from, and whether either student was still improving when it "
                  "stopped.", "", *curves_table(curves)]
    lines += ["", "## Verdict", ""] + verdict(results) + [
        "",
        "What this does and does not say: it is one synthetic task, tiny models trained from scratch on a CPU (the "
        "teacher helped by a grounding loss, the student base by a brief pre-training), "
        f"{size_note(results['parameters'])} and {results['dataset']['kept']} distillation samples. It shows the whole method "
        "running end to end and how the two students compare in this regime; it does not test the paper's claims "
        "about 3B students distilled from a 32B teacher on LaViT-15K, whose effects can be larger, smaller or absent "
        "at that scale.",
        "",
        "## Figures", "",
    ]
    figure_notes = {
        "figure2_accuracy_vs_focus.png": "accuracy of the test answers whose S_focus exceeds a threshold, for the "
                                         "student base, Naive SFT and LaViT (seeds pooled)",
        "figure3_perception_gap.png": "per word category of the answers, how far Naive SFT's and LaViT's image "
                                      "attention and hidden states are from the teacher's (seed 0; the answers are "
                                      "option letters, so some categories hold no tokens)",
        "figure4_entropy.png": "entropy of each model's image attention while answering",
        "figure5_heatmaps.png": "where each model looks on three test images (the key object boxed)",
    }
    lines += [f"- [{Path(f).name}]({f}): {figure_notes.get(Path(f).name, '')}" for f in results["figures"]]
    lines += ["", "## Stage times (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["stage_seconds"].items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------


def setup_logging(root: Path) -> None:
    """Stage lines on the console; those and every Trainer log dict in `<output>/run.log`."""
    root.mkdir(parents=True, exist_ok=True)
    console = logging.StreamHandler()
    console.setLevel(logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    logfile = logging.FileHandler(root / "run.log", encoding="utf-8")
    logfile.setLevel(logging.DEBUG)
    logfile.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    for logger in (log, train_log):
        logger.setLevel(logging.DEBUG)
    logging.basicConfig(level=logging.INFO, handlers=[console, logfile], force=True)
    for noisy in ("transformers", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv=None) -> str:
    """Runs (or resumes) every stage and writes `results.json`, `report.md` and `run.log` under --output-dir; returns
    the report (`examples/quickstart.py` prints it)."""
    args = parse_args(argv)
    root = Path(args.output_dir)
    setup_logging(root)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    random.seed(args.seed)
    check_settings(root, args)
    stages = Stages(root)
    results = {}
    results["task"] = stages.run("task", stage_task, args, root)
    results["models"] = stages.run("models", stage_models, args, root, results["task"])
    results["teacher"] = stages.run("teacher", stage_teacher, args, root, results["task"], results["models"])
    results["student"] = stages.run("student", stage_student, args, root, results["task"], results["models"])
    results["dataset"] = stages.run("dataset", stage_dataset, args, root, results["task"], results["teacher"])
    results["students"] = stages.run("students", stage_students, args, root, results["student"], results["dataset"],
                                     results["task"])
    results["evaluate"] = stages.run("evaluate", stage_evaluate, args, root, results["task"], results["models"],
                                     results["teacher"], results["student"], results["students"])
    results["analysis"] = stages.run("analysis", stage_analysis, args, root, results["task"], results["models"],
                                     results["teacher"], results["student"], results["students"], results["dataset"])
    if args.ablations or (root / "stages" / "ablations.json").exists():
        results["ablations"] = stages.run("ablations", stage_ablations, args, root, results["student"],
                                          results["dataset"], results["task"])
    summary = summarise(args, results)
    (root / "results.json").write_text(json.dumps(summary, indent=2))
    report = render_report(summary)
    (root / "report.md").write_text(report)
    return report
