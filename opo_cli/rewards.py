"""Reward functions: one float per (response, gold answer) pair, chosen by name.

`grade_math` / `score_math` grade MATH answers: the last `\\boxed{}` of the response against the
last `\\boxed{}` of the gold solution (or the gold itself when it is a bare answer). Equal
strings after light normalisation pass at once; everything else goes to math-verify, which runs
in a small pool of grading subprocesses. Each case has a hard time limit: a worker that overruns
it is killed and replaced, so a pathological answer (say `9^{9^{9^{9}}}`, which sympy tries to
expand inside C code that no signal can interrupt) costs one case, never the run. The parent
process never imports sympy and never evaluates model text.

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

_DROP = [  # (pattern, replacement): presentation only, never the value
    (re.compile(r"\\(?:left|right)(?![A-Za-z])"), ""),
    (re.compile(r"\\[dt]frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(r"(\\\\)|\\[,;:! ]"), r"\1"),  # thin spaces go, a \\ row break stays
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree"), ""),  # 30^\circ -> 30
    (re.compile(r"\\?%"), ""),  # 10\% -> 10: MATH graders read "what percent" answers this way
    (re.compile(r"\\?\$"), ""),  # \$18.90 and stray math delimiters
]
_REPEATING = re.compile(r"^(-?)(\d*)\.(\d*)\\overline\{(\d{1,30})\}$")


def _repeating_decimal(ans: str) -> str:
    """0.\\overline{3} -> \\frac{1}{3}: math-verify cannot parse repeating decimals."""
    m = _REPEATING.match(ans)
    if m is None or len(m[2]) + len(m[3]) > 30:
        return ans
    sign, whole, fixed, rep = m.groups()
    value = Fraction(int(whole or "0")) + Fraction(int(fixed or "0"), 10 ** len(fixed))
    value += Fraction(int(rep), 10 ** len(fixed) * (10 ** len(rep) - 1))
    return f"{sign}\\frac{{{value.numerator}}}{{{value.denominator}}}"


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
    """Strip presentation (\\left, \\dfrac, spacing, degrees, %, $, final period)."""
    for pattern, repl in _DROP:
        ans = pattern.sub(repl, ans)
    ans = ans.strip().rstrip(".").strip()
    return _repeating_decimal(ans)


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
    from math_verify import LatexExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig(boxed_match_priority=0)]
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
    pred, ref = _tuple_as_column(pred, ref), _tuple_as_column(ref, pred)
    if fast_path and _key(pred) == _key(ref):
        return True
    if len(pred) > _MAX_ANSWER_CHARS or len(ref) > _MAX_ANSWER_CHARS:
        return False
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
