"""Policy losses as pure functions of tensors, chosen by name through `LOSSES`.

Every loss takes a `LossInputs` (rows grouped contiguously, G per prompt) and keyword-only
hyperparameters, and returns `(scalar loss, stats)` with stats as Python floats. No model,
config or I/O in here. Group statistics come from `opo_cli.advantages`; token aggregation is
chosen by name from `AGGREGATIONS` (verl's habit: loss, advantage and aggregation apart).

Padding: every log-probability is read through the mask with `torch.where`, so padded
positions may hold any value (even -inf) and receive an exact zero gradient.

Stats shared by every method (CleanRL's habit): `train/frac_uniform_groups` always,
`train/kl_ref` (batch token mean of k3) whenever `ref_logps` is given, and for the clipped
losses `train/clip_frac_low` / `train/clip_frac_high` (fraction of masked tokens, or of
sequences for GSPO, where the clipped term is the one `min` picks and it differs from the
unclipped one, i.e. where the clip binds and the gradient is cut).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from opo_cli.advantages import (
    centered_escort_drive,
    extreme_pairs,
    group_normalized,
    group_softmax,
    group_sum,
    group_view,
    pair_roles,
    uniform_group_fraction,
)

Stats = dict[str, float]


@dataclass
class LossInputs:
    logps: Tensor  # (N, T) current policy, requires grad
    old_logps: Tensor  # (N, T) sampling policy, no grad
    ref_logps: Tensor | None  # (N, T) frozen reference, when the method uses one
    mask: Tensor  # (N, T) 1.0 on completion tokens, 0.0 on padding
    rewards: Tensor  # (N,)
    group_size: int  # G; rows grouped contiguously


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of `x` over the last dim where `mask` is 1; rows with no token give 0."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (N,)


# ---------------------------------------------------------------- token-level pieces


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    """`values` on completion tokens, exactly 0 (value and gradient) on padding."""
    return torch.where(mask > 0, values, torch.zeros_like(values))  # (N, T)


def _token_log_ratio(x: LossInputs) -> Tensor:
    """`logp − old` on completion tokens, 0 on padding."""
    return _masked(x.logps - x.old_logps, x.mask)  # (N, T)


def _sequence_log_ratio(x: LossInputs) -> Tensor:
    """Length-normalised sequence log-ratio `Δ_i = Σ_t m·(logp − old) / |y_i|`."""
    return masked_mean(_token_log_ratio(x), x.mask)  # (N,)


def _k3(x: LossInputs) -> Tensor:
    """Schulman's k3 estimator of KL(π || π_ref): `exp(ref − logp) − (ref − logp) − 1`."""
    if x.ref_logps is None:
        raise ValueError("k3 needs ref_logps (a frozen reference policy), got None")
    d = _masked(x.ref_logps - x.logps, x.mask)  # (N, T) 0 on padding, so k3 = 0 there
    return torch.expm1(d) - d  # (N, T) >= 0


def _clipped_surrogate(
    ratio: Tensor, adv: Tensor, *, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's `−min(ρA, clip(ρ, 1−ε_lo, 1+ε_hi)·A)`, with where the clip binds (low, high).

    `ratio` and `adv` broadcast together: (N, T) with (N, 1) for tokens, (N,) with (N,).
    """
    unclipped = ratio * adv  # (N, T) or (N,)
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv  # (N, T) or (N,)
    loss = -torch.minimum(unclipped, clipped)  # (N, T) or (N,)
    binding = clipped < unclipped  # (N, T) or (N,) min picks the clipped term
    low = binding & (ratio < 1.0 - clip_low)  # (N, T) or (N,) A < 0, ratio pushed down
    high = binding & (ratio > 1.0 + clip_high)  # (N, T) or (N,) A > 0, ratio pushed up
    return loss, low, high


def _check_clip(clip_low: float, clip_high: float) -> None:
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")


def _token_fraction(flags: Tensor, mask: Tensor) -> float:
    """Fraction of completion tokens where `flags` holds."""
    return ((flags * mask).sum() / mask.sum().clamp(min=1.0)).item()


# ---------------------------------------------------------------- aggregation by name


def seq_mean_token_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Mean over sequences of each sequence's masked token mean (GRPO's paper form)."""
    return masked_mean(per_token, mask).mean()  # ()


def token_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """`Σ m·ℓ / Σ m` over the whole batch: every token weighs the same (DAPO)."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)  # ()


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "seq_mean_token_mean": seq_mean_token_mean,
    "token_mean": token_mean,
}


def _shared_stats(x: LossInputs, k3: Tensor | None = None) -> Stats:
    """Stats every method reports under the same names."""
    stats = {"train/frac_uniform_groups": uniform_group_fraction(x.rewards, x.group_size)}
    if x.ref_logps is not None:
        k3 = _k3(x) if k3 is None else k3  # (N, T)
        stats["train/kl_ref"] = token_mean(k3.detach(), x.mask).item()
    return stats


# ---------------------------------------------------------------- clipped baselines


def grpo_loss(
    x: LossInputs,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    beta: float = 0.0,
    agg: str = "seq_mean_token_mean",
) -> tuple[Tensor, Stats]:
    """GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300).

    Token-level clipped surrogate with group-normalised advantages plus `beta·k3` to the
    reference; `agg` names the aggregation in `AGGREGATIONS`. `ref_logps` is required only
    when `beta > 0` (it is used for `train/kl_ref` whenever given).
    """
    _check_clip(clip_low, clip_high)
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation '{agg}'; valid: {', '.join(sorted(AGGREGATIONS))}")
    if beta < 0.0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0.0 and x.ref_logps is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logps (a frozen reference), got None")
    adv = group_normalized(x.rewards, x.group_size)  # (N,)
    ratio = torch.exp(_token_log_ratio(x))  # (N, T) 1 on padding
    per_token, low, high = _clipped_surrogate(
        ratio, adv.unsqueeze(-1), clip_low=clip_low, clip_high=clip_high
    )  # (N, T)
    k3 = _k3(x) if x.ref_logps is not None else None  # (N, T)
    if beta > 0.0:
        per_token = per_token + beta * k3  # (N, T)
    loss = AGGREGATIONS[agg](per_token, x.mask)  # ()
    stats = {
        "train/clip_frac_low": _token_fraction(low, x.mask),
        "train/clip_frac_high": _token_fraction(high, x.mask),
        **_shared_stats(x, k3),
    }
    return loss, stats


def dapo_loss(
    x: LossInputs,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    beta: float = 0.0,
    agg: str = "token_mean",
) -> tuple[Tensor, Stats]:
    """DAPO (Yu et al. 2025, arXiv 2503.14476): GRPO's clipped term with clip-higher and a
    token mean over the batch. Dynamic sampling and overlong shaping live in the rollout and
    reward layers, not here."""
    return grpo_loss(x, clip_low=clip_low, clip_high=clip_high, beta=beta, agg=agg)


def gspo_loss(
    x: LossInputs, *, clip_low: float = 3e-4, clip_high: float = 4e-4
) -> tuple[Tensor, Stats]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): the clip acts on the sequence ratio
    `s_i = exp(Δ_i)`, Δ_i the length-normalised log-ratio; mean over sequences. A row with no
    completion token adds 0 (as in verl and TRL), not −A_i, though it counts in the mean."""
    _check_clip(clip_low, clip_high)
    adv = group_normalized(x.rewards, x.group_size)  # (N,)
    seq_ratio = torch.exp(_sequence_log_ratio(x))  # (N,)
    per_seq, low, high = _clipped_surrogate(
        seq_ratio, adv, clip_low=clip_low, clip_high=clip_high
    )  # (N,)
    per_seq = torch.where(x.mask.sum(-1) > 0, per_seq, torch.zeros_like(per_seq))  # (N,)
    stats = {
        "train/clip_frac_low": low.double().mean().item(),
        "train/clip_frac_high": high.double().mean().item(),
        **_shared_stats(x),
    }
    return per_seq.mean(), stats


# ---------------------------------------------------------------- DPO


def dpo_loss(x: LossInputs, *, beta: float = 0.1) -> tuple[Tensor, Stats]:
    """Online DPO (Rafailov et al. 2023, arXiv 2305.18290) on pairs built from each group.

    chosen = first argmax R, rejected = first argmin R; groups with all rewards equal give no
    pair. With `S − S_ref = Σ_t m·(logp − ref)`:
    `ℓ = −log σ(β[(S_c − S_ref,c) − (S_r − S_ref,r)])`, mean over pairs; with no pair the
    loss is a 0 connected to the graph. `dpo/margin_mean` is the mean implicit reward margin
    `β[...]`, `dpo/pref_acc` the fraction of pairs where it is positive (both 0 with no pair).
    """
    if x.ref_logps is None:
        raise ValueError("dpo needs ref_logps (the frozen initial policy), got None")
    chosen, rejected = extreme_pairs(x.rewards, x.group_size)  # (K,), (K,)
    stats = {"dpo/pairs": float(chosen.numel()), **_shared_stats(x)}
    if chosen.numel() == 0:
        zero = (_masked(x.logps, x.mask) * 0.0).sum()  # () 0, but backward works
        stats |= {"dpo/reward_margin": 0.0, "dpo/pref_acc": 0.0, "dpo/margin_mean": 0.0}
        return zero, stats
    seq_log_ratio = _masked(x.logps - x.ref_logps, x.mask).sum(-1)  # (N,) S − S_ref
    margin = beta * (seq_log_ratio[chosen] - seq_log_ratio[rejected])  # (K,)
    loss = -F.logsigmoid(margin).mean()  # ()
    stats |= {
        "dpo/reward_margin": (x.rewards[chosen] - x.rewards[rejected]).double().mean().item(),
        "dpo/pref_acc": (margin.detach() > 0).double().mean().item(),
        "dpo/margin_mean": margin.detach().double().mean().item(),
    }
    return loss, stats


# ---------------------------------------------------------------- OPO

RATIOS = ("log", "exact")


def _check_opo(alpha: float, mu: float, ratio: str) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not mu > 0.0:
        raise ValueError(f"mu must be > 0, got {mu}")
    if ratio not in RATIOS:
        raise ValueError(f"ratio must be one of {', '.join(RATIOS)}; got '{ratio}'")


def _ratio_coordinate(delta: Tensor, ratio: str) -> Tensor:
    """`v = Δ` (ratio=log, the paper's surrogate) or `v = exp(Δ) − 1` (ratio=exact)."""
    return delta if ratio == "log" else torch.expm1(delta)  # (N,)


def opo_loss(x: LossInputs, *, alpha: float, mu: float, ratio: str = "log") -> tuple[Tensor, Stats]:
    """OPO, Algorithm 1 of arXiv 2601.12415: centred escort drive + chi^2 stiffness.

    `L = mean_i[−g_i·v_i + (μ/2)·v_i²]`; the optimum is `v* = g/μ`. Stats: `opo/v_star_dist`
    = mean |v − v*|, `opo/v_star_mean` = mean |v*| (v* itself averages to 0 within each
    group), `opo/positivity_ok` = 1.0 when μ >= max|g| (the update keeps π positive).
    """
    _check_opo(alpha, mu, ratio)
    g = centered_escort_drive(x.rewards, x.group_size, alpha=alpha)  # (N,) driving force
    delta = _sequence_log_ratio(x)  # (N,) length-normalised log-ratio
    v = _ratio_coordinate(delta, ratio)  # (N,) ratio coordinate
    loss = (-g * v + 0.5 * mu * v.square()).mean()  # ()
    v_star = g / mu  # (N,) closed-form optimum
    g_abs_max = g.abs().max().item()
    stats = {
        "opo/v_sq_mean": v.detach().square().mean().item(),
        "opo/delta_cubed_mean": delta.detach().abs().pow(3).mean().item(),
        "opo/g_abs_max": g_abs_max,
        "opo/v_star_dist": (v.detach() - v_star).abs().mean().item(),
        "opo/v_star_mean": v_star.abs().mean().item(),
        "opo/positivity_ok": 1.0 if mu >= g_abs_max else 0.0,
        **_shared_stats(x),
    }
    return loss, stats


_AUTHOR_EPS = 1e-10  # the author's epsilon inside (q+eps)^a (p+eps)^(1-a) and its normaliser


def _check_opo_code(
    alpha: float, mu: float, tau: float, beta_reward: float, vocab_size: int, **nonneg: float
) -> None:
    _check_opo(alpha, mu, "log")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 (the proxy uses log V), got {vocab_size}")
    if alpha == 1.0:
        raise ValueError("opo_code needs alpha < 1: its direction term is scaled by 1/(1 - alpha)")
    if not (tau > 0.0 and beta_reward > 0.0):
        raise ValueError(f"tau and beta_reward must be > 0, got {tau} and {beta_reward}")
    for name, value in nonneg.items():
        if value < 0.0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def author_advantages(rewards: Tensor, group_size: int, *, scale_rewards: bool) -> Tensor:
    """The author's `compute_adpo_advantages`: `R − mean_group R`, divided by the group's
    Bessel std (its variance floored at 1e-10; 1 for a group of one) when `scale_rewards`."""
    r = group_view(rewards, group_size)  # (P, G)
    centred = r - r.mean(-1, keepdim=True)  # (P, G)
    if not scale_rewards:
        return centred.flatten()  # (N,)
    if group_size == 1:
        return centred.flatten()  # (N,) all 0: the author divides by 1
    var = centred.square().sum(-1, keepdim=True) / (group_size - 1)  # (P, 1) Bessel
    return (centred / var.clamp(min=1e-10).sqrt()).flatten()  # (N,)


def author_temperature(
    seq_logp: Tensor,
    seq_old_logp: Tensor,
    adv: Tensor,
    *,
    tau: float,
    alpha_h: float,
    beta_c: float,
    tau_min: float,
    tau_max: float,
    vocab_size: int,
) -> tuple[Tensor, dict[str, float]]:
    """The author's adaptive temperature: one value for the whole batch the loss is given.

    `h_static` = batch mean of clamp(−old per-token mean log-prob / log V, 0, 1) (the sampling
    policy's entropy proxy), `confidence` = 1 − the same for the current policy, and
    `reward_signal` = 2·mean((A − min A)/max(max A − min A, 1e-6)) − 1 over the batch;
    τ = clamp(tau·(1 + alpha_h·h_static + beta_c·confidence·(−reward_signal)), tau_min, tau_max).
    """
    log_v = math.log(vocab_size)
    h_static = (-seq_old_logp / log_v).clamp(0.0, 1.0).mean()  # ()
    confidence = 1.0 - (-seq_logp / log_v).clamp(0.0, 1.0).mean()  # ()
    spread = (adv.max() - adv.min()).clamp(min=1e-6)  # ()
    reward_signal = 2.0 * ((adv - adv.min()) / spread).mean() - 1.0  # ()
    temp = tau * (1.0 + alpha_h * h_static + beta_c * confidence * (-reward_signal))  # ()
    stats = {
        "opo/h_static": h_static.item(),
        "opo/confidence": confidence.item(),
        "opo/reward_signal": reward_signal.item(),
    }
    return temp.clamp(tau_min, tau_max), stats


def _normalized_entropy(p: Tensor, group_size: int) -> float:
    """Mean over groups of H(p)/log G (1.0 for a uniform p; 1.0 when G = 1)."""
    if group_size == 1:
        return 1.0
    ent = -group_sum(p * torch.log(p.clamp(min=1e-30)), group_size)  # (P,)
    return (ent.mean() / math.log(group_size)).item()


def opo_code_loss(
    x: LossInputs,
    *,
    alpha: float,
    mu: float,
    tau: float = 0.5,
    beta_reward: float = 0.3,
    scale_rewards: bool = True,
    use_length_normalization: bool = True,
    clip_log_ratio: float = 5.0,
    clip_anchored_score: float = 10.0,
    use_adaptive_tau: bool = False,
    adaptive_tau_alpha: float = 0.2,
    adaptive_tau_beta: float = 0.5,
    adaptive_tau_min: float = 0.2,
    adaptive_tau_max: float = 1.5,
    vocab_size: int = 32000,
    logit_reg_coef: float = 0.0,
    grad_clip_value: float = 0.0,
) -> tuple[Tensor, Stats]:
    """OPO as its author runs it (arXiv 2601.12415), not the paper's Algorithm 1.

    The `opo` loss variant of github wk222/verlm, verl/trainer/adpo/core_algos.py (read at
    commit 20c210d0697d0333a65f80c3e69a695c3cee8673), advantages included. Option names are the
    author's; their defaults are the code's own (conf/method/opo_code.yaml holds the values of
    the author's config). `alpha` is ours: the author's is a = 1 − alpha. Per row,
    ℓ = per-token mean (or, without `use_length_normalization`, sum) of logp, ℓ_old likewise,
    Δ = clamp(ℓ − ℓ_old, ±clip_log_ratio):
    - A = R − mean_group R, divided by the group std when `scale_rewards`;
    - q = softmax_group(A/beta_reward), u = clamp(Δ/τ, ±clip_anchored_score), p = softmax_group(u);
      τ = `tau`, or with `use_adaptive_tau` one batch-level value (`author_temperature`);
    - w = (q + ε)^a·(sg[p] + ε)^(1−a) / (Σ_group + ε), ε = 1e-10;
    - per group: −(1/a)·Σ_j w_j·ℓ_j + (μ/2)·mean_j Δ_j², then the mean over groups;
    - with `grad_clip_value` > 0 that mean is divided by sg[max(|L|/grad_clip_value, 1)];
    - plus `logit_reg_coef`·(mean over groups of logsumexp_group u)².
    A clip of 0 turns it off. Rows are coupled within a group (softmaxes) and across the batch
    (τ, the logit term): pass whole groups.
    """
    _check_opo_code(
        alpha,
        mu,
        tau,
        beta_reward,
        vocab_size,
        clip_log_ratio=clip_log_ratio,
        clip_anchored_score=clip_anchored_score,
        logit_reg_coef=logit_reg_coef,
        grad_clip_value=grad_clip_value,
    )
    G, a = x.group_size, 1.0 - alpha
    lengths = x.mask.sum(-1).clamp(min=1.0) if use_length_normalization else 1.0  # (N,) or 1
    seq_logp = _masked(x.logps, x.mask).sum(-1) / lengths  # (N,) ℓ, with grad
    seq_old_logp = _masked(x.old_logps, x.mask).sum(-1) / lengths  # (N,) ℓ_old
    delta = seq_logp - seq_old_logp  # (N,)
    if clip_log_ratio > 0:
        delta = delta.clamp(-clip_log_ratio, clip_log_ratio)  # (N,)
    adv = author_advantages(x.rewards, G, scale_rewards=scale_rewards)  # (N,)
    temp, tau_stats = author_temperature(
        seq_logp.detach(),
        seq_old_logp,
        adv,
        tau=tau,
        alpha_h=adaptive_tau_alpha,
        beta_c=adaptive_tau_beta,
        tau_min=adaptive_tau_min,
        tau_max=adaptive_tau_max,
        vocab_size=vocab_size,
    )
    if not use_adaptive_tau:
        temp = delta.new_tensor(tau)  # ()
    scores = delta / temp  # (N,) anchored scores u
    if clip_anchored_score > 0:
        scores = scores.clamp(-clip_anchored_score, clip_anchored_score)  # (N,)
    q = group_softmax(adv, G, temperature=beta_reward)  # (N,) target
    p = group_softmax(scores.detach(), G, temperature=1.0)  # (N,) policy term, no grad
    w = (q + _AUTHOR_EPS).pow(a) * (p + _AUTHOR_EPS).pow(1.0 - a)  # (N,)
    w = w / (group_sum(w, G).repeat_interleave(G) + _AUTHOR_EPS)  # (N,) sums to ~1 per group
    direction = -group_sum(w * seq_logp, G) / a  # (P,)
    stiffness = 0.5 * mu * group_view(delta.square(), G).mean(-1)  # (P,)
    loss = (direction + stiffness).mean()  # ()
    if grad_clip_value > 0:
        loss = loss / (loss.detach().abs() / grad_clip_value).clamp(min=1.0)  # ()
    log_z = torch.logsumexp(group_view(scores, G), dim=-1)  # (P,) with grad through u
    logit_reg = logit_reg_coef * log_z.mean().square()  # ()
    stats = {
        "opo/v_sq_mean": delta.detach().square().mean().item(),
        "opo/tau": float(temp),
        "opo/p_entropy_norm": _normalized_entropy(p, G),
        "opo/logit_reg": logit_reg.item(),
        **tau_stats,
        **_shared_stats(x),
    }
    return loss + logit_reg, stats


# ---------------------------------------------------------------- registry

LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, float]]]] = {
    "opo": opo_loss,
    "opo_code": opo_code_loss,
    "grpo": grpo_loss,
    "dapo": dapo_loss,
    "gspo": gspo_loss,
    "dpo": dpo_loss,
}


# Losses whose gradient w.r.t. a row's log-probs depends on that row alone (L = Σ_i f_i(row i),
# the f_i fixed by rewards and masks): micro-batches of them need no gradient caching
# (`opo_cli.train.backward_minibatch`). dpo couples each pair, opo_code a group through p
# and the whole batch through its adaptive τ and logit term;
# tests check both directions of this declaration.
ROW_SEPARABLE = frozenset({"opo", "grpo", "dapo", "gspo"})


# ---------------------------------------------------------------- drives, for the logs


def _escort_drive(rewards: Tensor, group_size: int, *, alpha: float, **_) -> Tensor:
    return centered_escort_drive(rewards, group_size, alpha=alpha)  # (N,) OPO's g


def _normalized_advantage(rewards: Tensor, group_size: int, **_) -> Tensor:
    return group_normalized(rewards, group_size)  # (N,) GRPO's A


def _author_advantage(rewards: Tensor, group_size: int, *, scale_rewards: bool = True, **_):
    return author_advantages(rewards, group_size, scale_rewards=scale_rewards)  # (N,)


def _pair_role(rewards: Tensor, group_size: int, **_) -> Tensor:
    return pair_roles(rewards, group_size)  # (N,) +1 chosen, -1 rejected, 0 unpaired


# What each loss moves a completion by, per row, from the rewards it is given: what the
# completion logs show beside each reward (`opo_cli.completions`). name -> (label, function of
# (rewards (N,), G, **loss_kwargs) -> (N,)). opo_code's is the author's advantage, the input of
# its target q = softmax(A / beta_reward); dpo's is the row's role in its group's pair.
DRIVES: dict[str, tuple[str, Callable[..., Tensor]]] = {
    "opo": ("g", _escort_drive),
    "opo_code": ("A", _author_advantage),
    "grpo": ("A", _normalized_advantage),
    "dapo": ("A", _normalized_advantage),
    "gspo": ("A", _normalized_advantage),
    "dpo": ("pair", _pair_role),
}


def get_loss(name: str) -> Callable[..., tuple[Tensor, dict[str, float]]]:
    """The loss registered as `name`; a miss names the valid ones."""
    if name not in LOSSES:
        raise KeyError(f"unknown loss '{name}'; valid: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]
