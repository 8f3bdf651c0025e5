#!/usr/bin/env python
"""The validation sweep the quickstart's student settings were chosen from: students trained exactly as
`quickstart_lavit.py` trains them (its `train_student`), on the kept samples and from the student base of a
finished run, one setting changed at a time, their accuracy on the validation split along training. Test is never
read. Each run appends a line to `<output-dir>/sweep.jsonl` (a rerun skips the runs already there); the table of
every run goes to RESULTS.md with --write-results.

    python benchmarks/sweep_students.py --run quickstart_output --output-dir sweep \
        --runs naive_sft:750:all:0 lavit:750:all:0 lavit:750:last_half:0 [--write-results]

A run is `method:steps:layers:seed[:key=value,...]`: method `naive_sft` or `lavit`, the student steps, the layers
L_traj reads (`--latent-attention-layers`), the seed, and optionally `student_lr` (the run's learning rate, either
method; otherwise the run's own `--student-lr` for LaViT and `--naive-lr` for Naive SFT), `student_batch_size`,
`gate_warmup_fraction`, `every` (validation interval) or a `LavitSFTConfig` loss setting (`trajectory_loss_coef`,
`concept_loss_coef`, `trajectory_topk`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import quickstart_lavit as quickstart
from common import report

SECTION = "quickstart: the students' validation sweep"
RUN_SETTINGS = {"student_lr": float, "student_batch_size": int, "gate_warmup_fraction": float}
TRAINER_SETTINGS = {"trajectory_loss_coef": float, "concept_loss_coef": float, "trajectory_topk": int}


def parse_run(spec: str, run_dir: str, output_dir: str) -> tuple[argparse.Namespace, dict, int]:
    """`(quickstart arguments, trainer overrides, seed)` of one run; a ValueError naming the bad part."""
    parts = spec.split(":")
    if len(parts) not in (4, 5) or parts[0] not in ("naive_sft", "lavit"):
        raise ValueError(f"{spec!r}: write method:steps:layers:seed[:key=value,...], method naive_sft or lavit.")
    method, steps, layers, seed = parts[:4]
    extra = dict(item.split("=", 1) for item in parts[4].split(",")) if len(parts) == 5 else {}
    settings = json.loads(Path(run_dir, "settings.json").read_text())
    argv = ["--output-dir", output_dir, "--student-steps", steps, "--latent-attention-layers", layers,
            "--student-eval-every", extra.pop("every", "250"),
            "--student-lr", str(settings["student_lr"]), "--naive-lr", str(settings.get("naive_lr", settings["student_lr"])),
            "--student-batch-size", str(settings["student_batch_size"]),
            "--gate-warmup-fraction", str(settings.get("gate_warmup_fraction", 0.4)),
            "--text-layers", str(settings["text_layers"])]
    args = quickstart.parse_args(argv)
    overrides = {"distill": False} if method == "naive_sft" else {}
    for key, value in extra.items():
        if key == "student_lr":  # the learning rate of this run's method
            args.student_lr = args.naive_lr = float(value)
        elif key in RUN_SETTINGS:
            setattr(args, key, RUN_SETTINGS[key](value))
        elif key in TRAINER_SETTINGS:
            overrides[key] = TRAINER_SETTINGS[key](value)
        else:
            raise ValueError(f"{spec!r}: unknown setting {key!r}; known: {sorted(RUN_SETTINGS) + sorted(TRAINER_SETTINGS)}.")
    return args, overrides, int(seed)


def table(records: list[dict]) -> str:
    lines = ["| run (method:steps:layers:seed[:settings]) | validation accuracy along training (step: %) | final | "
             "seconds |", "|---|---|---|---|"]
    for r in records:
        curve = ", ".join(f"{p['step']}: {p['val_accuracy']:.1f}" for p in r["curve"])
        lines.append(f"| `{r['spec']}` | {curve} | {r['curve'][-1]['val_accuracy']:.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished quickstart output folder (its dataset and base)")
    parser.add_argument("--output-dir", required=True, help="where the sweep's students and sweep.jsonl go")
    parser.add_argument("--runs", nargs="+", required=True, help="method:steps:layers:seed[:key=value,...]")
    parser.add_argument("--note", default="", help="a sentence on the run the sweep used, for RESULTS.md")
    parser.add_argument("--title", default="", help="a name for this sweep's section of RESULTS.md")
    parser.add_argument("--write-results", action="store_true", help="store the table in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    stages = {}
    for name in ("task", "student", "dataset"):
        marker = Path(args.run, "stages", f"{name}.json")
        if not marker.exists():
            raise SystemExit(f"{args.run} has no finished '{name}' stage; run examples/quickstart.py there first.")
        stages[name] = json.loads(marker.read_text())
    plans = []
    for spec in args.runs:
        try:
            plans.append((spec, *parse_run(spec, args.run, args.output_dir)))
        except ValueError as err:
            raise SystemExit(str(err)) from err
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "sweep.jsonl"
    done = {json.loads(line)["spec"]: json.loads(line) for line in log_path.open()} if log_path.exists() else {}
    from trainer_lavit import PreprocessingCache

    cache = PreprocessingCache()  # as the quickstart's students share one
    for spec, run_args, overrides, seed in plans:
        if spec in done:
            continue
        tag = spec.replace(":", "_").replace(",", "_").replace("=", "")
        start = time.time()
        info = quickstart.train_student(run_args, out, tag, stages["student"]["student_lavit"],
                                        stages["dataset"]["dataset"], stages["task"]["val_mmvp"], seed, spec,
                                        cache=cache, **overrides)
        done[spec] = {"spec": spec, "seconds": time.time() - start, "curve": info["val_curve"],
                      "final_loss": info["final_loss"]}
        with log_path.open("a") as f:
            f.write(json.dumps(done[spec]) + "\n")
    body = (f"Students trained by the quickstart's own `train_student` on the kept samples and from the student base "
            f"of a finished run, validation split only (the layers field is unused by naive_sft). {args.note}\n\n"
            + table([done[s] for s, *_ in plans]))
    report("sweep_students.py", f"{SECTION}{': ' + args.title if args.title else ''}", body, args.write_results)


if __name__ == "__main__":
    main()
