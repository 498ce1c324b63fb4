# The README's two commands: `make demo` (the main job) and `make test`.
# Each creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastvae-installed
# A bare `torch` requirement pulls a multi-GB CUDA build; this pin takes the CPU build.
TORCH_CPU := torch==2.13.0

.PHONY: install lint test test-gpu-versions demo bench clean

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

# The suite on the CPU under the GPU machine's versions (torch 2.11, Triton 3.6; ours here are
# 2.13 and 3.9), in a venv of its own: a release difference shows here, not in scarce GPU time.
# PyPI's torch 2.11 is a CUDA build (about 3 GB with its libraries); it runs on the CPU.
GPU_VERSIONS_VENV := .venv-gpu-versions
GPU_VERSIONS_PY := $(GPU_VERSIONS_VENV)/bin/python
GPU_VERSIONS_STAMP := $(GPU_VERSIONS_VENV)/.fastvae-installed

$(GPU_VERSIONS_STAMP): pyproject.toml
	test -x $(GPU_VERSIONS_PY) || $(PYTHON) -m venv $(GPU_VERSIONS_VENV)
	$(GPU_VERSIONS_PY) -m pip install "torch==2.11.0" "triton==3.6.0"
	$(GPU_VERSIONS_PY) -m pip install -e ".[dev]" "torch==2.11.0" "triton==3.6.0"
	touch $@

test-gpu-versions: $(GPU_VERSIONS_STAMP)
	$(GPU_VERSIONS_PY) -m pytest -q -p no:cacheprovider
	FASTVAE_BACKEND=triton $(GPU_VERSIONS_PY) -m pytest -q -p no:cacheprovider $(API_TESTS)

demo: $(STAMP)
	$(PY) -m fastvae demo

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-enable --benchmark-only --benchmark-json=benchmarks/results/latest.json
	$(PY) -m benchmarks.interleaved --group all --device auto --rounds 10 --json benchmarks/results/latest-interleaved.json
	$(PY) -m benchmarks.report benchmarks/results/latest.json --interleaved benchmarks/results/latest-interleaved.json

clean:
	rm -rf $(VENV) $(GPU_VERSIONS_VENV) build *.egg-info .pytest_cache
