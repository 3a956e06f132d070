# Two entry points for a fresh machine: `make run` and `make test` (each sets everything up first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= The meaning of life is
# CPU build of torch, already on disk here; a bare `torch` may pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard offload/csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.4"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

run: setup
	$(VENV)/bin/tandem run -p "$(PROMPT)" -n 64

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build
