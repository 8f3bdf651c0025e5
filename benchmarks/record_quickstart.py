#!/usr/bin/env python
"""Records finished quickstart runs (`make demo`, i.e. `examples/quickstart.py`) in benchmarks/RESULTS.md: for one
run, the wall time of each stage as measured during the run, and its results table and verdict, read from its
`results.json`; with --runs, one row per run (task seeds standing in for machines) and the range over them, the
figures the README quotes.

    python benchmarks/record_quickstart.py --output-dir quickstart_output [--write-results]
    python benchmarks/record_quickstart.py --runs seed0 seed1 seed2 [--write-results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import report_lavit
from common import report

SECTION = "quickstart: the default run (make demo)"
RUNS_SECTION = "quickstart: the default run over task seeds (make demo with --seed 0, 1, 2)"


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


def acceptance(results: dict) -> dict:
    """The demo's three conditions for one run: LaViT's lead over twice the larger seed std, at least 25% of the
    Naive-to-teacher gap closed (mean over seeds), shuffled latents at least 15 points below forced."""
    methods = results["methods"]
    lead = results["lavit_minus_naive"]["accuracy"]
    spread = max(methods["lavit"]["accuracy"]["std"], methods["naive_sft"]["accuracy"]["std"])
    return {"lead": lead, "twice_spread": 2 * spread, "lead_clear": lead > 2 * spread,
            "gap_closed": results["gap_closed"]["mean"], "gap_ok": results["gap_closed"]["mean"] >= 0.25,
            "shuffled_drop": results["shuffled_drop"]["mean"], "shuffled_ok": results["shuffled_drop"]["mean"] >= 15}


def runs_body(runs: list[tuple[str, dict]]) -> str:
    """One row per finished run and the range over them."""
    lines = ["| task seed | teacher on validation | kept (answers) | student base | Naive SFT | LaViT | lead (2 x larger seed "
             "std) | gap closed | shuffled drop (points) | stages s | all three conditions |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    checks = []
    for name, results in runs:
        if results["smoke"]:
            raise SystemExit(f"{name} is a --smoke run; record default runs (make demo).")
        methods, check = results["methods"], acceptance(results)
        checks.append(check)
        seconds = sum(value for stage, value in results["stage_seconds"].items() if stage != "ablations")
        ok = check["lead_clear"] and check["gap_ok"] and check["shuffled_ok"]
        lines.append(
            f"| {results['settings']['seed']} | {results['teacher']['val_accuracy']:.1f}% at step "
            f"{results['teacher']['steps']} | {results['dataset']['kept']} ("
            + ", ".join(f"{option} {count}" for option, count in (results["dataset"].get("kept_answers") or {}).items())
            + ") | "
            f"{report_lavit.fmt(methods['student base']['accuracy'])} | {report_lavit.fmt(methods['naive_sft']['accuracy'])} | "
            f"{report_lavit.fmt(methods['lavit']['accuracy'])} | {check['lead']:+.1f} ({check['twice_spread']:.1f}) | "
            f"{100 * check['gap_closed']:.0f}% ± {100 * results['gap_closed']['std']:.0f}% | "
            f"{check['shuffled_drop']:.1f} ± {results['shuffled_drop']['std']:.1f} | {seconds:.0f} | "
            f"{'yes' if ok else 'no'} |")
    settings = runs[0][1]["settings"]
    noise = runs[0][1].get("sampling_noise") or {}

    def span(values, scale=1.0, digits=1, unit=""):
        return f"{min(values) * scale:.{digits}f} to {max(values) * scale:.{digits}f}{unit}"

    lavit = [results["methods"]["lavit"]["accuracy"]["mean"] for _, results in runs]
    naive = [results["methods"]["naive_sft"]["accuracy"]["mean"] for _, results in runs]
    text = [
        f"{len(runs)} default runs, each a whole `make demo` with its own task seed (task, teacher, kept samples, "
        f"student base and students; {settings['seeds']} student seeds per method; {settings['student_steps']} student "
        f"steps; {settings['val']} validation and {settings['test']} test questions, one model's binomial sampling std "
        f"at most {noise.get('test_at_50', float('nan')):.1f} points on test). Accuracies are test accuracy (%), mean "
        "± std over the student seeds; the lead is LaViT's mean minus Naive SFT's; gap closed is the share of the "
        "Naive-to-teacher gap LaViT closes (mean ± std over student seeds); the conditions are the lead above twice "
        "the larger seed std, at least 25% of the gap closed and shuffled latents at least 15 points below forced.",
        "", *lines, "",
        f"Over the {len(runs)} runs: LaViT {span(lavit)}%, Naive SFT {span(naive)}%, lead "
        f"{span([c['lead'] for c in checks], unit=' points')}, gap closed "
        f"{span([c['gap_closed'] for c in checks], 100, 0, '%')}, shuffled drop "
        f"{span([c['shuffled_drop'] for c in checks], unit=' points')}; all three conditions hold in "
        f"{sum(c['lead_clear'] and c['gap_ok'] and c['shuffled_ok'] for c in checks)} of {len(runs)} runs.",
    ]
    return "\n".join(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="quickstart_output", help="the quickstart run's folder")
    parser.add_argument("--runs", nargs="+", help="finished default runs of other task seeds: one row each")
    parser.add_argument("--write-results", action="store_true", help="store the section in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if args.runs:
        runs = [(folder, json.loads(Path(folder, "results.json").read_text())) for folder in args.runs]
        report("record_quickstart.py", RUNS_SECTION, runs_body(runs), args.write_results)
        return
    results = json.loads(Path(args.output_dir, "results.json").read_text())
    report("record_quickstart.py", SECTION, body_of(results), args.write_results)


if __name__ == "__main__":
    main()
