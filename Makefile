# Everyday commands; see README.md.
.PHONY: install test test-all lint smoke bench mutate

install:  ## CPU torch first (an unpinned torch pulls a CUDA build), then the project
	python3 -m pip install "torch==2.13.0"
	python3 -m pip install -e ".[dev]"

test:  ## the fast suite, as CI runs it
	python3 -m pytest -m "not slow and not gpu" -q

test-all:  ## everything, sweeps included (minutes)
	python3 -m pytest -q

lint:
	ruff check . && ruff format --check .

smoke:  ## two steps of every method on the tiny model
	for m in opo grpo dapo gspo dpo; do opo train method=$$m trainer.steps=2 logger=none || exit 1; done

bench:  ## does the default run learn within 3 minutes?
	python3 scripts/bench_default.py

mutate:  ## mutation testing of the core modules, one at a time (slow: not CI; docs/testing.md)
	python3 scripts/mutate.py $(MODULES)
