"""Rewards: one float per (response, gold answer), chosen by name or import path, composed.

- `registry.py`: `dataset.reward` (a registered name, `package.module:function`,
  `path/to/file.py:function`, or a list of them with weights) becomes a `Reward`; every bad
  reward is a one-line `RewardError`.
- `grading.py`: the correctness rewards: exact match, MATH (`grade_math`, math-verify in the
  killable workers of `workers.py`) and GSM8K; `answers.py` reads the answers they compare.
- `shaping.py`: DAPO's overlong penalty and the OPO paper's length bonus and repetition penalty.

    from opo_cli.rewards import grade_math, score_math
    grade_math(r"so $x=\\boxed{\\dfrac12}$", r"... hence $\\boxed{0.5}$.")   # True
"""

from opo_cli.rewards.answers import answer_key, extract_boxed, gsm8k_gold, gsm8k_number
from opo_cli.rewards.grading import (
    configure_math_grading,
    exact_match,
    grade_math,
    score_exact_match,
    score_gsm8k,
    score_math,
    shutdown_math_grading,
)
from opo_cli.rewards.registry import (
    CORRECTNESS,
    REWARDS,
    Reward,
    RewardError,
    Scores,
    build_reward,
    get_reward,
    load_function,
)
from opo_cli.rewards.shaping import (
    length_bonus,
    overlong_penalties,
    repeated_share,
    repetition_penalty,
)

__all__ = [
    "CORRECTNESS",
    "REWARDS",
    "Reward",
    "RewardError",
    "Scores",
    "answer_key",
    "build_reward",
    "configure_math_grading",
    "exact_match",
    "extract_boxed",
    "get_reward",
    "grade_math",
    "gsm8k_gold",
    "gsm8k_number",
    "length_bonus",
    "load_function",
    "overlong_penalties",
    "repeated_share",
    "repetition_penalty",
    "score_exact_match",
    "score_gsm8k",
    "score_math",
    "shutdown_math_grading",
]
