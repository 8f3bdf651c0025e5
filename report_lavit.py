# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""The quickstart's report: `summarise` gathers every number of a finished run's stages (what becomes
`results.json`), `render_report` renders `report.md` from them (the task and the teacher, the results table, LaViT's
latent modes, Table 3's ablations, the validation curves, a verdict in plain sentences, the figures, the stage
times). The tables and the verdict are also what benchmarks/record_quickstart.py copies into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math
from pathlib import Path

from analysis_lavit import spread
from evaluation_lavit import LATENT_MODES


# The students' learning rates chosen on validation (benchmarks/RESULTS.md, the students' validation sweep): the
# quickstart's defaults, and the report says so when a run used them
DEFAULT_LR = {"student_lr": 1e-3, "naive_lr": 5e-4}


def mean_std(values) -> dict:
    """`analysis_lavit.spread` of the values given (None dropped) without its CV, with the values themselves; empty:
    no mean."""
    values = [float(value) for value in values if value is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {**{key: stat for key, stat in spread(values).items() if key != "cv"}, "values": values}


LATENT_MODE_MEANING = {
    "forced": "the latent tokens written before the answer, as trained",
    "none": "no latent tokens at all: the answer straight after the question",
    "masked": "the latent tokens written, but no later token may attend to them (the first answer token is still "
              "predicted at the last latent position, so a one-letter answer keeps that position's state)",
    "zeroed": "the latent tokens' input embeddings set to zero",
    "shuffled": "at every layer, each sample's latent states swapped with another sample's: the answer reads "
                "another image's latent thoughts",
}


def summarise(args, stages: dict) -> dict:
    """results.json: every number the report shows."""
    evaluation = stages["evaluate"]["results"]
    analysis = stages["analysis"]["per_model"]
    runs = stages["students"]["runs"]
    seeds = range(args.seeds)

    def row(names: list[str], accuracy: list[float]) -> dict:
        """Mean and spread over `names` of the accuracy given and of the attention statistics of the analysis."""
        return {"accuracy": mean_std(accuracy),
                "s_focus": mean_std([analysis[name]["s_focus"] for name in names]),
                "entropy": mean_std([analysis[name]["entropy"]["mean"] for name in names]),
                "salient_regions": mean_std([analysis[name]["salient_regions"]["mean"] for name in names]),
                "salient_regions_cv": mean_std([analysis[name]["salient_regions"]["cv"] for name in names])}

    per_seed = {"naive_sft": [evaluation[f"naive_sft-seed{seed}"]["none"]["accuracy"] for seed in seeds],
                "lavit": [evaluation[f"lavit-seed{seed}"]["forced"]["accuracy"] for seed in seeds]}
    methods = {method: row([f"{method}-seed{seed}" for seed in seeds], per_seed[method]) for method in per_seed}
    methods["lavit (latent tokens)"] = row([f"lavit-seed{seed} (latents)" for seed in seeds], [])
    for mode in LATENT_MODES[1:]:
        methods[f"lavit [{mode}]"] = {"accuracy": mean_std([evaluation[f"lavit-seed{seed}"][mode]["accuracy"]
                                                            for seed in seeds])}
    for name in ("teacher", "student base"):
        methods[name] = row([name], [evaluation[name]["none"]["accuracy"]])
    # Table 3's ablations, in the order they were trained, each over the seeds it was trained with
    ablations: dict[str, dict[str, list[float]]] = {}
    for run, scores in ((stages.get("ablations") or {}).get("results") or {}).items():
        scored = ablations.setdefault(run.rsplit("-seed", 1)[0], {"forced": [], "shuffled": []})
        for mode in scored:
            scored[mode].append(scores[mode]["accuracy"])
    for name, scored in ablations.items():
        methods[f"ablation: {name}"] = {"accuracy": mean_std(scored["forced"]),
                                        "shuffled": mean_std(scored["shuffled"])}
    lavit, naive = methods["lavit"], methods["naive_sft"]
    teacher = methods["teacher"]["accuracy"]["mean"]

    def lavit_minus_naive(key):
        if lavit[key]["mean"] is None or naive[key]["mean"] is None:
            return None
        return lavit[key]["mean"] - naive[key]["mean"]

    # the share of the Naive-to-teacher gap that LaViT closes, seed by seed (the same seed's Naive SFT run)
    shares = [(with_lavit - with_naive) / (teacher - with_naive) if teacher - with_naive > 0 else None
              for with_lavit, with_naive in zip(per_seed["lavit"], per_seed["naive_sft"])]
    shuffled_drop = [evaluation[f"lavit-seed{seed}"]["forced"]["accuracy"]
                     - evaluation[f"lavit-seed{seed}"]["shuffled"]["accuracy"] for seed in seeds]
    curves = {}
    for method in per_seed:
        by_step: dict[int, list[float]] = {}
        for seed in seeds:
            for point in runs[f"{method}-seed{seed}"].get("val_curve", []):
                by_step.setdefault(point["step"], []).append(point["val_accuracy"])
        curves[method] = [{"step": step, "val_accuracy": mean_std(values)} for step, values in sorted(by_step.items())]
    return {
        "smoke": args.smoke,
        "settings": dict(vars(args)),
        "teacher": {"val_accuracy": stages["teacher"]["val_accuracy"], "steps": stages["teacher"]["steps"],
                    "curve": stages["teacher"]["curve"], "target": 100 * args.teacher_target,
                    "grounding_weight": args.teacher_grounding_weight},
        "student_pretrain": stages["student"].get("pretrain"),
        "parameters": {"teacher": stages["models"]["teacher_base_parameters"],
                       "student": stages["models"]["student_base_parameters"]},
        "dataset": {**{key: stages["dataset"][key] for key in ("processed", "kept", "rejected", "skipped",
                                                                "filter_stages", "focus_threshold", "query_rows")},
                    "kept_answers": stages["dataset"].get("kept_answers")},
        "methods": methods,
        "per_seed": {method: [{"seed": seed, "test_accuracy": per_seed[method][seed],
                               "final_train_loss": runs[f"{method}-seed{seed}"]["final_loss"]} for seed in seeds]
                     for method in per_seed},
        "lavit_minus_naive": {"accuracy": lavit_minus_naive("accuracy"), "s_focus": lavit_minus_naive("s_focus")},
        "gap_closed": mean_std(shares),
        "gap_closed_per_seed": shares,
        "shuffled_drop": mean_std(shuffled_drop),
        "val_curves": curves,
        "sampling_noise": sampling_noise(args.test, args.val, lavit["accuracy"]["mean"], naive["accuracy"]["mean"],
                                         args.seeds),
        "figure2": stages["analysis"]["figure2"],
        "perception_gap": stages["analysis"]["perception_gap"],
        "figures": stages["analysis"]["figures"],
        "stage_seconds": {name: stages[name]["_seconds"] for name in stages},
    }


def sampling_noise(test: int, val: int, lavit: float | None, naive: float | None, seeds: int) -> dict:
    """The binomial sampling standard deviation of an accuracy (in points) measured on `test` and on `val`
    questions: at 50% (the largest), at LaViT's and Naive SFT's test accuracies, and of the lead between their means
    over `seeds` seeds (each seed's accuracy an independent draw on the same questions, an upper bound)."""
    def points(p: float, n: int) -> float:
        return 100 * math.sqrt(p * (1 - p) / n) if n > 0 else math.nan

    out = {"test_questions": test, "val_questions": val, "test_at_50": points(0.5, test),
           "val_at_50": points(0.5, val)}
    if lavit is not None and naive is not None:
        out["lead"] = math.sqrt((points(lavit / 100, test) ** 2 + points(naive / 100, test) ** 2) / max(1, seeds))
    return out


def fmt(stat, scale: float = 1.0, digits: int = 1) -> str:
    """`mean ± std` (or the mean alone for one value); "—" where there is no number (e.g. a CV of a zero mean)."""
    if stat is None or stat.get("mean") is None or not math.isfinite(stat["mean"]):
        return "—"
    if stat["n"] > 1 and not math.isfinite(stat["std"]):
        return f"{stat['mean'] * scale:.{digits}f}"
    if stat["n"] > 1:
        return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f}"


def verdict(results: dict) -> list[str]:
    """One plain sentence per measure: who is ahead, by how much, and whether the gap exceeds twice the larger
    seed-to-seed standard deviation; the share of the gap closed; whether the answers need the latents; whether the
    students had levelled off; whether the seeds varied the runs."""
    methods = results["methods"]
    lavit, naive = methods["lavit"], methods["naive_sft"]
    seeds = lavit["accuracy"]["n"]
    lines = []
    clear_accuracy = False
    for key, label, unit in (("accuracy", "test accuracy", " points"),
                             ("s_focus", "S_focus (attention on the key object's cell)", "")):
        difference = results["lavit_minus_naive"][key]
        if difference is None:
            continue
        seed_spread = max(lavit[key]["std"] or 0.0, naive[key]["std"] or 0.0)
        if abs(difference) < 1e-9:
            outcome = "tied with"
        else:
            outcome = "beat" if difference > 0 else "did not beat"
        clear = abs(difference) > 2 * seed_spread and abs(difference) >= 1e-9
        if key == "accuracy":
            clear_accuracy = clear and difference > 0
        lines.append(f"- On {label}, LaViT {outcome} Naive SFT here: {lavit[key]['mean']:.3f} against "
                     f"{naive[key]['mean']:.3f}, a difference of {difference:+.3f}{unit}, "
                     f"{'larger than' if clear else 'within'} twice the larger seed-to-seed standard deviation "
                     f"({seed_spread:.3f}) over {seeds} seeds.")
    noise = results.get("sampling_noise")
    if noise and results["lavit_minus_naive"]["accuracy"] is not None and "lead" in noise:
        lead = results["lavit_minus_naive"]["accuracy"]
        lines.append(f"- Sampling noise: on {noise['test_questions']} test questions one model's accuracy carries a "
                     f"binomial standard deviation of at most {noise['test_at_50']:.1f} points (at 50%; "
                     f"{noise['val_at_50']:.1f} on the {noise['val_questions']} validation questions the step count "
                     f"and the curves read), and the lead of {seeds}-seed means about {noise['lead']:.1f}: the "
                     f"{lead:+.1f}-point lead is " + (f"{abs(lead) / noise['lead']:.0f} times that."
                                                      if noise["lead"] > 0 else "measured without sampling noise."))
    share = results.get("gap_closed") or {}
    teacher = methods["teacher"]["accuracy"]["mean"]
    if share.get("mean") is not None:
        per_seed = results.get("gap_closed_per_seed") or share["values"]
        lines.append(f"- Of the gap between Naive SFT ({naive['accuracy']['mean']:.1f}%) and the teacher "
                     f"({teacher:.1f}%), LaViT closes {100 * share['mean']:.0f}% ± {100 * share['std']:.0f}% over "
                     f"{share['n']} seeds (per seed: "
                     + ", ".join("n/a (Naive SFT not below the teacher)" if closed is None
                                 else f"{100 * closed:.0f}%" for closed in per_seed) + ").")
    drop = results.get("shuffled_drop") or {}
    if drop.get("mean") is not None:
        needed = drop["mean"] >= 15.0
        lines.append(f"- Swapping LaViT's latent states between samples costs it {drop['mean']:.1f} ± "
                     f"{drop['std']:.1f} points of test accuracy: "
                     + ("its answers read the latent tokens of their own image (at least 15 points)." if needed else
                        "less than 15 points, so its answers do not depend much on the content of its latent tokens."))
        if clear_accuracy and needed:
            lines.append("- Both conditions of the demo's goal hold: LaViT ahead of Naive SFT by more than twice the "
                         "larger seed spread, and its latent tokens necessary.")
    for name in methods:
        if name.startswith("ablation: "):
            cost, spread_, clear = ablation_cost(methods, name)
            lines.append(f"- Ablation {name.removeprefix('ablation: ')} ({methods[name]['accuracy']['n']} seeds): "
                         f"{methods[name]['accuracy']['mean']:.1f}% against the full method's "
                         f"{lavit['accuracy']['mean']:.1f}%, a cost of {cost:+.1f} points, "
                         + (f"more than twice the larger seed std ({spread_:.1f}): the part matters here."
                            if clear else f"within twice the larger seed std ({spread_:.1f}): not shown to matter "
                                          "here."))
    curves = results.get("val_curves") or {}
    for method, label in (("naive_sft", "Naive SFT"), ("lavit", "LaViT")):
        curve = curves.get(method) or []
        if len(curve) >= 2:
            last, before = curve[-1]["val_accuracy"]["mean"], curve[-2]["val_accuracy"]["mean"]
            change = last - before
            trend = ("still rising at the end of training; more steps may move it." if change > 2.0 else
                     f"fell by {-change:.1f} points at the end of training." if change < -2.0 else "levelled off.")
            lines.append(f"- {label} on validation: {before:.1f}% at step {curve[-2]['step']}, {last:.1f}% at step "
                         f"{curve[-1]['step']}: {trend}")
    for method, label in (("naive_sft", "Naive SFT"), ("lavit", "LaViT")):
        runs = (results.get("per_seed") or {}).get(method) or []
        if len(runs) > 1 and len({(run["test_accuracy"], run["final_train_loss"]) for run in runs}) == 1:
            lines.append(f"- {label}'s {len(runs)} seeds gave the same run (accuracy and final loss): its spread "
                         "says nothing about seed-to-seed variation.")
    chance = 100.0 / 4
    at_chance = [name for name, row in (("Naive SFT", naive), ("LaViT", lavit))
                 if row["accuracy"]["mean"] is not None and abs(row["accuracy"]["mean"] - chance) <= 5.0]
    if at_chance:
        lines.append(f"- {' and '.join(at_chance)} {'are' if len(at_chance) > 1 else 'is'} within 5 points of chance "
                     f"({chance:.0f}%): {'neither has' if len(at_chance) > 1 else 'it has not'} learned the task from "
                     f"the {results['dataset']['kept']} kept samples in {results['settings']['student_steps']} steps, "
                     "so the accuracy comparison says nothing about distillation here.")
    start = methods["student base"]["accuracy"]["mean"]
    if start is not None and start > chance + 5.0:
        gains = {name: row["accuracy"]["mean"] - start for name, row in (("Naive SFT", naive), ("LaViT", lavit))
                 if row["accuracy"]["mean"] is not None}
        lines.append("- Against their common starting point (the student base, "
                     f"{start:.1f}%): " + ", ".join(f"{name} {gain:+.1f} points" for name, gain in gains.items())
                     + (". Neither moved more than 5 points from it: the kept samples changed neither student's "
                        "accuracy much, so the accuracy comparison says little about distillation here."
                        if all(abs(gain) <= 5.0 for gain in gains.values()) else "."))
    return lines


def results_table(methods: dict) -> list[str]:
    """The main table of the report (and of RESULTS.md): accuracy and attention statistics per model."""
    lines = ["| model | accuracy (%) | S_focus | entropy | salient regions | salient CV |", "|---|---|---|---|---|---|"]
    for name in ("teacher", "student base", "naive_sft", "lavit", "lavit (latent tokens)"):
        row = methods[name]
        lines.append(f"| {name} | {fmt(row['accuracy'])} | {fmt(row['s_focus'], digits=3)} | "
                     f"{fmt(row['entropy'], digits=3)} | {fmt(row['salient_regions'], digits=2)} | "
                     f"{fmt(row['salient_regions_cv'], digits=3)} |")
    return lines


def curves_table(curves: dict) -> list[str]:
    """The students' validation accuracy along training (mean ± std over seeds): the sweep of step counts."""
    steps = sorted({point["step"] for curve in curves.values() for point in curve})
    at = {method: {point["step"]: point["val_accuracy"] for point in curve} for method, curve in curves.items()}
    lines = ["| step | Naive SFT (%) | LaViT (%) |", "|---|---|---|"]
    lines += [f"| {step} | {fmt(at.get('naive_sft', {}).get(step))} | {fmt(at.get('lavit', {}).get(step))} |"
              for step in steps]
    return lines


def ablation_cost(methods: dict, name: str) -> tuple[float, float, bool]:
    """`(cost, larger seed std, clear)` of one ablation against the full method: the full method's mean test accuracy
    minus the ablation's, the larger of the two seed-to-seed standard deviations, and whether the cost exceeds
    twice that (an ablation of one seed has no spread of its own)."""
    full, ablated = methods["lavit"]["accuracy"], methods[name]["accuracy"]
    spread_ = max(full["std"] if full["n"] > 1 else 0.0, ablated["std"] if ablated["n"] > 1 else 0.0)
    cost = full["mean"] - ablated["mean"]
    return cost, spread_, cost > 2 * spread_


def ablations_table(methods: dict) -> list[str]:
    """Table 3's rows beside the full method (the same seeds): accuracy, with latents shuffled, and what leaving the
    part out costs."""
    lines = ["| run | seeds | accuracy (%) | latents shuffled (%) | cost (points) | more than twice the larger seed "
             "std |", "|---|---|---|---|---|---|",
             f"| full method | {methods['lavit']['accuracy']['n']} | {fmt(methods['lavit']['accuracy'])} | "
             f"{fmt(methods['lavit [shuffled]']['accuracy'])} | — | — |"]
    for name in methods:
        if name.startswith("ablation: "):
            cost, spread_, clear = ablation_cost(methods, name)
            lines.append(f"| {name.removeprefix('ablation: ')} | {methods[name]['accuracy']['n']} | "
                         f"{fmt(methods[name]['accuracy'])} | {fmt(methods[name].get('shuffled'))} | {cost:+.1f} | "
                         f"{'yes' if clear else 'no'} (2 x {spread_:.1f}) |")
    return lines


def modes_table(methods: dict) -> list[str]:
    lines = ["| mode | what the answer sees | accuracy (%) |", "|---|---|---|"]
    for mode in LATENT_MODES:
        stat = methods["lavit" if mode == "forced" else f"lavit [{mode}]"]["accuracy"]
        lines.append(f"| {mode} | {LATENT_MODE_MEANING[mode]} | {fmt(stat)} |")
    return lines


def size_note(parameters: dict) -> str:
    ratio = parameters["teacher"] / parameters["student"]
    if ratio < 1.5:
        return "a teacher the size of its student (the paper distils a 32B teacher into a 3B student)"
    return f"a teacher {ratio:.1f} times its student's size (the paper's is about 10 times)"


def teacher_paragraph(results: dict) -> str:
    """How the teacher was trained and how good it got, and where the students start from."""
    teacher, parameters, pretrain = results["teacher"], results["parameters"], results.get("student_pretrain")
    if not teacher["grounding_weight"]:
        training = "plain supervised fine-tuning"
    else:
        training = (f"supervised fine-tuning with a grounding loss (weight {teacher['grounding_weight']:g}: the KL "
                    "from the key object's cell to its first layer's attention at the question's colour word, standing "
                    "in for the grounding a large pretrained teacher brings; the students never see the boxes, see "
                    "GroundedSFTTrainer in grounding_lavit.py)")
    if teacher["val_accuracy"] < teacher["target"]:
        reached = (f", short of the {teacher['target']:.0f}% target: its answers, gaze and semantics are those of a "
                   "partly trained teacher, and the filter keeps only the samples it got right.")
    else:
        reached = f", above the {teacher['target']:.0f}% target."
    if not pretrain:
        start = ". Both start from the same random student base."
    else:
        start = (f" and starts from the same base pre-trained for {pretrain['steps']} steps on scenes whose objects "
                 "all have the asked size (seeing sizes without finding the named object), which answers "
                 f"{pretrain['val_accuracy']:.1f}% of the validation questions.")
    return (f"The teacher ({parameters['teacher']:,} parameters) reached {teacher['val_accuracy']:.1f}% on validation "
            f"after {teacher['steps']} steps of {training}{reached} Each student has {parameters['student']:,} "
            f"parameters{start}")


def dataset_paragraph(results: dict) -> str:
    """What the builder kept of the distillation split, and why."""
    dataset = results["dataset"]
    rejected = ", ".join(f"{reason}: {count}" for reason, count in sorted(dataset["rejected"].items())) or "nothing"
    text = (f"The builder processed {dataset['processed']} samples of the distillation split with the filter stages "
            f"{', '.join(dataset['filter_stages']) or 'none'} (S_focus threshold {dataset['focus_threshold']}, the "
            f"teacher's gaze read from its {dataset['query_rows'].replace('_', ' ')} rows) and kept {dataset['kept']} "
            f"(rejected as {rejected}; inputs skipped: {dataset['skipped']}). Both students train on the kept samples "
            "only")
    if not dataset.get("kept_answers"):
        return text + "."
    text += ". Their answers by option: " + ", ".join(f"{option} {count}"
                                                      for option, count in dataset["kept_answers"].items())
    if "difficulty" in dataset["filter_stages"]:
        return text + (" (the difficulty stage drops what the teacher answers right without the image, so the option "
                       "it guesses blind is rare among the kept samples; validation and test stay balanced).")
    return text + " (validation and test are balanced)."


def students_paragraph(results: dict) -> str:
    """How the students were trained."""
    settings = results["settings"]
    chosen = (settings["student_lr"], settings["naive_lr"]) == (DEFAULT_LR["student_lr"], DEFAULT_LR["naive_lr"])
    return (f"Each student trains {settings['student_steps']} steps (batch {settings['student_batch_size']}, cosine "
            f"schedule; learning rate {settings['student_lr']:g} for LaViT and {settings['naive_lr']:g} for Naive SFT"
            + (", each chosen on validation" if chosen else "") + ") "
            f"on those samples, with {settings['seeds']} seeds per method (a seed sets the order of the samples). "
            "LaViT's trajectory loss reads its latent tokens' attention from the layers "
            f"`{settings['latent_attention_layers']}` (in the first layer a latent token's query depends on its own "
            "embedding only, so it cannot look at the object a question names there); the sensory gate opens over "
            f"the first {100 * settings['gate_warmup_fraction']:.0f}% of the steps.")


FIGURE_NOTES = {
    "figure2_accuracy_vs_focus.png": "accuracy of the test answers whose S_focus exceeds a threshold, for the student "
                                     "base, Naive SFT and LaViT (seeds pooled)",
    "figure3_perception_gap.png": "per word category of the answers, how far Naive SFT's and LaViT's image attention "
                                  "and hidden states are from the teacher's (seed 0; the answers are option letters, "
                                  "so some categories hold no tokens)",
    "figure4_entropy.png": "entropy of each model's image attention while answering",
    "figure5_heatmaps.png": "where each model looks on three test images (the key object boxed)",
}


def render_report(results: dict) -> str:
    """report.md: every number in it is results.json's."""
    methods = results["methods"]
    lines = ["# LaViT quickstart report", ""]
    if results["smoke"]:
        lines += ["**Smoke run**: every stage at toy size to check the pipeline; the numbers below mean nothing.", ""]
    lines += [
        "## The task and the teacher", "",
        "112-pixel images cut into 4 x 4 cells of 28 pixels (one visual token each); each object sits wholly inside "
        "its own cell; the question names an object by its colour and asks its size class, options (A) tiny (B) small "
        "(C) medium (D) large, answers balanced (chance: 25%).", "",
        teacher_paragraph(results), "",
        dataset_paragraph(results), "",
        students_paragraph(results), "",
        "## Results on the test split", "",
        *results_table(methods),
        "",
        "Accuracy: greedy answers read by the harness's option extractor. S_focus: the share of the image attention "
        "(averaged over heads, layers and text rows) that falls in the key object's cell, read from the same text "
        f"rows as the teacher's gaze ({results['dataset']['query_rows'].replace('_', ' ')}, each model's own greedy "
        "answer), or for the last row from the latent tokens. Entropy, salient regions and their coefficient of "
        "variation as in Table 2 of the paper. Mean ± standard deviation over seeds. Per seed (test accuracy %): "
        "Naive SFT " + ", ".join(f"{run['test_accuracy']:.1f}" for run in results["per_seed"]["naive_sft"])
        + "; LaViT " + ", ".join(f"{run['test_accuracy']:.1f}" for run in results["per_seed"]["lavit"]) + ".", "",
        "### LaViT with its latent tokens changed at inference", "",
        *modes_table(methods),
    ]
    if any(name.startswith("ablation: ") for name in methods):
        lines += ["", "### Table 3 ablations (same steps, data and seeds as the full method)", "",
                  *ablations_table(methods)]
    curves = results.get("val_curves") or {}
    if any(curves.values()):
        lines += ["", "## Validation accuracy along training", "",
                  "Each student's accuracy on the validation split during its training (mean ± std over seeds): the "
                  "sweep the step count was chosen from, and whether either student was still improving when it "
                  "stopped.", "", *curves_table(curves)]
    lines += [
        "", "## Verdict", "", *verdict(results), "",
        "What this does and does not say: it is one synthetic task, tiny models trained from scratch on a CPU (the "
        "teacher helped by a grounding loss, the student base by a brief pre-training), "
        f"{size_note(results['parameters'])} and {results['dataset']['kept']} distillation samples. It shows the whole "
        "method running end to end and how the two students compare in this regime; it does not test the paper's "
        "claims about 3B students distilled from a 32B teacher on LaViT-15K, whose effects can be larger, smaller or "
        "absent at that scale.",
        "", "## Figures", "",
    ]
    lines += [f"- [{Path(figure).name}]({figure}): {FIGURE_NOTES.get(Path(figure).name, '')}"
              for figure in results["figures"]]
    lines += ["", "## Stage times (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in results["stage_seconds"].items()]
    return "\n".join(lines) + "\n"


__all__ = ["DEFAULT_LR", "LATENT_MODE_MEANING", "ablation_cost", "ablations_table", "curves_table", "fmt", "mean_std",
           "modes_table", "render_report", "results_table", "sampling_noise", "summarise", "verdict"]
