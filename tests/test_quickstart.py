"""The quickstart's stage runner end to end (`--smoke`: every stage at toy size), its settings, and the students'
sweep built on it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def row_cell(report: str, name: str, column: int = 2) -> str:
    return next(line for line in report.splitlines() if line.startswith(f"| {name} |")).split("|")[column].strip()


def test_quickstart_smoke_writes_everything_and_resumes(tmp_path):
    out = tmp_path / "quickstart"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "MPLBACKEND": "Agg"}
    command = [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--output-dir", str(out), "--smoke"]
    start = time.time()
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    elapsed = time.time() - start
    assert first.returncode == 0, first.stderr[-4000:]
    assert elapsed < 180, f"the smoke run took {elapsed:.0f} s"
    # progress bars on the console, the Trainer's raw log dicts in the run's log file only
    assert "{'loss'" not in first.stdout + first.stderr and '{"loss"' not in first.stdout + first.stderr
    for bar in ("teacher", "student base pre-training", "naive_sft seed 1 (3/4)", "evaluate on test",
                "attention analysis"):
        assert bar in first.stderr, bar
    run_log = (out / "run.log").read_text()
    assert '"loss"' in run_log and "lavit seed 1 step" in run_log
    # Table 3's ablations added to the finished run: the eight stages resume, only the ablations train
    second = subprocess.run(command + ["--ablations"], env=env, capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    assert len(re.findall(r"done before, resumed", second.stderr)) == 8
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    for figure in results["figures"]:
        assert (out / figure).stat().st_size > 1000
    for stage in ("task", "models", "teacher", "student", "dataset", "students", "evaluate", "analysis", "ablations"):
        assert (out / "stages" / f"{stage}.json").exists()
    assert (out / "lavit15k" / "README.md").exists() and (out / "models" / "teacher" / "config.json").exists()
    # the report's numbers are results.json's
    methods = results["methods"]

    def shown(stat, digits=1):
        if not np.isfinite(stat["mean"]):
            return "—"
        return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")

    for name in ("teacher", "student base", "naive_sft", "lavit"):
        assert row_cell(report, name, 2) == shown(methods[name]["accuracy"], 1)
        assert row_cell(report, name, 3) == shown(methods[name]["s_focus"], 3)
        assert row_cell(report, name, 4) == shown(methods[name]["entropy"], 3)
    assert row_cell(report, "lavit (latent tokens)", 3) == shown(methods["lavit (latent tokens)"]["s_focus"], 3)
    assert row_cell(report, "forced", 3) == shown(methods["lavit"]["accuracy"])
    for mode in ("none", "masked", "zeroed", "shuffled"):
        assert row_cell(report, mode, 3) == shown(methods[f"lavit [{mode}]"]["accuracy"])
    # the validation curves (the step-count sweep): every student evaluated at steps 2 and 3 (the last)
    curves = results["val_curves"]
    assert [p["step"] for p in curves["naive_sft"]] == [2, 3] == [p["step"] for p in curves["lavit"]]
    for point in curves["lavit"]:
        assert row_cell(report, str(point["step"]), 3) == shown(point["val_accuracy"])
    # the gap-closed share, recomputed seed by seed from the per-seed accuracies
    teacher = methods["teacher"]["accuracy"]["mean"]
    expected = [(l["test_accuracy"] - n["test_accuracy"]) / (teacher - n["test_accuracy"])
                for l, n in zip(results["per_seed"]["lavit"], results["per_seed"]["naive_sft"])
                if teacher - n["test_accuracy"] > 0]
    assert results["gap_closed"]["values"] == pytest.approx(expected)
    assert "Smoke run" in report and "## Verdict" in report and not re.search(r"\bnan\b", report.lower())
    # the seeds vary the runs: each seed's student holds other weights
    from safetensors.torch import load_file

    for method in ("naive_sft", "lavit"):
        a, b = (load_file(out / "students" / f"{method}-seed{s}" / "model.safetensors") for s in (0, 1))
        assert any(not torch.equal(a[k], b[k]) for k in a), method
    # benchmarks/record_quickstart.py lays the same numbers out for RESULTS.md (and refuses a smoke run)
    import record_quickstart

    with pytest.raises(SystemExit, match="smoke"):
        record_quickstart.body_of(results)
    body = record_quickstart.body_of({**results, "smoke": False})
    seconds = dict(results["stage_seconds"])
    ablations = seconds.pop("ablations")
    for stage, value in seconds.items():
        assert f"| {stage} | {value:.1f} |" in body
    assert f"| total (make demo) | {sum(seconds.values()):.1f} |" in body  # the ablations kept apart
    assert f"not part of make demo) | {ablations:.1f} |" in body
    lavit_row = next(line for line in body.splitlines() if line.startswith("| lavit |"))
    assert lavit_row.split("|")[2].strip() == row_cell(report, "lavit")
    stamps = {p: p.stat().st_mtime for p in (out / "students").rglob("model.safetensors")}
    assert len(stamps) == 12  # 2 seeds x (Naive SFT, LaViT) and 2 seeds x the four Table 3 ablations
    assert results["methods"]["ablation: no_trajectory"]["accuracy"]["n"] == 2
    for name in ("no_trajectory", "no_semantic", "no_curriculum", "single_stage"):
        assert row_cell(report, name, 3) == shown(methods[f"ablation: {name}"]["accuracy"], 1)
    third = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-4000:]
    assert len(re.findall(r"done before, resumed", third.stderr)) == 9  # the ablations stay in the report
    assert stamps == {p: p.stat().st_mtime for p in (out / "students").rglob("model.safetensors")}
    assert json.loads((out / "results.json").read_text())["methods"] == methods
    # other settings in the same folder are refused, not silently mixed with the finished stages
    fourth = subprocess.run(command + ["--seed", "1"], env=env, capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert fourth.returncode != 0 and "seed: 0 then, 1 now" in fourth.stderr


@pytest.mark.parametrize(
    "flags, message",
    [(["--latent-attention-layers", "first"], "--latent-attention-layers: latent_attention_layers must be one of"),
     (["--latent-attention-layers", "last_3"], "last 3 layers of a 2-layer"),
     (["--latent-attention-layers", "0,5"], r"\[5\] are outside \[0, 2\)"),
     (["--student-steps", "0"], "--student-steps must be at least 1"),
     (["--naive-lr", "0"], r"--naive-lr must lie in \(0, 1\)"),
     (["--gate-warmup-fraction", "1.5"], "must lie in \\[0, 1\\]")],
)
def test_quickstart_refuses_bad_settings_before_running(tmp_path, flags, message, capsys):
    import quickstart_lavit as quickstart

    with pytest.raises(SystemExit) as stop:
        quickstart.parse_args(["--output-dir", str(tmp_path / "q"), *flags])
    assert stop.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "q").exists()


def test_quickstart_command_line_refuses_a_bad_layer_setting(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--output-dir",
                           str(tmp_path / "q"), "--latent-attention-layers", "middle"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "last_<n>" in done.stderr, done.stderr
    assert not (tmp_path / "q").exists()


def test_the_sweep_reads_its_runs_and_refuses_bad_ones(tmp_path):
    import sweep_students

    run = tmp_path / "run"
    run.mkdir()
    (run / "settings.json").write_text(json.dumps({"student_lr": 2e-3, "student_batch_size": 8, "text_layers": 2,
                                                   "gate_warmup_fraction": 0.4}))
    args, overrides, seed = sweep_students.parse_run("lavit:750:last:1:trajectory_loss_coef=1,every=50", str(run),
                                                     str(tmp_path / "out"))
    assert (args.student_steps, args.latent_attention_layers, args.student_eval_every, seed) == (750, "last", 50, 1)
    assert (args.student_lr, args.naive_lr, args.student_batch_size) == (2e-3, 2e-3, 8)  # the run's own settings
    assert overrides == {"trajectory_loss_coef": 1.0}
    args, overrides, _ = sweep_students.parse_run("naive_sft:10:all:0:student_lr=5e-4", str(run), str(tmp_path / "out"))
    assert overrides == {"distill": False} and args.naive_lr == 5e-4
    for spec, message in (("lavit:750:all", "method:steps:layers:seed"), ("dpo:750:all:0", "naive_sft or lavit"),
                          ("lavit:750:all:0:warmup=3", "unknown setting 'warmup'")):
        with pytest.raises(ValueError, match=message):
            sweep_students.parse_run(spec, str(run), str(tmp_path / "out"))
    with pytest.raises(SystemExit):  # a layer setting the 2-layer student cannot have
        sweep_students.parse_run("lavit:750:last_5:0", str(run), str(tmp_path / "out"))
