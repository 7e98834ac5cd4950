"""Does `opo train` with no overrides learn, and how long does it take?

Runs the embedded default exactly as a new user would (`opo train`, no overrides, W&B offline,
a fresh model cache so the tiny model's warm start is paid too) in a temporary folder, then
prints the wall time and the mean training reward of the first and last 10 steps.
Targets (issue "opo train end to end"): at most 180 s on a 2-core CPU; last10 - first10 >= 0.3.

    python scripts/bench_default.py [--keep DIR] [extra overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(workdir: Path, overrides: list[str]) -> tuple[float, list[dict]]:
    env = {**os.environ, "OPO_CACHE": str(workdir / "cache"), "WANDB_MODE": "offline"}
    start = time.perf_counter()
    command = [sys.executable, "-m", "opo_cli", "train", *overrides]  # no `opo` on PATH needed
    subprocess.run(command, cwd=workdir, env=env, check=True)
    wall = time.perf_counter() - start
    metrics = next((workdir / "outputs" / "train").glob("*/metrics.jsonl"))
    return wall, [json.loads(line) for line in metrics.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="opo-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    wall, rows = run(workdir, args.overrides)
    rewards = [r["train/reward_mean"] for r in rows]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    step_s = sum(r["perf/step_s"] for r in rows) / len(rows)
    print(f"steps {len(rows)}  wall {wall:.1f} s  mean step {step_s:.3f} s")
    print(f"reward first 10 steps {first:.3f}  last 10 steps {last:.3f}  rise {last - first:+.3f}")
    ok = wall <= 180 and last - first >= 0.3
    print("targets (wall <= 180 s, rise >= 0.3):", "met" if ok else "NOT met")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
