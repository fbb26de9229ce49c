# hookmix developer commands. `make demo` and `make test` work from a fresh clone: both create the
# virtualenv first (pinned by constraints.txt: torch 2.14.1 + torchvision 0.29.1, a pair that imports).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/hookmix demo --out demo_out

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/head_only.py
	$(PY) benchmarks/cutmix_overhead.py
	$(PY) benchmarks/compile_ddp.py
	$(PY) benchmarks/startup.py
	$(PY) benchmarks/gpu_head_only.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .hypothesis
