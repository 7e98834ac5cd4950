"""The paper's three claims (arXiv 2601.12415) as figures of `opo report`, written when the
runs allow and otherwise named in summary.md's notes with what they need:

    claim1_grad_norm.png          (1) OPO's gradient norm stays up while reward rises, where
                                  clipped methods' norms decay: train/grad_norm over training
                                  and against train/reward_mean, one line per method
    claim2_alpha_mu.png           (2) mu sets the speed, alpha the final reward: steps to
                                  threshold against mu (a line per alpha), final reward
                                  against alpha (a line per mu), mean ± 95% t-interval
    claim3_delta_cubed.png        (3) the log-ratio surrogate's error E|Δ|³ stays small:
                                  opo/delta_cubed_mean over training, a line per mu, a panel
                                  per alpha

Curves are per configuration: the mean over seeds of each seed's EMA-smoothed series, the
shaded band its 95% Student-t interval (`report.config_curve`). Claims 2 and 3 take the
configurations whose loss has alpha and mu, one figure per method and value of every other
varying override (as the heatmaps; suffixed `_<method>[,k=v...]` when there are several).
Claim 1 draws one configuration per method: when a method has several (an alpha x mu grid
reported with the methods sweep), the one with the most seeds, the first on a tie, named in
the notes. Claims 2 and 3 likewise draw one configuration per (alpha, mu): a second one
there repeats seeds of the first (`report.group_configs`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from opo_cli.report import (
    Config,
    config_curve,
    curve_colors,
    draw_band,
    fmt,
)
from opo_cli.tracking import is_number

GRAD, REWARD, DELTA3 = "train/grad_norm", "train/reward_mean", "opo/delta_cubed_mean"


def logs(config: Config, key: str) -> bool:
    """Whether every seed of the configuration logged `key` at least once."""
    return all(any(is_number(r.get(key)) for r in run.rows) for run in config.runs)


def claim1_configs(configs: Sequence[Config], rows: Sequence[dict]) -> tuple[list, list[str]]:
    """One (config, row) per method that logs grad norm and reward: its configuration with the
    most seeds (the first on a tie); notes for the methods that had several."""
    by_method: dict[str, list[tuple[Config, dict]]] = {}
    for config, row in zip(configs, rows, strict=True):
        if logs(config, GRAD) and logs(config, REWARD):
            by_method.setdefault(str(row["method"]), []).append((config, row))
    picked, notes = [], []
    for method, found in by_method.items():
        best = max(found, key=lambda cr: cr[1]["n_seeds"])  # max keeps the first on a tie
        picked.append(best)
        if len(found) > 1:
            notes.append(
                f"claim 1: {method} has {len(found)} configurations; drawn: {best[0].label}"
            )
    return picked, notes


def plot_claim1(picked: Sequence[tuple[Config, dict]], smoothing: float, path: Path) -> None:
    """Left: grad norm over training; right: grad norm against reward (EMA means over seeds,
    o at the first common step, ■ at the last)."""
    fig = Figure(figsize=(12, 5), layout="constrained")
    over_steps, against = fig.subplots(1, 2)
    for (config, row), color in zip(picked, curve_colors(len(picked)), strict=True):
        steps, _, grad, half = config_curve(config, GRAD, smoothing)
        label = f"{row['method']} (n={row['n_seeds']})"
        over_steps.plot(steps, grad, color=color, linewidth=1.8, label=label)
        draw_band(over_steps, steps, grad, half, color)
        by_step = dict(zip(steps, grad, strict=True))
        r_steps, _, reward, _ = config_curve(config, REWARD, smoothing)
        pairs = [(r, by_step[s]) for s, r in zip(r_steps, reward, strict=True) if s in by_step]
        if pairs:
            xs, ys = zip(*pairs, strict=True)
            against.plot(xs, ys, color=color, linewidth=1.5, label=label)
            against.plot(xs[0], ys[0], "o", color=color)
            against.plot(xs[-1], ys[-1], "s", color=color)
    over_steps.set(xlabel="step", ylabel=GRAD, title=f"gradient norm (EMA {smoothing})")
    over_steps.xaxis.set_major_locator(MaxNLocator(integer=True))
    against.set(xlabel=f"{REWARD} (EMA)", ylabel=f"{GRAD} (EMA)")
    against.set_title("gradient norm against reward (o first step, ■ last)")
    for ax in (over_steps, against):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    fig.suptitle("claim 1: gradient norm while reward rises (band: 95% t-interval over seeds)")
    fig.savefig(path, dpi=120)


def alpha_mu_groups(
    configs: Sequence[Config], rows: Sequence[dict]
) -> dict[str, list[tuple[Config, dict]]]:
    """Name -> the (config, row) with numeric alpha and mu, per method and value of every
    other varying override (the heatmaps' grouping)."""
    found: dict[str, list[tuple[Config, dict]]] = {}
    for config, row in zip(configs, rows, strict=True):
        if is_number(row["alpha"]) and is_number(row["mu"]):
            name = ",".join([str(row["method"]), *(f"{k}={v}" for k, v in row["_group"])])
            found.setdefault(name, []).append((config, row))
    return found


def errorbar_lines(ax, rows: Sequence[dict], x: str, line: str, y: str, symbol: str) -> None:
    """One errorbar line of `y`_mean ± `y`_ci95 against `x` per value of `line`; steps to
    threshold annotated with k/n where only k of n seeds reached it."""
    values = sorted({r[line] for r in rows})
    for value, color in zip(values, curve_colors(len(values)), strict=True):
        at: dict[float, dict] = {}  # one configuration per point: the most seeds, first on a tie
        for r in rows:
            if r[line] == value and (r[x] not in at or r["n_seeds"] > at[r[x]]["n_seeds"]):
                at[r[x]] = r
        pts = sorted((px, r) for px, r in at.items() if math.isfinite(r[f"{y}_mean"]))
        if not pts:
            continue
        xs = [p for p, _ in pts]
        ys = [r[f"{y}_mean"] for _, r in pts]
        errs = [r[f"{y}_ci95"] if math.isfinite(r[f"{y}_ci95"]) else 0.0 for _, r in pts]
        label = f"{symbol} = {fmt(float(value), 4)}"
        ax.errorbar(xs, ys, yerr=errs, color=color, marker="o", capsize=3, label=label)
        for px, py, (_, r) in zip(xs, ys, pts, strict=True):
            if y == "steps_to_threshold" and r["threshold_reached"] < r["n_seeds"]:
                text = f"{r['threshold_reached']}/{r['n_seeds']}"
                ax.annotate(text, (px, py), textcoords="offset points", xytext=(4, 4))


def plot_claim2(name: str, rows: Sequence[dict], threshold: float, path: Path) -> None:
    """Steps to threshold against mu (one line per alpha), final reward against alpha (one per
    mu); a panel only where its x axis has >= 2 values."""
    panels = [
        ("mu", "alpha", "steps_to_threshold", "α", "μ", f"steps to reward ≥ {fmt(threshold, 3)}"),
        ("alpha", "mu", "final_reward", "μ", "α", "final reward"),
    ]
    panels = [p for p in panels if len({r[p[0]] for r in rows}) >= 2]
    fig = Figure(figsize=(6 * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (x, line, y, symbol, xname, yname) in zip(axes, panels, strict=True):
        errorbar_lines(ax, rows, x, line, y, symbol)
        ax.set(xlabel=xname, ylabel=yname, title=f"{yname} against {xname}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="best")
    fig.suptitle(
        f"claim 2 ({name}): μ sets the speed, α the final reward "
        "(mean ± 95% t-interval over seeds; k/n: seeds that reached)"
    )
    fig.savefig(path, dpi=120)


def plot_claim3(name: str, found: Sequence[tuple[Config, dict]], smoothing: float, path: Path):
    """opo/delta_cubed_mean over training: a panel per alpha, a line per mu, t-bands; per
    (alpha, mu) the configuration with the most seeds (the first on a tie)."""
    cells: dict[tuple, tuple[Config, dict]] = {}  # (alpha, mu) -> the one with most seeds
    for config, row in found:
        cell = (row["alpha"], row["mu"])
        if cell not in cells or row["n_seeds"] > cells[cell][1]["n_seeds"]:
            cells[cell] = (config, row)
    alphas = sorted({alpha for alpha, _ in cells})
    mus = sorted({mu for _, mu in cells})
    colors = dict(zip(mus, curve_colors(len(mus)), strict=True))
    fig = Figure(figsize=(4.5 * len(alphas) + 1, 4.5), layout="constrained")
    axes = fig.subplots(1, len(alphas), squeeze=False, sharey=True)[0]
    for ax, alpha in zip(axes, alphas, strict=True):
        for (a, _), (config, row) in sorted(cells.items(), key=lambda item: item[0]):
            if a != alpha:
                continue
            steps, _, smooth, half = config_curve(config, DELTA3, smoothing)
            label = f"μ = {fmt(float(row['mu']), 4)} (n={row['n_seeds']})"
            ax.plot(steps, smooth, color=colors[row["mu"]], linewidth=1.8, label=label)
            draw_band(ax, steps, smooth, half, colors[row["mu"]])
        ax.set(xlabel="step", title=f"α = {fmt(float(alpha), 4)}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    axes[0].set_ylabel(f"{DELTA3} (EMA {smoothing})")
    fig.suptitle(f"claim 3 ({name}): E|Δ|³, the log-ratio surrogate's error, over training")
    fig.savefig(path, dpi=120)


def suffixed(stem: str, name: str, several: bool) -> str:
    """`<stem>.png`, or `<stem>_<name>.png` when several groups get the figure."""
    return f"{stem}_{re.sub(r'[^A-Za-z0-9_.=,+-]', '_', name)}.png" if several else f"{stem}.png"


def plot_claims(
    configs: Sequence[Config], rows: Sequence[dict], smoothing: float, threshold: float, out: Path
) -> tuple[list[Path], list[str]]:
    """Every claim figure the runs allow; (paths written, notes for summary.md)."""
    written, notes = [], []
    picked, picked_notes = claim1_configs(configs, rows)
    if len(picked) >= 2:
        written.append(out / "claim1_grad_norm.png")
        plot_claim1(picked, smoothing, written[-1])
        notes += picked_notes
    else:
        notes.append(
            f"claim 1 figure not written: needs runs of >= 2 methods logging {GRAD} and {REWARD}"
        )
    groups = alpha_mu_groups(configs, rows)
    two = {
        n: [r for _, r in f]
        for n, f in groups.items()
        if len({r["alpha"] for _, r in f}) >= 2 or len({r["mu"] for _, r in f}) >= 2
    }
    for name, group_rows in two.items():
        written.append(out / suffixed("claim2_alpha_mu", name, len(two) > 1))
        plot_claim2(name, group_rows, threshold, written[-1])
    if not two:
        notes.append("claim 2 figure not written: needs runs of a method with >= 2 alphas or mus")
    three = {
        n: [(c, r) for c, r in f if logs(c, DELTA3)]
        for n, f in groups.items()
        if len({r["mu"] for c, r in f if logs(c, DELTA3)}) >= 2
    }
    for name, found in three.items():
        written.append(out / suffixed("claim3_delta_cubed", name, len(three) > 1))
        plot_claim3(name, found, smoothing, written[-1])
    if not three:
        notes.append(f"claim 3 figure not written: needs runs with >= 2 mus logging {DELTA3}")
    return written, notes
