# Two commands: `make demo` installs and runs the workflow on config.yaml; `make test` installs and runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
CORES ?= 2
BIN := $(VENV)/bin

.PHONY: install demo test report clean

$(BIN)/sparsitytrap: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch and torchvision are pinned as a pair in pyproject.toml (see README, Installation)
	$(BIN)/pip install -e '.[dev]'
	touch $@

# the metric kernels compiled (about 30 s: numba's cache, then ahead of time) after each edit of
# kernels.py, not by the first jobs
$(VENV)/.metric-kernels: $(BIN)/sparsitytrap src/sparsitytrap/metrics/kernels.py
	$(BIN)/python -m sparsitytrap.metrics
	touch $@

install: $(BIN)/sparsitytrap $(VENV)/.metric-kernels

# sparsitytrap.resume: snakemake, after clearing the stale lock of a killed run (README, When something fails)
demo: install
	$(BIN)/python -m sparsitytrap.resume --cores $(CORES)
	$(BIN)/snakemake --report report.html

test: install
	bash tests/slurm/install.sh
	$(BIN)/pytest -q

clean:
	rm -rf results .snakemake report.html
