#!/usr/bin/env python
"""Export a trained LaViT checkpoint as a stock Qwen2.5-VL checkpoint (no remote code, no concept head).

The latent tokens stay in the tokenizer and the chat template keeps forcing them after the generation prompt, so
vLLM and SGLang serve the export unpatched. Tested with (CPU, a tiny converted checkpoint):

    python examples/export_qwen2_5_vl.py --lavit-dir lavit-tiny --output-dir lavit-tiny-stock
"""

from __future__ import annotations

import argparse
import logging

from cli_lavit import output_folder
from conversion_lavit import export_to_qwen2_5_vl


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lavit-dir", required=True, help="a LaViT checkpoint (converted or trained)")
    parser.add_argument("--output-dir", type=output_folder, required=True,
                        help="where to write the stock Qwen2.5-VL checkpoint")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = export_to_qwen2_5_vl(args.lavit_dir, args.output_dir)
    logging.info("Stock Qwen2.5-VL checkpoint written to %s", path)


if __name__ == "__main__":
    main()
