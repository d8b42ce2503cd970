# Two commands set everything up on a fresh machine: `make sweep` and `make test`.
# Both create .venv (once) and install the pinned dependencies from requirements.txt.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint sweep bench bench-peers gpu-check interop clean

setup: $(STAMP)

# Re-installs only when requirements.txt changes.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# pytest-xdist workers, a test file each at a time (module fixtures, one SLURM cluster): on CI's
# 2 cores, 2 workers took 556 s against 670 s in one process. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2

# One torch thread per process: two workers with a thread per core each ran in-process training 10-40x slower.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# ruff (pyproject.toml [tool.ruff]): lint and format, checked, never rewritten here (`ruff format` rewrites).
LINTED := sae_ensemble benchmarks tests sweep.py

lint: $(STAMP)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)

sweep: $(STAMP)
	$(PY) sweep.py $(ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.ensemble
	$(PY) -m benchmarks.store
	$(PY) -m benchmarks.scale
	$(PY) -m benchmarks.features
	$(PY) -m benchmarks.synthetic

# The same grids trained by our ensemble and by SAELens, dictionary_learning and sparsify, each in its own
# venv (built here if needed), on the same rows in the same order (benchmarks/peers.py, docs/benchmarks.md).
bench-peers: $(STAMP) interop
	$(PY) -m benchmarks.peers $(ARGS)

# Every CUDA test, benchmark and sweep on the visible GPUs; report in $$OUT or gpu_check/ (docs/benchmarks.md).
# `make gpu-check PY=python3` runs with that interpreter as it is (an offline GPU box with a CUDA
# torch): only the venv's python needs the venv installed first.
gpu-check: $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP))
	@$(PY) -m benchmarks.gpu_check $(ARGS)

# One venv per library our exports target (SAELens pins transformer-lens < 4, so none can share
# .venv); tests/test_interop.py loads our exports with each library's own loader (docs/interop.md).
INTEROP := .interop
INTEROP_LIBS := saelens dictionary_learning sparsify

interop: $(foreach lib,$(INTEROP_LIBS),$(INTEROP)/$(lib)/.installed)

# Rebuilt from scratch when its pinned requirements change.
$(INTEROP)/%/.installed: tests/interop/requirements-%.txt
	rm -rf $(INTEROP)/$*
	$(PYTHON) -m venv $(INTEROP)/$*
	$(INTEROP)/$*/bin/python -m pip install -q --upgrade pip
	$(INTEROP)/$*/bin/python -m pip install -q -r $<
	# nnsight (dictionary_learning's dependency) pulls torchvision, whose PyPI build needs CUDA torch and then
	# breaks `import transformers` on our CPU torch; no library here uses it. A no-op where it is absent.
	$(INTEROP)/$*/bin/python -m pip uninstall -q -y torchvision
	touch $@

clean:
	rm -rf $(VENV) $(INTEROP) outputs multirun
