"""Early against late, per configuration over seeds: the numbers docs/paper.md reads the
paper's claims by, from the runs `scripts/reproduce_paper.sh` wrote.

    python scripts/paper_numbers.py OUT/methods OUT/alpha_mu   # OUT: reproduce_paper.sh's folder

For each configuration (runs that differ only in `seed`; the grouping is `opo report`'s), one
markdown row: n seeds, then the mean and 95% t half-width over seeds of each run's mean over
its first and its last 10% of steps, for `train/reward_mean`, `train/grad_norm` and
`opo/delta_cubed_mean` (methods that do not log it: -), and late / early of the grad norm
(claim 1: does it decay?). `opo report` gives the final reward, steps to threshold and the
whole-run mean grad norm; this adds the start of training to compare them with.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

from omegaconf import OmegaConf

from opo_cli.intervals import mean_ci95
from opo_cli.report import Run, group_configs, load_runs, summarize, varying_labels
from opo_cli.tracking import is_number

REPORT_KNOBS = {"smoothing": 0.6, "last_frac": 0.1}  # conf/report.yaml's; only grouping uses them
KEYS = {
    "reward": "train/reward_mean",
    "grad_norm": "train/grad_norm",
    "dcubed": "opo/delta_cubed_mean",
}


def early_late(run: Run, key: str, frac: float = 0.1) -> tuple[float, float]:
    """Mean of `key` over the first and over the last `frac` of the run's logged steps."""
    values = [float(r[key]) for r in run.rows if is_number(r.get(key))]
    if not values:
        return math.nan, math.nan
    k = max(1, round(len(values) * frac))
    return sum(values[:k]) / k, sum(values[-k:]) / k


def cell(values: Sequence[float]) -> str:
    mean, half = mean_ci95(values)
    if math.isnan(mean):
        return "-"
    return f"{mean:.3g}" if math.isnan(half) else f"{mean:.3g} ± {half:.2g}"


def table(runs: Sequence[Run]) -> list[str]:
    """The markdown table, one row per configuration."""
    summary = summarize(runs, varying_labels(runs), OmegaConf.create(REPORT_KNOBS))
    head = ["configuration", "n"]
    for name in KEYS:
        head += [f"{name} first 10%", f"{name} last 10%"]
    head.append("grad_norm last / first")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config in group_configs(runs, summary):
        cells = [config.label or "(all)", str(len(config.runs))]
        for key in KEYS.values():
            pairs = [early_late(r, key) for r in config.runs]
            cells += [cell([e for e, _ in pairs]), cell([lt for _, lt in pairs])]
        ratios = [lt / e for e, lt in (early_late(r, KEYS["grad_norm"]) for r in config.runs)]
        cells.append(cell(ratios))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str]) -> int:
    if not argv:
        print("usage: python scripts/paper_numbers.py RUN_OR_SWEEP_DIR [...]", file=sys.stderr)
        return 2
    print("\n".join(table(load_runs(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
