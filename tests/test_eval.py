"""`opo eval` and evaluation during training: pass@k and maj@k by hand, checkpoint folders,
`opo eval` on a one-step tiny MATH checkpoint, and eval/ metrics in a training run."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

import opo_cli.config as C
from opo_cli import cli
from opo_cli.data import Problem, load_problems
from opo_cli.errors import UserError
from opo_cli.evaluate import (
    VOTING,
    Graded,
    Voting,
    evaluate,
    majority_correct,
    pass_at_k,
    summarise,
)
from opo_cli.rewards import grade_math
from opo_cli.runs import model_candidates
from opo_cli.train import train
from tests.conftest import MATH_DIR, compose_config, needs_math

LEVEL3_SUBJECTS = [  # MATH's seven subjects, in the order of their Level 3 test counts below
    "Algebra",
    "Counting & Probability",
    "Geometry",
    "Intermediate Algebra",
    "Number Theory",
    "Prealgebra",
    "Precalculus",
]

TINY = [  # a fast tiny run: 2 prompts x 2 completions of 4 tokens, no warm start
    "model.tiny.warm_start.steps=0",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "rollout.max_new_tokens=4",
    "trainer.mini_batches=1",
    "logger=none",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def compose_cfg(name: str, *overrides: str) -> DictConfig:
    return compose_config(name, overrides)


def test_pass_at_k_matches_the_closed_form_by_hand():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2) = 0.5
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)  # pass@1 = c/n
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(8, 4, 5) == 1.0  # only 4 wrong: any 5 draws hold a right one


def test_majority_vote_over_normalised_boxed_answers():
    by_math = VOTING["math"]
    responses = ["so \\boxed{3}", "\\boxed{\\dfrac{1}{2}}", "I think $\\boxed{\\frac{1}{2}}$.", "?"]
    # \dfrac and \frac are one answer: 1/2 gets 2 votes, 3 gets 1, "?" has no answer
    assert majority_correct(responses, [False, True, True, False], by_math) is True
    assert majority_correct(responses, [True, False, False, False], by_math) is False
    tie = ["\\boxed{4}", "\\boxed{5}"]  # a tie goes to the answer seen first
    assert majority_correct(tie, [True, False], by_math) is True
    assert majority_correct(tie[::-1], [False, True], by_math) is False
    assert majority_correct(["no answer"], [False], by_math) is False

    def never(pairs):
        raise AssertionError("the grader is not needed here")

    keys_decide = Voting(by_math.extract, by_math.key, never)
    five = ["\\boxed{7}", "\\boxed{7}", "\\boxed{7}", "\\boxed{1}", "\\boxed{2}"]
    assert majority_correct(five, [False] * 3 + [True, False], keys_decide) is False  # 3 > 1
    assert majority_correct(five, [True] * 3 + [False] * 2, keys_decide) is True  # 3 > 2 answers


@pytest.mark.parametrize(
    ("gold", "expected"),
    [
        ("\\frac{1}{2}", True),  # three right answers in three spellings outvote 3, 3
        ("3", False),  # the three spellings of one half are one wrong answer: 3 to 2
    ],
)
def test_majority_vote_groups_answers_the_grader_calls_equal(gold, expected):
    responses = [f"\\boxed{{{a}}}" for a in ("3", "3", "\\frac12", "0.5", "1/2")]
    correct = [grade_math(r, f"\\boxed{{{gold}}}") for r in responses]
    assert sum(correct) == (3 if expected else 2)  # the grader's verdicts, as opo eval has them
    assert majority_correct(responses, correct, VOTING["math"]) is expected


def graded(subject: str, level: int, correct: list[bool], answers: list[str]) -> Graded:
    n = len(correct)
    problem = Problem("p", "\\boxed{1}", {"subject": subject, "level": level})
    responses = [f"\\boxed{{{a}}}" for a in answers]
    return Graded(problem, responses, correct, [10] * n, [False] * n)


def test_summary_by_hand():
    results = [
        graded("Algebra", 3, [True, False, False, True], ["1", "2", "2", "1"]),
        graded("Algebra", 4, [False, False, False, False], ["2", "2", "3", "3"]),
        graded("Geometry", 3, [True, True, True, False], ["1", "1", "1", "7"]),
    ]
    out = summarise(results, (1, 2, 4), VOTING["math"])
    assert out["accuracy"] == pytest.approx((2 / 4 + 0 + 3 / 4) / 3)
    # pass@2 = 1 - C(n-c,2)/C(4,2): c=2 -> 1-1/6, c=0 -> 0, c=3 -> 1
    assert out["pass@2"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert out["pass@4"] == pytest.approx(2 / 3)
    # maj@2 votes on the first two: 1 vs 2 (tie, first: right), 2 (wrong), 1 (right)
    assert out["maj@2"] == pytest.approx(2 / 3)
    assert out["maj@4"] == pytest.approx(2 / 3)  # tie 1:2 -> 1 right; 2:3 tie -> wrong; 1 right
    assert out["by_subject"]["Algebra"] == {"n": 2, "accuracy": pytest.approx(0.25)}
    assert out["by_level"]["Level 3"] == {"n": 2, "accuracy": pytest.approx(0.625)}
    assert (out["n"], out["samples_per_problem"], out["response_len_mean"]) == (3, 4, 10)


def test_checkpoint_resolution(tmp_path):
    run = tmp_path / "run"
    steps = [run / "checkpoints" / f"step_{step}" for step in (2, 4, 10)]
    for folder in steps:  # complete checkpoints hold trainer_state.pt
        folder.mkdir(parents=True)
        (folder / "trainer_state.pt").write_bytes(b"")
    assert model_candidates(str(run)) == [str(steps[2]), str(steps[1]), str(steps[0])]
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    assert model_candidates(str(run)) == [str(run / "final"), *map(str, steps[::-1])]
    assert model_candidates(str(run / "final")) == [str(run / "final")]  # a model folder
    assert model_candidates("Qwen/Qwen3-1.7B") == ["Qwen/Qwen3-1.7B"]  # a hub id
    with pytest.raises(UserError, match="no such folder"):
        model_candidates(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run folder"):
        model_candidates(str(tmp_path / "empty"))


@pytest.fixture(scope="module")
def math_run(tmp_path_factory) -> Path:
    """A one-step tiny-model run on MATH Level 3 (its tokenizer trained on the problems)."""
    tmp = tmp_path_factory.mktemp("math_run")
    with (MATH_DIR / "train.jsonl").open() as f:  # 300 rows, ~70 at Level 3: a quick tokenizer
        (tmp / "train.jsonl").write_text("".join(itertools.islice(f, 300)))
    cfg = compose_cfg(
        "train",
        "dataset=math_l3",
        f"dataset.path={tmp / 'train.jsonl'}",
        "dataset.eval_size=8",
        "trainer.steps=1",
        f"model.cache_dir={tmp / 'cache'}",
        *TINY,
    )
    train(cfg, tmp / "run")
    return tmp / "run"


@needs_math
def test_opo_eval_writes_eval_json_for_a_run_folder(math_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [f"checkpoint={math_run}", "dataset=math_l3", f"dataset.path={MATH_DIR / 'test.jsonl'}"]
    args += ["eval.limit=8", "eval.max_new_tokens=4", "eval.batch_size=3"]
    monkeypatch.setattr(sys, "argv", ["opo", "eval", *args])
    cli.main()
    (found,) = (tmp_path / "outputs" / "eval").rglob("eval.json")
    result = json.loads(found.read_text())
    samples = [
        json.loads(line) for line in (found.parent / "samples.jsonl").read_text().splitlines()
    ]
    assert result["n"] == 8 and len(samples) == 8
    assert result["accuracy"] == sum(s["correct"] for s in samples) / 8
    assert result["checkpoint"] == str(math_run / "final")
    assert result["by_level"] == {"Level 3": {"n": 8, "accuracy": result["accuracy"]}}
    assert sum(row["n"] for row in result["by_subject"].values()) == 8
    assert (result["split"], result["split_size"]) == (str(MATH_DIR / "test.jsonl"), 1131)
    assert len({row["problem"] for row in samples}) == 8  # 8 of the 1,131 Level 3 test problems
    assert result["sample"] == "stratified by subject and level, seed 0 (dataset.split_seed)"
    # the file's first 8 Level 3 rows are all Algebra; shares of 8 by subject (261, 100, 102,
    # 195, 122, 224, 127 of 1,131): 1.85 0.71 0.72 1.38 0.86 1.58 0.90 -> integer parts 1, 0,
    # 0, 1, 0, 1, 0, and the 5 largest remainders (.90 .86 .85 .72 .71) one more each
    expected = [2, 1, 1, 1, 1, 1, 1]
    assert [result["by_subject"][s]["n"] for s in LEVEL3_SUBJECTS] == expected
    assert "accuracy" in capsys.readouterr().err


@needs_math
def test_sampled_eval_reports_pass_at_k_and_maj_at_k(math_run, tmp_path):
    cfg = compose_cfg(
        "eval",
        f"checkpoint={math_run}",
        f"dataset.path={MATH_DIR / 'test.jsonl'}",
        "eval.limit=3",
        "eval.n=3",
        "eval.ks=[1,2,3]",
        "eval.max_new_tokens=4",
    )
    result = evaluate(cfg, tmp_path / "eval")
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").open()]
    assert len(rows) == 9
    correct = [sum(r["correct"] for r in rows if r["index"] == i) for i in range(3)]
    assert result["pass@1"] == pytest.approx(sum(c / 3 for c in correct) / 3)
    expected = sum(1 - math.comb(3 - c, 2) / math.comb(3, 2) for c in correct) / 3
    assert result["pass@2"] == pytest.approx(expected)
    assert {"maj@1", "maj@2", "maj@3"} <= result.keys()
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["n"] == 3


def test_a_missing_checkpoint_is_one_user_error(tmp_path):
    cfg = compose_cfg("eval", f"checkpoint={tmp_path / 'nope'}", "dataset=arith")
    with pytest.raises(UserError, match=r"checkpoint=.*nope: no such folder"):
        evaluate(cfg, tmp_path / "eval")
    with pytest.raises(UserError, match="checkpoint= is required"):
        evaluate(compose_cfg("eval", "dataset=arith"), tmp_path / "eval")
    with pytest.raises(C.ConfigError, match=r"eval\.ks=\[1, 4\] is not allowed"):
        C.validate_eval(compose_cfg("eval", "eval.n=2", "eval.ks=[1,4]"))


def test_a_damaged_final_model_is_skipped_for_the_newest_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    train(compose_cfg("train", "trainer.steps=2", f"model.cache_dir={tmp_path}", *TINY), run)
    weights = run / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut off mid-write
    cfg = compose_cfg("eval", f"checkpoint={run}", "dataset=arith", "eval.limit=4")
    result = evaluate(cfg, tmp_path / "eval")
    assert result["checkpoint"] == str(run / "checkpoints" / "step_2")
    assert f"skipping damaged checkpoint {run / 'final'}" in capsys.readouterr().err


def test_eval_every_adds_eval_metrics_to_the_training_rows(tmp_path):
    cfg = compose_cfg(
        "train",
        "trainer.steps=2",
        "eval.every=2",
        "eval.limit=5",
        f"model.cache_dir={tmp_path / 'cache'}",
        *TINY,
    )
    train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2]
    assert "eval/accuracy" not in rows[0]  # every 2 steps: step 2 only
    assert 0.0 <= rows[1]["eval/accuracy"] <= 1.0
    assert rows[1]["eval/accuracy"] * 5 == round(rows[1]["eval/accuracy"] * 5)  # k of 5 right
    assert 1 <= rows[1]["eval/response_len_mean"] <= 4


def test_opo_eval_on_arith_measures_the_held_out_problems_only(tmp_path):
    run = tmp_path / "run"
    train(compose_cfg("train", "trainer.steps=1", f"model.cache_dir={tmp_path}", *TINY), run)
    cfg = compose_cfg("eval", f"checkpoint={run}", "dataset=arith", "eval.max_new_tokens=2")
    result = evaluate(cfg, tmp_path / "eval")
    # arith: 20 x 20 sums, 40 held out (dataset.eval_size), the other 360 trained on
    assert (result["split"], result["split_size"], result["n"]) == ("held_out", 40, 40)
    assert result["sample"] == "all"
    train_set, held_out = load_problems(cfg.dataset)
    assert len(train_set) == 360
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").open()]
    assert sorted(r["problem"] for r in rows) == sorted(p.prompt for p in held_out)
    limited = evaluate(
        compose_cfg(
            "eval", f"checkpoint={run}", "dataset=arith", "eval.max_new_tokens=2", "eval.limit=5"
        ),
        tmp_path / "eval5",
    )
    assert (limited["split_size"], limited["n"]) == (40, 5)
    assert limited["sample"].startswith("stratified by subject and level, seed 0")


def test_eval_every_without_held_out_problems_is_refused_before_training(tmp_path):
    cfg = compose_cfg(
        "train",
        "trainer.steps=3",
        "eval.every=2",
        "dataset.eval_size=0",
        f"model.cache_dir={tmp_path / 'cache'}",
        *TINY,
    )
    with pytest.raises(UserError, match=r"eval\.every=2 needs held-out problems"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not one step was trained
