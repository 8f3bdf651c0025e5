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

    from analysis_lavit import attention_analysis, load_spacy
    from builder_lavit import answer_matches
    from data_lavit import load_lavit_dataset

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        everything = load_lavit_dataset(args.dataset, "all")
    except ValueError as err:
        raise SystemExit(
            f"Figure 2 reads the dataset's `all` config (every processed sample with its flags): {err} "
            "examples/build_lavit_dataset.py writes it next to `kept`."
        ) from err
    flags = everything.select_columns(["s_focus", "correct"])
    if all(focus is None for focus in flags["s_focus"]):
        raise SystemExit("No sample of the dataset's `all` config has an S_focus (none has a key-region box), so "
                         "Figure 2 has nothing to draw; build the dataset from Visual-CoT samples with boxes.")

    rows = everything.select(range(min(args.num_samples, len(everything))))
    if len(rows) == 0:
        raise SystemExit("The dataset has no samples to analyse.")
    images = [r["image"].convert("RGB") for r in rows]
    gaps = {"student": ("teacher", "student")} if "teacher" in models and "student" in models else {}
    nlp = load_spacy() if gaps else None
    loaded = {}
    for name, path in models.items():
        model, processor, lavit = load_model(path, device)
        loaded[name] = (model, processor, args.rows if lavit else "response")
    result = attention_analysis(
        loaded, images, [r["question"] for r in rows], [r["bbox"] for r in rows], args.output_dir,
        # each answer judged as the builder judges the teacher's: by the sample's source (ANLS for documents)
        references=[(r["answer"], r["source"]) for r in rows], judge=lambda answer, ref: answer_matches(answer, *ref),
        responses=[r["teacher_response"] or r["answer"] for r in rows],
        focus_lines={"teacher": (flags["s_focus"], flags["correct"])}, gaps=gaps, heatmaps=args.heatmaps,
        thresholds=args.thresholds, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, nlp=nlp,
        progress=not args.no_progress)
    figure3 = result["perception_gap"].get("student")
    report = {"figure2": result["figure2"]["teacher"],
              "figure3": {**figure3, "word_categories": "spaCy" if nlp is not None else "shipped lexicon"}
              if figure3 else None,
              "table2": result["per_model"], "figures": result["figures"]}

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
    focus = report["figure2"]
    lines += [f"| {point['threshold']:.2f} | {point['n']} | {fmt(point['accuracy'])} |" for point in focus["curve"]]
    lines += ["", f"Mean S_focus: correct {fmt(focus['mean_focus_correct'])}, incorrect "
              f"{fmt(focus['mean_focus_incorrect'])} ({focus['samples']} samples).", ""]
    gap = report["figure3"]
    if gap:
        compared = {"concept_head": "through the concept head", "direct": "directly",
                    None: "not at all (widths differ)"}.get(gap["cosine_through"], gap["cosine_through"])
        lines += ["## Figure 3: the perception gap", "",
                  f"Hidden states compared {compared}; word categories from the {gap['word_categories']}.", "",
                  "| category | tokens | KL(teacher \\|\\| student) | cosine distance |", "|---|---|---|---|"]
        for category, value in gap["per_category"].items():
            lines.append(f"| {category} | {value['tokens']} | {fmt(value['kl'])} | {fmt(value['cosine_distance'])} |")
        lines.append("")
    lines += ["## Table 2: attention concentration and stability", "",
              "| model | rows | salient mean | salient std | salient range | salient CV | entropy mean | entropy std | "
              "entropy CV | mean S_focus | accuracy (%) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, stats in report["table2"].items():
        salient, entropy = stats["salient_regions"], stats["entropy"]
        lines.append(f"| {name} | {stats['rows']} | {fmt(salient['mean'])} | {fmt(salient['std'])} | "
                     f"{salient['min']:.0f}-{salient['max']:.0f} | {fmt(salient['cv'])} | {fmt(entropy['mean'])} | "
                     f"{fmt(entropy['std'])} | {fmt(entropy['cv'])} | {fmt(stats['s_focus'])} | "
                     f"{fmt(stats['accuracy'], 1)} |")
    lines += ["", "Figures: " + ", ".join(report["figures"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
