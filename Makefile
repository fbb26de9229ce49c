# hookmix developer commands. `make demo` and `make test` work from a fresh clone: both create the
# virtualenv first (pinned by constraints.txt: torch 2.14.1 + torchvision 0.29.1, a pair that imports).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench bench-gpu mutate clean

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
	$(PY) benchmarks/sweep.py
	$(PY) benchmarks/extract_layers.py
	$(PY) benchmarks/data_fingerprint.py

# Every GPU figure of the project in one run of under 10 minutes on one GPU (benchmarks/bench_gpu.py: host syncs
# per step, the streamed epoch over a 6 GB cache / its sequential read, head-only, the sweep, hook overhead), written
# to BENCH_GPU_JSON. Without CUDA it measures nothing; BENCH_GPU_ARGS=--smoke runs every part tiny on the CPU. It
# needs no virtualenv: on a GPU machine whose python3 holds torch, `make bench-gpu` runs with that one.
BENCH_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
BENCH_GPU_JSON ?= bench_gpu.json
BENCH_GPU_ARGS ?=

bench-gpu:
	PYTHONPATH=$(CURDIR) $(BENCH_PY) benchmarks/bench_gpu.py --json $(BENCH_GPU_JSON) $(BENCH_GPU_ARGS)

# Mutation testing (mutmut, configured in pyproject.toml's [tool.mutmut]) in a fresh copy of the working tree
# at MUTATE_DIR, never in the tree itself: mutmut writes mutated modules under mutants/ there. About 2,700
# mutants: over two hours on two cores (store.py's 318 alone ~45 min at MUTATE_JOBS=1, each starting an S3 server);
# MUTATE_ONLY='hookmix.evaluation.calibration.* hookmix.headonly.streaming.*' runs a subset.
# The score is killed / mutants run; inspect a survivor with `cd $(MUTATE_DIR) && $(MUTMUT) show NAME`.
MUTATE_DIR ?= /tmp/hookmix-mutate
MUTATE_JOBS ?= 2
MUTATE_ONLY ?=
MUTMUT := $(abspath $(VENV))/bin/mutmut

mutate: setup
	@case "$(abspath $(MUTATE_DIR))/" in "$(CURDIR)/"*|//) \
		echo "MUTATE_DIR=$(MUTATE_DIR) must be a directory outside the working tree" >&2; exit 2;; esac
	rm -rf $(MUTATE_DIR) && mkdir -p $(MUTATE_DIR)
	git ls-files -z --cached --others --exclude-standard \
		| tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C $(MUTATE_DIR)
	cd $(MUTATE_DIR) && { OMP_NUM_THREADS=1 $(MUTMUT) run --max-children $(MUTATE_JOBS) $(foreach m,$(MUTATE_ONLY),'$(m)') > run.log 2>&1; \
		status=$$?; tr '\r' '\n' < run.log | tail -3; exit $$status; }
	cd $(MUTATE_DIR) && $(MUTMUT) results --all true > results.txt && { grep -Ev ': (killed|not checked)$$' results.txt || true; }
	@awk -F': ' '{n[$$2]++; if ($$2 != "not checked") t++} END {for (s in n) printf "%s %d\n", s, n[s]; \
		printf "mutation score: %d/%d killed (%.1f%%)\n", n["killed"], t, t ? 100 * n["killed"] / t : 0}' \
		$(MUTATE_DIR)/results.txt

clean:
	rm -rf $(VENV) demo_out .pytest_cache .hypothesis
