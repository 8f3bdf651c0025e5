#!/usr/bin/env python
"""Records a finished quickstart run (`make demo`, i.e. `examples/quickstart.py`) in benchmarks/RESULTS.md: the wall
time of each stage as measured during the run, and its results table and verdict, read from its `results.json`.

    python benchmarks/record_quickstart.py --output-dir quickstart_output [--write-results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import report_lavit
from common import report

SECTION = "quickstart: the default run (make demo)"


def body_of(results: dict) -> str:
    if results["smoke"]:
        raise SystemExit("This is a --smoke run; record a default run (make demo).")
    settings = results["settings"]
    seconds = results["stage_seconds"]
    lines = [
        f"Default settings: teacher pool {settings['teacher_pool']}, distillation split {settings['distill_samples']}, "
        f"validation {settings['val']}, test {settings['test']}; teacher at most {settings['teacher_steps']} steps, "
        f"batch {settings['batch_size']}, grounding loss weight {settings.get('teacher_grounding_weight', 0):g}; "
        + (f"student base pre-trained {settings['student_pretrain_steps']} steps on "
           f"{settings['student_pretrain_pool']} same-size scenes; " if settings.get("student_pretrain_steps") else
           "student base not pre-trained; ")
        + f"students {settings['student_steps']} steps x {settings['seeds']} seeds per "
        f"method, batch {settings['student_batch_size']}, learning rate {settings['student_lr']:g} (LaViT) and "
        f"{settings.get('naive_lr', settings['student_lr']):g} (Naive SFT), L_traj read from layers "
        f"`{settings.get('latent_attention_layers', 'all')}`; text {settings['text_hidden']} x "
        f"{settings['text_layers']} layers, vision {settings['vision_hidden']}. Teacher "
        f"{results['parameters']['teacher']:,} parameters, students {results['parameters']['student']:,}.",
        "",
        "| stage | wall time s |",
        "|---|---|",
    ]
    default = {name: stage_seconds for name, stage_seconds in seconds.items() if name != "ablations"}
    lines += [f"| {name} | {stage_seconds:.1f} |" for name, stage_seconds in default.items()]
    lines += [f"| total (make demo) | {sum(default.values()):.1f} |"]
    if "ablations" in seconds:
        lines += [f"| ablations (added by --ablations, not part of make demo) | {seconds['ablations']:.1f} |"]
    lines += [""]
    teacher = results["teacher"]
    curve = ", ".join(f"{point['val_accuracy']:.1f}% at {point['step']}" for point in teacher.get("curve", []))
    lines += [f"Teacher: {teacher['val_accuracy']:.1f}% on validation after {teacher['steps']} steps (target "
              f"{teacher['target']:.0f}%; "
              f"{curve}); kept {results['dataset']['kept']} of {results['dataset']['processed']} distillation "
              "samples.", ""]
    methods = results["methods"]
    lines += report_lavit.results_table(methods)
    lines += ["", *report_lavit.modes_table(methods)]
    if any(name.startswith("ablation: ") for name in methods):
        lines += ["", *report_lavit.ablations_table(methods)]
    if any((results.get("val_curves") or {}).values()):
        lines += ["", "Validation accuracy along training:", "", *report_lavit.curves_table(results["val_curves"])]
    lines += ["", *report_lavit.verdict(results)]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="quickstart_output", help="the quickstart run's folder")
    parser.add_argument("--write-results", action="store_true", help="store the section in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    results = json.loads(Path(args.output_dir, "results.json").read_text())
    report("record_quickstart.py", SECTION, body_of(results), args.write_results)


if __name__ == "__main__":
    main()
