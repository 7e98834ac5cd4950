"""Rewards a user meets without the MATH data: the arithmetic task's exact match, the answer
key that maj@k votes with, repeating decimals and vectors written as tuples. Expected values
are the mathematical truth, worked out by hand. Run: pytest tests/test_rewards.py -q
"""

from __future__ import annotations

import pytest

from opo_cli.rewards import answer_key, extract_boxed, get_reward, grade_math, score_exact_match


def boxed(answer: str) -> str:
    return f"so the answer is $\\boxed{{{answer}}}$."


# ---------------------------------------------------------------- the arithmetic task


def test_exact_match_rewards_the_right_sum_only():
    # the arith dataset's reward: the completion, stripped of white space, is the answer
    responses = ["12", " 12\n", "13", "", "1 2", "120"]
    assert score_exact_match(responses, ["12"] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert score_exact_match(["7"], [" 7 "]) == [1.0]


def test_rewards_by_name():
    assert get_reward("exact_match")(["3", "4"], ["3", "3"]) == [1.0, 0.0]
    with pytest.raises(
        KeyError,
        match="unknown reward 'f1'; valid: exact_match, gsm8k, length_bonus, math, repetition_pen",
    ):
        get_reward("f1")
    with pytest.raises(ValueError, match="2 responses but 1 gold answers"):
        get_reward("math")(["a", "b"], ["c"])


# ---------------------------------------------------------------- the answer key of maj@k

ANSWER_KEYS = [  # (answer as written, the key two equal answers share)
    (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    (r"\tfrac{1}{2}", r"\frac{1}{2}"),
    (r"\left( 1, 2 \right)", "(1,2)"),
    (r"10\%", "10"),
    (r"30^\circ", "30"),
    (r"30^{\circ}", "30"),
    ("5 square units", "5"),
    (r"10\text{ cm}^2", "10"),
    (r"\$18.90", "18.90"),
    (r"1,\!000", "1000"),
    (r"15{,}000", "15000"),
    (r"1\,000", "1000"),
    ("x = 2.", "x=2"),
    ("4:30 p.m.", r"\text{4:30p.m.}"),
    (r"4:30 \text{ PM}", r"\text{4:30p.m.}"),
    (r"\text{B, C}", r"\text{B},\text{C}"),
    (r"0.\overline{3}", r"\frac{1}{3}"),
    (r"0.1\overline{6}", r"\frac{1}{6}"),
    (r"1.\overline{3}", r"\frac{4}{3}"),
    (r"-0.\overline{3}", r"-\frac{1}{3}"),
    (r"0.\overline{142857}", r"\frac{1}{7}"),
    (r"2.25\overline{0}", r"\frac{9}{4}"),
    ("  7  ", "7"),
]


@pytest.mark.parametrize(("answer", "key"), ANSWER_KEYS)
def test_answer_key_drops_presentation_only(answer, key):
    assert answer_key(answer) == key


def test_answer_key_keeps_what_changes_the_value():
    # never merge answers that differ in value: each pair has distinct keys
    pairs = [
        ("0.5", "5"),
        (r"\frac{1}{2}", r"\frac{2}{1}"),
        ("4t", "4"),
        ("-3", "3"),
        ("(1,2)", "(2,1)"),
        (r"0.1\overline{6}", r"0.\overline{16}"),
        ("4:30", "4:30 p.m."),
    ]
    for a, b in pairs:
        assert answer_key(a) != answer_key(b), (a, b)


# ---------------------------------------------------------------- graded answers


@pytest.mark.parametrize(
    ("response", "gold", "right"),
    [
        (r"\frac{1}{6}", r"0.1\overline{6}", True),
        (r"\frac{4}{3}", r"1.\overline{3}", True),
        (r"1.\overline{3}", r"\frac{4}{3}", True),
        (r"\frac{1}{7}", r"0.1\overline{6}", False),
        (r"\frac{1}{3}", r"1.\overline{3}", False),
    ],
)
def test_repeating_decimals(response, gold, right):
    assert grade_math(boxed(response), gold) is right


COLUMN_HALF_3 = r"\begin{pmatrix} \frac{1}{2} \\ 3 \end{pmatrix}"
COLUMN_11 = r"\begin{pmatrix} 11 \\ -36 \\ -3 \end{pmatrix}"


@pytest.mark.parametrize(
    ("response", "gold", "right"),
    [
        (r"(\frac{1}{2}, 3)", COLUMN_HALF_3, True),  # a fraction (braces) inside the tuple
        (r"\left(\frac12, 3\right)", COLUMN_HALF_3, True),
        ("(11,-36,-3)", COLUMN_11, True),  # no spaces
        ("(1, 2)", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", True),  # a 2-vector
        (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", "(1, 2)", True),  # the gold is the tuple
        ("(2, 1)", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", False),
        ("(11, -36)", COLUMN_11, False),  # a component short
        (r"(3, \frac{1}{2})", COLUMN_HALF_3, False),
    ],
)
def test_a_tuple_answers_a_column_vector(response, gold, right):
    assert grade_math(boxed(response), gold) is right


def test_extract_boxed_edges():
    assert extract_boxed(r"\boxed{a} then \fbox{b}") == "b"
    assert extract_boxed(r"$\boxed 7$ and more") == "7"
    assert extract_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces are content
    assert extract_boxed(r"\boxed{x^{2}}") == "x^{2}"
    assert extract_boxed(r"\boxed{  }") is None
    assert extract_boxed(r"\boxed{1} \boxed{2") is None  # the last box is unterminated
    assert extract_boxed(r"\boxedx{1}") is None
    assert extract_boxed("no box") is None


@pytest.mark.parametrize(
    ("response", "gold", "right"),
    [
        ("16:30", "4:30 p.m.", True),
        ("4:30", "4:30 p.m.", True),  # a bare time: the question often says which half of the day
        ("16:30", "4:30 a.m.", False),
        ("0:15", "12:15 a.m.", True),  # 12 a.m. is midnight
        ("12:15", "12:15 p.m.", True),  # and 12 p.m. noon
        ("12:30", "12:30 a.m.", True),
        ("9:00", "9 a.m.", True),
        ("4:00 p.m.", "4 p.m.", True),
        ("23:59", "11:59 p.m.", True),
        ("23:00", "11 p.m.", True),
        ("13:30", "1:30 p.m.", True),
        ("13:30", "4:30 p.m.", False),
        ("4:31 p.m.", "4:30 p.m.", False),
        ("24:30", "4:30 p.m.", False),  # no 24th hour
        ("16:60", "4:30 p.m.", False),  # nor a 60th minute
        (r"\text{4:30 p.m.}", "16:30", True),
    ],
)
def test_times_of_day(response, gold, right):
    assert grade_math(boxed(response), f"\\boxed{{{gold}}}") is right


@pytest.mark.parametrize(
    ("response", "gold", "right"),
    [
        ("25", "25_6", True),  # the base left unwritten
        ("25_{6}", "25_6", True),
        ("ab_{16}", "AB_{16}", True),  # digits above 9 in either case
        ("25_7", "25_6", False),
        ("26", "25_6", False),
    ],
)
def test_numerals_in_a_base(response, gold, right):
    assert grade_math(boxed(response), f"\\boxed{{{gold}}}") is right
