"""The LaViT-15K builder end to end: resumable after SIGKILL, the same rows on two processes, loadable with
`datasets`, bad inputs counted and recorded, other arguments refused, a dry-run push."""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from builder_lavit import BuilderConfig, build_lavit_dataset, finalize_dataset, push_dataset_to_hub
from data_lavit import COLUMNS, commit_shard, load_lavit_dataset, write_manifest
from viscot_fixture import write_viscot

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "examples" / "build_lavit_dataset.py")
SMALL = ["--min-pixels", "3136", "--max-pixels", "200704", "--max-new-tokens", "6", "--no-progress"]


@pytest.fixture(scope="module")
def viscot(tmp_path_factory):
    folder = tmp_path_factory.mktemp("viscot")
    return write_viscot(folder, n=24)


def cli(tiny_base_dir, viscot, output_dir, *extra):
    path, root = viscot
    return [SCRIPT, "--teacher", tiny_base_dir, "--viscot-json", path, "--image-root", root, "--output-dir",
            str(output_dir), "--batch-size", "2", "--shard-size", "2", *SMALL, *extra]


def env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}


def rows_of(output_dir, config="all"):
    rows = []
    for path in sorted(Path(output_dir, config).glob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return sorted(rows, key=lambda r: r["id"])


@pytest.fixture(scope="module")
def reference(tiny_base_dir, viscot, tmp_path_factory):
    """An uninterrupted single-process build."""
    out = tmp_path_factory.mktemp("reference") / "lavit15k"
    tmp = out.parent
    result = subprocess.run([sys.executable, *cli(tiny_base_dir, viscot, out, "--stages", "alignment",
                                                  "--focus-threshold", "0.1")],
                            env=env(tmp), capture_output=True, text=True, timeout=300, cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_reference_build_is_complete_and_loadable(reference):
    out, result = reference
    rows = rows_of(out)
    assert len(rows) == 24 and len({r["id"] for r in rows}) == 24
    assert "24 processed" in result.stderr
    kept = load_lavit_dataset(out, "kept")
    assert set(kept.column_names) == set(COLUMNS)
    assert len(kept) == sum(r["kept"] for r in rows) > 0
    first = kept[0]
    assert first["image"].__class__.__module__.startswith("PIL")
    assert first["image"].size == tuple(first["image_size"])
    assert len(first["gaze"]) == first["gaze_grid"][0] * first["gaze_grid"][1]
    assert len(first["v_sem_mean"]) == len(first["v_sem_gaze"]) == 64
    assert all(r["s_focus"] >= 0.1 for r in kept) and all(r["reject_reason"] is None for r in kept)
    everything = load_lavit_dataset(out, "all")
    assert len(everything) == 24
    assert {r for r in everything["reject_reason"] if r} <= {"unfocused"}
    card = (out / "README.md").read_text()
    assert "config_name: kept" in card and "| processed | kept |" in card and "--stages alignment" in card
    import re

    import yaml

    header = yaml.safe_load(re.match(r"---\n(.*?)\n---\n", card, re.S).group(1))
    assert {"license", "task_categories", "language", "size_categories", "pretty_name", "tags", "source_datasets",
            "configs"} <= set(header)
    assert header["size_categories"] == ["n<1K"]
    for name in COLUMNS:
        assert f"| `{name}` |" in card


def test_a_rebuilt_folder_is_read_as_it_is_now(reference, tmp_path):
    """datasets' cache keys a local folder by its name and config: a second folder named lavit15k (or the same folder
    rebuilt) must not come back with the first one's rows."""
    out, _ = reference
    first = load_lavit_dataset(out, "all")
    other = tmp_path / "lavit15k"
    (other / "all").mkdir(parents=True)
    import pyarrow as pa

    table = pa.concat_tables([pq.read_table(p) for p in sorted((out / "all").glob("*.parquet"))])
    pq.write_table(table.slice(0, 5), other / "all" / "shard-00000.parquet")
    shutil.copy(out / "README.md", other / "README.md")
    commit_shard(other, "shard-00000", {"rows": 5, "kept": 0, "rejections": 0})  # as the builder records a shard
    write_manifest(other, ["shard-00000"], {"generated_by": "this test"})
    second = load_lavit_dataset(other, "all")
    assert len(second) == 5 and second["id"] == table.column("id").to_pylist()[:5]
    assert len(load_lavit_dataset(out, "all")) == len(first) == 24
    assert second[0]["image"].__class__.__module__.startswith("PIL")


def test_a_folder_is_read_memory_mapped_under_a_name_for_its_content(reference, tmp_path):
    """Every process of a multi-GPU run shares one memory-mapped copy; the copy is named for the files' content."""
    import pyarrow as pa

    from data_lavit import lavit_cache_key, verify_lavit_folder

    out, _ = reference
    cache = tmp_path / "cache"
    loaded = load_lavit_dataset(out, "all", cache_dir=cache)
    table = pa.concat_tables([pq.read_table(p) for p in sorted((out / "all").glob("*.parquet"))])
    assert loaded["id"] == table.column("id").to_pylist()
    assert loaded.data.column("gaze").to_pylist() == table.column("gaze").to_pylist()
    key = lavit_cache_key(verify_lavit_folder(out, "all"), "all")
    assert loaded.cache_files and all(Path(f["filename"]).is_relative_to(cache / "lavit15k" / f"all-{key}")
                                      for f in loaded.cache_files)  # Arrow files on disk, not rows in memory
    # the cache is named for the content: the same files elsewhere land under the same name, with the same rows
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    again = load_lavit_dataset(moved, "all", cache_dir=cache)
    assert again["id"] == loaded["id"] and {p.name for p in (cache / "lavit15k").iterdir()} == {f"all-{key}"}
    assert lavit_cache_key(verify_lavit_folder(out, "kept"), "kept") != key  # each config its own


def test_killed_build_resumes_to_the_same_rows(reference, tiny_base_dir, viscot, tmp_path):
    out = tmp_path / "lavit15k"
    args = [sys.executable, *cli(tiny_base_dir, viscot, out, "--stages", "alignment", "--focus-threshold", "0.1")]
    process = subprocess.Popen(args, env=env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=tmp_path)
    done = out / "done"
    deadline = time.time() + 240
    while time.time() < deadline and not (done.exists() and len(list(done.glob("*.json"))) >= 2):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list(done.glob("*.json")))
    assert 2 <= finished < 12, f"the kill must land mid-run, {finished} of 12 shards were done"
    result = subprocess.run(args, env=env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"({finished} already done)" in result.stderr
    assert rows_of(out) == rows_of(reference[0])
    assert rows_of(out, "kept") == rows_of(reference[0], "kept")
    assert not list(out.rglob(".*.tmp-*"))


def test_two_processes_give_the_same_rows(reference, tiny_base_dir, viscot, tmp_path):
    out = tmp_path / "lavit15k"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = subprocess.run(launch + cli(tiny_base_dir, viscot, out, "--stages", "alignment", "--focus-threshold", "0.1"),
                            env=env(tmp_path), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 1/2: 6 shards built" in result.stderr and "process 2/2: 6 shards built" in result.stderr
    assert rows_of(out) == rows_of(reference[0])


def test_bad_inputs_are_counted_and_recorded(teacher_pair, tmp_path):
    model, processor = teacher_pair
    path, root = write_viscot(tmp_path, n=6, bad=True)
    config = BuilderConfig(teacher="tiny", viscot_json=path, image_root=root, batch_size=3, shard_size=4,
                           min_pixels=3136, max_pixels=200704, max_new_tokens=4)
    out = tmp_path / "out"
    summary = build_lavit_dataset(config, str(out), model=model, processor=processor, progress=False)
    assert dict(summary.skipped) == {"missing_image": 1, "corrupt_image": 1, "box_outside_image": 1}
    overall = finalize_dataset(str(out), config, "test")
    assert overall["processed"] == 6 == overall["kept"] + sum(overall["rejected"].values())
    assert overall["skipped_reasons"] == {"missing_image": 1, "corrupt_image": 1, "box_outside_image": 1,
                                          "malformed_record": 1, "no_box": 1, "empty_answer": 1,
                                          "degenerate_box": 1, "duplicate_id": 1}
    rejected = [json.loads(line) for p in sorted((out / "rejections").glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert {r["id"] for r in rejected} == {"gqa/900", "gqa/901", "gqa/902"}
    assert all(r["detail"] for r in rejected)


def test_other_arguments_are_refused(teacher_pair, tmp_path):
    model, processor = teacher_pair
    path, root = write_viscot(tmp_path, n=4)
    config = BuilderConfig(teacher="tiny", viscot_json=path, image_root=root, batch_size=2, shard_size=2,
                           min_pixels=3136, max_pixels=200704, max_new_tokens=4)
    out = str(tmp_path / "out")
    build_lavit_dataset(config, out, model=model, processor=processor, progress=False)
    other = BuilderConfig(**{**config.__dict__, "seed": 1, "top_k": 4})
    with pytest.raises(ValueError, match=r"built with other arguments \(they differ in \['seed', 'top_k'\]\)"):
        build_lavit_dataset(other, out, model=model, processor=processor, progress=False)
    again = build_lavit_dataset(config, out, model=model, processor=processor, progress=False)
    assert again.shards_done == 0 and again.shards_skipped == 2


def test_dry_run_push_lists_the_upload(reference, tiny_base_dir, viscot, tmp_path):
    out = reference[0]
    plan = push_dataset_to_hub(out, "someone/lavit-15k", dry_run=True)
    names = [name for name, _ in plan]
    assert "README.md" in names and "LICENSE.md" in names
    assert sorted(n for n in names if n.startswith("all/")) == sorted(f"all/{p.name}" for p in (out / "all").glob("*.parquet"))
    assert not any(n.startswith("done/") or ".tmp-" in n for n in names)
    assert all(size == (out / name).stat().st_size for name, size in plan)
    # the CLI on a finished folder: nothing to build, then the plan printed
    result = subprocess.run([sys.executable, *cli(tiny_base_dir, viscot, out, "--stages", "alignment",
                                                  "--focus-threshold", "0.1", "--push-to-hub", "someone/lavit-15k",
                                                  "--dry-run")],
                            env=env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"would upload {len(plan)} files to someone/lavit-15k" in result.stderr
    with pytest.raises(ValueError, match="no dataset card"):
        push_dataset_to_hub(tmp_path, "someone/x", dry_run=True)


@pytest.fixture(scope="module")
def teacher_pair(tiny_base_dir):
    from teacher_lavit import load_qwen2_5_vl

    return load_qwen2_5_vl(tiny_base_dir)


def test_card_template_and_built_card_headers():
    import re

    import yaml

    required = {"license", "task_categories", "language", "size_categories", "pretty_name", "tags", "source_datasets",
                "configs"}
    text = (ROOT / "dataset_card" / "README.md").read_text()
    header = yaml.safe_load(re.match(r"---\n(.*?)\n---\n", text, re.S).group(1))
    assert required <= set(header)
    assert [c["config_name"] for c in header["configs"]] == ["kept", "all"]
    for name in COLUMNS:
        assert f"| `{name}` |" in text
