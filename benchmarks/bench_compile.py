#!/usr/bin/env python
"""torch.compile of the inference forward: LaViT compiled vs eager, and LaViT compiled vs stock Qwen2.5-VL compiled,
on the same weights and prompt, time ratios measured in one run.

Moderate config (text hidden 512, 8 layers). The inference forward with the gate open and nothing latent requested
(the prompt holds the K latent tokens) is compiled with `fullgraph=True` and inductor. The prompt is text only: the
stock vision tower's window index is data-dependent, so neither class compiles an image prompt into one graph.
Goals: LaViT compiled / LaViT eager < 1 (compiling helps) and LaViT compiled / stock compiled <= 1.05.

    python benchmarks/bench_compile.py [--write-results] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import tempfile
import time

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from common import benchmark_parser, interleaved_times, report
from bench_forward import prepare_checkpoints
from modeling_lavit import LavitForConditionalGeneration
from processing_lavit import LavitProcessor

GOAL_VS_STOCK = 1.05


def parse_args(argv=None):
    parser = benchmark_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--words", type=int, default=400, help="question words per sample")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default="inductor")
    return parser.parse_args(argv)


def text_prompts(processor: LavitProcessor, batch: int, words: int, device: str) -> dict:
    """Chat prompts of `words` question words, ending with the generation prompt and the K latent tokens."""
    vocabulary = "what is the color of the small object left of the large red circle near the top".split()
    texts = []
    for b in range(batch):
        question = " ".join(vocabulary[(i + b) % len(vocabulary)] for i in range(words))
        messages = [{"role": "user", "content": [{"type": "text", "text": question}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=texts, return_tensors="pt", padding=True)
    return {k: inputs[k].to(device) for k in ("input_ids", "attention_mask")}


def main(argv=None):
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        lavit_dir, stock_dir = prepare_checkpoints(args, args.workdir or tmp)
        lavit = LavitForConditionalGeneration.from_pretrained(lavit_dir, dtype=dtype).to(args.device).eval()
        stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(stock_dir, dtype=dtype).to(args.device).eval()
        processor = LavitProcessor.from_pretrained(lavit_dir)
    inputs = text_prompts(processor, args.batch, args.words, args.device)
    models = {
        "stock eager": stock,
        "LaViT eager": lavit,
        "stock compiled": torch.compile(stock, fullgraph=True, backend=args.backend),
        "LaViT compiled": torch.compile(lavit, fullgraph=True, backend=args.backend),
    }
    logits, compile_seconds = {}, {}
    with torch.no_grad():
        for name, model in models.items():  # the first call of a compiled model traces and compiles it
            start = time.perf_counter()
            logits[name] = model(**inputs).logits.float()
            compile_seconds[name] = time.perf_counter() - start
        steps = {name: (lambda m=model: m(**inputs)) for name, model in models.items()}
        times = interleaved_times(steps, args.repeats, args.warmup, args.device)
    reference = logits["LaViT eager"]
    scale = reference.abs().max().item()
    lines = [
        f"Config: text hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, "
        f"dtype {args.dtype}; a batch of {args.batch} text prompts of {inputs['input_ids'].shape[1]} tokens "
        f"(left-padded, each ending with the K latent tokens); inference forward, gate open, nothing latent requested; "
        f"torch.compile(fullgraph=True, backend={args.backend!r}). Median of {args.repeats} interleaved forwards after "
        f"{args.warmup} warm-up; first call: trace + compile + run (LaViT's compile, second, finds the kernels of the "
        "same graph in inductor's cache).",
        "",
        "| model | first call s | forward s | max abs logit diff vs LaViT eager |",
        "|---|---|---|---|",
    ]
    for name in models:
        diff = (logits[name] - reference).abs().max().item()
        lines.append(f"| {name} | {compile_seconds[name]:.1f} | {times[name]:.4f} | {diff:.2e} (logits up to {scale:.2f}) |")
    compiled_vs_eager = times["LaViT compiled"] / times["LaViT eager"]
    vs_stock = times["LaViT compiled"] / times["stock compiled"]
    eager_vs_stock = times["LaViT eager"] / times["stock eager"]
    lines += [
        "",
        "| ratio | value | goal |",
        "|---|---|---|",
        f"| LaViT compiled / LaViT eager | {compiled_vs_eager:.3f} | < 1: {'pass' if compiled_vs_eager < 1 else 'FAIL'} |",
        f"| LaViT compiled / stock compiled | {vs_stock:.3f} | <= {GOAL_VS_STOCK}: "
        f"{'pass' if vs_stock <= GOAL_VS_STOCK else 'FAIL'} |",
        f"| LaViT eager / stock eager | {eager_vs_stock:.3f} | (for reference) |",
    ]
    report("bench_compile", "bench_compile: the inference forward compiled vs eager, LaViT vs stock", "\n".join(lines),
           args.write_results)


if __name__ == "__main__":
    main()
