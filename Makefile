# Two commands on a fresh machine: `make run` (serve the shipped checkpoint) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000
# CPU build of torch: the +cpu wheel where pip finds one (e.g. its find-links), its dependencies from the usual
# index; otherwise the CPU wheel index below.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX   ?= https://download.pytorch.org/whl/cpu

.PHONY: run test install dev bench-deps lint bench mutation compose-smoke scale-smoke depth-study screenshots clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	  || $(PIP) install -q --index-url $(TORCH_INDEX) torch==$(TORCH_VERSION)
	touch $@

# the fused C decode step, when a C compiler is present (else the TorchScript step runs; never needed at run time)
FUSED := model/fast/_fused_step.so model/fast/_fused_step_avx512.so
$(FUSED) &: model/fast/fused_step.c model/fast/fused_step.h | $(VENV)/.torch
	$(PY) -m model.fast.build

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e '.[dev]'
	touch $(VENV)/.installed $@

# the bench extra (transformers, CTranslate2: the peers the performance report compares with, and the tests that check
# they compute our model's function); torch is already there (CPU build), so pip installs no other torch
$(VENV)/.bench: $(VENV)/.dev
	$(PIP) install -q -e '.[bench]'
	touch $@

install: $(VENV)/.installed $(FUSED)

dev: $(VENV)/.dev $(FUSED)

bench-deps: $(VENV)/.bench $(FUSED)

run: $(VENV)/.installed $(FUSED)
	$(PY) -m app --host $(HOST) --port $(PORT)

test: $(VENV)/.dev $(FUSED)
	$(PY) -m pytest

# one formatter and one linter for all the Python in the repo, and the type checker over the serving code
lint: $(VENV)/.dev
	$(PY) -m ruff format --check app model training tests bench deploy
	$(PY) -m ruff check app model training tests bench deploy
	$(PY) -m mypy

bench: $(VENV)/.bench $(FUSED)
	$(PY) -m bench.run

compose-smoke:
	bash deploy/compose-smoke.sh

# before a release: small deliberate bugs, one at a time, each must make a test fail (docs/testing.md; minutes)
mutation: $(VENV)/.dev $(FUSED)
	$(PY) -m tests.mutation_check

# the README's pictures of the page at / (docs/page/*.png), taken in Chromium (apt-get install chromium)
screenshots: $(VENV)/.dev
	$(PY) -m tests.page_screenshots

# three api replicas behind HAProxy, with podman: balancing, SSE, drain and kill -9 under load (deploy/compose.scale.yml)
scale-smoke:
	bash deploy/scale-smoke.sh

# needs the corpus: DATA=path/to/tinyshakespeare.txt (default ../shared/data/tinyshakespeare.txt); one core (wall time: docs/depth_study.md)
DATA ?= ../shared/data/tinyshakespeare.txt
depth-study: $(VENV)/.dev
	$(PY) -m training.depth_study --data $(DATA) --threads 1

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
