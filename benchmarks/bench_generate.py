#!/usr/bin/env python
"""Generation: LaViT with forced latent tokens against the stock Qwen2.5-VL model on the same weights, the same
prompts and the same number of new tokens (the K extra prefill tokens included): time ratio in one run.

Moderate config (text hidden 512, 8 layers); a batch of 4 prompts with 700 image tokens each; exactly 32 new tokens
(greedy, end-of-turn ignored). Goal: LaViT / stock <= 1.05.

    python benchmarks/bench_generate.py [--write-results] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from common import benchmark_parser, interleaved_times, report
from bench_forward import prepare_checkpoints
from modeling_lavit import LavitForConditionalGeneration
from processing_lavit import LavitProcessor

GOAL = 1.05


def parse_args(argv=None):
    parser = benchmark_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        lavit_dir, stock_dir = prepare_checkpoints(args, args.workdir or tmp)
        dtype = getattr(torch, args.dtype)
        lavit = LavitForConditionalGeneration.from_pretrained(lavit_dir, dtype=dtype).to(args.device).eval()
        stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(stock_dir, dtype=dtype).to(args.device).eval()
        processor = LavitProcessor.from_pretrained(lavit_dir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (700, 784, 3), dtype=np.uint8)) for _ in range(args.batch)]
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"What is in picture {i}?"}]}]
                for i in range(args.batch)]
    processor.tokenizer.padding_side = "left"
    batches = {}
    for name, latents in (("lavit", True), ("stock", False)):
        prompts = [processor.apply_chat_template(m, add_generation_prompt=True, add_latent_tokens=latents) for m in messages]
        batches[name] = {k: v.to(args.device) for k, v in
                         processor(text=prompts, images=images, return_tensors="pt", padding=True).items()}
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def run(model, batch):
        def step():
            with torch.inference_mode():
                out = model.generate(**batch, **settings)
            assert out.shape[1] == batch["input_ids"].shape[1] + args.new_tokens
        return step

    steps = {"stock": run(stock, batches["stock"]), "lavit": run(lavit, batches["lavit"])}
    times = interleaved_times(steps, args.repeats, 1, args.device)
    ratio = times["lavit"] / times["stock"]
    lengths = {name: int(batch["input_ids"].shape[1]) for name, batch in batches.items()}
    lines = [
        f"Config: text hidden {args.hidden}, {args.layers} layers, dtype {args.dtype}; a batch of {args.batch} prompts "
        f"(stock {lengths['stock']} tokens, LaViT {lengths['lavit']} with the latents; 700 image tokens each), exactly "
        f"{args.new_tokens} new tokens, greedy with a KV cache. Median of {args.repeats} interleaved runs.",
        "",
        "| model | seconds | ratio |",
        "|---|---|---|",
        f"| stock Qwen2.5-VL | {times['stock']:.3f} | 1.000 |",
        f"| LaViT, forced latents | {times['lavit']:.3f} | {ratio:.3f} |",
        "",
        f"Goal LaViT / stock <= {GOAL}: **{'pass' if ratio <= GOAL else 'FAIL'}**.",
    ]
    report("bench_generate", "bench_generate: generation with forced latents vs stock", "\n".join(lines),
           args.write_results)


if __name__ == "__main__":
    main()
