"""Attention analysis: metrics on hand-made maps, the word-category rule, trajectories against eager attention, the
perception gap, the example writing every figure, and bad input."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from analysis_lavit import (
    answer_trajectories,
    attention_analysis,
    attention_entropy,
    attention_maps,
    attention_statistics,
    focus_curve,
    focus_of,
    focus_summary,
    map_kl,
    perception_gap,
    salient_regions,
    spread,
    token_categories,
    word_category,
)
from conftest import TEACHER_WIDTH, noise_image
from lavit15k_fixture import write_lavit15k_folder
from processing_lavit import LavitBaseProcessor
from teacher_lavit import teacher_forced_inputs

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def test_one_hot_and_uniform_maps():
    one_hot = np.zeros(16)
    one_hot[5] = 0.3
    assert attention_entropy(one_hot) == 0.0
    assert salient_regions(one_hot) == 1
    uniform = np.full(16, 0.02)
    assert attention_entropy(uniform) == pytest.approx(math.log(16))
    assert salient_regions(uniform) == 0
    two = np.array([0.5, 0.5, 0.0, 0.0])
    assert attention_entropy(two) == pytest.approx(math.log(2))
    assert salient_regions(two) == 2  # 0.5 > 1.5 x 0.25


def test_spread_is_table_2():
    s = spread([2.0, 4.0, 6.0])
    assert s["mean"] == 4.0 and s["std"] == pytest.approx(math.sqrt(8 / 3))
    assert (s["min"], s["max"]) == (2.0, 6.0) and s["cv"] == pytest.approx(math.sqrt(8 / 3) / 4)
    stats = attention_statistics([np.eye(4)[0], np.full(4, 0.25)])
    assert stats["salient_regions"]["mean"] == 0.5 and stats["entropy"]["max"] == pytest.approx(math.log(4))


def test_focus_of_maps_inside_and_outside_a_box():
    image = Image.new("RGB", (112, 84))
    grid = (3, 4)
    inside = np.zeros(12)
    inside[1] = 1.0  # row 0, column 1: pixels x 28-56, y 0-28
    focus = focus_of([inside, inside], [grid, grid], [image, image], [[28, 0, 56, 28], [56, 28, 112, 84]])
    assert focus == [1.0, 0.0]
    assert focus_of([inside], [grid], [image], [None]) == [None]


def test_focus_curve():
    curve = focus_curve([0.05, 0.15, 0.25, 0.35], [False, False, True, True], [0.0, 0.1, 0.2, 0.3, 0.5])
    assert [c["n"] for c in curve] == [4, 3, 2, 1, 0]
    assert [c["accuracy"] for c in curve[:4]] == [0.5, pytest.approx(2 / 3), 1.0, 1.0]
    assert math.isnan(curve[4]["accuracy"])


def test_per_token_kl_on_hand_made_maps():
    p = np.array([0.5, 0.5, 0.0, 0.0])
    q = np.full(4, 0.25)
    assert map_kl(p, p) == pytest.approx(0.0, abs=1e-9)
    assert map_kl(p, q) == pytest.approx(math.log(2), abs=1e-6)  # 2 x 0.5 ln(0.5 / 0.25)
    assert map_kl(2 * p, 4 * q) == pytest.approx(math.log(2), abs=1e-6)  # normalised first
    with pytest.raises(ValueError, match="need a resize rule"):
        map_kl(np.ones(6), np.ones(24), (2, 3), (4, 6))
    # a uniform map resized stays uniform: identical to a uniform map on the other grid
    assert map_kl(np.ones(6), np.ones(24), (2, 3), (4, 6), resize=True) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    "word, category",
    [("the", "functional"), ("of", "functional"), ("is", "functional"), (",", "functional"), ("42", "functional"),
     ("red", "attribute"), ("Left", "attribute"), ("larger", "object"), ("small", "attribute"),
     ("above", "attribute"), ("wooden", "attribute"), ("dog", "object"), ("Umbrella", "object"),
     ("table.", "object"), ("three", "attribute"), ("their", "functional")],
)
def test_word_category_rule(word, category):
    assert word_category(word) == category


def test_token_categories_follow_words(processor):
    tokenizer = processor.tokenizer
    ids = tokenizer("the red dog").input_ids
    categories = token_categories(tokenizer, ids)
    words = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    assert len(categories) == len(ids)
    assert categories[0] == "functional" and categories[-1] == "object"
    assert "attribute" in categories and words[-1] == "the red dog"


# ---------------------------------------------------------------------------------------------------------------
# Trajectories
# ---------------------------------------------------------------------------------------------------------------

IMAGES = [noise_image(84, 56, 7), noise_image(112, 140, 8)]
QUESTIONS = ["what color is the object?", "where is the dog?"]


def test_trajectory_equals_eager(tiny_base_dir):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_base_dir).eval()
    processor = LavitBaseProcessor.from_pretrained(tiny_base_dir)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    responses = [processor.tokenizer("red").input_ids + [end], processor.tokenizer("on the left").input_ids + [end]]
    maps, grids = attention_maps(model, processor, IMAGES, QUESTIONS, responses, "response", per_token=True)
    eager = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_base_dir, attn_implementation="eager").eval()
    inputs, response_mask = teacher_forced_inputs(processor, IMAGES, QUESTIONS, responses)
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    assert grids == [(2, 3), (5, 4)]
    for b in range(2):
        image = (inputs["input_ids"][b] == model.config.image_token_id).nonzero()[:, 0]
        rows = response_mask[b].nonzero()[:, 0]
        expected = torch.stack([a[b][:, rows][:, :, image].double().mean(0) for a in attentions]).mean(0).numpy()
        assert maps[b].shape == expected.shape == (len(responses[b]), grids[b][0] * grids[b][1])
        assert np.abs(maps[b] - expected).max() <= 1e-6
    averaged, _ = attention_maps(model, processor, IMAGES, QUESTIONS, responses, "response")
    assert np.abs(averaged[1] - maps[1].mean(0)).max() <= 1e-6


def test_latent_rows_of_a_lavit_student(lavit_model, processor):
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    maps, grids = attention_maps(lavit_model, processor, IMAGES, QUESTIONS, [[end], [end]], "latents", per_token=True)
    assert maps[0].shape == (4, 6) and maps[1].shape == (4, 20)
    with torch.no_grad():
        inputs = processor.apply_chat_template(
            [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": q}]}]
             for im, q in zip(IMAGES, QUESTIONS)], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", processor_kwargs={"padding": True})
    del inputs  # the model's own latent attention is the renormalised version of these maps
    renormalised = maps[0] / maps[0].sum(-1, keepdims=True)
    assert np.allclose(renormalised.sum(-1), 1.0)


@pytest.mark.parametrize("teacher_width, through", [(64, "direct"), (TEACHER_WIDTH, "concept_head")])
def test_perception_gap(tmp_path, lavit_model, processor, teacher_width, through):
    from testing_lavit import save_tiny_qwen2_5_vl

    teacher_dir = save_tiny_qwen2_5_vl(tmp_path / "teacher", seed=3, text_hidden_size=teacher_width)
    teacher = Qwen2_5_VLForConditionalGeneration.from_pretrained(teacher_dir).eval()
    t_processor = LavitBaseProcessor.from_pretrained(teacher_dir)
    gap = perception_gap(teacher, t_processor, lavit_model, processor, IMAGES, QUESTIONS, ["the red dog", "left of it"])
    assert gap["cosine_through"] == through
    assert len(gap["per_token"]) == 3 + 1 + 3 + 1 or len(gap["per_token"]) > 4
    assert all(r["kl"] >= 0 and 0 <= r["cosine_distance"] <= 2 for r in gap["per_token"])
    counted = sum(v["tokens"] for v in gap["per_category"].values())
    assert counted == len(gap["per_token"])
    for category, value in gap["per_category"].items():
        rows = [r for r in gap["per_token"] if r["category"] == category]
        if rows:
            assert value["kl"] == pytest.approx(np.mean([r["kl"] for r in rows]))


# ---------------------------------------------------------------------------------------------------------------
# The whole analysis (the function examples/analyze_attention.py and the quickstart's analysis stage call)
# ---------------------------------------------------------------------------------------------------------------


def test_focus_summary_by_hand():
    summary = focus_summary([0.1, None, 0.5, 0.3], [True, True, False, True], [0.0, 0.2])
    assert summary["samples"] == 3  # the sample without a box has no S_focus
    assert [(point["n"], point["accuracy"]) for point in summary["curve"]] == [(3, pytest.approx(2 / 3)), (2, 0.5)]
    assert summary["mean_focus_correct"] == pytest.approx(0.2) and summary["mean_focus_incorrect"] == 0.5
    assert focus_summary([0.4], [True], [0.0])["mean_focus_incorrect"] is None
    with pytest.raises(ValueError):  # a flag for every S_focus
        focus_summary([0.1, 0.2], [True], [0.0])


def test_attention_analysis_reads_each_model_with_its_rows(tiny_base_dir, lavit_model, processor, tmp_path,
                                                            monkeypatch):
    import analysis_lavit

    generations = []
    generate = analysis_lavit.generate_answers
    monkeypatch.setattr(analysis_lavit, "generate_answers",
                        lambda model, *args, **kwargs: generations.append(model) or generate(model, *args, **kwargs))
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_base_dir).eval()
    base_processor = LavitBaseProcessor.from_pretrained(tiny_base_dir)
    boxes = [[0, 0, 28, 28], None]
    references = ["red", "left"]
    models = {"teacher": (base, base_processor, "response"), "student": (lavit_model, processor, "response"),
              "student (latents)": (lavit_model, processor, "latents")}
    judged = []

    def judge(answer, reference):
        judged.append((answer, reference))
        return len(judged) % 2 == 1  # right, wrong, right, ... in the order asked

    result = attention_analysis(
        models, IMAGES, QUESTIONS, boxes, tmp_path / "figures", references=references, judge=judge,
        responses=["the red dog", "left of it"], focus_lines={"flags": ([0.2, 0.4], [True, False])},
        pooled_lines={"both": ["teacher", "student"]}, gaps={"student": ("teacher", "student")},
        shown=["teacher", "student (latents)"], heatmaps=1, thresholds=[0.0, 0.3], max_new_tokens=4, batch_size=2,
        progress=False)
    assert generations == [base, lavit_model]  # one batch each: the student's latent rows read the answers it gave
    # each model answers greedily and its maps come from the rows it was given, composed here step by step
    for name, (model, model_processor, rows) in models.items():
        run = answer_trajectories(model, model_processor, IMAGES, QUESTIONS, 4, rows, 2)
        stats = result["per_model"][name]
        assert stats["rows"] == rows
        assert stats["s_focus"] == pytest.approx(focus_of(run["maps"], run["grids"], IMAGES, boxes)[0])
        assert stats["entropy"]["mean"] == pytest.approx(np.mean([attention_entropy(m) for m in run["maps"]]))
        assert stats["accuracy"] == 50.0  # one right and one wrong answer per model
    assert [reference for _, reference in judged] == references * 3
    assert result["per_model"]["student (latents)"]["s_focus"] != result["per_model"]["student"]["s_focus"]
    # Figure 2: a line given by its flags and a line pooled from two models' own answers (one box each)
    assert result["figure2"]["flags"] == focus_summary([0.2, 0.4], [True, False], [0.0, 0.3])
    assert result["figure2"]["both"]["samples"] == 2 and result["figure2"]["both"]["runs"] == ["teacher", "student"]
    # Figure 3 is the perception gap of the pair named
    gap = perception_gap(base, base_processor, lavit_model, processor, IMAGES, QUESTIONS, ["the red dog", "left of it"],
                         batch_size=2)
    assert result["perception_gap"]["student"] == {"per_category": gap["per_category"],
                                                   "cosine_through": gap["cosine_through"]}
    expected_sizes = {"figure2_accuracy_vs_focus.png": (600, 380), "figure3_perception_gap.png": (800, 340),
                      "figure4_entropy.png": (500, 350), "figure5_heatmaps.png": (520, 260)}  # 2 models x 1 sample
    assert sorted(result["figures"]) == sorted(expected_sizes)
    for name, size in expected_sizes.items():
        with Image.open(tmp_path / "figures" / name) as image:
            assert image.size == size


def test_attention_analysis_refuses_what_it_cannot_draw(lavit_model, processor, tmp_path):
    models = {"student": (lavit_model, processor, "response")}
    boxes = [None, None]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"names models it was not given: \['teacher'\]"):
        attention_analysis(models, IMAGES, QUESTIONS, boxes, out, responses=["a", "b"],
                           gaps={"gap": ("teacher", "student")})
    with pytest.raises(ValueError, match="need the references"):
        attention_analysis(models, IMAGES, QUESTIONS, boxes, out, pooled_lines={"line": ["student"]})
    with pytest.raises(ValueError, match="pass `responses`"):
        attention_analysis(models, IMAGES, QUESTIONS, boxes, out, gaps={"gap": ("student", "student")})
    with pytest.raises(ValueError, match="needs a judge"):
        attention_analysis(models, IMAGES, QUESTIONS, boxes, out, references=["a", "b"], progress=False)
    with pytest.raises(ValueError, match="2 images but 1 references: give one per sample"):
        attention_analysis(models, IMAGES, QUESTIONS, boxes, out, references=["a"], judge=str.__eq__)
    with pytest.raises(ValueError, match=r"labels \['line'\] are both a given line and a pooled one"):
        attention_analysis(models, IMAGES, QUESTIONS, boxes, out, references=["a", "b"], judge=str.__eq__,
                           focus_lines={"line": ([0.1], [True])}, pooled_lines={"line": ["student"]})
    assert not out.exists()  # refused before a model ran or anything was written
    # no heatmap asked: Figure 5 is not drawn (nor listed), the rest is
    result = attention_analysis(models, IMAGES, QUESTIONS, boxes, out, heatmaps=0, max_new_tokens=2, progress=False)
    assert result["figures"] == ["figure4_entropy.png"] and sorted(p.name for p in out.iterdir()) == result["figures"]
    assert result["per_model"]["student"]["s_focus"] is None  # no sample has a box


# ---------------------------------------------------------------------------------------------------------------
# The example, end to end
# ---------------------------------------------------------------------------------------------------------------


def test_example_writes_every_figure_and_consistent_tables(tiny_base_dir, lavit_dir, tmp_path):
    dataset = write_lavit15k_folder(tmp_path / "lavit15k", 6, TEACHER_WIDTH)
    out = tmp_path / "analysis"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "analyze_attention.py"), "--dataset", dataset, "--teacher",
         tiny_base_dir, "--student", lavit_dir, "--model", f"base={tiny_base_dir}", "--num-samples", "6",
         "--heatmaps", "3", "--max-new-tokens", "4", "--output-dir", str(out), "--no-progress", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    expected_sizes = {"figure2_accuracy_vs_focus.png": (600, 380), "figure3_perception_gap.png": (800, 340),
                      "figure4_entropy.png": (500, 350), "figure5_heatmaps.png": (780, 780)}
    assert sorted(report["figures"]) == sorted(expected_sizes)
    for name, size in expected_sizes.items():
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size == size
    markdown = (out / "report.md").read_text()
    # every number of the markdown tables is the JSON's, rounded
    for curve in report["figure2"]["curve"]:
        acc = "—" if curve["accuracy"] is None or math.isnan(curve["accuracy"]) else f"{curve['accuracy']:.4f}"
        assert f"| {curve['threshold']:.2f} | {curve['n']} | {acc} |" in markdown
    def cell(value):
        return "—" if value is None else f"{value:.4f}"

    for category, value in report["figure3"]["per_category"].items():
        assert f"| {category} | {value['tokens']} | {cell(value['kl'])} | {cell(value['cosine_distance'])} |" in markdown
    for name, stats in report["table2"].items():
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) == pytest.approx(stats["salient_regions"]["mean"], abs=5e-5)
        assert float(cells[6]) == pytest.approx(stats["entropy"]["mean"], abs=5e-5)
    assert set(report["table2"]) == {"teacher", "student", "base"}
    assert report["figure2"]["samples"] == 6
    assert list(report) == ["figure2", "figure3", "table2", "figures"]  # the report's shape
    for name, stats in report["table2"].items():  # each model's own answers judged against the dataset's
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {name} |"))
        assert row.strip("|").split("|")[-1].strip() == f"{stats['accuracy']:.1f}"


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_empty_sample_set():
    with pytest.raises(ValueError, match="sample set is empty"):
        attention_statistics([])
    with pytest.raises(ValueError, match="No samples"):
        focus_curve([], [], [0.1])


def test_a_prompt_without_an_image(tiny_base_dir):
    from teacher_lavit import forced_attention_pass

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_base_dir).eval()
    processor = LavitBaseProcessor.from_pretrained(tiny_base_dir)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(ValueError, match="needs an image"):
        forced_attention_pass(model, processor, [None], ["hello?"], [[end]])


def test_figure_2_needs_the_all_config(tiny_base_dir, tmp_path):
    dataset = write_lavit15k_folder(tmp_path / "lavit15k", 2, TEACHER_WIDTH)
    for path in (Path(dataset) / "all").glob("*.parquet"):
        path.unlink()
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "analyze_attention.py"), "--dataset", dataset, "--teacher",
         tiny_base_dir, "--output-dir", str(tmp_path / "x")],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    assert "`all` config" in result.stderr and "build_lavit_dataset.py writes it" in result.stderr
