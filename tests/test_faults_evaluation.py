"""Issue 15, evaluation: nothing stale, partial or damaged is trusted. New weights at the same path do not resume old
predictions, bad counts stop at parse time, a loader pointed at the wrong folder or a damaged file names the layout it
expected and what it found, and --stock is checked against the checkpoint's config.json before any loading."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from benchmark_fixtures import write_blink, write_mmstar, write_mmvp, write_vstar
from conversion_lavit import convert_qwen2_5_vl_to_lavit
from evaluation_lavit import (
    evaluate,
    generate_texts,
    load_blink,
    load_mmstar,
    load_mmvp,
    load_vstar,
    model_fingerprint,
)
from modeling_lavit import LavitForConditionalGeneration
from testing_lavit import save_tiny_qwen2_5_vl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    """examples/evaluate.py as a module, so that `main` runs in this process."""
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "examples" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def retrained_dir(tmp_path_factory) -> str:
    """A LaViT checkpoint of the same architecture and tokenizer as `lavit_dir`, with other weights (seed 1)."""
    base = save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl_seed1"), seed=1)
    return convert_qwen2_5_vl_to_lavit(base, tmp_path_factory.mktemp("tiny_lavit_seed1"), teacher_hidden_size=48)


def load(path) -> LavitForConditionalGeneration:
    return LavitForConditionalGeneration.from_pretrained(path).eval()


def file_state(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# 1. New weights at the same path
# ---------------------------------------------------------------------------------------------------------------


def test_fingerprint_follows_the_weights_not_the_path(lavit_dir, retrained_dir, tmp_path):
    original = load(lavit_dir)
    moved = load(shutil.copytree(lavit_dir, tmp_path / "moved"))
    assert model_fingerprint(moved) == model_fingerprint(original)  # same content elsewhere
    assert model_fingerprint(load(retrained_dir)) != model_fingerprint(original)  # another seed
    edited = load(lavit_dir)
    name, tensor = max(edited.state_dict().items(), key=lambda item: item[1].numel())
    assert tensor.numel() > 4096  # a tensor that is sampled, not read whole
    with torch.no_grad():
        tensor.view(-1)[-1] += 1.0  # the last value: the strided sample reaches the end of a tensor
    assert model_fingerprint(edited) != model_fingerprint(original), name
    assert model_fingerprint(load(lavit_dir).to(torch.bfloat16)) != model_fingerprint(original)  # another dtype


def test_new_weights_at_the_same_path_are_not_resumed(lavit_dir, retrained_dir, processor, tmp_path):
    checkpoint = tmp_path / "m"
    shutil.copytree(lavit_dir, checkpoint)
    samples = load_vstar(write_vstar(tmp_path / "vstar"))
    predictions = tmp_path / "eval" / "predictions.jsonl"
    old = evaluate(load(checkpoint), processor, samples, predictions, batch_size=2, max_new_tokens=4,
                   model_name=str(checkpoint), progress=False)
    assert len(old.records) == 4 and old.resumed == 0
    written = predictions.read_bytes()

    shutil.copytree(retrained_dir, checkpoint, dirs_exist_ok=True)  # a new training run saved at the same path
    new_model = load(checkpoint)
    with pytest.raises(ValueError, match=r"predictions\.jsonl holds predictions made by other weights .* Delete the "
                                         r"file to evaluate the current weights, or use a new output path"):
        evaluate(new_model, processor, samples, predictions, batch_size=2, max_new_tokens=4,
                 model_name=str(checkpoint), progress=False)
    assert predictions.read_bytes() == written  # the old predictions are kept, not overwritten

    # Following the message (a new output path), every answer comes from the new weights.
    fresh = evaluate(new_model, processor, samples, tmp_path / "eval2" / "predictions.jsonl", batch_size=2,
                     max_new_tokens=4, model_name=str(checkpoint), progress=False)
    assert fresh.resumed == 0
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]]
    images = [[samples[0].images[0]()]]
    new_answer = generate_texts(new_model, processor, messages, images, "forced", 4)
    old_answer = generate_texts(load(lavit_dir), processor, messages, images, "forced", 4)
    assert new_answer != old_answer  # the two checkpoints answer differently, so reused answers would show
    assert [r["response"] for r in fresh.records] != [r["response"] for r in old.records]


def test_evaluate_script_refuses_predictions_of_replaced_weights(script, lavit_dir, retrained_dir, tmp_path):
    checkpoint = tmp_path / "m"
    shutil.copytree(lavit_dir, checkpoint)
    argv = ["--model", str(checkpoint), "--mmvp-dir", write_mmvp(tmp_path / "mmvp", n=2), "--output-dir",
            str(tmp_path / "eval"), "--batch-size", "2", "--max-new-tokens", "2", "--device", "cpu", "--no-progress"]
    script.main(argv)
    predictions = tmp_path / "eval" / "predictions-mmvp-forced.jsonl"
    assert len(predictions.read_text().splitlines()) == 3
    shutil.copytree(retrained_dir, checkpoint, dirs_exist_ok=True)
    with pytest.raises(ValueError, match=rf"{predictions.name} holds predictions made by other weights"):
        script.main(argv)


# ---------------------------------------------------------------------------------------------------------------
# 2 and 4. Counts are checked where they are parsed; nothing is loaded or written for a bad one
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, message", [
    ("--limit", "0", "must be a whole number of at least 1, got '0'"),
    ("--limit", "-3", "must be a whole number of at least 1, got '-3'"),
    ("--batch-size", "0", "must be a whole number of at least 1, got '0'"),
    ("--max-new-tokens", "0", "must be a whole number of at least 1, got '0'"),
    ("--batch-size", "two", "must be a whole number of at least 1, got 'two'"),
    ("--blink-tasks", "Depth_Estimation", "invalid choice: 'Depth_Estimation'"),
])
def test_bad_counts_stop_at_parse_time(script, tmp_path, capsys, option, value, message):
    output = tmp_path / "eval"
    argv = ["--model", str(tmp_path / "no-such-model"), "--mmvp-dir", str(tmp_path / "no-mmvp"),
            "--output-dir", str(output), option, value]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    assert f"argument {option}: {message}" in capsys.readouterr().err
    assert not output.exists()


def test_zero_batch_size_writes_no_predictions_file(lavit_model, processor, tmp_path):
    samples = load_mmvp(write_mmvp(tmp_path / "mmvp", n=2))
    path = tmp_path / "p.jsonl"
    for kwargs in ({"batch_size": 0}, {"batch_size": -1}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError, match=rf"{next(iter(kwargs))} must be a positive whole number"):
            evaluate(lavit_model, processor, samples, path, model_name="tiny", progress=False, **kwargs)
        assert not path.exists()
    with pytest.raises(ValueError, match="No samples to evaluate"):
        evaluate(lavit_model, processor, [], path, model_name="tiny", progress=False)
    assert not path.exists()


def test_limit_counts_only_the_samples_it_resumes(lavit_model, processor, tmp_path):
    samples = load_mmvp(write_mmvp(tmp_path / "mmvp", n=4))
    path = tmp_path / "p.jsonl"
    evaluate(lavit_model, processor, samples, path, batch_size=4, max_new_tokens=2, model_name="tiny", progress=False)
    again = evaluate(lavit_model, processor, samples[:2], path, batch_size=4, max_new_tokens=2, model_name="tiny",
                     progress=False)
    assert len(again.records) == 2 and again.resumed == 2


# ---------------------------------------------------------------------------------------------------------------
# 3. Loaders pointed at the wrong folder or a damaged file
# ---------------------------------------------------------------------------------------------------------------


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def rewrite_parquet_without(path: Path, column: str) -> None:
    table = pq.read_table(path)
    pq.write_table(table.drop_columns([column]), path)


def test_mmvp_wrong_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty is not MMVP's layout: expected MMVP's folder: Questions\.csv .*"
                                         r"it is an empty folder\. Point --mmvp-dir"):
        load_mmvp(empty)
    vstar = write_vstar(tmp_path / "vstar")
    with pytest.raises(ValueError, match=r"vstar is not MMVP's layout: .*it holds direct_attributes/, "
                                         r"relative_position/, test_questions\.jsonl"):
        load_mmvp(vstar)
    with pytest.raises(ValueError, match=r"missing is not MMVP's layout: .*it does not exist"):
        load_mmvp(tmp_path / "missing")
    root = Path(write_mmvp(tmp_path / "mmvp", n=2))
    shutil.rmtree(root / "MMVP Images")
    with pytest.raises(ValueError, match=r"it holds Questions\.csv\. The images belong in .*MMVP Images"):
        load_mmvp(root)


def test_mmvp_damaged_files(tmp_path):
    root = Path(write_mmvp(tmp_path / "mmvp", n=4))
    questions = root / "Questions.csv"
    lines = questions.read_text().splitlines(keepends=True)
    questions.write_text("".join(lines[:4]) + lines[4].split(",")[0] + ",Is the dog")  # cut in its 5th line
    with pytest.raises(ValueError, match=r"Questions\.csv line 5: the row ends before its \['Options', 'Correct "
                                         r"Answer'\] field\(s\); the file is truncated"):
        load_mmvp(root)
    with open(questions, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Index", "Question", "Correct Answer"])
        writer.writerow([1, "Is the dog facing left?", "(a)"])
    with pytest.raises(ValueError, match=r"Questions\.csv lacks the column\(s\) \['Options'\] of MMVP's Questions\.csv"
                                         r" .* its header is \['Index', 'Question', 'Correct Answer'\]"):
        load_mmvp(root)
    questions.write_text("")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['Index', 'Question', 'Options', 'Correct Answer'\]"
                                         r" .* its header is empty"):
        load_mmvp(root)
    questions.write_text('Index,Question,Options,Correct Answer\n1,Is it?,Yes or No,(a)\n')
    with pytest.raises(ValueError, match=r"mmvp 1: no options could be read from .*Questions\.csv line 2 \(expected "
                                         r"options such as '\(a\) Yes \(b\) No'\)"):
        load_mmvp(root)


def test_mmvp_damaged_parquet(tmp_path):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (28, 28), "red").save(buffer, format="PNG")
    columns = {"Index": [1, 2], "Question": ["q1", "q2"], "Options": ["(a) up (b) down"] * 2,
               "Correct Answer": ["(b)", "(a)"], "image": [{"bytes": buffer.getvalue(), "path": None}] * 2}
    path = tmp_path / "mmvp.parquet"
    pq.write_table(pa.table(columns), path)
    assert len(load_mmvp(tmp_path)) == 2
    rewrite_parquet_without(path, "image")
    with pytest.raises(ValueError, match=r"mmvp\.parquet lacks the column\(s\) \['image'\] of MMVP's layout"):
        load_mmvp(tmp_path)
    pq.write_table(pa.table(columns), path)
    truncate(path)
    with pytest.raises(ValueError, match=r"mmvp\.parquet is not a readable parquet file .*truncated or damaged: "
                                         r"download MMVP again"):
        load_mmvp(path)


def test_vstar_wrong_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty is not V\*Bench's layout: expected V\*Bench's folder: "
                                         r"test_questions\.jsonl .*it is an empty folder\. Point --vstar-dir"):
        load_vstar(empty)
    mmvp = write_mmvp(tmp_path / "mmvp", n=2)
    with pytest.raises(ValueError, match=r"mmvp is not V\*Bench's layout: .*it holds MMVP Images/, Questions\.csv"):
        load_vstar(mmvp)
    root = write_vstar(tmp_path / "vstar")
    with pytest.raises(ValueError, match=r"holds no question of category 'direct_attribute' \(its categories: "
                                         r"\['direct_attributes', 'relative_position'\]\)"):
        load_vstar(root, category="direct_attribute")


def test_vstar_damaged_file(tmp_path):
    root = Path(write_vstar(tmp_path / "vstar"))
    path = root / "test_questions.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])  # cut in its 4th line
    with pytest.raises(ValueError, match=r"test_questions\.jsonl line 4 is not valid JSON \(.*\): the file is "
                                         r"truncated or damaged: download V\*Bench again"):
        load_vstar(root)
    rows = [json.loads(line) for line in lines]
    del rows[1]["label"]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"test_questions\.jsonl line 2 lacks the field\(s\) \['label'\] of "
                                         r"V\*Bench's questions .* it has \['category', 'image', 'question_id', "
                                         r"'text'\]"):
        load_vstar(root)
    rows = [json.loads(line) for line in lines]
    rows[2]["question_id"] = rows[0]["question_id"]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"test_questions\.jsonl: the id\(s\) \['0'\] appear more than once"):
        load_vstar(root)


def test_blink_wrong_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty is not BLINK's layout: expected BLINK's folder: <Task>/val-\*\.parquet"
                                         r" .*it is an empty folder\. Download BLINK's Relative_Depth split into "):
        load_blink(empty)
    root = Path(write_blink(tmp_path / "blink", tasks=("Relative_Depth",)))
    with pytest.raises(ValueError, match=r"Relative_Depth is not BLINK's layout: .*it holds "
                                         r"val-00000-of-00001\.parquet\. .*point --blink-dir at the folder that holds "
                                         r"the task folders"):
        load_blink(root / "Relative_Depth", ["Relative_Depth"])
    with pytest.raises(ValueError, match=r"blink is not BLINK's layout: .*it holds Relative_Depth/\. Download BLINK's "
                                         r"IQ_Test split"):
        load_blink(root, ["Relative_Depth", "IQ_Test"])


def test_blink_damaged_files(tmp_path):
    root = Path(write_blink(tmp_path / "blink", tasks=("IQ_Test",)))
    path = root / "IQ_Test" / "val-00000-of-00001.parquet"
    rewrite_parquet_without(path, "choices")
    with pytest.raises(ValueError, match=r"val-00000-of-00001\.parquet lacks the column\(s\) \['choices'\] of BLINK's"
                                         r" layout .*its columns are \['idx', 'question'"):
        load_blink(root, ["IQ_Test"])
    write_blink(tmp_path / "blink", tasks=("IQ_Test",))
    truncate(path)
    with pytest.raises(ValueError, match=r"IQ_Test/val-00000-of-00001\.parquet is not a readable parquet file"):
        load_blink(root, ["IQ_Test"])
    write_blink(tmp_path / "blink", tasks=("IQ_Test",))
    table = pq.read_table(path)
    empty_choices = pa.array([[]] * table.num_rows, type=pa.list_(pa.string()))
    pq.write_table(table.set_column(table.column_names.index("choices"), "choices", empty_choices), path)
    with pytest.raises(ValueError, match=r"blink/IQ_Test val_IQ_Test_0: no options could be read from .*row 0 "
                                         r"\(expected a list of choices\)"):
        load_blink(root, ["IQ_Test"])


def test_mmstar_wrong_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty is not MMStar's layout: expected MMStar's mmstar\.parquet .*it is an "
                                         r"empty folder\. Point --mmstar-path at MMStar's mmstar\.parquet"):
        load_mmstar(empty)
    with pytest.raises(ValueError, match=r"mmstar\.parquet is not MMStar's layout: .*it does not exist"):
        load_mmstar(tmp_path / "MMStar" / "mmstar.parquet")
    vstar = Path(write_vstar(tmp_path / "vstar"))
    with pytest.raises(ValueError, match=r"test_questions\.jsonl is not MMStar's layout: .*it is a file of \d+ bytes"):
        load_mmstar(vstar / "test_questions.jsonl")


def test_mmstar_damaged_files(tmp_path):
    path = Path(write_mmstar(tmp_path / "MMStar" / "mmstar.parquet"))
    rewrite_parquet_without(path, "index")
    with pytest.raises(ValueError, match=r"mmstar\.parquet lacks the column\(s\) \['index'\] of MMStar's layout .*"
                                         r"its columns are \['question', 'image', 'answer', 'category', "
                                         r"'l2_category'\]\. Point the loader at MMStar's published file"):
        load_mmstar(path)
    write_mmstar(path)
    truncate(path)
    with pytest.raises(ValueError, match=r"mmstar\.parquet is not a readable parquet file .*download MMStar again"):
        load_mmstar(path)
    write_mmstar(path)
    table = pq.read_table(path)
    questions = pa.array([q.split("\nOptions:")[0] for q in table.column("question").to_pylist()])
    pq.write_table(table.set_column(table.column_names.index("question"), "question", questions), path)
    with pytest.raises(ValueError, match=r"mmstar 0: no options could be read from .*mmstar\.parquet row 0 \(expected "
                                         r"the options after 'Options:'"):
        load_mmstar(path)


# ---------------------------------------------------------------------------------------------------------------
# Damaged or stale predictions files
# ---------------------------------------------------------------------------------------------------------------


def test_damaged_predictions_line_is_named(lavit_model, processor, tmp_path):
    samples = load_mmvp(write_mmvp(tmp_path / "mmvp", n=4))
    path = tmp_path / "p.jsonl"
    evaluate(lavit_model, processor, samples, path, batch_size=4, max_new_tokens=2, model_name="tiny", progress=False)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:2], lines[2][:20], *lines[3:]]) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl line 3 is not valid JSON \(.*\): the predictions file is damaged; "
                                         r"delete it"):
        evaluate(lavit_model, processor, samples, path, max_new_tokens=2, model_name="tiny", progress=False)
    path.write_text("\n".join([*lines[:2], '{"id": "2"}', *lines[3:]]) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl line 3 is no prediction record \(it lacks \['benchmark', "
                                         r"'response', 'prediction', 'answer'\]\)"):
        evaluate(lavit_model, processor, samples, path, max_new_tokens=2, model_name="tiny", progress=False)


def test_predictions_without_a_weights_fingerprint_are_refused(lavit_model, processor, tmp_path):
    samples = load_mmvp(write_mmvp(tmp_path / "mmvp", n=2))
    path = tmp_path / "p.jsonl"
    evaluate(lavit_model, processor, samples, path, max_new_tokens=2, model_name="tiny", progress=False)
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    del header["_header"]["weights"]  # the header of a file written before weights were fingerprinted
    path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl was written without a weights fingerprint .* it is not resumed\. "
                                         r"Delete the file to evaluate the current weights, or use a new output path"):
        evaluate(lavit_model, processor, samples, path, max_new_tokens=2, model_name="tiny", progress=False)


def test_predictions_of_changed_answers_are_refused(lavit_model, processor, tmp_path):
    root = Path(write_mmvp(tmp_path / "mmvp", n=2))
    path = tmp_path / "p.jsonl"
    evaluate(lavit_model, processor, load_mmvp(root), path, max_new_tokens=2, model_name="tiny", progress=False)
    questions = root / "Questions.csv"
    questions.write_text(questions.read_text().replace("(a) Yes (b) No,(b)", "(a) Yes (b) No,(a)"))
    written = path.read_bytes()
    with pytest.raises(ValueError, match=r"p\.jsonl holds predictions whose recorded answer or benchmark differs from "
                                         r"the samples' now \(ids \['2'\], 1 in all\)"):
        evaluate(lavit_model, processor, load_mmvp(root), path, max_new_tokens=2, model_name="tiny", progress=False)
    assert path.read_bytes() == written


# ---------------------------------------------------------------------------------------------------------------
# 5. --stock against the checkpoint's config.json, before loading
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def no_loading(monkeypatch):
    """Fails any model load: the checks below must come before one."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the checkpoint was checked")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)


def test_stock_checkpoint_without_stock_is_named(script, tiny_base_dir, tmp_path, no_loading):
    argv = ["--model", tiny_base_dir, "--mmvp-dir", write_mmvp(tmp_path / "mmvp", n=2), "--output-dir",
            str(tmp_path / "eval"), "--device", "cpu"]
    with pytest.raises(ValueError, match=r"is a stock Qwen2\.5-VL checkpoint \(model_type 'qwen2_5_vl' in its "
                                         r"config\.json\): pass --stock to evaluate it as the baseline, or convert it "
                                         r"with examples/convert_qwen2_5_vl\.py"):
        script.main(argv)
    assert not (tmp_path / "eval").exists()


def test_stock_flag_on_a_lavit_checkpoint_says_drop_it(script, lavit_dir, tmp_path, no_loading):
    argv = ["--model", lavit_dir, "--stock", "--mmvp-dir", write_mmvp(tmp_path / "mmvp", n=2), "--output-dir",
            str(tmp_path / "eval"), "--device", "cpu"]
    with pytest.raises(ValueError, match=r"is a LaViT checkpoint \(model_type 'lavit' in its config\.json\), not a "
                                         r"stock Qwen2\.5-VL one: drop --stock"):
        script.main(argv)
    assert not (tmp_path / "eval").exists()


def test_checkpoint_of_another_kind_is_named(script, tmp_path, no_loading):
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    argv = ["--model", str(other), "--mmvp-dir", write_mmvp(tmp_path / "mmvp", n=2), "--output-dir",
            str(tmp_path / "eval")]
    with pytest.raises(ValueError, match=r"has model_type 'llama' in its config\.json; evaluation takes a LaViT "
                                         r"checkpoint \(model_type 'lavit'\) or, with --stock, a stock Qwen2\.5-VL"):
        script.main(argv)
