"""MATH grading: real gold solutions from the MATH test split against hand-written responses.

Each expected verdict is the mathematical truth (is the response's final answer the answer?),
decided by hand, not copied from the grader. Rows are addressed by their line in test.jsonl,
and each case first checks that the gold answer extracted from that row is the one we expect.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opo_cli.rewards import REWARDS, extract_boxed, get_reward, grade_math, score_math
from tests.conftest import MATH_DIR

HANG_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def test_rows() -> list[dict]:
    path = MATH_DIR / "test.jsonl"
    if not path.exists():
        pytest.skip(f"MATH data not found at {path} (the shared data folder is absent)")
    with path.open() as f:
        return [json.loads(line) for line in f]


def boxed(answer: str) -> str:
    """A response that works a little and then boxes `answer`."""
    return f"Working through it step by step, we find that the answer is $\\boxed{{{answer}}}$."


# (line in test.jsonl, its gold answer, response answer, is the response right?)
REAL_CASES = [
    # fractions, decimals, mixed numbers
    (1, r"\frac{1}{2}", "0.5", True),
    (1, r"\frac{1}{2}", "1/2", True),
    (1, r"\frac{1}{2}", r"\dfrac{1}{2}", True),
    (1, r"\frac{1}{2}", r"\frac{1}{3}", False),
    (12, r"\frac{25}{8}", "3.125", True),
    (12, r"\frac{25}{8}", r"3\frac{1}{8}", True),
    (12, r"\frac{25}{8}", r"\frac{8}{25}", False),
    (634, r"\frac{68}{3}\text{ pounds}", r"22\frac{2}{3}", True),
    (3238, r"\frac{639}{40}", r"15\frac{39}{40}", True),  # gold boxes both forms; last counts
    # roots
    (77, r"3\sqrt{2}", r"\sqrt{18}", True),
    (77, r"3\sqrt{2}", r"3\sqrt2", True),
    (77, r"3\sqrt{2}", r"2\sqrt{3}", False),
    (214, r"\frac{5\sqrt{3}}{3}", r"\frac{5}{3}\sqrt{3}", True),
    (250, r"\!\sqrt{33}", r"\sqrt{33}", True),
    # intervals and sets
    (128, r"(-\infty,0)\cup (0,\infty)", r"(-\infty, 0) \cup (0, \infty)", True),
    (128, r"(-\infty,0)\cup (0,\infty)", r"(-\infty,0]\cup(0,\infty)", False),
    (257, r"[6,\infty)", r"[6, \infty)", True),
    (257, r"[6,\infty)", r"(6,\infty)", False),
    (2662, r"\{-1\} \cup [0,7)", r"[0,7) \cup \{-1\}", True),
    (2228, "2,6", "6, 2", True),  # "all the real solutions": order does not matter
    (2228, "2,6", "x=2, x=6", True),
    (2228, "2,6", "2", False),
    # ordered pairs and vectors
    (5, "(-6, 10)", "(-6,10)", True),
    (5, "(-6, 10)", "(10,-6)", False),
    (29, "(1,-2)", r"\left(1, -2\right)", True),
    (
        4457,
        r"\begin{pmatrix} 11 \\ -36 \\ -3 \end{pmatrix}",
        r"\begin{pmatrix}11\\-36\\-3\end{pmatrix}",
        True,
    ),
    (4457, r"\begin{pmatrix} 11 \\ -36 \\ -3 \end{pmatrix}", "(11, -36, -3)", True),
    (4457, r"\begin{pmatrix} 11 \\ -36 \\ -3 \end{pmatrix}", "(11, -36, 3)", False),
    (
        4482,
        r"\begin{pmatrix} 7 & 1 \\ -1 & -3 \end{pmatrix}",
        r"\begin{pmatrix} 7 & -1 \\ 1 & -3 \end{pmatrix}",
        False,
    ),  # transposed
    # degrees
    (1674, r"25^\circ", "25", True),
    (1674, r"25^\circ", r"25^{\circ}", True),
    (1674, r"25^\circ", r"25\text{ degrees}", True),
    (1674, r"25^\circ", r"65^\circ", False),
    # money, units, thousands separators
    (61, r"\$15,\!000", "15000", True),
    (61, r"\$15,\!000", r"\$15{,}000.00", True),
    (61, r"\$15,\!000", r"\$1500", False),
    (65, r"\$ 139", "139", True),
    (313, r"\$76.80", "76.8", True),
    (313, r"\$76.80", r"\$76.08", False),
    (31, r"1599 \text{ dollars}", r"\$1599", True),
    (49, r"575\text{ students}", "575", True),
    (1686, r"144 \mbox{ m}^3", r"144\text{ m}^3", True),
    (3860, r"15\mbox{ cm}^2", "15", True),
    (1425, "15,600", "15600", True),
    (246, "920.25", r"\$920.25", True),
    # percent: the question asks "by what percent", so 44 and 44\% are the answer, 0.44 is not
    (737, r"44\%", "44", True),
    (737, r"44\%", "0.44", False),
    (2085, r"7.2\%", r"7.2 \%", True),
    # pi
    (131, r"26\pi", r"\pi \cdot 26", True),
    (131, r"26\pi", "26", False),
    (131, r"26\pi", "81.68", False),  # an approximation of 26 pi is not 26 pi
    (1350, r"\pi-2", r"-2+\pi", True),
    (1585, r"\frac{\pi}{4}", r"0.25\pi", True),
    # negatives and equations
    (8, "-8", "- 8", True),
    (8, "-8", "8", False),
    (505, "b=4", "4", True),
    (505, "b=4", "b=-4", False),
    (902, "x=-10", "-10", True),
    (902, "x=-10", "10", False),
    # words
    (549, r"\text{Evelyn}", "Evelyn", True),
    (549, r"\text{Evelyn}", r"\text{Evan}", False),
    (3401, r"\mbox{Saturday}", r"\text{Saturday}", True),
    (3401, r"\mbox{Saturday}", r"\text{Sunday}", False),
    # base-b numerals
    (3068, "40_9", "40_{9}", True),
    # several boxes in the gold solution: the last is the answer
    (4956, r"105^\circ", r"30^\circ", False),
]


@pytest.mark.parametrize(("line", "gold_answer", "answer", "right"), REAL_CASES)
def test_real_math_answers(test_rows, line, gold_answer, answer, right):
    solution = test_rows[line]["solution"]
    assert extract_boxed(solution) == gold_answer
    assert grade_math(boxed(answer), solution) is right


# Wrong answers once graded right, and right ones once graded wrong: (line, gold answer, right
# answers, wrong answers). Each is graded as a response to the real solution and, swapped, the
# gold answer as a response to each of them.
CLASS_CASES = [
    # a dropped variable: math-verify read a trailing t (c, d, g, h, l, m, o, s) as a unit
    (4301, "4t", ["4t", r"4 \cdot t", "t4"], ["4", "4s", "4x", "5t", "-4t"]),
    # thousands separators: 111, \! 111 is one number, never the set {111}
    (
        4052,
        r"111, \! 111, \! 111",
        ["111111111", r"111{,}111{,}111", "111,111,111"],
        ["111", "111111", "111, 111, 111", "111111110"],
    ),
    (
        3220,
        r"11,\! 111,\! 111,\! 100",
        ["11111111100", r"11{,}111{,}111{,}100"],
        ["11111111000", "11, 111"],
    ),
    (
        1092,
        r"\frac{8t}{3}",
        [r"\frac{8}{3}t", r"\frac83 t", r"\dfrac{8t}{3}"],
        [r"\frac{8}{3}", r"\frac{8}{3}s", r"\frac{3t}{8}"],
    ),
    # decimals against fractions with the symbol i (math-verify took 0.2i's i for a real symbol)
    (
        2656,
        r"\frac{7}{5} + \frac{1}{5} i.",
        ["1.4 + 0.2i", r"\frac{7+i}{5}", r"\frac{1}{5}i + \frac{7}{5}"],
        ["1.4 - 0.2i", "1.4", "1.4 + 0.2", "0.2 + 1.4i"],
    ),
    (
        4722,
        r"-128 - 128 \sqrt{3} i",
        [r"-128-128i\sqrt{3}", r"-128(1 + \sqrt{3}i)"],
        [r"-128+128i\sqrt{3}", r"-128-128\sqrt{3}", r"128 - 128i\sqrt{3}"],
    ),
    # a \text{} list of choices is the set of its choices
    (
        None,
        r"\text{B, C}",
        ["B, C", "C, B", r"\text{B}, \text{C}"],
        ["B", "B, D", "B, C, D", r"\text{BC}"],
    ),
    (
        4947,
        r"\text{C, F, H}",
        ["C, F, H", "H, C, F", r"\text{C}, \text{F}, \text{H}"],
        ["C, F", "C, F, G", "CFH"],
    ),
    # a time of day, not the ratio 4:30 (the question asks for a time in the afternoon)
    (
        4087,
        r"\text{4:30 p.m.}",
        [r"4:30 \text{ p.m.}", "4:30 PM", r"4\!:\!30\text{ pm}", "16:30", "4:30"],
        [r"4:30 \text{ a.m.}", r"\frac{2}{15}", "5:30 p.m.", "4:20 p.m."],
    ),
    # a numeral in a base: the base is part of the value (math-verify drops it)
    (3068, "40_9", ["40_{9}", "40"], ["40_8", "41_9", "36"]),
]
CLASS_ROWS = [
    (line, gold, answer, right)
    for line, gold, rights, wrongs in CLASS_CASES
    for answers, right in ((rights, True), (wrongs, False))
    for answer in answers
]


@pytest.mark.parametrize(("line", "gold_answer", "answer", "right"), CLASS_ROWS)
def test_answer_classes_both_ways(request, line, gold_answer, answer, right):
    gold = gold_answer if line is None else request.getfixturevalue("test_rows")[line]["solution"]
    assert extract_boxed(gold) in (gold_answer, None)
    assert grade_math(boxed(answer), gold) is right
    assert grade_math(boxed(gold_answer), answer) is right


# A comma between digit groups is a thousands separator in one gold and a list in another:
# 1478 counts numbers (61,328), 4669 lists the solutions x = 70 and x = 110 (70,110).
PLAIN_COMMA_CASES = [
    (1478, "61,328", "61328", True),
    (1478, "61,328", "61,328", True),
    (1478, "61,328", "61", False),  # a dropped group
    (1478, "61,328", "61329", False),
    (4669, "70,110", "70, 110", True),
    (4669, "70,110", "110, 70", True),
    (4669, "70,110", "70", False),
    (4669, "70,110", "70, 111", False),
]


@pytest.mark.parametrize(("line", "gold_answer", "answer", "right"), PLAIN_COMMA_CASES)
def test_a_plain_comma_in_the_gold(test_rows, line, gold_answer, answer, right):
    solution = test_rows[line]["solution"]
    assert extract_boxed(solution) == gold_answer
    assert grade_math(boxed(answer), solution) is right


@pytest.mark.xfail(
    strict=True,
    reason="a plain comma between digit groups is read as the response writes it: the gold's "
    "form cannot tell the number 61,328 from the solutions 70,110",
)
@pytest.mark.parametrize(("line", "answer"), [(1478, "61, 328"), (4669, "70110")])
def test_a_plain_comma_read_the_wrong_way(test_rows, line, answer):
    assert not grade_math(boxed(answer), test_rows[line]["solution"])


def test_commas_inside_brackets_always_separate():
    assert grade_math(boxed("(20, 100)"), "(20,100)")
    assert not grade_math(boxed("(20100)"), "(20,100)")
    assert grade_math(boxed(r"(2, 12) \cup (12, 102)"), r"(2,12) \cup (12,102)")


# ----------------------------------------------------- property: near misses of real golds

_TEXT = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm|operatorname)\s*\{[^{}]*\}")


def _math_only(answer: str) -> str:
    """answer with \\text{...} groups and \\commands blanked out, positions kept."""
    answer = _TEXT.sub(lambda m: " " * len(m[0]), answer)
    return re.sub(r"\\[A-Za-z]+", lambda m: " " * len(m[0]), answer)


def _variable_sites(answer: str) -> list[int]:
    """Single-letter variables in math mode, not the left side of an assignment (x = 5)."""
    m = _math_only(answer)
    return [
        i
        for i, c in enumerate(m)
        if c.isalpha()
        and not m[i + 1 : i + 2].isalpha()
        and not m[i - 1 : i].isalpha()
        and not re.match(r"\s*=", m[i + 1 :])
    ]


def _digit_sites(answer: str) -> list[int]:
    """Digits, but not past the 6th decimal place (math-verify rounds floats there)."""
    return [
        i for i, c in enumerate(answer) if c.isdigit() and not re.search(r"\d\.\d{6,}$", answer[:i])
    ]


def _sign_sites(answer: str) -> list[int]:
    """Minus signs in math mode, and -1 for "put a minus in front"; never in front of a 0."""
    m = _math_only(answer)
    sites = [i for i, c in enumerate(m) if c == "-"]
    if not answer.lstrip().startswith("-"):
        sites.append(-1)
    zero = re.compile(r"\s*\{?\s*(\d+(?:\.\d*)?)(?![\d.])")
    return [
        i
        for i in sites
        if not ((z := zero.match(answer[i + 1 :] if i >= 0 else answer)) and float(z[1]) == 0)
    ]


def _drop_variable(answer: str, i: int) -> str:
    return answer[:i] + answer[i + 1 :]


def _change_digit(answer: str, i: int) -> str:
    return answer[:i] + str((int(answer[i]) + 1) % 10) + answer[i + 1 :]


def _flip_sign(answer: str, i: int) -> str:
    if i < 0:
        return "-" + answer
    before = answer[:i].rstrip()
    binary = bool(before) and (before[-1].isalnum() or before[-1] in ")}]")
    return answer[:i] + ("+" if binary else "") + answer[i + 1 :]


MUTATIONS = {
    "variable removed": (_variable_sites, _drop_variable),
    "digit changed": (_digit_sites, _change_digit),
    "sign flipped": (_sign_sites, _flip_sign),
}


def test_mutations_by_hand():
    assert _variable_sites("4t") == [1] and _drop_variable("4t", 1) == "4"
    assert _variable_sites("x=5") == [] and _variable_sites(r"10\text{ cm}") == []
    assert _digit_sites(r"\frac{1}{9}") == [6, 9]
    assert _change_digit(r"\frac{1}{9}", 9) == r"\frac{1}{0}"
    assert _sign_sites("0") == [] and _sign_sites("5") == [-1] and _flip_sign("5", -1) == "-5"
    assert _flip_sign(r"\pi-2", 3) == r"\pi+2" and _flip_sign("-8", 0) == "8"


@pytest.fixture(scope="module")
def level3_golds(test_rows) -> dict[str, list[str]]:
    """Per mutation, the Level 3 gold answers it applies to (golds without a variable, ...)."""
    golds = [extract_boxed(r["solution"]) for r in test_rows if r["level"] == "Level 3"]
    return {kind: [g for g in golds if sites(g)] for kind, (sites, _) in MUTATIONS.items()}


def _near_misses(golds_by_kind: dict[str, list[str]]) -> st.SearchStrategy:
    """(mutation, gold, the gold mutated at one of its sites)."""

    def at_site(kind: str, gold: str) -> st.SearchStrategy:
        sites, mutate = MUTATIONS[kind]
        return st.sampled_from(sites(gold)).map(lambda i: (kind, gold, mutate(gold, i)))

    return st.sampled_from(sorted(MUTATIONS)).flatmap(
        lambda kind: st.sampled_from(golds_by_kind[kind]).flatmap(lambda g: at_site(kind, g))
    )


@settings(
    max_examples=12,  # x 50 near misses, graded as one batch (the pool runs them in parallel)
    deadline=None,
    derandomize=True,  # the same sample on every run: CI never meets a new case by chance
    database=None,  # nothing to replay, nothing written to .hypothesis/
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_near_misses_of_level3_golds_are_wrong(level3_golds, data):
    misses = data.draw(st.lists(_near_misses(level3_golds), min_size=50, max_size=50))
    scores = score_math([boxed(wrong) for _, _, wrong in misses], [g for _, g, _ in misses])
    graded_right = [m for m, s in zip(misses, scores, strict=True) if s]
    assert not graded_right, f"near misses graded right (mutation, gold, response): {graded_right}"


# ------------------------------------------------------- the labelled set of docs/math.md

LABELLED = Path(__file__).parent / "data" / "math_answers.jsonl"
# the one documented disagreement: a plain comma between digit groups read the wrong way
KNOWN_WRONG = {("61,328", "61, 328"), ("70,110", "70110")}


@pytest.fixture(scope="module")
def labelled() -> list[dict]:
    with LABELLED.open() as f:
        return [json.loads(line) for line in f]


def test_labelled_set_is_graded_as_labelled(labelled):
    scores = score_math([r["response"] for r in labelled], [r["gold"] for r in labelled])
    wrong = {
        (r["gold"], extract_boxed(r["response"]))
        for r, s in zip(labelled, scores, strict=True)
        if (s == 1.0) != r["right"]
    }
    assert wrong == KNOWN_WRONG


def test_labelled_golds_are_the_math_answers(labelled, test_rows):
    for r in labelled:
        if r["line"] is not None:
            assert extract_boxed(test_rows[r["line"]]["solution"]) == r["gold"], r


# Known limitation of the contract "the gold's last box is the answer": these solutions box
# several answers that together (or each) are correct, so a right response is graded wrong.
@pytest.mark.xfail(strict=True, reason="gold solution boxes several answers; only the last counts")
@pytest.mark.parametrize(
    ("line", "answer"),
    [(762, "-2, 1"), (4956, r"30^\circ, 45^\circ, 105^\circ"), (2157, "(10, 0)")],
)
def test_solutions_with_several_answers(test_rows, line, answer):
    assert grade_math(boxed(answer), test_rows[line]["solution"])


def test_batch_matches_single_cases(test_rows):
    cases = REAL_CASES[:12]
    responses = [boxed(answer) for _, _, answer, _ in cases]
    golds = [test_rows[line]["solution"] for line, *_ in cases]
    assert get_reward("math") is REWARDS["math"] is score_math
    assert score_math(responses, golds) == [float(right) for *_, right in cases]


# ------------------------------------------------------------------------- answer extraction


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        (r"so $\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
        (r"$\boxed{\{1, 2\}}$ done", r"\{1, 2\}"),  # escaped braces are not groups
        (r"first $\boxed{3}$, then $\boxed{4}$.", "4"),
        (r"$x = \boxed 9$.", "9"),
        (r"$\fbox{7}$", "7"),
        (r"\boxed {x^{2}}", "x^{2}"),
        ("no box here", None),
        (r"\boxed{}", None),
        (r"\boxed{3} and then \boxed{\frac{1}{2}", None),  # the last box is unterminated
    ],
)
def test_extract_boxed(text, answer):
    assert extract_boxed(text) == answer


# ------------------------------------------------------------------------------ responses


@pytest.mark.parametrize(
    ("response", "gold", "right"),
    [
        (r"Try $\boxed{3}$. No wait: $\boxed{\frac12}$.", r"\frac{1}{2}", True),
        (r"Answer $\boxed{\frac12}$. Hmm, or $\boxed{3}$.", r"\frac{1}{2}", False),
        (r"The answer is $\boxed{0.5}$.", r"\frac{1}{2}", True),  # gold as a bare answer
        (r"$\boxed{1/3}$", r"0.\overline{3}", True),
        (r"so $x = \boxed{3}$", "x=3", True),
        ("", "1", False),
        ("The answer is 1.", "1", False),  # no box, no answer
        (r"\boxed{", "1", False),
        (r"\boxed{1", "1", False),
        (r"\boxed{}", "1", False),
        (r"\boxed{\frac{1}{}", "1", False),
        (r"\boxed{)(}", "1", False),
        (r"\boxed{1}", "", False),
        (None, "1", False),
    ],
)
def test_responses(response, gold, right):
    assert grade_math(response, gold) is right


def test_huge_garbage_is_fast():
    start = time.perf_counter()
    assert not grade_math("x" * 1_000_000, "1")
    assert not grade_math(r"\boxed{" + "{" * 100_000, "1")
    assert not grade_math(r"\boxed{" + "1+" * 100_000 + "1}", "1")  # too long to be an answer
    assert not grade_math(r"\boxed{" + "1,000+(" * 20_000 + "}", "1")  # digit groups, brackets
    assert not grade_math(r"\boxed{5" + " abc" * 50_000 + " 1}", "5")  # words, not a unit
    # linear time: well under a second; a quadratic scan of these 100k-character inputs takes
    # minutes, so a loose bound catches it without failing on a busy machine
    assert time.perf_counter() - start < 10.0


def test_model_text_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    assert not grade_math(rf"\boxed{{{code}}}", "0")
    assert not marker.exists()


# ------------------------------------------------------------------------------------ time


def test_sympy_bombs_time_out_and_the_pool_recovers():
    grade_math(r"\boxed{1}", "1")  # warm: time the cases, not the worker start-up
    bombs = [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{(10^{10})!}"]
    start = time.perf_counter()
    scores = score_math(bombs, ["1", "1"], timeout_s=HANG_TIMEOUT_S)
    elapsed = time.perf_counter() - start
    assert scores == [0.0, 0.0]
    assert elapsed < 2 * HANG_TIMEOUT_S + 1.0  # two cases at most one after the other
    assert grade_math(r"\boxed{\sqrt{8}}", r"2\sqrt{2}")  # killed workers were replaced


def test_grading_from_a_thread():
    results: dict[str, bool] = {}

    def work() -> None:
        results["right"] = grade_math(r"\boxed{\sqrt{8}}", r"2\sqrt{2}")
        results["bomb"] = grade_math(r"\boxed{2^{2^{40}}}", "1", timeout_s=HANG_TIMEOUT_S)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert results == {"right": True, "bomb": False}
