"""Sweeps: the conf/sweep/ grids, the launcher preset, W&B grouping and run names (fast), and
real multiruns through the `opo` CLI with the basic, joblib and submitit_local launchers,
then `opo report` on a sweep (slow, subprocesses).
"""

from __future__ import annotations

import csv
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import opo_cli.config as C
from opo_cli.cli import check_group_overrides
from tests.conftest import OPO, compose_config

TINY = [  # two steps of a tiny rollout on the untrained tiny model, no W&B
    "trainer.steps=2",
    "logger=none",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "rollout.max_new_tokens=4",
    "model.tiny.warm_start.steps=0",
]


def compose_train(*overrides: str, hydra: bool = False) -> DictConfig:
    return compose_config("train", overrides, hydra=hydra)


@pytest.fixture
def hydra_config() -> Iterator[None]:
    """Lets a test set HydraConfig as a launched job sees it; unset afterwards."""
    yield
    HydraConfig.instance().cfg = None


# ---------------------------------------------------------------- fast: configs


def test_alpha_mu_sweep_is_the_papers_3x3_grid():
    cfg = compose_train("sweep=alpha_mu", hydra=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN
    params = cfg.hydra.sweeper.params
    assert params.alpha.split(",") == ["0.3", "0.6", "0.9"]
    assert params.mu.split(",") == ["0.5", "1.0", "2.0"]
    assert Path(cfg.hydra.sweep.dir).name.startswith("alpha_mu_")


def test_methods_sweep_names_existing_methods_and_three_seeds():
    cfg = compose_train("sweep=methods", hydra=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN
    methods = cfg.hydra.sweeper.params.method.split(",")
    assert methods == ["opo", "grpo", "dapo", "gspo", "dpo"]
    assert set(methods) <= set(C.group_options("method"))
    assert cfg.hydra.sweeper.params.seed.split(",") == ["0", "1", "2"]
    for method in methods:  # every job of the grid composes and validates
        C.validate_train(compose_train(f"method={method}", "sweep=methods"))


def test_alpha_mu_sweep_composes_with_the_paper_experiment():
    # scripts/ablation_alpha_mu.sh gpu: the experiment sets the run, the sweep file the grid
    cfg = compose_train("sweep=alpha_mu", "+experiment=paper_exp1", hydra=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert set(cfg.hydra.sweeper.params) == {"alpha", "mu"}
    assert (cfg.model.name, cfg.trainer.steps) == ("qwen3-1.7b", 224)
    C.validate_train(cfg)


def test_sweep_key_stays_out_of_run_folder_names():
    cfg = compose_train("sweep=alpha_mu", hydra=True)
    assert "sweep" in cfg.hydra.job.config.override_dirname.exclude_keys


def test_run_folder_names_fit_a_file_system():
    # a long override list made a name over 255 bytes: OSError 36 when Hydra made the folder
    overrides = ",".join(f"method.loss_kwargs.option_{i}={i / 7:.6f}" for i in range(20))
    name = C._dirname(overrides)
    assert len(name.encode()) <= 200
    assert name.startswith("method.loss_kwargs.option_0=0.000000,")
    assert name == C._dirname(overrides)  # the same command finds the same folder
    assert name != C._dirname(overrides.replace("option_19", "option_X"))  # the hash sees it all
    assert C._dirname("alpha=0.3,method=opo") == "alpha=0.3,method=opo"  # short names unchanged
    assert C._dirname("dataset.path=/data/x.jsonl") == "dataset.path=_data_x.jsonl"
    assert C._dirname("") == "default"


def test_slurm_preset_is_one_gpu_per_run_and_requeues():
    cfg = compose_train("hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu", hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_task, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert launcher.additional_parameters.requeue is True
    assert launcher.max_num_timeout > 0
    assert cfg.trainer.resume == "auto"  # a requeued job continues from its checkpoint


def test_run_name_carries_method_hyperparameters():
    # train.yaml: alpha 0.6, mu 1.0, seed 0; opo's numeric loss arguments are alpha and mu
    assert compose_train().run_name == "opo-alpha0.6-mu1-tiny-arith-s0"
    cfg = compose_train("alpha=0.3", "mu=2.0", "seed=1")
    assert cfg.run_name == "opo-alpha0.3-mu2-tiny-arith-s1"
    # dpo.yaml: beta 0.1 is its only loss argument; alpha and mu do not apply
    assert compose_train("method=dpo").run_name == "dpo-beta0.1-tiny-arith-s0"


def test_wandb_group_is_the_sweep_folder_name_in_a_multirun(hydra_config):
    cfg = compose_train("sweep=alpha_mu", hydra=True)
    HydraConfig.instance().set_config(cfg)
    assert cfg.logger.group == Path(cfg.hydra.sweep.dir).name
    assert cfg.logger.group.startswith("alpha_mu_")
    assert list(cfg.logger.tags) == ["sweep_alpha_mu"]


def test_wandb_group_is_null_for_a_single_run(hydra_config):
    assert compose_train().logger.group is None  # no Hydra job at all (tests, notebooks)
    cfg = compose_train(hydra=True)
    HydraConfig.instance().set_config(cfg)
    assert cfg.hydra.mode != RunMode.MULTIRUN
    assert cfg.logger.group is None


def test_group_override_comma_lists_are_checked_value_by_value(capsys):
    check_group_overrides(["method=opo,grpo", "sweep=alpha_mu", "method=glob(*)", "alpha=1,2"])
    with pytest.raises(SystemExit) as exit_info:
        check_group_overrides(["method=opo,nope,grpo"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("opo: error: method=nope: no such method; choose one of: ")
    assert "grpo" in err


# ---------------------------------------------------------------- slow: real multiruns


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One tiny-model cache for every multirun of this file."""
    return tmp_path_factory.mktemp("opo_cache")


def opo(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPO_CACHE": str(cache), "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run(
        [*OPO, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def only_sweep_dir(cwd: Path, prefix: str = "") -> Path:
    (sweep,) = (cwd / "outputs" / "sweeps").glob(f"{prefix}*")
    return sweep


def run_dirs(sweep: Path) -> dict[str, dict]:
    """Run folder name -> its .hydra/config.yaml, for every folder with two metrics rows."""
    runs = {}
    for metrics in sweep.glob("*/metrics.jsonl"):
        assert len(metrics.read_text().splitlines()) == 2  # trainer.steps=2
        runs[metrics.parent.name] = yaml.safe_load(
            (metrics.parent / ".hydra/config.yaml").read_text()
        )
    return runs


@pytest.mark.slow
def test_alpha_mu_multirun_then_report(tmp_path, cache):
    opo(["train", "-m", "method=opo", "alpha=0.3,0.9", "mu=0.5,2.0", *TINY], tmp_path, cache)
    sweep = only_sweep_dir(tmp_path)
    runs = run_dirs(sweep)
    assert len(runs) == 4
    grid = {(cfg["alpha"], cfg["mu"]) for cfg in runs.values()}
    assert grid == {(0.3, 0.5), (0.3, 2.0), (0.9, 0.5), (0.9, 2.0)}
    for name, cfg in runs.items():  # each folder is named by its own overrides
        assert f"alpha={cfg['alpha']}" in name.split(",")
        assert f"mu={cfg['mu']}" in name.split(",")

    opo(["report", str(sweep)], tmp_path, cache)
    out = sweep / "report"
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((float(r["alpha"]), float(r["mu"])) for r in rows) == sorted(grid)
    assert {r["steps"] for r in rows} == {"2"}
    assert (out / "summary.md").read_text().count("| opo |") == 4
    for png in ("reward", "grad_norm", "heatmap_final_reward", "heatmap_steps_to_threshold"):
        assert (out / f"{png}.png").stat().st_size > 1000


@pytest.mark.slow
def test_sweep_file_runs_without_m_and_cli_values_pin_the_grid(tmp_path, cache):
    opo(["train", "sweep=alpha_mu", "alpha=0.3", "mu=0.5,2.0", *TINY], tmp_path, cache)
    runs = run_dirs(only_sweep_dir(tmp_path, prefix="alpha_mu_"))
    assert sorted((cfg["alpha"], cfg["mu"]) for cfg in runs.values()) == [(0.3, 0.5), (0.3, 2.0)]
    assert not any("sweep=" in name for name in runs)


@pytest.mark.slow
def test_joblib_launcher_runs_methods_in_parallel(tmp_path, cache):
    args = ["train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=opo,grpo"]
    opo([*args, *TINY], tmp_path, cache)
    runs = run_dirs(only_sweep_dir(tmp_path))
    assert sorted(cfg["method"]["name"] for cfg in runs.values()) == ["grpo", "opo"]


@pytest.mark.slow
def test_submitit_local_launcher_runs_jobs_in_other_processes(tmp_path, cache):
    args = ["train", "-m", "hydra/launcher=submitit_local", "method=opo", "seed=0,1"]
    opo([*args, *TINY], tmp_path, cache)
    sweep = only_sweep_dir(tmp_path)  # one folder: the jobs share the launcher's timestamp
    runs = run_dirs(sweep)
    assert sorted(cfg["seed"] for cfg in runs.values()) == [0, 1]
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2
