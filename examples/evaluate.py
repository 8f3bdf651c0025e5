#!/usr/bin/env python
"""Evaluate a LaViT checkpoint (or a stock Qwen2.5-VL one) on MMVP, V* attributes, BLINK and MMStar from local
files, in one or more latent modes, and write predictions, a Table-1 report (markdown and JSON).

Tested with (CPU, a tiny model and benchmark files generated in their real schemas, see tests/test_evaluation.py):

    python examples/evaluate.py --model lavit-tiny --mmvp-dir MMVP --vstar-dir vstar_bench --blink-dir BLINK \
        --mmstar-path MMStar/mmstar.parquet --modes forced none masked --output-dir eval --batch-size 4

A stock baseline through the same harness: --model Qwen/Qwen2.5-VL-3B-Instruct --stock (mode `none`); the
checkpoint's config.json decides, before anything is loaded, whether --stock fits it.
A killed run started again with the same arguments resumes each predictions file where it stopped. The files are
keyed on the model's content as well as its path: after new weights were saved at the same path, a run into the same
--output-dir is refused (the old predictions would be scored as the new model's); delete those files or choose a new
--output-dir. Counts (--limit, --batch-size, --max-new-tokens) must be positive; a bad one exits before any loading.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from cli_lavit import output_folder, positive_int
from evaluation_lavit import BLINK_PAPER_TASKS, BLINK_TASKS, LATENT_MODES, check_checkpoint, evaluate, load_blink
from evaluation_lavit import load_mmstar, load_mmvp, load_vstar, model_fingerprint, render_report, score


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="LaViT checkpoint (or stock Qwen2.5-VL with --stock)")
    parser.add_argument("--stock", action="store_true", help="the model is a stock Qwen2.5-VL (evaluated in mode none)")
    parser.add_argument("--name", default=None, help="row name in the report (default: the model path)")
    parser.add_argument("--mmvp-dir", default=None, help="MMVP folder (Questions.csv + 'MMVP Images/', or parquet)")
    parser.add_argument("--vstar-dir", default=None, help="V*Bench folder with test_questions.jsonl")
    parser.add_argument("--vstar-category", default="direct_attributes", help="V* category ('all' for every one)")
    parser.add_argument("--blink-dir", default=None, help="BLINK folder with <Task>/val-00000-of-00001.parquet")
    parser.add_argument("--blink-tasks", nargs="+", default=list(BLINK_PAPER_TASKS), choices=BLINK_TASKS,
                        help="BLINK subtasks")
    parser.add_argument("--mmstar-path", default=None, help="MMStar's mmstar.parquet")
    parser.add_argument("--modes", nargs="+", default=["forced"], choices=LATENT_MODES, help="latent modes to run")
    parser.add_argument("--output-dir", type=output_folder, required=True,
                        help="where predictions and the report go")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="questions generated together (>= 1)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16, help="answer length in tokens (>= 1)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="first N questions of each benchmark, N >= 1 (a quick look; default: all)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_checkpoint(args.model, args.stock)  # --stock against config.json's model_type, before any loading
    benchmarks = {}
    if args.mmvp_dir:
        benchmarks["mmvp"] = load_mmvp(args.mmvp_dir)
    if args.vstar_dir:
        benchmarks["vstar"] = load_vstar(args.vstar_dir, None if args.vstar_category == "all" else args.vstar_category)
    if args.blink_dir:
        for sample in load_blink(args.blink_dir, args.blink_tasks):
            benchmarks.setdefault(sample.benchmark, []).append(sample)
    if args.mmstar_path:
        benchmarks["mmstar"] = load_mmstar(args.mmstar_path)
    if not benchmarks:
        raise SystemExit("Give at least one benchmark: --mmvp-dir, --vstar-dir, --blink-dir or --mmstar-path.")
    import torch
    from transformers import AutoModelForImageTextToText

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=not args.stock, dtype=args.dtype)
    model.to(device).eval()
    if args.stock:
        from processing_lavit import LavitBaseProcessor

        processor = LavitBaseProcessor.from_pretrained(args.model)
        modes = ["none"]
    else:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
        modes = args.modes
    name = args.name or os.path.basename(os.path.normpath(args.model))
    rows = {}
    for mode in modes:
        records, skipped = [], []
        for benchmark, samples in benchmarks.items():
            samples = samples[: args.limit] if args.limit is not None else samples
            path = os.path.join(args.output_dir, f"predictions-{benchmark.replace('/', '-')}-{mode}.jsonl")
            result = evaluate(model, processor, samples, path, mode=mode, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, model_name=args.model, progress=not args.no_progress)
            records += result.records
            skipped += result.skipped
            logging.info("%s [%s]: %d answered (%d resumed), %d skipped", benchmark, mode, len(result.records),
                         result.resumed, len(result.skipped))
        rows[f"{name} [{mode}]"] = score(records)
        rows[f"{name} [{mode}]"]["skipped"] = skipped
    markdown, table = render_report(rows)
    # which weights these rows score (examples/push_lavit.py publishes a report with the checkpoint it evaluated only)
    table["model"], table["weights"] = args.model, model_fingerprint(model)
    table["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")  # the fingerprint depends on it
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(args.output_dir, "report.json"), "w") as f:
        json.dump(table, f, indent=2)
    print(markdown)


if __name__ == "__main__":
    main()
