"""Rewards a user meets without the MATH data: the arithmetic task's exact match, the answer
key that maj@k votes with, repeating decimals, vectors written as tuples, times of day,
numerals in a base, the readings of commas and what the grader decides before math-verify.
Expected values are the mathematical truth, worked out by hand. Run: pytest tests/test_rewards.py -q
"""

from __future__ import annotations

import pytest

from opo_cli.rewards import answer_key, extract_boxed, get_reward, grade_math, score_exact_match
from opo_cli.rewards.answers import (
    _is_list,
    _read_plain_commas,
    _split_top_level,
    _times_of_day,
    _tuple_as_column,
)
from opo_cli.rewards.grading import _MAX_ANSWER_CHARS, _triage


def boxed(answer: str) -> str:
    return f"so the answer is $\\boxed{{{answer}}}$."


# ---------------------------------------------------------------- the arithmetic task


def test_exact_match_rewards_the_right_sum_only():
    # the arith dataset's reward: the completion, stripped of white space, is the answer
    responses = ["12", " 12\n", "13", "", "1 2", "120"]
    assert score_exact_match(responses, ["12"] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert score_exact_match(["7"], [" 7 "]) == [1.0]


def test_exact_match_refuses_batches_of_different_lengths():
    # a reward called with a response short (or a gold short) must not score a prefix quietly
    with pytest.raises(ValueError):
        score_exact_match(["1", "2"], ["1"])
    with pytest.raises(ValueError):
        score_exact_match(["1"], ["1", "2"])


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
    (r".\overline{6}", r"\frac{2}{3}"),  # no 0 before the point
    (r"3X \text{ cm}", "3X"),
    ("XX.", "XX"),  # a final period goes, the numeral's X stays
    # text in the value: a phrase, not a value and its unit, so the last word stays
    (r"\text{2 or } 5 \text{ cm}", r"\text{2or}5\text{cm}"),
    (r"\mbox{2 or } 5 \mbox{ cm}", r"\mbox{2or}5\mbox{cm}"),
    # not times of day (no 13 p.m., no 60th minute): left as written, never \text{13:30 p.m.}
    ("13:30 pm", "13:30pm"),
    ("4:60 pm", "4:60pm"),
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


def test_long_repeating_decimals():
    # 30 digits before the bar are read: 0.0...01 (28 zeros) with 6 repeating is 10^-28 / 6
    assert answer_key("0." + "0" * 28 + r"1\overline{6}") == rf"\frac{{1}}{{{6 * 10**28}}}"
    # longer ones, wherever the digits are, are left as written, even far past what int() reads
    for digits in ("0." + "0" * 29 + "1", "1" * 20 + "." + "1" * 11, "0." + "1" * 5000):
        assert answer_key(digits + r"\overline{3}") == digits + r"\overline{3}"


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
        (r"(1, 2) \text{ units}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", True),  # a unit
        (r"(3, \frac{1}{2})", COLUMN_HALF_3, False),
    ],
)
def test_a_tuple_answers_a_column_vector(response, gold, right):
    assert grade_math(boxed(response), gold) is right


def test_verdicts_decided_before_math_verify():
    # no box, or a box that holds only presentation: no answer, wrong without asking sympy
    assert _triage("the answer is 5", "5", True) is False
    assert _triage(r"\boxed{\%}", "5", True) is False
    assert _triage(r"\boxed{5}", r"\boxed{\$}", True) is False
    assert _triage(r"\boxed{5}", "  ", True) is False
    assert not grade_math(boxed(r"\%"), "5") and not grade_math(boxed("5"), r"\$")
    # the same string after normalisation: right at once, unless the fast path is off
    assert _triage(boxed(r"\dfrac12"), r"\frac12", True) is True
    assert _triage(boxed(r"\dfrac12"), r"\frac12", False) == (r"\frac12", r"\frac12")
    assert _triage(boxed("x+1"), "1+x", True) == ("x+1", "1+x")  # for math-verify


def test_answers_past_the_length_cap_are_garbage():
    # the cap holds on either side: at it a long way of writing 1 is 1, one more is no answer
    at_cap, over = "0" * (_MAX_ANSWER_CHARS - 1) + "1", "0" * _MAX_ANSWER_CHARS + "1"
    assert grade_math(boxed(at_cap), "1") and grade_math(boxed("1"), at_cap)
    assert not grade_math(boxed(over), "1") and not grade_math(boxed("1"), over)


def test_extract_boxed_edges():
    assert extract_boxed(r"\boxed{a} then \fbox{b}") == "b"
    assert extract_boxed(r"$\boxed 7$ and more") == "7"
    assert extract_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces are content
    assert extract_boxed(r"\boxed{x^{2}}") == "x^{2}"
    assert extract_boxed(r"\boxed{  }") is None
    assert extract_boxed(r"\boxed{1} \boxed{2") is None  # the last box is unterminated
    assert extract_boxed(r"\boxedx{1}") is None
    assert extract_boxed("no box") is None
    # a response cut off (max_new_tokens) right after the command: no answer, no error
    assert extract_boxed(r"so the answer is \boxed") is None
    assert extract_boxed("so the answer is \\boxed \t") is None
    assert extract_boxed(r"$\boxed X$") == "X"  # a letter after the space is the answer
    assert extract_boxed("\\boxed\t{7}") == "7"


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
        ("16:60", "5 p.m.", False),  # a 60th minute is not the next hour
        ("13:30", "1:30 a.m.", False),  # past 12: the afternoon only
        (r"\text{12:75 p.m.}", "1:15 p.m.", False),  # not a time: no 75th minute
        (r"\text{13:00 p.m.}", "1 p.m.", False),  # nor a 13 o'clock in the afternoon
        (r"\text{4:60 p.m.}", "5 p.m.", False),
        (r"\text{13 pm}", "1 p.m.", False),
    ],
)
def test_times_of_day(response, gold, right):
    assert grade_math(boxed(response), f"\\boxed{{{gold}}}") is right


def test_the_minutes_a_time_can_mean():
    # a time of day as the grader writes it is one time; a bare h:mm up to 12 is two
    assert _times_of_day(r"\text{4:30 p.m.}") == {16 * 60 + 30}
    assert _times_of_day(r"\text{12:05 a.m.}") == {5}
    assert _times_of_day("4:30") == {4 * 60 + 30, 16 * 60 + 30}
    assert _times_of_day("12:00") == {0, 12 * 60}
    assert _times_of_day("16:30") == {16 * 60 + 30}
    for not_a_time in ("24:30", "23:60", "4:30 p.m.", "430", "x", r"\text{13:00 p.m.}"):
        assert _times_of_day(not_a_time) is None, not_a_time


@pytest.mark.parametrize(
    ("response", "gold", "right"),
    [
        ("25", "25_6", True),  # the base left unwritten
        ("25_{6}", "25_6", True),
        ("ab_{16}", "AB_{16}", True),  # digits above 9 in either case
        ("1a_{16}", "1A_{16}", True),
        ("1A", "1a_{16}", True),
        ("1B_{16}", "1A_{16}", False),
        ("25_7", "25_6", False),
        ("26", "25_6", False),
    ],
)
def test_numerals_in_a_base(response, gold, right):
    assert grade_math(boxed(response), f"\\boxed{{{gold}}}") is right


# ---------------------------------------------------------------- the grader's readings of commas


def test_a_plain_comma_read_as_the_other_answer_reads_it():
    # 70,110 is the list 70, 110 against a list, and the number 70110 against a number
    assert grade_math(boxed("70,110"), "70, 110") and grade_math(boxed("70, 110"), "70,110")
    assert grade_math(boxed("70,110"), "70110") and grade_math(boxed("70110"), "70,110")
    assert not grade_math(boxed("70,110"), "70, 111")


def test_split_at_top_level_commas_only():
    assert _split_top_level("X, f(a, b), [1, 2], \\{3, 4\\}") == [
        "X",
        "f(a, b)",
        "[1, 2]",
        "\\{3, 4\\}",
    ]
    assert _split_top_level("x=2, x=6") == ["x=2", "x=6"]
    assert _split_top_level("7") == ["7"]
    # brackets that do not balance: no reading at all
    assert _split_top_level("(1, 2") is None
    assert _split_top_level("1), (2") is None  # closed before it opened
    assert _split_top_level("[1, 2)]") is None


def test_plain_commas_between_digit_groups():
    # one number, or the list the other answer is; inside brackets always a separator
    assert _read_plain_commas("1,000 and 2,000", as_list=False) == "1000 and 2000"
    assert _read_plain_commas("1,000 and 2,000", as_list=True) == "1, 000 and 2, 000"
    assert _read_plain_commas("(1,000, 2,000)", as_list=False) == "(1,000, 2,000)"
    assert _read_plain_commas("(1,000) + 2,000", as_list=False) == "(1,000) + 2000"
    assert _read_plain_commas("[1,000, 2,000] \\cup 3,000", as_list=False) == (
        "[1,000, 2,000] \\cup 3000"
    )
    assert _read_plain_commas("X = 1,000", as_list=False) == "X = 1000"  # letters are no bracket
    assert _read_plain_commas("1,5", as_list=False) == "1,5"  # not a digit group of three


def test_what_is_a_list():
    assert _is_list("1, 2") and _is_list("x=2, x=6") and _is_list("15,600, 3")
    assert not _is_list("15,600")  # digit groups: one number
    assert not _is_list("(1, 2)")  # one pair
    assert not _is_list("(1, 2")  # brackets that do not balance
    assert not _is_list("12")


def test_only_tuples_become_columns():
    column = r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"
    assert _tuple_as_column("(1, 2)", column) == r"\begin{pmatrix}1 \\ 2\end{pmatrix}"
    assert _tuple_as_column("(1, 2)", "(1, 2)") == "(1, 2)"  # the other is no column
    one = r"\begin{pmatrix} 5 \end{pmatrix}"
    assert _tuple_as_column("(5)", one) == "(5)"  # a number in brackets, not a tuple
    assert _tuple_as_column("(1,,2)", column) == "(1,,2)"  # a component missing
    assert _tuple_as_column("(1, 2))", column) == "(1, 2))"  # brackets that do not balance
    assert _tuple_as_column("[1, 2]", column) == "[1, 2]"  # an interval
