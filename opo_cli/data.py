"""Datasets of prompts with checkable answers, and the seeded, resumable sampler over them.

A dataset is a list of `Problem`s. `arith` is generated offline from a seed (the embedded
default); file- and hub-backed datasets (MATH) load through the same `load_problems`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from omegaconf import DictConfig


@dataclass(frozen=True)
class Problem:
    prompt: str  # text the policy continues (before any chat template)
    answer: str  # gold answer the reward compares against
    meta: dict = field(default_factory=dict, compare=False)  # subject, level, ...


def arith_problems(max_operand: int, ops: str) -> list[Problem]:
    """Every `a<op>b=` with 0 <= a, b <= max_operand, in a fixed order."""
    problems = []
    for op in ops:
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                value = a + b if op == "+" else a - b if op == "-" else a * b
                problems.append(Problem(f"{a}{op}{b}=", str(value), {"op": op}))
    return problems


def split_train_eval(
    problems: list[Problem], eval_size: int, seed: int
) -> tuple[list[Problem], list[Problem]]:
    """A deterministic held-out split: `eval_size` problems drawn with `seed`."""
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    held = set(order[:eval_size])
    train = [p for i, p in enumerate(problems) if i not in held]
    return train, [problems[i] for i in sorted(held)]


def noisy_arith_answer(problem: Problem, rng: random.Random, accuracy: float) -> str:
    """The gold answer with probability `accuracy`, else a near miss (gold +- 1..3)."""
    if rng.random() < accuracy:
        return problem.answer
    miss = int(problem.answer) + rng.choice([-3, -2, -1, 1, 2, 3])
    return str(miss)


def load_problems(cfg: DictConfig) -> tuple[list[Problem], list[Problem]]:
    """Train and held-out problems of the configured dataset."""
    if cfg.name == "arith":
        problems = arith_problems(cfg.max_operand, cfg.ops)
        return split_train_eval(problems, cfg.eval_size, cfg.split_seed)
    raise ValueError(f"unknown dataset '{cfg.name}'")


class PromptSampler:
    """Draws prompts without replacement, reshuffling every epoch; its state is two ints."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0
        self._order = self._shuffled()

    def _shuffled(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[int]:
        """The next `k` indices (crossing an epoch boundary when needed)."""
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffled()
            take = min(k - len(out), self.n - self.pos)
            out += self._order[self.pos : self.pos + take]
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._shuffled()


def warm_start_pairs(
    name: str, problems: list[Problem], n: int, seed: int, accuracy: float
) -> list[tuple[str, str]]:
    """`n` (prompt, completion) demonstrations for the tiny model's supervised warm start.

    On `arith` the teacher is noisy (right with probability `accuracy`, else a near miss), so
    the warm start teaches the format and a spread of answers, and RL has something to find.
    """
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        p = problems[rng.randrange(len(problems))]
        answer = noisy_arith_answer(p, rng, accuracy) if name == "arith" else p.answer
        pairs.append((p.prompt, answer))
    return pairs
