# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on disk on the project machines; pin it so pip never pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test test-slow bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	touch $@

venv: $(VENV)/.installed

demo: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/hf-slim demo --output-dir outputs/demo

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 -q

test-slow: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

bench: venv
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_slim_moe.py

clean:
	rm -rf $(VENV) outputs
