# lf-dist developer commands. `make test` and `make demo` work on a fresh clone (CPU only, no network to hubs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# LLaMA-Factory from PyPI in its own venv: the reference for the token-parity tests (they skip, saying why,
# if it cannot be installed). SKIP_LF_REFERENCE=1 make test skips building it.
LF_STAMP := .venv-lf.stamp
PIP := $(BIN)/python -m pip
CHECK_DIRS := lf_dist tests benchmarks examples

.PHONY: install test test-slow test-all demo bench style quality clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned by constraints.txt, so no multi-GB CUDA build is pulled on CPU machines
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

$(LF_STAMP): tests/reference/lf_venv.py constraints.txt | $(STAMP)
ifneq ($(SKIP_LF_REFERENCE),1)
	$(BIN)/python tests/reference/lf_venv.py --create
	touch $(LF_STAMP)
endif

install: $(STAMP)

# The CPU suite without the multi-process / long tests (`-m slow`: distributed backends, Ray cluster, memory
# accuracy runs); `make test-slow` runs those, and CI (.ci/run) runs both.
test: $(STAMP) $(LF_STAMP)
	$(BIN)/python -m pytest -q -m "not cuda and not slow"

test-slow: $(STAMP) $(LF_STAMP)
	$(BIN)/python -m pytest -q -m "slow and not cuda"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/lf-dist train examples/tiny/sft_lora.yaml

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py

style: $(STAMP)
	$(BIN)/ruff format $(CHECK_DIRS)
	$(BIN)/ruff check --fix $(CHECK_DIRS)

quality: $(STAMP)
	$(BIN)/ruff format --check $(CHECK_DIRS)
	$(BIN)/ruff check $(CHECK_DIRS)

clean:
	rm -rf $(VENV) .venv-lf $(LF_STAMP) .venv-lf-install.log saves .pytest_cache
