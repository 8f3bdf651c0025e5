#!/usr/bin/env python
"""Write the synthetic grounding task (`synthetic_lavit`) to disk: Visual-CoT-format training records with their
images, and MMVP-format validation and test sets.

Tested with (CPU, a few seconds):

    python examples/synthetic_grounding.py --output-dir synthetic --train 2000 --val 200 --test 200
"""

from __future__ import annotations

import argparse
import json

from cli_lavit import output_folder
from evaluation_lavit import DEFAULT_INSTRUCTION
from synthetic_lavit import QUESTION_TYPES, SHAPES, write_task


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=output_folder, required=True)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--question-type", choices=QUESTION_TYPES, default="size")
    parser.add_argument("--image-size", type=int, default=112, help="a multiple of 28 (112: a 4 x 4 token grid)")
    parser.add_argument("--objects", type=int, default=4, help="objects per image, one per cell")
    parser.add_argument("--shuffle-options", action="store_true", help="shuffle the option order per question")
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=None,
                        help="shapes to draw (default: squares for the size question, every shape otherwise)")
    parser.add_argument("--jitter", type=int, default=2,
                        help="pixels an object may move from its cell's centre (-1: anywhere in the cell)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    paths = write_task(args.output_dir, args.train, args.val, args.test, args.seed, args.question_type,
                       args.image_size, args.objects, args.shuffle_options, args.shapes,
                       None if args.jitter < 0 else args.jitter)
    print(json.dumps(paths, indent=2))
    print(f"instruction: {DEFAULT_INSTRUCTION!r}")


if __name__ == "__main__":
    main()
