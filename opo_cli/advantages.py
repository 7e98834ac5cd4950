"""Group statistics over rollouts: advantages, escort drives, softmaxes and online pairs.

A rollout stores N = P·G rows grouped contiguously: rows kG … kG+G−1 answer prompt k. Every
function here takes per-row values of shape (N,) and the group size G, and returns per-row
values of shape (N,) (or row indices), so the losses never reshape by hand. Pure tensor math;
nothing here needs gradients, but nothing here breaks them either.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_view(values: Tensor, group_size: int) -> Tensor:
    """`values` (N,) seen as (P, G); a clear error when N is not a multiple of G."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if values.dim() != 1 or values.numel() % group_size != 0:
        raise ValueError(
            f"expected per-row values of shape (P*G,) with G={group_size}, "
            f"got shape {tuple(values.shape)}"
        )
    return values.view(-1, group_size)  # (P, G)


def group_centered(rewards: Tensor, group_size: int) -> Tensor:
    """`R_i − mean_group(R)`: OPO's advantage (no division by the std). (N,) -> (N,)."""
    r = group_view(rewards, group_size)  # (P, G)
    return (r - r.mean(-1, keepdim=True)).flatten()  # (N,)


def group_normalized(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO's advantage `(R_i − mean_group R) / (std_group R + eps)`. (N,) -> (N,).

    std uses Bessel's correction (torch's default), so a group needs G >= 2.
    """
    if group_size < 2:
        raise ValueError(f"group_normalized needs group_size >= 2 (Bessel std), got {group_size}")
    r = group_view(rewards, group_size)  # (P, G)
    std = r.std(-1, keepdim=True)  # (P, 1) unbiased
    return ((r - r.mean(-1, keepdim=True)) / (std + eps)).flatten()  # (N,)


def uniform_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Per group, True when all its rewards are equal (no learning signal). (N,) -> (P,)."""
    r = group_view(rewards, group_size)  # (P, G)
    return r.amax(-1) == r.amin(-1)  # (P,) bool


def uniform_group_fraction(rewards: Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal, as a Python float."""
    return uniform_groups(rewards, group_size).double().mean().item()


def centered_escort_drive(rewards: Tensor, group_size: int, *, alpha: float) -> Tensor:
    """OPO's driving force `g_i = ω_i − mean_group ω`, `ω_i = exp((1−α)·A_i)`. (N,) -> (N,).

    `A` is the group-centred reward (arXiv 2601.12415, Algorithm 1, steps 1-3).
    """
    adv = group_centered(rewards, group_size)  # (N,)  group-centred, no std
    escort = torch.exp((1.0 - alpha) * adv)  # (N,)  escort weight ω
    return group_centered(escort, group_size)  # (N,)  centred driving force g


def group_softmax(values: Tensor, group_size: int, *, temperature: Tensor | float) -> Tensor:
    """Softmax of `values / temperature` within each group. (N,) -> (N,).

    `temperature` is a float or a per-group tensor of shape (P,).
    """
    z = group_view(values, group_size)  # (P, G)
    if isinstance(temperature, Tensor):
        temperature = temperature.unsqueeze(-1)  # (P, 1)
    return torch.softmax(z / temperature, dim=-1).flatten()  # (N,)


def group_sum(values: Tensor, group_size: int) -> Tensor:
    """Sum of `values` within each group. (N,) -> (P,)."""
    return group_view(values, group_size).sum(-1)  # (P,)


def extreme_pairs(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Online preference pairs: per group, chosen = first argmax R, rejected = first argmin R.

    Groups whose rewards are all equal give no pair. Returns global row indices
    `(chosen, rejected)`, each of shape (K,), K = number of non-uniform groups.
    """
    r = group_view(rewards, group_size)  # (P, G)
    offsets = torch.arange(r.shape[0], device=r.device) * group_size  # (P,)
    chosen = offsets + r.argmax(-1)  # (P,)  torch returns the first maximal index
    rejected = offsets + r.argmin(-1)  # (P,)  and the first minimal one
    keep = ~uniform_groups(rewards, group_size)  # (P,) bool
    return chosen[keep], rejected[keep]  # (K,), (K,)


def pair_roles(rewards: Tensor, group_size: int) -> Tensor:
    """Each row's part in `extreme_pairs`: +1 chosen, −1 rejected, 0 in no pair. (N,) -> (N,)."""
    roles = torch.zeros_like(rewards, dtype=torch.float32)  # (N,)
    chosen, rejected = extreme_pairs(rewards, group_size)  # (K,), (K,)
    roles[chosen], roles[rejected] = 1.0, -1.0
    return roles  # (N,)
