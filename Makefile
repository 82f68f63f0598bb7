# The README's two commands: `make demo` (the embedded default study) and `make test`.
# Both create .venv when missing. Every install goes through constraints.txt, the exact version of every package
# (`make lock` rewrites it from .venv), so a fresh setup months later gets the versions the committed reports were
# made with, not the newest within pyproject.toml's ranges. torch is installed first and pinned (its version is the
# lock's torch line): an unpinned torch pulls a multi-GB CUDA build on CPU machines.
# A GPU user may pre-install their own torch in .venv; pip then keeps it: the torch step is skipped when a GPU build
# (CUDA or ROCm) of torch imports, and the project step is given the lock without its torch line (torch is installed
# by then either way), so a user's torch of another version is neither replaced nor a conflict. The lock's pins of
# torch's own dependencies still apply (pip names any it cannot satisfy). A CPU torch off the pin (a .venv older than
# the lock) is replaced by the pinned one.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := constraints.txt
TORCH ?= $(shell grep -m1 '^torch==' $(LOCK))
CONFIG ?= configs/tiny.yaml

.PHONY: demo test setup lock clean-cache bench

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch, sys; sys.exit(not (torch.version.cuda or torch.version.hip))" 2>/dev/null \
		|| $(PY) -m pip install --quiet -c $(LOCK) "$(TORCH)"
	grep -v '^torch==' $(LOCK) > $(VENV)/constraints-without-torch.txt
	$(PY) -m pip install --quiet -c $(VENV)/constraints-without-torch.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Rewrites the pins of constraints.txt from what .venv holds now (its leading comment lines are kept). To move a pin:
# install the version you want into .venv, run `make test`, then `make lock` and commit constraints.txt.
# pip, setuptools and wheel are left out (pip freeze's default) and so is overopt itself; local version labels are
# dropped (torch==2.13.0 admits the CPU wheel 2.13.0+cpu and a CUDA build of 2.13.0 alike).
lock:
	test -x $(PY)
	{ grep '^#' $(LOCK); $(PY) -m pip freeze --exclude-editable --exclude overopt \
		| sed -E 's/^([^=]+==[^+]+)\+.*$$/\1/'; } > $(LOCK).new
	! grep -vE '^(#|[A-Za-z0-9._-]+==[^ ]+$$)' $(LOCK).new
	mv $(LOCK).new $(LOCK)

demo: setup
	$(VENV)/bin/overopt run $(CONFIG)

test: setup
	$(VENV)/bin/ruff check pipeline stages tests benchmarks scripts
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/run_all.py

clean-cache:
	rm -rf .overopt_cache
