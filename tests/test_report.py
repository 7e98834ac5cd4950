"""`opo report`: synthetic runs, hand-derived summaries, the real conf/report.yaml."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import DictConfig

from opo_cli.report import (
    RUN_COLUMNS,
    SUMMARY_COLUMNS,
    ReportError,
    ema,
    final_mean,
    grid_cells,
    grids,
    load_runs,
    parse_overrides,
    report,
    summarize,
    varying_labels,
)
from tests.conftest import compose_config

STEPS = 20  # steps 1..20; last_frac 0.1 -> final reward = mean of the last 2 rows


def compose_report(*overrides: str) -> DictConfig:
    return compose_config("report", overrides)


def paths_arg(*paths: Path) -> str:
    return "paths=[" + ",".join(f"'{p}'" for p in paths) + "]"


def write_run(
    run_dir: Path,
    rewards: list[float],
    *,
    grad: tuple[float, float] = (1.0, 3.0),
    overrides: list[str] | None = None,
    config: dict | None = None,
    extra: dict[int, dict] | None = None,
    tail: str = "",
) -> Path:
    """A run folder: metrics rows for steps 1..len(rewards), grad norm alternating `grad`."""
    run_dir.mkdir(parents=True)
    lines = []
    for step, r in enumerate(rewards, start=1):
        row = {"step": step, "train/reward_mean": r, "train/grad_norm": grad[step % 2]}
        row |= {"train/loss": 0.1, "perf/step_s": 1.0} | (extra or {}).get(step, {})
        lines.append(json.dumps(row))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)
    if overrides is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config or {}))
    return run_dir


def opo_config(alpha: float, mu: float) -> dict:
    kwargs = {"alpha": "${alpha}", "mu": "${mu}"}  # interpolations, as Hydra saves them
    method = {"name": "opo", "loss_kwargs": kwargs}
    return {"method": method, "alpha": alpha, "mu": mu, "seed": 0, "trainer": {"steps": STEPS}}


# Hand-made reward series. With smoothing 0.5 the EMA of a 0 -> 1 step goes 0.5, 0.75, 0.875.
GRID = {  # (alpha, mu) -> rewards
    (0.3, 0.5): [0.0] * 4 + [1.0] * 16,  # final 1.0; EMA >= 0.8 first at step 7, >= 0.6 at 6
    (0.3, 1.0): [0.0] * 9 + [1.0] * 11,  # final 1.0; EMA >= 0.8 first at step 12, >= 0.6 at 11
    (0.6, 0.5): [0.5] * 18 + [0.6, 0.8],  # final 0.7; EMA 0.55 then 0.675: never 0.8, 0.6 at 20
    (0.6, 1.0): [0.0] * 18 + [0.2, 0.4],  # final 0.3; never reaches either threshold
}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A 2x2 alpha x mu multirun folder: numbered runs, one nested a level deeper."""
    root = tmp_path / "sweep"
    for i, ((alpha, mu), rewards) in enumerate(GRID.items()):
        run_dir = root / ("nested" if i == 3 else "") / str(i)
        overrides = ["method=opo", f"alpha={alpha}", f"mu={mu}", "trainer.resume=auto"]
        extra = {10: {"eval/accuracy": 0.1}, 20: {"eval/accuracy": 0.25}} if i == 1 else None
        tail = '{"step": 21, "train/rew' if i == 3 else ""  # cut off mid-line
        write_run(
            run_dir,
            rewards,
            overrides=overrides,
            config=opo_config(alpha, mu),
            extra=extra,
            tail=tail,
        )
    (root / "0" / "eval.json").write_text(json.dumps({"accuracy": 0.42, "n": 100}))
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    """runs.csv or summary.csv by label, its header checked."""
    with path.open() as f:
        reader = csv.DictReader(f)
        rows = {row["label"]: row for row in reader}
        assert reader.fieldnames == (RUN_COLUMNS if path.name == "runs.csv" else SUMMARY_COLUMNS)
    return rows


def test_config_composes_without_hydra_clutter():
    cfg = compose_config("report", hydra=True)
    assert cfg.paths == [] and cfg.out_dir is None and cfg.threshold is None
    assert cfg.hydra.output_subdir is None and cfg.hydra.run.dir == "."
    assert cfg.hydra.job_logging.root.level == "ERROR"  # the `disabled` logging config


def test_ema_and_final_mean_closed_forms():
    assert ema([0.0, 1.0, 1.0, 1.0], 0.5) == [0.0, 0.5, 0.75, 0.875]
    assert ema([2.0, 4.0], 0.0) == [2.0, 4.0]  # no smoothing: the raw series
    assert final_mean(list(range(30)), 0.1) == (27 + 28 + 29) / 3  # 10% of 30 rows = 3
    assert final_mean([1.0, 5.0], 0.1) == 5.0  # at least one row
    assert math.isnan(final_mean([], 0.1))


def test_parse_overrides_drops_noise():
    items = ["method=opo", "+alpha=0.3", "trainer.resume=auto", "logger=none", "hydra.job.x=1"]
    assert parse_overrides(items) == {"method": "opo", "alpha": "0.3"}


def test_sweep_summary_matches_hand_derived(sweep: Path, capsys):
    out = report(compose_report(paths_arg(sweep), "smoothing=0.5"))
    assert out == sweep / "report"
    rows = read_csv(out / "runs.csv")
    assert set(rows) == {f"alpha={a},mu={m}" for a, m in GRID}
    # best final reward is 1.0 -> default threshold 0.8 x 1.0 = 0.8
    expected = {  # label: (final_reward, steps_to_threshold)
        "alpha=0.3,mu=0.5": (1.0, "7"),
        "alpha=0.3,mu=1.0": (1.0, "12"),
        "alpha=0.6,mu=0.5": ((0.6 + 0.8) / 2, ""),
        "alpha=0.6,mu=1.0": ((0.2 + 0.4) / 2, ""),
    }
    for label, (final, steps_to) in expected.items():
        row = rows[label]
        assert float(row["final_reward"]) == pytest.approx(final)
        assert row["steps_to_threshold"] == steps_to
        assert (row["method"], row["seed"], row["steps"], row["steps_planned"]) == (
            "opo",
            "0",
            "20",
            "20",
        )
        assert float(row["grad_norm_mean"]) == pytest.approx(2.0)  # mean of 1, 3, 1, 3, ...
    assert float(rows["alpha=0.6,mu=1.0"]["alpha"]) == 0.6  # resolved ${alpha}
    assert float(rows["alpha=0.3,mu=0.5"]["eval_accuracy"]) == 0.42  # eval.json
    assert float(rows["alpha=0.3,mu=1.0"]["eval_accuracy"]) == 0.25  # last eval/accuracy
    assert rows["alpha=0.6,mu=0.5"]["eval_accuracy"] == ""
    # one seed each: summary.csv has the same configurations, means equal to the run's
    # numbers and no interval
    configs = read_csv(out / "summary.csv")
    assert set(configs) == set(rows)
    for label, row in configs.items():
        assert (row["n_seeds"], row["seeds"], row["final_reward_ci95"]) == ("1", "0", "")
        assert row["final_reward_mean"] == rows[label]["final_reward"]
        assert row["steps_to_threshold_mean"] == rows[label]["steps_to_threshold"]
        assert row["eval_accuracy_mean"] == rows[label]["eval_accuracy"]
        assert row["threshold_reached"] == ("1" if rows[label]["steps_to_threshold"] else "0")

    for name in ("reward", "grad_norm", "heatmap_final_reward", "heatmap_steps_to_threshold"):
        assert (out / f"{name}.png").stat().st_size > 1000
    md = (out / "summary.md").read_text()
    assert all(f"| {label} | opo |" in md for label in expected)
    assert "run nested/3: skipped 1 damaged line" in md
    printed = capsys.readouterr().out
    assert printed.count("skipped 1 damaged line") == 1


def test_absolute_threshold_and_out_dir(sweep: Path, tmp_path: Path):
    out_dir = tmp_path / "elsewhere"
    out = report(
        compose_report(paths_arg(sweep), "smoothing=0.5", "threshold=0.6", f"out_dir='{out_dir}'")
    )
    assert out == out_dir and not (sweep / "report").exists()
    steps_to = {k: v["steps_to_threshold"] for k, v in read_csv(out / "runs.csv").items()}
    assert steps_to == {
        "alpha=0.3,mu=0.5": "6",
        "alpha=0.3,mu=1.0": "11",
        "alpha=0.6,mu=0.5": "20",  # EMA 0.675 on the last step
        "alpha=0.6,mu=1.0": "",
    }


def test_single_run_without_hydra_and_unreadable_run(tmp_path: Path, capsys):
    good = write_run(tmp_path / "runs" / "good", [0.2, 0.4, 0.6], tail="garbage\n")
    bad = tmp_path / "runs" / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text("not json\n")
    (tmp_path / "runs" / "good" / "checkpoints" / "step_1").mkdir(parents=True)
    out = report(compose_report(paths_arg(tmp_path / "runs")))
    rows = read_csv(out / "runs.csv")
    assert set(read_csv(out / "summary.csv")) == {"good"}
    assert list(rows) == ["good"]  # no .hydra: label falls back to the folder name
    assert float(rows["good"]["final_reward"]) == pytest.approx(0.6)
    assert rows["good"]["steps_to_threshold"] == ""  # EMA 0.6: 0.2, 0.28, 0.408 < 0.48
    printed = capsys.readouterr().out
    assert "run bad: no readable metrics rows, skipped" in printed
    assert "run good: skipped 1 damaged line" in printed
    assert report(compose_report(paths_arg(good))) == good / "report"


def test_clashing_labels_get_their_folder(sweep: Path, tmp_path: Path):
    shutil.copytree(sweep, tmp_path / "again", ignore=shutil.ignore_patterns("report"))
    out = report(compose_report(paths_arg(sweep, tmp_path / "again")))
    labels = set(read_csv(out / "runs.csv"))
    assert len(labels) == 8 and "alpha=0.3,mu=0.5 (sweep/0)" in labels
    assert "alpha=0.6,mu=1.0 (again/nested/3)" in labels
    # the same config with the same seed twice: repeats, never two seeds of one configuration
    configs = read_csv(out / "summary.csv")
    assert set(configs) == labels and {row["n_seeds"] for row in configs.values()} == {"1"}


def test_errors_are_report_errors(tmp_path: Path):
    with pytest.raises(ReportError, match="no runs"):
        report(compose_report(paths_arg(tmp_path)))
    with pytest.raises(ReportError, match="no such folder"):
        report(compose_report(paths_arg(tmp_path / "missing")))
    with pytest.raises(ReportError, match="no PATH"):
        report(compose_report())
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 1, "train/rew\n')
    with pytest.raises(ReportError, match="no run with readable metrics"):
        report(compose_report(paths_arg(tmp_path / "r")))


def test_grid_cells_average_over_seeds():
    nan = math.nan
    cells = [  # (alpha, mu, final, steps): two seeds in the (0.3, 0.5) cell, one never reached
        (0.3, 0.5, 1.0, 10),
        (0.3, 0.5, 0.5, nan),
        (0.6, 0.5, 0.2, nan),
        (0.3, 1.0, 0.4, 30),
    ]
    keys = ("alpha", "mu", "final_reward", "steps_to_threshold")
    rows = [dict(zip(keys, cell, strict=True)) for cell in cells]
    alphas, mus, final, _ = grid_cells(rows, "final_reward")
    assert (alphas, mus) == ([0.3, 0.6], [0.5, 1.0])
    assert final[0] == [0.75, 0.4] and final[1][0] == 0.2 and math.isnan(final[1][1])
    _, _, steps, texts = grid_cells(rows, "steps_to_threshold")
    assert steps[0] == [10, 30] and math.isnan(steps[1][0])  # mean over the seeds that reached
    assert texts == [["10\n1/2 seeds", "30\nn=1"], ["—\nn=1", "no run"]]
    _, _, _, texts = grid_cells(rows, "final_reward")
    assert texts == [["0.75\nn=2", "0.4\nn=1"], ["0.2\nn=1", "no run"]]


def grpo_config(alpha: float, mu: float) -> dict:
    kwargs = {"clip_low": 0.2, "clip_high": 0.2, "beta": 0.0, "agg": "seq_mean_token_mean"}
    method = {"name": "grpo", "loss": "grpo", "loss_kwargs": kwargs}
    return {"method": method, "alpha": alpha, "mu": mu, "seed": 0, "trainer": {"steps": STEPS}}


def test_methods_without_alpha_or_mu_get_no_grid_and_are_repeats(tmp_path: Path):
    # opo train -m method=opo,grpo alpha=0.3,0.6 mu=0.5,1.0: the four GRPO runs are one run
    root = tmp_path / "sweep"
    for i, ((alpha, mu), rewards) in enumerate(GRID.items()):
        for j, (name, config) in enumerate((("opo", opo_config), ("grpo", grpo_config))):
            overrides = [f"method={name}", f"alpha={alpha}", f"mu={mu}"]
            cfg = config(alpha, mu) | ({"method": {**config(alpha, mu)["method"], "loss": name}})
            write_run(root / str(2 * i + j), rewards, overrides=overrides, config=cfg)
    out = report(compose_report(paths_arg(root)))
    for table in ("runs.csv", "summary.csv"):  # one seed each: the same labels in both
        rows = read_csv(out / table)
        grpo = {label: row for label, row in rows.items() if row["method"] == "grpo"}
        assert sorted(grpo) == [f"method=grpo #{i}" for i in (1, 2, 3, 4)]
        assert all(row["alpha"] == row["mu"] == "" for row in grpo.values())
    assert float(rows["method=opo,alpha=0.6,mu=1.0"]["alpha"]) == 0.6
    heatmaps = sorted(p.name for p in out.glob("heatmap_*.png"))
    assert heatmaps == ["heatmap_final_reward.png", "heatmap_steps_to_threshold.png"]  # opo's
    assert "| method=grpo #1 | grpo |  |  | 1 | 0 |" in (out / "summary.md").read_text()


def test_heatmaps_never_average_over_another_varying_override(tmp_path: Path):
    # the 2 x 2 grid at two learning rates: one heatmap per rate, none mixing them
    root = tmp_path / "sweep"
    for lr, shift in (("1e-5", 0.0), ("1e-6", -0.5)):
        for i, ((alpha, mu), rewards) in enumerate(GRID.items()):
            overrides = ["method=opo", f"alpha={alpha}", f"mu={mu}", f"trainer.lr={lr}"]
            moved = [r + shift for r in rewards]
            write_run(root / lr / str(i), moved, overrides=overrides, config=opo_config(alpha, mu))
    out = report(compose_report(paths_arg(root)))
    assert sorted(p.name for p in out.glob("heatmap_final_reward*.png")) == [
        "heatmap_final_reward_opo,trainer.lr=1e-5.png",
        "heatmap_final_reward_opo,trainer.lr=1e-6.png",
    ]
    runs = load_runs([root])
    summary = summarize(runs, varying_labels(runs), compose_report(paths_arg(root)))
    found = grids(summary)
    assert sorted(found) == ["opo,trainer.lr=1e-5", "opo,trainer.lr=1e-6"]
    _, _, finals, _ = grid_cells(found["opo,trainer.lr=1e-6"], "final_reward")
    # GRID's finals (1.0, 1.0, 0.7, 0.3) moved by -0.5, not averaged with the 1e-5 runs
    assert finals[0] == pytest.approx([0.5, 0.5]) and finals[1] == pytest.approx([0.2, -0.2])
