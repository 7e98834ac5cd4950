"""Reading answers out of responses: MATH's last `\\boxed{}` and its normal form, GSM8K's numbers.

`extract_boxed` finds the last box; `_normalise` strips presentation (spacing, `\\dfrac`,
thousands separators, units, degrees, %) so that equal answers compare equal as strings, and
the `_same_*` helpers decide plain decimals, times of day and numerals in a base without
math-verify. `gsm8k_number` reads a GSM8K answer (the number after `####`, a response's boxed
or last number). Pure functions of strings: no subprocess, no sympy.

    extract_boxed(r"so $x=\\boxed{\\dfrac12}$")   # "\\dfrac12"
    answer_key(r"\\dfrac12")                        # "\\frac12"
    gsm8k_number("... so she pays $1,200.00.")      # "1200"
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

# --------------------------------------------------------------------------- answer extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)  # \{ \} \\ are escapes, not group delimiters


def _braced(text: str, start: int) -> str | None:
    """The content of the brace group opening at text[start] == "{"; None if unterminated."""
    depth = 0
    for m in _BRACE_TOKEN.finditer(text, start):
        if m[0] == "{":
            depth += 1
        elif m[0] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : m.start()]
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 7`) in text, else None.

    Nested braces are matched; an unterminated last box or an empty one gives None. `\\boxed 7`
    (no braces) runs to the next `$` or line end, as in the MATH reference grader.
    """
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    rest = matches[-1].end()
    while rest < len(text) and text[rest] in " \t":
        rest += 1
    if rest < len(text) and text[rest] == "{":
        content = _braced(text, rest)
    else:
        content = re.split(r"[$\n]", text[rest:], maxsplit=1)[0]
    if content is None or not content.strip():
        return None
    return content.strip()


# ------------------------------------------------------------------------------ normalisation

# 111,\!111  111, \! 111  15{,}000  1\,000: always one number, so removed before anything reads
# the commas as a set (a plain comma, 15,600, may also be a list: see _read_plain_commas)
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:(?:\s*,\s*\\!\s*|\s*\{,\}\s*|\\,)\d{3})+(?![\d])")
_THOUSANDS_SEP = re.compile(r"[^\d]+")
_DROP = [  # (pattern, replacement): presentation only, never the value
    (re.compile(r"\\(?:left|right)(?![A-Za-z])"), ""),
    (re.compile(r"(?<=\\)[dt](?=frac(?![A-Za-z]))"), ""),  # \dfrac -> \frac
    (re.compile(r"\\\\|\\[,;:! ]"), lambda m: m[0] if m[0] == "\\\\" else ""),  # \\ row break stays
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree"), ""),  # 30^\circ -> 30
    (re.compile(r"\\?%"), ""),  # 10\% -> 10: MATH graders read "what percent" answers this way
    (re.compile(r"\\?\$"), ""),  # \$18.90 and stray math delimiters
    (re.compile(r"(?<=\d)i(?![A-Za-z])"), " i"),  # 0.2i -> 0.2 i: math-verify's cue for complex i
]
_REPEATING = re.compile(r"^(-?)(\d*)\.(\d*)\\overline\{(\d{1,30})\}$")
# a unit after a value: 10\text{ cm}, 144 \mbox{ m}^3, 25 students; words only, never one letter
# in math mode (4t is 4 times t) and never the imaginary unit or e. No MATH gold ends in a plain
# word of three or more small letters after a space, so such a word is a unit, not variables
_TEXT_UNIT = re.compile(
    r"\\(?:text|textrm|mbox|mathrm)\s*\{\s*(?!(?:i|e)\s*\})[A-Za-z][A-Za-z.\s]*\}"
    r"(?:\s*\^\s*\{?\d\}?)?\s*\.?$"
)
_WORD_UNIT = re.compile(r"(?:\s+(?:[a-z]{3,}|cm|mm|km|kg|ft|sq\.?)){1,3}(?:\s*\^\s*\{?\d\}?)?$")
_TEXT_LIST = re.compile(r"^\\(?:text|textbf|mbox)\s*\{([^{}]*,[^{}]*)\}$")


def _repeating_decimal(ans: str) -> str:
    """0.\\overline{3} -> \\frac{1}{3}: math-verify cannot parse repeating decimals. At most 30
    digits before the bar: a longer one is left as written (no huge integers from model text)."""
    m = _REPEATING.match(ans)
    if m is None or len(m[2]) + len(m[3]) > 30:
        return ans
    sign, whole, fixed, rep = m.groups()
    value = Fraction(int(whole or "0")) + Fraction(int(fixed or "0"), 10 ** len(fixed))
    value += Fraction(int(rep), 10 ** len(fixed) * (10 ** len(rep) - 1))
    return f"{sign}\\frac{{{value.numerator}}}{{{value.denominator}}}"


def _strip_unit(ans: str) -> str:
    """10\\text{ cm}^2 -> 10, 5 square units -> 5; the value is kept whole or nothing changes."""
    for pattern in (_TEXT_UNIT, _WORD_UNIT) if "\\" in ans else (_WORD_UNIT,):
        m = pattern.search(ans)
        if m is not None:
            value = ans[: m.start()].rstrip()
            if value and value[-1] not in "^_{" and "\\text" not in value and "\\mbox" not in value:
                return value
    return ans


def _text_list(ans: str) -> str:
    """\\text{B, C} -> \\text{B}, \\text{C}: a list of choices, compared as the set it is."""
    m = _TEXT_LIST.match(ans) if ans.startswith("\\") else None
    if m is None:
        return ans
    return ", ".join(f"\\text{{{item.strip()}}}" for item in m[1].split(",") if item.strip())


_CLOCK = re.compile(r"^(\d{1,2})(?::(\d{2}))?([ap])\.?m\.?$", re.IGNORECASE)
_TEXT_GROUP = re.compile(r"\\(?:text|textrm|mbox|mathrm)\s*\{([^{}]*)\}")


def _clock_time(ans: str) -> str:
    """4:30 \\text{ p.m.}, \\text{4:30 PM}, 9\\text{ a.m.} -> \\text{4:30 p.m.}: a time of day,
    not the ratio 4:30; other answers unchanged."""
    if "m" not in ans and "M" not in ans:
        return ans
    m = _CLOCK.match(_key(_TEXT_GROUP.sub(r"\1", ans)))
    if m is None or int(m[1]) > 12 or int(m[2] or 0) > 59:
        return ans
    return f"\\text{{{int(m[1])}:{m[2] or '00'} {m[3].lower()}.m.}}"


_HOURS_MINUTES = re.compile(r"^(\d{1,2}):(\d{2})$")
_TIME_OF_DAY = re.compile(r"^\\text\{(\d{1,2}):(\d{2}) ([ap])\.m\.\}$")  # as _clock_time writes it


def _time_of_day(ans: str) -> int | None:
    """The minutes after midnight of a normalised time of day (\\text{4:30 p.m.}); None if the
    answer is not one, or not a time (\\text{12:75 p.m.}, which _clock_time leaves as it is)."""
    m = _TIME_OF_DAY.match(ans)
    if m is None or int(m[1]) > 12 or int(m[2]) > 59:
        return None
    return (int(m[1]) % 12 + 12 * (m[3] == "p")) * 60 + int(m[2])


def _times_of_day(ans: str) -> set[int] | None:
    """The minutes after midnight a normalised 4:30 p.m. (one) or a bare 4:30 (4:30 or 16:30)
    can mean; None if the answer is neither."""
    minutes = _time_of_day(ans)
    if minutes is not None:
        return {minutes}
    m = _HOURS_MINUTES.match(ans)
    if m is None or int(m[1]) > 23 or int(m[2]) > 59:
        return None
    hours = {int(m[1])} if int(m[1]) > 12 else {int(m[1]) % 12, int(m[1]) % 12 + 12}
    return {h * 60 + int(m[2]) for h in hours}


def _same_time(pred: str, ref: str) -> bool | None:
    """None unless one side is a time of day (4:30 p.m.); then whether the other can be that
    time: 4:30 p.m., 16:30 or a bare 4:30 (the question often says which half of the day)."""
    if _time_of_day(pred) is None and _time_of_day(ref) is None:
        return None
    p, r = _times_of_day(pred), _times_of_day(ref)
    return bool(p and r and p & r)


_DECIMAL = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$")


def _same_decimal(pred: str, ref: str) -> bool | None:
    """None unless both are plain decimals (2.50, .0000672, 7); then exact equality: math-verify
    rounds floats to 6 places, which would take .0000673 for .0000672."""
    if _DECIMAL.match(pred) is None or _DECIMAL.match(ref) is None:
        return None
    return Fraction(pred) == Fraction(ref)


_NUMERAL = re.compile(r"^(?=-?[0-9A-Za-z.]*\d)(-?[0-9A-Za-z.]+)(?:_\{?(\d{1,2})\}?)?$")  # x_1: no


def _same_numeral(pred: str, ref: str) -> bool | None:
    """None unless one side is a numeral with a base (25_6, -0.11_{2}); then whether the other is
    that numeral, in the same base or with no base written (math-verify drops the base)."""
    p, r = _NUMERAL.match(pred), _NUMERAL.match(ref)
    if not ((p and p[2]) or (r and r[2])):
        return None
    return bool(p and r and p[1].upper() == r[1].upper() and (p[2] == r[2] or None in (p[2], r[2])))


def _split_top_level(s: str) -> list[str] | None:
    """s split at commas outside any bracket; None if the brackets do not balance."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if depth < 0:
            return None
        if c == "," and depth == 0:
            parts.append(s[start:i].strip())
            start = i + 1
    return [*parts, s[start:].strip()] if depth == 0 else None


_COLUMN = re.compile(r"^\\begin\{pmatrix\}[^&]*\\end\{pmatrix\}$", re.DOTALL)


def _tuple_as_column(ans: str, other: str) -> str:
    """(1, 2, 3) -> a pmatrix column when the other answer is one: the same vector.

    math-verify compares a sympy Matrix with a Tuple as unequal.
    """
    if not (_COLUMN.match(other) and ans.startswith("(") and ans.endswith(")")):
        return ans
    parts = _split_top_level(ans[1:-1])
    if parts is None or len(parts) < 2 or not all(parts):
        return ans
    return "\\begin{pmatrix}" + " \\\\ ".join(parts) + "\\end{pmatrix}"


def _normalise(ans: str) -> str:
    """Strip presentation (\\left, \\dfrac, spacing, thousands separators, degrees, %, $,
    units, final period); a time of day and a \\text{} list of choices in one form."""
    if "," in ans:
        ans = _THOUSANDS.sub(lambda m: _THOUSANDS_SEP.sub("", m[0]), ans)
    for pattern, repl in _DROP:
        ans = pattern.sub(repl, ans)
    ans = ans.strip().rstrip(".").strip()
    clock = _clock_time(ans)
    if clock != ans:
        return clock
    return _repeating_decimal(_strip_unit(_text_list(ans)))


_PLAIN_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d])")


def _read_plain_commas(ans: str, as_list: bool) -> str:
    """15,600 outside brackets: one number, or (as_list) the list 15, 600.

    MATH golds write both (61,328 numbers; 70,110 for the solutions 70 and 110), so the gold's
    reading follows the response's form, and the response's the gold's. Inside brackets a comma
    always separates: (20,100) is a pair.
    """
    if "," not in ans:
        return ans

    out, depth, end = [], 0, 0
    for m in _PLAIN_THOUSANDS.finditer(ans):
        gap = ans[end : m.start()]
        depth += sum(gap.count(c) for c in "([{") - sum(gap.count(c) for c in ")]}")
        out += [gap, m[0] if depth else m[0].replace(",", ", " if as_list else "")]
        end = m.end()
    return "".join([*out, ans[end:]])


def _is_list(ans: str) -> bool:
    """A top-level comma list (1, 2 or x=2, x=6); digit groups (15,600) do not count."""
    if "," not in ans:
        return False
    parts = _split_top_level(_read_plain_commas(ans, as_list=False))
    return parts is not None and len(parts) > 1


def _key(ans: str) -> str:
    return "".join(ans.split())


def answer_key(answer: str) -> str:
    """An extracted answer as the grader's fast path compares it: normalised, no spaces."""
    return _key(_normalise(answer))


# ---------------------------------------------------------------------------------- GSM8K

_GSM8K_GOLD = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
# 1,234.5  -3  .5  12: commas only in groups of three after the first digits
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def _plain_number(text: str) -> str | None:
    """The last number in `text` without commas or trailing zeros ("1,200.00" -> "1200")."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    try:
        value = Decimal(numbers[-1].replace(",", ""))
    except InvalidOperation:
        return None
    return format(value.normalize(), "f") if value else "0"  # 1.2E+3 -> 1200; -0 -> 0


def gsm8k_gold(gold: str) -> str | None:
    """The number after `####` of a GSM8K solution (or of a bare answer), normalised."""
    m = _GSM8K_GOLD.search(gold)
    return _plain_number(m[1] if m else gold)


def gsm8k_number(response: str) -> str | None:
    """A response's answer as GSM8K grading reads it: the last number of its last
    `\\boxed{}` when it has one, else the last number of the text; commas, units, `$` and a
    trailing `.0` do not count. None when there is no number."""
    boxed = extract_boxed(response)
    return _plain_number(boxed if boxed is not None else response)
