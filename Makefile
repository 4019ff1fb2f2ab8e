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

# Every decoder preset against AR in one run (batch 1: per-image latency, as the papers report), then our AR
# loop against transformers' generate. Results: outputs/bench/results.{json,md}, outputs/bench/ar_vs_generate.json
bench: $(STAMP)
	$(BIN)/hawkspec-eval eval.decoders=all eval.num_prompts=$(N) eval.batch_size=1 hydra.run.dir=outputs/bench
	$(BIN)/python experiments/bench_ar.py num_prompts=$(N) batch_size=1 out=outputs/bench/ar_vs_generate.json

pretrain: $(STAMP)
	$(BIN)/hawkspec-pretrain export_dir=src/hawkspec/assets/tiny

clean:
	rm -rf outputs multirun wandb lightning_logs .pytest_cache
