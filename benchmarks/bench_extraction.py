#!/usr/bin/env python
"""Teacher-signal extraction: our one-pass side channel against the official method and against a plain forward.

On the same random-weight Qwen2.5-VL teacher (a moderate config) and the same inputs, at sequence lengths of about
500, 1000 and 2000 tokens (about 70% image tokens, a 16-token response):

* ours: one sdpa forward of the base model with the attention side channel (gaze of the response rows, averaged
  over layers and heads) and both V_sem poolings from its last hidden states (`extract_teacher_signals`);
* official: eager attention with `output_attentions=True` (every L x L matrix), then a second forward with
  `output_hidden_states=True` for V_sem;
* floor: a plain sdpa forward of the base model that extracts nothing.

Also the bytes on disk per sample: our parquet columns (gaze float32, two V_sem float16) against the official layout
(the N x D float32 feature tensor in a file of its own plus a JSON list of attention floats), at the benchmark's
width and at the 32B teacher's 5120.

Goals: ours within 1.15x of the floor in time; at L ~ 1000 at least 1.5x faster and 2x lighter in peak memory than
the official method, the gap growing with L; at least 100x fewer bytes per sample.

    python benchmarks/bench_extraction.py [--write-results] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import copy
import json
import os
import tempfile

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from common import benchmark_parser, interleaved_times, report, steady_peak
from data_lavit import write_parquet_atomic
from modeling_lavit import enable_lavit_attention
from processing_lavit import LavitBaseProcessor
from teacher_lavit import extract_teacher_signals, teacher_forced_inputs
from testing_lavit import tiny_image_processor, tiny_qwen2_5_vl_config, train_tiny_tokenizer

# (image width, height in pixels, question words): ~70% image tokens of about 500, 1000 and 2000 tokens
LENGTHS = {500: (560, 560, 60), 1000: (784, 700, 120), 2000: (1120, 980, 250)}


def parse_args(argv=None):
    parser = benchmark_parser(__doc__.split("\n\n")[0], heads=False, workdir=False)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=sorted(LENGTHS), choices=sorted(LENGTHS),
                        help="approximate sequence lengths (each one an image size and question length)")
    return parser.parse_args(argv)


def build_teacher(args):
    tokenizer = train_tiny_tokenizer()
    config = tiny_qwen2_5_vl_config(tokenizer, text_hidden_size=args.hidden, num_hidden_layers=args.layers,
                                    num_attention_heads=8, num_key_value_heads=2, intermediate_size=int(args.hidden * 2.6875),
                                    vision_hidden_size=128, vision_depth=2, vision_heads=4, vocab_size=16384)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    processor = LavitBaseProcessor(tiny_image_processor(max_tokens=1600), tokenizer)
    return model, processor


def inputs_for(processor, length):
    width, height, words = LENGTHS[length]
    rng = np.random.default_rng(length)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    vocabulary = "what is the color of the small object left of the large red circle near the top".split()
    question = " ".join(rng.choice(vocabulary, words))
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    response = processor.tokenizer("the object on the left is red and small, near the circle").input_ids + [end]
    return [image], [question], [response]


def official_signals(model, inputs, response_mask):
    """The official method: eager attention with every L x L matrix returned, then a second forward for V_sem."""
    ids = inputs["input_ids"]
    image = (ids[0] == model.config.image_token_id).nonzero()[:, 0]
    rows = response_mask[0].nonzero()[:, 0]
    out = model(**inputs, output_attentions=True)
    gaze = torch.stack([a[0][:, rows][:, :, image].float().mean(dim=(0, 1)) for a in out.attentions]).mean(0)
    del out
    hidden = model(**inputs, output_hidden_states=True).hidden_states[-1][0, image].float()  # (N, D)
    return gaze, hidden, hidden.mean(0)


def bytes_per_sample(n_tokens: int, width: int, workdir: str) -> tuple[float, float]:
    """(ours, official) bytes on disk for one sample's teacher signals, measured from written files."""
    rng = np.random.default_rng(0)
    samples = 8
    rows = []
    for i in range(samples):
        rows.append({
            "id": f"s/{i}", "source": "s", "image": None, "image_size": [1, 1], "question": "", "answer": "",
            "teacher_response": "", "text_only_response": "", "bbox": None,
            "gaze": rng.random(n_tokens, dtype=np.float32).tolist(), "gaze_grid": [1, n_tokens],
            "v_sem_mean": rng.standard_normal(width).astype(np.float16).tolist(),
            "v_sem_gaze": rng.standard_normal(width).astype(np.float16).tolist(),
            "s_focus": 0.5, "correct": True, "text_only_correct": False, "aligned": True, "kept": True,
            "reject_reason": None, "teacher_model": "t",
        })
    ours_path = os.path.join(workdir, f"ours-{n_tokens}-{width}.parquet")
    write_parquet_atomic(rows, ours_path)
    ours = os.path.getsize(ours_path) / samples
    from safetensors.torch import save_file

    official = 0
    for i in range(samples):
        tensor_path = os.path.join(workdir, f"official-{i}.safetensors")
        save_file({"v_top": torch.from_numpy(rng.standard_normal((n_tokens, width)).astype(np.float32))}, tensor_path)
        json_path = os.path.join(workdir, f"official-{i}.json")
        with open(json_path, "w") as f:
            json.dump(rng.random(n_tokens).tolist(), f)
        official += os.path.getsize(tensor_path) + os.path.getsize(json_path)
    return ours, official / samples


def main(argv=None):
    args = parse_args(argv)
    model, processor = build_teacher(args)
    enable_lavit_attention(model)
    eager = Qwen2_5_VLForConditionalGeneration(copy.deepcopy(model.config)).to(device=args.device, dtype=model.dtype)
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    eager.eval()
    rows = []
    for length in args.lengths:
        images, questions, responses = inputs_for(processor, length)
        inputs, response_mask = teacher_forced_inputs(processor, images, questions, responses)
        inputs = {k: v.to(args.device) for k, v in inputs.items()}
        tokens = int(inputs["input_ids"].shape[1])
        n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())

        def ours():
            extract_teacher_signals(model, processor, images, questions, responses)

        def official():
            with torch.inference_mode():
                official_signals(eager, inputs, response_mask)

        def floor():
            with torch.inference_mode():
                model.model(**inputs, use_cache=False)

        steps = {"floor": floor, "ours": ours, "official": official}
        times = interleaved_times(steps, args.repeats, 1, args.device)
        memory = {name: steady_peak(step, args.device, warmup=1, repeats=2) for name, step in steps.items()}
        rows.append((length, tokens, n_image, times, memory))

    with tempfile.TemporaryDirectory() as workdir:
        sizes = [(n, d, *bytes_per_sample(n, d, workdir)) for n, d in ((700, args.hidden), (700, 5120))]

    lines = [
        f"Teacher: random-weight Qwen2.5-VL, text hidden {args.hidden}, {args.layers} layers, 8 heads / 2 KV heads, "
        f"dtype {args.dtype}; one sample, a 16-token response as the query rows. Median of {args.repeats} interleaved "
        "runs; peak memory: the most tensor memory one call adds (least of 2 after a warm-up).",
        "",
        "| L (image tokens) | floor s | ours s | official s | ours / floor time | official / ours time | "
        "floor MiB | ours MiB | official MiB | ours / floor memory | official / ours memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for length, tokens, n_image, t, m in rows:
        lines.append(
            f"| {tokens} ({n_image}) | {t['floor']:.3f} | {t['ours']:.3f} | {t['official']:.3f} | "
            f"{t['ours'] / t['floor']:.3f} | {t['official'] / t['ours']:.2f} | {m['floor'] / 2**20:.0f} | "
            f"{m['ours'] / 2**20:.0f} | {m['official'] / 2**20:.0f} | {m['ours'] / m['floor']:.3f} | "
            f"{m['official'] / m['ours']:.2f} |"
        )
    lines += ["", "| image tokens x width | ours bytes/sample | official bytes/sample | official / ours |", "|---|---|---|---|"]
    lines += [f"| {n} x {d} | {o:,.0f} | {f:,.0f} | {f / o:.0f} |" for n, d, o, f in sizes]
    near = min(rows, key=lambda r: abs(r[1] - 1000))
    verdicts = [
        ("ours within 1.15x of the floor in time at every L", all(r[3]["ours"] / r[3]["floor"] <= 1.15 for r in rows)),
        ("at L ~ 1000: official / ours time >= 1.5", near[3]["official"] / near[3]["ours"] >= 1.5),
        ("at L ~ 1000: official / ours memory >= 2", near[4]["official"] / near[4]["ours"] >= 2),
        ("the gaps grow with L", all(b[3]["official"] / b[3]["ours"] >= a[3]["official"] / a[3]["ours"] * 0.95 and
                                     b[4]["official"] / b[4]["ours"] > a[4]["official"] / a[4]["ours"]
                                     for a, b in zip(rows, rows[1:]))),
        (">= 100x fewer bytes per sample", all(f / o >= 100 for _, _, o, f in sizes)),
    ]
    lines += ["", "| goal | result |", "|---|---|"] + [f"| {g} | {'pass' if ok else 'FAIL'} |" for g, ok in verdicts]
    report("bench_extraction", "bench_extraction: teacher signals, one pass vs the official method", "\n".join(lines), args.write_results)


if __name__ == "__main__":
    main()
