# The two commands a newcomer runs: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
# The cache folder, as spectune.paths.cache_dir finds it: $SPECTUNE_CACHE, else ~/.cache/spectune.
CACHE  ?= $(or $(SPECTUNE_CACHE),$(HOME)/.cache/spectune)
PAIR   ?= $(CACHE)/pairs/tiny-seed0
DB     ?= $(CACHE)/spectune.db

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

# CPU torch first (a bare `torch` requirement may resolve to a multi-GB CUDA build).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/spectune demo --pair $(PAIR) --db sqlite:///$(DB)

test: setup
	$(BIN)/python -m pytest tests -q

test-fast: setup
	$(BIN)/python -m pytest tests -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
