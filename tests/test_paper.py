"""The paper's claims, measured (issue 16): the embedded task with headroom (`dataset=arith_hard`)
and `scripts/reproduce_paper.sh`, whose sweeps must compose without training anything.
Expected answers are worked out by hand. Run: pytest tests/test_paper.py -q
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys

import pytest
from omegaconf import DictConfig

import opo_cli.config as C
from opo_cli.data import arith_problems, dataset_kind, load_problems, warm_start_pairs
from opo_cli.rewards import build_reward
from tests.conftest import REPO, compose_config

SCRIPT = REPO / "scripts" / "reproduce_paper.sh"


def arith_hard(*overrides: str) -> DictConfig:
    return compose_config("train", ["dataset=arith_hard", *overrides]).dataset


# ---------------------------------------------------------------- the task


def test_arith_hard_composes_as_a_generated_arithmetic_task():
    cfg = compose_config("train", ["dataset=arith_hard"])
    C.validate_train(cfg)
    assert (cfg.dataset.name, dataset_kind(cfg.dataset)) == ("arith_hard", "arith")
    assert (cfg.dataset.max_operand, cfg.dataset.ops) == (19, "+-*")
    assert cfg.run_name == "opo-alpha0.6-mu1-tiny-arith_hard-s0"


def test_arith_hard_problems_are_the_hand_checked_answers():
    problems = arith_problems(19, "+-*")
    assert len(problems) == 3 * 20 * 20  # operator, then a, then b: a<op>b is op*400 + a*20 + b
    by_prompt = {p.prompt: p.answer for p in problems}
    assert problems[0].prompt == "0+0=" and problems[400].prompt == "0-0="
    assert (problems[-1].prompt, problems[-1].answer) == ("19*19=", "361")
    expected = {"12+9=": "21", "19+19=": "38", "3-17=": "-14", "7-7=": "0", "19-0=": "19"}
    expected |= {"0*7=": "0", "13*14=": "182", "11*9=": "99", "6*17=": "102"}
    assert {k: by_prompt[k] for k in expected} == expected
    assert problems[2 * 400 + 13 * 20 + 14].prompt == "13*14="


def test_arith_hard_split_is_deterministic_and_disjoint():
    train, held = load_problems(arith_hard())
    again_train, again_held = load_problems(arith_hard())
    assert (train, held) == (again_train, again_held)
    assert (len(train), len(held)) == (1000, 200)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert {p.prompt for p in train + held} == {p.prompt for p in arith_problems(19, "+-*")}
    _, other = load_problems(arith_hard("dataset.split_seed=1"))
    assert other != held


def test_arith_hard_reward_grades_exact_answers_only():
    reward = build_reward(arith_hard())
    responses = ["361", " -14\n", "3611", "14", "0", "1 82"]
    golds = ["361", "-14", "361", "-14", "0", "182"]
    scores = reward(responses, golds)
    assert scores.total == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]  # 3611: the teacher's stutter
    assert [p["correct"] for p in scores.parts] == scores.total


def test_arith_hard_warm_start_has_the_noisy_teacher_of_arith():
    problems, _ = load_problems(arith_hard())
    gold = {p.prompt: p.answer for p in problems}
    pairs = warm_start_pairs(dataset_kind(arith_hard()), problems, 400, 0, 0.3)
    right = sum(a == gold[q] for q, a in pairs)
    stutter = sum(a == gold[q] + gold[q][-1] for q, a in pairs)
    assert right + stutter == 400  # every demonstration is the answer or its stutter
    assert 0.2 < right / 400 < 0.4  # right with probability 0.3: 120 expected, sd 9


# ---------------------------------------------------------------- scripts/reproduce_paper.sh


def test_reproduce_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def dry_run(scale: str, *overrides: str) -> list[list[str]]:
    """The commands `reproduce_paper.sh` would run, each split into words, none run."""
    env = {**os.environ, "DRY_RUN": "1", "OUT": "outputs/paper/test"}
    out = subprocess.run(
        ["bash", str(SCRIPT), scale, *overrides],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def sweep_jobs(words: list[str]) -> list[list[str]]:
    """The overrides of every job an `opo train sweep=...` command line would launch."""
    overrides = [w for w in words[2:] if not w.startswith(("hydra", "+hydra"))]
    cfg = compose_config(
        "train", [w for w in words[2:] if not w.startswith("hydra.sweep")], hydra=True
    )
    params = cfg.hydra.sweeper.params
    grid = itertools.product(*[[f"{k}={v}" for v in str(params[k]).split(",")] for k in params])
    return [[*overrides, *job] for job in grid]


@pytest.mark.parametrize(
    ("scale", "jobs"),
    [("cpu", {"methods": 21, "alpha_mu": 27}), ("gpu", {"methods": 21, "alpha_mu": 27})],
)
def test_reproduce_script_sweeps_compose_and_validate(scale, jobs):
    commands = dry_run(scale)
    trains = [c for c in commands if c[:2] == ["opo", "train"] and "sweep=" in " ".join(c)]
    reports = [c for c in commands if c[:2] == ["opo", "report"]]
    assert len(reports) == 1 and reports[0][-1] == "out_dir=outputs/paper/test/report"
    seen = {}
    for words in trains:
        name = next(w for w in words if w.startswith("hydra.sweep.dir=")).rpartition("/")[2]
        assert f"outputs/paper/test/{name}" in reports[0]  # the report reads every sweep
        grid = sweep_jobs(words)
        assert {job[-1] for job in grid} == {"seed=0", "seed=1", "seed=2"}  # seeds vary fastest
        configs = [compose_config("train", job) for job in grid if job[-1] == "seed=0"]
        for cfg in configs:  # seeds change no composition: one job per other combination
            C.validate_train(cfg)
        seen[name] = (len(grid), configs)
    assert {k: n for k, (n, _) in seen.items() if k in jobs} == jobs
    methods = {c.method.name for c in seen["methods"][1]}
    assert methods == {"opo", "grpo", "dapo", "dapo_paper", "gspo", "dpo", "opo_code"}
    cells = {(c.alpha, c.mu) for c in seen["alpha_mu"][1]}
    assert cells == set(itertools.product([0.3, 0.6, 0.9], [0.5, 1.0, 2.0]))
    if scale == "cpu":
        cfg = seen["methods"][1][0]
        assert (cfg.dataset.name, cfg.model.name, cfg.trainer.steps) == ("arith_hard", "tiny", 200)
    else:
        assert {c.model.name for _, v in seen.values() for c in v} == {"qwen3-1.7b"}
        assert {c.trainer.steps for c in seen["methods"][1]} == {224}  # +experiment=paper_exp1
        assert {c.trainer.steps for c in seen["methods_exp2"][1]} == {27}  # paper_exp2


def test_reproduce_script_passes_overrides_to_every_run_and_rejects_a_bad_scale():
    commands = dry_run("cpu", "trainer.steps=5")
    trains = [c for c in commands if c[:2] == ["opo", "train"]]
    assert len(trains) == 3 and all(c[-1] == "trainer.steps=5" for c in trains)
    bad = subprocess.run(["bash", str(SCRIPT), "tpu"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("usage: ")


# ---------------------------------------------------------------- scripts/paper_numbers.py


def fake_run(folder, overrides: list[str], rows: list[dict]):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_paper_numbers_are_first_and_last_tenths_with_t_intervals(tmp_path):
    # 10 steps: the first and last 10% are the first and last row. Two seeds of opo:
    # reward 0.1 -> 1.0 and 0.3 -> 0.8, grad norm 2 -> 1 and 4 -> 1 (ratios 0.5, 0.25).
    # Half-width over 2 seeds: t_{0.975,1} * s / sqrt(2) = 12.706 * |a - b| / 2:
    # reward first 0.2 +- 1.27, last 0.9 +- 1.27, grad first 3 +- 12.7, last 1 +- 0,
    # ratio 0.375 +- 1.59. One seed of grpo: means alone.
    def rows(r0, r1, g0, g1):
        mid = [{"step": s, "train/reward_mean": 0.5, "train/grad_norm": 9.0} for s in range(2, 10)]
        first = {"step": 1, "train/reward_mean": r0, "train/grad_norm": g0}
        return [first, *mid, {"step": 10, "train/reward_mean": r1, "train/grad_norm": g1}]

    fake_run(tmp_path / "a", ["method=opo", "seed=0"], rows(0.1, 1.0, 2.0, 1.0))
    fake_run(tmp_path / "b", ["method=opo", "seed=1"], rows(0.3, 0.8, 4.0, 1.0))
    fake_run(tmp_path / "c", ["method=grpo", "seed=0"], rows(0.5, 0.7, 1.0, 2.0))
    script = REPO / "scripts" / "paper_numbers.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0].startswith("| configuration | n | reward first 10% |")
    assert out[2] == (
        "| method=opo | 2 | 0.2 ± 1.3 | 0.9 ± 1.3 | 3 ± 13 | 1 ± 0 | - | - | 0.375 ± 1.6 |"
    )
    assert out[3] == "| method=grpo | 1 | 0.5 | 0.7 | 1 | 2 | - | - | 2 |"
    usage = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: ")
