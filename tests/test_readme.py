"""The README is the model card and the first thing a user runs: its front matter parses and its Quick start runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_model_card_front_matter():
    match = re.match(r"---\n(.*?)\n---\n", readme(), re.S)
    assert match, "README.md must open with YAML front matter"
    card = yaml.safe_load(match.group(1))
    assert card["library_name"] == "transformers"
    assert card["pipeline_tag"] == "image-text-to-text"
    assert card["base_model"] == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert card["license"] == "apache-2.0"
    assert "lavit" in card["tags"] and card["datasets"]


def test_set_up_is_two_commands():
    text = readme()
    assert "make demo" in text and "make test" in text


def test_quick_start_runs(tiny_base_dir, tmp_path):
    section = readme().split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "quick_start.py"
    script.write_text(code)
    env = {**os.environ, "LAVIT_BASE": tiny_base_dir, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "torch.Size([1, 4, 64])"  # a 224 x 224 image is 8 x 8 merged tokens
    assert lines[1] == "torch.Size([1, 5120])"
    assert (tmp_path / "lavit-3b" / "modeling_lavit.py").exists()
