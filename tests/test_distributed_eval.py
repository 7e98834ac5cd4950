"""`opo eval` under torchrun on CPU (gloo, 2 processes): the same results as one process,
greedy and sampled, one error line when one rank fails, no hang; (slow) two SLURM-like tasks
without torchrun, one of which dies, the other ending with one line.

One launch (`tests/distributed_eval_ranks.py` on each rank) runs every scenario; the tests
read what it left. Each launch has a timeout, so a deadlock fails the test instead of the
suite.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opo_cli import cli, distributed
from opo_cli.config import validate_eval
from opo_cli.distributed import Dist
from opo_cli.errors import UserError
from opo_cli.evaluate import agree_or_lost, batch_seed, evaluate, length_batches, load_for_eval
from opo_cli.train import train
from tests.conftest import REPO, compose_config

TINY = [  # a one-step tiny arith run, no warm start: its final/ is the checkpoint under test
    "model.tiny.warm_start.steps=0",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "rollout.max_new_tokens=4",
    "trainer.mini_batches=1",
    "trainer.steps=1",
    "logger=none",
]
LAUNCH_TIMEOUT_S = 240  # the launch takes 20-45 s on a busy 2-core machine
SCENARIOS = {"greedy": [], "sampled": ["eval.n=3", "seed=7"]}  # as in the rank script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dist_eval")
    train(compose_config("train", [*TINY, f"model.cache_dir={tmp / 'cache'}"]), tmp / "run")
    return tmp / "run"


@pytest.fixture(scope="module")
def launch(checkpoint, tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    """The 2-process launch: its output folder and each rank's record of every scenario."""
    out = tmp_path_factory.mktemp("ranks")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(REPO / "tests" / "distributed_eval_ranks.py"), str(out), str(checkpoint)]
    done = subprocess.run(
        cmd, cwd=out, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}


def one_process(checkpoint: Path, out: Path, extra: list[str]) -> dict:
    """The same evaluation as the rank script's, in this one process."""
    args = [f"checkpoint={checkpoint}", "dataset=arith", "eval.limit=9", "eval.batch_size=2"]
    args += ["eval.max_new_tokens=3", *extra]
    return evaluate(compose_config("eval", args), out)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks_write_what_one_process_writes(launch, checkpoint, tmp_path, scenario):
    out, records = launch
    assert [records[r][scenario] for r in (0, 1)] == [{"code": 0, "errors": []}] * 2
    alone = one_process(checkpoint, tmp_path, SCENARIOS[scenario])
    both = json.loads((out / scenario / "eval.json").read_text())
    # 9 problems in batches of 2: 5 batches, rank 0 grades 0, 2, 4 and rank 1 grades 1, 3
    # and sits out the third round; each batch is padded and seeded as in one process
    assert (both.pop("processes"), alone.pop("processes")) == (2, 1)
    both.pop("eval_s"), alone.pop("eval_s")
    assert both == alone
    assert both["n"] == 9 and both["samples_per_problem"] == (3 if SCENARIOS[scenario] else 1)
    rows = (out / scenario / "samples.jsonl").read_text()
    assert rows == (tmp_path / "samples.jsonl").read_text()
    assert len(rows.splitlines()) == 9 * both["samples_per_problem"]
    if SCENARIOS[scenario]:  # sampled: the 3 responses to a problem are not all one
        responses = [json.loads(line)["response"] for line in rows.splitlines()]
        assert any(len(set(responses[i : i + 3])) > 1 for i in range(0, 27, 3))


def test_one_rank_failing_ends_both_with_one_line(launch):
    out, records = launch
    rank0, rank1 = records[0]["failed"], records[1]["failed"]
    assert rank1 == {"code": 2, "errors": ["opo: error: rank 1 cannot read the checkpoint"]}
    assert rank0 == {"code": 1, "errors": []}  # it loaded, then stopped with rank 1, quietly
    assert not (out / "failed" / "eval.json").exists()


def test_a_bad_override_is_one_line_from_rank_zero(launch):
    _, records = launch
    line = "opo: error: eval.n=0 is not allowed: an integer >= 1"
    assert records[0]["bad_override"] == {"code": 2, "errors": [line]}
    assert records[1]["bad_override"] == {"code": 2, "errors": []}


def test_batches_by_length_and_their_seeds():
    prompts = ["ccc", "a", "bbbb", "dd", "e"]  # lengths 3 1 4 2 1
    assert length_batches(prompts, 2) == [[1, 4], [3, 0], [2]]  # stable among equal lengths
    assert length_batches(prompts, 5) == [[1, 4, 3, 0, 2]]
    seeds = {batch_seed(s, b) for s in range(3) for b in range(1000)}
    assert len(seeds) == 3000  # no two (seed, batch) pairs share a seed


def test_agree_on_one_process_is_the_error_itself():
    distributed.agree(None)  # nobody failed: nothing happens
    error = ValueError("bad")
    with pytest.raises(ValueError, match="bad") as raised:
        distributed.agree(error)
    assert raised.value is error


def test_a_broken_process_group_is_one_line(monkeypatch):
    s = validate_eval(compose_config("eval", ["eval.dist_timeout_s=30"]))

    def broken(error):
        raise RuntimeError("[pair.cc:553] Connection closed by peer\nmore lines")

    monkeypatch.setattr(distributed, "agree", broken)
    with pytest.raises(UserError, match=r"eval\.dist_timeout_s=30 s \(\[pair.cc:553\] Conn"):
        agree_or_lost(None, s)
    own = RuntimeError("CUDA out of memory")  # this rank's own error is not the group's

    def reraise(error):
        raise error

    monkeypatch.setattr(distributed, "agree", reraise)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        agree_or_lost(own, s)


def test_vllm_on_several_processes_is_refused_before_loading(tmp_path):
    cfg = compose_config("eval", ["checkpoint=x", "dataset=arith"])
    s = dataclasses.replace(validate_eval(cfg), backend="vllm")  # vLLM need not be installed
    with pytest.raises(UserError, match=r"rollout\.backend=vllm under torchrun \(2 processes\)"):
        load_for_eval(cfg, s, ["x"], "cpu", Dist(rank=1, world_size=2))


@pytest.mark.parametrize(("rank", "printed"), [("0", True), ("1", False)])
def test_errors_before_the_ranks_meet_are_printed_by_rank_zero(monkeypatch, capsys, rank, printed):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as ended:
        cli.fail_alike("eval.n=0 is not allowed")
    assert ended.value.code == 2
    expected = "opo: error: eval.n=0 is not allowed\n" if printed else ""
    assert capsys.readouterr().err == expected


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_other_with_one_line(checkpoint, tmp_path):
    """Two tasks started as `srun` starts them (SLURM's variables, no torchrun agent to kill
    the survivor): rank 1 dies in its second batch; rank 0 ends at its next vote with one
    line, long before eval.dist_timeout_s (600 s)."""
    port = 29500 + os.getpid() % 1000
    procs = []
    for rank in (0, 1):
        env = os.environ | {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}
        env |= {"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "localhost"}
        env |= {"MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
            env.pop(key, None)
        cmd = [sys.executable, str(REPO / "tests" / "distributed_eval_ranks.py")]
        cmd += [str(tmp_path), str(checkpoint), "crash"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path))
    codes = [p.wait(timeout=LAUNCH_TIMEOUT_S) for p in procs]
    assert codes == [0, 9]  # rank 0's script ends normally after recording
    record = json.loads((tmp_path / "crash0.json").read_text())
    assert record["code"] == 2 and len(record["errors"]) == 1
    assert record["errors"][0].startswith("opo: error: the process group broke: another rank")
    assert not (tmp_path / "crash" / "eval.json").exists()
