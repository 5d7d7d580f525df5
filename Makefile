# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both install the committed lock (requirements/lock.txt: exact versions of every dependency, transitive ones
# included) into $(VENV), then this package itself with --no-deps. `make lock` refreshes the lock;
# `make test-latest` tests the newest versions inside setup.cfg's ranges in a separate venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt
# The CPU wheel of torch lies on disk on the project machines; pin it so pip never pulls a CUDA build.
# The lock pins the same torch (without the +cpu label, so PyPI's build matches elsewhere); overriding this
# (`make test TORCH_SPEC=torch==X`) installs the lock with torch taken from here instead.
TORCH_SPEC ?= torch==2.13.0
# How the suite runs; `make test` and `make test-latest` share it (setup.cfg's addopts excludes slow tests).
PYTEST_ARGS ?= -n 2 -q

# `make lock`: pip-tools in its own venv, so $(VENV) holds exactly the lock.
LOCK_VENV ?= .venv-lock
LOCK_TOOLS := pip==26.3 pip-tools==7.6.2
# Default: re-resolve everything to the newest versions inside setup.cfg's ranges. `make lock LOCK_UPGRADE=`
# keeps the current pins where setup.cfg still allows them (to add or bump one package only).
LOCK_UPGRADE ?= --upgrade

# `make test-latest`: the newest versions inside setup.cfg's ranges, in a venv of their own.
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
KEY_PACKAGES := torch transformers trl peft accelerate datasets bitsandbytes safetensors huggingface_hub

.PHONY: venv demo test test-slow test-latest lock bench clean FORCE

# Rewritten only when TORCH_SPEC changes, so an override reinstalls an existing venv.
$(VENV)/.torch-spec: FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

$(VENV)/.installed: $(LOCK) setup.cfg pyproject.toml $(VENV)/.torch-spec
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	grep -v '^torch==' $(LOCK) > $(VENV)/lock-install.txt
	$(PY) -m pip install -q -r $(VENV)/lock-install.txt "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/hf-slim demo --output-dir outputs/demo

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

test-slow: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

# torch stays at $(TORCH_SPEC) here too: it is the machine's platform wheel (the CPU build on disk); the newest
# torch inside the range would be a fresh download of PyPI's CUDA build (gigabytes), so only the rest moves.
test-latest:
	test -x $(LATEST_PY) || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q --upgrade pip
	$(LATEST_PY) -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]" "$(TORCH_SPEC)"
	$(LATEST_PY) -m pip check
	@echo "newest versions inside setup.cfg's ranges:"
	@$(LATEST_PY) -c 'import sys, importlib.metadata as m; [print(f"  {p:<16} {m.version(p)}") for p in sys.argv[1:]]' $(KEY_PACKAGES)
	HF_HUB_OFFLINE=1 $(LATEST_PY) -m pytest $(PYTEST_ARGS)

define LOCK_HEADER
# requirements/lock.txt: exact versions of every dependency of hf-slim (setup.cfg's install_requires plus the
# `dev` extra), transitive ones included. `make demo` and `make test` install exactly these.
# Made by `make lock` (pip-tools' pip-compile: the newest versions inside setup.cfg's ranges, torch pinned to
# the Makefile's TORCH_SPEC). Do not edit by hand: change setup.cfg, run `make test-latest`, then `make lock`.
# Resolved on Linux x86_64 with Python 3.11. torch carries no local label (+cpu): PEP 440's ==2.13.0 matches the
# CPU wheel 2.13.0+cpu where pip finds one (--find-links) and PyPI's build elsewhere.
endef
export LOCK_HEADER

$(LOCK_VENV)/.installed:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q $(LOCK_TOOLS)
	touch $@

lock: $(LOCK_VENV)/.installed
	mkdir -p $(dir $(LOCK))
	echo '$(TORCH_SPEC)' > $(LOCK_VENV)/torch.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet $(LOCK_UPGRADE) --extra dev \
		--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
		--constraint $(LOCK_VENV)/torch.txt --output-file $(LOCK) setup.cfg
	{ printf '%s\n' "$$LOCK_HEADER"; sed -E -e 's/^([A-Za-z0-9._-]+==[^ +;]+)\+[A-Za-z0-9.]+/\1/' \
		-e 's|-c $(LOCK_VENV)/torch.txt|TORCH_SPEC (Makefile)|' $(LOCK); } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

bench: venv
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_slim_moe.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(LOCK_VENV) outputs
