"""The example scripts: `--help`, and the convert / export / demo commands their docstrings give."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(args, tmp_path, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_has_help(script, tmp_path):
    result = run([str(EXAMPLES / script), "--help"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


def test_convert_then_export_cli(tiny_base_dir, tmp_path):
    lavit = tmp_path / "lavit"
    result = run([str(EXAMPLES / "convert_qwen2_5_vl.py"), "--base", tiny_base_dir, "--output-dir", str(lavit),
                  "--num-latent-tokens", "6", "--teacher-hidden-size", "48", "--gate-scope", "response"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((lavit / "config.json").read_text())
    assert config["num_latent_tokens"] == 6 and len(config["latent_token_ids"]) == 6
    assert config["gate_scope"] == "response" and config["teacher_hidden_size"] == 48
    stock = tmp_path / "stock"
    result = run([str(EXAMPLES / "export_qwen2_5_vl.py"), "--lavit-dir", str(lavit), "--output-dir", str(stock)], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((stock / "config.json").read_text())["model_type"] == "qwen2_5_vl"


def test_convert_refuses_a_lavit_checkpoint(lavit_dir, tmp_path):
    result = run([str(EXAMPLES / "convert_qwen2_5_vl.py"), "--base", lavit_dir, "--output-dir", str(tmp_path / "x")],
                 tmp_path)
    assert result.returncode != 0
    assert "is a 'lavit' model; LaViT converts Qwen2.5-VL checkpoints" in result.stderr


def test_demo_runs_offline(tmp_path):
    result = run([str(EXAMPLES / "demo.py"), "--output-dir", str(tmp_path / "demo"), "--teacher-hidden-size", "64"],
                 tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "[4/4]" in out and "<v-trace1><v-trace2><v-trace3><v-trace4>" in out
    assert "sums to [1.0, 1.0, 1.0, 1.0]" in out
