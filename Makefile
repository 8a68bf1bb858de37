# One command sets everything up and runs the main job; one sets everything up and tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install --quiet "torch>=2.4,<2.15" torchvision
	$(PY) -m pip install --quiet -e ".[test,demo]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fxmerge.demo

test: $(STAMP)
	$(PY) -m ruff check fxmerge tests benchmarks
	$(PY) -m ruff format --check fxmerge tests benchmarks
	$(PY) -m pytest -n 2 -q

test-all: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow"
	$(PY) -m pytest -n 1 -q -m slow  # one worker: wide zoo merges need up to ~24 GB

lint: $(STAMP)
	$(PY) -m ruff check fxmerge tests benchmarks
	$(PY) -m ruff format --check fxmerge tests benchmarks

# the benchmarks behind benchmarks/RESULTS.md; each writes benchmarks/results/<name>.json (hours: see RESULTS.md)
bench: $(STAMP)
	cd benchmarks && for script in solver_speed latency_model latency_context compress_zoo zoo_coverage paper_mini; do \
		../$(PY) $$script.py || exit 1; done

clean:
	rm -rf $(VENV) .fxmerge-cache build *.egg-info
