"""What logging completions costs: time spent in the completion logs against step time.

    python scripts/bench_completion_logs.py [overrides ...]   # the default run: 100 tiny steps

Runs `opo train` (the default config: tiny model, arith, W&B offline, completions every 10
steps, 2 groups of 8) in a temporary folder with timers around the completion logs: building
the rows (`CompletionLog.step_rows`, every step: the sampler snapshot, and on logged steps the
prompt match and the drive), writing them (`CompletionLog.write`), the W&B tables
(`tracking.wandb_table`), and the extra time of W&B's `log` on steps that send a table (its
mean there minus its mean on the other steps; the first table apart, as W&B imports pandas
to log it). Prints each against the summed `perf/step_s`.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from hydra import compose, initialize_config_dir

from opo_cli import completions, tracking
from opo_cli.config import CONF_DIR
from opo_cli.train import train

spent: dict[str, float] = {"rows": 0.0, "write": 0.0, "wandb_table": 0.0}
run_log: dict[bool, list[float]] = {True: [], False: []}  # with a table or not -> seconds


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - t0

    return wrapper


def timed_run_log(fn):
    def wrapper(metrics, step):
        t0 = time.perf_counter()
        fn(metrics, step=step)
        run_log[any(k.endswith("/completions") for k in metrics)].append(time.perf_counter() - t0)

    return wrapper


def main(overrides: list[str]) -> None:
    completions.CompletionLog.step_rows = timed("rows", completions.CompletionLog.step_rows)
    completions.CompletionLog.write = timed("write", completions.CompletionLog.write)
    tracking.wandb_table = timed("wandb_table", tracking.wandb_table)
    start_wandb = tracking.start_wandb

    def start_timed_wandb(*args, **kwargs):
        run = start_wandb(*args, **kwargs)
        run.log = timed_run_log(run.log)
        return run

    tracking.start_wandb = start_timed_wandb
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run")
        rows = tracking.read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    step_s = sum(r["perf/step_s"] for r in rows)
    with_table, without = run_log[True], run_log[False]
    if with_table and without:
        plain = statistics.mean(without)
        spent["wandb_log_first"] = with_table[0] - plain  # W&B imports pandas for its first table
        spent["wandb_log_later"] = sum(t - plain for t in with_table[1:])
    total = sum(spent.values())
    print(f"{len(rows)} steps, {step_s:.2f} s of step time (sum of perf/step_s)")
    for name, seconds in spent.items():
        print(f"  {name:<16} {seconds * 1e3:8.1f} ms  {100 * seconds / step_s:6.3f} %")
    print(f"  {'completion logs':<16} {total * 1e3:8.1f} ms  {100 * total / step_s:6.3f} %")
    steady = total - spent.get("wandb_log_first", 0.0)
    label = "without the first table"
    print(f"  {label:<16} {steady * 1e3:8.1f} ms  {100 * steady / step_s:6.3f} %")


if __name__ == "__main__":
    main(sys.argv[1:])
