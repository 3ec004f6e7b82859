# Two commands a newcomer needs: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv when it is missing. torch==2.13.0 is installed first: it is the CPU build,
# so no multi-GB CUDA build is pulled by the dependency resolver.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-slow bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/interbert demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# Benchmarks run by hand, never in the test suite; results land in benchmarks/results/ with the machine.
bench: $(STAMP)
	$(BIN)/python benchmarks/model_step.py
	$(BIN)/python benchmarks/speedups.py --baseline 5cc6875
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/eval_cost.py
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/profile_loop.py
	$(BIN)/python benchmarks/summary.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info

# ---- region-feature extraction (optional extra, its own venv) -------------------------------------
# `interbert extract` needs torchvision. The only torch/torchvision pair on the reference machine is
# torch 2.14.1 + torchvision 0.29.1, a CUDA build (~5.5 GB installed) that also runs on CPU; the main
# .venv keeps the small torch 2.13.0 CPU build. So extraction gets .venv-extract (see docs/extract.md).
# pyproject pins torch==2.13.0, so the package goes in with --no-deps after its other requirements.
EXTRACT_VENV := .venv-extract
EXTRACT_BIN := $(EXTRACT_VENV)/bin
EXTRACT_STAMP := $(EXTRACT_VENV)/.installed

.PHONY: venv-extract test-extract

$(EXTRACT_STAMP): pyproject.toml
	@test -x $(EXTRACT_BIN)/python || $(PY) -m venv $(EXTRACT_VENV) || python3 -m venv $(EXTRACT_VENV)
	$(EXTRACT_BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(EXTRACT_BIN)/python -c "import re, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print('\n'.join(r for r in p['dependencies'] + p['optional-dependencies']['dev'] \
	if not re.match(r'(torch|torchvision)\s*([=<>!~;\[]|$$)', r)))" > $(EXTRACT_VENV)/requirements.txt
	$(EXTRACT_BIN)/pip install -q -r $(EXTRACT_VENV)/requirements.txt
	$(EXTRACT_BIN)/pip install -q --no-deps -e .
	@touch $(EXTRACT_STAMP)

venv-extract: $(EXTRACT_STAMP)

test-extract: $(EXTRACT_STAMP)
	$(EXTRACT_BIN)/python -m pytest tests/test_extract*.py
