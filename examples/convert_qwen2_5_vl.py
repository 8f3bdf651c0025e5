#!/usr/bin/env python
"""Convert a Qwen2.5-VL checkpoint into a LaViT checkpoint (latent tokens, concept head, remote code).

Tested with (CPU, a tiny checkpoint made by testing_lavit.save_tiny_qwen2_5_vl):

    python examples/convert_qwen2_5_vl.py --base /path/to/tiny_qwen2_5_vl --output-dir lavit-tiny --teacher-hidden-size 48

On a user's machine, with the paper's student and teacher widths:

    python examples/convert_qwen2_5_vl.py --base Qwen/Qwen2.5-VL-3B-Instruct --output-dir lavit-3b \
        --num-latent-tokens 4 --teacher-hidden-size 5120

The result loads offline with AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).
"""

from __future__ import annotations

import argparse
import logging

from cli_lavit import output_folder, positive_int
from configuration_lavit import parse_latent_layers
from conversion_lavit import convert_qwen2_5_vl_to_lavit


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="hub id or local path of a Qwen2.5-VL checkpoint")
    parser.add_argument("--output-dir", type=output_folder, required=True,
                        help="where to write the LaViT checkpoint")
    parser.add_argument("--num-latent-tokens", type=positive_int, default=4, help="K, the number of latent tokens (paper: 4)")
    parser.add_argument("--teacher-hidden-size", type=positive_int, default=5120,
                        help="width of the teacher's visual semantics (Qwen2.5-VL-32B: 5120, 7B: 3584)")
    parser.add_argument("--latent-token-template", default="<v-trace{index}>", help="spelling of the latent tokens")
    parser.add_argument("--concept-head-hidden-size", type=positive_int, default=None,
                        help="hidden width of the concept head (default: the text hidden size)")
    parser.add_argument("--gate-scope", choices=["after_image", "response"], default="after_image",
                        help="which query rows the sensory gate restrains (see LavitConfig)")
    parser.add_argument("--latent-attention-layers", type=parse_latent_layers, default="all",
                        help="the text layers the latent tokens' image attention (L_traj) is read from: all (the "
                             "paper), last_half, last, last_<n>, or comma-separated indices (see LavitConfig)")
    parser.add_argument("--dtype", default="auto", help="dtype to load the base in: auto, bfloat16, float32, ...")
    parser.add_argument("--seed", type=int, default=0, help="seed of the concept head's initialisation")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = convert_qwen2_5_vl_to_lavit(
        args.base,
        args.output_dir,
        num_latent_tokens=args.num_latent_tokens,
        teacher_hidden_size=args.teacher_hidden_size,
        latent_token_template=args.latent_token_template,
        concept_head_hidden_size=args.concept_head_hidden_size,
        gate_scope=args.gate_scope,
        latent_attention_layers=args.latent_attention_layers,
        dtype=args.dtype,
        seed=args.seed,
    )
    logging.info("LaViT checkpoint written to %s", path)


if __name__ == "__main__":
    main()
