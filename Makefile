# The two README commands. Each bootstraps .venv on a machine that has only
# Python >= 3.11 and pip, then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-slow bench docs clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The demo needs the data extra (digits) and the plot extra (its figure).
$(VENV)/.demo: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e ".[data,plot]"
	touch $@

$(VENV)/.test: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.demo

$(VENV)/.docs: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/fedjax-pfl demo --out demo_results

test: $(VENV)/.test
	$(PY) -m pytest -q -n 2 -m "not slow" --dist loadgroup --durations=15

test-slow: $(VENV)/.test
	$(PY) -m pytest -q -n 2 -m slow --dist loadgroup --durations=15

bench: $(VENV)/.test
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/round_speed.py --repeats 3

# The API reference (pdoc, from the docstrings) in docs/api/; any pdoc warning fails it.
docs: $(VENV)/.docs
	JAX_PLATFORMS=cpu $(PY) docs/build_api.py docs/api

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache docs/api demo_results
