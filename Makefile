# hawkspec: `make quickstart` runs the pipeline on the embedded tiny model; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
N ?= 8
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test test-slow bench pretrain heads clean

$(STAMP): pyproject.toml setup.py
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

# Every decoder preset against AR in one run (batch 1: per-image latency, as the papers report) with step accounting,
# the main decoders compiled (torch.compile of the forwards, AR too) and with whole steps compiled (eval.compile=step),
# our AR loop against transformers' generate (eager and compiled), and the verify-cost projection.
# Results: outputs/bench/, outputs/bench_compiled/, outputs/bench_step/.
bench: $(STAMP)
	$(BIN)/hawkspec-eval eval.decoders=all eval.num_prompts=$(N) eval.batch_size=1 eval.step_accounting=true hydra.run.dir=outputs/bench
	$(BIN)/hawkspec-eval 'eval.decoders=[ar,medusa,hawk,sjd,hawk_jacobi]' eval.compile=forward eval.num_prompts=$(N) \
	  eval.batch_size=1 eval.step_accounting=true eval.quality.enabled=false hydra.run.dir=outputs/bench_compiled
	$(BIN)/hawkspec-eval 'eval.decoders=[ar,medusa,hawk,sjd,hawk_jacobi]' eval.compile=step eval.num_prompts=$(N) \
	  eval.batch_size=1 eval.step_accounting=true eval.quality.enabled=false hydra.run.dir=outputs/bench_step
	$(BIN)/python experiments/bench_ar.py num_prompts=$(N) batch_size=1 out=outputs/bench/ar_vs_generate.json
	$(BIN)/python experiments/bench_ar.py num_prompts=$(N) batch_size=1 compile=forward out=outputs/bench/ar_vs_generate_compiled.json
	$(BIN)/python experiments/verify_cost.py results=outputs/bench/results.json out=outputs/bench/projection

pretrain: $(STAMP)
	$(BIN)/hawkspec-pretrain export_dir=src/hawkspec/assets/tiny

# The shipped draft models (src/hawkspec/assets/heads, what hawkspec-eval uses by default): Medusa and Hawk heads
# and the EAGLE / spatial EAGLE drafters, all from the same 6,144 self-distilled samples + 256 validation, 5 epochs
# each; ~18 min caching + ~6 min per head set and ~3.5 min per EAGLE drafter on the 2-core CPU.
HEADS_OUT ?= outputs/heads
heads: $(STAMP)
	$(BIN)/hawkspec-cache hydra.run.dir=$(HEADS_OUT)/cache cache.num_samples=6144 cache.val_samples=256 cache.topk=16
	for h in medusa hawk eagle eagle_spatial; do \
	  $(BIN)/hawkspec-train hydra.run.dir=$(HEADS_OUT)/train_$$h shards_dir=$(HEADS_OUT)/cache/shards heads=$$h \
	    trainer.max_epochs=5 export_dir=src/hawkspec/assets/heads/$$h || exit 1; \
	done

clean:
	rm -rf outputs multirun wandb lightning_logs .pytest_cache
