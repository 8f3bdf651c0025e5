# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""LaViT end to end on a CPU: a synthetic grounding task where looking at the right place decides the answer, a tiny
teacher trained on it (with a grounding loss standing in for a large pretrained teacher's grounding), its signals
extracted and filtered by the real builder, a student base pre-trained to see sizes (but not to find the named
object), Naive-SFT and LaViT students trained from it on the same limited data over several seeds, every model
evaluated by the harness (latent modes included), the attention analysis, and an honest report.

This module is the stage runner: the arguments and the stages. The task is `synthetic_lavit`, the teacher's grounding
loss `grounding_lavit`, the analysis `analysis_lavit.attention_analysis`, the report `report_lavit`.

Every stage runs through the project's own code (the Visual-CoT reader, `convert_qwen2_5_vl_to_lavit`, the LaViT-15K
builder, `LavitSFTTrainer`, the evaluation harness, the analysis) and keeps its artefacts under --output-dir; a
finished stage is not run again. Tested with (2 CPU cores):

    python examples/quickstart.py --output-dir quickstart_output     # the default run (make demo), about 16 minutes
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
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

import synthetic_lavit as task
from cli_lavit import changed_settings, output_folder
from configuration_lavit import parse_latent_layers, resolve_latent_layers
from data_lavit import write_json_atomic
from evaluation_lavit import LATENT_MODES
from grounding_lavit import GroundedSFTTrainer
from report_lavit import DEFAULT_LR, render_report, summarise
from trainer_lavit import LavitSFTTrainer, unwrap_lavit


log = logging.getLogger("quickstart")


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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=output_folder, default="quickstart",
                        help="where every stage's artefacts go")
    parser.add_argument("--smoke", action="store_true", help="every stage at toy size (a CI check, not a result)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3, help="student seeds per method")
    parser.add_argument("--teacher-pool", type=int, default=20000, help="generated samples the teacher trains on")
    parser.add_argument("--distill-samples", type=int, default=2000, help="samples the teacher's signals are built on")
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--teacher-steps", type=int, default=2500, help="at most this many teacher steps")
    parser.add_argument("--teacher-target", type=float, default=0.90, help="stop the teacher at this val accuracy")
    parser.add_argument("--teacher-eval-every", type=int, default=250,
                        help="the teacher's validation accuracy every this many steps (it stops at the target)")
    parser.add_argument("--student-steps", type=int, default=1250,
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
                        help="weight of the teacher's grounding loss (grounding_lavit.GroundedSFTTrainer); 0: plain "
                             "SFT")
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
    parser.add_argument("--ablations", action="store_true",
                        help="also train the Table 3 ablations (--seeds seeds each; not part of make demo)")
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


def accuracy(model, processor, samples, path: str, mode: str, batch_size: int = 200) -> dict:
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
        args.teacher_eval_every, lambda current: accuracy(current, processor, val, str(work / "val_predictions.jsonl"),
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
    return max(interval for interval in range(1, max(1, steps // times) + 1) if steps % interval == 0)


def train_student(args, root: Path, name: str, student_dir: str, dataset_dir: str, val_mmvp: str, seed: int,
                  description: str, cache=None, **overrides) -> dict:
    """One student on the kept samples: Naive SFT (`distill=False` in `overrides`) or LaViT, its latent tokens' image
    attention read from --latent-attention-layers; its validation accuracy every --student-eval-every steps. `cache`
    (a `PreprocessingCache`) keeps each sample's processed form for every epoch and every student given it."""
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
        lambda current: accuracy(current, processor, val, str(out / "run" / "val_predictions.jsonl"),
                                 mode=mode)["accuracy"],
        name=f"{name} seed {seed}")
    lr = args.student_lr if distill else args.naive_lr
    config = cpu_config(out / "run", args.student_steps, args.student_batch_size, lr, seed,
                        log_every(args.student_steps, 20), data_seed=seed, cache_preprocessing=cache is not None,
                        **{"gate_warmup_steps": max(1, int(args.gate_warmup_fraction * args.student_steps)),
                           **overrides})
    trainer = LavitSFTTrainer(model=model, args=config, callbacks=[validation], preprocessing_cache=cache,
                              train_dataset=load_lavit_dataset(dataset_dir, "kept"), processing_class=processor)
    show_progress(trainer, description, validation)
    trainer.train()
    trainer.save_model(str(out))
    processor.save_pretrained(str(out))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {"path": str(out), "final_loss": logs[-1]["loss"] if logs else None, "val_curve": validation.curve,
            "log": [{key: entry.get(key) for key in ("step", "loss", "ntp_loss", "concept_loss", "trajectory_loss",
                                                     "sensory_gate")} for entry in logs]}


# Table 3's ablations of LaViT: the settings each changes

ABLATIONS = {
    "no_trajectory": {"trajectory_loss_coef": 0.0},
    "no_semantic": {"concept_loss_coef": 0.0},
    "no_curriculum": {"gate_schedule": "step"},
    "single_stage": {"gate_schedule": "none"},
}


def train_runs(args, root: Path, student: dict, dataset: dict, paths: dict, plan: list) -> dict:
    """Trains every `(name, seed, overrides)` of `plan`, one after another, sharing one preprocessing cache (each
    kept sample is rendered, tokenized and its image processed once for all of them)."""
    from trainer_lavit import PreprocessingCache

    cache = PreprocessingCache()
    runs = {}
    for number, (name, seed, overrides) in enumerate(plan, 1):
        start = time.time()
        runs[f"{name}-seed{seed}"] = info = train_student(
            args, root, name, student["student_lavit"], dataset["dataset"], paths["val_mmvp"], seed,
            f"{name} seed {seed} ({number}/{len(plan)})", cache=cache, **overrides)
        curve = info["val_curve"]
        log.info("  %s seed %d: %d steps in %.0f s, final loss %.3f, validation %s", name, seed, args.student_steps,
                 time.time() - start, info["final_loss"] or math.nan,
                 " ".join(f"{point['val_accuracy']:.1f}" for point in curve))
    return runs


def stage_students(args, root: Path, student: dict, dataset: dict, paths: dict) -> dict:
    """Naive SFT and LaViT on the same kept samples, the same steps and the same seeds."""
    plan = [(name, seed, overrides) for seed in range(args.seeds)
            for name, overrides in (("naive_sft", {"distill": False}), ("lavit", {}))]
    return {"runs": train_runs(args, root, student, dataset, paths, plan)}


def stage_ablations(args, root: Path, student: dict, dataset: dict, paths: dict) -> dict:
    """Table 3's ablations of LaViT, each with the --seeds seeds of the full method, trained and scored on test like
    it (--ablations; added to a finished run without retraining anything)."""
    from evaluation_lavit import load_mmvp

    plan = [(name, seed, overrides) for name, overrides in ABLATIONS.items() for seed in range(args.seeds)]
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
    """`analysis_lavit.attention_analysis` on the first --analysis-samples test questions: each model's attention while
    it answers (S_focus on the key object's cell, entropy, salient regions), Figure 2 (accuracy against S_focus, for
    the models that err: the student base and both students, seeds pooled), Figure 3 (the perception gap of Naive SFT
    and LaViT, seed 0, against the teacher), Figures 4 and 5."""
    from PIL import Image

    from analysis_lavit import attention_analysis
    from builder_lavit import answer_matches
    from data_lavit import read_visual_cot
    from teacher_lavit import load_qwen2_5_vl

    samples, _ = read_visual_cot(paths["test"])
    samples = samples[: args.analysis_samples]
    images = [Image.open(os.path.join(paths["images"], sample.image)).convert("RGB") for sample in samples]
    rows = args.query_rows  # the text rows the builder read the teacher's gaze from
    loaded = {"teacher": (*load_qwen2_5_vl(teacher["teacher"]), rows),
              "student base": (*load_student_base(models, student), rows)}
    for run, info in students["runs"].items():
        model, processor = load_run(info["path"])
        processor.add_latent_tokens = not run.startswith("naive_sft")  # Naive SFT never saw latent tokens
        loaded[run] = (model, processor, rows)
        if run.startswith("lavit"):
            loaded[f"{run} (latents)"] = (model, processor, "latents")
    pooled = {label: [name for name in loaded if name.startswith(prefix) and not name.endswith("(latents)")]
              for label, prefix in (("student base", "student base"), ("Naive SFT", "naive_sft-seed"),
                                    ("LaViT", "lavit-seed"))}
    answers = [sample.answer for sample in samples]
    analysis = attention_analysis(
        loaded, images, [sample.question for sample in samples], [sample.bbox for sample in samples],
        root / "analysis", references=answers, judge=answer_matches, responses=answers, pooled_lines=pooled,
        gaps={"Naive SFT (seed 0)": ("teacher", "naive_sft-seed0"), "LaViT (seed 0)": ("teacher", "lavit-seed0")},
        shown=["teacher", "student base", "naive_sft-seed0", "lavit-seed0", "lavit-seed0 (latents)"], heatmaps=3,
        thresholds=FOCUS_THRESHOLDS, max_new_tokens=3, batch_size=20)
    return {"figure2": analysis["figure2"], "per_model": analysis["per_model"],
            "perception_gap": analysis["perception_gap"],
            "figures": [f"analysis/{name}" for name in analysis["figures"]]}


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
    import datasets

    datasets.disable_progress_bars()  # the first load of a LaViT-15K folder writes its Arrow copy: not a stage's bar
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
