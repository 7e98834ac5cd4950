"""`opo report` over seeds: Student-t intervals by hand, configurations (what merges, what
does not), summary.csv/summary.md per configuration, bands, and the figure per claim."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from opo_cli.intervals import mean_ci95, seed_band, t_quantile
from opo_cli.report import (
    Config,
    Run,
    config_curve,
    grid_cells,
    grids,
    load_runs,
    report,
    summarize,
    varying_labels,
)
from tests.test_report import compose_report, paths_arg, read_csv, write_run

T1, T2 = 12.706205, 4.302653  # t_{0.975,1} = tan(0.475 pi); t_{0.975,2}: see the first test


def test_t_quantile_closed_forms():
    # df = 1 (Cauchy): F(t) = 1/2 + atan(t)/pi, so t_p = tan(pi (p - 1/2))
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)
    assert t_quantile(0.975, 1) == pytest.approx(T1, abs=1e-6)
    # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so t_p = (2p - 1) / sqrt(2 p (1 - p))
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-12)
    assert t_quantile(0.975, 2) == pytest.approx(T2, abs=1e-6)
    assert t_quantile(0.025, 2) == -t_quantile(0.975, 2)  # symmetric
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-12)
    # printed tables: t_{0.975,4} = 2.776, t_{0.975,30} = 2.042; toward the normal's 1.960
    assert t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    assert t_quantile(0.975, 30) == pytest.approx(2.042272, abs=1e-6)
    assert 1.96 < t_quantile(0.975, 2000) < 1.9613
    for bad in ((1.0, 2), (0.975, 0), (0.975, 1.5)):
        with pytest.raises(ValueError, match="t_quantile"):
            t_quantile(*bad)


def test_t_quantile_matches_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")  # not a dependency; a cross-check where present
    for df in [*range(1, 41), 99, 500]:
        for p in (0.6, 0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_mean_ci95_by_hand():
    # 3 seeds: mean 0.5, deviations -0.3, -0.1, 0.4, s^2 = (0.09 + 0.01 + 0.16) / 2 = 0.13
    mean, half = mean_ci95([0.2, 0.4, 0.9])
    assert mean == pytest.approx(0.5)
    assert half == pytest.approx(T2 * math.sqrt(0.13) / math.sqrt(3), rel=1e-6)  # 0.895669
    assert mean_ci95([0.2, 0.4, 0.9, math.nan]) == (mean, half)  # NaN: not a value
    one = mean_ci95([0.7])
    assert one[0] == 0.7 and math.isnan(one[1])  # n = 1: no interval
    assert all(math.isnan(x) for x in mean_ci95([]))
    assert mean_ci95([2.0, 2.0, 2.0]) == (2.0, 0.0)  # no spread, no width


def test_seed_band_and_config_curve_by_hand(tmp_path: Path):
    # two seeds, the second logged one step more: band over the 3 steps both have
    steps, mean, half = seed_band([([1, 2, 3], [1.0, 1.0, 1.0]), ([1, 2, 3, 4], [3.0] * 4)])
    assert steps == [1, 2, 3] and mean == [2.0] * 3
    # s = sqrt(2), n = 2: half = t_{0.975,1} * sqrt(2) / sqrt(2)
    assert half == pytest.approx([T1] * 3, abs=1e-5)

    def run(values: list[float]) -> Run:
        rows = [{"step": i + 1, "x": v} for i, v in enumerate(values)]
        return Run(tmp_path, "r", {}, None, rows)

    config = Config("c", [run([0.0, 1.0, 1.0]), run([0.0, 3.0, 3.0])], [])
    steps, raw, smooth, half = config_curve(config, "x", 0.5)
    assert steps == [1, 2, 3] and raw == [0.0, 2.0, 2.0]
    # each seed smoothed first: EMA 0.5 gives (0, .5, .75) and (0, 1.5, 2.25), then averaged
    assert smooth == pytest.approx([0.0, 1.0, 1.5])
    assert half[0] == 0.0 and half[2] == pytest.approx(T1 * 0.75, rel=1e-6)  # s = 0.75 sqrt 2


STEPS = 20
LOSS_KWARGS = {
    "opo": {"alpha": "${alpha}", "mu": "${mu}"},  # interpolations, as Hydra saves them
    "grpo": {"clip_low": 0.2, "clip_high": 0.2, "beta": 0.0, "agg": "seq_mean_token_mean"},
    "dapo": {"clip_low": 0.2, "clip_high": 0.28, "beta": 0.0, "agg": "token_mean"},
}


def saved_config(method: str, seed: int, **top) -> dict:
    """A `.hydra/config.yaml` as a run saves it; the bookkeeping keys differ per seed."""
    return {
        "method": {"name": method, "loss": method, "loss_kwargs": LOSS_KWARGS[method]},
        "alpha": 0.6,
        "mu": 1.0,
        "seed": seed,
        "run_name": f"{method}-s{seed}",  # resolved here; differs with the seed
        "logger": {"tags": [f"batch{seed}"]},
        "trainer": {"steps": STEPS, "lr": 1e-3, "save_every": 5 + seed, "resume": "auto"},
        **top,
    }


# method -> per seed: (steps at 0 before the jump, final reward, grad norm pair)
METHODS = {
    "opo": [(4, 0.2, (0.0, 2.0)), (9, 0.4, (1.0, 3.0)), (14, 0.9, (2.0, 4.0))],
    "grpo": [(0, 0.5, (1.0, 3.0))] * 3,
    "dapo": [(0, 0.7, (1.0, 3.0))],  # one seed
}
EVAL = {("opo", 0): 0.3, ("opo", 1): 0.5}  # eval.json accuracy; opo seed 2 has none


@pytest.fixture
def methods(tmp_path: Path) -> Path:
    """A methods sweep: opo and grpo x 3 seeds, dapo x 1, Hydra's folder names."""
    root = tmp_path / "methods"
    for method, seeds in METHODS.items():
        for seed, (zeros, final, grad) in enumerate(seeds):
            run_dir = root / f"method={method},seed={seed}"
            rewards = [0.0] * zeros + [final] * (STEPS - zeros)
            overrides = [f"method={method}", f"seed={seed}"]
            write_run(
                run_dir, rewards, grad=grad, overrides=overrides, config=saved_config(method, seed)
            )
            if (method, seed) in EVAL:
                (run_dir / "eval.json").write_text(json.dumps({"accuracy": EVAL[method, seed]}))
    return root


def test_seeds_merge_into_configurations_with_hand_computed_intervals(methods: Path):
    out = report(compose_report(paths_arg(methods), "smoothing=0", "threshold=0.3"))
    rows = read_csv(out / "summary.csv")
    assert list(rows) == ["method=dapo", "method=grpo", "method=opo"]  # folder order
    opo = rows["method=opo"]
    assert (opo["n_seeds"], opo["seeds"], opo["steps"], opo["steps_planned"]) == (
        "3",
        "0 1 2",
        "20",
        "20",
    )
    assert (opo["alpha"], opo["mu"]) == ("0.6", "1")
    # finals 0.2, 0.4, 0.9: mean 0.5, half-width t_{0.975,2} * sqrt(0.13) / sqrt(3)
    assert float(opo["final_reward_mean"]) == pytest.approx(0.5)
    assert float(opo["final_reward_ci95"]) == pytest.approx(T2 * math.sqrt(0.13 / 3), rel=1e-5)
    # smoothing 0, threshold 0.3: seed 0 (final 0.2) never; seeds 1, 2 at steps 10 and 15
    assert opo["threshold_reached"] == "2"
    assert float(opo["steps_to_threshold_mean"]) == 12.5
    # s = 2.5 sqrt(2), n = 2: half-width t_{0.975,1} * 2.5
    assert float(opo["steps_to_threshold_ci95"]) == pytest.approx(T1 * 2.5, rel=1e-5)
    # grad norms alternate (s, s + 2): run means 1, 2, 3, s = 1
    assert float(opo["grad_norm_mean"]) == 2.0
    assert float(opo["grad_norm_ci95"]) == pytest.approx(T2 / math.sqrt(3), rel=1e-5)
    # eval accuracy 0.3 and 0.5 (seed 2 has none): s = 0.1 sqrt(2), n = 2
    assert float(opo["eval_accuracy_mean"]) == pytest.approx(0.4)
    assert float(opo["eval_accuracy_ci95"]) == pytest.approx(T1 * 0.1, rel=1e-5)
    assert len(opo["path"].split(";")) == 3

    grpo = rows["method=grpo"]  # three equal seeds: zero width
    assert (grpo["alpha"], grpo["mu"]) == ("", "")  # GRPO takes neither
    assert (grpo["final_reward_mean"], grpo["final_reward_ci95"]) == ("0.5", "0")
    assert (grpo["steps_to_threshold_mean"], grpo["eval_accuracy_mean"]) == ("1", "")
    dapo = rows["method=dapo"]  # n = 1: the mean, an empty half-width
    assert (dapo["n_seeds"], dapo["final_reward_mean"], dapo["final_reward_ci95"]) == (
        "1",
        "0.7",
        "",
    )
    assert dapo["grad_norm_ci95"] == dapo["steps_to_threshold_ci95"] == ""

    runs = read_csv(out / "runs.csv")  # the per-run rows, as before
    assert len(runs) == 7 and runs["method=opo,seed=2"]["final_reward"] == "0.9"


def test_summary_md_shows_mean_plus_minus_half_width(methods: Path):
    out = report(compose_report(paths_arg(methods), "smoothing=0", "threshold=0.3"))
    md = (out / "summary.md").read_text()
    head = "| label | method | alpha | mu | n_seeds | seeds | steps | steps_planned | "
    assert head + "final_reward | steps_to_threshold | grad_norm | eval_accuracy |" in md
    # half-widths to 2 significant digits, means to the same place: 0.8957 -> 0.90, 31.77 -> 32
    assert (
        "| method=opo | opo | 0.6 | 1 | 3 | 0 1 2 | 20 | 20 | 0.50 ± 0.90 "
        "| 12 ± 32 (2/3 reached) | 2.0 ± 2.5 | 0.4 ± 1.3 |" in md
    )
    assert "| method=grpo | grpo |  |  | 3 | 0 1 2 | 20 | 20 | 0.5 ± 0 | 1 ± 0 | 2 ± 0 |  |" in md
    assert "| method=dapo | dapo |  |  | 1 | 0 | 20 | 20 | 0.7 | 1 | 2 |  |" in md  # n = 1
    # a configuration has several seeds: the runs follow, one row each
    runs = md.split("## Runs")[1]
    assert runs.count("| opo |") == 3 and "| method=opo,seed=0 | opo | 0.6 | 1 | 0 | 20 |" in runs


def test_runs_that_differ_in_another_key_are_not_merged(tmp_path: Path):
    root = tmp_path / "runs"
    # saved configs equal but for trainer.lr: two configurations of one seed each
    for name, seed, lr in (("a", 0, 1e-3), ("b", 1, 1e-4)):
        config = saved_config("opo", seed) | {"trainer": {"steps": STEPS, "lr": lr}}
        write_run(root / name, [0.5] * 4, overrides=[f"seed={seed}"], config=config)
    # no saved config: by the overrides in the folder name, less seed
    for name in ("dataset=arith,seed=0", "dataset=arith,seed=1", "dataset=gsm8k,seed=0"):
        write_run(root / name, [0.5] * 4)
    # the same config and seed twice: repeats, kept apart
    for name in ("c", "d"):
        write_run(root / name, [0.5] * 4, overrides=["seed=5"], config=saved_config("grpo", 5))
    out = report(compose_report(paths_arg(root)))
    rows = read_csv(out / "summary.csv")
    seeds = {label: (row["n_seeds"], row["seeds"]) for label, row in rows.items()}
    assert seeds == {
        "a": ("1", "0"),
        "b": ("1", "1"),
        "dataset=arith": ("2", "0 1"),
        "dataset=gsm8k": ("1", "0"),
        "c": ("1", "5"),
        "d": ("1", "5"),
    }


def delta_cubed(mu: float, seed: int) -> dict[int, dict]:
    return {s: {"opo/delta_cubed_mean": 1e-4 * s / mu + 1e-5 * seed} for s in range(1, STEPS + 1)}


def write_grid(root: Path, *more: str, lr: float = 1e-3) -> Path:
    """An opo alpha x mu sweep, 2 x 2 x 2 seeds, logging opo/delta_cubed_mean; `more`: extra
    overrides of every run, `lr` its trainer.lr."""
    for alpha in (0.3, 0.6):
        for mu in (0.5, 1.0):
            for seed in (0, 1):
                run_dir = root / f"alpha={alpha},mu={mu},seed={seed}"
                rewards = [0.01 * s / mu + alpha / 10 for s in range(STEPS)]
                config = saved_config("opo", seed) | {"alpha": alpha, "mu": mu}
                config["trainer"] |= {"lr": lr}
                overrides = [f"alpha={alpha}", f"mu={mu}", f"seed={seed}", *more]
                extra = delta_cubed(mu, seed)
                write_run(run_dir, rewards, overrides=overrides, config=config, extra=extra)
    return root


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    return write_grid(tmp_path / "grid")


def test_each_claim_figure_is_written_when_the_runs_allow(methods: Path, grid: Path, tmp_path):
    out = report(compose_report(paths_arg(methods), f"out_dir='{tmp_path / 'm'}'"))
    assert (out / "claim1_grad_norm.png").stat().st_size > 1000
    assert not list(out.glob("claim[23]*.png"))
    md = (out / "summary.md").read_text()
    assert "claim 2 figure not written" in md and "claim 3 figure not written" in md
    assert "claim 1 figure not written" not in md
    for name in ("reward", "grad_norm"):
        assert (out / f"{name}.png").stat().st_size > 1000

    out = report(compose_report(paths_arg(grid), f"out_dir='{tmp_path / 'g'}'"))
    for name in ("claim2_alpha_mu", "claim3_delta_cubed", "heatmap_final_reward"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert not (out / "claim1_grad_norm.png").exists()  # one method
    assert "claim 1 figure not written" in (out / "summary.md").read_text()
    assert {row["n_seeds"] for row in read_csv(out / "summary.csv").values()} == {"2"}

    # both sweeps: opo has 5 configurations; claim 1 draws the one with the most seeds
    out = report(compose_report(paths_arg(methods, grid), f"out_dir='{tmp_path / 'both'}'"))
    assert (out / "claim1_grad_norm.png").exists() and (out / "claim2_alpha_mu.png").exists()
    assert (
        "claim 1: opo has 5 configurations; drawn: method=opo" in (out / "summary.md").read_text()
    )


def test_claim_figures_per_group_of_other_overrides(tmp_path: Path):
    # the grid at two learning rates: one claim 2 and one claim 3 figure per rate
    write_grid(tmp_path / "a", "trainer.lr=1e-3", lr=1e-3)
    write_grid(tmp_path / "b", "trainer.lr=1e-4", lr=1e-4)
    out = report(compose_report(paths_arg(tmp_path / "a", tmp_path / "b")))
    assert sorted(p.name for p in out.glob("claim[23]*.png")) == [
        "claim2_alpha_mu_opo,trainer.lr=1e-3.png",
        "claim2_alpha_mu_opo,trainer.lr=1e-4.png",
        "claim3_delta_cubed_opo,trainer.lr=1e-3.png",
        "claim3_delta_cubed_opo,trainer.lr=1e-4.png",
    ]


def test_heatmap_cells_show_mean_and_n(grid: Path):
    runs = load_runs([grid])
    (rows,) = grids(summarize(runs, varying_labels(runs), compose_report())).values()
    alphas, mus, values, texts = grid_cells(rows, "final_reward")
    assert (alphas, mus) == ([0.3, 0.6], [0.5, 1.0])
    # reward 0.01 s / mu + alpha / 10 at s = 0..19; final: the mean of s = 18, 19
    assert values[0][1] == pytest.approx((0.18 + 0.19) / 2 + 0.03)
    assert values[1][0] == pytest.approx((0.36 + 0.38) / 2 + 0.06)
    assert texts[0][1] == "0.215\nn=2" and texts[1][0] == "0.43\nn=2"


@pytest.mark.slow
def test_real_multirun_over_seeds_is_one_configuration_per_method(tmp_path: Path):
    # real saved configs (unresolved run_name, cache_dir from the environment): seeds merge
    from tests.test_sweeps import TINY, opo

    sweep = tmp_path / "sweep"
    args = ["train", "-m", "method=opo,grpo", "seed=0,1", *TINY, f"hydra.sweep.dir={sweep}"]
    opo(args, tmp_path, tmp_path / "cache")
    opo(["report", str(sweep)], tmp_path, tmp_path / "cache")
    rows = read_csv(sweep / "report" / "summary.csv")
    assert sorted(rows) == ["method=grpo", "method=opo"]
    assert {(row["n_seeds"], row["seeds"], row["steps"]) for row in rows.values()} == {
        ("2", "0 1", "2")
    }
    assert len(read_csv(sweep / "report" / "runs.csv")) == 4
    assert (sweep / "report" / "claim1_grad_norm.png").stat().st_size > 1000
