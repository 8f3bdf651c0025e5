"""Shared helpers of the benchmarks: machine description, peak-memory probes and RESULTS.md sections."""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import re
import statistics
import time
from pathlib import Path

import torch


RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def benchmark_parser(description: str, heads: bool = True, workdir: bool = True) -> argparse.ArgumentParser:
    """The flags every benchmark shares: device, dtype, the random-weight model's size, --write-results and (where
    checkpoints are written) --workdir."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    if heads:
        parser.add_argument("--heads", type=int, default=8)
        parser.add_argument("--kv-heads", type=int, default=2)
    if workdir:
        parser.add_argument("--workdir", default=None, help="keep the random-weight checkpoints here (default: a temp dir)")
    parser.add_argument("--write-results", action="store_true", help="store the figures in benchmarks/RESULTS.md")
    return parser


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {torch.get_num_threads()} threads), torch {torch.__version__}"


def steady_peak(step, device: str, warmup: int = 2, repeats: int = 3) -> int:
    """The smallest `measure_peak` of `repeats` calls after `warmup` unmeasured ones: the steady state of a training
    step, once the first steps' one-off allocations (gradient buffers, allocator caches) are behind."""
    for _ in range(warmup):
        step()
    return min(measure_peak(step, device) for _ in range(repeats))


def measure_peak(step, device: str) -> int:
    """Bytes that one call of `step()` adds at its peak over what was allocated before it.

    CUDA: the caching allocator's peak. CPU: the peak of the allocation timeline that the PyTorch profiler records
    (every tensor allocation and free, in order), which is exact and repeatable, unlike the resident set size.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    gc.collect()  # what earlier steps left in reference cycles goes now, not at a random point inside the step
    gc.disable()
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    finally:
        gc.enable()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def interleaved_times(steps: dict, repeats: int, warmup: int, device: str) -> dict[str, float]:
    """Median seconds of each step over `repeats` rounds. Each round runs every step once, in an order that reverses
    from one round to the next (A B, B A, ...), so that drifts of a shared machine hit all steps alike; the median
    resists the single lucky or unlucky run that moves a minimum or a mean by 10% here."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    samples = {name: [] for name in steps}
    order = list(steps.items())
    for round_index in range(repeats):
        for name, step in (order if round_index % 2 == 0 else order[::-1]):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def write_section(name: str, body: str) -> None:
    """Replaces (or appends) the section `name` of benchmarks/RESULTS.md, stamped with the machine and date."""
    stamp = f"_{machine()}; {datetime.date.today().isoformat()}_"
    block = f"<!-- {name}:start -->\n## {name}\n\n{stamp}\n\n{body.strip()}\n<!-- {name}:end -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nWritten by the scripts in this folder.\n"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def report(script: str, section: str, body: str, write: bool) -> None:
    """Prints a benchmark's table with the machine, and with `write` stores it as a section of RESULTS.md."""
    print(f"{script} on {machine()}\n{body}")
    if write:
        write_section(section, body)
