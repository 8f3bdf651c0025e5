#!/usr/bin/env python
"""The paper's attention analyses for any teacher and students: Figure 2 (accuracy against visual focus), Figure 3
(the perception gap per token category), Figure 4 and Table 2 (attention entropy, salient regions, their spread) and
Figure 5 (heatmaps), as PNG files and a markdown and JSON table.

Tested with (CPU, tiny models and a tiny LaViT-15K folder, see tests/test_analysis.py):

    python examples/analyze_attention.py --dataset lavit15k-tiny --teacher tiny-teacher --student lavit-tiny \
        --model base=tiny-base --num-samples 6 --output-dir analysis

On the paper's setting: --dataset lavit15k --teacher Qwen/Qwen2.5-VL-32B-Instruct --student runs/lavit-3b
--model base=Qwen/Qwen2.5-VL-3B-Instruct (the teacher needs its own GPU memory).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np

from cli_lavit import checkpoint_model_type, nonnegative_int, output_folder, positive_int


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="a LaViT-15K folder or hub id (its `all` config)")
    parser.add_argument("--teacher", default=None, help="the teacher (stock Qwen2.5-VL): Figure 3 and a heatmap column")
    parser.add_argument("--student", default=None, help="a LaViT student: Figure 3 against the teacher")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="more models for Figures 4-5 and Table 2 (stock or LaViT), e.g. base=Qwen/...")
    parser.add_argument("--num-samples", type=positive_int, default=100, help="samples for Figures 3-5 and Table 2")
    parser.add_argument("--rows", choices=["response", "latents"], default="response",
                        help="a LaViT model's query rows: its generated answer or its latent tokens")
    parser.add_argument("--heatmaps", type=nonnegative_int, default=4, help="samples shown in Figure 5")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32)
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--output-dir", type=output_folder, required=True)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def load_model(path: str, device: str):
    """A stock Qwen2.5-VL (with the image-only processor) or a LaViT checkpoint (with its own processor)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    lavit = checkpoint_model_type(path) == "lavit"
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=lavit).to(device).eval()
    if lavit:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    else:
        from processing_lavit import LavitBaseProcessor

        processor = LavitBaseProcessor.from_pretrained(path)
    return model, processor, lavit


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Every argument is checked before anything is computed or written.
    models = {}
    if args.teacher:
        models["teacher"] = args.teacher
    if args.student:
        models["student"] = args.student
    for item in args.model:
        name, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--model takes NAME=PATH, got {item!r}.")
        models[name] = path
    if not models:
        raise SystemExit("Give at least one model: --teacher, --student or --model NAME=PATH.")
    for name, path in models.items():
        try:
            checkpoint_model_type(path)
        except ValueError as err:
            raise SystemExit(f"{name}: {err}") from err
    import torch
    from tqdm.auto import tqdm

    from analysis_lavit import (answer_trajectories, attention_entropy, attention_statistics, focus_curve, focus_of,
                                perception_gap, plot_entropy_histograms, plot_focus_curve, plot_heatmaps,
                                plot_perception_gap, load_spacy)
    from data_lavit import load_lavit_dataset

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.output_dir, exist_ok=True)
    try:
        everything = load_lavit_dataset(args.dataset, "all")
    except ValueError as err:
        raise SystemExit(
            f"Figure 2 reads the dataset's `all` config (every processed sample with its flags): {err} "
            "examples/build_lavit_dataset.py writes it next to `kept`."
        ) from err
    report: dict = {"figure2": {}, "figure3": None, "table2": {}, "figures": []}

    focus = [r for r in everything.select_columns(["s_focus", "correct"]) if r["s_focus"] is not None]
    curve = focus_curve([r["s_focus"] for r in focus], [r["correct"] for r in focus], args.thresholds)
    right = [r["s_focus"] for r in focus if r["correct"]]
    wrong = [r["s_focus"] for r in focus if not r["correct"]]
    report["figure2"] = {"curve": curve, "mean_focus_correct": float(np.mean(right)) if right else None,
                         "mean_focus_incorrect": float(np.mean(wrong)) if wrong else None, "samples": len(focus)}
    plot_focus_curve(curve, report["figure2"]["mean_focus_correct"], report["figure2"]["mean_focus_incorrect"],
                     os.path.join(args.output_dir, "figure2_accuracy_vs_focus.png"))
    report["figures"].append("figure2_accuracy_vs_focus.png")

    rows = everything.select(range(min(args.num_samples, len(everything))))
    if len(rows) == 0:
        raise SystemExit("The dataset has no samples to analyse.")
    images = [r["image"].convert("RGB") for r in rows]
    questions = [r["question"] for r in rows]
    boxes = [r["bbox"] for r in rows]
    responses = [r["teacher_response"] or r["answer"] for r in rows]

    loaded = {name: load_model(path, device) for name, path in models.items()}

    if "teacher" in loaded and "student" in loaded:
        (teacher, t_processor, _), (student, s_processor, _) = loaded["teacher"], loaded["student"]
        nlp = load_spacy()
        gap = perception_gap(teacher, t_processor, student, s_processor, images, questions, responses, nlp=nlp,
                             batch_size=args.batch_size)
        report["figure3"] = {"per_category": gap["per_category"], "cosine_through": gap["cosine_through"],
                             "word_categories": "spaCy" if nlp is not None else "shipped lexicon"}
        plot_perception_gap(gap, os.path.join(args.output_dir, "figure3_perception_gap.png"))
        report["figures"].append("figure3_perception_gap.png")

    maps, grids, entropies = {}, {}, {}
    for name in tqdm(loaded, desc="attention maps", disable=args.no_progress):
        model, processor, lavit = loaded[name]
        rows_kind = args.rows if lavit else "response"
        run = answer_trajectories(model, processor, images, questions, args.max_new_tokens, rows_kind, args.batch_size)
        maps[name], grids[name] = run["maps"], run["grids"]
        entropies[name] = [attention_entropy(m) for m in run["maps"]]
        stats = attention_statistics(run["maps"])
        focus_values = [f for f in focus_of(run["maps"], run["grids"], images, boxes) if f is not None]
        stats["s_focus"] = float(np.mean(focus_values)) if focus_values else None
        stats["rows"] = rows_kind
        report["table2"][name] = stats
    plot_entropy_histograms(entropies, os.path.join(args.output_dir, "figure4_entropy.png"))
    report["figures"].append("figure4_entropy.png")
    shown = min(args.heatmaps, len(images))
    plot_heatmaps(images[:shown], {n: m[:shown] for n, m in maps.items()}, {n: g[:shown] for n, g in grids.items()},
                  os.path.join(args.output_dir, "figure5_heatmaps.png"), boxes[:shown])
    report["figures"].append("figure5_heatmaps.png")

    with open(os.path.join(args.output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(render_markdown(report))
    print(render_markdown(report))


def fmt(value, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def render_markdown(report: dict) -> str:
    """The report's tables; every number is the JSON report's, rounded to 4 decimals."""
    lines = ["# Attention analysis", "", "## Figure 2: accuracy against visual focus", "",
             "| S_focus > | samples | accuracy |", "|---|---|---|"]
    lines += [f"| {c['threshold']:.2f} | {c['n']} | {fmt(c['accuracy'])} |" for c in report["figure2"]["curve"]]
    f2 = report["figure2"]
    lines += ["", f"Mean S_focus: correct {fmt(f2['mean_focus_correct'])}, incorrect {fmt(f2['mean_focus_incorrect'])} "
              f"({f2['samples']} samples).", ""]
    if report["figure3"]:
        f3 = report["figure3"]
        lines += ["## Figure 3: the perception gap", "",
                  f"Hidden states compared {'through the concept head' if f3['cosine_through'] == 'concept_head' else f3['cosine_through'] or 'not at all (widths differ)'}; "
                  f"word categories from the {f3['word_categories']}.", "",
                  "| category | tokens | KL(teacher \\|\\| student) | cosine distance |", "|---|---|---|---|"]
        for category, v in f3["per_category"].items():
            lines.append(f"| {category} | {v['tokens']} | {fmt(v['kl'])} | {fmt(v['cosine_distance'])} |")
        lines.append("")
    lines += ["## Table 2: attention concentration and stability", "",
              "| model | rows | salient mean | salient std | salient range | salient CV | entropy mean | entropy std | "
              "entropy CV | mean S_focus |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in report["table2"].items():
        sal, ent = s["salient_regions"], s["entropy"]
        lines.append(f"| {name} | {s['rows']} | {fmt(sal['mean'])} | {fmt(sal['std'])} | {sal['min']:.0f}-{sal['max']:.0f} | "
                     f"{fmt(sal['cv'])} | {fmt(ent['mean'])} | {fmt(ent['std'])} | {fmt(ent['cv'])} | {fmt(s['s_focus'])} |")
    lines += ["", "Figures: " + ", ".join(report["figures"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
