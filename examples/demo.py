#!/usr/bin/env python
"""LaViT's whole model path offline on a CPU: build a tiny Qwen2.5-VL, convert it, load it back through the Auto
classes with remote code, and answer a question about an image drawn here.

The tiny model has random weights, so its answer is noise; what the demo shows is the machinery a real checkpoint
goes through (latent tokens forced after the generation prompt, the latent tokens' attention over the image, the
concept embedding, the sensory gate). Tested with (2 CPU cores, about 15 s):

    python examples/demo.py --output-dir demo_output

With a real checkpoint on a user's machine, give `--base Qwen/Qwen2.5-VL-3B-Instruct` instead of building one.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

from conversion_lavit import convert_qwen2_5_vl_to_lavit
from testing_lavit import save_tiny_qwen2_5_vl


def draw_scene(size: int = 112) -> Image.Image:
    """A white canvas with a red circle in the top-left 28-pixel cell and a blue square bottom-right."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 4, 24, 24), fill=(220, 30, 30))
    draw.rectangle((size - 24, size - 24, size - 4, size - 4), fill=(30, 30, 220))
    return image


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="demo_output", help="where the checkpoints are written")
    parser.add_argument("--base", default=None, help="a Qwen2.5-VL checkpoint to convert (default: build a tiny one)")
    parser.add_argument("--teacher-hidden-size", type=int, default=5120, help="width of the concept head's output")
    parser.add_argument("--question", default="What color is the circle?", help="the question about the image")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    base = args.base or save_tiny_qwen2_5_vl(os.path.join(args.output_dir, "tiny_qwen2_5_vl"), seed=0)
    print(f"[1/4] base checkpoint: {base}")
    lavit_dir = convert_qwen2_5_vl_to_lavit(base, os.path.join(args.output_dir, "lavit"),
                                            teacher_hidden_size=args.teacher_hidden_size)
    print(f"[2/4] converted to LaViT: {lavit_dir} ({', '.join(sorted(os.listdir(lavit_dir)))})")

    model = AutoModelForImageTextToText.from_pretrained(lavit_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(lavit_dir, trust_remote_code=True)
    print(f"[3/4] loaded offline with remote code: {type(model).__name__}, {type(processor).__name__}, "
          f"sensory gate {float(model.sensory_gate)}")

    image = draw_scene()
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    prompt_tail = processor.decode(inputs["input_ids"][0, -8:])
    with torch.no_grad():
        out = model(**inputs, output_latent_attention=True)
        generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    rows, cols = (int(v) // 2 for v in inputs["image_grid_thw"][0, 1:])
    attention = out.latent_image_attention[0]  # (K, N)
    print("[4/4] question:", args.question)
    print("      prompt ends with:", repr(prompt_tail))
    print("      answer (random weights, so noise):", repr(answer))
    print(f"      image: {rows} x {cols} merged tokens; each latent token's attention over them sums to "
          f"{[round(float(s), 4) for s in attention.sum(-1)]}")
    for k, row in enumerate(attention):
        top = int(row.argmax())
        print(f"      {processor.latent_tokens[k]} looks most at cell (row {top // cols}, col {top % cols}) "
              f"with {float(row[top]):.3f} of its image attention")
    print(f"      concept embedding of the last latent token: width {out.concept_embeds.shape[-1]}, "
          f"norm {float(out.concept_embeds.norm()):.3f}")
    print(f"done in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
