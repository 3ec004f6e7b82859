# Two commands a newcomer needs: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv when it is missing. pyproject.toml declares version ranges; constraints.txt holds
# the exact versions installed here, torch==2.13.0 among them: the CPU build, so no multi-GB CUDA
# build is pulled by the dependency resolver.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the extras the tests and the demo use: serve (the demo's search index, the serve tests), zh (Chinese tests).
# postgres (psycopg, ~10 MB with its libpq): the A/B event store's tests run against a real PostgreSQL server.
# parquet (pyarrow, ~170 MB installed): `interbert embed --format parquet`, tested against the npy output.
# export (onnx, onnxruntime, onnxscript, ~111 MB installed): `interbert export onnx` and its ONNX Runtime check.
# wandb (~75 MB: its Go core) and mlflow (~125 MB: mlflow-skinny, databricks-sdk, SQLAlchemy): train.report_to's
# trackers, tested offline (tests/train/test_train_tracking.py); ~195 MB together, under a tenth of the venv.
# Not milvus: it adds ~265 MB installed (pyarrow, pandas) for one optional engine; its tests skip without
# it, and `make test-milvus` installs it and runs them.
EXTRAS := dev,serve,zh,postgres,export,wandb,mlflow,parquet

.PHONY: venv demo test test-slow test-milvus bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/interbert demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# Milvus as the index engine (pymilvus + milvus-lite, the [milvus] extra): installed into .venv on demand.
test-milvus: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e '.[$(EXTRAS),milvus]'
	$(BIN)/python -m pytest tests/serve/test_serve_milvus.py

# Benchmarks run by hand, never in the test suite; results land in benchmarks/results/ with the machine.
bench: $(STAMP)
	$(BIN)/python benchmarks/model_step.py
	$(BIN)/python benchmarks/speedups.py --baseline 5cc6875
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/eval_cost.py
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/profile_loop.py
	$(BIN)/python benchmarks/text_step.py
	$(BIN)/python benchmarks/summary.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info

# ---- region-feature extraction (optional extra, its own venv) -------------------------------------
# `interbert extract` needs torchvision, and torchvision must be the build made for the installed
# torch. The only such pair on the reference machine is torch 2.14.1 + torchvision 0.29.1, a CUDA
# build (~5.5 GB installed) that also runs on CPU; PyPI's torchvision 0.28 (torch 2.13's) fails beside
# the small torch 2.13.0 CPU build the main .venv keeps. So extraction gets .venv-extract (see
# docs/extract.md): constraints.txt with its torch line swapped for that pair, and the [extract] extra
# (with [dev] for pytest; not serve/zh, which the extraction tests do not use). --no-cache-dir: the
# wheels are not copied into pip's cache on top of the 5.5 GB they take in the venv.
EXTRACT_VENV := .venv-extract
EXTRACT_BIN := $(EXTRACT_VENV)/bin
EXTRACT_STAMP := $(EXTRACT_VENV)/.installed
EXTRACT_TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: venv-extract test-extract

$(EXTRACT_STAMP): pyproject.toml constraints.txt
	@test -x $(EXTRACT_BIN)/python || $(PY) -m venv $(EXTRACT_VENV) || python3 -m venv $(EXTRACT_VENV)
	grep -v '^torch==' constraints.txt > $(EXTRACT_VENV)/constraints.txt
	printf '%s\n' $(EXTRACT_TORCH) >> $(EXTRACT_VENV)/constraints.txt
	$(EXTRACT_BIN)/pip install -q --no-cache-dir -c $(EXTRACT_VENV)/constraints.txt -e '.[dev,extract]'
	@touch $(EXTRACT_STAMP)

venv-extract: $(EXTRACT_STAMP)

test-extract: $(EXTRACT_STAMP)
	$(EXTRACT_BIN)/python -m pytest tests/extract/
