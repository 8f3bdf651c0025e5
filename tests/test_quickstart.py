"""The synthetic grounding task and the end-to-end quickstart (`--smoke`: every stage at toy size)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import synthetic_lavit as task
from data_lavit import read_visual_cot
from evaluation_lavit import load_mmvp

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", task.QUESTION_TYPES)
def test_boxes_contain_their_objects_one_per_cell(kind):
    samples = task.generate_split(40, seed=3, kind=kind)
    for sample in samples:
        cells = [o.cell for o in sample["objects"]]
        assert len(cells) == len(set(cells))  # one object per cell
        for obj in sample["objects"]:
            x1, y1, x2, y2 = obj.box
            r, c = obj.cell
            assert c * 28 <= x1 < x2 <= (c + 1) * 28 and r * 28 <= y1 < y2 <= (r + 1) * 28  # wholly inside its cell
        target_color = np.array(task.COLORS[sample["objects"][0].color])
        pixels = np.asarray(sample["image"]).astype(int)
        painted = np.abs(pixels - target_color).sum(-1) < 30
        ys, xs = painted.nonzero()
        x1, y1, x2, y2 = sample["box"]
        assert len(xs) > 0
        assert xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2  # the box holds the key object


@pytest.mark.parametrize("kind", ["size", "shape", "count"])
def test_answers_are_balanced(kind):
    counts = Counter(s["answer"] for s in task.generate_split(80, seed=5, kind=kind))
    assert counts == {"A": 20, "B": 20, "C": 20, "D": 20}


def test_size_answers_match_the_drawn_objects():
    for sample in task.generate_split(20, seed=9):
        target = sample["objects"][0]
        x1, y1, x2, y2 = target.box
        assert x2 - x1 == task.SIZES[target.size]
        assert sample["options"][ord(sample["answer"]) - ord("A")] == target.size


def test_splits_are_disjoint_and_read_by_the_real_loaders(tmp_path):
    paths = task.write_task(str(tmp_path), train=24, val=8, test=12, seed=1)
    train, skipped = read_visual_cot(paths["train"])
    assert len(train) == 24 and skipped == []
    assert all(s.bbox is not None and s.question.endswith("directly.") for s in train)
    records = {split: json.loads(Path(paths[split]).read_text()) for split in ("train", "val", "test")}
    # no scene in two splits: compare what was drawn, not the file names
    from PIL import Image

    drawn = {split: {Image.open(Path(paths["images"]) / r["image"][0]).tobytes() for r in rs}
             for split, rs in records.items()}
    assert len(drawn["train"]) == 24
    assert not (drawn["train"] & drawn["val"]) and not (drawn["train"] & drawn["test"])
    assert not (drawn["val"] & drawn["test"])
    test = load_mmvp(paths["test_mmvp"])
    assert len(test) == 12 and all(t.options == ["tiny", "small", "medium", "large"] for t in test)
    test_records = records["test"]
    assert [t.answer for t in test] == [r["conversations"][3]["value"] for r in test_records]
    # The harness prompt is the training prompt: the same text reaches the model in every stage.
    from evaluation_lavit import build_prompt

    viscot_test, _ = read_visual_cot(paths["test"])
    assert [build_prompt(t) for t in test] == [s.question for s in viscot_test]


def test_size_question_draws_squares_and_shapes_are_validated():
    assert {o.shape for s in task.generate_split(20, seed=4) for o in s["objects"]} == {"square"}
    mixed = task.generate_split(40, seed=4, shapes=task.SHAPES)
    assert len({o.shape for s in mixed for o in s["objects"]}) > 1
    with pytest.raises(ValueError, match="Unknown shapes"):
        task.generate_split(4, seed=0, shapes=("hexagon",))
    with pytest.raises(ValueError, match="needs every shape"):
        task.generate_split(4, seed=0, kind="count", shapes=("square",))
    with pytest.raises(ValueError, match="multiple of 28"):
        task.generate_split(4, seed=0, image_size=100)


def test_same_size_scenes_need_no_look_up():
    samples = task.generate_split(40, seed=7, same_size=True)
    for sample in samples:
        sizes = {o.size for o in sample["objects"]}
        assert len(sizes) == 1  # any object shows the answer
        assert sample["options"][ord(sample["answer"]) - ord("A")] == sizes.pop()
        for obj in sample["objects"]:
            x1, y1, x2, y2 = obj.box
            assert x2 - x1 == task.SIZES[obj.size]
    assert Counter(s["answer"] for s in samples) == {"A": 10, "B": 10, "C": 10, "D": 10}
    with pytest.raises(ValueError, match="size question only"):
        task.generate_split(4, seed=7, kind="shape", same_size=True)


def test_too_few_distinct_scenes_is_an_error_not_a_hang():
    # one object, centred (jitter 0): 16 cells x 8 colours per answer, so 600 scenes cannot be distinct
    with pytest.raises(ValueError, match="too few distinct scenes"):
        task.generate_split(600, seed=0, n_objects=1, jitter=0)
    assert len(task.generate_split(100, seed=0, n_objects=1, jitter=0)) == 100


def test_scene_exclusion_keeps_splits_apart():
    first = task.generate_split(30, seed=0)
    keys = {s["key"] for s in first}
    second = task.generate_split(30, seed=0, exclude=keys)  # the same seed would repeat every scene
    assert not keys & {s["key"] for s in second}


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
    assert len(stamps) == 8  # 2 seeds x (Naive SFT, LaViT) and the four Table 3 ablations
    for name in ("no_trajectory", "no_semantic", "no_curriculum", "single_stage"):
        assert row_cell(report, name) == shown(methods[f"ablation: {name}"]["accuracy"], 1)
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


# ----------------------------------------------------------------------------------------------------------------
# The quickstart teacher's grounding loss (GroundedSFTTrainer in examples/quickstart.py)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grounding_setup(tmp_path_factory):
    """A tiny LaViT checkpoint whose tokenizer was trained on the task's questions, and rows of the size task."""
    from conftest import stock_copy
    from conversion_lavit import convert_qwen2_5_vl_to_lavit
    from modeling_lavit import LavitForConditionalGeneration
    from processing_lavit import LavitProcessor
    from testing_lavit import save_tiny_qwen2_5_vl, tiny_corpus, train_tiny_tokenizer

    samples = task.generate_split(6, seed=11)
    corpus = [task.prompt_of(s) for s in task.generate_split(200, seed=12)] + tiny_corpus(200)
    tokenizer = train_tiny_tokenizer(vocab_size=600, corpus=corpus)
    base = save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("grounding_base"), seed=4, tokenizer=tokenizer)
    path = convert_qwen2_5_vl_to_lavit(base, tmp_path_factory.mktemp("grounding_lavit"), teacher_hidden_size=16)
    rows = [{"image": s["image"], "question": task.prompt_of(s), "answer": s["answer"], "box": s["box"]}
            for s in samples]
    model = LavitForConditionalGeneration.from_pretrained(path).eval()
    return model, LavitProcessor.from_pretrained(path), rows, samples, stock_copy


def test_grounding_collator_points_at_the_colour_word_and_the_key_cell(grounding_setup):
    from quickstart_lavit import GroundingCollator

    _, processor, rows, samples, _ = grounding_setup
    batch = GroundingCollator(processor)(rows)
    tokenizer = processor.tokenizer
    for b, sample in enumerate(samples):
        word = tokenizer.decode([int(batch["input_ids"][b, batch["grounding_query"][b, 0]])]).strip()
        assert word == sample["objects"][0].color
        x1, y1, x2, y2 = sample["box"]  # the key object lies wholly inside one 28-pixel cell of the 4 x 4 grid
        expected = torch.zeros(16)
        expected[(y1 // 28) * 4 + x1 // 28] = 1.0
        assert torch.equal(batch["grounding_target"][b], expected)


def test_grounding_loss_reads_the_attention_eager_attention_computes(grounding_setup, tmp_path):
    from quickstart_lavit import GroundedSFTTrainer, GroundingCollator
    from trainer_lavit import LavitSFTConfig

    model, processor, rows, _, stock_copy = grounding_setup
    batch = GroundingCollator(processor)(rows)
    config = LavitSFTConfig(str(tmp_path), use_cpu=True, distill=False, report_to="none", max_steps=1,
                            activation_checkpointing=False)
    from datasets import Dataset

    columns = Dataset.from_list([{"image": None, "question": r["question"], "answer": r["answer"]} for r in rows])
    trainer = GroundedSFTTrainer(model=model, args=config, processing_class=processor, grounding_weight=0.5,
                                 train_dataset=columns)
    inputs = {k: v for k, v in batch.items()}
    target = inputs["grounding_target"].clone()
    query = inputs["grounding_query"][:, 0].clone()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        without_target = {k: v for k, v in inputs.items() if k != "grounding_target"}
        _, attention, _ = trainer.grounding_attention(model, without_target)
        eager = stock_copy(model, "eager")
        plain = {k: v for k, v in inputs.items() if not k.startswith("grounding_") and k != "labels"}
        out = eager(**plain, output_attentions=True)
        labels_out = eager(**plain, labels=inputs["labels"])
    image = inputs["input_ids"] == model.config.image_token_id
    expected = torch.stack([out.attentions[0][b, :, query[b]].mean(0)[image[b]] for b in range(len(rows))])
    expected = expected / expected.sum(-1, keepdim=True)
    assert torch.allclose(attention, expected, atol=1e-5)
    kl = (target * (target.clamp_min(1e-30).log() - expected.log())).where(target > 0, torch.tensor(0.0)).sum(-1).mean()
    assert torch.allclose(loss, labels_out.loss + 0.5 * kl, atol=1e-4)
    assert trainer._metrics["train" if model.training else "eval"]["ntp_loss"][-1] == pytest.approx(
        labels_out.loss.item(), abs=1e-4)
    # the term trains the first layer's queries and keys through the captured attention
    model.zero_grad()
    _, attention, mask = trainer.grounding_attention(model, {k: v for k, v in inputs.items() if k != "grounding_target"})
    (-(target * attention.clamp_min(1e-8).log()).sum(-1).mean()).backward()
    attention_layer = model.model.language_model.layers[0].self_attn
    assert attention_layer.q_proj.weight.grad.abs().sum() > 0 and attention_layer.k_proj.weight.grad.abs().sum() > 0


def test_grounding_loss_refuses_questions_it_cannot_ground(grounding_setup):
    from quickstart_lavit import GroundingCollator

    _, processor, rows, _, _ = grounding_setup
    collator = GroundingCollator(processor)
    with pytest.raises(ValueError, match="names no object.*teacher-grounding-weight 0"):
        collator([dict(rows[0], question="How many squares are there?")])
    with pytest.raises(ValueError, match="tokens for this tokenizer.*train the tokenizer"):
        collator([dict(rows[0], question=rows[0]["question"].replace("the " + rows[0]["question"].split("the ")[2]
                                                                           .split()[0], "the zyxwvutq"))])


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
