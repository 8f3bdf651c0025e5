#!/usr/bin/env python
"""The quickstart's student step with and without the preprocessing cache (`LavitSFTConfig.cache_preprocessing`),
side by side in one run: Naive SFT and LaViT students trained exactly as `quickstart_lavit.train_student` trains them
(its `cpu_config`, batch 16, the kept samples and student base of a finished quickstart run), each for --steps
steps, uncached and cached runs interleaved (A B B A). The figure is the median wall time between consecutive
optimizer steps (data loading, forward, backward, optimizer) over the steps after the first epoch, when every sample
is in the cache; the first epoch's steps are reported too (they fill it).

    python benchmarks/bench_student_step.py --run quickstart_output [--steps 200] [--write-results]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

import quickstart_lavit as quickstart
from common import report
from data_lavit import load_lavit_dataset
from modeling_lavit import LavitForConditionalGeneration
from processing_lavit import LavitProcessor
from trainer_lavit import LavitSFTTrainer, PreprocessingCache


class StepClock(TrainerCallback):
    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def run(run_dir: str, distill: bool, cached: bool, steps: int, batch_size: int, workdir: str) -> list[float]:
    """Seconds between consecutive step ends of one student training."""
    stages = {name: json.loads(Path(run_dir, "stages", f"{name}.json").read_text()) for name in ("student", "dataset")}
    student = stages["student"]["student_lavit"]
    model = LavitForConditionalGeneration.from_pretrained(student)
    processor = LavitProcessor.from_pretrained(student)
    config = quickstart.cpu_config(Path(workdir) / f"{distill}-{cached}", steps, batch_size, 1e-3, 0, steps,
                                   data_seed=0, distill=distill, cache_preprocessing=cached,
                                   gate_warmup_steps=max(1, int(0.4 * steps)))
    clock = StepClock()
    trainer = LavitSFTTrainer(model=model, args=config, callbacks=[clock], processing_class=processor,
                              preprocessing_cache=PreprocessingCache() if cached else None,
                              train_dataset=load_lavit_dataset(stages["dataset"]["dataset"], "kept"))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    return [b - a for a, b in zip(clock.ends, clock.ends[1:])]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished quickstart output folder (its dataset and base)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    for noisy in ("transformers", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    kept = json.loads(Path(args.run, "stages", "dataset.json").read_text())["kept"]
    epoch = math.ceil(kept / args.batch_size)
    if args.steps < 2 * epoch:
        raise SystemExit(f"--steps must cover two epochs of the {kept} kept samples ({2 * epoch} steps at batch "
                         f"{args.batch_size}), got {args.steps}.")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for distill, name in ((False, "Naive SFT"), (True, "LaViT")):
            gaps = {False: [], True: []}
            first = {False: [], True: []}
            for cached in (False, True, True, False):
                times = run(args.run, distill, cached, args.steps, args.batch_size, workdir)
                first[cached] += times[: epoch - 1]
                gaps[cached] += times[epoch:]
            plain, cache = statistics.median(gaps[False]), statistics.median(gaps[True])
            rows.append(f"| {name} | {1000 * plain:.1f} | {1000 * cache:.1f} | {cache / plain:.3f} | "
                        f"{1000 * statistics.median(first[True]):.1f} |")
    body = (f"The quickstart's students (batch {args.batch_size}, {kept} kept samples of the run "
            f"`{Path(args.run).name}`: "
            f"{epoch} steps an epoch), {args.steps} steps per training, two trainings per setting interleaved "
            "(uncached, cached, cached, uncached). Step time: the median wall time between consecutive optimizer "
            "steps after the first epoch (loading and collating the batch, forward, backward, optimizer).\n\n"
            "| student | step ms, uncached | step ms, cached | cached / uncached | first-epoch step ms, cached "
            "(fills the cache) |\n|---|---|---|---|---|\n" + "\n".join(rows))
    report("bench_student_step.py", "bench_student_step: the student step with the preprocessing cache", body,
           args.write_results)


if __name__ == "__main__":
    main()
