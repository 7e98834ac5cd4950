"""`opo eval`: a checkpoint's accuracy on MATH; greedy pass@1, or pass@k and maj@k of n samples.

    opo eval checkpoint=outputs/train/default dataset=math_l3 eval.limit=100
    opo eval checkpoint=Qwen/Qwen2.5-Math-1.5B dataset=math500 eval.n=8

It measures problems never trained on: the test split of a MATH dataset, arith's held-out
problems; `eval.limit=K` takes a seeded sample of K, stratified by subject and level
(`opo_cli.data.stratified_sample`). Writes `eval.json` (accuracy, per-subject and per-level
breakdowns, pass@k and maj@k, which split and how many of its problems) and `samples.jsonl`
(every response, graded) into the run folder. maj@k votes over groups of answers the grader
finds equivalent. `held_out_metrics` is the same evaluation, greedy, that
`opo train eval.every=N` runs on the held-out problems.
"""

from __future__ import annotations

import json
import math
import time
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

from opo_cli import distributed
from opo_cli.backends import Backend, BackendOptions, open_backend
from opo_cli.config import EvalSettings
from opo_cli.data import (
    STRATA,
    Problem,
    dataset_problems,
    eval_split,
    prompt_texts,
    stratified_sample,
)
from opo_cli.distributed import SINGLE, Dist
from opo_cli.errors import UserError, first_line
from opo_cli.models import load_policy, pick_device, pick_dtype
from opo_cli.rewards import answer_key, build_reward, extract_boxed, grade_math, gsm8k_number
from opo_cli.rollout import generate_rollout, probed_reward, reward_columns
from opo_cli.runs import check_eval
from opo_cli.tracking import NullRun, console, start_wandb, warn_damaged


@dataclass
class Graded:
    """One problem's n responses, graded by the dataset's correctness reward (exact_match,
    math, gsm8k: its value 1), or for a reward without one, by a total reward of 1."""

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


@dataclass(frozen=True)
class Voting:
    """How maj@k reads and groups answers: answers with one `key` are one answer, and with
    `same` (the grader, on pairs of answers) so are those it finds equivalent."""

    extract: Callable[[str], str | None]  # the answer in a response; None: no vote
    key: Callable[[str], str]  # a normalised form: equal keys, one answer
    same: Callable[[list[tuple[str, str]]], list[bool]] | None = None  # None: keys decide


def math_same(pairs: list[tuple[str, str]]) -> list[bool]:
    """Whether the grader (`grade_math`) takes each first answer as right against the second."""
    return [grade_math(f"\\boxed{{{a}}}", f"\\boxed{{{b}}}") for a, b in pairs]


VOTING: dict[str, Voting] = {  # by the dataset's correctness reward
    "math": Voting(extract_boxed, answer_key, math_same),
    "gsm8k": Voting(gsm8k_number, str),
    "exact_match": Voting(lambda r: r.strip() or None, str),
}


def voting(dataset_cfg: DictConfig) -> Voting:
    """How maj@k groups this dataset's answers: by its correctness reward, else as exact match."""
    return VOTING.get(build_reward(dataset_cfg).correctness or "", VOTING["exact_match"])


def key_groups(answers: list[tuple[int, str]], voting: Voting) -> list[tuple[int, int, str]]:
    """(first index, size, answer) of each group of wrong answers with one key, from the
    answers given as (index, answer)."""
    by_key: dict[str, list] = {}  # key -> [first index, size, answer]
    for i, a in answers:
        by_key.setdefault(voting.key(a), [i, 0, a])[1] += 1
    return [(first, size, a) for first, size, a in by_key.values()]


def joined_groups(groups: list[tuple[int, int, str]], voting: Voting) -> list[tuple[int, int]]:
    """(first index, size) of the groups left once those `voting.same` finds equal are
    joined (union-find over every pair of groups)."""
    parent = list(range(len(groups)))

    def root(j: int) -> int:
        while parent[j] != j:
            j = parent[j]
        return j

    pairs = [(j, m) for j in range(len(groups)) for m in range(j + 1, len(groups))]
    verdicts = voting.same([(groups[j][2], groups[m][2]) for j, m in pairs]) if pairs else []
    for (j, m), same in zip(pairs, verdicts, strict=True):
        if same:
            parent[root(m)] = root(j)
    merged: dict[int, list[int]] = {}
    for j, (first, size, _) in enumerate(groups):
        slot = merged.setdefault(root(j), [first, 0])
        slot[0], slot[1] = min(slot[0], first), slot[1] + size
    return [(first, size) for first, size in merged.values()]


def majority_correct(responses: list[str], correct: list[bool], voting: Voting) -> bool:
    """Whether the most voted answer is right (ties: the answer seen first; no answer: wrong).

    Answers are grouped by the grader's equivalence, as the Minerva evaluation and verl do:
    every right answer equals the gold, so the right ones are one group whatever their
    strings (`\\frac12`, `0.5`, `1/2`); wrong ones group by key, then groups the grader
    finds equal (`voting.same`) are joined. So votes are never split between answers the
    grader calls equal. The grader is asked only when no wrong key group already wins
    (joining only makes groups bigger).
    """
    right = [i for i, ok in enumerate(correct) if ok]
    if not right:
        return False
    wrong = [(i, r) for i, (r, ok) in enumerate(zip(responses, correct, strict=True)) if not ok]
    answers = [(i, a) for i, r in wrong if (a := voting.extract(r)) is not None]
    if len(answers) < len(right):  # no wrong group can reach the right one
        return True

    def beats_right(first: int, size: int) -> bool:
        return (size, -first) > (len(right), -right[0])

    groups = key_groups(answers, voting)
    if any(beats_right(first, size) for first, size, _ in groups):
        return False
    if voting.same is None or len(groups) < 2:
        return True
    return not any(beats_right(first, size) for first, size in joined_groups(groups, voting))


def breakdown(graded: list[Graded], field: str, label: str = "{}") -> dict[str, dict]:
    """{value: {n, accuracy}} over the problems' `meta[field]` (absent in arith: empty)."""
    groups: dict[str, list[float]] = {}
    for g in graded:
        if field in g.problem.meta:
            name = label.format(g.problem.meta[field])
            groups.setdefault(name, []).append(sum(g.correct) / len(g.correct))
    return {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(groups.items())}


def summarise(graded: list[Graded], ks: tuple[int, ...], voting: Voting) -> dict:
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
            votes = [majority_correct(g.responses[:k], g.correct[:k], voting) for g in graded]
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


def length_batches(prompts: list[str], batch_size: int) -> list[list[int]]:
    """The prompts' indices in batches of `batch_size`, in order of length (less padding)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def batch_seed(seed: int, batch: int) -> int:
    """The sampling seed of global batch `batch`: distinct for every (seed, batch) pair with
    fewer than 2**20 batches, and the same whichever rank samples the batch."""
    return seed * 2**20 + batch


def grade_batch(
    model, tok, problems: list[Problem], prompts: list[str], batch: list[int], reward_fn, s, backend
) -> dict[int, Graded]:
    """`s.n` responses to each problem of `batch` (indices into `problems`), graded."""
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
    chosen = [problems[i] for i in batch]
    golds = [p.answer for p in chosen for _ in range(s.n)]
    scores = reward_fn(texts, golds, reward_columns(chosen, s.n))
    right = [p.get("correct", t) == 1.0 for p, t in zip(scores.parts, scores.total, strict=True)]
    graded = {}
    for j, i in enumerate(batch):
        rows = slice(j * s.n, (j + 1) * s.n)
        graded[i] = Graded(problems[i], texts[rows], right[rows], lengths[rows], truncated[rows])
    return graded


def lost_rank(s: EvalSettings, e: RuntimeError) -> UserError:
    """A collective that failed: another rank crashed, or kept this one waiting too long."""
    return UserError(
        "the process group broke: another rank stopped, or kept this one waiting past "
        f"eval.dist_timeout_s={s.dist_timeout_s:g} s ({first_line(e)})"
    )


def agree_or_lost(error: BaseException | None, s: EvalSettings) -> None:
    """`distributed.agree(error)`, with a lost rank as one line (`lost_rank`)."""
    try:
        distributed.agree(error)
    except RuntimeError as e:
        if e is error:
            raise
        raise lost_rank(s, e) from None


def gathered(mine: dict[int, Graded], s: EvalSettings, ranks: Dist) -> list[dict[int, Graded]]:
    """Every rank's graded problems, in rank order ([mine] on one process)."""
    if not ranks.enabled:
        return [mine]
    try:
        return distributed.gather_objects(mine)
    except RuntimeError as e:
        raise lost_rank(s, e) from None


def evaluate_problems(
    model,
    tok,
    problems: list[Problem],
    dataset_cfg: DictConfig,
    s: EvalSettings,
    on_batch: Callable[[int], None] | None = None,
    backend: Backend | None = None,
    *,
    seed: int | None = None,
    ranks: Dist = SINGLE,
) -> list[Graded]:
    """Generate (with `backend`; None: HF `generate`) and grade `s.n` responses per problem,
    `s.batch_size` problems at a time; the graded problems in their order, on every rank.

    Prompts are batched in order of length (less padding). With `seed`, the global RNG is
    seeded before each batch with `batch_seed(seed, batch)`; None leaves it alone (greedy
    evaluation during training). Under several ranks (`ranks`), rank r takes the global
    batches r, r + W, r + 2W, ... (W ranks), so each batch is the same batch, with the same
    seed and padding, at any world size: the results equal one process's. The ranks go in
    lockstep, a batch each per round, and agree after each (`distributed.agree`): an error
    on one rank stops every rank within one batch, and no rank waits for another longer
    than a batch takes. `on_batch` is told how many problems the round finished, all ranks'.
    With one rank (the default, and evaluation during training) there is no collective.
    """
    prompts = prompt_texts(problems, tok, dataset_cfg)
    reward_fn = build_reward(dataset_cfg)
    batches = length_batches(prompts, s.batch_size)
    was_training = model.training
    model.eval()
    mine: dict[int, Graded] = {}
    for first in range(0, len(batches), ranks.world_size):
        b, error = first + ranks.rank, None
        try:
            if b < len(batches):
                if seed is not None:
                    torch.manual_seed(batch_seed(seed, b))
                mine |= grade_batch(
                    model, tok, problems, prompts, batches[b], reward_fn, s, backend
                )
        except Exception as e:  # agreed below: every rank stops, the first failing one says why
            error = e
        if ranks.enabled:
            agree_or_lost(error, s)
        elif error is not None:
            raise error
        if on_batch is not None:
            on_batch(sum(len(batch) for batch in batches[first : first + ranks.world_size]))
    model.train(was_training)
    graded = {i: g for share in gathered(mine, s, ranks) for i, g in share.items()}
    return [graded[i] for i in range(len(problems))]


def check_held_out(s: EvalSettings, held_out: list[Problem]) -> None:
    """`eval.every > 0` needs held-out problems: refused before training starts."""
    if s.every and not held_out:
        raise UserError(f"eval.every={s.every} needs held-out problems: set dataset.eval_size > 0")


def held_out_metrics(
    model,
    tok,
    problems: list[Problem],
    dataset_cfg: DictConfig,
    s: EvalSettings,
    backend: Backend | None = None,
    on_graded: Callable[[list[Graded]], None] | None = None,
    ranks: Dist = SINGLE,
) -> dict[str, float]:
    """Greedy `eval/accuracy` and `eval/response_len_mean` on `s.limit` of the held-out
    problems (a stratified sample drawn with `dataset.split_seed`, the same at every step),
    sampled by `backend` (the run's sampler; None: HF `generate`); `on_graded` is given the
    graded answers (the completion logs take a few). Under torchrun the `ranks` share the
    batches, and every rank gets every answer (`evaluate_problems`)."""
    t0 = time.perf_counter()
    chosen = stratified_sample(problems, s.limit, dataset_cfg.split_seed)
    graded = evaluate_problems(model, tok, chosen, dataset_cfg, s, backend=backend, ranks=ranks)
    if on_graded is not None:
        on_graded(graded)
    summary = summarise(graded, s.ks, voting(dataset_cfg))
    return {
        "eval/accuracy": summary["accuracy"],
        "eval/response_len_mean": summary["response_len_mean"],
        "perf/eval_s": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------ opo eval


@contextmanager
def eval_progress(total: int, show: bool = True) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over problems (none unless `show`); yields what advances it."""
    progress = Progress(
        TextColumn("[bold]eval"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not show,
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


def sample_note(limit: int | None, size: int, seed: int) -> str:
    """How the evaluated problems were chosen, for eval.json."""
    if limit is None or limit >= size:
        return "all"
    return f"stratified by {' and '.join(STRATA)}, seed {seed} (dataset.split_seed)"


def load_for_eval(cfg: DictConfig, s: EvalSettings, candidates: list[str], device, ranks: Dist):
    """(problems, the split's size, model path, model, tokenizer, backend) on this rank."""
    if ranks.enabled and s.backend == "vllm":
        raise UserError(
            f"rollout.backend=vllm under torchrun ({ranks.world_size} processes) is not built: "
            "run opo eval with vllm as one process, or use rollout.backend=hf or opo"
        )
    every = dataset_problems(cfg.dataset)
    problems = stratified_sample(every, s.limit, cfg.dataset.split_seed)
    probed_reward(cfg.dataset, problems)  # a broken reward fails before the model loads
    trust = bool(cfg.eval.trust_remote_code)
    dtype = pick_dtype(s.dtype, device)
    model_path, model, tok = load_first_readable(candidates, device, dtype, trust)
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
    return problems, len(every), model_path, model, tok, open_backend(s.backend, options)


def join_ranks(s: EvalSettings) -> tuple[Dist, torch.device | None]:
    """`distributed.setup` for `opo eval`. Its mistakes (cuda asked for on a machine without
    it) are alike on every rank: rank 0 raises, the others `PeerFailed`. A process group
    that cannot form within `eval.dist_timeout_s` is one line."""
    try:
        return distributed.setup(s.device, s.dist_timeout_s)
    except UserError:
        if distributed.from_env().is_main:
            raise
        raise distributed.PeerFailed("rank 0 reports it") from None
    except RuntimeError as e:  # torch's DistNetworkError, DistStoreError: the rendezvous
        raise UserError(
            f"could not join the other ranks within eval.dist_timeout_s={s.dist_timeout_s:g} s "
            f"({first_line(e)})"
        ) from None


def evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    """Evaluate `cfg.checkpoint` on the configured dataset; writes and returns eval.json's dict.

    Under torchrun (`torchrun --nproc_per_node=N --no-python opo eval ...`, or N SLURM tasks)
    each process loads the model on its own device and grades every N-th batch of problems
    (`evaluate_problems`); rank 0 alone writes the files, the console and W&B, and the other
    ranks return an empty dict. An error on any rank ends every rank, with one line.
    """
    s, candidates = check_eval(cfg)
    ranks, device = join_ranks(s)  # the process group stays for the process's next job
    loaded, error = None, None
    try:
        loaded = load_for_eval(cfg, s, candidates, device or pick_device(s.device), ranks)
    except Exception as e:  # agreed: the first failing rank says why, the others stop
        error = e
    agree_or_lost(error, s)
    return evaluate_loaded(cfg, run_dir, s, ranks, *loaded)


def evaluate_loaded(
    cfg, run_dir, s, ranks, problems, split_size, model_path, model, tok, backend
) -> dict:
    """Grade `problems` on every rank; rank 0 summarises and writes (see `evaluate`)."""
    if ranks.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    wandb_run = start_wandb(cfg, run_dir, name=cfg.run_name) if ranks.is_main else NullRun()
    t0 = time.perf_counter()
    try:
        with eval_progress(len(problems), show=ranks.is_main) as advance:
            graded = evaluate_problems(
                model,
                tok,
                problems,
                cfg.dataset,
                s,
                on_batch=advance,
                backend=backend,
                seed=cfg.seed,
                ranks=ranks,
            )
    finally:
        backend.close()
    if not ranks.is_main:
        return {}
    result = summarise(graded, s.ks, voting(cfg.dataset))
    result |= {
        "checkpoint": model_path,
        "dataset": cfg.dataset.name,
        "split": eval_split(cfg.dataset),
        "split_size": split_size,  # problems in the split; "n" of them were evaluated
        "sample": sample_note(s.limit, split_size, cfg.dataset.split_seed),
        "path": OmegaConf.select(cfg.dataset, "path"),
        "processes": ranks.world_size,  # torchrun's world size
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
