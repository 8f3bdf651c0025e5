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
from teacher_lavit import BuilderConfig, build_lavit_dataset, finalize_dataset
from viscot_fixture import record, write_viscot


@pytest.fixture(scope="module")
def teacher_pair(tiny_base_dir):
    from teacher_lavit import load_teacher

    return load_teacher(tiny_base_dir)


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

    from teacher_lavit import load_teacher

    model, processor = load_teacher(tiny_base_dir)
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
    for name, record in manifest["shards"].items():
        for relative, expected in record["files"].items():
            data = (out / relative).read_bytes()
            assert expected == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["rows"] == 8 and manifest["complete"] is True
    assert len(json.loads((out / "builder_config.json").read_text())["viscot_json_sha256"]) == 64
