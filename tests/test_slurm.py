"""SLURM and submitit: the torchrun variables from a task's environment (fake environments,
one node and several), the GPU each task uses, the `slurm_gpu` launcher's sbatch script for
several GPUs per run (rendered by submitit, never submitted), and (slow) a run of 2 tasks
through `hydra/launcher=submitit_local` forming one process group."""

from __future__ import annotations

import json
import subprocess

import pytest

from opo_cli import distributed
from opo_cli.distributed import Dist, cuda_index, from_env, parse_first_host, slurm_to_torchrun_env
from opo_cli.errors import UserError
from tests.conftest import OPO, compose_config
from tests.test_distributed_eval import TINY


@pytest.fixture
def no_scontrol(monkeypatch):
    """No `scontrol` here: node lists are read by `parse_first_host`, as on a machine without it."""

    def missing(*args, **kwargs):
        raise FileNotFoundError("scontrol")

    monkeypatch.setattr(distributed.subprocess, "run", missing)


def srun_task(procid: int, localid: int, tasks: int, nodes: str, **extra: str) -> dict[str, str]:
    """What `srun` sets in one task of a job step (the variables read here)."""
    env = {
        "SLURM_JOB_ID": "123456",
        "SLURM_NTASKS": str(tasks),
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_JOB_NODELIST": nodes,
        "SLURM_STEP_NODELIST": nodes,
    }
    return env | extra


@pytest.mark.usefixtures("no_scontrol")
def test_one_node_of_four_tasks():
    env = srun_task(2, 2, 4, "gpu07")
    assert slurm_to_torchrun_env(env) == {
        "RANK": "2",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "2",
        "MASTER_PORT": str(29500 + 123456 % 1000),  # 29956: one port per job
        "MASTER_ADDR": "gpu07",
    }
    assert from_env(env) == Dist(rank=2, world_size=4, local_rank=2)


@pytest.mark.usefixtures("no_scontrol")
def test_two_nodes_rank_zero_on_the_first_host():
    # task 5 of 8, 4 per node: the second task on the second node
    env = srun_task(5, 1, 8, "gpu[03-04]")
    mapped = slurm_to_torchrun_env(env)
    assert (mapped["RANK"], mapped["WORLD_SIZE"], mapped["LOCAL_RANK"]) == ("5", "8", "1")
    assert mapped["MASTER_ADDR"] == "gpu03"
    # the step's node list, not the job's, when a step runs on part of the job's nodes
    env = srun_task(0, 0, 2, "a[1-4]", SLURM_STEP_NODELIST="a[3-4]")
    assert slurm_to_torchrun_env(env)["MASTER_ADDR"] == "a3"


@pytest.mark.usefixtures("no_scontrol")
def test_what_is_already_set_is_kept():
    env = srun_task(1, 1, 2, "n1", MASTER_ADDR="10.0.0.1", MASTER_PORT="23456")
    mapped = slurm_to_torchrun_env(env)
    assert "MASTER_ADDR" not in mapped and mapped["MASTER_PORT"] == "23456"
    # srun -> torchrun (one task per node): torchrun's own variables win
    assert slurm_to_torchrun_env(srun_task(0, 0, 2, "n[1-2]", RANK="3")) == {}


@pytest.mark.usefixtures("no_scontrol")
def test_no_process_group_outside_a_multi_task_step():
    # the batch script itself: rank 0 of SLURM_NTASKS by its variables, but no srun step
    batch = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert slurm_to_torchrun_env(batch) == {}
    assert from_env(batch) == Dist()
    assert slurm_to_torchrun_env(srun_task(0, 0, 1, "n1")) == {}  # srun with one task
    assert slurm_to_torchrun_env({}) == {}


@pytest.mark.usefixtures("no_scontrol")
def test_submitit_local_tasks_on_this_host():
    env = {
        "SUBMITIT_LOCAL_NTASKS": "2",
        "SUBMITIT_LOCAL_GLOBALID": "1",
        "SUBMITIT_LOCAL_LOCALID": "1",
        "SUBMITIT_LOCAL_JOB_ID": "4242",
    }
    assert slurm_to_torchrun_env(env) == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_PORT": str(29500 + 242),
        "MASTER_ADDR": "localhost",
    }
    assert slurm_to_torchrun_env(env | {"SUBMITIT_LOCAL_NTASKS": "1"}) == {}


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("gpu07", "gpu07"),
        ("gpu[01-04]", "gpu01"),
        ("gpu[01-04,07],cpu1", "gpu01"),  # a comma inside brackets does not end the group
        ("node[007,001-003]", "node007"),  # SLURM's order, zero padding kept
        ("a1,b[1-2]", "a1"),
        ("gpu-a100-[3-5]", "gpu-a100-3"),
        ("rack[2-3]-n[5,9]", "rack2-n5"),
    ],
)
@pytest.mark.usefixtures("no_scontrol")
def test_first_host_of_a_node_list(nodelist, first):
    assert parse_first_host(nodelist) == first
    assert distributed.first_host(nodelist) == first  # scontrol missing: the same parser


def test_the_gpu_of_each_task():
    assert [cuda_index(r, visible=4) for r in range(4)] == [0, 1, 2, 3]  # torchrun: all GPUs
    assert [cuda_index(r, visible=1) for r in range(4)] == [0, 0, 0, 0]  # --gpus-per-task=1
    with pytest.raises(UserError, match="LOCAL_RANK=3 but this process sees 2 GPUs"):
        cuda_index(3, visible=2)


def test_slurm_gpu_launcher_asks_for_a_gpu_per_task(monkeypatch, tmp_path):
    """The sbatch script hydra-submitit-launcher writes for a sweep whose runs span 2 nodes of
    4 GPUs each, rendered by submitit itself; nothing is submitted."""
    submitit = pytest.importorskip("submitit", reason="hydra-submitit-launcher not installed")
    from hydra.utils import instantiate
    from submitit.slurm.slurm import SlurmExecutor

    overrides = ["hydra/launcher=slurm_gpu", "hydra.launcher.tasks_per_node=4"]
    overrides += ["hydra.launcher.nodes=2", f"hydra.sweep.dir={tmp_path}", "hydra.job.name=opo"]
    cfg = compose_config("train", overrides, hydra=True)
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun found"
    executors = []
    monkeypatch.setattr(
        submitit.AutoExecutor, "map_array", lambda self, fn, *args: executors.append(self) or []
    )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    assert launcher.launch([["seed=0"]], initial_job_idx=0) == []  # map_array: nothing ran
    script = executors[0]._executor._make_submission_file_text("python -m job", "uid")
    flags = {line for line in script.splitlines() if line.startswith("#SBATCH")}
    wanted = ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-task=1", "--mem-per-gpu=64G"]
    assert {f"#SBATCH {flag}" for flag in wanted} <= flags
    assert {"#SBATCH --cpus-per-task=8", "#SBATCH --requeue"} <= flags
    assert not any(f.startswith("#SBATCH --mem=") for f in flags)  # --mem-per-gpu instead
    assert "srun " in script  # each of the 8 tasks runs the job: one rank each


@pytest.mark.slow
def test_two_submitit_local_tasks_form_one_process_group(tmp_path):
    """`hydra/launcher=submitit_local hydra.launcher.tasks_per_node=2`: submitit starts 2
    processes with its SUBMITIT_LOCAL_* variables, they form one gloo group, and the eval
    equals the same eval in one process."""
    from opo_cli.evaluate import evaluate
    from opo_cli.train import train

    cfg = compose_config("train", [*TINY, f"model.cache_dir={tmp_path}"])
    train(cfg, tmp_path / "run")
    args = [f"checkpoint={tmp_path / 'run'}", "dataset=arith", "eval.limit=6", "eval.batch_size=2"]
    args += ["eval.max_new_tokens=3"]
    launch = ["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2"]
    launch += [f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    subprocess.run([*OPO, "eval", "-m", *args, *launch], cwd=tmp_path, check=True, timeout=300)
    (found,) = (tmp_path / "sweep").rglob("eval.json")
    both = json.loads(found.read_text())
    alone = evaluate(compose_config("eval", args), tmp_path / "alone")
    assert (both.pop("processes"), alone.pop("processes")) == (2, 1)
    both.pop("eval_s"), alone.pop("eval_s")
    assert both == alone
    rows = (found.parent / "samples.jsonl").read_text()
    assert rows == (tmp_path / "alone" / "samples.jsonl").read_text()
