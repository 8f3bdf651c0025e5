# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""Checks of command-line values shared by the example scripts: counts and sizes, checkpoints, output folders.

Each check runs where the value is parsed (as an `argparse` type) or before anything is loaded or written, and
says what is wrong and how to fix it: a count of 0 or -3 never reaches a `range()`, a mistyped local path is not
sent to the Hub as a repo id, an output folder never overwrites its own input.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type of a count or size: a whole number of at least 1."""
    if not re.fullmatch(r"\s*[0-9]+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def nonnegative_int(text: str) -> int:
    """argparse type of a count that may be 0 (e.g. a number of figures)."""
    if not re.fullmatch(r"\s*[0-9]+\s*", text):
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, got {text!r}")
    return int(text)


def output_folder(text: str) -> str:
    """argparse type of an output folder: it may exist (as a folder) or not yet; an existing file is refused."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is an existing file, not a folder; pass a folder")
    return text


def looks_local(path: str) -> bool:
    """Whether `path` can only be a local path: not of the Hub's `name` or `owner/name` form."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path or os.path.isabs(path)


def checkpoint_model_type(path: str) -> str | None:
    """The `model_type` in a checkpoint's config.json (a local folder or a Hub id), read before any weight is
    loaded. A path that can only be local and is missing, or a folder without config.json, is a `ValueError` that
    says so (instead of the Hub's "Repo id must be in the form ...")."""
    from transformers import PretrainedConfig

    if os.path.isdir(path):
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"{path} holds no config.json, so it is not a model checkpoint; pass a checkpoint "
                             "folder.")
    elif os.path.exists(path):
        raise ValueError(f"{path} is a file; pass a checkpoint folder (the one holding config.json) or a Hub id.")
    elif looks_local(path):
        raise ValueError(f"The checkpoint folder {path} does not exist (and it is not a Hub id, owner/name); check "
                         "the path.")
    return PretrainedConfig.get_config_dict(path)[0].get("model_type")


def changed_settings(before: dict, now: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The keys whose values differ between a run's recorded settings and the ones asked for now (a key present on
    one side only counts), sorted: what a resumed run, build or evaluation refuses to mix."""
    return sorted(k for k in set(before) | set(now) if k not in ignore and before.get(k) != now.get(k))


def check_output_dir(output_dir: str, source: str, what: str = "--output-dir") -> None:
    """Refuses an output folder that is the input checkpoint's own folder (or lies inside it), or an existing file."""
    out = Path(output_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {output_dir} is an existing file; pass a folder.")
    if os.path.isdir(source):
        src = Path(source).expanduser().resolve()
        if out == src or src in out.parents:
            raise ValueError(
                f"{what} {output_dir} is the input checkpoint's folder {source} (or inside it): writing there would "
                "mix the two checkpoints' files. Choose another folder."
            )


__all__ = ["changed_settings", "positive_int", "nonnegative_int", "output_folder", "looks_local", "checkpoint_model_type", "check_output_dir"]
