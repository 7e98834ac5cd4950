"""Tables and plots over finished runs and sweeps: `opo report PATH [PATH ...]`.

A PATH is a run folder (it holds `metrics.jsonl`), a Hydra multirun sweep folder, or any
folder above them; runs are found recursively. The report goes to `<first PATH>/report/`
(or `out_dir`):

    summary.csv, summary.md          one row per configuration, seeds merged (`SUMMARY_COLUMNS`):
                                     mean and 95% Student-t half-width over seeds
    runs.csv                         one row per run (`RUN_COLUMNS`); summary.md lists the
                                     runs too when a configuration has several seeds
    reward.png, grad_norm.png        per configuration: EMA-smoothed curve (the mean over seeds,
                                     a shaded 95% t-band across them), raw series faint behind
    heatmap_final_reward.png         alpha x mu grids, mean over seeds and n per cell, when a
    heatmap_steps_to_threshold.png   method has >= 2 of each (suffixed `_<method>[,k=v...]`
                                     when there are several)
    claim1_grad_norm.png, ...        the paper's claims, when the runs allow (`report_claims`)
    samples/<run>.md                 what each run wrote: its last logged groups, with rewards

A configuration is the runs that differ only in `seed`. Two runs are one configuration when
their saved `.hydra/config.yaml`, unresolved (`${...}` kept as written), is the same once the
`BOOKKEEPING` keys are removed: `seed`, and the keys that name, log or checkpoint a run
without changing what it computes (`run_name`, `logger`, `tracking`, `trainer.resume`,
`trainer.save_every`, `trainer.keep_last`, `trainer.log_every`, `trainer.max_bad_steps`,
`model.cache_dir`). A run without a saved config (or with an empty one) is compared by its
overrides instead, less the same keys; one with neither is a configuration of its own. A
configuration holds one run per seed: a second run with a seed already in it (the same sweep
given twice, or GRPO runs of an alpha x mu sweep, which differ only in keys the loss ignores
and so are repeats) starts a configuration of its own, labelled apart.

alpha and mu are left empty for runs whose loss does not take them (GRPO, DAPO, ...): such
runs are repeats of one another, never a grid. A heatmap holds the runs of one method and
one value of every other override that varies (learning rate, dataset, ...); its cells
average over seeds only.

Knobs live in `conf/report.yaml`. Figures use matplotlib's `Figure` directly (Agg canvas,
no pyplot state), so the report runs headless and leaks no figures.

    opo report outputs/multirun/2025-01-01/12-00-00
    opo report sweep_a sweep_b threshold=0.5 smoothing=0.8
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from opo_cli.completions import COMPLETIONS_FILE, EVAL_COMPLETIONS_FILE, read_rows, samples_page
from opo_cli.errors import UserError
from opo_cli.intervals import mean_ci95, seed_band
from opo_cli.tracking import is_number, load_metrics

SKIP_DIRS = {"report", "wandb", "checkpoints", "final", "replaced"}  # no runs; can be large
NOISE_KEYS = ("hydra", "logger", "trainer.resume", "trainer.save_every", "wandb")
BOOKKEEPING = (  # config keys that do not change what a run computes: not its configuration
    "seed",
    "run_name",
    "logger",
    "tracking",
    "trainer.resume",
    "trainer.save_every",
    "trainer.keep_last",
    "trainer.log_every",
    "trainer.max_bad_steps",
    "model.cache_dir",
    "hydra",
    "wandb",
)
RUN_COLUMNS = [  # runs.csv
    "label",  # the overrides that vary across the reported runs
    "method",
    "alpha",
    "mu",
    "seed",
    "steps",  # last step logged
    "steps_planned",  # trainer.steps from the config
    "final_reward",  # mean train/reward_mean over the last `last_frac` of rows
    "steps_to_threshold",  # first step whose EMA reward >= threshold; empty: never
    "grad_norm_mean",  # mean train/grad_norm over all rows
    "eval_accuracy",  # eval.json accuracy, else the last eval/accuracy in metrics
    "path",
]
METRICS = (  # summary.csv's <name>_mean and <name>_ci95: (name, the runs.csv column)
    ("final_reward", "final_reward"),
    ("steps_to_threshold", "steps_to_threshold"),  # over the seeds that reached it
    ("grad_norm", "grad_norm_mean"),
    ("eval_accuracy", "eval_accuracy"),
)
SUMMARY_COLUMNS = [  # summary.csv: one row per configuration; *_ci95 empty with one seed
    "label",  # the overrides that vary across configurations (seed never among them)
    "method",
    "alpha",
    "mu",
    "n_seeds",  # runs in the configuration
    "seeds",  # their seeds, space-separated
    "steps",  # last step logged, the fewest over the seeds
    "steps_planned",
    *(f"{name}_{stat}" for name, _ in METRICS for stat in ("mean", "ci95")),
    "threshold_reached",  # seeds whose EMA reward reached the threshold
    "path",  # the run folders, ';'-separated
]

console = Console()


class ReportError(UserError):
    """A problem the user can fix (bad path, no runs, bad knob): printed as one line."""


@dataclass
class Run:
    """One run folder as read from disk."""

    path: Path
    name: str  # folder path relative to the PATH it was found under
    overrides: dict[str, str]  # override key -> value, noise keys removed
    config: DictConfig | None  # .hydra/config.yaml, when present
    rows: list[dict[str, Any]]  # metrics rows, one per step, sorted by step
    damaged_lines: int = 0
    eval_json: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- discovery and reading


def find_run_dirs(root: Path) -> Iterator[Path]:
    """Folders under `root` (itself included) that hold `metrics.jsonl`; no descent into runs."""
    if (root / "metrics.jsonl").is_file():
        yield root
        return
    children = [p for p in root.iterdir() if p.is_dir()]
    for child in sorted(children, key=natural_key):
        if child.name not in SKIP_DIRS and not child.name.startswith("."):
            yield from find_run_dirs(child)


def natural_key(path: Path) -> list[Any]:
    """Sort key putting `2` before `10` in numbered Hydra multirun folders."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """`["method=opo", "+x=1", "hydra.a=b"]` -> `{"method": "opo", "x": "1"}`, noise dropped."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.lstrip("+~")
        if sep and not any(key == n or key.startswith(n + ".") for n in NOISE_KEYS):
            out[key] = value
    return out


def read_overrides(run_dir: Path) -> dict[str, str]:
    """Overrides from `.hydra/overrides.yaml`; else parsed from a `k=v,k=v` folder name."""
    file = run_dir / ".hydra" / "overrides.yaml"
    if file.is_file():
        try:
            items = yaml.safe_load(file.read_text(encoding="utf-8")) or []
        except yaml.YAMLError:
            items = []
        return parse_overrides(items if isinstance(items, list) else [])
    if "=" in run_dir.name:
        return parse_overrides(run_dir.name.split(","))
    return {}


def read_config(run_dir: Path) -> DictConfig | None:
    """`.hydra/config.yaml`, or None when absent or unreadable."""
    file = run_dir / ".hydra" / "config.yaml"
    try:
        cfg = OmegaConf.load(file) if file.is_file() else None
    except Exception:  # a damaged snapshot must not stop the report
        return None
    return cfg if isinstance(cfg, DictConfig) else None


def read_eval_json(run_dir: Path) -> dict[str, Any]:
    """`eval.json` written by `opo eval`, or {}."""
    file = run_dir / "eval.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every run under `paths`, each once; raises ReportError when a path is bad or empty."""
    runs: dict[Path, Run] = {}
    for raw in paths:
        root = Path(raw).expanduser()
        if not root.is_dir():
            raise ReportError(f"no such folder: {raw}")
        found = list(find_run_dirs(root))
        if not found:
            raise ReportError(f"no runs (folders with metrics.jsonl) under {raw}")
        for run_dir in found:
            rel = run_dir.relative_to(root).as_posix()
            name = root.resolve().name if rel == "." else rel
            runs.setdefault(run_dir.resolve(), load_run(run_dir, name))
    return list(runs.values())


def load_run(run_dir: Path, name: str) -> Run:
    """Read one run folder."""
    rows, damaged = load_metrics(run_dir / "metrics.jsonl")
    return Run(
        path=run_dir,
        name=name,
        overrides=read_overrides(run_dir),
        config=read_config(run_dir),
        rows=rows,
        damaged_lines=damaged,
        eval_json=read_eval_json(run_dir),
    )


# ---------------------------------------------------------------- per-run numbers


LOSS_KEYS = ("alpha", "mu")  # top-level keys that only some losses take


def loss_takes(run: Run, key: str) -> bool | None:
    """Whether the run's loss takes `key` (a keyword of its function in `opo_cli.losses.LOSSES`);
    None when the loss is unknown (no saved config and no `method` override, or a name the
    registry does not hold)."""
    from opo_cli.losses import LOSSES  # torch: loaded only when a report needs it

    name = config_value(run, "method.loss") or run.overrides.get("method")
    if name not in LOSSES:
        return None
    return key in inspect.signature(LOSSES[name]).parameters


def unused_keys(run: Run) -> set[str]:
    """The `LOSS_KEYS` the run's loss does not take: set or swept, they change nothing."""
    return {k for k in LOSS_KEYS if loss_takes(run, k) is False}


def config_value(run: Run, key: str) -> Any:
    """A config value (`alpha`, `mu`, `seed`, ...), else the run's override, else None.

    alpha and mu are None where the run's loss does not take them (`loss_takes`): a GRPO run
    in an alpha x mu sweep shows none. Otherwise they come from `method.loss_kwargs` when the
    method lists its kwargs.
    """
    if key in LOSS_KEYS and key in unused_keys(run):
        return None
    value = None
    if run.config is not None:
        kwargs = OmegaConf.select(run.config, "method.loss_kwargs", default=None)
        use_kwargs = key in ("alpha", "mu") and isinstance(kwargs, DictConfig)
        where = f"method.loss_kwargs.{key}" if use_kwargs else key
        value = OmegaConf.select(run.config, where, default=None, throw_on_resolution_failure=False)
    if value is None and key in run.overrides:
        value = parse_scalar(run.overrides[key])
    return value


def parse_scalar(text: str) -> Any:
    """'3' -> 3, '1e-3' -> 0.001, anything else stays a string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows where `key` is a finite number."""
    pairs = [(r["step"], r[key]) for r in rows if is_number(r.get(key))]
    return [float(s) for s, _ in pairs], [float(v) for _, v in pairs]


def ema(values: Sequence[float], smoothing: float) -> list[float]:
    """Exponential moving average: s_0 = x_0, s_t = smoothing * s_{t-1} + (1 - smoothing) * x_t."""
    out: list[float] = []
    for x in values:
        out.append(x if not out else smoothing * out[-1] + (1 - smoothing) * x)
    return out


def final_mean(values: Sequence[float], last_frac: float) -> float:
    """Mean of the last `max(1, floor(last_frac * n))` values; NaN when there are none."""
    if not values:
        return math.nan
    k = max(1, int(last_frac * len(values) + 1e-9))  # 1e-9: 0.1 * 30 must give 3, not 2
    tail = values[-k:]
    return sum(tail) / len(tail)


def first_step_at(steps: Sequence[float], smoothed: Sequence[float], threshold: float) -> float:
    """First step whose smoothed value is >= threshold; NaN when never."""
    return next((s for s, v in zip(steps, smoothed, strict=True) if v >= threshold), math.nan)


def eval_accuracy(run: Run) -> float:
    """`accuracy` from eval.json (a full evaluation) else the last `eval/accuracy` logged."""
    if is_number(run.eval_json.get("accuracy")):
        return float(run.eval_json["accuracy"])
    _, acc = series(run.rows, "eval/accuracy")
    return acc[-1] if acc else math.nan


def resolve_threshold(cfg: DictConfig, finals: Sequence[float]) -> float:
    """`cfg.threshold` when set; else `threshold_frac` x the best final reward (NaN if <= 0)."""
    if cfg.get("threshold") is not None:
        return float(cfg.threshold)
    best = max((f for f in finals if math.isfinite(f)), default=math.nan)
    return float(cfg.get("threshold_frac", 0.8)) * best if best > 0 else math.nan


# ---------------------------------------------------------------- labels and summary


def varying_keys(runs: Sequence[Run], ignore: Sequence[str] = ()) -> list[str]:
    """The override keys whose value differs across `runs`, in order of first appearance,
    less `ignore`."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys and k not in ignore]
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def varying_labels(
    runs: Sequence[Run], ignore: Sequence[str] = (), names: Sequence[str] | None = None
) -> list[str]:
    """Per run, `k=v,...` over the override keys whose value differs across runs (less
    `ignore`), leaving out alpha and mu where the run's loss does not take them.

    Runs with nothing varying fall back to `names` (default: their folder names). Labels that
    clash because the runs differ only in keys their loss ignores are repeats, numbered `#1`,
    `#2`, ...; other clashes (the same sweep given twice, numbered folders of two sweeps) get
    the path below the runs' common folder, which is unique.
    """
    varying = varying_keys(runs, ignore)
    names = [r.name for r in runs] if names is None else names
    labels = [
        ",".join(f"{k}={r.overrides[k]}" for k in varying if k in used_overrides(r)) or name
        for r, name in zip(runs, names, strict=True)
    ]
    if len(set(labels)) == len(labels):
        return labels
    common = os.path.commonpath([r.path.resolve() for r in runs])
    out = []
    for lab, r, name in zip(labels, runs, names, strict=True):
        twins = [q for q, other in zip(runs, labels, strict=True) if other == lab]
        kept = [
            tuple(sorted(kv for kv in q.overrides.items() if kv[0] not in ignore)) for q in twins
        ]
        if len(twins) == 1:
            out.append(lab)
        elif len(set(kept)) == len(twins):
            out.append(f"{lab} #{twins.index(r) + 1}")  # repeats: only ignored keys differ
        else:
            where = r.path.resolve().relative_to(common).as_posix()
            out.append(f"{lab} ({where})" if lab != name else where)
    return out


def used_overrides(run: Run) -> dict[str, str]:
    """The run's overrides without the alpha and mu its loss does not take."""
    unused = unused_keys(run)
    return {k: v for k, v in run.overrides.items() if k not in unused}


GRID_KEYS = ("alpha", "mu", "seed", "method")  # a heatmap's axes, its repeats and its name


def grid_group(run: Run, varying: Sequence[str]) -> tuple[tuple[str, str | None], ...]:
    """The run's values of the varying overrides a heatmap must not average over (all but
    `GRID_KEYS` and the keys its loss ignores): one heatmap per method and group."""
    used = used_overrides(run)
    return tuple((k, used.get(k)) for k in varying if k not in GRID_KEYS and k in used)


def summarize(runs: Sequence[Run], labels: Sequence[str], cfg: DictConfig) -> list[dict]:
    """One summary dict per run (keys `RUN_COLUMNS`), steps_to_threshold filled in last;
    `_group` holds the run's `grid_group`."""
    rows = []
    varying = varying_keys(runs)
    for run, label in zip(runs, labels, strict=True):
        steps, reward = series(run.rows, "train/reward_mean")
        _, grad = series(run.rows, "train/grad_norm")
        rows.append(
            {
                "label": label,
                "method": config_value(run, "method.name") or run.overrides.get("method"),
                "alpha": config_value(run, "alpha"),
                "mu": config_value(run, "mu"),
                "seed": config_value(run, "seed"),
                "steps": int(run.rows[-1]["step"]),
                "steps_planned": config_value(run, "trainer.steps"),
                "final_reward": final_mean(reward, cfg.last_frac),
                "steps_to_threshold": math.nan,
                "grad_norm_mean": sum(grad) / len(grad) if grad else math.nan,
                "eval_accuracy": eval_accuracy(run),
                "path": str(run.path),
                "_reward": (steps, ema(reward, cfg.smoothing)),  # kept for the threshold
                "_group": grid_group(run, varying),  # heatmaps never average over these
            }
        )
    return rows


def fill_steps_to_threshold(summary: list[dict], threshold: float) -> None:
    """Set each row's steps_to_threshold (NaN: never reached, or no threshold)."""
    for row in summary:
        steps, smoothed = row.pop("_reward")
        if math.isfinite(threshold):
            row["steps_to_threshold"] = first_step_at(steps, smoothed, threshold)


# ---------------------------------------------------------------- configurations


@dataclass
class Config:
    """One configuration: runs that differ only in seed, sorted by seed, and their rows."""

    label: str
    runs: list[Run]
    rows: list[dict]  # the runs' summary rows (`summarize`), in the same order


def is_bookkeeping(key: str) -> bool:
    """Whether a dotted config key is, or is under, one of `BOOKKEEPING`."""
    return any(key == b or key.startswith(b + ".") for b in BOOKKEEPING)


def without_bookkeeping(data: dict, prefix: str = "") -> dict:
    """A nested config dict less its `BOOKKEEPING` keys."""
    return {
        k: without_bookkeeping(v, f"{prefix}{k}.") if isinstance(v, dict) else v
        for k, v in data.items()
        if not is_bookkeeping(f"{prefix}{k}")
    }


def config_identity(run: Run) -> str:
    """What the run computes, as text: its saved config unresolved, else its overrides, less
    `BOOKKEEPING` (seed among them); else its folder (a configuration of its own)."""
    if run.config is not None and len(run.config) > 0:
        data = OmegaConf.to_container(run.config, resolve=False)
        return "config " + json.dumps(without_bookkeeping(data), sort_keys=True, default=str)
    if run.overrides:
        kept = {k: v for k, v in run.overrides.items() if not is_bookkeeping(k)}
        return "overrides " + json.dumps(kept, sort_keys=True)
    return "folder " + str(run.path.resolve())


def seed_key(row: dict) -> tuple[bool, Any]:
    """Sort key: numeric seeds in order, then the others (unknown: None) by their text."""
    seed = row["seed"]
    return (not is_number(seed), seed if is_number(seed) else str(seed))


def group_configs(runs: Sequence[Run], summary: Sequence[dict]) -> list[Config]:
    """The configurations, in order of their first run, each holding one run per seed: a run
    whose seed its configuration already holds (a repeat) goes to a second copy of it. Sets
    each summary row's `_config` to its configuration's index."""
    groups: dict[tuple[str, int], list[int]] = {}
    seen: dict[tuple[str, str], int] = {}
    for i, (run, row) in enumerate(zip(runs, summary, strict=True)):
        identity = config_identity(run)
        copy = seen.get((identity, repr(row["seed"])), 0)
        seen[(identity, repr(row["seed"]))] = copy + 1
        groups.setdefault((identity, copy), []).append(i)
    members = [sorted(idx, key=lambda i: seed_key(summary[i])) for idx in groups.values()]
    for k, idx in enumerate(members):
        for i in idx:
            summary[i]["_config"] = k  # the heatmaps keep one configuration per cell
    first_runs = [runs[idx[0]] for idx in members]
    names = [config_name([runs[i] for i in idx], summary[idx[0]]) for idx in members]
    labels = varying_labels(first_runs, ignore=("seed",), names=names)
    return [
        Config(label, [runs[i] for i in idx], [summary[i] for i in idx])
        for label, idx in zip(labels, members, strict=True)
    ]


def config_name(runs: Sequence[Run], row: dict) -> str:
    """A configuration's label when no override varies: its run's folder name (one seed), else
    the folder its runs share, else its method."""
    if len(runs) == 1:
        return runs[0].name
    common = os.path.commonpath([r.name for r in runs])
    return common if common not in ("", ".") else str(row["method"] or "runs")


def summarize_configs(configs: Sequence[Config]) -> list[dict]:
    """One summary dict per configuration (keys `SUMMARY_COLUMNS`): each of `METRICS` as the
    mean over seeds and the half-width of its 95% Student-t interval (`mean_ci95`: NaN with
    one seed); steps_to_threshold over the seeds that reached it. `_group`: the first run's."""
    out = []
    for c in configs:
        first = c.rows[0]
        row = {k: first[k] for k in ("method", "alpha", "mu", "steps_planned", "_group")}
        row |= {
            "label": c.label,
            "n_seeds": len(c.rows),
            "seeds": " ".join(fmt(r["seed"]) for r in c.rows if r["seed"] is not None),
            "steps": min(r["steps"] for r in c.rows),
            "threshold_reached": sum(math.isfinite(r["steps_to_threshold"]) for r in c.rows),
            "path": ";".join(r["path"] for r in c.rows),
        }
        for name, column in METRICS:
            row[f"{name}_mean"], row[f"{name}_ci95"] = mean_ci95([r[column] for r in c.rows])
        out.append(row)
    return out


# ---------------------------------------------------------------- tables


def fmt(value: Any, digits: int = 6) -> str:
    """Cell text: '' for None/NaN, ints as ints, floats to `digits` significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def write_csv(rows: Sequence[dict], columns: Sequence[str], path: Path) -> None:
    """A CSV of `columns`, empty cells for missing values, never-reached and one-seed intervals."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([fmt(row[c]) for c in columns])


def run_cells(row: dict) -> list[str]:
    """A run's human-facing columns (`RUN_COLUMNS` but `path`), 4 significant digits, '—'
    for never."""
    cells = [fmt(row[c], 4) for c in RUN_COLUMNS[:-1]]
    if cells[RUN_COLUMNS.index("steps_to_threshold")] == "":
        cells[RUN_COLUMNS.index("steps_to_threshold")] = "—"
    return cells


def mean_pm(row: dict, name: str) -> str:
    """'mean ± half-width': the half-width to 2 significant digits and the mean to the same
    decimal place (0.713 ± 0.067); the mean alone (4 significant digits) with one seed, and
    with a zero half-width ('0.5 ± 0'); '' for none."""
    mean, half = row[f"{name}_mean"], row[f"{name}_ci95"]
    if not math.isfinite(mean):
        return ""
    if not math.isfinite(half):
        return fmt(mean, 4)
    if half == 0:
        return f"{fmt(mean, 4)} ± 0"
    decimals = max(0, 1 - math.floor(math.log10(half)))
    return f"{mean:.{decimals}f} ± {half:.{decimals}f}"


CONFIG_HEAD = ["label", "method", "alpha", "mu", "n_seeds", "seeds", "steps", "steps_planned"]
CONFIG_HEAD += [name for name, _ in METRICS]  # summary.md: mean ± half-width


def config_cells(row: dict) -> list[str]:
    """A configuration's `CONFIG_HEAD` cells; steps_to_threshold '—' when no seed reached
    it, and `(k/n reached)` when only some did."""
    cells = [fmt(row[c], 4) for c in CONFIG_HEAD[: -len(METRICS)]]
    cells += [mean_pm(row, name) for name, _ in METRICS]
    to_thr = CONFIG_HEAD.index("steps_to_threshold")
    reached, n = row["threshold_reached"], row["n_seeds"]
    if reached == 0:
        cells[to_thr] = "—"
    elif reached < n:
        cells[to_thr] += f" ({reached}/{n} reached)"
    return cells


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(cells) + " |" for cells in rows
    ]


def write_markdown(
    configs: Sequence[dict], runs: Sequence[dict], notes: Sequence[str], path: Path
) -> None:
    """summary.md: the configurations (mean ± 95% half-width over seeds), the runs when a
    configuration has several seeds, then the threshold, figures and skipped runs."""
    lines = markdown_table(CONFIG_HEAD, [config_cells(row) for row in configs])
    if any(row["n_seeds"] > 1 for row in configs):
        runs_table = markdown_table(RUN_COLUMNS[:-1], [run_cells(row) for row in runs])
        lines += ["", "## Runs", "", *runs_table]
    lines += [""] + [f"- {n}" for n in notes]
    path.write_text("# Run summary\n\n" + "\n".join(lines) + "\n", encoding="utf-8")


CONSOLE_HEADERS = ["label", "method", "α", "μ", "n", "seeds", "steps", "final", "to_thr", "|g|"]
CONSOLE_HEADERS += ["eval"]


def print_table(configs: Sequence[dict], title: str) -> None:
    """The configurations on the console: short headers, steps as done/planned, no empty
    columns."""
    planned = CONFIG_HEAD.index("steps_planned")
    rows = []
    for row in configs:
        cells = config_cells(row)
        if cells[planned]:
            cells[planned - 1] += f"/{cells[planned]}"
        rows.append(cells[:planned] + cells[planned + 1 :])
    keep = [j for j in range(len(CONSOLE_HEADERS)) if any(r[j] for r in rows)]
    table = Table(title=title)
    for j in keep:
        name = CONSOLE_HEADERS[j]
        left = name in ("label", "method", "seeds")
        table.add_column(name, justify="left" if left else "right", min_width=len(name))
    table.columns[0].overflow = "fold"  # long labels wrap rather than vanish into "…"
    for r in rows:
        table.add_row(*(r[j] for j in keep))
    console.print(table)


# ---------------------------------------------------------------- figures


def config_curve(
    config: Config, key: str, smoothing: float
) -> tuple[list[float], list[float], list[float], list[float]]:
    """(steps, raw mean, EMA mean, EMA half-width) of `key` over the configuration's seeds, at
    the steps every seed logged: each seed's series is smoothed first, then averaged; the
    half-width is the 95% Student-t one across seeds (NaN with one seed)."""
    raw = [series(run.rows, key) for run in config.runs]
    raw = [c for c in raw if c[0]]  # a seed that never logged `key` does not empty the rest
    steps, raw_mean, _ = seed_band(raw)
    _, smooth, half = seed_band([(s, ema(v, smoothing)) for s, v in raw])
    return steps, raw_mean, smooth, half


def curve_label(config: Config) -> str:
    """The legend entry: the label, with the number of seeds when several."""
    n = len(config.runs)
    return f"{config.label} (n={n})" if n > 1 else config.label


def draw_band(
    ax: Any, steps: Sequence[float], mean: Sequence[float], half: Sequence[float], color: Any
) -> None:
    """Shade mean ± half where the half-width is known (several seeds)."""
    if any(math.isfinite(h) for h in half):
        lo = [m - h for m, h in zip(mean, half, strict=True)]
        hi = [m + h for m, h in zip(mean, half, strict=True)]
        ax.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)


def plot_curves(configs: Sequence[Config], key: str, smoothing: float, path: Path) -> None:
    """Per configuration: its EMA curve (mean over seeds) with the shaded 95% t-band across
    seeds, over its faint raw mean; legend by label."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for config, color in zip(configs, curve_colors(len(configs)), strict=True):
        steps, raw, smooth, half = config_curve(config, key, smoothing)
        if steps:
            ax.plot(steps, raw, color=color, alpha=0.2, linewidth=1)
            ax.plot(steps, smooth, color=color, linewidth=1.8, label=curve_label(config))
            draw_band(ax, steps, smooth, half, color)
    band = "; band: 95% t-interval over seeds" if any(len(c.runs) > 1 for c in configs) else ""
    ax.set(xlabel="step", ylabel=key, title=f"{key} (EMA {smoothing}{band})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", ncol=1 + len(configs) // 12, loc="best")
    fig.savefig(path, dpi=120)


def curve_colors(n: int) -> list[Any]:
    """Distinct colours: tab10, tab20, then a continuous map for big sweeps."""
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["viridis"](i / (n - 1)) for i in range(n)]


def grids(summary: Sequence[dict]) -> dict[str, list[dict]]:
    """Name -> runs of each alpha x mu grid: the runs of one method and one value of every
    other varying override (`_group`: learning rate, dataset, ...), when they span >= 2
    alphas and >= 2 mus. Runs in one cell differ only in seed (or in keys their loss
    ignores): repeats, averaged. The name is the method, then the group's `k=v`."""
    found: dict[str, list[dict]] = {}
    for row in summary:
        if is_number(row["alpha"]) and is_number(row["mu"]):
            name = ",".join([str(row["method"]), *(f"{k}={v}" for k, v in row["_group"])])
            found.setdefault(name, []).append(row)
    return {
        name: one_config_per_cell(rows)
        for name, rows in found.items()
        if len({r["alpha"] for r in rows}) >= 2 and len({r["mu"] for r in rows}) >= 2
    }


def one_config_per_cell(rows: Sequence[dict]) -> list[dict]:
    """The runs of each (alpha, mu) cell's configuration with the most seeds (`_config`, set
    by `group_configs`; the first on a tie). A second configuration in a cell holds repeats
    of seeds the first has (the same grid reported twice, or the methods sweep's default
    OPO beside the grid's cell): averaging them in would count a seed twice."""
    sizes = Counter(r.get("_config") for r in rows)
    best: dict[tuple[Any, Any], Any] = {}
    for r in rows:
        cell, config = (r["alpha"], r["mu"]), r.get("_config")
        if cell not in best or sizes[config] > sizes[best[cell]]:
            best[cell] = config
    return [r for r in rows if r.get("_config") == best[(r["alpha"], r["mu"])]]


def grid_cells(rows: Sequence[dict], key: str) -> tuple[list, list, list[list[float]], list]:
    """alphas (rows), mus (cols), mean over seeds per cell (NaN: never), cell texts: the mean
    and `n=<seeds>`, or `<reached>/<seeds> seeds` where only some reached the threshold."""
    alphas = sorted({r["alpha"] for r in rows})
    mus = sorted({r["mu"] for r in rows})
    values: list[list[float]] = [[] for _ in alphas]
    texts: list[list[str]] = [[] for _ in alphas]
    for i, a in enumerate(alphas):
        for m in mus:
            cell = [r[key] for r in rows if r["alpha"] == a and r["mu"] == m]
            done = [v for v in cell if math.isfinite(v)]
            values[i].append(sum(done) / len(done) if done else math.nan)
            text = fmt(values[i][-1], 3) if done else ("—" if cell else "no run")
            if 0 < len(done) < len(cell):  # some seeds never reached the threshold
                text += f"\n{len(done)}/{len(cell)} seeds"
            elif cell:
                text += f"\nn={len(cell)}"
            texts[i].append(text)
    return alphas, mus, values, texts


def plot_heatmap(rows: Sequence[dict], key: str, title: str, path: Path) -> None:
    """alpha x mu heatmap of `key`, values in the cells, '—' where never reached."""
    alphas, mus, values, texts = grid_cells(rows, key)
    cmap = colormaps["viridis_r" if key == "steps_to_threshold" else "viridis"].with_extremes(
        bad="lightgrey"
    )  # fewer steps is better: keep "good" the same colour in both maps
    fig = Figure(figsize=(1.4 * len(mus) + 2.5, 1.0 * len(alphas) + 1.8), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(np.array(values, dtype=float)), cmap=cmap, aspect="auto")
    for i, row in enumerate(texts):
        for j, text in enumerate(row):
            color = cell_text_color(image, values[i][j])
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color=color)
    ax.set_xticks(range(len(mus)), [fmt(float(m), 4) for m in mus])
    ax.set_yticks(range(len(alphas)), [fmt(float(a), 4) for a in alphas])
    ax.set(xlabel="μ", ylabel="α", title=title)
    fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=120)


def cell_text_color(image: Any, value: float) -> str:
    """Black on light cells (and grey NaN ones), white on dark ones, by luminance."""
    if not math.isfinite(value):
        return "k"
    r, g, b, _ = image.cmap(image.norm(value))
    return "k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w"


def plot_grids(summary: Sequence[dict], threshold: float, out: Path) -> list[Path]:
    """Both heatmaps for every method with an alpha x mu grid; the paths written."""
    found = grids(summary)
    written = []
    for name, rows in found.items():
        suffix = "_" + re.sub(r"[^\w.=,+-]", "_", name) if len(found) > 1 else ""
        for key, title in (
            ("final_reward", f"{name}: final reward"),
            ("steps_to_threshold", f"{name}: steps to reward ≥ {fmt(threshold, 3)}"),
        ):
            written.append(out / f"heatmap_{key}{suffix}.png")
            plot_heatmap(rows, key, title, written[-1])
    return written


# ---------------------------------------------------------------- entry point


def check_knobs(cfg: DictConfig) -> None:
    """One-line errors for knob values that make no sense."""
    if not cfg.get("paths"):
        raise ReportError("no PATH given: opo report PATH [PATH ...]")
    check_number(cfg, "smoothing", lambda x: 0 <= x < 1, "a number in [0, 1)")
    check_number(cfg, "last_frac", lambda x: 0 < x <= 1, "a number in (0, 1]")
    check_number(cfg, "threshold_frac", lambda x: x > 0, "a number > 0")
    check_number(cfg, "sample_chars", lambda x: x >= 1 and x == int(x), "an integer >= 1")
    if cfg.get("threshold") is not None:
        check_number(cfg, "threshold", lambda x: True, "a number, or null")


def check_number(cfg: DictConfig, key: str, ok: Callable[[float], bool], allowed: str) -> None:
    """`cfg[key]` is a finite number (not a bool) for which `ok` holds, else a ReportError."""
    value = cfg.get(key)
    if not (is_number(value) and ok(value)):
        raise ReportError(f"{key}={value} is not allowed: {allowed}")


def readable_runs(runs: Sequence[Run]) -> tuple[list[Run], list[str]]:
    """Runs with at least one metrics row, and a note per damaged or skipped run."""
    kept, notes = [], []
    for run in runs:
        if run.damaged_lines:
            s = "s" if run.damaged_lines > 1 else ""
            notes.append(f"run {run.name}: skipped {run.damaged_lines} damaged line{s}")
        if run.rows:
            kept.append(run)
        else:
            notes.append(f"run {run.name}: no readable metrics rows, skipped")
    return kept, notes


def report(cfg: DictConfig) -> Path:
    """Summarise the runs under `cfg.paths` into tables and figures; returns the report folder."""
    check_knobs(cfg)
    runs, notes = readable_runs(load_runs(list(cfg.paths)))
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]")
    if not runs:
        raise ReportError(f"no run with readable metrics under {', '.join(map(str, cfg.paths))}")
    out = Path(cfg.out_dir) if cfg.get("out_dir") else Path(cfg.paths[0]) / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"out_dir={out}: cannot create the report folder ({e.strerror})") from e

    summary = summarize(runs, varying_labels(runs), cfg)
    threshold = resolve_threshold(cfg, [r["final_reward"] for r in summary])
    fill_steps_to_threshold(summary, threshold)
    notes.insert(0, f"threshold for steps_to_threshold: {threshold_text(cfg, threshold)}")
    configs = group_configs(runs, summary)
    config_rows = summarize_configs(configs)

    from opo_cli.report_claims import plot_claims  # it imports this module

    _, claim_notes = plot_claims(configs, config_rows, cfg.smoothing, threshold, out)
    pages = write_sample_pages(runs, out, int(cfg.sample_chars))
    notes += claim_notes + [f"what {run.name} writes: [{page}]({page})" for run, page in pages]
    write_csv(config_rows, SUMMARY_COLUMNS, out / "summary.csv")
    write_csv(summary, RUN_COLUMNS, out / "runs.csv")
    write_markdown(config_rows, summary, notes, out / "summary.md")
    plot_curves(configs, "train/reward_mean", cfg.smoothing, out / "reward.png")
    plot_curves(configs, "train/grad_norm", cfg.smoothing, out / "grad_norm.png")
    plot_grids(summary, threshold, out)
    title = f"{len(configs)} configurations, {len(runs)} runs · threshold"
    print_table(config_rows, f"{title} {fmt(threshold, 3) or 'none'}")
    console.print(f"report written to {out}")
    return out


def write_sample_pages(runs: Sequence[Run], out: Path, max_chars: int) -> list[tuple[Run, str]]:
    """`samples/<run>.md` for each run that logged completions: its last logged groups and
    last evaluation's answers (`opo_cli.completions.samples_page`); returns (run, page path
    relative to the report folder)."""
    pages = []
    for run in runs:
        train_rows = read_rows(run.path / COMPLETIONS_FILE)
        answers = read_rows(run.path / EVAL_COMPLETIONS_FILE)
        if not (train_rows or answers):
            continue
        page = f"samples/{re.sub(r'[^A-Za-z0-9._=,+-]+', '_', run.name)}.md"
        (out / "samples").mkdir(exist_ok=True)
        text = samples_page(run.name, train_rows, answers, max_chars)
        (out / page).write_text(text + "\n", encoding="utf-8")
        pages.append((run, page))
    return pages


def threshold_text(cfg: DictConfig, threshold: float) -> str:
    """How the threshold was chosen, for summary.md."""
    if cfg.get("threshold") is not None:
        return f"{fmt(threshold)} (set)"
    if not math.isfinite(threshold):
        return "none (best final reward <= 0; set threshold=...)"
    return f"{fmt(threshold)} ({cfg.get('threshold_frac', 0.8)} x best final reward)"
