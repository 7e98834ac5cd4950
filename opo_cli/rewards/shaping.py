"""Shaping rewards: terms added to a task's correctness, each a reward part of its own.

- `overlong_penalties`: DAPO's soft punishment of long completions (tokens; rollout layer).
- `length_bonus`, `repetition_penalty`: the OPO paper's shaping, as its author's verl code
  computes it (`verl/utils/reward_score/math_adpo.py` of github wk222/verlm). A wrong answer
  that is not repetitive earns min(chars / 2000, 0.1); one whose word 3-grams repeat gets
  -0.25 x (share repeated), or -0.5 flat once more than 30% repeat; a right answer gets
  neither. With `dataset.reward=[math,length_bonus,repetition_penalty]` the sum is that code's
  score (docs/rewards.md). Both take `correct`, which the composition passes from the
  correctness reward listed before them.
"""

from __future__ import annotations

from collections.abc import Sequence


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


def repeated_share(text: str, ngram: int) -> float:
    """1 − (distinct word n-grams) / (n-grams) of `text`, lower-cased; 0 below n words."""
    words = text.lower().split()
    total = len(words) - ngram + 1
    if total <= 0:
        return 0.0
    distinct = len({tuple(words[i : i + ngram]) for i in range(total)})
    return 1.0 - distinct / total


def length_bonus(
    responses: Sequence[str],
    answers: Sequence[str],
    *,
    correct: Sequence[bool],
    max_bonus: float = 0.1,
    scale_chars: float = 2000.0,
    ngram: int = 3,
    repetition_threshold: float = 0.3,
) -> list[float]:
    """min(len(response) / scale_chars, max_bonus) on a wrong answer whose repeated n-gram
    share is at most `repetition_threshold` (past it the repetition penalty replaces the
    bonus); 0 on a right answer. Rewards writing something rather than nothing."""
    return [
        0.0
        if ok or repeated_share(r, ngram) > repetition_threshold
        else min(len(r) / scale_chars, max_bonus)
        for r, ok in zip(responses, correct, strict=True)
    ]


def repetition_penalty(
    responses: Sequence[str],
    answers: Sequence[str],
    *,
    correct: Sequence[bool],
    max_penalty: float = 0.5,
    scale: float = 0.5,
    ngram: int = 3,
    threshold: float = 0.3,
    threshold_penalty: float = 0.5,
) -> list[float]:
    """On a wrong answer with repeated n-gram share s: −threshold_penalty when s > threshold,
    else −scale · max_penalty · s; 0 on a right answer. Punishes looping text."""
    out = []
    for r, ok in zip(responses, correct, strict=True):
        s = 0.0 if ok else repeated_share(r, ngram)
        out.append(-threshold_penalty if s > threshold else -scale * max_penalty * s)
    return [v + 0.0 for v in out]  # -0.0 -> 0.0
