"""Rewards by name or import path, composed with weights; the paper's shaping; GSM8K's numbers.

Expected values are derived by hand in each test; the paper's shaped reward is checked
against a transcription of its author's scoring function (verl `math_adpo.py`).
"""

from __future__ import annotations

import math
import textwrap
import time

import pytest
from omegaconf import OmegaConf

from opo_cli.config import CONF_DIR
from opo_cli.rewards import (
    RewardError,
    build_reward,
    gsm8k_gold,
    gsm8k_number,
    length_bonus,
    repeated_share,
    repetition_penalty,
    score_gsm8k,
)
from opo_cli.rewards.answers import extract_boxed


def dataset(reward, **extra):
    """A dataset config of the reward keys only, as conf/dataset/shared/reward.yaml sets them."""
    base = OmegaConf.load(CONF_DIR / "dataset" / "shared" / "reward.yaml")
    return OmegaConf.merge(base, {"reward": reward, **extra})


# ------------------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
    ("response", "gold", "right"),
    [
        ("3 + 5 = 8 so the answer is 8", "... #### 8", True),
        ("she pays $1,200.00 in all.", "#### 1200", True),  # commas, $ and .00 do not count
        ("the total is 1200.0 dollars", "#### 1,200", True),
        ("first 12, then 7 apples", "#### 12", False),  # the last number counts
        (r"so \boxed{12} (not 7)", "#### 12", True),  # ... unless a box says otherwise
        (r"\boxed{\$18 \text{ dollars}}", "#### 18", True),
        ("-5 degrees", "#### -5", True),
        ("no number here", "#### 0", False),
        ("0.5", "#### .5", True),
        ("12", "#### 120", False),
    ],
)
def test_gsm8k_numeric_match(response, gold, right):
    assert score_gsm8k([response], [gold]) == [float(right)]


def test_gsm8k_refuses_batches_of_different_lengths():
    with pytest.raises(ValueError, match=r"^2 responses but 1 gold answers$"):
        score_gsm8k(["1", "2"], ["#### 1"])
    with pytest.raises(ValueError, match=r"^1 responses but 2 gold answers$"):
        score_gsm8k(["1"], ["#### 1", "#### 2"])


def test_gsm8k_reads_the_gold_after_the_marks_and_a_bare_gold_as_it_stands():
    assert gsm8k_gold("Ann has 3 + 5 = <<3+5=8>>8 apples.\n#### 8") == "8"
    assert gsm8k_gold("42") == "42"
    assert gsm8k_number(r"\boxed{}") == gsm8k_number("") is None
    assert extract_boxed(r"\boxed{7}") == "7"
    # what follows the marks is the answer, never the last number of the working
    assert gsm8k_gold("3 + 5 = <<3+5=8>>8 apples.\n#### eight") is None


def test_gsm8k_numbers_in_one_plain_form():
    # no commas, no trailing zeros, no exponent, one zero: the form two equal numbers share
    assert gsm8k_number("... so she pays $1,200.00.") == "1200"
    assert gsm8k_gold("#### 1200") == "1200"
    assert gsm8k_number("about 12.50 each") == "12.5"
    assert gsm8k_number("0.5") == gsm8k_number(".50") == "0.5"
    assert gsm8k_number("0") == gsm8k_number("-0.0") == gsm8k_number("0.000") == "0"
    assert gsm8k_number("-7.25") == "-7.25"


# ------------------------------------------------------------------------------ the shaping


def author_score(text: str, right: bool) -> float:
    """The paper author's `compute_adpo_score` with its defaults, the grader's verdict given."""
    if right:
        return 1.0
    length = min(len(text) / 2000.0, 0.1)
    words = text.lower().split()
    scaling = 0.0
    if len(words) >= 3:
        grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        scaling = 1.0 - len(set(grams)) / len(grams)
    if scaling > 0.3:
        return -0.5
    return length + scaling * -0.5 * 0.5


TEXTS = [
    "",  # no words: no repetition, no length
    "the answer is 7",  # 2 distinct 3-grams of 2: no repetition
    "a b c a b c",  # 3-grams abc bca cab abc: 1 - 3/4 = 0.25 repeated
    "go go go go go go",  # 4 3-grams, 1 distinct: 0.75 repeated, past 0.3
    "x " * 300 + "end",  # long and repetitive
    " ".join(f"w{i}" for i in range(700)),  # 4,000+ characters: the bonus is capped at 0.1
]


def test_repeated_share_by_hand():
    assert [repeated_share(t, 3) for t in TEXTS[:4]] == [0.0, 0.0, 0.25, 0.75]


@pytest.mark.parametrize("right", [True, False])
def test_math_plus_shaping_is_the_authors_score(right):
    n = len(TEXTS)
    correct = [right] * n
    bonus = length_bonus(TEXTS, [""] * n, correct=correct)
    penalty = repetition_penalty(TEXTS, [""] * n, correct=correct)
    total = [float(right) + b + p for b, p in zip(bonus, penalty, strict=True)]
    assert total == pytest.approx([author_score(t, right) for t in TEXTS], abs=1e-12)
    assert all(0.0 <= b <= 0.1 for b in bonus) and all(-0.5 <= p <= 0.0 for p in penalty)
    if not right:  # "a b c a b c": 11 chars / 2000 bonus, -0.25 * 0.25 penalty
        assert bonus[2] == pytest.approx(11 / 2000) and penalty[2] == pytest.approx(-0.0625)
        assert bonus[3] == 0.0 and penalty[3] == -0.5 and bonus[5] == 0.1


def test_composed_paper_reward_logs_each_part_and_correctness_apart():
    reward = build_reward(dataset(["exact_match", "length_bonus", "repetition_penalty"]))
    scores = reward(["7", "go go go go go go"], ["7", "7"])
    assert scores.total == pytest.approx([1.0, -0.5])
    assert scores.parts == [
        {"exact_match": 1.0, "length_bonus": 0.0, "repetition_penalty": 0.0, "correct": 1.0},
        {"exact_match": 0.0, "length_bonus": 0.0, "repetition_penalty": -0.5, "correct": 0.0},
    ]
    assert scores.extras is None and reward.correctness == "exact_match"


# ----------------------------------------------------------------------- import paths, weights


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(
        textwrap.dedent(
            """
            import time

            def brevity(responses, answers, **columns):
                return [1.0 / (1 + len(r)) for r in responses]

            def by_level(responses, answers, level):
                return [float(lv) for lv in level]

            def with_extras(responses, answers):
                return [{"reward": 0.5, "why": r[:3]} for r in responses]

            def scaled(responses, answers, *, factor=1.0):
                return [factor] * len(responses)

            def raises(responses, answers):
                raise ValueError("bad thing")

            def too_few(responses, answers):
                return [0.0]

            def nan(responses, answers):
                return [float("nan")] * len(responses)

            def text(responses, answers):
                return ["1"] * len(responses)

            def no_reward_key(responses, answers):
                return [{"score": 1.0}] * len(responses)

            def scalar(responses, answers):
                return 1.0

            def hangs(responses, answers):
                time.sleep(30)

            not_a_function = 3
            """
        )
    )
    return path


def test_weighted_sum_of_parts_from_a_file_with_columns_and_extras(reward_file):
    specs = [f"{reward_file}:brevity", f"{reward_file}:by_level", f"{reward_file}:with_extras"]
    reward = build_reward(dataset(specs, reward_weights=[2.0, 0.5, -1.0]))
    scores = reward(["abc", ""], ["x", "y"], {"level": [3, 1], "subject": ["a", "b"]})
    # brevity 1/4 and 1; level 3 and 1; extras 0.5 each: 2 x brevity + 0.5 x level - 0.5
    assert scores.total == pytest.approx([2 * 0.25 + 1.5 - 0.5, 2 * 1.0 + 0.5 - 0.5])
    assert scores.parts[0] == {"brevity": 0.25, "by_level": 3.0, "with_extras": 0.5}
    assert scores.extras == [{"why": "abc"}, {"why": ""}]
    assert reward.correctness is None


def test_a_module_path_and_reward_kwargs(reward_file, monkeypatch):
    monkeypatch.syspath_prepend(str(reward_file.parent))
    cfg = dataset("my_reward:scaled", reward_kwargs={"scaled": {"factor": 0.25}})
    assert build_reward(cfg)(["a", "b"], ["a", "b"]).total == [0.25, 0.25]


BAD = [  # (reward, what the one line says)
    ("no_such_reward", "reward 'no_such_reward': unknown; use a registered name"),
    ("no_such_module_xyz:fn", "cannot import no_such_module_xyz (ModuleNotFoundError"),
    ("missing/file.py:fn", "no such file missing/file.py"),
    ("{file}:absent", "has no function 'absent'"),
    ("{file}:not_a_function", "is a int, not a function"),
    ("{file}:raises", "raised ValueError: bad thing, at my_reward.py:"),
    ("{file}:too_few", "returned 1 values for 4 responses"),
    ("{file}:nan", "returned nan for response 0: not a finite number"),
    ("{file}:text", "returned '1' for response 0: not a finite number"),
    ("{file}:no_reward_key", "returned a dict without 'reward'"),
    ("{file}:scalar", "returned a float, not a list of 4"),
    ("repetition_penalty", "needs each answer's correctness"),
]


@pytest.mark.parametrize(("spec", "message"), BAD, ids=[b[0] for b in BAD])
def test_every_bad_reward_is_one_line_naming_it(reward_file, spec, message):
    spec = spec.replace("{file}", str(reward_file))
    with pytest.raises(RewardError) as e:
        build_reward(dataset(spec)).probe(["a", "b"], {})  # each gold, then empty: 4 responses
    assert f"reward '{spec}'" in str(e.value) and message in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_a_file_that_fails_to_import_is_one_line(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import no_such_package_xyz\n")
    with pytest.raises(RewardError, match=r"broken.py failed to import \(ModuleNotFoundError"):
        build_reward(dataset(f"{bad}:fn"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"reward_weights": [1.0, 2.0]}, "dataset.reward_weights=[1.0, 2.0] is not allowed"),
        ({"reward_kwargs": {"exact_match": {"nope": 1}}}, "reward_kwargs.exact_match.nope"),
        ({"reward_timeout_s": 0}, "dataset.reward_timeout_s=0 is not allowed"),
    ],
)
def test_bad_reward_settings_are_refused(extra, message):
    with pytest.raises(RewardError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_reward(dataset("exact_match", **extra))


def test_a_part_listed_twice_is_refused():
    with pytest.raises(RewardError, match="a second part named 'math'"):
        build_reward(dataset(["math", "math"]))


def test_a_hanging_reward_stops_at_the_timeout(reward_file):
    reward = build_reward(dataset(f"{reward_file}:hangs", reward_timeout_s=0.5))
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"gave no result within dataset.reward_timeout_s=0.5 s"):
        reward(["a"], ["a"])
    assert time.monotonic() - t0 < 5


def test_the_total_is_finite_and_a_float(reward_file):
    scores = build_reward(dataset("exact_match"))(["1", "2"], ["1", "1"])
    assert scores.total == [1.0, 0.0] and all(math.isfinite(v) for v in scores.total)


# ------------------------------------------------------------------ parts on the Rollout


def scored_rollout(lengths: list[int], width: int):
    """A rollout of completions of the given lengths, scored by exact_match + length_bonus."""
    import torch

    from opo_cli.rollout import Rollout, score_rollout

    n = len(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()  # (N, Lc)
    rollout = Rollout(
        input_ids=torch.zeros(n, width, dtype=torch.long),
        attention_mask=mask.long(),
        completion_mask=mask,
        truncated=torch.tensor([length == width for length in lengths]),
        rewards=torch.zeros(n),
        texts=["7", "8", "8", "7"][:n],
        group_size=2,
    )
    reward = build_reward(dataset(["exact_match", "length_bonus"]))
    return score_rollout(rollout, ["7"] * n, reward, {"level": [1] * n})


def test_score_rollout_fills_the_parts_and_the_metrics_average_them():
    from opo_cli.rollout import rollout_metrics

    r = scored_rollout([1, 2, 3, 4], width=4)
    # right, wrong "8" (1 char: bonus 1/2000), wrong, right
    assert r.rewards.tolist() == pytest.approx([1.0, 0.0005, 0.0005, 1.0])
    assert [p["correct"] for p in r.reward_parts] == [1.0, 0.0, 0.0, 1.0]
    assert r.reward_extras is None
    m = rollout_metrics(r)
    assert m["reward/correct"] == m["reward/exact_match"] == 0.5
    assert m["reward/length_bonus"] == pytest.approx(0.0005 / 2)
    assert m["train/reward_mean"] == pytest.approx(0.50025)
    picked = r.rows(__import__("torch").tensor([2, 3]))
    assert picked.reward_parts == r.reward_parts[2:]


def test_dapo_overlong_shaping_is_the_part_overlong():
    from opo_cli.rollout import shape_overlong

    r = scored_rollout([1, 2, 3, 4], width=4)
    # L = 4, B = 2: no penalty up to 2 tokens, -1/2 at 3, -1 at 4
    shaped = shape_overlong(r, max_len=4, buffer=2)
    assert [p["overlong"] for p in shaped.reward_parts] == [0.0, 0.0, -0.5, -1.0]
    assert (shaped.rewards - r.rewards).tolist() == [0.0, 0.0, -0.5, -1.0]
    assert "overlong" not in shape_overlong(r, max_len=4, buffer=0).reward_parts[0]
