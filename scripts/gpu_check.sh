#!/usr/bin/env bash
# Every GPU check of the performance issue in one go (about 6 minutes on an H200): the gpu
# tests, then the shape (Qwen3-1.7B sizes, 32 x 6, 200-token prompts, 512 new tokens)
# through scripts/bench_step.py, ours against TRL with generate, then ours with our own
# sampling loop (rollout.backend=opo: static cache, CUDA graphs; the first step compiles).
#
#   bash scripts/gpu_check.sh
#
# On a machine without the project's packages, put their wheels in .whl/ first: they are
# installed into /tmp/site (no index, no dependencies) and put on PYTHONPATH.
set -euo pipefail

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_train.py tests/test_perf.py tests/test_decode.py
shape=(--arch qwen3-1.7b --prompts 32 --group 6 --prompt-len 200 --new-tokens 512 --steps 2)
python3 scripts/bench_step.py "${shape[@]}"
python3 scripts/bench_step.py "${shape[@]}" --only ours --ours rollout.backend=opo
