"""The evaluation harness: loaders in each benchmark's real schema, the option extractor, scoring, an end-to-end run
that resumes, the latent modes, bad input, and the lmms-eval model class."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark_fixtures import write_blink, write_mmstar, write_mmvp, write_vstar
from evaluation_lavit import (
    RunConfig,
    build_prompt,
    evaluate,
    extract_option,
    load_blink,
    load_mmstar,
    load_mmvp,
    load_vstar,
    read_predictions,
    render_report,
    score,
)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------


def test_mmvp_loader(tmp_path):
    samples = load_mmvp(write_mmvp(tmp_path, n=6))
    assert [s.id for s in samples] == ["1", "2", "3", "4", "5", "6"]
    assert samples[0].question == "Is the dog facing left in picture 1?"
    assert samples[0].options == ["Yes", "No"] and samples[0].answer == "A" and samples[1].answer == "B"
    assert [s.pair for s in samples] == [1, 1, 2, 2, 3, 3]
    assert len(samples[0].images) == 1 and samples[0].images[0]().size == (56, 56)


def test_mmvp_parquet_variant(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (28, 28), "red").save(buffer, format="PNG")
    table = pa.table({"Index": [1, 2], "Question": ["q1", "q2"], "Options": ["(a) up (b) down", "(a) up (b) down"],
                      "Correct Answer": ["(b)", "(a)"],
                      "image": [{"bytes": buffer.getvalue(), "path": None}] * 2})
    pq.write_table(table, tmp_path / "mmvp.parquet")
    samples = load_mmvp(tmp_path)
    assert [s.answer for s in samples] == ["B", "A"] and samples[0].images[0]().size == (28, 28)


def test_vstar_loader(tmp_path):
    root = write_vstar(tmp_path, n_attributes=4, n_relative=2)
    attributes = load_vstar(root)
    assert len(attributes) == 4 and {s.category for s in attributes} == {"direct_attributes"}
    first = attributes[0]
    assert first.question == "What is the color of the cup 0?"
    assert first.options == ["red", "blue", "green", "white"] and first.answer == "A"
    assert first.images[0]().size == (84, 56)
    assert len(load_vstar(root, category=None)) == 6


def test_blink_loader(tmp_path):
    root = write_blink(tmp_path, n=3)
    samples = load_blink(root)
    tasks = {s.benchmark for s in samples}
    assert tasks == {"blink/Relative_Depth", "blink/IQ_Test", "blink/Relative_Reflectance", "blink/Spatial_Relation"}
    depth = [s for s in samples if s.benchmark == "blink/Relative_Depth"]
    assert len(depth) == 3 and len(depth[0].images) == 2 and depth[0].options == ["A", "B"]
    iq = [s for s in samples if s.category == "IQ_Test"]
    assert iq[1].answer == "B" and len(iq[1].options) == 4 and len(iq[1].images) == 1
    assert len(load_blink(root, ["IQ_Test"])) == 3


def test_mmstar_loader(tmp_path):
    samples = load_mmstar(write_mmstar(tmp_path / "MMStar" / "mmstar.parquet", n=4))
    assert len(samples) == 4 and samples[2].answer == "C"
    assert samples[0].options == ["The suitcase is on the book.", "The suitcase is beneath the cat.",
                                  "The suitcase is beneath the bed.", "The suitcase is beneath the book."]
    assert samples[0].options_in_question and samples[1].category == "fine-grained perception"
    prompt = build_prompt(samples[0])
    assert prompt.count("The suitcase is on the book.") == 1  # not repeated
    assert prompt.endswith("Answer with the option letter from the given choices directly.")


def test_prompt_lists_the_options(tmp_path):
    sample = load_vstar(write_vstar(tmp_path))[0]
    assert build_prompt(sample) == ("What is the color of the cup 0?\nA. red\nB. blue\nC. green\nD. white\n"
                                    "Answer with the option letter from the given choices directly.")


# ---------------------------------------------------------------------------------------------------------------
# The extractor and the scores
# ---------------------------------------------------------------------------------------------------------------

FOUR = ["a red car", "a blue bus", "a dog", "two cats"]
EXTRACTIONS = [
    ("(B)", "B"), ("B", "B"), ("B.", "B"), ("b", "B"), ("(b)", "B"), ("C)", "C"), ("D:", "D"), ("  A  ", "A"),
    ("B. a blue bus", "B"), ("The answer is C", "C"), ("The answer is (C).", "C"), ("answer: d", "D"),
    ("Answer: D", "D"), ("I choose option B", "B"), ("The correct answer is option (A)", "A"),
    ("a dog is on the left, so (A)", "A"), ("Looking closely, (D) two cats", "D"),
    ("A dog is sitting next to a car.", "C"),  # the article is no option; the option's text decides
    ("Based on the image, it is B", "B"), ("It is C, clearly", "C"),
    ("Based on the image...", None), ("", None), ("   ", None), ("E", None), ("(E)", None),
    ("two cats", "D"), ("It shows a blue bus.", "B"), ("a red car or a blue bus", None), ("(A) or (B)", None),
    ("I think B, not C", None), ("The answer is B. C is wrong", "B"), ("[B]", "B"),
    ("A. a red car", "A"), ("A", "A"), ("A red car.", "A"), ("Answer: A", "A"),
]


@pytest.mark.parametrize("response, expected", EXTRACTIONS)
def test_option_extractor(response, expected):
    assert extract_option(response, FOUR) == expected


def test_extractor_respects_the_option_count():
    assert extract_option("C", ["yes", "no"]) is None
    assert extract_option("(b) No", ["Yes", "No"]) == "B"


def test_scores_on_hand_made_predictions():
    def rec(benchmark, i, prediction, answer, category="", pair=None):
        return {"benchmark": benchmark, "id": str(i), "prediction": prediction, "answer": answer, "category": category,
                "pair": pair}

    records = [
        rec("mmvp", 1, "A", "A", pair=1), rec("mmvp", 2, "B", "B", pair=1),  # pair 1 both right
        rec("mmvp", 3, "A", "A", pair=2), rec("mmvp", 4, "A", "B", pair=2),  # pair 2 half right
        rec("mmvp", 5, None, "A", pair=3), rec("mmvp", 6, "B", "B", pair=3),
        rec("mmstar", 1, "A", "A", "coarse"), rec("mmstar", 2, "B", "C", "coarse"), rec("mmstar", 3, "D", "D", "fine"),
        rec("blink/IQ_Test", 1, "A", "A"), rec("blink/IQ_Test", 2, "A", "B"),
        rec("blink/Relative_Depth", 1, "B", "B"),
    ]
    scores = score(records)
    assert scores["mmvp"]["accuracy"] == pytest.approx(100 * 4 / 6)
    assert scores["mmvp"]["pair_accuracy"] == pytest.approx(100 / 3) and scores["mmvp"]["unparseable"] == 1
    assert scores["mmstar"]["per_category"] == {"coarse": 50.0, "fine": 100.0}
    assert scores["blink"]["per_task"] == {"IQ_Test": 50.0, "Relative_Depth": 100.0}
    markdown, table = render_report({"tiny": scores})
    assert table["rows"]["tiny"]["MMVP"] == pytest.approx(100 * 4 / 6)
    assert table["rows"]["tiny"]["IQ-Test"] == 50.0 and table["rows"]["tiny"]["V* Attrib."] is None
    assert "| tiny | 66.67 | — | 100.00 | 50.00 | — | — | 66.67 |" in markdown
    assert "| LaViT-3B (paper) | 67.33 | 82.61 | 78.23 | 32.00 | 45.52 | 81.82 | 54.07 |" in markdown


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------


def test_end_to_end_writes_predictions_and_resumes(lavit_model, processor, tmp_path):
    samples = load_mmvp(write_mmvp(tmp_path / "mmvp", n=8))
    full = evaluate(lavit_model, processor, samples, tmp_path / "full.jsonl", batch_size=3, model_name="tiny",
                    progress=False)
    assert len(full.records) == 8 and full.resumed == 0
    lines = (tmp_path / "full.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["_header"]["benchmark"] == "mmvp" and len(lines) == 9
    # A run killed after its first batch, in the middle of writing the second: header, 3 records, a partial line.
    partial = tmp_path / "killed.jsonl"
    partial.write_text("\n".join(lines[:4]) + "\n" + lines[4][:17])
    resumed = evaluate(lavit_model, processor, samples, partial, batch_size=3, model_name="tiny", progress=False)
    assert resumed.resumed == 3
    assert {r["id"]: r for r in resumed.records} == {r["id"]: r for r in full.records}
    again = [json.loads(x) for x in partial.read_text().splitlines()[1:]]
    assert sorted(r["id"] for r in again) == sorted(s.id for s in samples)  # no sample lost or doubled
    markdown, table = render_report({"tiny [forced]": score(resumed.records)})
    assert table["rows"]["tiny [forced]"]["MMVP"] == pytest.approx(100 * sum(r["correct"] for r in full.records) / 8)


@pytest.mark.parametrize("mode", ["forced", "none", "masked", "zeroed", "shuffled"])
def test_every_latent_mode_runs(lavit_model, processor, tmp_path, mode):
    samples = load_vstar(write_vstar(tmp_path / "vstar"))
    result = evaluate(lavit_model, processor, samples, tmp_path / f"{mode}.jsonl", mode=mode, batch_size=2,
                      max_new_tokens=4, model_name="tiny", progress=False)
    assert len(result.records) == 4 and all(isinstance(r["response"], str) for r in result.records)
    assert json.loads((tmp_path / f"{mode}.jsonl").read_text().splitlines()[0])["_header"]["mode"] == mode


def test_none_mode_prompts_carry_no_latents(lavit_model, processor, tmp_path, monkeypatch):
    seen = []
    original = lavit_model.generate

    def spy(**kwargs):
        seen.append(kwargs["input_ids"])
        return original(**kwargs)

    monkeypatch.setattr(lavit_model, "generate", spy)
    samples = load_vstar(write_vstar(tmp_path / "vstar"))[:2]
    latent = torch.tensor(processor.latent_token_ids)
    evaluate(lavit_model, processor, samples, tmp_path / "none.jsonl", mode="none", batch_size=2, max_new_tokens=2,
             model_name="tiny", progress=False)
    evaluate(lavit_model, processor, samples, tmp_path / "forced.jsonl", mode="forced", batch_size=2, max_new_tokens=2,
             model_name="tiny", progress=False)
    assert not torch.isin(seen[0], latent).any()
    assert seen[1][:, -4:].tolist() == [processor.latent_token_ids] * 2


def test_stock_baseline_through_the_same_harness(tiny_base_dir, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from processing_lavit import LavitBaseProcessor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_base_dir).eval()
    processor = LavitBaseProcessor.from_pretrained(tiny_base_dir)
    samples = load_mmstar(write_mmstar(tmp_path / "mmstar.parquet"))
    result = evaluate(model, processor, samples, tmp_path / "base.jsonl", mode="none", batch_size=2,
                      max_new_tokens=3, model_name="base", progress=False)
    assert len(result.records) == 4
    with pytest.raises(ValueError, match="A stock model has no latent tokens"):
        evaluate(model, processor, samples, tmp_path / "x.jsonl", mode="forced", model_name="base", progress=False)


def test_evaluate_script(lavit_dir, tmp_path):
    args = [sys.executable, str(ROOT / "examples" / "evaluate.py"), "--model", lavit_dir,
            "--mmvp-dir", write_mmvp(tmp_path / "mmvp", n=4), "--vstar-dir", write_vstar(tmp_path / "vstar"),
            "--blink-dir", write_blink(tmp_path / "blink", n=2),
            "--mmstar-path", write_mmstar(tmp_path / "MMStar" / "mmstar.parquet"),
            "--modes", "forced", "masked", "--output-dir", str(tmp_path / "eval"), "--batch-size", "2",
            "--max-new-tokens", "3", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    name = Path(lavit_dir).name
    assert set(report["rows"]) >= {f"{name} [forced]", f"{name} [masked]", "LaViT-3B (paper)"}
    for row in (f"{name} [forced]", f"{name} [masked]"):
        assert all(report["rows"][row][c] is not None for c in report["columns"])
    markdown = (tmp_path / "eval" / "report.md").read_text()
    for row in report["rows"]:
        assert f"| {row} |" in markdown
    assert len(list((tmp_path / "eval").glob("predictions-*.jsonl"))) == 2 * 7
    # the report says which weights it scored (push_lavit.py publishes it only with them)
    from evaluation_lavit import model_fingerprint
    from modeling_lavit import LavitForConditionalGeneration

    assert report["model"] == lavit_dir and report["dtype"] == "float32"
    assert report["weights"] == model_fingerprint(LavitForConditionalGeneration.from_pretrained(lavit_dir, dtype="auto"))


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_missing_and_corrupt_images_are_counted(lavit_model, processor, tmp_path):
    samples = load_mmvp(write_mmvp(tmp_path / "mmvp", n=6, corrupt=True))
    result = evaluate(lavit_model, processor, samples, tmp_path / "p.jsonl", batch_size=4, max_new_tokens=2,
                      model_name="tiny", progress=False)
    assert len(result.records) == 4
    reasons = {s["id"]: s["reason"] for s in result.skipped}
    assert set(reasons) == {"2", "3"}
    assert reasons["2"].startswith("corrupt image") and reasons["3"].startswith("missing image")


def test_answer_outside_the_options(tmp_path):
    root = write_mmvp(tmp_path / "mmvp", n=2)
    text = Path(root, "Questions.csv").read_text().replace('"(a) Yes (b) No",(b)', '"(a) Yes (b) No",(c)')
    text = text.replace("(a) Yes (b) No,(b)", "(a) Yes (b) No,(c)")
    Path(root, "Questions.csv").write_text(text)
    with pytest.raises(ValueError, match=r"mmvp 2: the answer 'C' is not among the options \['A', 'B'\]"):
        load_mmvp(root)


def test_unknown_blink_task_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="Unknown BLINK task.*Relative_Depth.*Visual_Similarity"):
        load_blink(write_blink(tmp_path), ["Depth_Estimation"])


def test_predictions_of_another_run_are_refused(lavit_model, processor, tmp_path):
    samples = load_mmvp(write_mmvp(tmp_path / "mmvp", n=2))
    path = tmp_path / "p.jsonl"
    evaluate(lavit_model, processor, samples, path, max_new_tokens=2, model_name="model-a", progress=False)
    with pytest.raises(ValueError, match=r"another run \(it differs in \['model'\]"):
        evaluate(lavit_model, processor, samples, path, max_new_tokens=2, model_name="model-b", progress=False)
    vstar = load_vstar(write_vstar(tmp_path / "vstar"))
    with pytest.raises(ValueError, match=r"differs in \['benchmark'\]"):
        evaluate(lavit_model, processor, vstar, path, max_new_tokens=2, model_name="model-a", progress=False)
    (tmp_path / "other.jsonl").write_text('{"id": "1"}\n')
    with pytest.raises(ValueError, match="no header line"):
        read_predictions(tmp_path / "other.jsonl", RunConfig(model="m", benchmark="mmvp"))


# ---------------------------------------------------------------------------------------------------------------
# lmms-eval
# ---------------------------------------------------------------------------------------------------------------


class Instance:
    """lmms-eval's request shape: `args` = (context, generation kwargs, doc_to_visual, doc_id, task, split)."""

    def __init__(self, *args):
        self.args = args


def test_lmms_eval_model_class(lavit_dir, lavit_model, processor, tmp_path):
    from lmms_eval_lavit import LavitLmms

    lmms = LavitLmms(pretrained=lavit_dir, latent_mode="forced", batch_size=2, max_new_tokens=5, device="cpu")
    samples = load_vstar(write_vstar(tmp_path / "vstar"))
    lmms.task_dict = {"vstar_local": {"test": {i: s for i, s in enumerate(samples)}}}
    to_visual = lambda doc: [load() for load in doc.images]  # noqa: E731
    requests = [Instance(build_prompt(s), {"max_new_tokens": 5, "until": ["\n\n"]}, to_visual, i, "vstar_local", "test")
                for i, s in enumerate(samples)]
    answers = lmms.generate_until(requests)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    # the same greedy answers as the harness gives in forced mode
    result = evaluate(lavit_model, processor, samples, tmp_path / "p.jsonl", batch_size=2, max_new_tokens=5,
                      model_name="tiny", progress=False)
    assert answers == [r["response"] for r in result.records]
    with pytest.raises(NotImplementedError, match="answers by generation"):
        lmms.loglikelihood(requests)
    with pytest.raises(ValueError, match="latent_mode must be one of"):
        LavitLmms(pretrained=lavit_dir, latent_mode="sideways")


def test_lmms_eval_model_class_names_a_stock_checkpoint(tiny_base_dir, tmp_path):
    from lmms_eval_lavit import LavitLmms

    with pytest.raises(ValueError, match=r"is a 'qwen2_5_vl' checkpoint, not a LaViT one: .*convert it first"):
        LavitLmms(pretrained=tiny_base_dir)
    with pytest.raises(ValueError, match=r"does not exist \(and it is not a Hub id"):
        LavitLmms(pretrained=str(tmp_path / "no" / "such"))
