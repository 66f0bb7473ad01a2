# The README's commands. Each target creates (or reuses) the virtual environment it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ldae-installed

# Which PyTorch goes into the venv (the one override; it is passed to pip as written):
#   make test TORCH_SPEC="torch==2.9.1 torchvision==0.24.1"
#   make test TORCH_SPEC="--index-url https://download.pytorch.org/whl/cu128 torch torchvision"
# Unset: with a GPU (nvidia-smi present) PyPI's build, which is the CUDA one; without, the CPU
# build from PyTorch's CPU index (about 1 GB in the venv instead of about 5.5 GB). When that index
# cannot be reached, or what it gives does not import, PyPI's build is the fallback: it runs on
# the CPU too, only larger.
TORCH_SPEC ?=
TORCH_RANGE := torch>=2.4,<2.15
CPU_INDEX := https://download.pytorch.org/whl/cpu
# timm imports torchvision, and a torchvision whose compiled ops do not match torch fails to import.
TORCH_OK := $(PY) -c "import torch, torchvision.ops; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)"

# pip, quietly: -q, and without the one known harmless warning a pip configured with a local
# file:// index prints for every package that index lacks ("Location 'file:///...' is ignored",
# about 80 lines on a first install). Every other line, errors included, passes through, and
# pip's exit status is kept (pipefail, hence bash).
SHELL := /bin/bash
PIP_NOISE := ^WARNING: Location 'file:[^']*' is ignored: it is neither a file nor a directory\.$$
PIP = set -o pipefail; pip_q() { $(PY) -m pip -q "$$@" 2>&1 | { grep -Ev "$(PIP_NOISE)" || true; }; }; pip_q

.PHONY: demo test test-gpu bench lint clean torch

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || { echo "creating the virtual environment $(VENV) (python3 -m venv)"; python3 -m venv $(VENV); }
	@echo "updating pip in $(VENV)"
	@$(PIP) install --upgrade pip
	@$(MAKE) --no-print-directory torch
	@echo "installing ldae-fast (editable) with its dependencies and the dev + scale extras (pytest, ruff, deepspeed)"
	@$(PIP) install -e '.[dev,scale]'
	@touch $(STAMP)
	@echo "$(VENV) is ready: $$($(PY) -c 'import ldae_fast, torch; print("ldae-fast", ldae_fast.__version__, "with PyTorch", torch.__version__)')"

torch:
	@if [ -n "$(TORCH_SPEC)" ]; then \
	  echo "installing PyTorch: $(TORCH_SPEC) (TORCH_SPEC)"; \
	  $(PIP) install $(TORCH_SPEC); \
	elif $(TORCH_OK) 2>/dev/null; then \
	  echo "PyTorch already in $(VENV): $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "nvidia-smi found: installing PyPI's CUDA build of PyTorch"; \
	  $(PIP) install '$(TORCH_RANGE)' torchvision; \
	else \
	  echo "no nvidia-smi: installing the CPU build of PyTorch from $(CPU_INDEX)"; \
	  if ! { $(PIP) install -q --retries 1 --timeout 20 --index-url $(CPU_INDEX) \
	           '$(TORCH_RANGE)' torchvision > $(VENV)/cpu-index.log && $(TORCH_OK) 2>/dev/null; }; then \
	    echo "the CPU build is not available here (pip's messages: $(VENV)/cpu-index.log); falling back to PyPI's build (CUDA, larger, runs on the CPU)"; \
	    $(PY) -m pip uninstall -q -y torch torchvision 2>/dev/null || true; \
	    $(PIP) install '$(TORCH_RANGE)' torchvision; \
	  fi; \
	fi
	@$(TORCH_OK) || { echo "PyTorch and torchvision do not work together in $(VENV); set TORCH_SPEC" >&2; exit 1; }
	@$(PY) -c "import torch; print('PyTorch', torch.__version__, 'CUDA build' if torch.version.cuda else 'CPU build')"

demo: $(STAMP)
	$(PY) train.py

# Kernels run in the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1
# unless LDAE_GPU_TESTS=1).
test: $(STAMP)
	$(PY) -m pytest -q

test-gpu: $(STAMP)
	LDAE_GPU_TESTS=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/kernels.py

lint: $(STAMP)
	$(VENV)/bin/ruff check ldae_fast tests bench train.py

clean:
	rm -rf $(VENV) runs .pytest_cache
