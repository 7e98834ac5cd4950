"""Rollouts: G sampled completions per prompt, stored grouped contiguously, with masks.

Row layout (N = P * G rows): left-padded prompt tokens, then completion tokens. The
completion mask is 1 up to and including the first EOS; a completion with no EOS within
`max_new_tokens` is truncated (mask 1 on all of its tokens).

`sample_batch` is what a training step calls: it draws prompts, generates, scores, and applies
the method's rollout options (DAPO's dynamic sampling, overlong penalty, truncation mask).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from opo_cli.advantages import uniform_groups
from opo_cli.backends import Backend, BackendOptions, open_backend
from opo_cli.config import RolloutSettings
from opo_cli.data import Problem, PromptSampler
from opo_cli.distributed import agreed, all_ok, all_reduce_sum, cat_rows, gather_objects
from opo_cli.generation import stop_token_ids
from opo_cli.rewards import Reward, build_reward, overlong_penalties
from opo_cli.sampling import keeps_sampling_logps

RewardFn = Reward  # (texts, golds, columns) -> Scores: weighted total, parts, extras


@dataclass
class Rollout:
    input_ids: Tensor  # (N, Lp + Lc) left-padded prompts, then completions
    attention_mask: Tensor  # (N, Lp + Lc) 1 on real prompt and completion tokens
    completion_mask: Tensor  # (N, Lc) float, 1 on completion tokens up to and including EOS
    truncated: Tensor  # (N,) bool, no EOS within max_new_tokens
    rewards: Tensor  # (N,) float
    texts: list[str]  # decoded completions, special tokens removed
    group_size: int  # G
    sampling_logps: Tensor | None = None  # (N, Lc) log pi_old of each sampled token, if kept
    sampling_entropy: Tensor | None = None  # (N, Lc) entropy of each sampling step, if kept
    reward_parts: list[dict[str, float]] | None = (
        None  # per completion: reward part -> unweighted value
    )
    reward_extras: list[dict] | None = (
        None  # per completion: extra JSON fields returned by reward functions
    )

    @property
    def completion_len(self) -> int:
        return self.completion_mask.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: Tensor) -> Rollout:
        """The sub-rollout of rows `index` (whole groups keep group statistics meaningful)."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                picked[f.name] = value[index]
            elif isinstance(value, list):
                picked[f.name] = [value[i] for i in index.tolist()]
            else:
                picked[f.name] = value
        return Rollout(**picked)


def completion_mask_from_ids(
    completion_ids: Tensor, stop_ids: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Mask up to and including the first stop id (any EOS), and the truncated flag (no stop
    id at all): (N, Lc) -> (N, Lc), (N,)."""
    stops = torch.as_tensor(list(stop_ids), device=completion_ids.device)  # (S,)
    is_eos = torch.isin(completion_ids, stops)  # (N, Lc)
    seen_before = is_eos.long().cumsum(-1) - is_eos.long()  # (N, Lc) EOS strictly before t
    mask = (seen_before == 0).float()  # (N, Lc)
    return mask, ~is_eos.any(-1)


@torch.no_grad()
def generate_rollout(
    model,
    tok,
    prompts: list[str],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    keep_logps: bool = False,
    backend: Backend | str = "hf",
    cache_implementation: str = "dynamic",
    share_prefill: bool = True,
) -> Rollout:
    """Sample `group_size` completions of each prompt; rewards are filled in by the caller.

    `backend` samples them (`opo_cli.backends`): a backend object (what a run builds once),
    or the name of one that holds no engine, built for this call: `"hf"` (HF `generate`, with
    `cache_implementation` and `share_prefill`) or `"opo"` (our loop, `opo_cli.decode`).
    `keep_logps` keeps the log-prob and entropy of every sampled token (vllm: log-probs
    only, and always when they are the trainer's numbers). Every backend samples from
    softmax(logits / T) cut to its top-p nucleus, whatever the model's own generation config
    says, and ends a completion at any EOS id it names (`opo_cli.generation`).
    """
    if isinstance(backend, str):
        options = BackendOptions(
            cache_implementation=cache_implementation, share_prefill=share_prefill
        )
        backend = open_backend(backend, options)
    enc = tok(prompts, return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    ids, ids_mask = enc.input_ids.to(device), enc.attention_mask.to(device)  # (P, Lp) x 2
    stop_ids = stop_token_ids(model, tok)
    was_training = model.training
    model.eval()
    samples = backend.generate(
        model,
        ids,
        ids_mask,
        n=group_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        keep_logps=keep_logps,
        stop_ids=stop_ids,
        pad_id=tok.pad_token_id,
    )
    model.train(was_training)
    mask, truncated = completion_mask_from_ids(samples.ids, stop_ids)  # (N, Lc) x 2
    keep = mask.bool()  # (N, Lc)
    completion_ids = torch.where(keep, samples.ids, tok.pad_token_id)  # (N, Lc)
    texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
    prompt_mask = ids_mask.repeat_interleave(group_size, 0)  # (N, Lp)
    return Rollout(
        input_ids=torch.cat([ids.repeat_interleave(group_size, 0), completion_ids], 1),
        attention_mask=torch.cat([prompt_mask, mask.long()], 1),  # (N, Lp + Lc)
        completion_mask=mask,
        truncated=truncated,
        rewards=torch.zeros(len(texts), device=device),
        texts=texts,
        group_size=group_size,
        sampling_logps=_masked(samples.logps, keep),  # (N, Lc) or None
        sampling_entropy=_masked(samples.entropy, keep),  # (N, Lc) or None
    )


def _masked(x: Tensor | None, keep: Tensor) -> Tensor | None:
    return None if x is None else x.where(keep, 0.0)


# ------------------------------------------------------------------ batches of several draws


def _pad_right(x: Tensor | None, right: int) -> Tensor | None:
    return None if x is None else F.pad(x, (0, right), value=0.0)


def _pad_rollout(r: Rollout, prompt_len: int, completion_len: int, pad_id: int) -> Rollout:
    """`r` with its prompts left-padded to `prompt_len` and completions right-padded."""
    left = prompt_len - (r.input_ids.shape[1] - r.completion_len)
    right = completion_len - r.completion_len
    return replace(
        r,
        input_ids=F.pad(r.input_ids, (left, right), value=pad_id),  # (N, Lp' + Lc')
        attention_mask=F.pad(r.attention_mask, (left, right), value=0),  # (N, Lp' + Lc')
        completion_mask=F.pad(r.completion_mask, (0, right), value=0.0),  # (N, Lc')
        sampling_logps=_pad_right(r.sampling_logps, right),  # (N, Lc') or None
        sampling_entropy=_pad_right(r.sampling_entropy, right),  # (N, Lc') or None
    )


def concat_rollouts(parts: Sequence[Rollout], pad_id: int) -> Rollout:
    """One rollout holding the rows of `parts` in order (re-padded to common lengths)."""
    if len({p.group_size for p in parts}) != 1:
        raise ValueError("rollouts with different group sizes cannot be joined")
    prompt_len = max(p.input_ids.shape[1] - p.completion_len for p in parts)
    completion_len = max(p.completion_len for p in parts)
    padded = [_pad_rollout(p, prompt_len, completion_len, pad_id) for p in parts]
    joined = {}
    for f in fields(Rollout):
        values = [getattr(p, f.name) for p in padded]
        if isinstance(values[0], Tensor):
            joined[f.name] = torch.cat(values)
        elif isinstance(values[0], list):
            joined[f.name] = [v for value in values for v in value]
        else:
            joined[f.name] = values[0]
    return Rollout(**joined)


def group_rows(groups: Tensor, group_size: int) -> Tensor:
    """Row indices of whole groups: (K,) group ids -> (K * G,) rows."""
    offsets = torch.arange(group_size, device=groups.device)  # (G,)
    return (groups[:, None] * group_size + offsets).flatten()  # (K * G,)


def dynamic_sample(
    draw: Callable[[int], Rollout], *, prompts: int, max_extra_rounds: int, pad_id: int
) -> tuple[Rollout, Rollout, dict[str, float]]:
    """DAPO's dynamic sampling (arXiv 2503.14476, section 3.2): a batch without uniform groups.

    `draw(k)` samples and scores the groups of k new prompts. Groups whose rewards are all
    equal (no learning signal) are dropped and further rounds of `prompts` prompts are drawn
    until `prompts` informative groups are found, at most `max_extra_rounds` extra rounds. If
    the bound is hit first, the batch is filled up with uniform groups (in the order drawn) so
    that it always holds `prompts` groups; they carry a zero advantage in the GRPO family.
    Returns (batch, every row drawn, stats): `train/dropped_groups` counts the uniform groups
    left out, `train/extra_rounds` the rounds beyond the first. On several processes each
    rank draws its own share (`prompts` is the rank's) and the ranks draw the same number of
    rounds: another one while any rank lacks informative groups.
    """
    parts = [draw(prompts)]
    G = parts[0].group_size
    informative = int((~uniform_groups(parts[0].rewards, G)).sum())
    while not all_ok(informative >= prompts) and len(parts) <= max_extra_rounds:
        parts.append(draw(prompts))
        informative += int((~uniform_groups(parts[-1].rewards, G)).sum())
    drawn = concat_rollouts(parts, pad_id)
    uniform = uniform_groups(drawn.rewards, G)  # (K,) bool per group drawn
    keep = torch.cat([(~uniform).nonzero(), uniform.nonzero()]).flatten()[:prompts]  # (P,)
    batch = drawn.rows(group_rows(keep.sort().values, G))
    dropped = all_reduce_sum(uniform.sum() - uniform[keep].sum())  # () over every rank
    stats = {
        "train/dropped_groups": float(dropped),
        "train/extra_rounds": float(len(parts) - 1),
    }
    return batch, drawn, stats


# ------------------------------------------------------------------ the step's training batch


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """Reward, length and truncation of the completions in `rollout`, on several processes
    of every rank's completions."""
    (r, lengths, truncated), _ = cat_rows(  # (N,) each, every rank's
        rollout.rewards, rollout.completion_mask.sum(-1), rollout.truncated.float()
    )
    parts = [p for rank in gather_objects(rollout.reward_parts or []) for p in rank]
    return {
        "train/reward_mean": r.mean().item(),
        "train/reward_std": r.std().item(),
        "train/response_len_mean": lengths.mean().item(),
        "train/truncated_frac": truncated.mean().item(),
        **{f"reward/{k}": sum(p[k] for p in parts) / len(parts) for k in (parts or [{}])[0]},
    }


def shape_overlong(rollout: Rollout, *, max_len: int, buffer: int) -> Rollout:
    """Rewards plus DAPO's soft overlong penalty on each completion's length (0 when off);
    when on, it is also the reward part `overlong`."""
    lengths = rollout.completion_mask.sum(-1).long().tolist()
    penalty = overlong_penalties(lengths, max_len=max_len, buffer=buffer)
    parts = rollout.reward_parts
    if buffer > 0 and parts is not None:
        parts = [{**d, "overlong": v} for d, v in zip(parts, penalty, strict=True)]
    rewards = rollout.rewards + rollout.rewards.new_tensor(penalty)
    return replace(rollout, rewards=rewards, reward_parts=parts)


def mask_truncated(rollout: Rollout) -> Rollout:
    """The rollout with truncated completions left out of the loss (their mask rows zeroed)."""
    keep = (~rollout.truncated).float()[:, None]  # (N, 1)
    return replace(rollout, completion_mask=rollout.completion_mask * keep)  # (N, Lc)


def score_rollout(
    rollout: Rollout, golds: list[str], reward_fn: RewardFn, columns: dict | None = None
) -> Rollout:
    """The rollout with its task rewards, `reward_fn(texts, golds, columns)`: the weighted
    total per completion, each part's value (`correct` among them where the task has one)
    and any extra fields the reward functions returned."""
    scores = reward_fn(rollout.texts, golds, columns)
    return replace(
        rollout,
        rewards=rollout.rewards.new_tensor(scores.total, dtype=torch.float32),
        reward_parts=scores.parts,
        reward_extras=scores.extras,
    )


def reward_columns(problems: list[Problem], group_size: int) -> dict[str, list]:
    """The problems' other fields (`meta`) as columns, each value repeated for the group."""
    names = dict.fromkeys(k for p in problems for k in p.meta)
    return {k: [p.meta.get(k) for p in problems for _ in range(group_size)] for k in names}


def probed_reward(dataset_cfg, problems: list[Problem]) -> Reward:
    """The dataset's reward, tried on a few of `problems`' answers: a broken reward fails in
    one line here, before any model loads."""
    reward = build_reward(dataset_cfg)
    probe = problems[:4]
    reward.probe([p.answer for p in probe], reward_columns(probe, 1))
    return reward


def draw_scored(
    model,
    tok,
    problems: list[Problem],
    reward_fn: RewardFn,
    r: RolloutSettings,
    backend: Backend | None = None,
) -> Rollout:
    """`r.group_size` scored completions of each problem's prompt, sampled by `backend`
    (None: the one `r.backend` names, built for the call; a vllm run passes its engine)."""
    rollout = generate_rollout(
        model,
        tok,
        [p.prompt for p in problems],
        group_size=r.group_size,
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        keep_logps=keeps_sampling_logps(r.reuse_sampling_logps, model),
        backend=r.backend if backend is None else backend,
        cache_implementation=r.cache_implementation,
        share_prefill=r.share_prefill,
    )
    golds = [p.answer for p in problems for _ in range(r.group_size)]
    return score_rollout(rollout, golds, reward_fn, reward_columns(problems, r.group_size))


def sample_batch(
    model,
    tok,
    sampler: PromptSampler,
    problems: list[Problem],
    reward_fn: RewardFn,
    r: RolloutSettings,
    backend: Backend | None = None,
    share: tuple[int, int] = (0, 1),
) -> tuple[Rollout, dict[str, float]]:
    """The step's training batch of `r.prompts_per_step` groups, and its rollout metrics.

    `share` = (rank, world size): every rank draws the same global prompt order from its copy
    of `sampler` and samples its slice of whole groups, `r.prompts_per_step / world` of them.

    Prompts come from `sampler` (indices into `problems`), completions from `backend`
    (`draw_scored`), rewards from `reward_fn`. With
    `r.dynamic_sampling`, uniform groups are replaced by new draws (`dynamic_sample`). Then
    the overlong penalty is added to the rewards and, with `r.mask_truncated`, truncated
    completions are masked out of the loss. The metrics (`train/reward_mean` ...) are taken
    over every completion drawn, with the task reward before shaping, so that they compare
    across methods.
    """

    rank, world = share

    def draw(k: int) -> Rollout:  # k: this rank's prompts, of k * world drawn
        picked = [problems[i] for i in sampler.next(k * world)[rank * k : (rank + 1) * k]]
        # a reward (or generation) failing on one rank fails every rank here, before the
        # collectives that follow: no rank is left waiting in one
        return agreed(draw_scored, model, tok, picked, reward_fn, r, backend)

    prompts = r.prompts_per_step // world
    if r.dynamic_sampling:
        batch, drawn, stats = dynamic_sample(
            draw,
            prompts=prompts,
            max_extra_rounds=r.max_extra_rounds,
            pad_id=tok.pad_token_id,
        )
    else:
        batch = drawn = draw(prompts)
        stats = {"train/dropped_groups": 0.0, "train/extra_rounds": 0.0}
    shaped = shape_overlong(batch, max_len=r.max_new_tokens, buffer=r.overlong_buffer)
    penalty = cat_rows(shaped.rewards - batch.rewards)[0][0]  # (N,) every rank's
    stats["train/overlong_penalty_mean"] = penalty.mean().item()
    if r.mask_truncated:
        shaped = mask_truncated(shaped)
    return shaped, {**rollout_metrics(drawn), **stats}
