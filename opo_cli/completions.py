"""What the model writes: sampled completions as rows, in JSONL files, on W&B and on the console.

Every `tracking.completions_every` steps, the first `tracking.completions_per_step` groups of
the step's rollout are written to `completions.jsonl` in the run folder, one row per
completion: the step, the prompt and gold answer, the completion, its total reward and reward
parts, the advantage or drive its loss gave it (`opo_cli.losses.DRIVES`), its length in
tokens and whether it was cut off, and any extra fields the reward functions returned. An
evaluation during training writes the greedy answers to a few held-out problems to
`eval_completions.jsonl`. With W&B on, the same rows go to the tables `train/completions` and
`eval/completions`. `opo report` shows the last logged groups of each run (`samples_page`).

The files stay valid JSONL whatever the model writes: text is stored whole, as ASCII JSON
(control characters and non-ASCII escaped, lone surrogates replaced by U+FFFD, non-finite
numbers as strings); only the console line is cut. On resume, rows after the checkpoint's step
are dropped, as `metrics.jsonl`'s are. Nothing here imports torch (the loss's drive is
imported when a step first logs).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from opo_cli.config import TrackingSettings
from opo_cli.rewards import extract_boxed

COMPLETIONS_FILE = "completions.jsonl"
EVAL_COMPLETIONS_FILE = "eval_completions.jsonl"


# ------------------------------------------------------------------------------ safe text


def clean_text(text: str) -> str:
    """`text` with lone surrogates (which no UTF-8 file can hold) replaced by U+FFFD; a
    surrogate pair becomes the character it encodes."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def json_safe(value: Any) -> Any:
    """`value` as plain JSON: clean strings, non-finite floats as strings ("nan", "inf"),
    tuples as lists, anything else (a reward function's odd extra) as its `str`."""
    if isinstance(value, str):
        return clean_text(value)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {clean_text(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a 0-d tensor or array
        return json_safe(value.item())
    return clean_text(str(value))


def json_line(row: dict) -> str:
    """One JSONL line, pure ASCII, whatever the row's text holds."""
    return json.dumps(json_safe(row)) + "\n"


def one_line(text: str, width: int) -> str:
    """`text` on one console line of at most `width` characters: what does not print
    (newlines, tabs, escape sequences, other control characters) shown escaped, the rest cut
    with an ellipsis."""
    out = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
        for ch in clean_text(text)
    )
    return out if len(out) <= width else out[: max(width - 1, 0)] + "…"


# ------------------------------------------------------------------------------ the files


class RowsFile:
    """An append-only JSONL file of rows that each hold a `step`. Opening it keeps the rows of
    steps up to `keep_until_step` (a resumed run's checkpoint) and drops the rest, with any
    line cut off or damaged by a crash."""

    def __init__(self, path: Path, keep_until_step: int):
        if path.exists():
            kept = path.with_name(path.name + ".tmp")
            with path.open(encoding="utf-8", errors="replace") as src, kept.open("w") as dst:
                dst.writelines(line for line in src if row_step(line) <= keep_until_step)
            os.replace(kept, path)
        self._f = path.open("a", encoding="ascii")

    def write(self, rows: Sequence[dict]) -> None:
        self._f.write("".join(json_line(r) for r in rows))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def parse_row(line: str) -> dict | None:
    """The row a JSONL line holds; None for a line that is not a row with a numeric step."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    ok = isinstance(step, int | float) and not isinstance(step, bool) and math.isfinite(step)
    return row if ok else None


def row_step(line: str) -> float:
    """The step of a JSONL line; infinity for a line that is not a row."""
    row = parse_row(line)
    return math.inf if row is None else row["step"]


def read_rows(path: Path) -> list[dict]:
    """The readable rows of a completions file, in file order (damaged lines skipped)."""
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", errors="replace") as f:
        return [row for row in map(parse_row, f) if row is not None]


# ------------------------------------------------------------------------------ rows


def gold_answer(answer: str | None) -> str | None:
    """The gold answer a row shows: a MATH solution's last boxed answer, else the answer."""
    if answer is None:
        return None
    return extract_boxed(answer) or answer


def drives(rollout, loss: str, loss_kwargs: dict) -> tuple[str, list[float]]:
    """What the method's loss moves each row by (`opo_cli.losses.DRIVES`), and its label."""
    from opo_cli.losses import DRIVES  # imports torch; a step that logs already holds it

    label, drive = DRIVES[loss]
    return label, drive(rollout.rewards.float(), rollout.group_size, **loss_kwargs).tolist()


def rollout_rows(
    step: int, rollout, groups: int, problems: Sequence, drive: tuple[str, list[float]]
) -> list[dict]:
    """The rows of the first `groups` groups of `rollout`; `problems[k]` is group k's problem
    (an object with `prompt` and `answer`; None when unknown: the prompt is then the decoded
    tokens, see `CompletionLog`)."""
    G = rollout.group_size
    n = min(groups, len(rollout) // G) * G
    prompt_width = rollout.input_ids.shape[1] - rollout.completion_len
    tokens = rollout.attention_mask[:n, prompt_width:].sum(-1).tolist()  # kept even when masked
    rewards = rollout.rewards[:n].tolist()
    truncated = rollout.truncated[:n].tolist()
    parts = getattr(rollout, "reward_parts", None)
    extras = getattr(rollout, "reward_extras", None)
    label, advantages = drive
    rows = []
    for i in range(n):
        problem = problems[i // G]
        row = {"step": step, "group": i // G, "prompt": problem.prompt}
        row |= {"gold": gold_answer(problem.answer), "completion": rollout.texts[i]}
        row |= {"reward": rewards[i]}
        if parts is not None:
            row["reward_parts"] = parts[i]
        row |= {"advantage": advantages[i], "advantage_of": label}
        row |= {"tokens": int(tokens[i]), "truncated": bool(truncated[i])}
        if extras is not None and extras[i]:
            row["extras"] = extras[i]
        rows.append(row)
    return rows


def eval_rows(step: int, graded: Sequence, problems: int) -> list[dict]:
    """The greedy answers to the first `problems` held-out problems, with their verdicts."""
    rows = []
    for g in graded[:problems]:
        for response, correct, tokens, cut in zip(
            g.responses, g.correct, g.lengths, g.truncated, strict=True
        ):
            row = {"step": step, "prompt": g.problem.prompt, "gold": gold_answer(g.problem.answer)}
            row |= {"completion": response, "correct": bool(correct)}
            row |= {"tokens": int(tokens), "truncated": bool(cut)}
            rows.append(row)
    return rows


def sample_line(row: dict, width: int) -> str:
    """The console line of one logged completion."""
    head = f"  sample  reward {row['reward']:.3g}  {row['advantage_of']} {row['advantage']:+.3g}  "
    return head + one_line(row["completion"], max(width - len(head), 16))


def flat_columns(rows: Sequence[dict]) -> list[str]:
    """Table columns: the rows' keys, dict fields spread as `field/key` (reward_parts as
    `reward/<part>`, extras as `extra/<key>`), in order of first appearance."""
    columns: dict[str, None] = {}
    for row in rows:
        columns |= dict.fromkeys(flat_row(row))
    return list(columns)


def flat_row(row: dict) -> dict:
    prefixes = {"reward_parts": "reward/", "extras": "extra/"}
    flat = {}
    for key, value in json_safe(row).items():
        if key in prefixes and isinstance(value, dict):
            for k, v in value.items():
                flat[prefixes[key] + k] = v if not isinstance(v, dict | list) else json.dumps(v)
        else:
            flat[key] = value
    return flat


def wandb_table(rows: Sequence[dict]):
    """A W&B table of `rows` (one column per `flat_columns`, None where a row has no value).
    Rows are added one by one: `wandb.Table(data=...)` imports pandas (0.3-0.6 s) to check
    whether the data is a DataFrame."""
    import wandb

    columns = flat_columns(rows)
    table = wandb.Table(columns=columns)
    for row in map(flat_row, rows):
        table.add_data(*(row.get(c) for c in columns))
    return table


# ------------------------------------------------------------------------------ the logger


class PromptMatcher:
    """The problems behind a rollout's groups: those the sampler drew since the previous step
    (`PromptSampler.drawn_since`), matched on the prompt's tokens (what the sampler was fed),
    so groups DAPO's dynamic sampling kept or dropped are found all the same."""

    def __init__(self, problems: Sequence, sampler, tok):
        self.problems, self.sampler, self.tok = problems, sampler, tok
        self.before = sampler.state_dict()

    def step_done(self) -> None:
        self.before = self.sampler.state_dict()

    def find(self, rollout, groups: int) -> list:
        """The problem of each of the first `groups` groups (a stand-in holding the decoded
        prompt and no gold when no drawn problem has its tokens)."""
        drawn = [self.problems[i] for i in self.sampler.drawn_since(self.before)]
        ids = self.tok([p.prompt for p in drawn])["input_ids"] if drawn else []
        by_ids = {tuple(x): p for x, p in zip(ids, drawn, strict=True)}
        width = rollout.input_ids.shape[1] - rollout.completion_len
        found = []
        for k in range(min(groups, len(rollout) // rollout.group_size)):
            row = k * rollout.group_size
            prompt = rollout.input_ids[row, :width][rollout.attention_mask[row, :width].bool()]
            key = tuple(prompt.tolist())
            found.append(by_ids.get(key) or UnknownProblem(self.tok.decode(list(key))))
        return found


@dataclass(frozen=True)
class UnknownProblem:
    """A group whose problem was not found: its decoded prompt (None: unknown), no gold."""

    prompt: str | None
    answer: str | None = None


class CompletionLog:
    """completions.jsonl, eval_completions.jsonl, their W&B tables and the console sample line.

    `step_rows` builds a logged step's rows (none on other steps); the `Tracker` writes them
    with the step's metrics, so W&B gets one call per step.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, s: TrackingSettings, start_step: int):
        self.s = s
        self.loss = str(cfg.method.loss)
        self.loss_kwargs = OmegaConf.to_container(cfg.method.loss_kwargs, resolve=True)
        self.train_file = RowsFile(run_dir / COMPLETIONS_FILE, keep_until_step=start_step)
        self.eval_file = RowsFile(run_dir / EVAL_COMPLETIONS_FILE, keep_until_step=start_step)
        self.prompts: PromptMatcher | None = None
        self.pending_eval: list = []

    def logs(self, step: int) -> bool:
        every = self.s.completions_every
        return every > 0 and step % every == 0 and self.s.completions_per_step > 0

    def step_rows(self, step: int, rollout) -> list[dict]:
        """The logged groups' rows of `step` (empty when the step logs none)."""
        rows = []
        if rollout is not None and self.logs(step):
            groups = self.s.completions_per_step
            if self.prompts is not None:
                problems = self.prompts.find(rollout, groups)
            else:
                problems = [UnknownProblem(None)] * groups
            drive = drives(rollout, self.loss, self.loss_kwargs)
            rows = rollout_rows(step, rollout, groups, problems, drive)
        if self.prompts is not None:
            self.prompts.step_done()
        return rows

    def write(self, step: int, rows: list[dict]) -> dict[str, list[dict]]:
        """Write `rows` and the answers of an evaluation at `step` (`pending_eval`); returns
        them by W&B table name."""
        answers = eval_rows(step, self.pending_eval, self.s.eval_completions)
        self.pending_eval = []
        self.train_file.write(rows)
        self.eval_file.write(answers)
        tables = {"train/completions": rows, "eval/completions": answers}
        return {name: rows for name, rows in tables.items() if rows}

    def close(self) -> None:
        self.train_file.close()
        self.eval_file.close()


# ------------------------------------------------------------------------------ report page


def readable(text: str, max_chars: int) -> str:
    """`text` for a Markdown page: lines kept, other non-printing characters escaped, cut to
    `max_chars` with a note of how much was left out."""
    out = "".join(
        ch if ch.isprintable() or ch in "\n\t" else ch.encode("unicode_escape").decode("ascii")
        for ch in clean_text(text)
    )
    if len(out) <= max_chars:
        return out
    return out[:max_chars] + f"\n… ({len(out) - max_chars} more characters in the file)"


def fenced(text: str) -> str:
    """`text` as a Markdown code block whose fence no run of backticks in it can close."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def fmt_number(value: Any) -> str:
    return (
        f"{value:.3g}"
        if isinstance(value, int | float) and not isinstance(value, bool)
        else str(value)
    )


def completion_heading(i: int, row: dict) -> str:
    """`**1.** reward 1 (correct 1, format 0) · g +0.12 · 45 tokens, truncated`"""
    parts = row.get("reward_parts") or {}
    detail = ", ".join(f"{k} {fmt_number(v)}" for k, v in parts.items())
    text = f"**{i}.** reward {fmt_number(row.get('reward'))}" + (f" ({detail})" if detail else "")
    if "advantage" in row:
        text += f" · {row.get('advantage_of', 'advantage')} {fmt_number(row['advantage'])}"
    if "correct" in row:
        text += " · correct" if row["correct"] else " · wrong"
    text += f" · {row.get('tokens')} tokens" + (", truncated" if row.get("truncated") else "")
    extras = row.get("extras") or {}
    if extras:
        text += " · " + ", ".join(f"{k}: {json.dumps(v)}" for k, v in extras.items())
    return text


def groups_section(rows: Sequence[dict], max_chars: int, key: str) -> list[str]:
    """Markdown lines of `rows` grouped by prompt (`key`: the row field naming the group)."""
    lines: list[str] = []
    by_group: dict[Any, list[dict]] = {}
    for row in rows:
        by_group.setdefault(row.get(key), []).append(row)
    for members in by_group.values():
        first = members[0]
        lines += [f"### Prompt (gold: `{readable(str(first.get('gold')), 200)}`)", ""]
        lines += [fenced(readable(str(first.get("prompt")), max_chars)), ""]
        for i, row in enumerate(members, 1):
            lines += [
                completion_heading(i, row),
                "",
                fenced(readable(row["completion"], max_chars)),
                "",
            ]
    return lines


def samples_page(
    name: str, train_rows: Sequence[dict], eval_rows: Sequence[dict], max_chars: int
) -> str:
    """The Markdown page of a run's last logged groups (and last evaluation's answers)."""
    lines = [f"# What {name} writes", ""]
    if train_rows:
        step = train_rows[-1]["step"]
        last = [r for r in train_rows if r["step"] == step]
        lines += [f"## Training step {step}: the last logged groups", ""]
        cut = f"cut at {max_chars} characters here, whole in the file"
        lines += [f"From `{COMPLETIONS_FILE}` ({cut}).", ""]
        lines += groups_section(last, max_chars, "group")
    if eval_rows:
        step = eval_rows[-1]["step"]
        last = [r for r in eval_rows if r["step"] == step]
        lines += [f"## Evaluation at step {step}: greedy answers", ""]
        lines += groups_section(last, max_chars, "prompt")
    return "\n".join(lines)
