#!/usr/bin/env python
"""What verifying a LaViT-15K folder costs beside reading it: `verify_lavit_folder` (a sha256 pass over the
config's files, checked against manifest.json) against reading the same shards, in one run.

A folder of LaViT-15K-sized rows (a JPEG of about 130 KB as the builder stores it, the gaze over a 30 x 30 grid,
both V_sem poolings at the 32B teacher's width 5120 in float16), written with the builder's own shard writer and
manifest. Timed: the manifest check alone, `pyarrow` reading the shards into memory alone (what `load_lavit_dataset`
did before it memory-mapped), and `load_lavit_dataset` as it is now: the check, then the folder's Arrow copy in the
datasets cache memory-mapped (written by the first load, timed once apart). Measured in fresh processes: the memory
each way of loading holds (peak resident set beyond the imports), what each process of a multi-GPU run pays. Goal:
the check costs less than reading the shards once.

    python benchmarks/bench_verify.py [--rows 2000] [--write-results]
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from common import interleaved_times, report
from data_lavit import commit_shard, load_lavit_dataset, verify_lavit_folder, write_manifest, write_parquet_atomic

GOAL = 1.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--width", type=int, default=5120, help="V_sem width (the 32B teacher's: 5120)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write-results", action="store_true")
    return parser.parse_args(argv)


def image_bytes(rng, size: int = 420) -> bytes:
    """A noisy 420 x 420 JPEG of about 130 KB (Visual-CoT images are JPEGs of this order)."""
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def write_folder(folder: Path, rows: int, shard_size: int, width: int) -> int:
    rng = np.random.default_rng(0)
    picture = image_bytes(rng)
    names = []
    for start in range(0, rows, shard_size):
        name = f"shard-{start // shard_size:05d}"
        shard = []
        for i in range(start, min(rows, start + shard_size)):
            shard.append({
                "id": f"gqa/{i}", "source": "gqa", "image": {"bytes": picture[:-8] + i.to_bytes(8, "big"), "path": None},
                "image_size": [420, 420], "question": f"what is at place {i}?", "answer": "a cup",
                "teacher_response": "a cup", "text_only_response": "a plate", "bbox": [1.0, 2.0, 30.0, 40.0],
                "gaze": rng.random(900).astype(np.float32).tolist(), "gaze_grid": [30, 30],
                "v_sem_mean": rng.standard_normal(width).astype(np.float16).tolist(),
                "v_sem_gaze": rng.standard_normal(width).astype(np.float16).tolist(),
                "s_focus": 0.3, "correct": True, "text_only_correct": False, "aligned": True, "kept": True,
                "reject_reason": None, "teacher_model": "Qwen/Qwen2.5-VL-32B-Instruct",
            })
        for sub in ("kept", "all"):
            write_parquet_atomic(shard, folder / sub / f"{name}.parquet")
        commit_shard(folder, name, {"rows": len(shard), "kept": len(shard), "rejections": 0})
        names.append(name)
    write_manifest(folder, names, {"benchmark": "bench_verify"})
    return sum(p.stat().st_size for p in (folder / "kept").glob("*.parquet"))


MEMORY_PROBE = """
import gc, pathlib, sys
import datasets, pyarrow as pa, pyarrow.parquet as pq
from data_lavit import load_lavit_dataset

def resident_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

folder, cache, how = sys.argv[1:4]
gc.collect()
before = resident_mib()
if how == "read":
    data = pa.concat_tables([pq.read_table(p) for p in sorted(pathlib.Path(folder, "kept").glob("*.parquet"))])
else:
    data = load_lavit_dataset(folder, "kept", cache_dir=cache)
gc.collect()
print(resident_mib() - before)
"""


def held_mib(folder: Path, cache: Path, how: str) -> float:
    """Resident memory (MiB) a fresh process holds after loading the folder `how`, beyond what it held with every
    library imported (Linux: /proc/self/status)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(folder), str(cache), how], capture_output=True,
                          text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "lavit15k"
        cache = Path(tmp) / "cache"
        size = write_folder(folder, args.rows, args.shard_size, args.width)
        shards = sorted((folder / "kept").glob("*.parquet"))
        start = time.perf_counter()
        load_lavit_dataset(folder, "kept", cache_dir=cache)  # the first load writes the Arrow copy
        first_load = time.perf_counter() - start
        steps = {
            "verify": lambda: verify_lavit_folder(folder, "kept"),
            "read": lambda: pa.concat_tables([pq.read_table(p) for p in shards]),
            "load (verify + memory-map)": lambda: load_lavit_dataset(folder, "kept", cache_dir=cache),
        }
        times = interleaved_times(steps, args.repeats, warmup=1, device="cpu")
        memory = {how: held_mib(folder, cache, how) for how in ("read", "load")}
    ratio = times["verify"] / times["read"]
    lines = [
        f"A LaViT-15K folder of {args.rows} rows in {len(shards)} shards, {size / 2**20:.0f} MiB in `kept/` (a ~130 KB "
        f"JPEG, a 30 x 30 gaze and two V_sem of width {args.width} in float16 per row). Median of {args.repeats} "
        "interleaved runs after 1 warm-up; the files are in the page cache (a cold disk slows both the check and the "
        "reading, which read the same bytes).",
        "",
        "| step | seconds | MiB/s |",
        "|---|---|---|",
    ]
    for name, seconds in times.items():
        lines.append(f"| {name} | {seconds:.3f} | {size / 2**20 / seconds:.0f} |")
    share = times["verify"] / times["load (verify + memory-map)"]
    lines += ["", f"Verification / reading the shards: {ratio:.3f} (goal < {GOAL}: {'pass' if ratio < GOAL else 'FAIL'}); "
                  f"verification's share of `load_lavit_dataset`: {share:.2f}. The first load of a folder, which also "
                  f"writes its Arrow copy to the cache: {first_load:.3f} s ({first_load / times['read']:.2f} x reading "
                  "the shards).",
              "",
              "| memory a process holds after loading | MiB |",
              "|---|---|",
              f"| the shards read into memory (before) | {memory['read']:.0f} |",
              f"| `load_lavit_dataset`, memory-mapped | {memory['load']:.0f} |",
              "",
              f"Memory-mapped / in memory: {memory['load'] / memory['read']:.3f}: each process of a multi-GPU run holds "
              "that share of the dataset; the pages themselves are shared through the page cache."]
    report("bench_verify", "bench_verify: verifying a LaViT-15K folder vs reading it", "\n".join(lines),
           args.write_results)


if __name__ == "__main__":
    main()
