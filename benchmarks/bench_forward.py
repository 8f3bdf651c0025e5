#!/usr/bin/env python
"""Forward + backward of LaViT (sensory gate < 1, latent attention and both distillation losses) against the stock
Qwen2.5-VL model on the same weights and batch: time and peak-memory ratios, measured in one run.

Moderate config (issue 2): text hidden 512, 8 layers (8 heads over 2 key/value heads), about 1000 tokens of which
700 are image tokens (a 784 x 700 image: 28 x 25 merged cells), vision tower frozen as in training.
Goal: LaViT / stock <= 1.10 in time and in peak memory.

    python benchmarks/bench_forward.py                  # CPU, prints the table
    python benchmarks/bench_forward.py --write-results  # also updates benchmarks/RESULTS.md
    python benchmarks/bench_forward.py --device cuda --dtype bfloat16 --write-results
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from common import benchmark_parser, interleaved_times, report, steady_peak
from conversion_lavit import convert_qwen2_5_vl_to_lavit, export_to_qwen2_5_vl
from modeling_lavit import LavitForConditionalGeneration
from processing_lavit import LavitProcessor
from testing_lavit import tiny_image_processor, tiny_qwen2_5_vl_config, train_tiny_tokenizer

GOAL = 1.10


def parse_args(argv=None):
    parser = benchmark_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--question-tokens", type=int, default=280, help="about this many question tokens")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gate", type=float, default=0.5, help="the sensory gate gamma of the LaViT step")
    return parser.parse_args(argv)


def prepare_checkpoints(args, workdir: str) -> tuple[str, str]:
    """A random-weight LaViT checkpoint of the moderate config and its stock export (identical weights)."""
    lavit_dir, stock_dir = os.path.join(workdir, "lavit"), os.path.join(workdir, "stock")
    if os.path.exists(os.path.join(stock_dir, "config.json")):
        return lavit_dir, stock_dir
    tokenizer = train_tiny_tokenizer()
    config = tiny_qwen2_5_vl_config(
        tokenizer, text_hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=int(args.hidden * 2.6875), vision_hidden_size=128,
        vision_depth=2, vision_heads=4, vocab_size=16384,
    )
    torch.manual_seed(0)
    base = Qwen2_5_VLForConditionalGeneration(config)
    convert_qwen2_5_vl_to_lavit(base, lavit_dir, tokenizer=tokenizer, image_processor=tiny_image_processor(max_tokens=1280),
                                teacher_hidden_size=1024)
    export_to_qwen2_5_vl(lavit_dir, stock_dir)
    return lavit_dir, stock_dir


def make_batch(processor: LavitProcessor, batch_size: int, question_tokens: int):
    rng = np.random.default_rng(0)
    words = "what is the color of the small object left of the large red circle near the top".split()
    prompts, answers, images = [], [], []
    for b in range(batch_size):
        n_words = int(question_tokens * (1.0 - 0.2 * b) / 2.2)
        question = " ".join(rng.choice(words, n_words))
        images.append(Image.fromarray(rng.integers(0, 256, (700, 784, 3), dtype=np.uint8)))  # 25 x 28 cells
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        answers.append("the object is red" + processor.tokenizer.eos_token)
    processor.tokenizer.padding_side = "right"
    texts = [p + a for p, a in zip(prompts, answers)]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    labels = inputs["input_ids"].clone()
    for b, prompt in enumerate(prompts):
        n_prompt = len(processor(text=[prompt], images=[images[b]])["input_ids"][0]) - 4  # the latents are labelled
        labels[b, :n_prompt] = -100
    labels[inputs["attention_mask"] == 0] = -100
    return inputs, labels


def build(args, which: str):
    lavit_dir, stock_dir = prepare_checkpoints(args, args.workdir)
    dtype = getattr(torch, args.dtype)
    processor = LavitProcessor.from_pretrained(lavit_dir)
    if which == "lavit":
        model = LavitForConditionalGeneration.from_pretrained(lavit_dir, dtype=dtype)
        model.set_sensory_gate(args.gate)
    else:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(stock_dir, dtype=dtype)
    model.to(args.device).train()
    model.model.visual.requires_grad_(False)  # frozen vision tower, as in the paper's recipe
    inputs, labels = make_batch(processor, args.batch_size, args.question_tokens)
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    labels = labels.to(args.device)
    config = model.config
    n_image = int((inputs["input_ids"][0] == config.image_token_id).sum())
    torch.manual_seed(1)
    trajectory = torch.rand(args.batch_size, n_image, device=args.device).softmax(-1)
    semantics = torch.randn(args.batch_size, getattr(config, "teacher_hidden_size", 1), device=args.device)

    def step():
        model.zero_grad(set_to_none=True)
        if which == "lavit":
            out = model(**inputs, labels=labels, teacher_trajectory=trajectory, teacher_semantics=semantics)
            loss = out.loss + 0.3 * (out.concept_loss + out.trajectory_loss)
            del out  # as the stock step, keep only the loss through the backward (not the logits)
        else:
            loss = model(**inputs, labels=labels).loss
        loss.backward()

    return step, inputs


def main(argv=None):
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = args.workdir or tmp
        prepare_checkpoints(args, args.workdir)
        for batch_size in (1, 2):
            args.batch_size = batch_size
            steps = {}
            for which in ("stock", "lavit"):
                steps[which], inputs = build(args, which)
            lengths = inputs["attention_mask"].sum(1).tolist()
            times = interleaved_times(steps, args.repeats, args.warmup, args.device)
            memory = {which: steady_peak(step, args.device) for which, step in steps.items()}
            rows.append((batch_size, lengths, times, memory))
            del steps

    lines = [
        f"Config: text hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, "
        f"700 image tokens per sample, dtype {args.dtype}, gate gamma = {args.gate}, latent attention over all "
        "layers, both distillation losses; vision tower frozen. Median of "
        f"{args.repeats} interleaved forward+backward steps after {args.warmup} warm-up; peak memory: the most tensor "
        "memory one steady-state step adds, activations and gradients (CPU: the profiler's allocation timeline; CUDA: "
        "the allocator's peak; least of 3 after 2 warm-up steps). Batch 2 holds two question lengths, so both models "
        "get a padding mask.",
        "",
        "| batch (tokens per sample) | stock s | LaViT s | time ratio | stock peak MiB | LaViT peak MiB | memory ratio | goal <= 1.10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch_size, lengths, times, memory in rows:
        time_ratio = times["lavit"] / times["stock"]
        memory_ratio = memory["lavit"] / memory["stock"]
        ok = time_ratio <= GOAL and memory_ratio <= GOAL
        lines.append(
            f"| {batch_size} ({', '.join(str(int(n)) for n in lengths)}) | {times['stock']:.3f} | {times['lavit']:.3f} | "
            f"{time_ratio:.3f} | {memory['stock'] / 2**20:.0f} | {memory['lavit'] / 2**20:.0f} | {memory_ratio:.3f} | "
            f"{'pass' if ok else 'FAIL'} |"
        )
    report("bench_forward", "bench_forward: LaViT forward+backward vs stock Qwen2.5-VL", "\n".join(lines), args.write_results)


if __name__ == "__main__":
    main()
