"""Datasets of prompts with checkable answers, and the seeded, resumable sampler over them.

A dataset is a list of `Problem`s. `arith` is generated offline from a seed (the embedded
default); file- and hub-backed datasets (MATH) load through the same `load_problems`.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from opo_cli.errors import UserError, first_line
from opo_cli.rewards import extract_boxed, gsm8k_gold
from opo_cli.tracking import console


class DataError(UserError):
    """A dataset that cannot be read or has nothing usable; the message is one line."""


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
    """The gold answer with probability `accuracy`, else the teacher's habitual slip: it
    stutters, writing the last digit twice (13 -> 133)."""
    if rng.random() < accuracy:
        return problem.answer
    return problem.answer + problem.answer[-1]


def dataset_kind(cfg: DictConfig) -> str:
    """`arith`, `math` (MATH-style rows) or `custom` (prompt and answer columns)."""
    return str(OmegaConf.select(cfg, "kind", default="arith" if cfg.name == "arith" else "math"))


def load_problems(cfg: DictConfig) -> tuple[list[Problem], list[Problem]]:
    """Train and held-out problems of the configured dataset."""
    kind = dataset_kind(cfg)
    if kind == "arith":
        problems = arith_problems(cfg.max_operand, cfg.ops)
        return split_train_eval(problems, cfg.eval_size, cfg.split_seed)
    if kind == "custom":
        return split_custom(cfg)
    if kind == "math":
        levels = configured_levels(cfg.levels, "dataset.levels")
        held_levels = levels
        if cfg.eval_levels is not None:
            held_levels = configured_levels(cfg.eval_levels, "dataset.eval_levels")
        problems = read_math_problems(cfg, levels | held_levels)
        return split_by_level(problems, cfg, levels, held_levels)
    raise DataError(f"dataset.kind={kind} is not allowed: arith, math or custom")


def dataset_problems(cfg: DictConfig) -> list[Problem]:
    """What `opo eval` measures (`eval_split` names it): the held-out problems of arith and of
    a custom dataset read from one file (training draws from the others), the rows of
    `dataset.eval_path`, else every problem of the configured split (`test` for `opo eval`),
    at the configured levels for MATH."""
    split = eval_split(cfg)
    if split == "held_out":
        held_out = load_problems(cfg)[1]
        if not held_out:
            raise DataError(
                f"dataset {cfg.name} holds no held-out problems: set dataset.eval_size > 0"
            )
        return held_out
    if dataset_kind(cfg) == "custom":
        path = OmegaConf.select(cfg, "eval_path", default=None)
        return read_custom_problems(cfg if path is None else with_path(cfg, path))
    return read_math_problems(cfg, configured_levels(cfg.levels, "dataset.levels"))


def eval_split(cfg: DictConfig) -> str:
    """The name of the split `dataset_problems` reads: `held_out` for arith and a custom
    dataset from one file, `dataset.eval_path`, else the configured split of the hub dataset
    or folder (a local MATH file: its path)."""
    kind = dataset_kind(cfg)
    if kind == "arith":
        return "held_out"
    path = None if cfg.path is None else Path(str(cfg.path))
    if kind == "custom":
        eval_path = OmegaConf.select(cfg, "eval_path", default=None)
        if eval_path is not None:
            return str(eval_path)
        return "held_out" if path is not None and not path.is_dir() else str(cfg.split)
    return str(cfg.split) if path is None or path.is_dir() else str(path)


STRATA = ("subject", "level")  # the fields `stratified_sample` keeps in proportion


def stratified_sample(problems: list[Problem], k: int | None, seed: int) -> list[Problem]:
    """`k` of `problems` (all when k is None or >= their count), drawn with `seed`, in their
    order. Problems sharing their `STRATA` values (MATH: subject and level; arith has none,
    one stratum) are a stratum, and each stratum gets its share of `k`: the integer part of
    k * size / total, the remaining draws going to the largest remainders (ties by the seed).
    `eval.limit` takes its K problems so: a file sorted by subject gives every subject.
    """
    if k is None or k >= len(problems):
        return list(problems)
    rng = random.Random(seed)
    strata: dict[tuple, list[int]] = {}
    for i, p in enumerate(problems):
        strata.setdefault(tuple(p.meta.get(f) for f in STRATA), []).append(i)
    groups = list(strata.values())
    quotas = [k * len(g) / len(problems) for g in groups]
    counts = [int(q) for q in quotas]
    ties = [rng.random() for _ in groups]
    by_remainder = sorted(range(len(groups)), key=lambda j: (counts[j] - quotas[j], ties[j]))
    for j in by_remainder[: k - sum(counts)]:
        counts[j] += 1
    chosen = [i for g, c in zip(groups, counts, strict=True) for i in rng.sample(g, c)]
    return [problems[i] for i in sorted(chosen)]


# ------------------------------------------------------------------ MATH-style rows: hub or file


@dataclass
class SkipCounts:
    malformed: int = 0  # not JSON, missing fields, empty problem, no \boxed{} in the solution
    unknown_level: int = 0  # a level that is not a number ("Level ?")


def parse_level(value: object) -> int | None:
    """3 from 3, "3" or "Level 3"; None for anything else ("Level ?", None, True)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(?:level\s*)?(\d+)\s*", value, re.IGNORECASE)
        return int(m[1]) if m else None
    return None


def configured_levels(values: object, key: str) -> set[int]:
    """The level filter of the config (`[3]` or `["Level 3"]`), checked."""
    items = list(values) if isinstance(values, ListConfig | list) else [values]
    levels = {parse_level(v) for v in items}
    if not items or None in levels:
        shown = OmegaConf.to_container(values) if isinstance(values, ListConfig) else values
        raise DataError(f"{key}={shown} is not allowed: a list of levels like [3] or ['Level 3']")
    return levels


def math_problem(row: object) -> Problem | None:
    """A Problem from a MATH-style row (problem, solution, level, type or subject); None if
    malformed. The gold is the whole solution: grading reads its last \\boxed{}."""
    if not isinstance(row, dict) or "level" not in row:
        return None
    problem, solution = row.get("problem"), row.get("solution")
    if not (isinstance(problem, str) and problem.strip() and isinstance(solution, str)):
        return None
    if extract_boxed(solution) is None:
        return None
    subject = row.get("type") or row.get("subject") or "unknown"
    meta = {"subject": str(subject), "level": parse_level(row["level"])}
    return Problem(problem.strip(), solution, meta)


def parse_math_rows(rows: list[object]) -> tuple[list[Problem], SkipCounts]:
    """Usable problems of `rows` (in order) and how many rows were skipped, by reason."""
    problems, skipped = [], SkipCounts()
    for row in rows:
        p = math_problem(row)
        if p is None:
            skipped.malformed += 1
        elif p.meta["level"] is None:
            skipped.unknown_level += 1
        else:
            problems.append(p)
    return problems, skipped


def jsonl_rows(path: Path) -> tuple[list[object], int]:
    """Parsed lines of a JSON Lines file and the number of lines that are not JSON."""
    rows, bad = [], 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return rows, bad


def hub_rows(name: str, split: str, subset: str | None = None) -> list[object]:
    """Rows of `split` of a hub dataset (its configuration `subset`), or of a local dataset
    folder, via `datasets`."""
    import datasets

    try:
        args = (name,) if subset is None else (name, subset)
        return list(datasets.load_dataset(*args, split=split))
    except Exception as e:  # offline, no such dataset or split, bad files: one line for all
        first = first_line(e)
        raise DataError(
            f"cannot load dataset '{name}' split '{split}': {first} "
            "(dataset.path=FILE reads a local copy)"
        ) from e


def parquet_rows(path: Path) -> list[object]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"dataset.path={path}: not a readable Parquet file ({e})") from e


def read_rows(cfg: DictConfig) -> tuple[list[object], int, str]:
    """Raw rows of the configured split, the count of lines that are not JSON, and the source."""
    if cfg.path is None:
        if cfg.hub_id is None:
            raise DataError(f"dataset {cfg.name}: set dataset.path=FILE or dataset.hub_id=NAME")
        subset = OmegaConf.select(cfg, "subset", default=None)
        return hub_rows(cfg.hub_id, cfg.split, subset), 0, f"{cfg.hub_id} [{cfg.split}]"
    path = Path(str(cfg.path)).expanduser()
    if path.is_dir():
        return hub_rows(str(path), cfg.split), 0, f"{path} [{cfg.split}]"
    if not path.is_file():
        raise DataError(f"dataset.path={cfg.path}: no such file or folder")
    if path.suffix == ".parquet":
        return parquet_rows(path), 0, str(path)
    if path.suffix in (".jsonl", ".json"):
        return (*jsonl_rows(path), str(path))
    raise DataError(
        f"dataset.path={cfg.path}: unknown format; use a .jsonl or .parquet file or a folder"
    )


def read_math_problems(cfg: DictConfig, levels: set[int]) -> list[Problem]:
    """The usable problems at `levels`; skipped rows are counted on one console line."""
    rows, not_json, source = read_rows(cfg)
    problems, skipped = parse_math_rows(rows)
    skipped.malformed += not_json
    if skipped.malformed or skipped.unknown_level:
        console.print(
            f"dataset {cfg.name}: skipped {skipped.malformed} malformed rows and "
            f"{skipped.unknown_level} with an unknown level in {source}",
            soft_wrap=True,  # one line, however narrow the terminal
            highlight=False,
        )
    kept = [p for p in problems if p.meta["level"] in levels]
    if not kept:
        raise DataError(
            f"dataset {cfg.name}: no usable problems at levels {sorted(levels)} in {source}"
        )
    return kept


def split_by_level(
    problems: list[Problem], cfg: DictConfig, levels: set[int], held_levels: set[int]
) -> tuple[list[Problem], list[Problem]]:
    """Held-out problems drawn (seeded) from `held_levels`, training problems from `levels`.

    With `held_levels == levels` this is `split_train_eval`; `dataset.train_size` then keeps a
    seeded subset of the training problems (e.g. 10% of Level 3).
    """
    candidates = [p for p in problems if p.meta["level"] in held_levels]
    _, held = split_train_eval(candidates, cfg.eval_size, cfg.split_seed)
    held_set = set(held)
    train = [p for p in problems if p.meta["level"] in levels and p not in held_set]
    if cfg.train_size is not None:
        if not 1 <= cfg.train_size <= len(train):
            raise DataError(
                f"dataset.train_size={cfg.train_size} is not allowed: 1..{len(train)} problems"
            )
        _, train = split_train_eval(train, cfg.train_size, cfg.split_seed)
    if not train:
        raise DataError(
            f"dataset {cfg.name}: no training problems left after holding out {len(held)}"
        )
    return train, held


# --------------------------------------------------------- your own task: prompt/answer columns

_FIELD = re.compile(r"\{(\w+)\}")  # {column} in dataset.template; \\boxed{} is left alone


def with_path(cfg: DictConfig, path: object) -> DictConfig:
    """`cfg` reading the local file or folder `path` instead of its own."""
    return OmegaConf.merge(cfg, {"path": str(path)})


def custom_problem(row: object, prompt_key: str, answer_key: str, template: str) -> Problem | None:
    """A Problem from a row with a non-empty text `prompt_key` and an `answer_key` (any
    scalar, as text), the user turn `template` with each {column} filled in ({prompt} is
    `prompt_key`'s); None if malformed. The other columns are kept (`meta`): rewards get them."""
    if not isinstance(row, dict):
        return None
    prompt, answer = row.get(prompt_key), row.get(answer_key)
    if not (isinstance(prompt, str) and prompt.strip()):
        return None
    if answer is None or isinstance(answer, dict | list) or not str(answer).strip():
        return None
    fields = {"prompt": prompt, **row}
    if any(fields.get(name) is None for name in _FIELD.findall(template)):
        return None
    text = _FIELD.sub(lambda m: str(fields[m[1]]), template)
    meta = {k: v for k, v in row.items() if k not in (prompt_key, answer_key)}
    return Problem(text, str(answer), meta)


def read_custom_problems(cfg: DictConfig) -> list[Problem]:
    """The usable rows of the configured file, folder or hub split as Problems; skipped rows
    are counted on one console line, and none usable is an error that says what rows need."""
    rows, not_json, source = read_rows(cfg)
    template = str(cfg.template)
    problems = [custom_problem(r, cfg.prompt_key, cfg.answer_key, template) for r in rows]
    kept = [p for p in problems if p is not None]
    skipped = len(problems) - len(kept) + not_json
    if skipped:
        console.print(
            f"dataset {cfg.name}: skipped {skipped} malformed rows in {source}",
            soft_wrap=True,
            highlight=False,
        )
    if not kept:
        named = {cfg.prompt_key if n == "prompt" else n for n in _FIELD.findall(template)}
        columns = sorted({cfg.prompt_key, cfg.answer_key, *named})
        raise DataError(
            f"dataset {cfg.name}: no usable rows in {source}: each needs the columns "
            f"{', '.join(columns)} (dataset.prompt_key, dataset.answer_key, dataset.template)"
        )
    return kept


def split_custom(cfg: DictConfig) -> tuple[list[Problem], list[Problem]]:
    """Training problems and held-out ones: the rows of `dataset.eval_path` when set, else
    `eval_size` rows drawn with `split_seed` (as for MATH)."""
    problems = read_custom_problems(cfg)
    eval_path = OmegaConf.select(cfg, "eval_path", default=None)
    if eval_path is not None:
        if not Path(str(eval_path)).expanduser().exists():
            raise DataError(f"dataset.eval_path={eval_path}: no such file or folder")
        return problems, read_custom_problems(with_path(cfg, eval_path))
    train, held = split_train_eval(problems, cfg.eval_size, cfg.split_seed)
    if not train:
        raise DataError(
            f"dataset {cfg.name}: no training problems left after holding out {len(held)} "
            f"of {len(problems)} (dataset.eval_size)"
        )
    return train, held


# ------------------------------------------------------------------------------------ prompts


def format_prompt(
    problem: Problem, tok, template: str | None, *, enable_thinking: bool = False
) -> str:
    """The text the policy continues.

    `template` (its `{problem}` replaced by the problem text) goes through the tokenizer's
    chat template as one user turn when the tokenizer has one, else it is used as plain text.
    With no template (arith) the prompt is used as it is. `enable_thinking` reaches chat
    templates that read it (Qwen3); the others ignore it.
    """
    if template is None:
        return problem.prompt
    text = template.replace("{problem}", problem.prompt)
    if not getattr(tok, "chat_template", None):
        return text
    return tok.apply_chat_template(
        [{"role": "user", "content": text}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )


def prompt_texts(problems: list[Problem], tok, dataset_cfg: DictConfig) -> list[str]:
    """`format_prompt` of each problem with the dataset's template (none for arith)."""
    template = OmegaConf.select(dataset_cfg, "template", default=None)
    if dataset_kind(dataset_cfg) == "custom":
        template = "{problem}"  # filled in from the row's columns when read (custom_problem)
    thinking = bool(OmegaConf.select(dataset_cfg, "enable_thinking", default=False))
    return [format_prompt(p, tok, template, enable_thinking=thinking) for p in problems]


def formatted_problems(problems: list[Problem], tok, dataset_cfg: DictConfig) -> list[Problem]:
    """The problems with their prompts replaced by `prompt_texts`: formatted once per run."""
    texts = prompt_texts(problems, tok, dataset_cfg)
    return [replace(p, prompt=t) for p, t in zip(problems, texts, strict=True)]


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

    def drawn_since(self, state: dict) -> list[int]:
        """The indices drawn since the sampler was at `state` (an earlier `state_dict()`),
        in order; the sampler itself is left where it is."""
        replay = PromptSampler(self.n, self.seed)
        replay.load_state_dict(state)
        count = (self.epoch - replay.epoch) * self.n + self.pos - replay.pos
        return replay.next(count)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._shuffled()


def warm_start_pairs(
    kind: str, problems: list[Problem], n: int, seed: int, accuracy: float
) -> list[tuple[str, str]]:
    """`n` (prompt, completion) demonstrations for the tiny model's supervised warm start.

    On a generated arithmetic dataset (kind `arith`: arith, arith_hard) the teacher is noisy
    (right with probability `accuracy`, else it stutters), so the warm start teaches the
    format and a wrong habit, and RL has something to find.
    Elsewhere it states the answer only (`short_solution`): MATH's boxed answer, GSM8K's
    number, a custom dataset's answer as it stands.
    """
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        p = problems[rng.randrange(len(problems))]
        if kind == "arith":
            answer = noisy_arith_answer(p, rng, accuracy)
        else:
            answer = short_solution(p.answer)
        pairs.append((p.prompt, answer))
    return pairs


def short_solution(gold: str) -> str:
    """`The answer is $\\boxed{X}$.` for a gold solution with a box (MATH), or for one ending in
    `#### X` (GSM8K): the format the reward reads, in a few tokens (whole solutions, hundreds
    of tokens each, made the tiny warm start minutes long); any other gold as it stands."""
    answer = extract_boxed(gold)
    if answer is None and "####" in gold:
        answer = gsm8k_gold(gold)
    return gold if answer is None else f"The answer is $\\boxed{{{answer}}}$."
