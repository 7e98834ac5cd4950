"""Property tests (Hypothesis) for the losses and the group statistics behind them.

Random group sizes, padding patterns (rows with no completion token included), rewards and
ratios; every loss must be finite, ignore what padding holds, be equivariant under a
permutation of rows within a group, be unchanged by the reward transforms it is invariant
under, and have the gradient its value has (float64 finite differences). Deterministic
(`derandomize`, no example database), so CI sees the same examples every run. Run:
    pytest tests/test_loss_properties.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opo_cli.advantages import (
    centered_escort_drive,
    extreme_pairs,
    group_centered,
    group_normalized,
    group_softmax,
    uniform_group_fraction,
)
from opo_cli.losses import LOSSES, LossInputs

F64 = torch.float64
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, database=None)

# one setting of every loss; opo_code with a fixed τ where a test needs a pure function
LOSS_CASES = {
    "opo": {"alpha": 0.5, "mu": 1.0},
    "opo_exact": {"alpha": 0.2, "mu": 2.0, "ratio": "exact"},
    "opo_code": {"alpha": 0.4, "mu": 1.0, "use_adaptive_tau": True, "logit_reg_coef": 0.01},
    "grpo": {"beta": 0.05},
    "grpo_token_mean": {"agg": "token_mean"},
    "dapo": {},
    "gspo": {"clip_low": 0.2, "clip_high": 0.2},
    "dpo": {"beta": 0.1},
}


def loss_of(case: str):
    return LOSSES[case.split("_")[0] if case != "opo_code" else "opo_code"]


@st.composite
def batches(draw, *, min_group: int = 2, max_group: int = 5, rewards=None):
    """(P, G, T, lengths, log-ratios, old, ref shift, rewards): a batch of P groups of G rows."""
    P = draw(st.integers(1, 3))
    G = draw(st.integers(min_group, max_group))
    T = draw(st.integers(1, 4))
    N = P * G
    lengths = draw(st.lists(st.integers(0, T), min_size=N, max_size=N))
    floats = st.floats(-1.0, 1.0, allow_nan=False)
    lr = draw(st.lists(st.lists(floats, min_size=T, max_size=T), min_size=N, max_size=N))
    old = draw(
        st.lists(st.lists(st.floats(-4.0, -0.01), min_size=T, max_size=T), min_size=N, max_size=N)
    )
    ref = draw(st.lists(st.lists(floats, min_size=T, max_size=T), min_size=N, max_size=N))
    reward_values = st.sampled_from([0.0, 0.5, 1.0, 2.0]) if rewards is None else rewards
    r = draw(st.lists(reward_values, min_size=N, max_size=N))
    return {"G": G, "T": T, "lengths": lengths, "lr": lr, "old": old, "ref": ref, "rewards": r}


def inputs(b: dict, *, garbage: float | None = None) -> LossInputs:
    """LossInputs of a drawn batch; `garbage` overwrites every padded position of logps, old
    and ref (with -inf in the first padded logp, if any)."""
    lr, old, ref = (torch.tensor(b[k], dtype=F64) for k in ("lr", "old", "ref"))
    mask = (torch.arange(b["T"]) < torch.tensor(b["lengths"]).unsqueeze(-1)).to(F64)
    logps, ref = old + lr, old + ref
    if garbage is not None:
        pad = mask == 0
        logps, old, ref = (
            v.masked_fill(pad, garbage * k) for k, v in ((1, logps), (-2, old), (3, ref))
        )
        if pad.any():
            logps[pad.nonzero()[0].tolist()[0], pad.nonzero()[0].tolist()[1]] = -math.inf
    return LossInputs(
        logps.requires_grad_(True), old, ref, mask, torch.tensor(b["rewards"], dtype=F64), b["G"]
    )


def value_grad_stats(case: str, x: LossInputs):
    loss, stats = loss_of(case)(x, **LOSS_CASES[case])
    (grad,) = torch.autograd.grad(loss, x.logps, allow_unused=False)
    return loss.detach(), grad, stats


CASES = sorted(LOSS_CASES)


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("case", CASES)
@PROPERTY
@given(b=batches())
def test_every_loss_is_finite_and_padding_gets_no_gradient(case, b):
    loss, grad, stats = value_grad_stats(case, inputs(b))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert torch.equal(grad * (1 - inputs(b).mask), torch.zeros_like(grad))


@pytest.mark.parametrize("case", CASES)
@PROPERTY
@given(b=batches(), garbage=st.sampled_from([0.0, 50.0, -1e4]))
def test_what_padding_holds_changes_nothing(case, b, garbage):
    loss, grad, stats = value_grad_stats(case, inputs(b))
    loss_g, grad_g, stats_g = value_grad_stats(case, inputs(b, garbage=garbage))
    torch.testing.assert_close(loss_g, loss)
    torch.testing.assert_close(grad_g, grad)
    assert stats_g == pytest.approx(stats)


@pytest.mark.parametrize("case", CASES)
@PROPERTY
@given(b=batches(), seed=st.integers(0, 2**16))
def test_permuting_rows_within_groups_permutes_the_gradient(case, b, seed):
    # rewards made distinct, so that dpo's first argmax / argmin is one row, wherever it goes,
    # and unevenly, so that no row sits on its group's mean: an advantage of 0 computed as
    # +-1e-17 in one row order and the other flips whether the clip "binds" (a stat, not the
    # gradient, which is ~0 either way)
    b = b | {"rewards": [r + 1.4142e-3 * i * i for i, r in enumerate(b["rewards"])]}
    x = inputs(b)
    G, N = b["G"], len(b["rewards"])
    gen = torch.Generator().manual_seed(seed)
    perm = torch.cat([k + torch.randperm(G, generator=gen) for k in range(0, N, G)])
    y = LossInputs(
        x.logps.detach()[perm].requires_grad_(True),
        x.old_logps[perm],
        x.ref_logps[perm],
        x.mask[perm],
        x.rewards[perm],
        G,
    )
    loss, grad, stats = value_grad_stats(case, x)
    loss_p, grad_p, stats_p = value_grad_stats(case, y)
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(grad_p, grad[perm])
    assert stats_p == pytest.approx(stats)


@pytest.mark.parametrize("case", CASES)
@PROPERTY
@given(b=batches(), shift=st.floats(-5.0, 5.0))
def test_adding_a_constant_to_every_reward_changes_nothing(case, b, shift):
    # every method reads rewards relative to its group (centred, normalised, or argmax/argmin)
    x = inputs(b)
    y = LossInputs(x.logps, x.old_logps, x.ref_logps, x.mask, x.rewards + shift, x.group_size)
    loss, grad, _ = value_grad_stats(case, x)
    loss_s, grad_s, _ = value_grad_stats(case, y)
    torch.testing.assert_close(loss_s, loss)
    torch.testing.assert_close(grad_s, grad)


SCALE_FREE = ["grpo", "grpo_token_mean", "dapo", "gspo", "dpo"]  # not opo: exp((1−α)A) has a scale


@pytest.mark.parametrize("case", SCALE_FREE)
@PROPERTY
@given(b=batches(rewards=st.sampled_from([0.0, 1.0, 2.0, 3.0])), scale=st.floats(0.5, 20.0))
def test_scaling_rewards_changes_nothing_where_the_method_is_scale_free(case, b, scale):
    # A = (R − mean)/(std + 1e-4): scale-free up to the 1e-4 (rewards 0..3: std >= 0.5 when
    # not 0, so A moves by at most ~2e-4 relative); DPO's pairs depend only on reward order
    x = inputs(b)
    y = LossInputs(x.logps, x.old_logps, x.ref_logps, x.mask, x.rewards * scale, x.group_size)
    loss, grad, _ = value_grad_stats(case, x)
    loss_s, grad_s, _ = value_grad_stats(case, y)
    torch.testing.assert_close(loss_s, loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad_s, grad, rtol=1e-3, atol=1e-3)


@PROPERTY
@given(b=batches(rewards=st.sampled_from([0.0, 1.0, 2.0, 3.0])), scale=st.floats(0.5, 20.0))
def test_opo_code_with_scaled_rewards_is_scale_free(b, scale):
    kwargs = {"alpha": 0.4, "mu": 1.0, "scale_rewards": True}
    x = inputs(b)
    y = LossInputs(x.logps, x.old_logps, x.ref_logps, x.mask, x.rewards * scale, x.group_size)
    torch.testing.assert_close(
        LOSSES["opo_code"](y, **kwargs)[0], LOSSES["opo_code"](x, **kwargs)[0]
    )


@pytest.mark.parametrize("case", CASES)
@PROPERTY
@given(b=batches(rewards=st.just(1.0)))
def test_groups_whose_rewards_are_all_equal_are_finite(case, b):
    # the usual first steps on a hard task: every completion wrong (or every one right)
    loss, grad, stats = value_grad_stats(case, inputs(b))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert stats["train/frac_uniform_groups"] == 1.0
    if case in ("grpo_token_mean", "dapo", "gspo", "dpo"):  # A = 0 (or no pair), no KL term
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("case", CASES)
@PROPERTY
@given(b=batches())
def test_rows_with_no_completion_token_get_no_gradient(case, b):
    b = b | {"lengths": [0 if i % 2 else n for i, n in enumerate(b["lengths"])]}
    loss, grad, stats = value_grad_stats(case, inputs(b))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(math.isfinite(v) for v in stats.values())
    assert torch.equal(grad[1::2], torch.zeros_like(grad[1::2]))


# Cases whose autograd gradient is the derivative of their value. opo_code as shipped is not:
# p and the adaptive τ are stop-gradient (sg[·]) by the author's design, so it is checked with
# α = 0 (w = q, no p) and a fixed τ; its logit term keeps a gradient through the scores.
GRADCHECK = {name: LOSS_CASES[name] for name in CASES if name != "opo_code"} | {
    "opo_code": {"alpha": 0.0, "mu": 1.5, "use_adaptive_tau": False, "logit_reg_coef": 0.1}
}


@pytest.mark.parametrize("case", sorted(GRADCHECK))
@settings(max_examples=10, deadline=None, derandomize=True, database=None)
@given(b=batches(max_group=3))
def test_gradient_matches_finite_differences(case, b):
    x = inputs(b)

    def value(logps):
        y = LossInputs(logps, x.old_logps, x.ref_logps, x.mask, x.rewards, x.group_size)
        return loss_of(case)(y, **GRADCHECK[case])[0]

    assert torch.autograd.gradcheck(value, (x.logps,), eps=1e-6, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- group statistics


def groups(values: torch.Tensor, G: int) -> torch.Tensor:
    return values.view(-1, G)


REWARD = st.integers(-40, 40).map(lambda k: k / 4)  # rewards on a grid: no subnormal spreads
rewards_and_group = st.integers(1, 6).flatmap(
    lambda G: st.tuples(
        st.just(G),
        st.lists(REWARD, min_size=G, max_size=4 * G).map(lambda r: r[: len(r) - len(r) % G]),
    )
)


@PROPERTY
@given(rg=rewards_and_group, shift=st.floats(-100.0, 100.0), alpha=st.floats(0.0, 1.0))
def test_centred_statistics_sum_to_zero_and_ignore_a_shift(rg, shift, alpha):
    G, r = rg
    r = torch.tensor(r, dtype=F64)
    for fn in (group_centered, lambda v, g: centered_escort_drive(v, g, alpha=alpha)):
        out = fn(r, G)
        torch.testing.assert_close(groups(out, G).sum(-1), torch.zeros(len(r) // G, dtype=F64))
        torch.testing.assert_close(fn(r + shift, G), out, atol=1e-9, rtol=1e-9)


@PROPERTY
@given(rg=rewards_and_group, alpha=st.floats(0.0, 0.99))
def test_escort_drive_orders_rows_as_their_rewards(rg, alpha):
    # g is an increasing function of R within a group: a better answer is pushed harder
    G, r = rg
    r = torch.tensor(r, dtype=F64)
    g = groups(centered_escort_drive(r, G, alpha=alpha), G)
    rv = groups(r, G)
    higher = rv.unsqueeze(-1) > rv.unsqueeze(-2)  # (P, G, G)
    assert (g.unsqueeze(-1) >= g.unsqueeze(-2))[higher].all()


@PROPERTY
@given(
    rg=rewards_and_group.filter(lambda rg: rg[0] >= 2),
    scale=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**16),
)
def test_group_normalized_is_scale_free_and_permutation_equivariant(rg, scale, seed):
    G, r = rg
    r = torch.tensor(r, dtype=F64)
    a = group_normalized(r, G, eps=0.0)
    uniform = groups(r, G).std(-1) == 0
    kept = ~uniform.repeat_interleave(G)
    torch.testing.assert_close(group_normalized(r * scale, G, eps=0.0)[kept], a[kept])
    # unit Bessel variance: Σ A² = G − 1 in every group with a spread
    torch.testing.assert_close(
        groups(a, G)[~uniform].square().sum(-1), (G - 1.0) + 0 * groups(a, G)[~uniform][:, 0]
    )
    assert torch.equal(group_normalized(r, G)[~kept], torch.zeros(int((~kept).sum()), dtype=F64))
    perm = torch.cat(
        [
            k + torch.randperm(G, generator=torch.Generator().manual_seed(seed))
            for k in range(0, len(r), G)
        ]
    )
    torch.testing.assert_close(group_normalized(r[perm], G), group_normalized(r, G)[perm])


@PROPERTY
@given(rg=rewards_and_group, shift=st.floats(-50.0, 50.0), temperature=st.floats(0.05, 5.0))
def test_group_softmax_is_a_distribution_per_group(rg, shift, temperature):
    G, r = rg
    r = torch.tensor(r, dtype=F64)
    p = group_softmax(r, G, temperature=temperature)
    assert (p >= 0).all()
    torch.testing.assert_close(groups(p, G).sum(-1), torch.ones(len(r) // G, dtype=F64))
    torch.testing.assert_close(group_softmax(r + shift, G, temperature=temperature), p)


@PROPERTY
@given(rg=rewards_and_group.map(lambda rg: (rg[0], [round(v) for v in rg[1]])))
def test_extreme_pairs_are_the_first_best_and_first_worst_of_each_varied_group(rg):
    G, r = rg
    chosen, rejected = extreme_pairs(torch.tensor(r, dtype=F64), G)
    varied = [k for k in range(0, len(r), G) if len(set(r[k : k + G])) > 1]
    assert chosen.tolist() == [k + r[k : k + G].index(max(r[k : k + G])) for k in varied]
    assert rejected.tolist() == [k + r[k : k + G].index(min(r[k : k + G])) for k in varied]
    expected = 1 - len(varied) / (len(r) // G)
    assert uniform_group_fraction(torch.tensor(r, dtype=F64), G) == pytest.approx(expected)
