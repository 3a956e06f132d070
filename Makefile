# Two entry points for a fresh machine: `make run` and `make test` (each sets everything up first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= The meaning of life is
# CPU build of torch, already on disk here; a bare `torch` may pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36

.PHONY: setup setup-test run test clean

# setup: what `tandem` needs. setup-test adds the references the tests and `tandem bench --compare` use:
# llama-cpp-python (built from source, ~5 minutes the first time; pip caches the wheel), transformers, pytest.
# llama-cpp-python is built for this CPU's instruction sets but without AMX, whose buffer type crashes
# llama.cpp on deepseek2 models; a cached AMX build is rebuilt.

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard offload/csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.4"
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	CMAKE_ARGS="$$($(PY) local/llama_cpp_peer.py cmake-args)" $(PY) -m pip install -q "$(LLAMA_CPP_SPEC)"
	$(PY) local/llama_cpp_peer.py check || CMAKE_ARGS="$$($(PY) local/llama_cpp_peer.py cmake-args)" \
		$(PY) -m pip install -q --no-cache-dir --force-reinstall --no-deps "$(LLAMA_CPP_SPEC)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

run: setup
	$(VENV)/bin/tandem run -p "$(PROMPT)" -n 64

test: setup-test
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build
