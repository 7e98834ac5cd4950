"""Completion logs (issue 19): the drive each loss gives a completion, the rows and their
fields, JSONL that survives any text, resume-safety, the W&B table, the report page."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from opo_cli import train as T
from opo_cli.completions import (
    COMPLETIONS_FILE,
    EVAL_COMPLETIONS_FILE,
    PromptMatcher,
    RowsFile,
    clean_text,
    drives,
    flat_row,
    json_line,
    one_line,
    read_rows,
    rollout_rows,
    sample_line,
)
from opo_cli.config import ConfigError, validate_train
from opo_cli.data import Problem, PromptSampler
from opo_cli.losses import DRIVES, LOSSES
from opo_cli.report import report
from opo_cli.rollout import Rollout
from tests.conftest import compose_config, compose_train

# ------------------------------------------------------------------------------ drives


def test_every_loss_has_a_drive():
    assert DRIVES.keys() == LOSSES.keys()


def hand_rollout(rewards, texts=None, *, G=4, parts=None, extras=None, truncated=None):
    """N rows: a 2-token prompt, completions of 3 tokens (row i holds i % 3 + 1 of them)."""
    n = len(rewards)
    lengths = torch.tensor([i % 3 + 1 for i in range(n)])  # (N,)
    completion_mask = (torch.arange(3) < lengths[:, None]).float()  # (N, 3)
    prompt_ids = torch.tensor([[7, 8]] * n)  # (N, 2)
    return Rollout(
        input_ids=torch.cat([prompt_ids, torch.full((n, 3), 5)], 1),  # (N, 5)
        attention_mask=torch.cat([torch.ones(n, 2), completion_mask], 1).long(),  # (N, 5)
        completion_mask=completion_mask,
        truncated=torch.tensor(truncated or [False] * n),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        texts=texts or [f"answer {i}" for i in range(n)],
        group_size=G,
        reward_parts=parts,
        reward_extras=extras,
    )


REWARDS = [1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5]  # one informative group, one uniform


def test_opo_logs_its_escort_drive_g():
    # group 1: A = R - mean = [3/4, -1/4, -1/4, -1/4]; w = exp((1 - alpha) A); g = w - mean w
    a = 1 - 0.6
    w = [math.exp(a * 0.75)] + [math.exp(-a * 0.25)] * 3
    g = [x - sum(w) / 4 for x in w]
    label, values = drives(hand_rollout(REWARDS), "opo", {"alpha": 0.6, "mu": 1.0, "ratio": "log"})
    assert label == "g"
    assert values == pytest.approx(g + [0.0] * 4, abs=1e-6)


@pytest.mark.parametrize("loss", ["grpo", "dapo", "gspo"])
def test_grpo_family_logs_the_normalised_advantage(loss):
    # mean 1/4, Bessel std sqrt((9/16 + 3/16) / 3) = 1/2: A = (R - 1/4) / (1/2 + 1e-4)
    expected = [0.75 / 0.5001] + [-0.25 / 0.5001] * 3 + [0.0] * 4
    label, values = drives(hand_rollout(REWARDS), loss, {"clip_low": 0.2, "clip_high": 0.2})
    assert label == "A"
    assert values == pytest.approx(expected, abs=1e-5)


def test_dpo_logs_each_rows_part_in_its_pair():
    # group 1: chosen = first argmax (row 0), rejected = first argmin (row 1); group 2: no pair
    label, values = drives(hand_rollout(REWARDS), "dpo", {"beta": 0.1})
    assert label == "pair"
    assert values == [1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_opo_code_logs_the_authors_advantage():
    label, values = drives(
        hand_rollout(REWARDS), "opo_code", {"alpha": 0.25, "mu": 0.5, "scale_rewards": False}
    )
    assert label == "A"
    assert values == pytest.approx([0.75, -0.25, -0.25, -0.25] + [0.0] * 4)


# ------------------------------------------------------------------------------ rows


def test_rows_carry_every_field_of_the_logged_groups():
    parts = [{"correct": r, "format": 0.5} for r in REWARDS]
    extras = [{"answer": str(i)} for i in range(8)]
    truncated = [False, False, True, False, False, False, False, False]
    rollout = hand_rollout(REWARDS, parts=parts, extras=extras, truncated=truncated)
    rollout.completion_mask[2] = 0.0  # mask_truncated: out of the loss, still 3 tokens long
    drive = ("g", [0.1 * i for i in range(8)])
    problems = [Problem("1+2=", "3")]
    rows = rollout_rows(7, rollout, 1, problems, drive)  # the first group only
    assert len(rows) == 4
    assert rows[2] == {
        "step": 7,
        "group": 0,
        "prompt": "1+2=",
        "gold": "3",
        "completion": "answer 2",
        "reward": 0.0,
        "reward_parts": {"correct": 0.0, "format": 0.5},
        "advantage": pytest.approx(0.2),
        "advantage_of": "g",
        "tokens": 3,
        "truncated": True,
        "extras": {"answer": "2"},
    }
    assert [r["tokens"] for r in rows] == [1, 2, 3, 1]


def test_rows_without_parts_or_extras_leave_them_out():
    rows = rollout_rows(1, hand_rollout(REWARDS), 5, [Problem("p", "g")] * 2, ("A", [0.0] * 8))
    assert len(rows) == 8  # 5 groups asked, 2 in the rollout
    assert not {"reward_parts", "extras"} & set().union(*rows)


def test_a_math_gold_shows_its_boxed_answer():
    solution = "We add. So the answer is $\\boxed{\\frac{1}{2}}$."
    rows = rollout_rows(1, hand_rollout(REWARDS[:4]), 1, [Problem("p", solution)], ("A", [0.0] * 4))
    assert rows[0]["gold"] == "\\frac{1}{2}"


# ------------------------------------------------------------------------------ any text


NASTY = [
    "a\x00b\x07\x1b[31mred\x1b[0m\r\n\t\x7f\x85\u2028end",  # control characters, ANSI codes
    "\ud800 lone surrogate",  # what a broken decode can leave
    bytes([0x31, 0xFF, 0xFE, 0xE2, 0x82]).decode("utf-8", "replace"),  # invalid UTF-8 bytes
    "\ud83d\ude00 a surrogate pair",
    "x" * 300_000 + "\n" + "y" * 300_000,  # a very long line
    '"quotes" \\ backslash } {',
]


def test_any_completion_text_stays_one_valid_ascii_jsonl_row(tmp_path):
    rollout = hand_rollout([1.0, 0.0, 0.0, 0.0, 0.0, 1.0], NASTY, G=2)
    rollout.rewards[1] = float("nan")
    rows = rollout_rows(3, rollout, 3, [Problem("\x00p\ud800", "g")] * 3, ("g", [0.0] * 6))
    path = tmp_path / COMPLETIONS_FILE
    f = RowsFile(path, keep_until_step=0)
    f.write(rows)
    f.close()
    data = path.read_bytes()
    data.decode("ascii")  # raises if any byte is not ASCII
    lines = data.split(b"\n")
    assert lines[-1] == b"" and len(lines) == len(NASTY) + 1  # one line per row, no stray breaks
    back = [json.loads(line) for line in lines[:-1]]
    assert [r["completion"] for r in back] == [clean_text(t) for t in NASTY]
    assert back[1]["completion"] == "\ufffd lone surrogate"
    assert back[3]["completion"] == "\U0001f600 a surrogate pair"
    assert back[4]["completion"] == NASTY[4]  # stored whole
    assert back[0]["prompt"] == "\x00p\ufffd"
    assert back[1]["reward"] == "nan"  # NaN is not JSON: stored as a string
    for text in NASTY:
        line = one_line(text, 80)
        assert len(line) <= 80 and line.isprintable()  # cut, escaped: one console line


def test_sample_line_is_one_cut_line():
    row = {"reward": 1.0, "advantage": 0.409, "advantage_of": "g", "completion": "a\nb" * 100}
    line = sample_line(row, 60)
    assert line.startswith("  sample  reward 1  g +0.409  a\\nb")
    assert len(line) <= 60 and line.isprintable()


def test_json_line_of_odd_extras():
    row = {"extras": {"t": torch.tensor(2.5), "tuple": (1, float("inf")), "obj": object}}
    back = json.loads(json_line(row))
    assert back["extras"]["t"] == 2.5 and back["extras"]["tuple"] == [1, "inf"]
    assert back["extras"]["obj"] == "<class 'object'>"


# ------------------------------------------------------------------------------ resume


def test_rows_after_the_resumed_checkpoint_are_dropped(tmp_path):
    path = tmp_path / COMPLETIONS_FILE
    f = RowsFile(path, keep_until_step=0)
    f.write([{"step": s, "completion": f"c{s}.{i}"} for s in (1, 2, 3, 4) for i in range(2)])
    f.close()
    with path.open("a") as cut:
        cut.write('{"step": 5, "completion": "cut off by a cra')  # a crash mid-write
    f = RowsFile(path, keep_until_step=2)
    f.write([{"step": 3, "completion": "again"}])
    f.close()
    assert [(r["step"], r["completion"]) for r in read_rows(path)] == [
        (1, "c1.0"),
        (1, "c1.1"),
        (2, "c2.0"),
        (2, "c2.1"),
        (3, "again"),
    ]


def test_sampler_replays_what_it_drew_across_an_epoch():
    sampler = PromptSampler(5, seed=3)
    sampler.next(3)
    before = sampler.state_dict()
    drawn = sampler.next(4)  # crosses into the second epoch
    assert sampler.drawn_since(before) == drawn
    assert sampler.drawn_since(sampler.state_dict()) == []


def test_groups_are_matched_to_the_problems_drawn_for_them(model_and_tok):
    """Dynamic sampling keeps some drawn groups and drops others: each kept group is found by
    its prompt's tokens among the problems drawn since the previous step."""
    _, tok = model_and_tok
    problems = [Problem(f"{a}+{a}=", str(2 * a)) for a in range(10)]
    sampler = PromptSampler(len(problems), seed=0)
    matcher = PromptMatcher(problems, sampler, tok)
    drawn = sampler.next(4)  # the step draws 4 prompts and keeps the 2nd and the 4th
    kept = [problems[drawn[1]], problems[drawn[3]]]
    enc = tok([p.prompt for p in kept], return_tensors="pt", padding=True)
    rollout = hand_rollout([0.0] * 4, G=2)
    rollout.input_ids = torch.cat(
        [enc.input_ids.repeat_interleave(2, 0), torch.full((4, 3), 5)], 1
    )  # (4, Lp + 3) left-padded prompts, then completions
    rollout.attention_mask = torch.cat(
        [enc.attention_mask.repeat_interleave(2, 0), rollout.completion_mask.long()], 1
    )
    assert matcher.find(rollout, 2) == kept
    matcher.step_done()
    sampler.next(2)  # the next step draws others: the old prompts are no longer found
    unknown = matcher.find(rollout, 1)[0]
    assert unknown.answer is None and unknown.prompt.replace(" ", "") == kept[0].prompt


# ------------------------------------------------------------------------------ settings


def test_defaults_and_show_completion_needs_logged_steps(tiny_cache):
    cfg = compose_train([], tiny_cache)
    assert (cfg.tracking.completions_every, cfg.tracking.completions_per_step) == (10, 2)
    assert cfg.tracking.show_completion is False
    bad = compose_train(
        ["tracking.show_completion=true", "tracking.completions_every=0"], tiny_cache
    )
    with pytest.raises(ConfigError, match=r"tracking\.show_completion"):
        validate_train(bad)
    with pytest.raises(ConfigError, match=r"tracking\.completions_every"):
        validate_train(compose_train(["tracking.completions_every=-1"], tiny_cache))


# ------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def default_run(tiny_cache, tmp_path_factory, monkeypatch_module) -> Path:
    """10 tiny steps at the default tracking settings, W&B offline, one evaluation."""
    monkeypatch_module.setenv("WANDB_MODE", "offline")
    monkeypatch_module.setenv("WANDB_SILENT", "true")
    run = tmp_path_factory.mktemp("default") / "run"
    overrides = ["trainer.steps=10", "trainer.save_every=0", "eval.every=10", "eval.limit=6"]
    overrides += ["logger=wandb"]
    overrides += ["tracking.show_completion=true"]
    T.train(compose_train(overrides, tiny_cache), run)
    return run


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


FIELDS = {"step", "group", "prompt", "gold", "completion", "reward", "advantage", "advantage_of"}
FIELDS |= {"tokens", "truncated"}


def test_a_default_run_logs_its_completions(default_run):
    rows = read_rows(default_run / COMPLETIONS_FILE)
    assert len(rows) == 2 * 4  # step 10 only: 2 groups of G = 4
    assert all(set(r) == FIELDS | {"reward_parts"} and r["step"] == 10 for r in rows)
    for r in rows:
        a, b = r["prompt"].rstrip("=").split("+")
        assert r["gold"] == str(int(a) + int(b))  # the problem the group was drawn for
        assert 1 <= r["tokens"] <= 4 and (r["tokens"] == 4 or not r["truncated"])
        assert r["reward"] == float(r["completion"].strip() == r["gold"])
        assert r["reward_parts"]["correct"] == r["reward"]  # arith: the reward is correctness
    for k in (0, 1):  # the drive OPO's loss used: g from the group's rewards
        group = [r for r in rows if r["group"] == k]
        assert len({r["prompt"] for r in group}) == 1
        _, g = drives(hand_rollout([r["reward"] for r in group]), "opo", {"alpha": 0.6})
        assert [r["advantage"] for r in group] == pytest.approx(g, abs=1e-6)


def test_a_default_run_logs_eval_answers(default_run):
    rows = read_rows(default_run / EVAL_COMPLETIONS_FILE)
    assert len(rows) == 4 and {r["step"] for r in rows} == {10}
    for r in rows:
        assert set(r) == {"step", "prompt", "gold", "completion", "correct", "tokens", "truncated"}
        assert r["correct"] == (r["completion"].strip() == r["gold"])


def test_wandb_offline_holds_the_tables(default_run):
    tables = {}
    for kind in ("train", "eval"):
        files = list((default_run / "wandb").glob(f"offline-run-*/files/media/table/{kind}/*.json"))
        assert len(files) == 1, kind
        tables[kind] = json.loads(files[0].read_text())
    train = tables["train"]
    assert set(train["columns"]) == FIELDS | {"reward/exact_match", "reward/correct"}
    logged = [flat_row(r) for r in read_rows(default_run / COMPLETIONS_FILE)]
    assert [dict(zip(train["columns"], row, strict=True)) for row in train["data"]] == logged
    assert len(tables["eval"]["data"]) == 4


def test_resume_keeps_one_copy_of_each_logged_step(tiny_cache, tmp_path):
    cfg = compose_train(
        ["trainer.steps=4", "trainer.save_every=2", "tracking.completions_every=1"], tiny_cache
    )
    reference = tmp_path / "reference"
    T.train(cfg, reference)
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / "step_4")
    shutil.rmtree(run / "final")
    T.train(cfg, run)  # resumes at step 2, runs 3 and 4 again
    rows = read_rows(run / COMPLETIONS_FILE)
    assert [r["step"] for r in rows] == [s for s in (1, 2, 3, 4) for _ in range(2 * 4)]
    assert rows == read_rows(reference / COMPLETIONS_FILE)  # resuming is deterministic


def test_report_adds_a_samples_page_per_run(tmp_path):
    run = tmp_path / "sweep" / "alpha=0.3"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "train/reward_mean": 0.5}) + "\n" for s in (1, 2))
    )
    old = {"step": 1, "group": 0, "prompt": "old", "gold": "1", "completion": "old one"}
    nasty = "see ```code``` \x1b[2J and\nmore"
    new = {"step": 2, "group": 0, "prompt": "2+2=", "gold": "4", "completion": nasty}
    new |= {"reward": 1.0, "reward_parts": {"correct": 1.0, "format": 0.5}, "advantage": 0.25}
    new |= {"advantage_of": "g", "tokens": 9, "truncated": True, "extras": {"answer": "4"}}
    f = RowsFile(run / COMPLETIONS_FILE, keep_until_step=0)
    f.write([old | {"reward": 0.0, "advantage": 0.0, "advantage_of": "g", "tokens": 2}, new])
    f.close()
    answer = {"step": 2, "prompt": "1+1=", "gold": "2", "completion": "3", "correct": False}
    f = RowsFile(run / EVAL_COMPLETIONS_FILE, keep_until_step=0)
    f.write([answer | {"tokens": 2, "truncated": False}])
    f.close()
    out = report(compose_config("report", [f"paths=['{tmp_path / 'sweep'}']"]))
    page = (out / "samples" / "alpha=0.3.md").read_text()
    assert "old one" not in page  # only the last logged step's groups
    assert "2+2=" in page and "gold: `4`" in page
    assert (
        '**1.** reward 1 (correct 1, format 0.5) · g 0.25 · 9 tokens, truncated · answer: "4"'
        in page
    )
    assert (
        "````text\nsee ```code``` \\x1b[2J and\nmore\n````" in page
    )  # fence the text cannot close
    assert "## Evaluation at step 2" in page and "wrong" in page
    assert "[samples/alpha=0.3.md](samples/alpha=0.3.md)" in (out / "summary.md").read_text()
