"""lmms-eval's own CLI running a local task on a tiny LaViT checkpoint, offline.

lmms-eval cannot be installed beside this project's pinned CPU torch (it pulls torchvision, which fails to load and
breaks `transformers.AutoProcessor`), so this test needs an interpreter of its own: set LMMS_EVAL_PYTHON to a Python
where `pip install lmms-eval==0.7.3`, `pip uninstall torchvision` and `pip install --no-deps -e <this repo>` were
run, and pass `-m slow`. tests/test_evaluation.py checks the model class against lmms-eval's request protocol in the
default suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmark_fixtures import write_mmstar

TASK = """task: local_mmstar
dataset_path: parquet
dataset_kwargs:
  data_files:
    val: {data}
test_split: val
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["\\n"]
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_lmms_eval_cli_runs_a_local_task(lavit_dir, tmp_path):
    python = os.environ.get("LMMS_EVAL_PYTHON")
    if not python:
        pytest.skip("set LMMS_EVAL_PYTHON to an interpreter with lmms-eval installed (see the module docstring)")
    data = write_mmstar(tmp_path / "data" / "mmstar.parquet", n=4)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_mmstar.yaml").write_text(TASK.format(data=data))
    shutil.copy(Path(__file__).parent / "lmms_eval_task" / "utils.py", tasks / "utils.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [python, "-m", "lmms_eval", "--model", "lavit", "--model_args", f"pretrained={lavit_dir},device=cpu",
         "--tasks", "local_mmstar", "--include_path", str(tasks), "--batch_size", "2", "--output_path",
         str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = list((tmp_path / "out").rglob("*results*.json"))
    assert results and "local_mmstar" in json.loads(results[0].read_text())["results"]
