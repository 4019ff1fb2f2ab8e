# hawkspec: `make quickstart` runs the pipeline on the embedded tiny model; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
N ?= 8
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test test-slow bench pretrain clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement could pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	bash experiments/quickstart.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python experiments/bench_ar.py num_prompts=$(N)

pretrain: $(STAMP)
	$(BIN)/hawkspec-pretrain export_dir=src/hawkspec/assets/tiny

clean:
	rm -rf outputs multirun wandb lightning_logs .pytest_cache
