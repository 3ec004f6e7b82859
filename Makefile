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

bench: $(STAMP)
	$(BIN)/python benchmarks/model_step.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
