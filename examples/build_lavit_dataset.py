#!/usr/bin/env python
"""Build LaViT-15K: the teacher's gaze and visual semantics on Visual-CoT, filtered by the paper's three stages,
written as parquet shards (configs `kept` and `all`) with a dataset card.

Tested with (CPU, a tiny Qwen2.5-VL teacher and generated Visual-CoT-format records, see tests/test_builder.py):

    python examples/build_lavit_dataset.py --teacher tiny_qwen --viscot-json viscot.json --image-root images \
        --output-dir lavit15k --batch-size 2 --shard-size 4 --min-pixels 3136 --max-pixels 200704

    accelerate launch --multi_gpu --num_processes 2 examples/build_lavit_dataset.py ...   # same rows, 2 CPU processes

The paper's build (one GPU per process; add --device-map auto, one process, for a teacher larger than a GPU):

    accelerate launch --num_processes 8 examples/build_lavit_dataset.py \
        --teacher Qwen/Qwen2.5-VL-32B-Instruct --viscot-json viscot_363k.json --image-root visual_cot \
        --output-dir lavit15k --dtype bfloat16 --batch-size 8

A killed run restarted with the same arguments redoes no finished shard. `--push-to-hub REPO` uploads the result
(`--dry-run` lists the files instead).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from cli_lavit import checkpoint_model_type, output_folder, positive_int
from builder_lavit import BuilderConfig, build_lavit_dataset, finalize_dataset, push_dataset_to_hub


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="Qwen2.5-VL teacher: hub id or path")
    parser.add_argument("--viscot-json", required=True, help="Visual-CoT's viscot_363k.json (or a file of its format)")
    parser.add_argument("--image-root", required=True, help="folder holding the records' cot/<source>/<file> images")
    parser.add_argument("--output-dir", type=output_folder, required=True,
                        help="where the shards and the card are written")
    parser.add_argument("--max-samples", type=positive_int, default=None, help="sample this many records (default: all)")
    parser.add_argument("--sources", nargs="+", default=None, help="keep only these Visual-CoT sources, e.g. gqa docvqa")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="samples per teacher batch")
    parser.add_argument("--shard-size", type=positive_int, default=64, help="samples per parquet shard (the unit of resuming)")
    parser.add_argument("--min-pixels", type=positive_int, default=256 * 28 * 28, help="lower bound of the resized image area")
    parser.add_argument("--max-pixels", type=positive_int, default=1280 * 28 * 28, help="upper bound of the resized image area")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="length limit of the teacher's answers")
    parser.add_argument("--query-rows", choices=["response", "prompt_and_response"], default="response",
                        help="T_text of equation 2: the response tokens, or every text token after the image (official)")
    parser.add_argument("--top-k", type=positive_int, default=8, help="k of the gaze-weighted pooling of V_sem (equation 3)")
    parser.add_argument("--focus-threshold", type=float, default=0.20, help="filter stage 3: minimum S_focus")
    parser.add_argument("--stages", nargs="+", default=["correctness", "difficulty", "alignment"],
                        choices=["correctness", "difficulty", "alignment"],
                        help="the filter stages that decide `kept` (all flags are stored either way)")
    parser.add_argument("--dtype", default="auto", help="teacher dtype: auto, bfloat16, float32")
    parser.add_argument("--device-map", default=None, help="e.g. 'auto' for a teacher larger than one GPU (1 process)")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the dataset to this Hub repo")
    parser.add_argument("--private", action="store_true", help="make the Hub repo private")
    parser.add_argument("--dry-run", action="store_true", help="with --push-to-hub: list the files, upload nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.min_pixels > args.max_pixels:
        raise SystemExit(f"--min-pixels {args.min_pixels} exceeds --max-pixels {args.max_pixels}.")
    try:  # before anything is loaded or written
        model_type = checkpoint_model_type(args.teacher)
    except ValueError as err:
        raise SystemExit(f"--teacher: {err}") from err
    if model_type != "qwen2_5_vl":
        raise SystemExit(f"--teacher {args.teacher} is a '{model_type}' checkpoint; the teacher is a stock Qwen2.5-VL "
                         "model (e.g. Qwen/Qwen2.5-VL-32B-Instruct).")
    import torch
    from accelerate import PartialState

    # Without an accelerator, processes started by `accelerate launch --multi_gpu` (torchrun) join over gloo on CPU.
    state = PartialState(cpu=not torch.cuda.is_available())
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING, format="%(message)s")
    log = logging.getLogger("build_lavit_dataset")
    if args.device_map is not None and state.num_processes > 1:
        raise SystemExit("--device-map spreads one teacher over the GPUs: run it as a single process.")
    config = BuilderConfig(
        teacher=args.teacher, viscot_json=args.viscot_json, image_root=args.image_root, sources=args.sources,
        max_samples=args.max_samples, seed=args.seed, batch_size=args.batch_size, shard_size=args.shard_size,
        min_pixels=args.min_pixels, max_pixels=args.max_pixels, max_new_tokens=args.max_new_tokens,
        query_rows=args.query_rows, top_k=args.top_k, focus_threshold=args.focus_threshold, stages=tuple(args.stages),
        dtype=args.dtype,
    )
    device = None if args.device_map else str(state.device)
    summary = build_lavit_dataset(
        config, args.output_dir, process_index=state.process_index, num_processes=state.num_processes,
        device=device, device_map=args.device_map, progress=not args.no_progress,
    )
    logging.getLogger("build_lavit_dataset").warning(
        "process %d/%d: %d shards built (%d already done), %d samples processed, %d kept, rejected %s, skipped %s, "
        "%.1f s", state.process_index + 1, state.num_processes, summary.shards_done, summary.shards_skipped,
        summary.processed, summary.kept, dict(summary.rejected), dict(summary.skipped), summary.seconds,
    )
    state.wait_for_everyone()
    if not state.is_main_process:
        return
    command = "python examples/build_lavit_dataset.py " + shlex.join(argv)
    try:  # refuses, naming the shard, when one is unfinished or damaged
        overall = finalize_dataset(args.output_dir, config, command)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    log.info("LaViT-15K in %s: %d processed = %d kept + %d rejected %s; %d inputs skipped %s", args.output_dir,
             overall["processed"], overall["kept"], overall["processed"] - overall["kept"], overall["rejected"],
             overall["skipped"], overall["skipped_reasons"])
    if args.push_to_hub:
        plan = push_dataset_to_hub(args.output_dir, args.push_to_hub, private=args.private, dry_run=args.dry_run)
        verb = "would upload" if args.dry_run else "uploaded"
        log.info("%s %d files to %s:", verb, len(plan), args.push_to_hub)
        for path, size in plan:
            log.info("  %s (%d bytes)", path, size)


if __name__ == "__main__":
    main()
