# The README's two commands: `make demo` (the embedded default study) and `make test`.
# Both create .venv when missing. torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA
# build on CPU machines. A GPU user may pre-install their own torch in .venv; pip then keeps it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
CONFIG ?= configs/tiny.yaml

.PHONY: demo test setup clean-cache bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/overopt run $(CONFIG)

test: setup
	$(VENV)/bin/ruff check pipeline stages tests benchmarks scripts
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/run_all.py

clean-cache:
	rm -rf .overopt_cache
