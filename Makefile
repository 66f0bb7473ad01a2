# The README's commands. Each target creates (or reuses) the virtual environment it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
# timm needs a torchvision whose compiled ops load beside torch. On this project's machines
# torch 2.14.1 + torchvision 0.29.1 lie on disk for Python 3.11 and install without a download;
# elsewhere override, e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.ldae-installed

.PHONY: demo test test-gpu bench lint clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

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
