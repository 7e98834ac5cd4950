"""Loss functions against hand-derived values and gradients, plus invariances.

Expected numbers are computed here from the formulas in DESIGN.md §1-2 with plain Python
(`math`, loops), never copied from a run. Everything is float64. Run:
    pytest tests/test_losses.py -q
"""

import math

import pytest
import torch
import torch.nn.functional as F

from opo_cli.losses import LOSSES, ROW_SEPARABLE, LossInputs, get_loss

F64 = torch.float64

# Two groups of three, three token slots. Row i's log-ratio `logp − old` is LR[i]; padded
# slots (mask 0) hold values the losses must ignore (e.g. 9.0 in row 2).
OLD = [
    [-1.0, -0.5, -2.0],
    [-0.7, -1.2, -0.3],
    [-1.5, -0.9, -0.4],
    [-0.2, -0.8, -1.1],
    [-0.6, -1.3, -0.9],
    [-1.0, -0.4, -0.7],
]
LR = [
    [0.1, -0.3, 0.5],
    [0.3, -0.1, 0.0],
    [-0.4, 0.05, 9.0],
    [0.2, 0.2, 0.2],
    [0.25, 0.1, -0.2],
    [0.0, -0.1, 0.3],
]
MASK = [
    [1, 1, 0],
    [1, 1, 1],
    [1, 1, 0],
    [1, 0, 0],
    [1, 1, 1],
    [1, 1, 1],
]
REWARDS = [1.0, 0.0, 0.0, 0.5, 1.0, 0.0]
REF_SHIFT = [  # ref − old
    [0.2, -0.1, 0.0],
    [0.0, 0.3, -0.2],
    [0.1, 0.1, 0.1],
    [-0.3, 0.0, 0.0],
    [0.05, -0.05, 0.2],
    [0.4, 0.0, -0.1],
]


def t(values):
    return torch.tensor(values, dtype=F64)


def make(
    lr=LR, mask=MASK, rewards=REWARDS, group_size=3, ref_shift=REF_SHIFT, old=OLD
) -> LossInputs:
    """logps = old + lr as a leaf (so .grad is d loss / d logps); ref = old + ref_shift."""
    old_t = t(old) if old is not None else torch.zeros(len(lr), len(lr[0]), dtype=F64)
    logps = (old_t + t(lr)).requires_grad_(True)
    ref = None if ref_shift is None else old_t + t(ref_shift)
    return LossInputs(logps, old_t, ref, t(mask), t(rewards), group_size)


NO_REF = {"old": None, "ref_shift": None}  # small hand cases: old = 0, no reference


def run(name, x, **kwargs):
    loss, stats = LOSSES[name](x, **kwargs)
    loss.backward()
    return loss.detach(), x.logps.grad, stats


# ---------------------------------------------------------------- hand references


def hand_group_norm(rewards, G, eps=1e-4):
    out = []
    for k in range(0, len(rewards), G):
        grp = rewards[k : k + G]
        mean = sum(grp) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / (G - 1))  # Bessel
        out += [(r - mean) / (std + eps) for r in grp]
    return out


def hand_escort_drive(rewards, G, alpha):
    g = []
    for k in range(0, len(rewards), G):
        grp = rewards[k : k + G]
        mean = sum(grp) / G
        w = [math.exp((1 - alpha) * (r - mean)) for r in grp]
        g += [wi - sum(w) / G for wi in w]
    return g


def hand_delta(lr, mask):
    return [
        sum(a * m for a, m in zip(r, mr, strict=True)) / sum(mr)
        for r, mr in zip(lr, mask, strict=True)
    ]


def hand_clipped_token(lr, mask, adv, *, lo, hi, beta=0.0, kl_d=None, agg):
    """GRPO/DAPO by hand: loss, d loss / d logp, clip fractions, mean k3.

    kl_d[i][t] = ref − logp. d(−ρA)/dlogp = −ρA unless the clip binds (then 0);
    d k3 / d logp = 1 − exp(ref − logp).
    """
    N, T = len(lr), len(lr[0])
    n_tok = sum(sum(r) for r in mask)
    loss, grad = 0.0, [[0.0] * T for _ in range(N)]
    n_low = n_high = 0
    k3_sum = 0.0
    for i in range(N):
        L, A = sum(mask[i]), adv[i]
        weight = 1.0 / (N * L) if agg == "seq_mean_token_mean" else 1.0 / n_tok
        for j in range(T):
            if not mask[i][j]:
                continue
            rho = math.exp(lr[i][j])
            low, high = A < 0 and rho < 1 - lo, A > 0 and rho > 1 + hi
            n_low, n_high = n_low + low, n_high + high
            clipped = min(max(rho, 1 - lo), 1 + hi)
            term = -(clipped * A if (low or high) else rho * A)
            dterm = 0.0 if (low or high) else -rho * A
            if kl_d is not None:
                d = kl_d[i][j]
                k3_sum += math.exp(d) - d - 1
                term += beta * (math.exp(d) - d - 1)
                dterm += beta * (1 - math.exp(d))
            loss += weight * term
            grad[i][j] = weight * dterm
    return loss, grad, n_low / n_tok, n_high / n_tok, k3_sum / n_tok


def kl_d_of(lr, ref_shift):
    return [
        [s - a for a, s in zip(r, rs, strict=True)] for r, rs in zip(lr, ref_shift, strict=True)
    ]


# ---------------------------------------------------------------- GRPO / DAPO


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_grpo_value_grad_and_clip_stats_by_hand(agg, beta):
    adv = hand_group_norm(REWARDS, 3)
    kl_d = kl_d_of(LR, REF_SHIFT)
    exp_loss, exp_grad, low, high, k3 = hand_clipped_token(
        LR, MASK, adv, lo=0.2, hi=0.2, beta=beta, kl_d=kl_d, agg=agg
    )
    assert low == high == 1 / 14  # the fixture has one binding token on each side
    loss, grad, stats = run("grpo", make(), beta=beta, agg=agg)
    torch.testing.assert_close(loss, t(exp_loss))
    torch.testing.assert_close(grad, t(exp_grad))
    assert stats["train/clip_frac_low"] == pytest.approx(low)
    assert stats["train/clip_frac_high"] == pytest.approx(high)
    assert stats["train/kl_ref"] == pytest.approx(k3)
    assert stats["train/frac_uniform_groups"] == 0.0


def test_dapo_defaults_are_clip_higher_and_token_mean():
    adv = hand_group_norm(REWARDS, 3)
    exp_loss, exp_grad, low, high, _ = hand_clipped_token(
        LR, MASK, adv, lo=0.2, hi=0.28, agg="token_mean"
    )
    loss, grad, stats = run("dapo", make(ref_shift=None))
    torch.testing.assert_close(loss, t(exp_loss))
    torch.testing.assert_close(grad, t(exp_grad))
    assert stats["train/clip_frac_low"] == pytest.approx(low)
    assert stats["train/clip_frac_high"] == pytest.approx(high)
    assert "train/kl_ref" not in stats  # no reference given


def test_grpo_kl_term_alone_when_groups_are_uniform():
    # uniform rewards -> A = 0, so the loss is beta * seq-mean-token-mean of k3
    beta = 0.5
    kl_d = kl_d_of(LR, REF_SHIFT)
    loss, grad, _ = run("grpo", make(rewards=[2.0] * 6), beta=beta)
    exp_loss, exp_grad = 0.0, [[0.0] * 3 for _ in range(6)]
    for i in range(6):
        L = sum(MASK[i])
        for j in range(3):
            if MASK[i][j]:
                d = kl_d[i][j]
                exp_loss += beta * (math.exp(d) - d - 1) / (6 * L)
                exp_grad[i][j] = beta * (1 - math.exp(d)) / (6 * L)
    torch.testing.assert_close(loss, t(exp_loss))
    torch.testing.assert_close(grad, t(exp_grad))


def test_grpo_kl_is_zero_at_the_reference():
    loss, grad, stats = run("grpo", make(rewards=[2.0] * 6, ref_shift=LR), beta=0.3)
    assert loss.item() == 0.0
    torch.testing.assert_close(grad, torch.zeros(6, 3, dtype=F64))
    assert stats["train/kl_ref"] == 0.0


def test_grpo_uniform_groups_give_zero_advantage():
    loss, grad, stats = run("grpo", make(rewards=[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
    assert loss.item() == 0.0
    torch.testing.assert_close(grad, torch.zeros(6, 3, dtype=F64))
    assert stats["train/frac_uniform_groups"] == 1.0


def test_grpo_beta_without_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="needs ref_logps"):
        LOSSES["grpo"](make(ref_shift=None), beta=0.1)


def test_grpo_unknown_aggregation_lists_valid_ones():
    with pytest.raises(ValueError, match="seq_mean_token_mean, token_mean"):
        LOSSES["grpo"](make(), agg="sum")


# ---------------------------------------------------------------- GSPO


def test_gspo_value_grad_and_clip_stats_by_hand():
    lo = hi = 0.05
    adv, delta = hand_group_norm(REWARDS, 3), hand_delta(LR, MASK)
    N = 6
    exp_loss, exp_grad, n_low, n_high = 0.0, [[0.0] * 3 for _ in range(N)], 0, 0
    for i in range(N):
        s, A, L = math.exp(delta[i]), adv[i], sum(MASK[i])
        low, high = A < 0 and s < 1 - lo, A > 0 and s > 1 + hi
        n_low, n_high = n_low + low, n_high + high
        clipped = min(max(s, 1 - lo), 1 + hi)
        exp_loss += -(clipped * A if (low or high) else s * A) / N
        for j in range(3):
            if MASK[i][j] and not (low or high):
                exp_grad[i][j] = -A * s / L / N
    assert (n_low, n_high) == (1, 1)  # rows 2 and 4 bind
    loss, grad, stats = run("gspo", make(), clip_low=lo, clip_high=hi)
    torch.testing.assert_close(loss, t(exp_loss))
    torch.testing.assert_close(grad, t(exp_grad))
    assert stats["train/clip_frac_low"] == pytest.approx(1 / 6)
    assert stats["train/clip_frac_high"] == pytest.approx(1 / 6)


def test_gspo_zero_gradient_where_the_clip_binds():
    # default clip (3e-4, 4e-4); sequence log-ratios ±0.01 are far outside it.
    # row 0: A>0, s>1+hi -> binds; row 1: A<0, s<1-lo -> binds; rows 2, 3 do not.
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    lr = [[0.01, 0.01], [-0.01, -0.01], [0.01, 0.01], [-0.01, -0.01]]
    x = make(lr=lr, mask=[[1, 1]] * 4, rewards=[1.0, 0.0, 0.0, 1.0], group_size=2, **NO_REF)
    loss, grad, stats = run("gspo", x)
    e_up, e_dn = math.exp(0.01), math.exp(-0.01)
    exp_loss = (-(1 + 4e-4) * a + (1 - 3e-4) * a + e_up * a - e_dn * a) / 4
    exp_grad = [[0.0, 0.0], [0.0, 0.0], [a * e_up / 8] * 2, [-a * e_dn / 8] * 2]
    torch.testing.assert_close(loss, t(exp_loss))
    torch.testing.assert_close(grad, t(exp_grad))
    assert stats["train/clip_frac_low"] == 0.25
    assert stats["train/clip_frac_high"] == 0.25


# ---------------------------------------------------------------- DPO


def test_dpo_closed_form_margins():
    # T = 1, ref = old = 0; in each group of two row 0 wins. S_c − S_r = 0, 2, 4 and
    # beta = 0.5 give beta * margin = 0, 1, 2, so each pair's loss is log(1 + e^-m).
    lr = [[0.0], [0.0], [1.0], [-1.0], [3.0], [-1.0]]
    x = make(
        lr=lr, mask=[[1]] * 6, rewards=[1.0, 0.0] * 3, group_size=2, old=None, ref_shift=[[0.0]] * 6
    )
    loss, grad, stats = run("dpo", x, beta=0.5)
    m = t([0.0, 1.0, 2.0])
    torch.testing.assert_close(loss, F.softplus(-m).mean())
    # d/dm log(1 + e^-m) = −σ(−m); chosen rows get −σ(−m)·β/K, rejected rows the opposite
    d = [-0.5 / (1 + math.exp(mi)) / 3 for mi in (0.0, 1.0, 2.0)]
    torch.testing.assert_close(grad, t([[d[0]], [-d[0]], [d[1]], [-d[1]], [d[2]], [-d[2]]]))
    assert stats["dpo/pairs"] == 3.0
    assert stats["dpo/margin_mean"] == pytest.approx(1.0)
    assert stats["dpo/pref_acc"] == pytest.approx(2 / 3)  # margin 0 is not positive
    assert stats["dpo/reward_margin"] == 1.0


def test_dpo_value_and_grad_by_hand_with_padding_and_ties():
    # group 0 rewards (1, 0, 0): chosen row 0, rejected row 1 (first argmin of the tie);
    # group 1 rewards (0.5, 1, 0): chosen row 4, rejected row 5.
    beta = 0.2
    sr = [
        sum(m * (a - s) for a, s, m in zip(*rows, strict=True))
        for rows in zip(LR, REF_SHIFT, MASK, strict=True)
    ]
    pairs = [(0, 1), (4, 5)]
    margins = [beta * (sr[c] - sr[r]) for c, r in pairs]
    exp_loss = sum(math.log1p(math.exp(-m)) for m in margins) / 2
    exp_grad = [[0.0] * 3 for _ in range(6)]
    for (c, r), m in zip(pairs, margins, strict=True):
        for j in range(3):
            exp_grad[c][j] = -beta / (1 + math.exp(m)) / 2 * MASK[c][j]
            exp_grad[r][j] = beta / (1 + math.exp(m)) / 2 * MASK[r][j]
    loss, grad, stats = run("dpo", make(), beta=beta)
    torch.testing.assert_close(loss, t(exp_loss))
    torch.testing.assert_close(grad, t(exp_grad))
    assert stats["dpo/pairs"] == 2.0
    assert stats["dpo/margin_mean"] == pytest.approx(sum(margins) / 2)
    assert stats["dpo/pref_acc"] == pytest.approx(sum(m > 0 for m in margins) / 2)


def test_dpo_without_any_pair_is_a_connected_zero():
    x = make(rewards=[1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    loss, stats = LOSSES["dpo"](x)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    torch.testing.assert_close(x.logps.grad, torch.zeros(6, 3, dtype=F64))
    assert stats["dpo/pairs"] == 0.0
    assert stats["train/frac_uniform_groups"] == 1.0


def test_dpo_without_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="needs ref_logps"):
        LOSSES["dpo"](make(ref_shift=None))


# ---------------------------------------------------------------- OPO (paper form)


@pytest.mark.parametrize("ratio", ["log", "exact"])
def test_opo_value_and_grad_by_hand(ratio):
    alpha, mu, N = 0.4, 1.5, 6
    g, delta = hand_escort_drive(REWARDS, 3, alpha), hand_delta(LR, MASK)
    v = delta if ratio == "log" else [math.expm1(d) for d in delta]
    dv = [1.0] * N if ratio == "log" else [math.exp(d) for d in delta]  # dv/dΔ
    exp_loss = sum(-gi * vi + 0.5 * mu * vi**2 for gi, vi in zip(g, v, strict=True)) / N
    exp_grad = [
        [(-g[i] + mu * v[i]) * dv[i] * MASK[i][j] / sum(MASK[i]) / N for j in range(3)]
        for i in range(N)
    ]
    loss, grad, stats = run("opo", make(), alpha=alpha, mu=mu, ratio=ratio)
    torch.testing.assert_close(loss, t(exp_loss))
    torch.testing.assert_close(grad, t(exp_grad))
    assert stats["opo/v_star_dist"] == pytest.approx(
        sum(abs(vi - gi / mu) for vi, gi in zip(v, g, strict=True)) / N
    )
    assert stats["opo/v_star_mean"] == pytest.approx(sum(abs(gi) / mu for gi in g) / N)
    assert stats["opo/g_abs_max"] == pytest.approx(max(abs(gi) for gi in g))
    assert stats["opo/v_sq_mean"] == pytest.approx(sum(vi**2 for vi in v) / N)
    assert stats["opo/delta_cubed_mean"] == pytest.approx(sum(abs(d) ** 3 for d in delta) / N)


def test_opo_at_delta_zero_is_a_centred_weighted_policy_gradient():
    alpha, N = 0.3, 6
    g = hand_escort_drive(REWARDS, 3, alpha)
    zeros = [[0.0] * 3 for _ in range(N)]
    _, grad, _ = run("opo", make(lr=zeros), alpha=alpha, mu=5.0)
    exp = [[-g[i] * MASK[i][j] / sum(MASK[i]) / N for j in range(3)] for i in range(N)]
    torch.testing.assert_close(grad, t(exp))  # μ has no gradient at Δ = 0


def test_opo_gradient_in_v_is_minus_g_plus_mu_v():
    # one token per row, so v = Δ = logp − old and d loss / d logps = (−g + μv) / N
    alpha, mu, N = 0.2, 0.7, 6
    v = [0.3, -0.2, 0.1, 0.0, 0.5, -0.4]
    g = hand_escort_drive(REWARDS, 3, alpha)
    x = make(lr=[[vi] for vi in v], mask=[[1]] * N, ref_shift=None, old=None)
    _, grad, _ = run("opo", x, alpha=alpha, mu=mu)
    torch.testing.assert_close(
        grad, t([[(-gi + mu * vi) / N] for gi, vi in zip(g, v, strict=True)])
    )


def test_opo_closed_form_optimum_is_g_over_mu():
    # The loss is quadratic in v with Hessian (μ/N)·I, so one exact Newton step from v = 0
    # lands on v* = g/μ, where the gradient vanishes.
    alpha, mu, N = 0.5, 2.0, 6
    g = hand_escort_drive(REWARDS, 3, alpha)
    kwargs = {"alpha": alpha, "mu": mu}

    def loss_of(v):
        x = LossInputs(v, torch.zeros_like(v), None, torch.ones_like(v), t(REWARDS), 3)
        return LOSSES["opo"](x, **kwargs)[0]

    v0 = torch.zeros(N, 1, dtype=F64)
    hess = torch.autograd.functional.hessian(loss_of, v0).reshape(N, N)
    torch.testing.assert_close(hess, mu / N * torch.eye(N, dtype=F64))
    grad0 = torch.autograd.functional.jacobian(loss_of, v0).reshape(N)
    v1 = v0.reshape(N) - torch.linalg.solve(hess, grad0)  # (N,) one Newton step
    torch.testing.assert_close(v1, t([gi / mu for gi in g]))
    x = make(lr=[[gi / mu] for gi in g], mask=[[1]] * N, ref_shift=None, old=None)
    _, grad, stats = run("opo", x, **kwargs)
    torch.testing.assert_close(grad, torch.zeros(N, 1, dtype=F64))
    assert stats["opo/v_star_dist"] == pytest.approx(0.0, abs=1e-15)


def test_opo_alpha_one_means_uniform_weights_and_no_drive():
    zeros = [[0.0] * 3 for _ in range(6)]
    _, grad, stats = run("opo", make(lr=zeros), alpha=1.0, mu=1.0)
    torch.testing.assert_close(grad, torch.zeros(6, 3, dtype=F64))
    assert stats["opo/g_abs_max"] == 0.0


def test_opo_uniform_groups_have_no_drive():
    zeros = [[0.0] * 3 for _ in range(6)]
    x = make(lr=zeros, rewards=[1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    _, grad, stats = run("opo", x, alpha=0.0, mu=1.0)
    torch.testing.assert_close(grad, torch.zeros(6, 3, dtype=F64))
    assert stats["train/frac_uniform_groups"] == 1.0


def test_opo_positivity_flag():
    # group (1, 0), alpha = 0: g = ±sinh(0.5) ≈ 0.52
    x = make(lr=[[0.0]] * 2, mask=[[1]] * 2, rewards=[1.0, 0.0], group_size=2, **NO_REF)
    assert LOSSES["opo"](x, alpha=0.0, mu=0.6)[1]["opo/positivity_ok"] == 1.0
    assert LOSSES["opo"](x, alpha=0.0, mu=0.5)[1]["opo/positivity_ok"] == 0.0


@pytest.mark.parametrize("name", ["opo", "opo_code"])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5, "mu": 1.0}, r"alpha must be in \[0, 1\]"),
        ({"alpha": -0.1, "mu": 1.0}, r"alpha must be in \[0, 1\]"),
        ({"alpha": 0.5, "mu": 0.0}, "mu must be > 0"),
    ],
)
def test_opo_bad_hyperparameters_are_clear_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LOSSES[name](make(), **kwargs)


def test_opo_bad_ratio_is_a_clear_error():
    with pytest.raises(ValueError, match="ratio must be one of log, exact"):
        LOSSES["opo"](make(), alpha=0.5, mu=1.0, ratio="linear")


# ---------------------------------------------------------------- OPO (author's code form)


def test_opo_code_alpha_zero_weights_are_the_target():
    # a = 1: w = q. Group of two with rewards (1, 0), unscaled: A = ±1/2, q = (σ(1/β), σ(−1/β)).
    # At Δ = 0 the μ term has no gradient: grad = −w·m/|y|/P = −q/2 per token (P = 1).
    beta = 0.5
    q = 1 / (1 + math.exp(-1 / beta))
    x = make(lr=[[0.0, 0.0]] * 2, mask=[[1, 1]] * 2, rewards=[1.0, 0.0], group_size=2, **NO_REF)
    kw = {"beta_reward": beta, "scale_rewards": False, "tau": 0.7}
    _, grad, stats = run("opo_code", x, alpha=0.0, mu=1.0, **kw)
    torch.testing.assert_close(grad, t([[-q / 2] * 2, [-(1 - q) / 2] * 2]))
    assert stats["opo/p_entropy_norm"] == pytest.approx(1.0)  # Δ = 0 -> uniform p
    assert stats["opo/tau"] == pytest.approx(0.7)


def test_opo_code_adaptive_tau_closed_form():
    # One group of two, one token each: old = (−log V, 0) so h_static = (1 + 0)/2; logps = old
    # so confidence = 1 − h_static = 1/2; A = (1/2, −1/2): reward_signal = 2·(1/2) − 1 = 0.
    # τ = tau·(1 + 0.2·0.5 + 0) = 1.1·tau, inside the clamps.
    V = 1000
    x = make(
        lr=[[0.0]] * 2,
        mask=[[1]] * 2,
        rewards=[1.0, 0.0],
        group_size=2,
        old=[[-math.log(V)], [0.0]],
        ref_shift=None,
    )
    _, stats = LOSSES["opo_code"](x, alpha=0.5, mu=1.0, use_adaptive_tau=True, vocab_size=V)
    assert stats["opo/h_static"] == pytest.approx(0.5)
    assert stats["opo/confidence"] == pytest.approx(0.5)
    assert stats["opo/reward_signal"] == pytest.approx(0.0)
    assert stats["opo/tau"] == pytest.approx(1.1 * 0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.0, "mu": 1.0}, "alpha < 1"),
        ({"alpha": 0.5, "mu": 1.0, "tau": 0.0}, "tau and beta_reward must be > 0"),
        ({"alpha": 0.5, "mu": 1.0, "vocab_size": 1}, "vocab_size must be >= 2"),
        ({"alpha": 0.5, "mu": 1.0, "logit_reg_coef": -0.1}, "logit_reg_coef must be >= 0"),
    ],
)
def test_opo_code_bad_hyperparameters_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LOSSES["opo_code"](make(), **kwargs)


# ---------------------------------------------------------------- every loss: invariances

CASES = [
    ("opo", {"alpha": 0.5, "mu": 1.0}),
    ("opo", {"alpha": 0.3, "mu": 2.0, "ratio": "exact"}),
    ("opo_code", {"alpha": 0.4, "mu": 1.0}),
    ("opo_code", {"alpha": 0.4, "mu": 1.0, "use_adaptive_tau": True, "logit_reg_coef": 0.01}),
    ("grpo", {"beta": 0.05}),
    ("grpo", {"agg": "token_mean"}),
    ("dapo", {}),
    ("gspo", {"clip_low": 0.2, "clip_high": 0.2}),
    ("dpo", {"beta": 0.1}),
]
CASE_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]
DISTINCT_REWARDS = [0.3, 1.0, 0.0, 2.0, 0.5, 1.5]  # unique argmax / argmin per group


def random_inputs(seed: int, *, pad: int = 0) -> LossInputs:
    """Two groups of three, T = 4, variable lengths; `pad` extra columns of garbage."""
    gen = torch.Generator().manual_seed(seed)
    N, T = 6, 4
    old = -2.0 * torch.rand(N, T, generator=gen, dtype=F64)
    logps = old + 0.3 * torch.randn(N, T, generator=gen, dtype=F64)
    ref = old + 0.2 * torch.randn(N, T, generator=gen, dtype=F64)
    mask = (torch.arange(T) < torch.tensor([4, 2, 3, 1, 4, 3]).unsqueeze(-1)).to(F64)
    if pad:
        junk = 50.0 * torch.randn(N, pad, generator=gen, dtype=F64)
        junk[0, 0] = -math.inf  # a -inf log-prob on padding must not leak in
        logps, old = torch.cat([logps, junk], -1), torch.cat([old, junk.flip(0)], -1)
        ref = torch.cat([ref, 3.0 * junk.abs().clamp(max=1e3)], -1)
        mask = torch.cat([mask, torch.zeros(N, pad, dtype=F64)], -1)
    return LossInputs(logps.requires_grad_(True), old, ref, mask, t(DISTINCT_REWARDS), 3)


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_padding_changes_nothing(name, kwargs):
    loss, grad, stats = run(name, random_inputs(0), **kwargs)
    loss_p, grad_p, stats_p = run(name, random_inputs(0, pad=2), **kwargs)
    assert grad.abs().sum() > 0  # the check is not vacuous
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(grad_p[:, :4], grad)
    assert torch.equal(grad_p[:, 4:], torch.zeros(6, 2, dtype=F64))
    assert stats_p == pytest.approx(stats)


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_permutation_within_a_group_permutes_gradients(name, kwargs):
    perm = torch.tensor([2, 0, 1, 4, 5, 3])  # rows stay inside their group
    x = random_inputs(1)
    loss, grad, stats = run(name, x, **kwargs)
    y = LossInputs(
        x.logps.detach()[perm].requires_grad_(True),
        x.old_logps[perm],
        x.ref_logps[perm],
        x.mask[perm],
        x.rewards[perm],
        3,
    )
    loss_p, grad_p, stats_p = run(name, y, **kwargs)
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(grad_p, grad[perm])
    assert stats_p == pytest.approx(stats)


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_row_separable_declaration_is_exact(name, kwargs):
    # ROW_SEPARABLE licenses micro-batches without gradient caching: a row's gradient must
    # not move when every other row's log-probs do, and must move for the losses left out.
    x = random_inputs(3)
    _, grad, _ = run(name, x, **kwargs)
    moved = []
    for i in range(6):
        others = torch.arange(6) != i
        shifted = x.logps.detach().clone()
        shifted[others] += 0.4 * torch.randn(5, 4, generator=torch.Generator().manual_seed(i))
        y = LossInputs(shifted.requires_grad_(True), x.old_logps, x.ref_logps, x.mask, x.rewards, 3)
        moved.append(not torch.allclose(run(name, y, **kwargs)[1][i], grad[i]))
    assert not any(moved) if name in ROW_SEPARABLE else any(moved)


# ---------------------------------------------------------------- every loss: group of two


def test_group_of_two_closed_forms_at_delta_zero():
    # rewards (1, 0) and (0, 1), one token each, logps = old: every ratio is 1.
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # GRPO advantage: ±0.5 / (Bessel std + eps)
    s = math.sinh((1 - 0.5) / 2)  # OPO drive at alpha = 0.5: ±sinh(0.25)
    signs = [1.0, -1.0, -1.0, 1.0]

    def make2():
        ones = [[1]] * 4
        rewards = [1.0, 0.0, 0.0, 1.0]
        return make(
            lr=[[0.0]] * 4,
            mask=ones,
            rewards=rewards,
            group_size=2,
            old=[[-1.0]] * 4,
            ref_shift=[[0.1]] * 4,
        )

    for name in ("grpo", "dapo", "gspo"):  # −ρA at ρ = 1: grad −A/N
        _, grad, _ = run(name, make2())
        torch.testing.assert_close(grad, t([[-sg * a / 4] for sg in signs]))
    _, grad, _ = run("opo", make2(), alpha=0.5, mu=1.0)
    torch.testing.assert_close(grad, t([[-sg * s / 4] for sg in signs]))
    _, _, stats = run("dpo", make2())
    assert stats["dpo/pairs"] == 2.0


# ---------------------------------------------------------------- registry and stats

STAT_KEYS = {
    "grpo": {"train/clip_frac_low", "train/clip_frac_high"},
    "dapo": {"train/clip_frac_low", "train/clip_frac_high"},
    "gspo": {"train/clip_frac_low", "train/clip_frac_high"},
    "dpo": {"dpo/pairs", "dpo/reward_margin", "dpo/pref_acc", "dpo/margin_mean"},
    "opo": {
        "opo/v_sq_mean",
        "opo/delta_cubed_mean",
        "opo/g_abs_max",
        "opo/v_star_dist",
        "opo/v_star_mean",
        "opo/positivity_ok",
    },
    "opo_code": {
        "opo/v_sq_mean",
        "opo/tau",
        "opo/p_entropy_norm",
        "opo/logit_reg",
        "opo/h_static",
        "opo/confidence",
        "opo/reward_signal",
    },
}


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_stats_are_named_floats(name, kwargs):
    _, stats = LOSSES[name](random_inputs(2), **kwargs)
    shared = {"train/frac_uniform_groups", "train/kl_ref"}
    assert set(stats) == STAT_KEYS[name] | shared
    assert all(type(value) is float for value in stats.values())


def test_registry_names_and_miss():
    assert set(LOSSES) == {"opo", "opo_code", "grpo", "dapo", "gspo", "dpo"}
    assert get_loss("grpo") is LOSSES["grpo"]
    with pytest.raises(KeyError, match="dapo, dpo, grpo, gspo, opo, opo_code"):
        get_loss("ppo")


# ---------------------------------------------------------------- what users hit (issue 20)


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_a_truncated_row_masked_out_is_finite_and_gets_no_gradient(name, kwargs):
    # `rollout.mask_truncated` zeroes the whole mask row of a completion that ran into
    # max_new_tokens: the loss must stay finite and that row must get no gradient
    x = random_inputs(4)
    x.mask[1] = 0.0
    loss, grad, stats = run(name, x, **kwargs)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(math.isfinite(value) for value in stats.values()), stats
    assert torch.equal(grad[1], torch.zeros(4, dtype=F64))
    assert grad.abs().sum() > 0


def test_opo_counts_a_masked_out_row_as_delta_zero():
    # row 1 has no completion token: Δ_1 = 0, so v_1 = 0 adds nothing to the sum but still
    # counts in the mean over N = 6
    alpha, mu, N = 0.4, 1.5, 6
    mask = [row[:] for row in MASK]
    mask[1] = [0, 0, 0]
    g = hand_escort_drive(REWARDS, 3, alpha)
    delta = [0.0 if i == 1 else d for i, d in enumerate(hand_delta(LR, MASK))]
    exp_loss = sum(-gi * vi + 0.5 * mu * vi**2 for gi, vi in zip(g, delta, strict=True)) / N
    loss, grad, stats = run("opo", make(mask=mask), alpha=alpha, mu=mu)
    torch.testing.assert_close(loss, t(exp_loss))
    assert torch.equal(grad[1], torch.zeros(3, dtype=F64))
    assert stats["opo/v_sq_mean"] == pytest.approx(sum(d * d for d in delta) / N)


def test_grpo_row_with_no_token_adds_zero_but_counts_in_the_sequence_mean():
    # agg=seq_mean_token_mean: an empty row's token mean is 0 and it is one of the N rows;
    # with token_mean it is simply absent (DAPO's form)
    mask = [row[:] for row in MASK]
    mask[3] = [0, 0, 0]
    adv = hand_group_norm(REWARDS, 3)
    kept = [i for i in range(6) if i != 3]
    part_loss, _, _, _, _ = hand_clipped_token(
        [LR[i] for i in kept], [mask[i] for i in kept], [adv[i] for i in kept],
        lo=0.2, hi=0.2, agg="seq_mean_token_mean",
    )  # fmt: skip
    loss, _, _ = run("grpo", make(mask=mask, ref_shift=None))
    torch.testing.assert_close(loss, t(part_loss * 5 / 6))
    tok_loss, _, _, _, _ = hand_clipped_token(
        [LR[i] for i in kept], [mask[i] for i in kept], [adv[i] for i in kept],
        lo=0.2, hi=0.2, agg="token_mean",
    )  # fmt: skip
    loss, _, _ = run("grpo", make(mask=mask, ref_shift=None), agg="token_mean")
    torch.testing.assert_close(loss, t(tok_loss))


def test_a_batch_with_no_completion_token_at_all_is_a_finite_zero():
    # every completion truncated and masked out: nothing to learn from, and no NaN
    zeros = [[0, 0, 0]] * 6
    for name, kwargs in CASES:
        loss, grad, stats = run(name, make(mask=zeros), **kwargs)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), name
        assert torch.equal(grad, torch.zeros(6, 3, dtype=F64)), name
        assert all(math.isfinite(value) for value in stats.values()), (name, stats)
        if name in ("grpo", "dapo", "gspo"):
            assert stats["train/clip_frac_low"] == stats["train/clip_frac_high"] == 0.0


@pytest.mark.parametrize("name", ["grpo", "dapo", "gspo"])
@pytest.mark.parametrize(
    ("clip", "match"),
    [
        ({"clip_low": 1.0}, r"clip_low must be in \[0, 1\), got 1.0"),
        ({"clip_low": 1.5}, r"clip_low must be in \[0, 1\), got 1.5"),
        ({"clip_low": -0.1}, r"clip_low must be in \[0, 1\), got -0.1"),
        ({"clip_high": -0.01}, "clip_high must be >= 0, got -0.01"),
    ],
)
def test_bad_clip_settings_are_clear_errors(name, clip, match):
    # clip_low = 1 would clamp every ratio at 0 and cut every gradient; a negative clip is a typo
    with pytest.raises(ValueError, match=match):
        LOSSES[name](make(), **clip)


@pytest.mark.parametrize("name", ["grpo", "dapo", "gspo"])
def test_zero_clips_are_allowed_and_clip_every_move(name):
    # clip_low = 0 is how the OPO paper ran DAPO; with both 0 the clip binds on every token
    # (or sequence) whose ratio moved the way its advantage pushes
    _, grad, stats = run(name, make(ref_shift=None), clip_low=0.0, clip_high=0.0)
    assert torch.isfinite(grad).all()
    assert stats["train/clip_frac_low"] > 0 and stats["train/clip_frac_high"] > 0


def test_grpo_negative_beta_is_a_clear_error():
    with pytest.raises(ValueError, match=r"beta must be >= 0, got -0\.1"):
        LOSSES["grpo"](make(), beta=-0.1)


def test_dpo_stats_without_any_pair_are_zero():
    # every group uniform (all right or all wrong): no pair, and the stats say so, not NaN
    _, stats = LOSSES["dpo"](make(rewards=[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
    assert stats["dpo/pairs"] == 0.0
    assert stats["dpo/reward_margin"] == 0.0
    assert stats["dpo/pref_acc"] == 0.0
    assert stats["dpo/margin_mean"] == 0.0


def test_dpo_reward_margin_is_the_mean_reward_gap_of_the_pairs():
    # groups (1, 0, 0) and (0.5, 0.75, 0.25): pairs (0, 1) and (4, 5), reward gaps 1 and 0.5
    _, stats = LOSSES["dpo"](make(rewards=[1.0, 0.0, 0.0, 0.5, 0.75, 0.25]))
    assert stats["dpo/reward_margin"] == pytest.approx(0.75)


# ---------------------------------------------------------------- opo_code: stats and options


def code_inputs(delta, rewards, group_size, *, old=None, mask=None):
    """One token per row (unless `mask` says otherwise): logps = old + Δ."""
    n = len(delta)
    old = [[0.0]] * n if old is None else old
    lr = [[d] * len(old[0]) for d in delta]
    mask = [[1] * len(old[0])] * n if mask is None else mask
    return make(lr=lr, mask=mask, rewards=rewards, group_size=group_size, old=old, ref_shift=None)


FIXED = {"use_adaptive_tau": False, "clip_log_ratio": 0.0, "clip_anchored_score": 0.0}


def test_opo_code_policy_entropy_for_a_group_of_four():
    # p = softmax(Δ/τ) within the group; H(p)/log 4 by hand, and v_sq_mean = mean Δ²
    tau, delta = 0.5, [0.2, -0.1, 0.0, 0.3]
    e = [math.exp(d / tau) for d in delta]
    p = [ei / sum(e) for ei in e]
    entropy = -sum(pi * math.log(pi) for pi in p) / math.log(4)
    x = code_inputs(delta, [1.0, 0.0, 0.0, 1.0], 4)
    _, stats = LOSSES["opo_code"](x, alpha=0.5, mu=1.0, tau=tau, **FIXED)
    assert stats["opo/p_entropy_norm"] == pytest.approx(entropy)
    assert 0.0 < entropy < 1.0
    assert stats["opo/v_sq_mean"] == pytest.approx(sum(d * d for d in delta) / 4)
    assert stats["opo/tau"] == tau


def test_opo_code_value_by_hand_for_a_group_of_four():
    # a = 1 − α; A unscaled; q = softmax(A/β), p = softmax(Δ/τ), w ∝ q^a p^(1−a);
    # L = −(1/a)·Σ w·ℓ + (μ/2)·mean Δ² with ℓ = logp = Δ (old = 0, one token)
    alpha, mu, beta, tau = 0.3, 0.8, 0.4, 0.6
    delta, rewards = [0.2, -0.1, 0.05, 0.3], [1.0, 0.0, 0.5, 0.0]
    a = 1 - alpha
    adv = [r - sum(rewards) / 4 for r in rewards]
    eq = [math.exp(ai / beta) for ai in adv]
    ep = [math.exp(d / tau) for d in delta]
    q, p = [v / sum(eq) for v in eq], [v / sum(ep) for v in ep]
    w = [qi**a * pi ** (1 - a) for qi, pi in zip(q, p, strict=True)]
    w = [wi / sum(w) for wi in w]
    expected = -sum(wi * d for wi, d in zip(w, delta, strict=True)) / a
    expected += 0.5 * mu * sum(d * d for d in delta) / 4
    kw = {"beta_reward": beta, "tau": tau, "scale_rewards": False, **FIXED}
    loss, stats = LOSSES["opo_code"](code_inputs(delta, rewards, 4), alpha=alpha, mu=mu, **kw)
    torch.testing.assert_close(loss, t(expected), atol=1e-9, rtol=0)
    assert stats["opo/logit_reg"] == 0.0


def test_opo_code_logit_term_and_loss_scaling_by_hand():
    # one group of two, fixed τ: the logit term is coef·(logsumexp(Δ/τ))², added to the loss;
    # grad_clip_value rescales the rest of the loss so that its size is at most that value
    delta, tau, coef = [0.3, -0.2], 0.5, 0.05
    x = code_inputs(delta, [1.0, 0.0], 2)
    base, _ = LOSSES["opo_code"](x, alpha=0.5, mu=1.0, tau=tau, **FIXED)
    lse = math.log(sum(math.exp(d / tau) for d in delta))
    loss, stats = LOSSES["opo_code"](x, alpha=0.5, mu=1.0, tau=tau, logit_reg_coef=coef, **FIXED)
    assert stats["opo/logit_reg"] == pytest.approx(coef * lse**2)
    torch.testing.assert_close(loss, base + coef * lse**2)
    cap = abs(base.item()) / 4
    clipped, _ = LOSSES["opo_code"](x, alpha=0.5, mu=1.0, tau=tau, grad_clip_value=cap, **FIXED)
    torch.testing.assert_close(clipped.abs(), t(cap))
    loose, _ = LOSSES["opo_code"](x, alpha=0.5, mu=1.0, tau=tau, grad_clip_value=1e3, **FIXED)
    torch.testing.assert_close(loose, base)


def test_opo_code_clips_bind_where_the_log_ratio_is_large():
    # clip_log_ratio caps |Δ| (in the μ term and the score); clip_anchored_score caps |Δ/τ|
    delta, tau = [8.0, -0.5], 0.5
    x = code_inputs(delta, [1.0, 0.0], 2)
    kw = {"alpha": 0.5, "mu": 1.0, "tau": tau, "use_adaptive_tau": False}
    _, stats = LOSSES["opo_code"](x, clip_log_ratio=5.0, clip_anchored_score=0.0, **kw)
    assert stats["opo/v_sq_mean"] == pytest.approx((25.0 + 0.25) / 2)
    # scores: min(8, 5)/0.5 = 10, −1 → p = softmax(10, −1); with the score clip at 4: (4, −1)
    for cap, hi in ((0.0, 10.0), (4.0, 4.0)):
        _, stats = LOSSES["opo_code"](x, clip_log_ratio=5.0, clip_anchored_score=cap, **kw)
        p = 1 / (1 + math.exp(-1.0 - hi))
        ent = -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)
        assert stats["opo/p_entropy_norm"] == pytest.approx(ent)
    _, stats = LOSSES["opo_code"](x, clip_log_ratio=0.0, clip_anchored_score=0.0, **kw)
    assert stats["opo/v_sq_mean"] == pytest.approx((64.0 + 0.25) / 2)


def test_opo_code_summed_log_probs_without_length_normalisation():
    # two tokens per row, each with log-ratio d: ℓ − ℓ_old is d per token mean, 2d summed
    x = code_inputs([0.1, -0.2], [1.0, 0.0], 2, old=[[-1.0, -1.0]] * 2)
    kw = {"alpha": 0.5, "mu": 1.0, **FIXED}
    _, mean_stats = LOSSES["opo_code"](x, **kw)
    _, sum_stats = LOSSES["opo_code"](x, use_length_normalization=False, **kw)
    assert mean_stats["opo/v_sq_mean"] == pytest.approx((0.01 + 0.04) / 2)
    assert sum_stats["opo/v_sq_mean"] == pytest.approx((0.04 + 0.16) / 2)


def test_opo_code_adaptive_tau_is_clamped_to_its_bounds():
    # the setup of test_opo_code_adaptive_tau_closed_form gives τ = 1.1·tau before the clamp
    V = 1000
    x = code_inputs([0.0, 0.0], [1.0, 0.0], 2, old=[[-math.log(V)], [0.0]])
    kw = {"alpha": 0.5, "mu": 1.0, "use_adaptive_tau": True, "vocab_size": V, "tau": 0.5}
    assert LOSSES["opo_code"](x, adaptive_tau_max=0.52, **kw)[1]["opo/tau"] == pytest.approx(0.52)
    assert LOSSES["opo_code"](x, adaptive_tau_min=0.6, **kw)[1]["opo/tau"] == pytest.approx(0.6)


def test_opo_code_adaptive_tau_on_a_batch_whose_rewards_are_all_equal():
    # the first step on a task the model cannot do yet: every reward 0, every Δ 0. The spread
    # of A is 0, so reward_signal = 2·0 − 1 = −1 (the floor on the spread keeps it finite) and
    # τ = tau·(1 + α_h·h + β_c·c) with h = 1/2, c = 1/2 here
    V = 1000
    x = code_inputs([0.0, 0.0, 0.0, 0.0], [0.0] * 4, 2, old=[[-math.log(V)], [0.0]] * 2)
    kw = {"alpha": 0.5, "mu": 1.0, "use_adaptive_tau": True, "vocab_size": V, "tau": 0.5}
    loss, grad, stats = run("opo_code", x, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert stats["opo/reward_signal"] == pytest.approx(-1.0)
    assert stats["opo/tau"] == pytest.approx(0.5 * (1 + 0.2 * 0.5 + 0.5 * 0.5))
    assert stats["opo/p_entropy_norm"] == pytest.approx(1.0)
    assert stats["train/frac_uniform_groups"] == 1.0


def test_opo_code_group_of_one_is_finite():
    # G = 1 (one sample per prompt): A = 0, the weight is 1, the entropy of p is called 1
    x = code_inputs([0.2, -0.3], [1.0, 0.0], 1)
    for scale in (True, False):
        loss, grad, stats = run("opo_code", x, alpha=0.5, mu=1.0, scale_rewards=scale)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert stats["opo/p_entropy_norm"] == 1.0
        x.logps.grad = None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta_reward": 0.0}, "tau and beta_reward must be > 0"),
        ({"tau": -0.5}, "tau and beta_reward must be > 0"),
        ({"clip_log_ratio": -1.0}, "clip_log_ratio must be >= 0, got -1.0"),
        ({"clip_anchored_score": -1.0}, "clip_anchored_score must be >= 0"),
        ({"grad_clip_value": -0.5}, "grad_clip_value must be >= 0"),
    ],
)
def test_opo_code_more_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LOSSES["opo_code"](make(), alpha=0.5, mu=1.0, **kwargs)


def test_opo_code_smallest_vocabulary_is_two():
    _, stats = LOSSES["opo_code"](make(), alpha=0.5, mu=1.0, vocab_size=2, use_adaptive_tau=True)
    assert math.isfinite(stats["opo/tau"])


# ---------------------------------------------------------------- mutation-testing survivors


def test_clip_fractions_count_each_binding_token_once_on_its_side():
    # asymmetric clips, one token per row, groups (1, 0) twice: A = (a, −a, a, −a). Row 0
    # (A > 0) has ratio 1.15, row 3 (A < 0) ratio 0.75, which binds low (< 1 − 0.2) always.
    # clip_high = 0.1: row 0 binds high, though 1.15 < 1 + clip_low: counted high only;
    # clip_high = 0.3: row 0 is free, and row 3, though above 1 − clip_high, is low only
    lr = [[math.log(1.15)], [0.0], [0.0], [math.log(0.75)]]
    x = make(lr=lr, mask=[[1]] * 4, rewards=[1.0, 0.0, 1.0, 0.0], group_size=2, **NO_REF)
    _, stats = LOSSES["grpo"](x, clip_low=0.2, clip_high=0.1)
    assert (stats["train/clip_frac_low"], stats["train/clip_frac_high"]) == (0.25, 0.25)
    _, stats = LOSSES["grpo"](x, clip_low=0.2, clip_high=0.3)
    assert (stats["train/clip_frac_low"], stats["train/clip_frac_high"]) == (0.25, 0.0)


def test_clip_fraction_of_a_batch_with_one_completion_token():
    # every other completion truncated and masked out: the one token left binds, so 1.0
    x = make(lr=[[0.5], [0.0]], mask=[[1], [0]], rewards=[1.0, 0.0], group_size=2, **NO_REF)
    assert LOSSES["grpo"](x)[1]["train/clip_frac_high"] == 1.0


def test_dapo_passes_its_kl_penalty_on():
    kl = run("dapo", make(), beta=0.5)
    plain = run("dapo", make())
    torch.testing.assert_close(kl[0] - plain[0], t(0.5 * kl[2]["train/kl_ref"]))


def test_dpo_default_beta_is_the_designs():
    x = make()
    torch.testing.assert_close(LOSSES["dpo"](x)[0], LOSSES["dpo"](x, beta=0.1)[0])


def test_reference_errors_read_whole():
    with pytest.raises(
        ValueError, match=r"^dpo needs ref_logps \(the frozen initial policy\), got None$"
    ):
        LOSSES["dpo"](make(ref_shift=None))
    with pytest.raises(
        ValueError,
        match=r"^opo_code needs alpha < 1: its direction term is scaled by 1/\(1 - alpha\)$",
    ):
        LOSSES["opo_code"](make(), alpha=1.0, mu=1.0)


def test_opo_positivity_holds_at_mu_equal_to_the_largest_drive():
    x = make(lr=[[0.0]] * 2, mask=[[1]] * 2, rewards=[1.0, 0.0], group_size=2, **NO_REF)
    g_max = LOSSES["opo"](x, alpha=0.0, mu=1.0)[1]["opo/g_abs_max"]
    assert LOSSES["opo"](x, alpha=0.0, mu=g_max)[1]["opo/positivity_ok"] == 1.0


AUTHOR_DEFAULTS = {  # the `.get(key, default)` of each option in verlm core_algos.py @ 20c210d0
    "tau": 0.5, "beta_reward": 0.3, "scale_rewards": True, "use_length_normalization": True,
    "clip_log_ratio": 5.0, "clip_anchored_score": 10.0, "use_adaptive_tau": False,
    "adaptive_tau_alpha": 0.2, "adaptive_tau_beta": 0.5, "adaptive_tau_min": 0.2,
    "adaptive_tau_max": 1.5, "vocab_size": 32000, "logit_reg_coef": 0.0,
    "grad_clip_value": 0.0,
}  # fmt: skip


@pytest.mark.parametrize(
    "adaptive", [{}, {"use_adaptive_tau": True}, {"use_adaptive_tau": True, "tau": 1.45}]
)
def test_opo_code_defaults_are_the_authors_code(adaptive):
    # inputs where every default shows: Δ = 5.5 passes the log-ratio clip of 5 and Δ/τ = 11
    # the score clip of 10; τ = 1.45 drives the adaptive τ to its upper bound
    x = code_inputs([5.5, -0.3, 0.2, 0.0], [1.0, 0.0, 0.0, 0.5], 2, old=[[-2.0]] * 4)
    explicit = AUTHOR_DEFAULTS | adaptive
    loss, stats = LOSSES["opo_code"](x, alpha=0.3, mu=1.0, **adaptive)
    loss_e, stats_e = LOSSES["opo_code"](x, alpha=0.3, mu=1.0, **explicit)
    torch.testing.assert_close(loss, loss_e, rtol=1e-14, atol=0)
    assert stats == stats_e


def test_opo_code_small_clips_bind_on_both_sides():
    # clips below 1 are clips too; a large negative log-ratio is clipped like a positive one
    x = code_inputs([-8.0, 0.3], [1.0, 0.0], 2)
    kw = {"alpha": 0.5, "mu": 1.0, "tau": 0.5, "use_adaptive_tau": False}
    _, stats = LOSSES["opo_code"](x, clip_log_ratio=5.0, clip_anchored_score=0.0, **kw)
    assert stats["opo/v_sq_mean"] == pytest.approx((25.0 + 0.09) / 2)
    _, stats = LOSSES["opo_code"](x, clip_log_ratio=0.2, clip_anchored_score=0.0, **kw)
    assert stats["opo/v_sq_mean"] == pytest.approx((0.04 + 0.04) / 2)
    # scores Δ/τ = (−10, 0.6) clipped at 0.5: p = softmax(−0.5, 0.5)
    _, stats = LOSSES["opo_code"](x, clip_log_ratio=5.0, clip_anchored_score=0.5, **kw)
    p = 1 / (1 + math.exp(1.0))
    ent = -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)
    assert stats["opo/p_entropy_norm"] == pytest.approx(ent)


def test_opo_code_without_the_score_clip_a_vanishing_policy_term_stays_finite():
    # Δ/τ = ±40: p of the lower row is e^-80, far below the 1e-10 added before the power
    x = code_inputs([4.0, -4.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0], 2)
    kw = {"alpha": 0.5, "mu": 1.0, "tau": 0.1, "use_adaptive_tau": False}
    loss, grad, _ = run("opo_code", x, clip_log_ratio=0.0, clip_anchored_score=0.0, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_opo_code_reward_signal_of_a_narrow_reward_spread():
    # one group of three, unscaled rewards (0.5, 0, 0): A = (1/3, −1/6, −1/6), spread 1/2;
    # (A − min)/spread = (1, 0, 0), so reward_signal = 2·(1/3) − 1 = −1/3
    x = code_inputs([0.0, 0.0, 0.0], [0.5, 0.0, 0.0], 3)
    kw = {"alpha": 0.5, "mu": 1.0, "use_adaptive_tau": True, "scale_rewards": False}
    assert LOSSES["opo_code"](x, **kw)[1]["opo/reward_signal"] == pytest.approx(-1 / 3)
