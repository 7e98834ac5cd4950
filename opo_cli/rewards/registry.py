"""Rewards by name or import path, and their composition: `dataset.reward` becomes a `Reward`.

    dataset.reward=exact_match                     # a registered name (REWARDS)
    dataset.reward=my_pkg.rewards:brevity          # package.module:function (the current
                                                   # folder is searched too)
    dataset.reward=rewards/mine.py:score           # path/to/file.py:function
    dataset.reward=[math,length_bonus]             # parts, summed with dataset.reward_weights

A reward function is batched, as in TRL: `fn(responses, answers, **columns)` returns one value
per response, a float, or a dict holding "reward" (a float) and any other JSON fields (kept as
extras). `columns` are the rows' other fields, as lists; a function gets those it names, or
all with `**kwargs`, plus `dataset.reward_kwargs.<name>`, plus `correct` (a list of bools) when
it takes it and a correctness reward (`CORRECTNESS`) comes before it in the list. Whatever goes
wrong (unknown name, import error, missing function, an exception, the wrong number of values,
a value that is not a finite number, no result within `dataset.reward_timeout_s`) raises
`RewardError`, one line naming the reward.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from opo_cli.errors import UserError, first_line
from opo_cli.rewards.grading import score_exact_match, score_gsm8k, score_math
from opo_cli.rewards.shaping import length_bonus, repetition_penalty

REWARDS: dict[str, Callable[..., list[float]]] = {
    "exact_match": score_exact_match,
    "math": score_math,
    "gsm8k": score_gsm8k,
    "length_bonus": length_bonus,
    "repetition_penalty": repetition_penalty,
}
CORRECTNESS = ("exact_match", "math", "gsm8k")  # 1.0 for a right answer, 0.0 for a wrong one
RESERVED = ("correct", "overlong")  # part names the reward layer itself writes


class RewardError(UserError):
    """A reward that cannot be loaded or gave an unusable result; the message is one line."""


def get_reward(name: str) -> Callable[..., list[float]]:
    """The batched reward registered as `name`; a miss names the valid ones."""
    if name not in REWARDS:
        raise KeyError(f"unknown reward '{name}'; valid: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


# ------------------------------------------------------------------------------- resolution


def load_function(spec: str) -> Callable:
    """The function `spec` names: a registered name, `package.module:fn` or `file.py:fn`."""
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" not in spec:
        raise RewardError(
            f"reward '{spec}': unknown; use a registered name ({', '.join(REWARDS)}), "
            "package.module:function or path/to/file.py:function"
        )
    where, _, name = spec.rpartition(":")
    is_file = where.endswith(".py") or "/" in where or os.sep in where
    module = _load_file(spec, where) if is_file else _import_module(spec, where)
    fn = getattr(module, name, None)
    if fn is None:
        raise RewardError(f"reward '{spec}': {where} has no function '{name}'")
    if not callable(fn):
        raise RewardError(
            f"reward '{spec}': {where}.{name} is a {type(fn).__name__}, not a function"
        )
    return fn


def _load_file(spec: str, where: str):
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise RewardError(f"reward '{spec}': no such file {where}")
    name = f"opo_reward_{path.stem}_{abs(hash(str(path)))}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickle look modules up by name
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        del sys.modules[name]
        raise RewardError(f"reward '{spec}': {where} failed to import{_cause(e)}") from e
    return module


def _import_module(spec: str, where: str):
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # `opo` as a console script does not search it
    try:
        return importlib.import_module(where)
    except (Exception, SystemExit) as e:
        raise RewardError(f"reward '{spec}': cannot import {where}{_cause(e)}") from e


def _describe(e: BaseException) -> str:
    """`ValueError: bad thing, at mine.py:7`: the exception and the line that raised it."""
    frames = traceback.extract_tb(e.__traceback__)
    at = f", at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(e).__name__}: {first_line(e)}{at}"


def _cause(e: BaseException) -> str:
    return f" ({_describe(e)})"


# ------------------------------------------------------------------------------ composition


@dataclass(frozen=True)
class RewardPart:
    name: str  # metrics log it as reward/<name>
    spec: str  # as written in dataset.reward
    fn: Callable
    weight: float
    kwargs: dict  # dataset.reward_kwargs.<name>
    columns: tuple[str, ...] | None  # columns the function names; None: all (**kwargs)
    takes_correct: bool  # gets `correct` from the correctness reward before it

    @property
    def correctness(self) -> bool:
        return self.spec in CORRECTNESS

    def __call__(self, responses, answers, columns: dict, correct) -> tuple[list[float], list]:
        """Values and extras (dicts, or None each) of the part on one batch, checked."""
        wanted = (
            columns
            if self.columns is None
            else {k: columns[k] for k in self.columns if k in columns}
        )
        extra = {"correct": correct} if self.takes_correct and correct is not None else {}
        try:
            out = self.fn(list(responses), list(answers), **wanted, **self.kwargs, **extra)
        except Exception as e:
            raise RewardError(f"reward '{self.spec}' raised {_describe(e)}") from e
        return checked_values(self.spec, out, len(responses))


def checked_values(spec: str, out: object, n: int) -> tuple[list[float], list[dict | None]]:
    """`out` as n floats and n extras (None where a plain number came back), or a RewardError."""
    if isinstance(out, str | bytes | dict) or not hasattr(out, "__len__"):
        raise RewardError(f"reward '{spec}' returned a {type(out).__name__}, not a list of {n}")
    items = list(out)
    if len(items) != n:
        raise RewardError(f"reward '{spec}' returned {len(items)} values for {n} responses")
    values, extras = [], []
    for i, item in enumerate(items):
        extra = None
        if isinstance(item, dict):
            if "reward" not in item:
                raise RewardError(
                    f"reward '{spec}' returned a dict without 'reward' (response {i})"
                )
            extra = {k: v for k, v in item.items() if k != "reward"}
            try:
                json.dumps(extra)
            except (TypeError, ValueError) as e:
                raise RewardError(f"reward '{spec}' returned extras that are not JSON: {e}") from e
            item = item["reward"]
        if not isinstance(item, numbers.Real) or not math.isfinite(float(item)):
            raise RewardError(
                f"reward '{spec}' returned {item!r:.40} for response {i}: not a finite number"
            )
        values.append(float(item))
        extras.append(extra)
    return values, extras


@dataclass
class Scores:
    total: list[float]  # weighted sum of the parts, per response
    parts: list[dict[str, float]]  # per response: part name -> unweighted value (+ "correct")
    extras: list[dict] | None  # per response: extra fields the functions returned; None: none


class Reward:
    """The composed reward of a dataset: `reward(responses, answers, columns) -> Scores`."""

    def __init__(self, parts: list[RewardPart], timeout_s: float | None):
        self.parts, self.timeout_s = parts, timeout_s
        self.correctness = next((p.name for p in parts if p.correctness), None)
        self._running = parts[0].spec  # the part being called: a timeout names it
        self._has_extras = False  # once extras came back, every batch carries them

    def __call__(self, responses: Sequence[str], answers: Sequence[str], columns=None) -> Scores:
        """Every part on the batch, within `timeout_s` seconds in all (None: no limit)."""
        if self.timeout_s is None:
            return self._score(responses, answers, columns or {})
        box: dict = {}

        def run() -> None:
            try:
                box["scores"] = self._score(responses, answers, columns or {})
            except BaseException as e:  # handed to the caller's thread
                box["error"] = e

        worker = threading.Thread(target=run, name="reward", daemon=True)  # abandoned if it hangs
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            raise RewardError(
                f"reward '{self._running}' gave no result within "
                f"dataset.reward_timeout_s={self.timeout_s:g} s ({len(responses)} responses)"
            )
        if "error" in box:
            raise box["error"]
        return box["scores"]

    def _score(self, responses, answers, columns: dict) -> Scores:
        n = len(responses)
        total, parts, extras = [0.0] * n, [{} for _ in range(n)], [{} for _ in range(n)]
        correct = None
        for part in self.parts:
            self._running = part.spec
            values, part_extras = part(responses, answers, columns, correct)
            if part.correctness and correct is None:
                correct = [v == 1.0 for v in values]
            for i, (v, extra) in enumerate(zip(values, part_extras, strict=True)):
                total[i] += part.weight * v
                parts[i][part.name] = v
                if extra is not None:
                    extras[i] |= extra
                    self._has_extras = True
        for i in range(n if correct is not None else 0):
            parts[i]["correct"] = float(correct[i])
        return Scores(total, parts, extras if self._has_extras else None)

    def probe(self, answers: list[str], columns: dict[str, list]) -> None:
        """Call every part on a small batch (each gold answer as a response, then empty
        responses) so that a broken reward fails before any model is loaded."""
        doubled = {k: v + v for k, v in columns.items()}
        self(answers + [""] * len(answers), answers + answers, doubled)


def build_reward(dataset_cfg: DictConfig) -> Reward:
    """The `Reward` of `dataset.reward`, `reward_weights`, `reward_kwargs`, `reward_timeout_s`."""
    specs = dataset_cfg.reward
    specs = [str(s) for s in specs] if isinstance(specs, ListConfig | list) else [str(specs)]
    if not specs:
        raise RewardError("dataset.reward=[] is not allowed: name at least one reward")
    weights = OmegaConf.select(dataset_cfg, "reward_weights", default=None)
    weights = [1.0] * len(specs) if weights is None else list(weights)
    ok = len(weights) == len(specs) and all(_is_number(w) for w in weights)
    if not ok:
        raise RewardError(
            f"dataset.reward_weights={weights} is not allowed: "
            f"{len(specs)} finite numbers, one per dataset.reward entry"
        )
    kwargs = OmegaConf.select(dataset_cfg, "reward_kwargs", default=None) or {}
    kwargs = (
        OmegaConf.to_container(kwargs, resolve=True) if isinstance(kwargs, DictConfig) else kwargs
    )
    parts: list[RewardPart] = []
    for spec, weight in zip(specs, weights, strict=True):
        parts.append(_part(spec, float(weight), kwargs, parts))
    timeout = OmegaConf.select(dataset_cfg, "reward_timeout_s", default=None)
    if timeout is not None and not (_is_number(timeout) and timeout > 0):
        raise RewardError(f"dataset.reward_timeout_s={timeout} is not allowed: seconds > 0 or null")
    return Reward(parts, None if timeout is None else float(timeout))


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _part(spec: str, weight: float, all_kwargs: dict, before: list[RewardPart]) -> RewardPart:
    fn = load_function(spec)
    name = spec if spec in REWARDS else spec.rpartition(":")[2]
    if name in RESERVED or any(p.name == name for p in before):
        raise RewardError(f"reward '{spec}': a second part named '{name}' in dataset.reward")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    any_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = dict(all_kwargs.get(name) or {})
    for key in kwargs:
        if key not in params and not any_kw:
            raise RewardError(
                f"reward '{spec}': dataset.reward_kwargs.{name}.{key} is not one of its arguments"
            )
    takes_correct = "correct" in params
    needs_correct = takes_correct and params["correct"].default is inspect.Parameter.empty
    if needs_correct and not any(p.correctness for p in before):
        raise RewardError(
            f"reward '{spec}' needs each answer's correctness: list one of "
            f"{', '.join(CORRECTNESS)} before it in dataset.reward"
        )
    reserved = {"correct", *kwargs}
    named = tuple(k for k in list(params)[2:] if k not in reserved)
    return RewardPart(name, spec, fn, weight, kwargs, None if any_kw else named, takes_correct)
