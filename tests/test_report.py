"""The quickstart's report (`report_lavit`): results.json's numbers computed from a run's stages by hand, the verdict's
sentences in each situation, and report.md showing results.json's numbers."""

from __future__ import annotations

import math

import pytest

from quickstart_lavit import parse_args
from report_lavit import fmt, mean_std, render_report, summarise, verdict


def stages_of(naive: list[float], lavit: list[float], shuffled: list[float], teacher: float = 90.0,
              base: float = 40.0, ablations: dict | None = None) -> dict:
    """The stage results `main` gathers, for len(naive) seeds, with the given test accuracies (%)."""
    seeds = range(len(naive))
    evaluation = {"teacher": {"none": {"accuracy": teacher}}, "student base": {"none": {"accuracy": base}}}
    per_model = {}
    runs = {}
    for seed in seeds:
        evaluation[f"naive_sft-seed{seed}"] = {"none": {"accuracy": naive[seed]}}
        evaluation[f"lavit-seed{seed}"] = {"forced": {"accuracy": lavit[seed]}, "none": {"accuracy": 30.0},
                                           "masked": {"accuracy": 31.0}, "zeroed": {"accuracy": 32.0},
                                           "shuffled": {"accuracy": shuffled[seed]}}
        for method in ("naive_sft", "lavit"):
            runs[f"{method}-seed{seed}"] = {"final_loss": 0.5 + seed, "val_curve": [
                {"step": 10, "val_accuracy": 40.0 + seed}, {"step": 20, "val_accuracy": 50.0 + 2 * seed}]}
    for index, name in enumerate(["teacher", "student base", *runs, *(f"lavit-seed{s} (latents)" for s in seeds)]):
        per_model[name] = {"s_focus": 0.1 * (index + 1), "entropy": {"mean": 2.0 + index},
                           "salient_regions": {"mean": 3.0 + index, "cv": 0.25}}
    stages = {
        "task": {}, "models": {"teacher_base_parameters": 2_000_000, "student_base_parameters": 1_000_000},
        "teacher": {"val_accuracy": teacher, "steps": 1000, "curve": [{"step": 1000, "val_accuracy": teacher}]},
        "student": {"pretrain": {"steps": 400, "val_accuracy": base}},
        "dataset": {"processed": 200, "kept": 120, "rejected": {"correctness": 50, "difficulty": 30}, "skipped": 0,
                    "filter_stages": ["correctness", "difficulty"], "focus_threshold": 0.15,
                    "query_rows": "prompt_and_response", "kept_answers": {"A": 20, "B": 40, "C": 30, "D": 30}},
        "students": {"runs": runs}, "evaluate": {"results": evaluation},
        "analysis": {"per_model": per_model, "figure2": {}, "perception_gap": {},
                     "figures": ["analysis/figure4_entropy.png"]},
    }
    if ablations:  # name: (forced, shuffled) for seed 0, or lists of them per seed
        results = {}
        for name, (forced, swapped) in ablations.items():
            forced, swapped = (forced, swapped) if isinstance(forced, list) else ([forced], [swapped])
            for seed, (one, other) in enumerate(zip(forced, swapped)):
                results[f"{name}-seed{seed}"] = {"forced": {"accuracy": one}, "shuffled": {"accuracy": other}}
        stages["ablations"] = {"results": results}
    for name, stage in stages.items():
        stage["_seconds"] = 1.5
    return stages


def args_for(seeds: int, tmp_path):
    return parse_args(["--output-dir", str(tmp_path / "run"), "--seeds", str(seeds)])


def test_summary_numbers_match_a_hand_computation(tmp_path):
    stages = stages_of(naive=[50.0, 60.0], lavit=[70.0, 75.0], shuffled=[40.0, 70.0],
                       ablations={"no_semantic": (65.0, 45.0), "no_trajectory": (55.0, 50.0)})
    results = summarise(args_for(2, tmp_path), stages)
    methods = results["methods"]
    assert methods["naive_sft"]["accuracy"]["mean"] == pytest.approx(55.0)
    assert methods["naive_sft"]["accuracy"]["std"] == pytest.approx(5.0)  # population std of 50 and 60
    assert methods["lavit"]["accuracy"]["values"] == [70.0, 75.0]
    # per seed, the share of the gap to the 90% teacher: (70 - 50) / (90 - 50), (75 - 60) / (90 - 60)
    assert results["gap_closed_per_seed"] == pytest.approx([0.5, 0.5])
    assert results["shuffled_drop"]["values"] == pytest.approx([30.0, 5.0])
    assert results["lavit_minus_naive"]["accuracy"] == pytest.approx(17.5)
    # S_focus of LaViT's seeds read from the analysis: names in the order the fixture numbered them (0.1 each)
    assert methods["lavit"]["s_focus"]["values"] == pytest.approx([0.4, 0.6])
    assert methods["lavit (latent tokens)"]["s_focus"]["values"] == pytest.approx([0.7, 0.8])
    assert methods["lavit [masked]"]["accuracy"]["mean"] == 31.0
    # the validation curves averaged over seeds, step by step
    assert [(p["step"], p["val_accuracy"]["mean"]) for p in results["val_curves"]["lavit"]] == [(10, 40.5), (20, 51.0)]
    # the ablations in the order they were trained, each beside its own shuffled score
    assert [name for name in methods if name.startswith("ablation: ")] == ["ablation: no_semantic",
                                                                          "ablation: no_trajectory"]
    assert methods["ablation: no_semantic"]["shuffled"]["mean"] == 45.0
    assert results["stage_seconds"]["analysis"] == 1.5
    # binomial sampling noise: sqrt(.5 * .5 / 2000) = 1.118 points on the 2000 default test questions, 1.581 on the
    # 1000 validation ones; the lead of 2-seed means: sqrt((72.5 * 27.5 + 55 * 45) / 2000 / 2) = 1.283
    noise = results["sampling_noise"]
    assert (noise["test_questions"], noise["val_questions"]) == (2000, 1000)
    assert noise["test_at_50"] == pytest.approx(1.1180, abs=1e-4) and noise["val_at_50"] == pytest.approx(1.5811,
                                                                                                          abs=1e-4)
    assert noise["lead"] == pytest.approx(math.sqrt((72.5 * 27.5 + 55 * 45) / 2000 / 2), rel=1e-9)


def test_ablations_over_seeds_say_whether_each_part_matters(tmp_path):
    """Each ablation's seeds pooled as the full method's are; its cost called clear only beyond twice the larger seed
    std (the full method: 70, 75 -> std 2.5)."""
    stages = stages_of([50.0, 60.0], [70.0, 75.0], [40.0, 70.0],
                       ablations={"no_trajectory": ([60.0, 62.0], [30.0, 31.0]),
                                  "no_semantic": ([70.0, 74.0], [35.0, 36.0])})
    results = summarise(args_for(2, tmp_path), stages)
    methods = results["methods"]
    assert methods["ablation: no_trajectory"]["accuracy"]["values"] == [60.0, 62.0]
    assert methods["ablation: no_semantic"]["shuffled"]["mean"] == 35.5
    lines = verdict(results)
    assert any("Ablation no_trajectory (2 seeds): 61.0% against the full method's 72.5%, a cost of +11.5 points, "
               "more than twice the larger seed std (2.5)" in line for line in lines)
    assert any("Ablation no_semantic (2 seeds): 72.0%" in line and "a cost of +0.5 points, within twice" in line
               for line in lines)
    report = render_report(results)
    assert "| no_trajectory | 2 | 61.0 ± 1.0 | 30.5 ± 0.5 | +11.5 | yes (2 x 2.5) |" in report
    assert "| full method | 2 | 72.5 ± 2.5 | 55.0 ± 15.0 | — | — |" in report


def test_verdict_says_who_is_ahead_and_whether_it_is_clear(tmp_path):
    clear = verdict(summarise(args_for(2, tmp_path), stages_of([50.0, 52.0], [70.0, 72.0], [40.0, 42.0])))
    assert any("LaViT beat Naive SFT" in line and "larger than twice" in line and "+20.000 points" in line
               for line in clear)
    assert any("Both conditions of the demo's goal hold" in line for line in clear)
    # the same two-point lead inside a ten-point seed spread is not called clear
    noisy = verdict(summarise(args_for(2, tmp_path), stages_of([40.0, 60.0], [42.0, 62.0], [40.0, 60.0])))
    assert any("LaViT beat Naive SFT" in line and "within twice" in line for line in noisy)
    assert not any("Both conditions" in line for line in noisy)
    assert any("costs it 2.0 ± 0.0 points" in line and "less than 15 points" in line for line in noisy)
    # a tie is called a tie; students near chance (25%) are said to have learned nothing
    tied = verdict(summarise(args_for(2, tmp_path), stages_of([26.0, 26.0], [26.0, 26.0], [26.0, 26.0])))
    assert any("LaViT tied with Naive SFT" in line for line in tied)
    assert any("Naive SFT and LaViT are within 5 points of chance" in line for line in tied)
    # the validation curves rose by 10.5 points over their last interval
    assert any("LaViT on validation: 40.5% at step 10, 51.0% at step 20: still rising" in line for line in clear)


def test_report_shows_the_summary_numbers(tmp_path):
    results = summarise(args_for(2, tmp_path), stages_of([50.0, 60.0], [70.0, 75.0], [40.0, 70.0],
                                                         ablations={"single_stage": (66.0, 33.0)}))
    report = render_report(results)
    row = next(line for line in report.splitlines() if line.startswith("| naive_sft |"))
    assert row.split("|")[2].strip() == "55.0 ± 5.0"
    assert "| single_stage | 1 | 66.0 | 33.0 | +6.5 | yes (2 x 2.5) |" in report
    assert "| full method | 2 | 72.5 ± 2.5 | 55.0 ± 15.0 | — | — |" in report
    assert "Sampling noise: on 2000 test questions one model's accuracy carries a binomial standard deviation of at " \
           "most 1.1 points (at 50%; 1.6 on the 1000 validation questions" in report
    assert "| 20 | 51.0 ± 1.0 | 51.0 ± 1.0 |" in report  # both curves: 50 and 52 at step 20
    assert "GroundedSFTTrainer in grounding_lavit.py" in report
    assert "Naive SFT 50.0, 60.0; LaViT 70.0, 75.0." in report
    assert "learning rate 0.001 for LaViT and 0.0005 for Naive SFT, each chosen on validation)" in report
    assert "above the 90% target" in report
    assert "Their answers by option: A 20, B 40, C 30, D 30 (the difficulty" in report
    assert "rejected as correctness: 50, difficulty: 30" in report and "Smoke run" not in report
    assert "| analysis | 1.5 |" in report
    without = render_report(summarise(args_for(2, tmp_path), stages_of([50.0, 60.0], [70.0, 75.0], [40.0, 70.0])))
    assert "Table 3 ablations" not in without


def test_fmt_and_mean_std_show_no_number_where_there_is_none():
    assert fmt(mean_std([])) == "—" and mean_std([None, None])["n"] == 0
    assert fmt(mean_std([2.0, 4.0])) == "3.0 ± 1.0"
    assert fmt(mean_std([0.25]), scale=100, digits=0) == "25"
    assert fmt({"mean": math.nan, "std": 0.0, "n": 2}) == "—"
    assert mean_std([1.0, None, 3.0])["values"] == [1.0, 3.0]


def test_report_describes_a_plain_teacher_short_of_its_target_and_a_random_start(tmp_path):
    args = parse_args(["--output-dir", str(tmp_path / "run"), "--seeds", "2", "--teacher-grounding-weight", "0",
                       "--student-lr", "2e-3"])
    stages = stages_of([50.0, 60.0], [70.0, 75.0], [40.0, 70.0], teacher=80.0)
    stages["student"] = {"pretrain": None, "_seconds": 1.0}
    stages["dataset"].update(filter_stages=["correctness"], kept_answers=None)
    report = render_report(summarise(args, stages))
    assert "after 1000 steps of plain supervised fine-tuning, short of the 90% target" in report
    assert "grounding loss (weight" not in report
    assert "Both start from the same random student base." in report
    assert "with the filter stages correctness (S_focus threshold 0.15" in report
    assert "Both students train on the kept samples only." in report and "Their answers by option" not in report
    assert "learning rate 0.002 for LaViT and 0.0005 for Naive SFT) on those samples" in report  # not the chosen ones
    smoke = render_report(summarise(parse_args(["--output-dir", str(tmp_path / "smoke"), "--smoke"]),
                                    stages_of([50.0, 60.0], [70.0, 75.0], [40.0, 70.0])))
    assert smoke.startswith("# LaViT quickstart report\n\n**Smoke run**")


def test_record_of_several_task_seeds_checks_each_run(tmp_path):
    """benchmarks/record_quickstart.py --runs: each run's three conditions, recomputed from its numbers by hand."""
    import record_quickstart

    good = summarise(args_for(2, tmp_path), stages_of([50.0, 60.0], [70.0, 75.0], [40.0, 70.0]))
    # lead 17.5 over twice max(5.0, 2.5); gap (70-50)/40 and (75-60)/30 -> 50%; shuffled drop (30 + 5) / 2
    assert record_quickstart.acceptance(good) == {
        "lead": 17.5, "twice_spread": 10.0, "lead_clear": True, "gap_closed": 0.5, "gap_ok": True,
        "shuffled_drop": 17.5, "shuffled_ok": True}
    weak = summarise(args_for(2, tmp_path), stages_of([50.0, 60.0], [58.0, 66.0], [50.0, 60.0]))
    assert record_quickstart.acceptance(weak)["lead_clear"] is False  # +7 within 2 x 5
    body = record_quickstart.runs_body([("a", good), ("b", weak)])
    assert "| 0 | 90.0% at step 1000 | 120 (A 20, B 40, C 30, D 30) | 40.0 | 55.0 ± 5.0 | 72.5 ± 2.5 | +17.5 (10.0) | 50% ± 0% | 17.5 ± 12.5 |" \
        in body
    assert "lead 7.0 to 17.5 points, gap closed 20 to 50%" in body and "all three conditions hold in 1 of 2 runs" in body
    with pytest.raises(SystemExit, match="smoke"):
        record_quickstart.runs_body([("s", {**good, "smoke": True})])
