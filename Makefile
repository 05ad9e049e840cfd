# mabn: `make train` and `make test` set everything up on a fresh machine (a .venv beside this file).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

# Training knobs, mapped onto Hydra overrides (anything else: ARGS="key=value ...").
NORM ?=
BS ?=
EXP ?=
RESUME ?=
RUN ?=
ARGS ?=
GPUS ?= 1
PROCS ?=
NODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
OUTPUTS ?= outputs
# Sweep axes for `make sweep`.
NORMS ?= bn,brn,gn,mabn
BATCHES ?= 2,32
SWEEP_ARGS ?= schedule.epochs=2
BENCH_ARGS ?=

# OUTPUTS given (command line or environment) is where runs are written, as for repro, table, eval and tensorboard;
# left out, output_root stays the config's (configs/local/ may set it).
OUTPUT_ROOT := $(if $(filter command environment,$(origin OUTPUTS)),output_root=$(OUTPUTS))
# Hydra takes -m/--multirun before the overrides only (`make train NORM=bn ARGS="-m seed=0,1"`)
OVERRIDES := $(filter -m --multirun,$(ARGS)) $(if $(EXP),experiment=$(EXP)) $(if $(NORM),norm=$(NORM)) \
             $(if $(BS),data.batch_per_gpu=$(BS)) $(if $(RESUME),train.resume=$(RESUME)) $(OUTPUT_ROOT) \
             $(filter-out -m --multirun,$(ARGS))
LAUNCHER := $(PY) scripts/launch.py --nodes $(NODES) --node-rank $(NODE_RANK) \
            --master-addr $(MASTER_ADDR) --master-port $(MASTER_PORT)
ifneq ($(PROCS),)
LAUNCH := $(LAUNCHER) --cpu --gpus $(PROCS) --
else ifeq ($(GPUS)-$(NODES),1-1)
LAUNCH := $(PY) -m mabn.train
else
LAUNCH := $(LAUNCHER) --gpus $(GPUS) --
endif


.PHONY: help install train eval sweep table plot repro repro-report test test-slow bench gpu-check gpu-wheels test-gpu-torch tensorboard data clean-venv

help:
	@echo "make train [NORM=bn|syncbn|gn|ln|in|brn|mabn] [BS=32] [EXP=paper_table_bs2] [GPUS=8|PROCS=2] [RESUME=path] [OUTPUTS=outputs] [ARGS='k=v ...']"
	@echo "make eval [RUN=outputs/train/<run>] [ARGS='--fold --crop-size 224 --root dir --out f.json']   score a checkpoint (default: the newest run)"
	@echo "make sweep [NORMS=bn,brn,gn,mabn] [BATCHES=2,32] [SWEEP_ARGS=...] [OUTPUTS=outputs]   Hydra multirun over norm x batch"
	@echo "make table | make plot     results.md/.csv, figure.md, runs.md and the error-vs-batch plot of every run under outputs/"
	@echo "make repro [REPRO_SEEDS=0,1] [REPRO_LANES=2] [REPRO_ONLY=figure,real_b2,ablations,proposal,third]   the paper's comparison on Imagenette"
	@echo "make test [TEST_WORKERS=2] | make test-slow | make bench | make tensorboard [OUTPUTS=outputs] [ARGS='--port 6007 --bind_all']"
	@echo "make gpu-check [GPU_CHECK_OUT=dir] [ARGS=--dry-run]   the CUDA path's correctness and speed in one report (make gpu-wheels first)"
	@echo "make test-gpu-torch [GPU_TORCH=2.11.0]   the tests and that dry run here on the GPU machines' torch (a side venv)"

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

train: $(INSTALLED)
	$(LAUNCH) $(OVERRIDES)

eval: $(INSTALLED)
	$(PY) scripts/evaluate.py $(RUN) --outputs $(OUTPUTS) $(ARGS)

sweep: $(INSTALLED)
	$(PY) -m mabn.train --multirun norm=$(NORMS) data.batch_per_gpu=$(BATCHES) $(OUTPUT_ROOT) $(SWEEP_ARGS) $(ARGS)
	$(PY) scripts/results_table.py $(OUTPUTS)/train
	$(PY) scripts/plot_results.py error-vs-batch $(OUTPUTS)/train --out $(OUTPUTS)/train/error_vs_batch.png

table: $(INSTALLED)
	$(PY) scripts/results_table.py $(OUTPUTS)

plot: $(INSTALLED)
	$(PY) scripts/plot_results.py error-vs-batch $(OUTPUTS) --out $(OUTPUTS)/error_vs_batch.png --paper

data: $(INSTALLED)
	$(PY) scripts/make_shapes_dataset.py

# Most tests start a training process and wait on its imports (single-threaded), so TEST_WORKERS pytest-xdist
# workers, one thread each, share the cores; TEST_WORKERS=0 runs the suite in one process with torch's own threads.
TEST_WORKERS ?= 2

test: $(INSTALLED)
	$(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1) $(PY) -m pytest -q --durations=10 -n $(TEST_WORKERS)

test-slow: $(INSTALLED)
	$(PY) -m pytest -q -m slow

# The paper's comparison on Imagenette (CPU setting): the figure (BN/BRN/MABN at b = 32..2, GN), the real batch of 2,
# the ablations and third seeds where two differ by > 2 points, in REPRO_LANES parallel lanes; resumable; ends in the report.
REPRO_SEEDS ?= 0,1
REPRO_EXP ?= imagenette_cpu
REPRO_LANES ?= 2
REPRO_ONLY ?= figure,real_b2,ablations,proposal,third
REPRO_ARCHIVE ?=
repro: $(INSTALLED)
	$(PY) scripts/repro.py --experiment $(REPRO_EXP) --seeds $(REPRO_SEEDS) --lanes $(REPRO_LANES) --only $(REPRO_ONLY) \
	    --output-root $(OUTPUTS) $(if $(REPRO_ARCHIVE),--archive $(REPRO_ARCHIVE)) $(ARGS)
	$(MAKE) --no-print-directory repro-report

REPORT_ROOT ?= $(if $(REPRO_ARCHIVE),$(REPRO_ARCHIVE),$(OUTPUTS))/$(REPRO_EXP)
repro-report: $(INSTALLED)
	$(PY) scripts/results_table.py $(REPORT_ROOT)
	$(PY) scripts/plot_results.py error-vs-batch $(REPORT_ROOT) --paper --out $(REPORT_ROOT)/error_vs_batch.png

# GPU check (scripts/gpu_check.py): runs on a GPU machine's own torch, without .venv; the few pure-Python wheels it
# lacks there (hydra-core, omegaconf, antlr4) come from .gpu-wheels/ (`make gpu-wheels`, here) into a temporary target.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_OUT ?= outputs/gpu_check
GPU_DEPS ?= /tmp/mabn-gpu-deps
GPU_WHEELS := hydra-core==1.3.8 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3
# Unbuffered: a run that the machine's limit stops still shows everything it printed.
gpu-check:
	@if [ -d .gpu-wheels ] && ! $(GPU_PY) -c "import hydra, omegaconf" 2>/dev/null; then \
	    $(GPU_PY) -m pip install --quiet --no-index --no-deps --target $(GPU_DEPS) .gpu-wheels/*.whl; fi
	PYTHONUNBUFFERED=1 PYTHONPATH=src:$(GPU_DEPS) $(GPU_PY) scripts/gpu_check.py --out $(GPU_CHECK_OUT) $(ARGS)

gpu-wheels: $(INSTALLED)
	$(PY) -m pip wheel --quiet --no-deps -w .gpu-wheels $(GPU_WHEELS)
	@ls .gpu-wheels

# The tests and the check's dry run on the GPU machines' own torch (2.11 there, 2.14.1 pinned here), on CPU,
# before a GPU session: a side venv (about 5 GB of wheels, once). torch 2.11 broke compiled gradients that CI's
# torch gets right (docs/results/gpu.md).
GPU_TORCH ?= 2.11.0
GPU_TORCHVISION ?= 0.26.0
GPU_TORCH_VENV ?= .cache/torch-$(GPU_TORCH)
test-gpu-torch: gpu-wheels
	@[ -x $(GPU_TORCH_VENV)/bin/python ] || { $(PYTHON) -m venv $(GPU_TORCH_VENV) && \
	    $(GPU_TORCH_VENV)/bin/pip install --quiet torch==$(GPU_TORCH) torchvision==$(GPU_TORCHVISION) pyyaml pytest \
	    scipy tensorboard tqdm matplotlib submitit==1.5.4 hydra-submitit-launcher==1.2.0 .gpu-wheels/*.whl; }
	PYTHONPATH=src $(GPU_TORCH_VENV)/bin/python -m pytest -q -p no:cacheprovider tests $(ARGS)
	$(MAKE) gpu-check GPU_PY=$(GPU_TORCH_VENV)/bin/python GPU_CHECK_OUT=$(GPU_CHECK_OUT)-torch-$(GPU_TORCH) ARGS=--dry-run

bench: $(INSTALLED)
	$(PY) -m scripts.bench.run_all --out $(OUTPUTS)/bench $(BENCH_ARGS)

tensorboard: $(INSTALLED)
	$(VENV)/bin/tensorboard --logdir $(OUTPUTS) $(ARGS)

clean-venv:
	rm -rf $(VENV)
