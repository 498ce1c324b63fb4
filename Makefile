# The README's two commands: `make demo` (the main job) and `make test`.
# Each creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastvae-installed
# A bare `torch` requirement pulls a multi-GB CUDA build; this pin takes the CPU build.
TORCH_CPU := torch==2.13.0

.PHONY: install lint test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_CPU)"
	$(PY) -m pip install -e ".[dev]"
	touch $@

install: $(STAMP)

# The public-API tests again with every op forced onto the Triton kernels
# (under Triton's interpreter on CPU): the kernels held to the textbook formulas too.
API_TESTS := tests/test_functional.py tests/test_functional_sampling.py \
	tests/test_functional_properties.py tests/test_posterior.py tests/test_modules.py \
	tests/test_validate.py

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP) lint
	$(PY) -m pytest
	FASTVAE_BACKEND=triton $(PY) -m pytest -q $(API_TESTS)

demo: $(STAMP)
	$(PY) -m fastvae demo

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-enable --benchmark-only --benchmark-json=benchmarks/results/latest.json
	$(PY) -m benchmarks.interleaved --group all --device auto --rounds 10 --json benchmarks/results/latest-interleaved.json
	$(PY) -m benchmarks.report benchmarks/results/latest.json --interleaved benchmarks/results/latest-interleaved.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
