"""Nothing stale, partial or damaged is trusted (issue 15): LaViT-15K folders are verified by content, builds resume
only over the same input, and bad inputs get an error naming the problem and the fix, or a counted, recorded skip.
(The evaluation's faults are in tests/test_faults_evaluation.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_lavit import load_lavit_dataset, read_visual_cot, verify_lavit_folder
from builder_lavit import BuilderConfig, build_lavit_dataset, finalize_dataset
from viscot_fixture import record, write_viscot


@pytest.fixture(scope="module")
def teacher_pair(tiny_base_dir):
    from teacher_lavit import load_qwen2_5_vl

    return load_qwen2_5_vl(tiny_base_dir)


def small_config(path, root, **overrides) -> BuilderConfig:
    settings = dict(teacher="tiny", viscot_json=path, image_root=root, batch_size=2, shard_size=2, min_pixels=3136,
                    max_pixels=200704, max_new_tokens=4, stages=("alignment",), focus_threshold=0.0)
    return BuilderConfig(**{**settings, **overrides})


def build(config, out, teacher_pair, finalize=True):
    model, processor = teacher_pair
    summary = build_lavit_dataset(config, str(out), model=model, processor=processor, progress=False)
    if finalize:
        finalize_dataset(str(out), config, "test")
    return summary


def rows(out, config="all"):
    return sorted((r for p in sorted(Path(out, config).glob("*.parquet")) for r in pq.read_table(p).to_pylist()),
                  key=lambda r: r["id"])


@pytest.fixture(scope="module")
def finished(teacher_pair, tmp_path_factory):
    """A finished build of 8 records in 4 shards, every sample kept, and its rows."""
    folder = tmp_path_factory.mktemp("finished")
    path, root = write_viscot(folder, n=8)
    config = small_config(path, root)
    out = folder / "lavit15k"
    build(config, out, teacher_pair)
    return config, out, rows(out)


def copy_of(finished, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(finished[1], out)
    return out


# ---- silent wrong results of the issue ------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "cut_in_half", "changed"])
def test_a_damaged_folder_is_refused_and_the_builder_rebuilds_exactly_that_shard(finished, teacher_pair, tmp_path,
                                                                                  damage):
    config, _, expected = finished
    out = copy_of(finished, tmp_path)
    shard = out / "kept" / "shard-00001.parquet"
    if damage == "deleted":
        shard.unlink()
    elif damage == "cut_in_half":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:  # same size, other bytes
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"damaged: in shard shard-00001, kept/shard-00001.parquet .*"
                                         r"build_lavit_dataset.py again with the same arguments"):
        load_lavit_dataset(out, "kept")
    summary = build(config, out, teacher_pair)
    assert summary.shards_done == 1 and summary.shards_skipped == 3  # exactly the damaged one
    assert rows(out) == expected and len(load_lavit_dataset(out, "kept")) == len(rows(out, "kept"))


def test_a_folder_an_older_builder_made_is_finalised_by_its_build_command(finished, teacher_pair, tmp_path):
    """Before content hashes: no input fingerprint, shard records without files, no manifest. The same command
    records what the intact shards hold (rebuilding none) and finishes the folder."""
    config, _, expected = finished
    out = copy_of(finished, tmp_path)
    builder_config = json.loads((out / "builder_config.json").read_text())
    del builder_config["viscot_json_sha256"]
    (out / "builder_config.json").write_text(json.dumps(builder_config))
    for record_path in (out / "done").glob("*.json"):
        record = json.loads(record_path.read_text())
        record_path.write_text(json.dumps({k: v for k, v in record.items() if k != "files"}))
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match="Run examples/build_lavit_dataset.py again with the same arguments"):
        load_lavit_dataset(out, "kept")
    summary = build(config, out, teacher_pair)
    assert summary.shards_done == 0 and summary.shards_skipped == 4
    assert rows(out) == expected and len(load_lavit_dataset(out, "all")) == 8
    assert "viscot_json_sha256" in json.loads((out / "builder_config.json").read_text())


def test_a_parquet_file_the_build_did_not_write_is_refused(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    shutil.copy(out / "kept" / "shard-00000.parquet", out / "kept" / "shard-00099.parquet")
    with pytest.raises(ValueError, match=r"holds \['kept/shard-00099.parquet'\], which its build did not write"):
        load_lavit_dataset(out, "kept")


def test_an_unfinished_build_is_not_trained_on(teacher_pair, tmp_path):
    path, root = write_viscot(tmp_path, n=8)
    config = small_config(path, root, max_samples=8)
    out = tmp_path / "lavit15k"
    model, processor = teacher_pair
    # a build killed after 2 of its 4 shards: what one process of two leaves is exactly that
    build_lavit_dataset(config, str(out), model=model, processor=processor, process_index=0, num_processes=2,
                        progress=False)
    assert len(list((out / "done").glob("*.json"))) == 2
    with pytest.raises(ValueError, match=r"unfinished LaViT-15K build \(2 shards done, no manifest.json\)"):
        load_lavit_dataset(out, "kept")
    with pytest.raises(ValueError, match=r"Shard shard-00001 .* cannot be finalised: it was never finished"):
        finalize_dataset(str(out), config, "test")
    build(config, out, teacher_pair)  # the same command finishes it
    assert len(load_lavit_dataset(out, "all")) == 8


def test_a_changed_input_is_not_resumed_as_if_unchanged(teacher_pair, tmp_path):
    path, root = write_viscot(tmp_path, n=8)
    config = small_config(path, root)
    out = tmp_path / "lavit15k"
    model, processor = teacher_pair
    build_lavit_dataset(config, str(out), model=model, processor=processor, process_index=0, num_processes=2,
                        progress=False)
    records = json.loads(Path(path).read_text())
    records[0]["conversations"][3]["value"] = "purple"  # edited in place: same path, same length of list
    Path(path).write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"viscot.json changed since .* was started .* Restore the file, or build in a "
                                         r"new --output-dir"):
        build(config, out, teacher_pair)


def test_a_flat_gaze_is_a_counted_skip_in_the_builder(tiny_base_dir, tmp_path):
    """A teacher whose queries are zero attends evenly to every key it sees: its gaze is the same on every image
    token, which says nothing about where to look. Every sample is skipped with the reason, none is kept."""
    import torch

    from teacher_lavit import load_qwen2_5_vl

    model, processor = load_qwen2_5_vl(tiny_base_dir)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.zero_()
            layer.self_attn.q_proj.bias.zero_()
    path, root = write_viscot(tmp_path, n=4)
    config = small_config(path, root)
    out = tmp_path / "lavit15k"
    summary = build(config, out, (model, processor), finalize=False)
    assert dict(summary.skipped) == {"flat_gaze": 4} and summary.processed == 0
    skipped = [json.loads(line) for p in sorted((out / "rejections").glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert len(skipped) == 4 and all("gaze is" in r["detail"] and "image tokens" in r["detail"] for r in skipped)


# ---- the builder's inputs ------------------------------------------------------------------------------------


def test_a_missing_input_is_named_and_nothing_is_written(teacher_pair, tmp_path):
    path, root = write_viscot(tmp_path, n=4)
    out = tmp_path / "lavit15k"
    with pytest.raises(ValueError, match=r"The Visual-CoT file .*nope.json does not exist; pass --viscot-json"):
        build(small_config(str(tmp_path / "nope.json"), root), out, teacher_pair)
    with pytest.raises(ValueError, match=r"--image-root .*no_images is not a folder"):
        build(small_config(path, str(tmp_path / "no_images")), out, teacher_pair)
    assert not out.exists()
    build(small_config(path, root), out, teacher_pair)  # the corrected command is not refused
    assert len(rows(out)) == 4


def test_a_truncated_or_empty_json_is_named_with_its_line(tmp_path):
    path, _ = write_viscot(tmp_path, n=4)
    text = Path(path).read_text()
    Path(path).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"viscot.json is not valid JSON: .* at line 1, column \d+\. A download cut"):
        read_visual_cot(path)
    Path(path).write_text("[]")
    with pytest.raises(ValueError, match="holds no records: there is nothing to build"):
        read_visual_cot(path)


def test_records_of_the_wrong_shape_are_counted_skips(tmp_path):
    path, _ = write_viscot(tmp_path, n=4)
    records = json.loads(Path(path).read_text())
    image = records[0]["image"][0]
    not_a_dict_turn = record("gqa", 950, image, [1, 1, 20, 20])
    not_a_dict_turn["conversations"][2] = "<image>"
    numeric_image = record("gqa", 951, image, [1, 1, 20, 20])
    numeric_image["image"] = [12345]
    records += ["a string record", None, not_a_dict_turn, numeric_image]
    Path(path).write_text(json.dumps(records))
    samples, skipped = read_visual_cot(path)
    assert len(samples) == 4
    assert [s["reason"] for s in skipped] == ["malformed_record"] * 4
    details = " | ".join(s["detail"] for s in skipped)
    assert "a record is str 'a string record'" in details and "a record is NoneType" in details
    assert "gqa/950: conversation turns [2] are not objects" in details
    assert "gqa/951: 'image' must be a path or a list of paths, got [12345]" in details


def test_an_image_too_large_to_decode_is_a_counted_skip(teacher_pair, tmp_path, monkeypatch):
    """PIL refuses an image over twice Image.MAX_IMAGE_PIXELS (a decompression bomb); lowered here so that a small
    image stands for a 15000 x 15000 one. The sample is skipped with its reason and size, the build goes on."""
    from PIL import Image

    path, root = write_viscot(tmp_path, n=4)  # sizes 84x56, 112x140, 140x84, 56x56
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 112 x 140 = 15680 > 2 x 5000
    summary = build(small_config(path, root), tmp_path / "lavit15k", teacher_pair)
    assert dict(summary.skipped) == {"image_too_large": 2} and summary.processed == 2
    skipped = [json.loads(line) for p in sorted((tmp_path / "lavit15k" / "rejections").glob("*.jsonl"))
               for line in p.read_text().splitlines()]
    assert all("pixels" in r["detail"] for r in skipped)


def test_verification_costs_one_pass_over_the_files(finished):
    """The manifest records each file's size and sha256; verifying reads each file of the config once."""
    import hashlib

    _, out, _ = finished
    manifest = verify_lavit_folder(out, "all")
    for name, shard in manifest["shards"].items():
        for relative, expected in shard["files"].items():
            data = (out / relative).read_bytes()
            assert expected == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["rows"] == 8 and manifest["complete"] is True
    assert len(json.loads((out / "builder_config.json").read_text())["viscot_json_sha256"]) == 64


# ---- the trainer ---------------------------------------------------------------------------------------------


def lavit15k_with(n: int, change=None):
    """A tiny LaViT-15K dataset (tests/lavit15k_fixture.py) with `change(rows)` applied first."""
    from datasets import Dataset

    from conftest import TEACHER_WIDTH
    from data_lavit import features
    from lavit15k_fixture import lavit15k_rows

    data = lavit15k_rows(n, TEACHER_WIDTH)
    if change is not None:
        change(data)
    return Dataset.from_dict({k: [r[k] for r in data] for k in data[0]}, features=features())


def trainer_for(lavit_dir, processor, output_dir, dataset, **overrides):
    from modeling_lavit import LavitForConditionalGeneration
    from trainer_lavit import LavitSFTConfig, LavitSFTTrainer

    settings = dict(use_cpu=True, max_steps=2, per_device_train_batch_size=2, gate_warmup_steps=1,
                    learning_rate=1e-3, logging_steps=1, save_steps=1, report_to="none", seed=0,
                    dataloader_num_workers=0, disable_tqdm=True)
    args = LavitSFTConfig(str(output_dir), **{**settings, **overrides})
    return LavitSFTTrainer(model=LavitForConditionalGeneration.from_pretrained(lavit_dir), args=args,
                           train_dataset=dataset, processing_class=processor)


def test_gazes_that_make_no_target_are_refused_before_training(lavit_dir, processor, tmp_path):
    def spoil(data):
        data[1]["gaze"] = [0.0] * len(data[1]["gaze"])  # flat: says nothing about where to look
        data[2]["gaze_grid"] = [0, 0]  # no cells

    with pytest.raises(ValueError) as caught:
        trainer_for(lavit_dir, processor, tmp_path / "run", lavit15k_with(4, spoil))
    message = str(caught.value)
    assert message.startswith("2 samples of the train dataset cannot give a trajectory target")
    assert "sample gqa/1: its gaze is flat (0.0 on every cell)" in message
    assert "sample gqa/2: its gaze_grid [0, 0] has no cells" in message and "build_lavit_dataset.py" in message
    # Naive SFT reads no gaze: the same rows train; and the fix the message names works (the check reads the
    # dataset's own rows, after the filter, not the table underneath)
    trainer_for(lavit_dir, processor, tmp_path / "naive", lavit15k_with(4, spoil), distill=False)
    kept = lavit15k_with(4, spoil).filter(lambda row: row["id"] not in ("gqa/1", "gqa/2"))
    trainer_for(lavit_dir, processor, tmp_path / "filtered", kept)
    with pytest.raises(ValueError, match=r"^1 samples .*sample gqa/2: its gaze_grid"):
        trainer_for(lavit_dir, processor, tmp_path / "shuffled", lavit15k_with(4, spoil).shuffle(seed=0).filter(
            lambda row: row["id"] != "gqa/1"))


def test_image_bytes_that_do_not_decode_are_named_with_their_sample(lavit_dir, processor, tmp_path):
    def spoil(data):
        data[0]["image"] = {"bytes": b"not an image at all", "path": None}

    trainer = trainer_for(lavit_dir, processor, tmp_path / "run", lavit15k_with(2, spoil))
    with pytest.raises(ValueError, match=r"Sample gqa/0: its image does not decode \(.*\); drop the sample or rebuild"):
        next(iter(trainer.get_train_dataloader()))


def test_another_runs_folder_is_refused_unless_resumed_or_overwritten(lavit_dir, processor, tmp_path):
    out = tmp_path / "run"
    trainer_for(lavit_dir, processor, out, lavit15k_with(4), max_steps=3).train()
    assert (out / "checkpoint-3").is_dir()
    with pytest.raises(ValueError, match=r"run holds another run \(checkpoint-1, checkpoint-2, checkpoint-3, "
                                         r"lavit_run.json\); training into it would overwrite part"):
        trainer_for(lavit_dir, processor, out, lavit15k_with(4), max_steps=2).train()
    trainer_for(lavit_dir, processor, out, lavit15k_with(4), max_steps=2, overwrite_output_dir=True).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]  # no stale -3
    # a resume continues the latest checkpoint ("true", as the command line passes it), with the same settings only
    # (more steps extend a run); the record next to the checkpoint counts, also from another output_dir
    for where in (out, tmp_path / "elsewhere"):
        with pytest.raises(ValueError, match=r"Resuming .*checkpoint-2 with other settings .* differ in "
                                             r"\['concept_loss_coef'\]"):
            trainer_for(lavit_dir, processor, where, lavit15k_with(4), concept_loss_coef=0.1).train(
                resume_from_checkpoint=str(out / "checkpoint-2"))
    resumed = trainer_for(lavit_dir, processor, out, lavit15k_with(4), max_steps=3)
    resumed.train(resume_from_checkpoint="true")
    assert resumed.state.global_step == 3
    # a run that stopped before it saved anything left only its record: a new run may start there
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "lavit_run.json").write_text("{}")
    trainer_for(lavit_dir, processor, crashed, lavit15k_with(4), max_steps=1).train()
    with pytest.raises(ValueError, match=r"holds no checkpoint-<step> folder to resume from"):
        trainer_for(lavit_dir, processor, tmp_path / "empty", lavit15k_with(4)).train(resume_from_checkpoint=True)


def test_a_resume_on_other_data_is_refused(lavit_dir, processor, tmp_path):
    """Issue 23, item 2: the run's record holds its training data's content digest; a resume on other rows (another
    dataset, or the same one rebuilt with another answer) is refused, the same rows (loaded again) resume."""
    from trainer_lavit import dataset_digest

    out = tmp_path / "run"
    trainer_for(lavit_dir, processor, out, lavit15k_with(4), max_steps=2).train()
    assert json.loads((out / "lavit_run.json").read_text())["train_data"] == dataset_digest(lavit15k_with(4))

    def other_answer(rows):
        rows[1]["answer"] = "purple"

    for other in (lavit15k_with(6), lavit15k_with(4, other_answer), lavit15k_with(4).select([0, 1, 3, 2])):
        with pytest.raises(ValueError, match=r"Resuming .*checkpoint-2 on other training data than its run had"):
            trainer_for(lavit_dir, processor, out, other, max_steps=3).train(resume_from_checkpoint="true")
    resumed = trainer_for(lavit_dir, processor, out, lavit15k_with(4), max_steps=3)
    resumed.train(resume_from_checkpoint="true")
    assert resumed.state.global_step == 3
    assert dataset_digest([{"a": 1}]) is None  # data it cannot read whole: no claim


def test_training_into_the_models_own_folder_is_refused(lavit_dir, processor, tmp_path, finished):
    """Issue 23: --output_dir equal to --model_name_or_path would overwrite the student (overwrite_output_dir would
    delete it): refused by the train script and by the trainer, before anything is written."""
    student = tmp_path / "student"
    shutil.copytree(lavit_dir, student)
    before = sorted(p.name for p in student.iterdir())
    with pytest.raises(SystemExit, match=r"--output_dir .*student is the input checkpoint's folder"):
        example("train_lavit").main(["--model_name_or_path", str(student), "--dataset_name", str(finished[1]),
                                     "--output_dir", str(student), "--use_cpu", "true"])
    with pytest.raises(ValueError, match=r"is the folder the model was loaded from: training there would overwrite"):
        trainer_for(str(student), processor, student, lavit15k_with(2), overwrite_output_dir=True).train()
    assert sorted(p.name for p in student.iterdir()) == before


def example(script: str):
    import importlib

    return importlib.import_module(script)  # examples/ is on the path (conftest.py)


def test_the_train_script_names_a_stock_checkpoint_and_a_missing_one(tiny_base_dir, tmp_path, finished):
    common = ["--dataset_name", str(finished[1]), "--output_dir", str(tmp_path / "run"), "--use_cpu", "true"]
    with pytest.raises(SystemExit, match=r"is a 'qwen2_5_vl' checkpoint, not a LaViT student: convert it first"):
        example("train_lavit").main(["--model_name_or_path", tiny_base_dir, *common])
    with pytest.raises(SystemExit, match=r"The checkpoint folder \./no/such/student does not exist"):
        example("train_lavit").main(["--model_name_or_path", "./no/such/student", *common])
    assert not (tmp_path / "run").exists()


# ---- conversion, analysis and the other command lines ---------------------------------------------------------


def test_conversion_and_export_name_a_missing_checkpoint_and_refuse_their_own_folder(tiny_base_dir, lavit_dir,
                                                                                    tmp_path):
    from conversion_lavit import convert_qwen2_5_vl_to_lavit, export_to_qwen2_5_vl

    for missing in ("/no/such/qwen", "./models/no/such", "a/b/c"):
        with pytest.raises(ValueError, match=rf"The checkpoint folder {missing} does not exist \(and it is not a Hub"):
            convert_qwen2_5_vl_to_lavit(missing, tmp_path / "out", teacher_hidden_size=48)
        with pytest.raises(ValueError, match="does not exist"):
            export_to_qwen2_5_vl(missing, tmp_path / "out")
    before = sorted(p.name for p in Path(tiny_base_dir).iterdir())
    with pytest.raises(ValueError, match=r"is the input checkpoint's folder .* Choose another folder"):
        convert_qwen2_5_vl_to_lavit(tiny_base_dir, tiny_base_dir, teacher_hidden_size=48)
    with pytest.raises(ValueError, match=r"is the input checkpoint's folder"):
        convert_qwen2_5_vl_to_lavit(tiny_base_dir, Path(tiny_base_dir) / "inside", teacher_hidden_size=48)
    with pytest.raises(ValueError, match=r"is the input checkpoint's folder"):
        export_to_qwen2_5_vl(lavit_dir, lavit_dir)
    with pytest.raises(ValueError, match=r"is a 'qwen2_5_vl' checkpoint, not a LaViT one"):
        export_to_qwen2_5_vl(tiny_base_dir, tmp_path / "out")
    assert sorted(p.name for p in Path(tiny_base_dir).iterdir()) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "script, argv, flag",
    [
        ("build_lavit_dataset", ["--batch-size", "0"], "--batch-size"),
        ("build_lavit_dataset", ["--shard-size", "-3"], "--shard-size"),
        ("build_lavit_dataset", ["--max-samples", "0"], "--max-samples"),
        ("build_lavit_dataset", ["--top-k", "two"], "--top-k"),
        ("analyze_attention", ["--num-samples", "0"], "--num-samples"),
        ("analyze_attention", ["--heatmaps", "-1"], "--heatmaps"),
        ("convert_qwen2_5_vl", ["--num-latent-tokens", "0"], "--num-latent-tokens"),
        ("quickstart", ["--output-dir", "FILE"], "--output-dir"),
        ("evaluate", ["--output-dir", "FILE"], "--output-dir"),
    ],
)
def test_counts_sizes_and_output_folders_are_checked_where_they_are_parsed(script, argv, flag, tmp_path, capsys):
    existing_file = tmp_path / "a_file"
    existing_file.write_text("x")
    required = {"build_lavit_dataset": ["--teacher", "t", "--viscot-json", "v", "--image-root", "i",
                                        "--output-dir", str(tmp_path / "o")],
                "analyze_attention": ["--dataset", "d", "--output-dir", str(tmp_path / "o")],
                "convert_qwen2_5_vl": ["--base", "b", "--output-dir", str(tmp_path / "o")],
                "quickstart": [], "evaluate": ["--model", "m", "--output-dir", str(tmp_path / "o")]}[script]
    argv = [str(existing_file) if a == "FILE" else a for a in argv]
    with pytest.raises(SystemExit) as caught:
        example(script).parse_args(required + argv)
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {flag}" in error and ("at least" in error or "existing file" in error)


@pytest.mark.parametrize("steps", [0, -3])
def test_a_step_count_that_trains_nothing_is_refused(steps, tmp_path):
    from trainer_lavit import LavitSFTConfig

    with pytest.raises(ValueError, match=rf"max_steps must be a positive number of optimizer steps .* got {steps}"):
        LavitSFTConfig(str(tmp_path), max_steps=steps, use_cpu=True)


def test_analysis_checks_its_models_before_writing_a_figure(finished, tmp_path):
    out = tmp_path / "analysis"
    with pytest.raises(SystemExit, match=r"teacher: The checkpoint folder \./no/teacher does not exist"):
        example("analyze_attention").main(["--dataset", str(finished[1]), "--teacher", "./no/teacher",
                                           "--output-dir", str(out)])
    assert not out.exists()
