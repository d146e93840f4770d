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
# Every package of the test environment is pinned in locks/dev.txt (Linux x86_64, Python 3.11), made from
# pyproject.toml by `make lock`; locks/llamafactory.txt pins the reference venv the same way.
LOCK := locks/dev.txt
LF_LOCK := locks/llamafactory.txt
PIP_VERSION := 26.3
UV_VERSION := 0.13.9
TORCH_VERSION := 2.13.0
# torch's build: cpu here and in CI; a CUDA machine runs `make install TORCH_BUILD=cu130` (a build PyTorch
# publishes for this release) and gets every other pin unchanged. The lock names torch==$(TORCH_VERSION),
# which any build satisfies, so installing it never pulls the CUDA wheels onto a CPU machine.
TORCH_BUILD ?= cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/$(TORCH_BUILD)
# Where `make lock` finds torch's CPU wheel: a local folder of wheels if the machine has one, else PyTorch's index.
TORCH_WHEELS ?= /opt/wheels
LOCK_TORCH := $(if $(wildcard $(TORCH_WHEELS)/torch-$(TORCH_VERSION)+cpu-*.whl),--find-links $(TORCH_WHEELS),--torch-backend cpu)
LOCK_ARGS := -c constraints.txt -c locks/torch-cpu.txt --python-version 3.11 --python-platform x86_64-manylinux_2_28 $(LOCK_TORCH) \
	--custom-compile-command "make lock"

.PHONY: install lock browser test test-slow test-all demo bench style quality clean

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q pip==$(PIP_VERSION)
	# torch's own build first (a local wheel, else PyTorch's index for that build), then every other pin
	$(PIP) install -q torch==$(TORCH_VERSION)+$(TORCH_BUILD) 2>/dev/null \
		|| $(PIP) install -q --extra-index-url $(TORCH_INDEX) torch==$(TORCH_VERSION)+$(TORCH_BUILD)
	$(PIP) install -q -r $(LOCK)
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

# Regenerate both locks from pyproject.toml / locks/llamafactory.in (needs PyPI), then reinstall with `make install`.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q uv==$(UV_VERSION)
	$(BIN)/uv pip compile -q pyproject.toml --extra dev $(LOCK_ARGS) -o $(LOCK)
	$(BIN)/uv pip compile -q locks/llamafactory.in $(LOCK_ARGS) -o $(LF_LOCK)
	sed -i -e 's/^torch==$(TORCH_VERSION)+cpu$$/torch==$(TORCH_VERSION)/' $(LOCK) $(LF_LOCK)

$(LF_STAMP): tests/reference/lf_venv.py $(LF_LOCK) | $(STAMP)
ifneq ($(SKIP_LF_REFERENCE),1)
	rm -rf .venv-lf
	$(BIN)/python tests/reference/lf_venv.py --create
	touch $(LF_STAMP)
endif

install: $(STAMP)

# The CPU suite without the multi-process / long tests (`-m slow`: distributed backends, Ray cluster, memory
# accuracy runs); `make test-slow` runs those, and CI (.ci/run) runs both.
test: $(STAMP) $(LF_STAMP)
	$(BIN)/python -m pytest -q --durations=25 -m "not cuda and not slow"

# A headless browser for the web UI's page test (tests/test_webui_browser.py): Debian's chromium and its
# chromedriver, from the system's packages (root, or sudo without a password); the test skips, saying why, without.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo -n)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		|| $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
		|| ($(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null 2>&1) \
		|| echo "no browser could be installed: the web UI's browser test will skip"

# Two pytest processes side by side over disjoint test files (tests/shards.py: a multi-process test leaves a core
# idle much of the time); `$(BIN)/python -m pytest -m "slow and not cuda"` runs the same selection in one process.
test-slow: $(STAMP) $(LF_STAMP) browser
	$(BIN)/python tests/shards.py -q --durations=40 -m "slow and not cuda"

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
