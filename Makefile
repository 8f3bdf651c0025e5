# Set-up on a fresh machine: `make demo` (installs, then runs the main job) and `make test` (installs, then runs
# the default test suite). Everything goes into a virtual environment of its own, $(VENV).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lavit-installed
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-all demo tour bench clean

install: $(STAMP)

$(STAMP): setup.cfg constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

test-all: install
	$(PY) -m pytest -q

# The main job: LaViT end to end on a synthetic grounding task (about 16 minutes on 2 CPU cores; a rerun resumes).
demo: install
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(PY) examples/quickstart.py --output-dir quickstart_output

# The one-minute tour: convert a tiny Qwen2.5-VL to LaViT, reload it with remote code, answer one question.
tour: install
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py --output-dir demo_output

bench: install
	$(PY) benchmarks/bench_forward.py --write-results
	$(PY) benchmarks/bench_extraction.py --write-results
	$(PY) benchmarks/bench_train_step.py --write-results
	$(PY) benchmarks/bench_generate.py --write-results
	$(PY) benchmarks/bench_compile.py --write-results
	$(PY) benchmarks/bench_verify.py --write-results

clean:
	rm -rf $(VENV) demo_output quickstart_output build *.egg-info
