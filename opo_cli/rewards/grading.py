"""Correctness rewards: exact match, MATH graded by math-verify (in killable workers), GSM8K.

`grade_math` / `score_math` grade MATH answers: the last `\\boxed{}` of the response against the
last `\\boxed{}` of the gold solution (or the gold itself when it is a bare answer). Equal
strings after normalisation pass at once; plain decimals, times of day and numerals in a base
are decided here; everything else goes to math-verify in the worker pool (`workers.py`),
where each case has a hard time limit. A number never equals an expression in a variable
(docs/math.md, "Grading"). `score_gsm8k` compares numbers (`answers.gsm8k_number`).

    from opo_cli.rewards import grade_math, score_math
    grade_math(r"so $x=\\boxed{\\dfrac12}$", r"... hence $\\boxed{0.5}$.")   # True
    score_math(responses, golds)                                       # [1.0, 0.0, ...]
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Sequence

from opo_cli.rewards.answers import (
    _is_list,
    _key,
    _normalise,
    _read_plain_commas,
    _same_decimal,
    _same_numeral,
    _same_time,
    _tuple_as_column,
    extract_boxed,
    gsm8k_gold,
    gsm8k_number,
)
from opo_cli.rewards.workers import _Pool

log = logging.getLogger(__name__)

_MAX_ANSWER_CHARS = 2000  # longer "answers" are garbage; never handed to sympy


def exact_match(response: str, gold: str) -> bool:
    """The response, stripped of surrounding white space, equals the gold answer."""
    return response.strip() == gold.strip()


def score_exact_match(responses: Sequence[str], golds: Sequence[str]) -> list[float]:
    return [float(exact_match(r, g)) for r, g in zip(responses, golds, strict=True)]


# --------------------------------------------------------------------------------------- MATH

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


def score_gsm8k(responses: Sequence[str], golds: Sequence[str]) -> list[float]:
    """1.0 where the response's number (`gsm8k_number`: its last `\\boxed{}`'s, else its last)
    equals the gold's (after `####`), as decimals: 1,200 = 1200 = 1200.0 = $1200; else 0.0."""
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
    scores = []
    for response, gold in zip(responses, golds, strict=True):
        pred, ref = gsm8k_number(str(response)), gsm8k_gold(str(gold))
        scores.append(float(pred is not None and pred == ref))
    return scores
