"""Every method on the embedded default (model=tiny dataset=arith), one seed, one table.

    python scripts/compare_methods.py                            # opo grpo dapo gspo dpo, 40 steps
    python scripts/compare_methods.py --steps 10 --methods opo grpo trainer.device=cpu

Each method trains through `opo_cli.train.train` in its own folder `outputs/compare/<method>/`
(started afresh, W&B off). The tiny model is built (and cached) before any clock starts. The
table gives the final reward (mean `train/reward_mean` of the last 10 steps), the mean
gradient norm (`train/grad_norm`, before clipping) and the wall time of each run. Extra
arguments are Hydra overrides applied to every run. A few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from opo_cli.config import CONF_DIR
from opo_cli.data import load_problems
from opo_cli.tracking import read_metrics
from opo_cli.train import initial_model_path, train

METHODS = ["opo", "grpo", "dapo", "gspo", "dpo"]
LAST = 10  # steps averaged for the final reward


def compose_run(method: str, steps: int, seed: int, overrides: list[str]) -> DictConfig:
    fixed = [f"method={method}", f"trainer.steps={steps}", f"seed={seed}", "logger=none"]
    fixed += ["trainer.resume=never", "trainer.save_every=0"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("train", overrides=[*fixed, *overrides])


def run_method(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Train one method from scratch in `run_dir`; its summary numbers."""
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    train(cfg, run_dir)
    wall = time.perf_counter() - start
    rows = read_metrics(run_dir / "metrics.jsonl")
    last = rows[-LAST:]
    return {
        "final_reward": sum(r["train/reward_mean"] for r in last) / len(last),
        "grad_norm": sum(r["train/grad_norm"] for r in rows) / len(rows),
        "wall_s": wall,
        "steps": len(rows),
    }


def results_table(results: dict[str, dict[str, float]], seed: int) -> Table:
    table = Table(title=f"methods on model=tiny dataset=arith, seed {seed}")
    table.add_column("method")
    table.add_column(f"final reward (last {LAST})", justify="right")
    table.add_column("mean grad norm", justify="right")
    table.add_column("wall time (s)", justify="right")
    table.add_column("steps", justify="right")
    for method, r in results.items():
        table.add_row(
            method,
            f"{r['final_reward']:.3f}",
            f"{r['grad_norm']:.3g}",
            f"{r['wall_s']:.1f}",
            str(r["steps"]),
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per method")
    parser.add_argument("--seed", type=int, default=0, help="one seed for every run")
    parser.add_argument("--methods", nargs="+", default=METHODS, help="method config names")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"), help="run folders")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    first = compose_run(args.methods[0], args.steps, args.seed, args.overrides)
    initial_model_path(first, load_problems(first.dataset)[0])  # build the tiny model now
    results = {}
    for method in args.methods:
        cfg = compose_run(method, args.steps, args.seed, args.overrides)
        results[method] = run_method(cfg, args.out / method)
    Console().print(results_table(results, args.seed))


if __name__ == "__main__":
    main()
