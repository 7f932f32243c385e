# Two commands do everything on a fresh machine (both idempotent):
#   make demo        # create .venv, install, run the embedded demo (teacher + two students on CPU)
#   make test        # create .venv, install, run ruff and the whole test suite
#   make test-fast   # the same without the tests marked slow (subprocesses, installs, long runs)
#   make test-gpu    # only the tests marked gpu (each skips, with its reason, without CUDA)
# The interpreter is PYTHON if given, else the newest supported python3.x on PATH. A venv keeps the
# Python it was made with, so give each its own: make test PYTHON=python3.12 VENV=.venv-3.12
#
# Supported: pyproject.toml's requires-python, newest first (tests/test_packaging.py keeps them in step).
PYTHONS := python3.13 python3.12 python3.11 python3.10
# Probed by running it: a pyenv shim of a version that is not selected is on PATH but fails.
PYTHON ?= $(firstword $(foreach p,$(PYTHONS),$(shell $(p) -c '' >/dev/null 2>&1 && echo $(p))))
# The torch lane. Unset: Composer 0.32.1's own pins (torch 2.7.0, torchvision 0.22.0). TORCH=2.14.1:
# that torch and its torchvision (TORCHVISION, else 0.<minor + 15>.<patch>, torchvision's numbering),
# with Composer and everything else installed around it by uv's --override (pip has no way to
# relax another package's pin). Each lane has its own venv.
TORCH ?=
TORCHVISION ?= $(if $(TORCH),$(shell echo '$(TORCH)' | awk -F. '{printf "0.%d.%s", $$2 + 15, $$3}'))
VENV ?= .venv$(if $(TORCH),-torch$(TORCH))
PY := $(VENV)/bin/python
VERSION := import platform; print(platform.python_version())
MINOR := import sys; print("%d.%d" % sys.version_info[:2])
# pip -qq: progress is ours (below); pip's warnings about this machine's index config and the build
# backend's notices are not the user's to act on. Errors still show.
PIP := $(PY) -m pip -qq

.PHONY: demo test test-fast test-gpu lint setup clean python-matches-venv gpu-wheels gpu-rehearsal

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | python-matches-venv
	$(if $(PYTHON),,$(error no Python 3.10-3.13 found on PATH (tried $(PYTHONS)); install one or pass PYTHON=/path/to/python3.x))
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 13))' 2>/dev/null \
		|| { echo "make: PYTHON=$(PYTHON) is not a working Python 3.10-3.13" >&2; exit 1; }
	@echo "$(if $(wildcard $(PY)),updating,creating) $(VENV) with $(PYTHON) (Python $$($(PYTHON) -c '$(VERSION)'))"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) install --upgrade pip
ifeq ($(TORCH),)
	@echo "installing usi-composer and its dependencies into $(VENV) (torch is a few GB: a few minutes the first time)"
	@$(PIP) install -e '.[dev]'
else
	@echo "installing torch $(TORCH) and torchvision $(TORCHVISION) into $(VENV) (a few GB: minutes the first time)"
	@$(PIP) install torch==$(TORCH) torchvision==$(TORCHVISION) uv
	@printf 'torch==$(TORCH)\ntorchvision==$(TORCHVISION)\n' > $(VENV)/torch-override.txt
	@echo "installing usi-composer and its dependencies around them (uv pip install --override $(VENV)/torch-override.txt)"
	@$(VENV)/bin/uv pip install -q --python $(PY) -e '.[dev]' --override $(VENV)/torch-override.txt
	@$(PY) -c 'import torch, torchvision; assert (torch.__version__.split("+")[0], torchvision.__version__.split("+")[0]) == ("$(TORCH)", "$(TORCHVISION)"), (torch.__version__, torchvision.__version__)'
endif
	@touch $@
	@echo "ready: $(VENV)"

# Asking for another Python than the venv's stops here, never runs on the venv's Python silently.
python-matches-venv:
ifeq ($(origin PYTHON),command line)
	@if [ -x $(PY) ] && [ "$$($(PY) -c '$(MINOR)')" != "$$($(PYTHON) -c '$(MINOR)')" ]; then \
		echo "make: $(VENV) has Python $$($(PY) -c '$(MINOR)'), not $(PYTHON): add VENV=.venv-<version>, or make clean" >&2; \
		exit 1; fi
endif

demo: setup
	$(PY) -m usi_composer.cli.demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

test-fast: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow"

# The tests marked gpu (each skips with its reason where there is no CUDA). Only the files named
# *gpu* are collected: the others import packages a GPU machine may lack (moto, kubeflow-training).
# TEST_PYTHON=python3: run with an interpreter that has the dependencies already, no venv made
# (a GPU machine without network: benchmarks/gpu_check.sh).
GPU_TESTS := $(wildcard tests/test_*gpu*.py)

test-gpu: $(if $(TEST_PYTHON),,setup)
	$(or $(TEST_PYTHON),$(PY)) -m pytest -m gpu -rA $(GPU_TESTS)

# The GPU machine (benchmarks/gpu-machine.txt: what it has, read on it, and the wheels we carry).
# gpu-wheels: every wheel it lacks into .whl/ (git-ignored), for its Python or PY=3.x; the list is
# checked against pyproject.toml's requirements. gpu-rehearsal: benchmarks/gpu_check.sh --rehearse in
# a copy of the tree as it travels, in a venv like the machine's, network off (no CUDA: those steps skip).
GPU_PY = $(if $(filter command line,$(origin PY)),--python $(PY))

gpu-wheels:
	$(if $(PYTHON),,$(error no Python 3.10-3.13 found on PATH (tried $(PYTHONS)); pass PYTHON=/path/to/python3.x))
	$(PYTHON) benchmarks/gpu_wheels.py $(GPU_PY)

gpu-rehearsal:
	$(if $(PYTHON),,$(error no Python 3.10-3.13 found on PATH (tried $(PYTHONS)); pass PYTHON=/path/to/python3.x))
	$(PYTHON) benchmarks/gpu_rehearsal.py $(GPU_PY)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .cache runs
