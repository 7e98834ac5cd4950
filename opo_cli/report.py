"""Tables and plots over finished runs and sweeps: `opo report PATH [PATH ...]`.

A PATH is a run folder (it holds `metrics.jsonl`), a Hydra multirun sweep folder, or any
folder above them; runs are found recursively. The report goes to `<first PATH>/report/`
(or `out_dir`):

    summary.csv, summary.md          one row per run (columns in `CSV_COLUMNS`)
    reward.png, grad_norm.png        EMA-smoothed curves, raw series faint behind
    heatmap_final_reward.png         alpha x mu grids, when a method has >= 2 of each
    heatmap_steps_to_threshold.png   (suffixed `_<method>[,k=v...]` when there are several)

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

from opo_cli.errors import UserError
from opo_cli.tracking import is_number, load_metrics

SKIP_DIRS = {"report", "wandb", "checkpoints", "final", "replaced"}  # no runs; can be large
NOISE_KEYS = ("hydra", "logger", "trainer.resume", "trainer.save_every", "wandb")
CSV_COLUMNS = [
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


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """The override keys whose value differs across `runs`, in order of first appearance."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys]
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def varying_labels(runs: Sequence[Run]) -> list[str]:
    """Per run, `k=v,...` over the override keys whose value differs across runs, leaving
    out alpha and mu where the run's loss does not take them.

    Runs with nothing varying fall back to their folder name. Labels that clash because the
    runs differ only in keys their loss ignores are repeats, numbered `#1`, `#2`, ...; other
    clashes (the same sweep given twice, numbered folders of two sweeps) get the path below
    the runs' common folder, which is unique.
    """
    varying = varying_keys(runs)
    labels = [
        ",".join(f"{k}={r.overrides[k]}" for k in varying if k in used_overrides(r)) or r.name
        for r in runs
    ]
    if len(set(labels)) == len(labels):
        return labels
    common = os.path.commonpath([r.path.resolve() for r in runs])
    out = []
    for lab, r in zip(labels, runs, strict=True):
        twins = [q for q, other in zip(runs, labels, strict=True) if other == lab]
        if len(twins) == 1:
            out.append(lab)
        elif len({tuple(sorted(q.overrides.items())) for q in twins}) == len(twins):
            out.append(f"{lab} #{twins.index(r) + 1}")  # repeats: only ignored keys differ
        else:
            where = r.path.resolve().relative_to(common).as_posix()
            out.append(f"{lab} ({where})" if lab != r.name else where)
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
    """One summary dict per run (keys `CSV_COLUMNS`), steps_to_threshold filled in last;
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


# ---------------------------------------------------------------- tables


def fmt(value: Any, digits: int = 6) -> str:
    """Cell text: '' for None/NaN, ints as ints, floats to `digits` significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def write_csv(summary: Sequence[dict], path: Path) -> None:
    """summary.csv: `CSV_COLUMNS`, empty cells for missing values and never-reached."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for row in summary:
            writer.writerow([fmt(row[c]) for c in CSV_COLUMNS])


def table_cells(row: dict) -> list[str]:
    """The human-facing columns (all but `path`), 4 significant digits, '—' for never."""
    cells = [fmt(row[c], 4) for c in CSV_COLUMNS[:-1]]
    if cells[CSV_COLUMNS.index("steps_to_threshold")] == "":
        cells[CSV_COLUMNS.index("steps_to_threshold")] = "—"
    return cells


def write_markdown(summary: Sequence[dict], notes: Sequence[str], path: Path) -> None:
    """summary.md: the table, then the threshold and any skipped runs."""
    head = CSV_COLUMNS[:-1]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(table_cells(row)) + " |" for row in summary]
    lines += [""] + [f"- {n}" for n in notes]
    path.write_text("# Run summary\n\n" + "\n".join(lines) + "\n", encoding="utf-8")


CONSOLE_HEADERS = ["label", "method", "α", "μ", "seed", "steps", "final", "to_thr", "|g|", "eval"]


def print_table(summary: Sequence[dict], title: str) -> None:
    """The summary on the console: short headers, steps as done/planned, no empty columns."""
    planned = CSV_COLUMNS.index("steps_planned")
    rows = []
    for row in summary:
        cells = table_cells(row)
        if cells[planned]:
            cells[planned - 1] += f"/{cells[planned]}"
        rows.append(cells[:planned] + cells[planned + 1 :])
    keep = [j for j in range(len(CONSOLE_HEADERS)) if any(r[j] for r in rows)]
    table = Table(title=title)
    for j in keep:
        name = CONSOLE_HEADERS[j]
        left = name in ("label", "method")
        table.add_column(name, justify="left" if left else "right", min_width=len(name))
    table.columns[0].overflow = "fold"  # long labels wrap rather than vanish into "…"
    for r in rows:
        table.add_row(*(r[j] for j in keep))
    console.print(table)


# ---------------------------------------------------------------- figures


def plot_curves(
    runs: Sequence[Run], labels: Sequence[str], key: str, smoothing: float, path: Path
) -> None:
    """One EMA curve per run over its faint raw series, legend by label."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    colors = curve_colors(len(runs))
    for run, label, color in zip(runs, labels, colors, strict=True):
        steps, values = series(run.rows, key)
        if steps:
            ax.plot(steps, values, color=color, alpha=0.2, linewidth=1)
            ax.plot(steps, ema(values, smoothing), color=color, linewidth=1.8, label=label)
    ax.set(xlabel="step", ylabel=key, title=f"{key} (EMA {smoothing})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", ncol=1 + len(runs) // 12, loc="best")
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
        name: rows
        for name, rows in found.items()
        if len({r["alpha"] for r in rows}) >= 2 and len({r["mu"] for r in rows}) >= 2
    }


def grid_cells(rows: Sequence[dict], key: str) -> tuple[list, list, list[list[float]], list]:
    """alphas (rows), mus (cols), mean over seeds per cell (NaN: never), cell texts."""
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
            partial = 0 < len(done) < len(cell)  # some seeds never reached the threshold
            texts[i].append(text + (f"\n{len(done)}/{len(cell)} seeds" if partial else ""))
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

    labels = varying_labels(runs)
    summary = summarize(runs, labels, cfg)
    threshold = resolve_threshold(cfg, [r["final_reward"] for r in summary])
    fill_steps_to_threshold(summary, threshold)
    notes.insert(0, f"threshold for steps_to_threshold: {threshold_text(cfg, threshold)}")

    write_csv(summary, out / "summary.csv")
    write_markdown(summary, notes, out / "summary.md")
    plot_curves(runs, labels, "train/reward_mean", cfg.smoothing, out / "reward.png")
    plot_curves(runs, labels, "train/grad_norm", cfg.smoothing, out / "grad_norm.png")
    plot_grids(summary, threshold, out)
    print_table(summary, f"{len(runs)} runs · threshold {fmt(threshold, 3) or 'none'}")
    console.print(f"report written to {out}")
    return out


def threshold_text(cfg: DictConfig, threshold: float) -> str:
    """How the threshold was chosen, for summary.md."""
    if cfg.get("threshold") is not None:
        return f"{fmt(threshold)} (set)"
    if not math.isfinite(threshold):
        return "none (best final reward <= 0; set threshold=...)"
    return f"{fmt(threshold)} ({cfg.get('threshold_frac', 0.8)} x best final reward)"
