# histosynth — every target installs what it needs (venv, pinned deps, generated stubs).
SHELL := /bin/bash
PYTHON_BOOT ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/dev.lock
GEN := services/_generated
PROTOS := $(shell find proto -name '*.proto' | sort)

.PHONY: help install proto proto-check test test-gpu run bench bench-core bench-diffusion clean

help:
	@echo "make run    - generate a small synthetic batch with the shipped models (CPU, loopback)"
	@echo "make test   - install everything and run the test suite"
	@echo "make bench  - benchmarks (JSON under bench/results/)"

$(STAMP): $(LOCK) requirements/dev-nodeps.lock pyproject.toml
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -r requirements/dev-nodeps.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Stubs are regenerated from scratch so a stale file can never survive; imports are rewritten
# from `histosynth.v1` to `services._generated.histosynth.v1` so no sys.path tricks are needed.
proto: $(STAMP)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -I proto --python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) $(PROTOS)
	find $(GEN) -name '*.py' -o -name '*.pyi' | xargs sed -i -E \
	  -e 's/^from (histosynth|inference)(\.v1)? import /from services._generated.\1\2 import /' \
	  -e 's/^import (histosynth|inference)\./import services._generated.\1./'
	find $(GEN) -type d -exec touch {}/__init__.py \;
	@echo '"""protoc output: written only by `make proto`, never by hand."""' > $(GEN)/__init__.py

# CI guard: regenerating must not change the tree.
proto-check: proto
	@git diff --exit-code --stat -- $(GEN) && test -z "$$(git status --porcelain -- $(GEN))" \
	  || (echo "generated stubs are stale: run 'make proto' and commit"; exit 1)

test: proto-check
	./scripts/ensure_system_deps.sh
	$(PY) -m pytest -q

test-gpu: proto
	$(PY) -m pytest -q -m gpu tests/gpu

# The main job: services on loopback (CPU, shipped models) generate a small balanced batch into ./output.
run: proto
	$(PY) -m clients.cli run-demo --out output

# Training reproduces a shipped model's pipeline (needs ../shared/data, or DATA_ROOT=...).
DATA_ROOT ?= ../shared/data
# Runs live outside the work tree, so a fresh clone or `git clean` never loses a long run; a run directory with
# latest.pt is resumed automatically (the process or the machine may stop at any time). VERSION: model_store/<name>/<v>.
RUNS ?= $(HOME)/.cache/histosynth/runs
VERSION ?= 1
train-%: $(STAMP)
	$(PY) -m training.train --config training/configs/$*.yaml --data-root $(DATA_ROOT) --out $(RUNS)/$* $(TRAIN_FLAGS)
export-%: $(STAMP)
	$(PY) -m training.export --config training/configs/$*.yaml --checkpoint $(RUNS)/$*/latest.pt --version $(VERSION) --data-root $(DATA_ROOT) $(EXPORT_FLAGS)

SCORING_MODELS := histology-encoder segmenter-he-nuclei segmenter-he-glands segmenter-ihc
$(addprefix export-,$(SCORING_MODELS)): export-%: $(STAMP)
	$(PY) -m training.export.scoring_models --config training/configs/$*.yaml --checkpoint $(RUNS)/$*/latest.pt --version $(VERSION) --data-root $(DATA_ROOT) $(EXPORT_FLAGS)

# Science reports (issue #8, MEP #9.3): `make experiment-<name>` runs training/experiments/<name>.py and writes
# reports/<name>/ (README.md, report.json, image grids). Names: noise-frequency, coarse-to-fine,
# balanced-generation, mep-prompts. EXPERIMENT_FLAGS=--quick for a smoke run.
experiment-%: proto
	$(PY) -m training.experiments.$(subst -,_,$*) --data-root $(DATA_ROOT) --out reports/$* $(EXPERIMENT_FLAGS)

# Issue #17's downstream benchmark (the main quality number): reports/downstream/; runs cached in $(RUNS)/experiments.
eval-downstream: proto
	$(PY) -m training.experiments.downstream --data-root $(DATA_ROOT) --out reports/downstream $(EXPERIMENT_FLAGS)

# Held-back evaluation of the shipped renderers/refiner through the serving path; updates cards and manifests.
eval: $(STAMP)
	$(PY) -m training.evaluate --all --max-images 512 --data-root $(DATA_ROOT)

# Optional output: TorchServe archives (ONNX + a thin onnxruntime handler) of every shipped model into dist/torchserve.
torchserve-archive: $(STAMP)
	$(PY) -m training.export.torchserve_archive --out dist/torchserve $(ARCHIVE_FLAGS)

# Diffusion models (#9): export evaluates on held-back CoNSeP crops (FID/KID with our encoder, mask statistics).
export-renderer-diffusion-nuclei: $(STAMP)
	$(PY) -m training.export.diffusion_export --run $(RUNS)/renderer-diffusion-nuclei --data-root $(DATA_ROOT) --every 2 --overwrite $(EXPORT_FLAGS)
export-nuclei-mask-generator: $(STAMP)
	$(PY) -m training.export.diffusion_export --run $(RUNS)/nuclei-mask-generator --renderer-run $(RUNS)/renderer-diffusion-nuclei --data-root $(DATA_ROOT) --every 2 --overwrite $(EXPORT_FLAGS)

export-patch-generator: $(STAMP)
	$(PY) -m training.trainers.cgan_trainer export --run $(RUNS)/patch-generator $(EXPORT_FLAGS)

bench-core: proto
	$(PY) -m bench.bench_core

# Diffusion serving: images/s and latency for 1 vs 8 clients with and without step-level batching.
bench-diffusion: proto
	$(PY) -m bench.bench_diffusion

# Serving benchmarks: in-process ONNX Runtime vs our gRPC servers, concurrency sweep, roofline, end-to-end generation.
# perf_analyzer (Triton's load generator) is fetched once into ~/.cache/histosynth/perf_analyzer; without it
# bench_serving records "not measured" for that section.
bench: bench-core bench-diffusion
	./scripts/get_perf_analyzer.sh || echo "perf_analyzer could not be installed: its section will say not measured"
	$(PY) -m bench.bench_serving

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
