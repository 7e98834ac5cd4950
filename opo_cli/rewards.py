"""Reward functions: one float per (response, gold answer) pair, chosen by name.

`grade_math` / `score_math` grade MATH answers: the last `\\boxed{}` of the response against the
last `\\boxed{}` of the gold solution (or the gold itself when it is a bare answer). Equal
strings after normalisation pass at once; plain decimals, times of day and numerals in a base
are decided here; everything else goes to math-verify, which runs in a small pool of grading
subprocesses. A number never equals an expression in a variable (docs/math.md, "Grading").
Each case has a hard time limit: a worker that overruns it is killed and replaced, so a
pathological answer (say `9^{9^{9^{9}}}`, which sympy tries to expand inside C code that no
signal can interrupt) costs one case, never the run. The parent process never imports sympy
and never evaluates model text.

    from opo_cli.rewards import grade_math, score_math
    grade_math(r"so $x=\\boxed{\\dfrac12}$", r"... hence $\\boxed{0.5}$.")   # True
    score_math(responses, golds)                                       # [1.0, 0.0, ...]
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from fractions import Fraction
from multiprocessing.connection import wait
from pathlib import Path

log = logging.getLogger(__name__)


def exact_match(response: str, gold: str) -> bool:
    """The response, stripped of surrounding white space, equals the gold answer."""
    return response.strip() == gold.strip()


def score_exact_match(responses: Sequence[str], golds: Sequence[str]) -> list[float]:
    return [float(exact_match(r, g)) for r, g in zip(responses, golds, strict=True)]


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
    """0.\\overline{3} -> \\frac{1}{3}: math-verify cannot parse repeating decimals."""
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


def _times_of_day(ans: str) -> set[int] | None:
    """The minutes after midnight a normalised 4:30 p.m. (one) or a bare 4:30 (4:30 or 16:30)
    can mean; None if the answer is neither."""
    m = _CLOCK.match(_key(ans[6:-1])) if ans.startswith("\\text{") else None
    if m is not None:
        return {(int(m[1]) % 12 + 12 * (m[3].lower() == "p")) * 60 + int(m[2] or 0)}
    m = _HOURS_MINUTES.match(ans)
    if m is None or int(m[1]) > 23 or int(m[2]) > 59:
        return None
    hours = {int(m[1])} if int(m[1]) > 12 else {int(m[1]) % 12, int(m[1]) % 12 + 12}
    return {h * 60 + int(m[2]) for h in hours}


def _same_time(pred: str, ref: str) -> bool | None:
    """None unless one side is a time of day (4:30 p.m.); then whether the other can be that
    time: 4:30 p.m., 16:30 or a bare 4:30 (the question often says which half of the day)."""
    if not (_is_time_of_day(pred) or _is_time_of_day(ref)):
        return None
    p, r = _times_of_day(pred), _times_of_day(ref)
    return bool(p and r and p & r)


def _is_time_of_day(ans: str) -> bool:
    return ans.startswith("\\text{") and _CLOCK.match(_key(ans[6:-1])) is not None


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


# -------------------------------------------------------------------------- grading subprocess

_MAX_ANSWER_CHARS = 2000  # longer "answers" are garbage; never handed to sympy
_WORKER_MEMORY_BYTES = 4 << 30  # a worker building a 10^9-digit integer dies, not the host
_WORKER_CPU_S = 60  # CPU seconds per case after which the kernel ends a worker (if orphaned)


def _set_soft_limit(name: str, value: int) -> None:
    """Lower the soft resource limit `name` (RLIMIT_AS, ...) of this process, where supported."""
    with contextlib.suppress(ImportError, AttributeError, ValueError, OSError):
        import resource

        kind = getattr(resource, name)
        hard = resource.getrlimit(kind)[1]
        resource.setrlimit(kind, (value if hard < 0 else min(value, hard), hard))


def _cap_cpu_for_next_case() -> None:
    """The parent kills an overrunning worker; if the parent is gone, the kernel does (SIGXCPU)."""
    with contextlib.suppress(ImportError):
        import resource

        used = resource.getrusage(resource.RUSAGE_SELF)
        _set_soft_limit("RLIMIT_CPU", math.ceil(used.ru_utime + used.ru_stime) + _WORKER_CPU_S)


def _verify(pred: str, gold: str, soft_s: int) -> bool:
    """math-verify on two answers (runs in a worker: main thread, so its signal timeouts work)."""
    from latex2sympy2_extended.math_normalization import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    # math-verify's defaults but for units=False: its unit list holds single letters (c, d, g,
    # h, l, m, o, s, t), so 4t would read as 4 with the unit t; _strip_unit does units here
    norm = NormalizationConfig(basic_latex=True, units=False, malformed_operators=True, nits=True)
    cfg = [LatexExtractionConfig(boxed_match_priority=0, normalization_config=norm)]
    gold_p = parse(f"$\\boxed{{{gold}}}$", cfg, parsing_timeout=soft_s)
    pred_p = parse(f"$\\boxed{{{pred}}}$", cfg, parsing_timeout=soft_s)
    return bool(gold_p and pred_p and verify(gold_p, pred_p, timeout_seconds=soft_s))


def _serve_worker() -> None:
    """Subprocess entry point: one JSON [pred, gold, soft_s] per stdin line, "1"/"0" back."""
    out = os.dup(1)
    os.dup2(2, 1)  # stray prints go to stderr, never into the verdict stream
    _set_soft_limit("RLIMIT_AS", _WORKER_MEMORY_BYTES)
    from math_verify.errors import TimeoutException

    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # timeouts are expected, not news
    os.write(out, b"ready\n")
    for line in sys.stdin.buffer:
        _cap_cpu_for_next_case()
        try:
            ok = _verify(*json.loads(line))
        except (Exception, TimeoutException):
            ok = False
        os.write(out, b"1\n" if ok else b"0\n")


class _Worker:
    """One grading subprocess, in its own session so a Ctrl-C in the terminal does not hit it."""

    def __init__(self) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-c", "from opo_cli.rewards import _serve_worker; _serve_worker()"]
        self.proc = subprocess.Popen(  # cwd=root: "-c" puts the cwd first on sys.path
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=root,
            start_new_session=True,
        )
        self.fd = self.proc.stdout.fileno()
        self.ready = False

    def send(self, pred: str, gold: str, soft_s: int) -> bool:
        try:
            self.proc.stdin.write(json.dumps([pred, gold, soft_s]).encode() + b"\n")
            self.proc.stdin.flush()
            return True
        except OSError:
            return False

    def read(self) -> bytes:
        """The next message ("ready", "1", "0"); b"" when the worker has died."""
        try:
            return os.read(self.fd, 64).strip()
        except OSError:
            return b""

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()


_STARTUP_S = 30.0  # slack for starting workers (importing sympy) before the first verdict
_RESPAWN_S = 5.0  # slack per round for replacing a killed worker


class _Pool:
    """Grading workers that take one case at a time; a case over its time limit kills its worker."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.workers: list[_Worker] = []

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        self.workers = []

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.workers[self.workers.index(w)] = _Worker()

    def _drop(self, w: _Worker) -> None:
        log.warning("a math grading worker died on start-up (is math-verify installed?)")
        w.kill()
        self.workers.remove(w)

    def run(self, cases: list[tuple[str, str]], timeout_s: float) -> list[bool]:
        """Verdicts of math-verify on (pred, gold) cases; False for any that overran timeout_s."""
        self.workers += [_Worker() for _ in range(self.size - len(self.workers))]
        verdicts = [False] * len(cases)
        todo = deque(range(len(cases)))
        busy: dict[_Worker, tuple[int, float]] = {}  # worker -> (case, deadline)
        rounds = math.ceil(len(cases) / self.size)
        give_up = time.monotonic() + _STARTUP_S + rounds * (timeout_s + _RESPAWN_S)
        soft_s = max(1, int(timeout_s) - 1)  # math-verify's own signal timeout, inside the worker
        try:
            while (todo or busy) and self.workers and time.monotonic() < give_up:
                self._dispatch(cases, todo, busy, timeout_s, soft_s)
                self._collect(verdicts, busy, give_up)
                for w, (_, deadline) in list(busy.items()):
                    if time.monotonic() >= deadline:
                        del busy[w]
                        self._replace(w)
        finally:  # past give_up, or interrupted: a busy worker would answer the next batch late
            for w in busy:
                self._replace(w)
        return verdicts

    def _dispatch(self, cases: list, todo: deque, busy: dict, timeout_s: float, soft_s: int):
        """Hand the next cases to the idle, ready workers; start each case's clock."""
        for w in self.workers:
            if w.ready and w not in busy and todo:
                i = todo.popleft()
                if w.send(*cases[i], soft_s):
                    busy[w] = (i, time.monotonic() + timeout_s)
                else:
                    self._replace(w)

    def _collect(self, verdicts: list[bool], busy: dict, give_up: float) -> None:
        """Wait for the next message or deadline; record verdicts, readiness and deaths."""
        waiting = {w.fd: w for w in self.workers if not w.ready or w in busy}
        until = min([d for _, d in busy.values()] + [give_up])
        ready_fds = wait(list(waiting), max(0.0, until - time.monotonic()))  # poll: no fd limit
        for fd in ready_fds:
            w, msg = waiting[fd], waiting[fd].read()
            if msg == b"ready":
                w.ready = True
            elif msg in (b"1", b"0") and w in busy:
                verdicts[busy.pop(w)[0]] = msg == b"1"
            else:  # died: out of memory, crashed, or never started
                busy.pop(w, None)
                if w.ready:
                    self._replace(w)
                else:
                    self._drop(w)


# ------------------------------------------------------------------------------------ public API

_timeout_s = 5.0  # default hard limit per case sent to math-verify
_workers = min(8, os.cpu_count() or 1)  # grading processes
_pool: _Pool | None = None
_lock = threading.Lock()  # one batch at a time through the pool; callers may be any thread


def configure_math_grading(*, timeout_s: float | None = None, workers: int | None = None) -> None:
    """Set the default per-case time limit (seconds) and the number of grading processes."""
    global _timeout_s, _workers
    if timeout_s is not None:
        _timeout_s = float(timeout_s)
    if workers is not None and max(1, workers) != _workers:
        _workers = max(1, workers)
        shutdown_math_grading()


def shutdown_math_grading() -> None:
    """Kill the grading processes (also run at exit); the next grade starts new ones."""
    global _pool
    with _lock:
        if _pool is not None:
            _pool.close()
        _pool = None


def _forget_pool_in_child() -> None:
    """After os.fork: the parent's workers and lock state are not this process's to use."""
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


atexit.register(shutdown_math_grading)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _triage(response: str, gold: str, fast_path: bool) -> bool | tuple[str, str]:
    """A verdict decided here (no answer, same string), or the (pred, gold) pair to verify."""
    pred = extract_boxed(response)
    ref = extract_boxed(gold) or gold.strip()
    if pred is None or not ref:
        return False
    pred, ref = _normalise(pred), _normalise(ref)
    if not pred or not ref:
        return False
    pred, ref = _read_plain_commas(pred, _is_list(ref)), _read_plain_commas(ref, _is_list(pred))
    pred, ref = _tuple_as_column(pred, ref), _tuple_as_column(ref, pred)
    if fast_path and _key(pred) == _key(ref):
        return True
    if len(pred) > _MAX_ANSWER_CHARS or len(ref) > _MAX_ANSWER_CHARS:
        return False
    same_decimal = _same_decimal(pred, ref)
    if same_decimal is not None:
        return same_decimal
    same_time = _same_time(pred, ref)
    if same_time is not None:  # never the ratio 4:30 that math-verify would read
        return same_time
    same_numeral = _same_numeral(pred, ref)
    if same_numeral is not None:
        return same_numeral
    return pred, ref


def _safe_triage(response: str, gold: str, fast_path: bool) -> bool | tuple[str, str]:
    try:
        return _triage(response, gold, fast_path)
    except Exception:  # e.g. a non-string response; grading never raises
        return False


def _verify_in_pool(cases: list[tuple[str, str]], timeout_s: float) -> list[bool]:
    global _pool
    with _lock:
        try:
            if _pool is None:
                _pool = _Pool(_workers)
            return _pool.run(cases, timeout_s)
        except Exception:  # cannot start processes, ...: grade False, start afresh next time
            log.exception("math grading pool failed; %d cases graded False", len(cases))
            if _pool is not None:
                _pool.close()
            _pool = None
            return [False] * len(cases)


def score_math(
    responses: Sequence[str],
    golds: Sequence[str],
    *,
    timeout_s: float | None = None,
    fast_path: bool = True,
) -> list[float]:
    """1.0 where `grade_math(response, gold)`, else 0.0; graded in parallel, never raises.

    Each case sent to math-verify has `timeout_s` seconds (default: `configure_math_grading`,
    5 s); the whole batch is bounded by a start-up slack plus a few seconds per round of cases.
    `fast_path=False` sends even string-equal answers to math-verify (for benchmarks).
    """
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
    verdicts = [_safe_triage(r, g, fast_path) for r, g in zip(responses, golds, strict=True)]
    todo = [i for i, v in enumerate(verdicts) if isinstance(v, tuple)]
    if todo:
        limit = _timeout_s if timeout_s is None else timeout_s
        checked = _verify_in_pool([verdicts[i] for i in todo], limit)
        for i, ok in zip(todo, checked, strict=True):
            verdicts[i] = ok
    return [float(v) for v in verdicts]


def grade_math(response: str, gold: str, *, timeout_s: float | None = None) -> bool:
    """The last boxed answer of `response` equals the answer of `gold` (MATH solution or answer).

    Never raises, never hangs (hard limit `timeout_s` per case), never evaluates the text as code.
    """
    try:
        return score_math([response], [gold], timeout_s=timeout_s)[0] == 1.0
    except Exception:
        return False


# ------------------------------------------------------------------------------------ shaping


def overlong_penalties(lengths: Sequence[int], *, max_len: int, buffer: int) -> list[float]:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), one value per completion.

    With L = `max_len` and B = `buffer` (tokens): 0 for |y| <= L − B, ((L − B) − |y|) / B for
    L − B < |y| <= L (falling linearly to −1 at L), −1 beyond L. Added to the task reward;
    `buffer=0` turns it off (all zeros).
    """
    if buffer == 0:
        return [0.0] * len(lengths)
    if not 0 < buffer <= max_len:
        raise ValueError(f"buffer must be in [0, max_len={max_len}], got {buffer}")
    start = max_len - buffer  # L − B: the last length without a penalty
    return [-min(max(n - start, 0), buffer) / buffer for n in lengths]


REWARDS: dict[str, Callable[[Sequence[str], Sequence[str]], list[float]]] = {
    "exact_match": score_exact_match,
    "math": score_math,
}


def get_reward(name: str) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    """The batched reward registered as `name`; a miss names the valid ones."""
    if name not in REWARDS:
        raise KeyError(f"unknown reward '{name}'; valid: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]
