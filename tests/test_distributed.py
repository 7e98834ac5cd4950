"""One training run on 2 processes (gloo, CPU), started as torchrun starts them.

Every launch has a timeout and its own process group, so a deadlock fails fast and leaves
nothing running. Run:
    pytest tests/test_distributed.py -q      # about 2-3 min on 2 shared cores
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from opo_cli import config
from opo_cli.config import ConfigError, validate_train
from opo_cli.losses import LOSSES
from opo_cli.parallel import SHARDS_DIR
from opo_cli.tracking import read_metrics
from opo_cli.train import train
from tests.conftest import OPO, TINY, compose_config

LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
WORKER = Path(__file__).with_name("distributed_worker.py")
STEPS = 8
RUN = [  # 4 prompts a step, 2 per rank; a checkpoint every 2 steps
    *TINY,
    f"trainer.steps={STEPS}",
    "trainer.save_every=2",
    "rollout.prompts_per_step=4",
    "trainer.lr=3e-3",
]


def rank_env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "OPO_CACHE": str(cache), "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}


def start(args: list[str], cwd: Path, cache: Path) -> subprocess.Popen:
    """torchrun with 2 ranks, in a session of its own (so that a timeout kills every rank)."""
    return subprocess.Popen(
        [*LAUNCH, *args],
        cwd=cwd,
        env=rank_env(cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout_s: float) -> tuple[int, str]:
    """(exit code, stdout + stderr); a launch past `timeout_s` is killed and fails the test."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"2-rank launch hung for {timeout_s}s:\n{err[-3000:]}")
    return proc.returncode, out + err


def torchrun(args: list[str], cwd: Path, cache: Path, timeout_s: float = 240) -> tuple[int, str]:
    return finish(start(args, cwd, cache), timeout_s)


def opo_train(run: Path, *overrides: str) -> list[str]:
    return ["-m", *OPO[2:], "train", *RUN, *overrides, f"hydra.run.dir={run}"]


def same_metrics(a: list[dict], b: list[dict]) -> None:
    """Rows equal key by key, timings (perf/*) aside."""
    strip = [[{k: v for k, v in r.items() if not k.startswith("perf/")} for r in x] for x in (a, b)]
    assert strip[0] == strip[1]


def opo_lines(log: str, prefix: str = "opo: error: ") -> list[str]:
    """The lines `prefix` starts, each rank's; two ranks writing to one pipe at once may
    join their lines (print writes the newline apart), so each occurrence starts one."""
    return [
        line for line in log.replace(prefix, "\n" + prefix).splitlines() if line.startswith(prefix)
    ]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """This module's tiny-model cache: the one model the runs start from."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache) -> dict[str, Path]:
    """Uninterrupted 2-rank runs, one per strategy, sharing the tiny-model cache."""
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for strategy in ("ddp", "fsdp2"):
        run = root / strategy
        code, log = torchrun(opo_train(run, f"trainer.strategy={strategy}"), root, cache)
        assert code == 0, log[-3000:]
        out[strategy] = run
    return out


def test_every_loss_gradient_on_two_ranks_is_the_one_process_gradient(tmp_path, cache):
    out = tmp_path / "results.json"
    code, log = torchrun([str(WORKER), str(out)], tmp_path, cache, timeout_s=180)
    assert code == 0, log[-3000:]
    results = json.loads(out.read_text())
    for strategy in ("ddp", "fsdp2"):
        for name in LOSSES:
            r = results[f"{strategy}/{name}"]
            assert r["grad_scale"] > 1e-3, (strategy, name)  # a gradient worth comparing
            assert r["grad_diff"] < 1e-6, (strategy, name, r)
            assert r["loss_diff"] < 1e-6, (strategy, name, r)
        # rank 0 decoded 2 tokens, rank 1 seven, and both reached the collective after
        assert results[f"{strategy}/generated"] == [2, 7]
    for rank in results["metrics"]:  # global rollout metrics on every rank
        assert max(rank.values()) < 1e-6, results["metrics"]
    # rank 1 needed a second round, so rank 0 drew one too; rank 1's 2 uniform groups dropped
    expected = {"rounds": 2, "train/dropped_groups": 2.0, "train/extra_rounds": 1.0}
    assert results["dynamic_sampling"] == [expected, expected]


def test_a_two_rank_run_trains_and_rank_0_alone_writes(runs, cache):
    run = runs["ddp"]
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [p.name for p in run.rglob("metrics*.jsonl")] == ["metrics.jsonl"]
    assert all(r["train/grad_norm"] > 0 and r["train/skipped_updates"] == 0 for r in rows)
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    initial = AutoModelForCausalLM.from_pretrained(next(cache.glob("tiny-*")))
    moved = [
        (a - b).abs().max().item()
        for a, b in zip(final.parameters(), initial.parameters(), strict=True)
    ]
    assert max(moved) > 1e-3  # the updates reached the weights rank 0 saved


def test_ddp_and_fsdp2_train_the_same_run(runs):
    ddp, fsdp2 = (read_metrics(runs[s] / "metrics.jsonl") for s in ("ddp", "fsdp2"))
    for a, b in zip(ddp, fsdp2, strict=True):
        assert a["train/reward_mean"] == b["train/reward_mean"]  # the same completions
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4, abs=1e-6)
    weights = [AutoModelForCausalLM.from_pretrained(runs[s] / "final") for s in ("ddp", "fsdp2")]
    for a, b in zip(*(w.parameters() for w in weights), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def child_with_rank(launcher: int, rank: int, timeout_s: float = 60) -> int:
    """The pid of the worker process of `rank` that torchrun `launcher` started."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for children in Path(f"/proc/{launcher}/task").glob("*/children"):
            for pid in children.read_text().split():
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if f"RANK={rank}".encode() in env:
                    return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} worker under pid {launcher}")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank in /proc")
def test_sigterm_to_one_rank_stops_both_and_the_sharded_checkpoint_resumes_exactly(
    runs, tmp_path, cache
):
    run, command = tmp_path / "run", opo_train(tmp_path / "run", "trainer.strategy=fsdp2")
    proc = start(command, tmp_path, cache)
    deadline = time.monotonic() + 180
    while len(read_metrics(run / "metrics.jsonl")) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "no 2 steps in time"
        time.sleep(0.05)
    os.kill(child_with_rank(proc.pid, 1), signal.SIGTERM)  # rank 1 only: the ranks agree
    code, log = finish(proc, 120)
    done = len(read_metrics(run / "metrics.jsonl"))
    assert code != 0 and 2 <= done < STEPS, log[-3000:]
    stopped = opo_lines(log, "opo: interrupted by SIGTERM")
    assert stopped and all(f"after step {done}/{STEPS}" in s for s in stopped), log
    assert (run / "checkpoints" / f"step_{done}" / SHARDS_DIR).is_dir()
    code, log = torchrun(command, tmp_path, cache)
    assert code == 0, log[-3000:]
    assert f"(step {done})" in log
    same_metrics(read_metrics(run / "metrics.jsonl"), read_metrics(runs["fsdp2"] / "metrics.jsonl"))
    resumed, whole = (
        AutoModelForCausalLM.from_pretrained(r / "final") for r in (run, runs["fsdp2"])
    )
    for a, b in zip(resumed.parameters(), whole.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_sharded_checkpoint_loads_exactly_in_one_process(runs, tmp_path, cache, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["fsdp2"], run)
    shutil.rmtree(run / "final")  # resumed at the last step: final/ is what the shards hold
    train(compose_config("train", [*RUN, "logger=none", f"model.cache_dir={cache}"]), run)
    err = capsys.readouterr().err
    assert f"(step {STEPS})" in err and "saved at another world size" in err
    one, two = (AutoModelForCausalLM.from_pretrained(r / "final") for r in (run, runs["fsdp2"]))
    for a, b in zip(one.parameters(), two.parameters(), strict=True):
        assert torch.equal(a, b)


BAD = {  # what each rank is given -> the words the run's error lines must hold
    "prompts": (["rollout.prompts_per_step=3"], ["prompts_per_step=3", "multiple of the world"]),
    "nccl": (["trainer.device=cuda"], ["CUDA"]),
    "model": (["model.name_or_path=MODELS/rank${oc.env:LOCAL_RANK}"], ["cannot load", "rank1"]),
}


@pytest.fixture(scope="module")
def bad_launches(tmp_path_factory, cache, model_and_tok) -> dict[str, tuple[int, str]]:
    """Every bad input at once (each ends before training); rank 1's model is no model."""
    root = tmp_path_factory.mktemp("bad")
    model, tok = model_and_tok
    model.save_pretrained(root / "rank0")
    tok.save_pretrained(root / "rank0")
    (root / "rank1").mkdir()
    (root / "rank1" / "config.json").write_text("{not json")
    procs = {}
    for name, (overrides, _) in BAD.items():
        given = [o.replace("MODELS", str(root)) for o in overrides]
        procs[name] = start(opo_train(root / name, *given), root, cache)
    return {name: finish(proc, 180) for name, proc in procs.items()}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_ends_every_rank_with_one_clear_line(bad_launches, name):
    if name == "nccl" and torch.cuda.is_available():
        pytest.skip("NCCL works here")
    code, log = bad_launches[name]
    lines = opo_lines(log)
    # a mistake every rank finds alike is said once (rank 0); a failure on one rank is said
    # by that rank, and the others name it
    assert code != 0 and len(lines) == (2 if name == "model" else 1), log[-3000:]
    assert all(w in line for w in BAD[name][1] for line in lines), lines
    assert not re.search(r'File ".*opo_cli', log)  # no traceback of ours (torchrun has its own)
    if name == "model":
        assert sum("rank 1 failed" in line for line in lines) == 1  # rank 0's line


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["rollout.prompts_per_step=6"], "a multiple of the world size (4)"),
        (
            ["rollout.prompts_per_step=4", "trainer.mini_batches=2"],
            "at most rollout.prompts_per_step / world size (1)",
        ),
        (
            ["rollout.prompts_per_step=8", "rollout.backend=vllm"],
            "a vLLM engine per rank is not built",
        ),
        (
            ["rollout.prompts_per_step=8", "model.lora.r=4", "trainer.strategy=fsdp2"],
            "FSDP2 does not shard a PEFT adapter",
        ),
    ],
)
def test_what_several_ranks_cannot_run_is_refused_in_one_line(monkeypatch, overrides, words):
    monkeypatch.setenv("WORLD_SIZE", "4")  # what torchrun sets; no process group is needed
    monkeypatch.setattr(config, "require_vllm", lambda: None)  # vLLM need not be installed
    with pytest.raises(ConfigError) as refused:
        validate_train(compose_config("train", overrides))
    assert words in str(refused.value) and "\n" not in str(refused.value)


SLOW_ON_RANK_1 = """
import os, time


def score(responses, answers, **columns):
    if os.environ.get("RANK") == "1" and any(responses):  # training batches, not the probe
        time.sleep(60)
    return [0.0] * len(responses)
"""


@pytest.mark.slow  # a rank stuck for a minute, the other timing out after 5 s
def test_a_rank_stuck_past_dist_timeout_ends_the_run_in_one_line(tmp_path, cache):
    reward = tmp_path / "slow.py"
    reward.write_text(SLOW_ON_RANK_1)
    overrides = ["trainer.dist_timeout_s=5", f"dataset.reward=[exact_match,{reward}:score]"]
    code, log = torchrun(opo_train(tmp_path / "run", *overrides), tmp_path, cache, 200)
    lines = opo_lines(log)
    assert code != 0 and lines, log[-3000:]
    assert lines[0].startswith(
        "opo: error: rank 0: the other ranks did not answer within trainer.dist_timeout_s=5s"
    ), lines
