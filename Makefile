# cvgen: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# torch/torchvision pinned to the releases the dev machines carry locally; pip takes them
# from there (no multi-GB download). Elsewhere pip fetches them from the index as usual.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.DEFAULT_GOAL := help
.PHONY: help venv install demo train-gpu models/tiny models/sd15 data/sample test test-slow test-gpu lint format typecheck check clean serve test-serve docker-serve docker-train data/raw repro data-push bench bench-small bench-mid bench-gpu gpu-train-check profile profile-small tune-demo

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_/.-]+:.*## ' $(MAKEFILE_LIST) | sort | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS) || $(BIN)/pip install -q torch torchvision

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

venv: $(VENV)/.installed ## create .venv and install cvgen with its dev tools

install: venv ## same as venv

models/tiny: $(VENV)/.installed ## build the tiny random SD model
	@test -f models/tiny/model_index.json || $(BIN)/cvgen model random --arch tiny --out models/tiny

data/sample: $(VENV)/.installed ## write the embedded sample portraits
	@test -f data/sample/metadata.jsonl || $(BIN)/cvgen data sample --out data/sample

data/raw: $(VENV)/.installed ## the source photos data.dvc tracks: dvc pull, or rebuilt from the embedded sample portraits
	@test -f data/raw/metadata.jsonl || DVC_NO_ANALYTICS=1 $(BIN)/dvc pull data.dvc 2>/dev/null || $(BIN)/cvgen data sample --out data/raw --size 512

repro: data/raw ## run the DVC pipeline (model, prepare -> fit -> evaluate) and refresh dvc.lock
	PATH=$(CURDIR)/$(BIN):$$PATH DVC_NO_ANALYTICS=1 $(BIN)/dvc repro
	DVC_NO_ANALYTICS=1 $(BIN)/dvc metrics show

data-push: $(VENV)/.installed ## push DVC-tracked data to the default remote
	DVC_NO_ANALYTICS=1 $(BIN)/dvc push

demo: models/tiny data/sample ## set up and train the demo LoRA on CPU (tiny model, sample portraits)
	$(BIN)/cvgen fit --config configs/demo.yaml

train-gpu: $(VENV)/.installed ## train on SD 1.5 on a GPU (configs/lora.yaml)
	$(BIN)/cvgen fit --config configs/lora.yaml $(ARGS)

models/sd15: $(VENV)/.installed ## build a random model of the full SD 1.5 architecture (GPU checks)
	@test -f models/sd15/model_index.json || $(BIN)/cvgen model random --arch sd15 --out models/sd15

serve: models/tiny ## serve img2img over HTTP on :8080 (tiny model, CPU)
	$(BIN)/cvgen serve --config configs/serve.yaml $(ARGS)

test-serve: $(VENV)/.installed ## run the serving tests
	$(BIN)/pytest -q tests/test_serve_units.py tests/test_serve.py tests/test_serve_process.py tests/test_generate.py

docker-serve: ## build the serving image (docker/serve.Dockerfile)
	DOCKER_BUILDKIT=1 docker build -f docker/serve.Dockerfile -t cvgen-serve .

docker-train: ## build the training image (docker/train.Dockerfile: CUDA, cvgen[train,gs])
	DOCKER_BUILDKIT=1 docker build -f docker/train.Dockerfile -t cvgen-train .

test: $(VENV)/.installed ## run the tests (about 10 minutes on two CPU cores) with coverage; fails below the floor in pyproject.toml
	$(BIN)/pytest -q --cov --cov-report=term:skip-covered

test-slow: $(VENV)/.installed ## run the slow tests too
	$(BIN)/pytest -q -m "slow or not slow"

test-gpu: $(VENV)/.installed ## run the GPU tests (need CUDA)
	$(BIN)/pytest -q -m gpu

bench: $(VENV)/.installed ## CPU benchmarks: training and serving (tiny); figures to stdout + benchmarks/*.json
	$(PY) scripts/bench_train.py --rounds 3 --flops --fresh-cache --json benchmarks/train-cpu-tiny.json
	$(PY) scripts/bench_serve.py --json benchmarks/serve-cpu-tiny.json

bench-small: $(VENV)/.installed ## CPU training benchmark, SD 1.5 at quarter width (about 3 min)
	$(PY) scripts/bench_train.py --arch small --rounds 5 --modes plain,cvgen,cvgen-cache --flops --json benchmarks/train-cpu-small.json

bench-mid: $(VENV)/.installed ## CPU training benchmark on a UNet-heavy mid-size model (about 6 min)
	$(PY) scripts/bench_train.py --arch mid --steps 4 --warmup 1 --rounds 2 --modes plain,cvgen,cvgen-cache --flops --json benchmarks/train-cpu-mid.json

bench-gpu: $(VENV)/.installed ## every GPU measurement (SD 1.5 arch, 512 px, bf16), under 8 min
	PY=$(PY) scripts/bench_gpu.sh

gpu-train-check: $(VENV)/.installed ## `cvgen fit` with configs/lora.yaml on a random SD 1.5 model: step time, peak memory
	BIN=$(BIN) scripts/gpu_train_check.sh

profile: models/tiny data/sample ## a few demo training steps under the PyTorch profiler: trace + top operators by self time
	$(BIN)/cvgen fit --config configs/demo.yaml --profile --trainer.max_steps 8 \
		--trainer.logger false --trainer.default_root_dir runs/profile $(ARGS)

profile-small: data/sample ## the same on SD 1.5 at quarter width (models/small, 128 px)
	@test -f models/small/model_index.json || $(BIN)/cvgen model random --arch small --out models/small
	$(BIN)/cvgen fit --config configs/demo.yaml --profile --trainer.max_steps 8 \
		--model.base models/small --data.resolution 128 \
		--trainer.logger false --trainer.default_root_dir runs/profile-small $(ARGS)

tune-demo: models/tiny data/sample ## a 4-trial offline search (Optuna) on the demo, from configs/sweep.yaml
	$(BIN)/cvgen tune --config configs/demo.yaml --sweep configs/sweep.yaml --trials 4 \
		--out runs/tune-demo -- --trainer.max_steps 20 --trainer.val_check_interval 10 $(ARGS)

lint: $(VENV)/.installed ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: $(VENV)/.installed ## mypy
	$(BIN)/mypy

check: lint typecheck test ## lint, types and tests

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf runs wandb lightning_logs .pytest_cache .mypy_cache .ruff_cache .hypothesis
