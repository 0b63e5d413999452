# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install demo test docs benchmark clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[datasets,test,docs]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m influence_lib.demo

test: install
	$(PY) -m pytest -q -n 2 tests

benchmark: install
	$(PY) benchmarks/run.py $(BENCHMARK_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info site .pytest_cache
