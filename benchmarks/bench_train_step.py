#!/usr/bin/env python
"""One training step of LaViT (sensory gate < 1, both distillation losses) against one Naive-SFT step on the same
model and rows, through `LavitSFTTrainer.training_step`: time and peak-memory ratios in one run. Also an
implementation in the official style on the same weights and batch: a 4D additive mask built per sample in Python
(causal, padding and the gate), eager attention with `output_attentions=True` for the latent tokens' attention and
`output_hidden_states=True` for every layer.

Moderate config: text hidden 512, 8 layers, a batch of 2 samples of about 1000 tokens (700 image tokens each).
Goal: LaViT / Naive SFT <= 1.15 in time and in peak memory.

    python benchmarks/bench_train_step.py [--write-results] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
import torch
from PIL import Image

from common import benchmark_parser, interleaved_times, report, steady_peak
from bench_forward import prepare_checkpoints
from modeling_lavit import LavitForConditionalGeneration, concept_loss, trajectory_loss
from processing_lavit import LavitProcessor
from trainer_lavit import LavitSFTConfig, LavitSFTTrainer

GOAL = 1.15


def parse_args(argv=None):
    parser = benchmark_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--question-words", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gate", type=float, default=0.5)
    return parser.parse_args(argv)


def rows(n: int, words: int, width: int):
    """LaViT-15K rows with 784 x 700 images (25 x 28 = 700 merged tokens) and long questions."""
    rng = np.random.default_rng(0)
    vocabulary = "what is the color of the small object left of the large red circle near the top".split()
    out = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (700, 784, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append({
            "id": f"bench/{i}", "image": Image.open(io.BytesIO(buffer.getvalue())),
            "question": " ".join(rng.choice(vocabulary, words - 10 * i)), "answer": "the object is red",
            "gaze": rng.random(700).astype(np.float32).tolist(), "gaze_grid": [25, 28],
            "v_sem_gaze": rng.standard_normal(width).astype(np.float32).tolist(),
            "v_sem_mean": rng.standard_normal(width).astype(np.float32).tolist(),
        })
    return out


def official_style_step(model, batch, gamma, latent_ids, image_token_id, coef=0.3):
    """The research code's way: a per-sample Python loop builds the full 4D mask (causal, padding, gate), eager
    attention returns every L x L matrix, and every layer's hidden states are kept."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    batch_size, length = ids.shape
    position_ids, _ = model.model.get_rope_index(ids, image_grid_thw=batch["image_grid_thw"], attention_mask=attention,
                                                 mm_token_type_ids=batch["mm_token_type_ids"])
    masks = []
    minimum = torch.finfo(torch.float32).min
    for b in range(batch_size):  # one sample, then one query row at a time, as the research code does
        mask = torch.full((length, length), minimum)
        image_positions = (ids[b] == image_token_id).nonzero()[:, 0]
        latent_positions = {int((ids[b] == t).nonzero()[0, 0]) for t in latent_ids}
        for i in range(length):
            mask[i, : i + 1] = torch.where(attention[b, : i + 1].bool(), 0.0, minimum)
            gated = i > int(image_positions[0]) and i not in latent_positions and ids[b, i] != image_token_id
            if gated and attention[b, i]:
                mask[i, image_positions[image_positions <= i]] = float(np.log(gamma))
        masks.append(mask)
    mask = torch.stack(masks)[:, None].to(batch["pixel_values"].device)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids, pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"], labels=batch["labels"],
        output_attentions=True, output_hidden_states=True, output_latent_states=False, use_cache=False,
    )
    students = []
    for b in range(batch_size):
        image = (ids[b] == image_token_id).nonzero()[:, 0]
        latents = torch.stack([(ids[b] == t).nonzero()[0, 0] for t in latent_ids])
        a = torch.stack([layer[b][:, latents][:, :, image].mean(0) for layer in out.attentions]).mean(0)  # (K, N)
        students.append(a / a.sum(-1, keepdim=True))
    student = torch.stack(students)
    last = torch.stack([(ids[b] == latent_ids[-1]).nonzero()[0, 0] for b in range(batch_size)])
    hidden = out.hidden_states[-1][torch.arange(batch_size), last]
    loss = out.loss + coef * concept_loss(model.concept_head(hidden), batch["teacher_semantics"])
    loss = loss + coef * trajectory_loss(batch["teacher_trajectory"][:, : student.shape[-1]], student)
    loss.backward()


def main(argv=None):
    args = parse_args(argv)
    args.batch_size = 1
    args.question_tokens = 280
    with tempfile.TemporaryDirectory() as tmp:
        lavit_dir, _ = prepare_checkpoints(args, args.workdir or tmp)
        dtype = getattr(torch, args.dtype)
        model = LavitForConditionalGeneration.from_pretrained(lavit_dir, dtype=dtype).to(args.device)
        processor = LavitProcessor.from_pretrained(lavit_dir)
        data = rows(2, args.question_words, model.config.teacher_hidden_size)
        trainers, batches = {}, {}
        for name, distill in (("lavit", True), ("naive_sft", False)):
            config = LavitSFTConfig(os.path.join(tmp, name), use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16",
                                    activation_checkpointing=False, report_to="none", max_steps=1)
            trainer = LavitSFTTrainer(model=model, args=config, train_dataset=_as_dataset(data),
                                      processing_class=processor)
            trainer.current_gradient_accumulation_steps = 1  # set by the train loop, which this bypasses
            trainers[name] = trainer
            batches[name] = trainer.data_collator(data)
        tokens = batches["lavit"]["attention_mask"].sum(1).tolist()
        model.train()

        def lavit_step():
            model.set_sensory_gate(args.gate)
            model.zero_grad(set_to_none=True)
            trainers["lavit"].training_step(model, dict(batches["lavit"]))

        def naive_step():
            model.set_sensory_gate(1.0)
            model.zero_grad(set_to_none=True)
            trainers["naive_sft"].training_step(model, dict(batches["naive_sft"]))

        eager = LavitForConditionalGeneration.from_pretrained(lavit_dir, dtype=dtype, attn_implementation="eager")
        eager.to(args.device).train()
        eager.model.visual.requires_grad_(False)
        official_batch = {k: v.to(args.device) for k, v in batches["lavit"].items()}

        def official_step():
            eager.zero_grad(set_to_none=True)
            official_style_step(eager, official_batch, args.gate, model.config.latent_token_ids,
                                model.config.image_token_id)

        steps = {"naive_sft": naive_step, "lavit": lavit_step, "official": official_step}
        times = interleaved_times(steps, args.repeats, 1, args.device)
        memory = {name: steady_peak(step, args.device, warmup=1, repeats=2) for name, step in steps.items()}

    time_ratio = times["lavit"] / times["naive_sft"]
    memory_ratio = memory["lavit"] / memory["naive_sft"]
    lines = [
        f"Config: text hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, "
        f"dtype {args.dtype}; a batch of 2 samples ({', '.join(str(int(t)) for t in tokens)} tokens, 700 image tokens "
        f"each); LaViT at gate {args.gate} with both losses; vision tower frozen; no activation checkpointing. Median "
        f"of {args.repeats} interleaved `training_step`s (forward + backward); peak memory: the most tensor memory a "
        "step adds (least of 2 after a warm-up).",
        "",
        "| step | seconds | peak MiB | time / Naive SFT | memory / Naive SFT |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("naive_sft", "Naive SFT"), ("lavit", "LaViT (ours)"), ("official", "official style")):
        lines.append(f"| {label} | {times[name]:.3f} | {memory[name] / 2**20:.0f} | "
                     f"{times[name] / times['naive_sft']:.3f} | {memory[name] / memory['naive_sft']:.3f} |")
    ok = time_ratio <= GOAL and memory_ratio <= GOAL
    lines += ["", f"Goal LaViT / Naive SFT <= {GOAL} in time and memory: **{'pass' if ok else 'FAIL'}** "
              f"({time_ratio:.3f}, {memory_ratio:.3f}). The official style costs "
              f"{times['official'] / times['lavit']:.1f}x the time and {memory['official'] / memory['lavit']:.1f}x "
              "the memory of ours."]
    report("bench_train_step", "bench_train_step: a LaViT step vs a Naive-SFT step", "\n".join(lines),
           args.write_results)


def _as_dataset(data):
    from datasets import Dataset

    return Dataset.from_list([{k: v for k, v in r.items() if k != "image"} | {"image": None} for r in data])


if __name__ == "__main__":
    main()
