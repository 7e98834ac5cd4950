"""`opo eval`: a checkpoint's accuracy on MATH; greedy pass@1, or pass@k and maj@k of n samples.

    opo eval checkpoint=outputs/train/default dataset=math_l3 eval.limit=100
    opo eval checkpoint=Qwen/Qwen2.5-Math-1.5B dataset=math500 eval.n=8

Writes `eval.json` (accuracy, per-subject and per-level breakdowns, pass@k and maj@k) and
`samples.jsonl` (every response, graded) into the run folder. `held_out_metrics` is the same
evaluation, greedy, that `opo train eval.every=N` runs on the held-out problems.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from opo_cli.backends import Backend, BackendOptions, open_backend
from opo_cli.config import EvalSettings
from opo_cli.data import Problem, dataset_problems, prompt_texts
from opo_cli.errors import UserError
from opo_cli.models import load_policy, pick_device, pick_dtype
from opo_cli.rewards import answer_key, extract_boxed, get_reward
from opo_cli.rollout import generate_rollout
from opo_cli.runs import check_eval
from opo_cli.tracking import console, start_wandb, warn_damaged


@dataclass
class Graded:
    """One problem's n responses, graded by the dataset's reward (correct: reward 1)."""

    problem: Problem
    responses: list[str]
    correct: list[bool]
    lengths: list[int]  # completion tokens, EOS included
    truncated: list[bool]  # no EOS within max_new_tokens


# ------------------------------------------------------------------------------------ metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:  # every draw of k samples holds a correct one
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def math_answer_key(response: str) -> str | None:
    """The last boxed answer, normalised as the grader does (\\dfrac -> \\frac, spaces, ...)."""
    answer = extract_boxed(response)
    return None if answer is None else answer_key(answer)


def exact_answer_key(response: str) -> str | None:
    return response.strip() or None


ANSWER_KEYS: dict[str, Callable[[str], str | None]] = {
    "math": math_answer_key,
    "exact_match": exact_answer_key,
}


def majority_correct(
    responses: list[str], correct: list[bool], answer_key: Callable[[str], str | None]
) -> bool:
    """Whether the most frequent answer is right (ties: the answer seen first; none: wrong)."""
    keys = [answer_key(r) for r in responses]
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return False
    top = max(votes, key=votes.__getitem__)  # first of the most common, in order of appearance
    return correct[keys.index(top)]


def breakdown(graded: list[Graded], field: str, label: str = "{}") -> dict[str, dict]:
    """{value: {n, accuracy}} over the problems' `meta[field]` (absent in arith: empty)."""
    groups: dict[str, list[float]] = {}
    for g in graded:
        if field in g.problem.meta:
            name = label.format(g.problem.meta[field])
            groups.setdefault(name, []).append(sum(g.correct) / len(g.correct))
    return {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(groups.items())}


def summarise(
    graded: list[Graded], ks: tuple[int, ...], answer_key: Callable[[str], str | None]
) -> dict:
    """accuracy (mean pass@1 = c/n), lengths, pass@k and maj@k (n > 1), breakdowns."""
    n = len(graded[0].responses)
    lengths = [x for g in graded for x in g.lengths]
    out = {
        "accuracy": sum(sum(g.correct) / n for g in graded) / len(graded),
        "n": len(graded),
        "samples_per_problem": n,
        "response_len_mean": sum(lengths) / len(lengths),
        "truncated_frac": sum(t for g in graded for t in g.truncated) / len(lengths),
    }
    if n > 1:
        for k in ks:
            out[f"pass@{k}"] = sum(pass_at_k(n, sum(g.correct), k) for g in graded) / len(graded)
        for k in ks:
            votes = [majority_correct(g.responses[:k], g.correct[:k], answer_key) for g in graded]
            out[f"maj@{k}"] = sum(votes) / len(votes)
    out["by_subject"] = breakdown(graded, "subject")
    out["by_level"] = breakdown(graded, "level", "Level {}")
    return out


# --------------------------------------------------------------------------------- generation


def generate_completions(
    model,
    tok,
    prompts: list[str],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    backend: Backend | None = None,
) -> tuple[list[str], list[int], list[bool]]:
    """n completions per prompt (greedy when n == 1), grouped by prompt: texts, token counts
    (EOS included) and truncated flags. Sampling is at `temperature` with `top_p` and nothing
    else, whatever the model's own generation config says; any EOS id it names ends a
    completion (`opo_cli.generation`). `backend` samples them (None: HF `generate`)."""
    rollout = generate_rollout(
        model,
        tok,
        prompts,
        group_size=n,
        max_new_tokens=max_new_tokens,
        temperature=0.0 if n == 1 else temperature,  # 0: greedy
        top_p=top_p,
        backend=backend if backend is not None else "hf",
        share_prefill=False,
    )
    lengths = rollout.completion_mask.sum(-1).long().tolist()
    return rollout.texts, lengths, rollout.truncated.tolist()


def evaluate_problems(
    model,
    tok,
    problems: list[Problem],
    dataset_cfg: DictConfig,
    s: EvalSettings,
    on_batch: Callable[[int], None] | None = None,
    backend: Backend | None = None,
) -> list[Graded]:
    """Generate (with `backend`; None: HF `generate`) and grade `s.n` responses per problem,
    `s.batch_size` problems at a time.

    Prompts are batched in order of length (less padding); results keep the problems' order.
    """
    prompts = prompt_texts(problems, tok, dataset_cfg)
    reward_fn = get_reward(dataset_cfg.reward)
    order = sorted(range(len(problems)), key=lambda i: len(prompts[i]))
    graded: list[Graded | None] = [None] * len(problems)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), s.batch_size):
        batch = order[start : start + s.batch_size]
        texts, lengths, truncated = generate_completions(
            model,
            tok,
            [prompts[i] for i in batch],
            n=s.n,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            backend=backend,
        )
        rewards = reward_fn(texts, [problems[i].answer for i in batch for _ in range(s.n)])
        for j, i in enumerate(batch):
            rows = slice(j * s.n, (j + 1) * s.n)
            correct = [r == 1.0 for r in rewards[rows]]
            graded[i] = Graded(problems[i], texts[rows], correct, lengths[rows], truncated[rows])
        if on_batch is not None:
            on_batch(len(batch))
    model.train(was_training)
    return graded


def held_out_metrics(
    model,
    tok,
    problems: list[Problem],
    dataset_cfg: DictConfig,
    s: EvalSettings,
    backend: Backend | None = None,
) -> dict[str, float]:
    """Greedy `eval/accuracy` and `eval/response_len_mean` on the first `s.limit` problems,
    sampled by `backend` (the run's sampler; None: HF `generate`)."""
    if not problems:
        raise UserError(f"eval.every={s.every} needs held-out problems: set dataset.eval_size > 0")
    t0 = time.perf_counter()
    graded = evaluate_problems(model, tok, problems[: s.limit], dataset_cfg, s, backend=backend)
    summary = summarise(graded, s.ks, ANSWER_KEYS[dataset_cfg.reward])
    return {
        "eval/accuracy": summary["accuracy"],
        "eval/response_len_mean": summary["response_len_mean"],
        "perf/eval_s": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------ opo eval


@contextmanager
def eval_progress(total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over problems; yields the function that advances it."""
    progress = Progress(
        TextColumn("[bold]eval"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    task = progress.add_task("eval", total=total)
    with progress:
        yield lambda k: progress.advance(task, k)


def breakdown_table(title: str, groups: dict[str, dict]) -> Table:
    table = Table(title=title)
    table.add_column(title.split()[-1].capitalize())
    table.add_column("problems", justify="right")
    table.add_column("pass@1", justify="right")
    for name, row in groups.items():
        table.add_row(name, str(row["n"]), f"{row['accuracy']:.3f}")
    return table


def write_results(run_dir: Path, result: dict, graded: list[Graded]) -> None:
    """eval.json and samples.jsonl (one row per response) in the run folder."""
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    with (run_dir / "samples.jsonl").open("w") as f:
        for i, g in enumerate(graded):
            gold = extract_boxed(g.problem.answer) or g.problem.answer
            for j, response in enumerate(g.responses):
                row = {"index": i, "sample": j, **g.problem.meta, "problem": g.problem.prompt}
                row |= {"gold": gold, "response": response, "correct": g.correct[j]}
                row |= {"tokens": g.lengths[j], "truncated": g.truncated[j]}
                f.write(json.dumps(row) + "\n")


def wandb_metrics(result: dict) -> dict[str, float]:
    """The scalar results under eval/, breakdowns as eval/subject/<name> and eval/level/<name>."""
    flat = {f"eval/{k}": v for k, v in result.items() if isinstance(v, int | float)}
    for field, groups in (("subject", result["by_subject"]), ("level", result["by_level"])):
        flat |= {f"eval/{field}/{name}": row["accuracy"] for name, row in groups.items()}
    return flat


def load_first_readable(candidates: list[str], device, dtype, trust: bool):
    """(path, model, tokenizer) of the first candidate that loads; a damaged checkpoint (a
    cut-off or corrupt file) is skipped with a one-line warning for the next one, and the
    last candidate raises as the loader does."""
    kwargs = {"device": device, "dtype": dtype, "trust_remote_code": trust}
    for path in candidates[:-1]:
        try:
            return path, *load_policy(path, **kwargs)
        except Exception as e:  # safetensors, JSON and OS errors alike: unusable
            warn_damaged(path, e)
    return candidates[-1], *load_policy(candidates[-1], **kwargs)


def evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    """Evaluate `cfg.checkpoint` on the configured dataset; writes and returns eval.json's dict."""
    s, candidates = check_eval(cfg)
    problems = dataset_problems(cfg.dataset)[: s.limit]
    device, trust = pick_device(s.device), bool(cfg.eval.trust_remote_code)
    dtype = pick_dtype(s.dtype, device)
    model_path, model, tok = load_first_readable(candidates, device, dtype, trust)
    torch.manual_seed(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    options = BackendOptions(
        model_path=model_path,
        dtype=dtype,
        device=device,
        trust_remote_code=trust,
        share_prefill=False,
        temperature=s.temperature,
        top_p=s.top_p,
        vllm=s.vllm,
    )
    backend = open_backend(s.backend, options)
    wandb_run = start_wandb(cfg, run_dir, name=cfg.run_name)
    try:
        with eval_progress(len(problems)) as advance:
            graded = evaluate_problems(
                model, tok, problems, cfg.dataset, s, on_batch=advance, backend=backend
            )
    finally:
        backend.close()
    result = summarise(graded, s.ks, ANSWER_KEYS[cfg.dataset.reward])
    result |= {
        "checkpoint": model_path,
        "dataset": cfg.dataset.name,
        "split": OmegaConf.select(cfg.dataset, "split"),
        "path": OmegaConf.select(cfg.dataset, "path"),
        "eval_s": time.perf_counter() - t0,
    }
    write_results(run_dir, result, graded)
    for title, key in (("Accuracy by subject", "by_subject"), ("Accuracy by level", "by_level")):
        if result[key]:
            console.print(breakdown_table(title, result[key]))
    wandb_run.log(wandb_metrics(result), step=0)
    wandb_run.finish()
    extra = "  ".join(f"{k} {v:.3f}" for k, v in result.items() if k.startswith(("pass@", "maj@")))
    console.print(
        f"accuracy {result['accuracy']:.3f} on {result['n']} problems  {extra}".rstrip(),
        highlight=False,
    )
    console.print(f"results: {run_dir / 'eval.json'}", highlight=False, soft_wrap=True)
    return result
