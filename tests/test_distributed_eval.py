"""`opo eval` under torchrun on CPU (gloo, 2 processes): the same results as one process,
greedy and sampled, one error line when one rank fails, no hang.

One launch (`tests/distributed_eval_ranks.py` on each rank) runs every scenario; the tests
read what it left. Each launch has a timeout, so a deadlock fails the test instead of the
suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from opo_cli.evaluate import batch_seed, evaluate, length_batches
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
