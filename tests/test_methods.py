"""Methods as configs: each composes, agrees with its loss's signature and trains two steps.

Also DAPO's data-side parts against hand-derived values: dynamic sampling (with a scripted
fake draw, no model) and the soft overlong penalty. Run:
    pytest tests/test_methods.py -q
"""

import inspect
import math
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import opo_cli.config as C
from opo_cli import rewards
from opo_cli.losses import LOSSES, LossInputs
from opo_cli.rewards import overlong_penalties
from opo_cli.rollout import Rollout, concat_rollouts, dynamic_sample, mask_truncated
from opo_cli.tracking import read_metrics
from opo_cli.train import train
from tests.conftest import compose_config

METHODS = C.group_options("method")
PAD = 0


def compose_train(*overrides: str):
    return compose_config("train", overrides)


# ---------------------------------------------------------------- configs against code


def test_every_method_of_the_design_has_a_file():
    assert {"opo", "grpo", "dapo", "gspo", "dpo", "opo_code"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_loss_kwargs_match_the_loss_signature(method):
    cfg = compose_train(f"method={method}")
    fn = LOSSES[cfg.method.loss]
    params = list(inspect.signature(fn).parameters.values())[1:]  # after the LossInputs
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    required = {p.name for p in params if p.default is inspect.Parameter.empty}
    kwargs = OmegaConf.to_container(cfg.method.loss_kwargs, resolve=True)
    assert required <= set(kwargs) <= {p.name for p in params}
    C.validate_train(cfg)  # every method's rollout options are valid as shipped


@pytest.mark.parametrize(
    ("overrides", "reference"),
    [
        (["method=opo"], False),
        (["method=opo_code"], False),
        (["method=grpo"], False),
        (["method=grpo", "method.loss_kwargs.beta=0.04"], True),
        (["method=dapo"], False),
        (["method=dapo_paper"], False),
        (["method=gspo"], False),
        (["method=dpo"], True),
    ],
)
def test_reference_only_for_dpo_and_a_kl_penalty(overrides, reference):
    assert compose_train(*overrides).method.reference is reference


def test_dapo_is_grpo_plus_its_deltas():
    grpo = OmegaConf.to_container(compose_train("method=grpo").method, resolve=True)
    dapo = OmegaConf.to_container(compose_train("method=dapo").method, resolve=True)
    changed = {k: v for k, v in dapo["loss_kwargs"].items() if grpo["loss_kwargs"][k] != v}
    assert changed == {"clip_high": 0.28, "agg": "token_mean"}
    assert dapo["loss_kwargs"]["beta"] == 0.0 and dapo["reference"] is False
    assert dapo["rollout"]["dynamic_sampling"] and not grpo["rollout"]["dynamic_sampling"]
    assert grpo["rollout"].keys() == dapo["rollout"].keys()


def test_dapo_paper_is_dapo_with_clip_low_0_and_no_dynamic_sampling():
    """DESIGN's notes: the paper's DAPO ran with clip_low 0 and without dynamic sampling."""
    dapo = OmegaConf.to_container(compose_train("method=dapo").method, resolve=True)
    paper = OmegaConf.to_container(compose_train("method=dapo_paper").method, resolve=True)
    changed = {k: v for k, v in paper["loss_kwargs"].items() if dapo["loss_kwargs"][k] != v}
    assert changed == {"clip_low": 0.0} and paper["loss"] == "dapo"
    assert paper["rollout"]["dynamic_sampling"] is False
    assert paper["rollout"]["max_extra_rounds"] == 0
    rollout_changes = {k for k, v in paper["rollout"].items() if dapo["rollout"][k] != v}
    assert rollout_changes == {"dynamic_sampling", "max_extra_rounds"}  # overlong shaping kept
    assert (paper["name"], dapo["name"]) == ("dapo_paper", "dapo")


@pytest.mark.parametrize(("method", "grad_of_the_worse"), [("dapo", 0.9), ("dapo_paper", 0.0)])
def test_dapo_paper_gives_no_gradient_to_a_falling_token_with_negative_advantage(
    method, grad_of_the_worse
):
    # one group of 2, one token each: rewards 1, 0 give A = +-0.5 / (std 0.5*sqrt(2) + 1e-4);
    # ratios 1.1 (A > 0, inside 1 + 0.28) and 0.9 (A < 0). token_mean over 2 tokens, so
    # d loss / d logp = -ratio * A / 2 where the clip does not bind. dapo's floor 0.8 leaves
    # 0.9 free; dapo_paper's floor 1 clips it: that token gets no gradient.
    cfg = compose_train(f"method={method}").method
    old = torch.zeros(2, 1)
    logps = torch.log(torch.tensor([[1.1], [0.9]])).requires_grad_()
    x = LossInputs(logps, old, None, torch.ones(2, 1), torch.tensor([1.0, 0.0]), 2)
    loss, _ = LOSSES[cfg.loss](x, **OmegaConf.to_container(cfg.loss_kwargs, resolve=True))
    loss.backward()
    a = 0.5 / (0.5 * math.sqrt(2) + 1e-4)
    expected = torch.tensor([[-1.1 * a / 2], [grad_of_the_worse * a / 2]])
    torch.testing.assert_close(logps.grad, expected)


@pytest.mark.parametrize(
    ("frac", "max_new_tokens", "tokens"),
    [(0.0, 6, 0), (0.2, 6, 1), (0.2, 20480, 4096), (0.5, 6, 3), (0.01, 6, 1)],
)
def test_overlong_buffer_in_tokens(frac, max_new_tokens, tokens):
    # round(0.2 * 6) = round(1.2) = 1; 0.2 * 20480 = 4096 (the paper); tiny fractions give 1
    cfg = compose_train(
        "method=dapo",
        f"method.rollout.overlong_buffer_frac={frac}",
        f"rollout.max_new_tokens={max_new_tokens}",
    )
    assert C.validate_train(cfg).rollout.overlong_buffer == tokens


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("method.rollout.overlong_buffer_frac", 1.5),
        ("method.rollout.max_extra_rounds", -1),
        ("method.rollout.dynamic_sampling", "maybe"),
    ],
)
def test_bad_rollout_option_is_a_one_line_config_error(key, value):
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.validate_train(compose_train("method=dapo", f"{key}={value}"))


# ---------------------------------------------------------------- overlong shaping


def test_overlong_penalty_hand_values():
    # L = 10, B = 4: free up to L - B = 6, then (6 - |y|) / 4: 7 -> -0.25, 8 -> -0.5, 10 -> -1
    got = overlong_penalties([0, 5, 6, 7, 8, 9, 10], max_len=10, buffer=4)
    assert got == [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0]


def test_overlong_penalty_beyond_the_limit_is_minus_one_and_buffer_zero_is_off():
    assert overlong_penalties([12], max_len=10, buffer=4) == [-1.0]
    assert overlong_penalties([3, 10], max_len=10, buffer=0) == [0.0, 0.0]
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalties([3], max_len=4, buffer=5)


# ---------------------------------------------------------------- fake rollouts


def fake_rollout(group_rewards, first_group, prompt_len=2, completion_len=3, truncated=None):
    """Groups of len(group_rewards[k]) rows; every real token of group k holds its id."""
    G = len(group_rewards[0])
    n = G * len(group_rewards)
    ids = torch.arange(first_group, first_group + len(group_rewards)).repeat_interleave(G)
    length = prompt_len + completion_len
    return Rollout(
        input_ids=ids[:, None].expand(n, length).clone(),  # (N, Lp + Lc)
        attention_mask=torch.ones(n, length, dtype=torch.long),  # (N, Lp + Lc)
        completion_mask=torch.ones(n, completion_len),  # (N, Lc)
        truncated=torch.zeros(n, dtype=torch.bool) if truncated is None else truncated,
        rewards=torch.tensor([r for group in group_rewards for r in group]),
        texts=[f"g{g}" for g in ids.tolist()],
        group_size=G,
    )


class ScriptedDraw:
    """`draw(k)` for dynamic sampling: round i returns the scripted groups of round i."""

    def __init__(self, rounds):
        self.rounds, self.calls, self.groups = rounds, 0, 0

    def __call__(self, k):
        groups = self.rounds[self.calls]
        assert len(groups) == k
        r = fake_rollout(groups, self.groups, prompt_len=2 + self.calls % 2)
        self.calls, self.groups = self.calls + 1, self.groups + k
        return r


def group_ids(r: Rollout) -> list[int]:
    return r.input_ids[:: r.group_size, -1].tolist()


def test_dynamic_sampling_scripted_rounds():
    # round 0: groups 0..2 = uniform, informative, uniform -> 1 informative, draw again;
    # round 1: groups 3..5 = informative, uniform, informative -> 3: stop after 1 extra round.
    draw = ScriptedDraw([[[1, 1], [0, 1], [0, 0]], [[1, 0], [1, 1], [0, 1]]])
    batch, drawn, stats = dynamic_sample(draw, prompts=3, max_extra_rounds=5, pad_id=PAD)
    assert group_ids(batch) == [1, 3, 5]
    assert batch.rewards.tolist() == [0, 1, 1, 0, 0, 1]
    assert batch.texts == ["g1", "g1", "g3", "g3", "g5", "g5"]
    assert len(drawn) == 12 and draw.calls == 2
    assert stats == {"train/dropped_groups": 3.0, "train/extra_rounds": 1.0}


def test_dynamic_sampling_fills_with_uniform_groups_when_the_bound_is_hit():
    # one extra round allowed; informative groups 1 and 5 only -> filled with the first
    # uniform group (0); uniform groups 2, 3, 4 are dropped.
    draw = ScriptedDraw([[[1, 1], [0, 1], [0, 0]], [[1, 1], [0, 0], [1, 0]], None])
    batch, _, stats = dynamic_sample(draw, prompts=3, max_extra_rounds=1, pad_id=PAD)
    assert group_ids(batch) == [0, 1, 5]
    assert draw.calls == 2
    assert stats == {"train/dropped_groups": 3.0, "train/extra_rounds": 1.0}


@pytest.mark.parametrize("seed", range(20))
def test_dynamic_sampling_never_returns_a_uniform_group_within_its_bound(seed):
    rng = random.Random(seed)
    P, G = 4, 2  # a group of two 0/1 rewards is uniform half the time
    rounds = [[[rng.randint(0, 1) for _ in range(G)] for _ in range(P)] for _ in range(200)]
    batch, _, stats = dynamic_sample(
        ScriptedDraw(rounds), prompts=P, max_extra_rounds=199, pad_id=PAD
    )
    r = batch.rewards.view(P, G)  # (P, G)
    assert len(batch) == P * G
    assert (r.amax(-1) != r.amin(-1)).all()
    assert stats["train/extra_rounds"] < 199


def test_concat_rollouts_repads_prompts_left_and_completions_right():
    a = fake_rollout([[1, 0]], 0, prompt_len=2, completion_len=3)
    b = fake_rollout([[0, 1]], 1, prompt_len=4, completion_len=1)
    r = concat_rollouts([a, b], pad_id=PAD)
    assert r.input_ids.shape == (4, 7) and r.completion_len == 3
    # a: 2 pad + 2 prompt | 3 completion;  b: 4 prompt | 1 completion + 2 pad
    assert r.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1]] * 2 + [[1, 1, 1, 1, 1, 0, 0]] * 2
    assert r.completion_mask.tolist() == [[1, 1, 1]] * 2 + [[1, 0, 0]] * 2
    assert r.input_ids[0].tolist() == [PAD, PAD, 0, 0, 0, 0, 0]
    assert r.input_ids[2].tolist() == [1, 1, 1, 1, 1, PAD, PAD]
    assert r.rewards.tolist() == [1, 0, 0, 1] and r.texts == ["g0", "g0", "g1", "g1"]


def test_mask_truncated_zeroes_only_truncated_rows():
    r = fake_rollout([[1, 0, 1]], 0, truncated=torch.tensor([False, True, False]))
    assert mask_truncated(r).completion_mask.tolist() == [[1, 1, 1], [0, 0, 0], [1, 1, 1]]


# ---------------------------------------------------------------- two training steps each

TINY = [
    "trainer.steps=2",
    "trainer.save_every=0",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "rollout.max_new_tokens=4",
    "model.tiny.warm_start.steps=0",
    "logger=none",
]
SHARED_KEYS = {
    "step",
    "train/reward_mean",
    "train/loss",
    "train/grad_norm",
    "train/entropy",
    "train/response_len_mean",
    "train/truncated_frac",
    "train/frac_uniform_groups",
    "train/dropped_groups",
    "train/extra_rounds",
    "train/overlong_penalty_mean",
    "perf/step_s",
    "perf/rollout_s",
}
CLIPPED = {"grpo", "dapo", "gspo"}


def odd_length_reward(texts, golds):
    """A reward with spread on an untrained model: 1.0 for an odd-length completion."""
    return [float(len(t) % 2) for t in texts]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # the tiny model is built once for the module


@pytest.mark.parametrize(
    "overrides",
    [[f"method={m}"] for m in METHODS] + [["method=grpo", "method.loss_kwargs.beta=0.04"]],
    ids=lambda o: ",".join(o),
)
def test_two_steps_write_finite_metrics(overrides, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "exact_match", odd_length_reward)
    cfg = compose_train(*overrides, *TINY, f"model.cache_dir={cache_dir}")
    train(cfg, run_dir=tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    opts = cfg.method.rollout
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row.keys() >= SHARED_KEYS
        assert all(math.isfinite(v) for v in row.values())
        assert ("train/kl_ref" in row) is bool(cfg.method.reference)
        assert ("train/clip_frac_high" in row) is (cfg.method.loss in CLIPPED)
        penalty = row["train/overlong_penalty_mean"]
        assert penalty <= 0 if opts.overlong_buffer_frac > 0 else penalty == 0
        assert (
            opts.dynamic_sampling or row["train/dropped_groups"] == row["train/extra_rounds"] == 0
        )
    assert any(r["train/grad_norm"] > 0 for r in rows)  # the fake reward gives a signal
    assert (tmp_path / "run" / "final" / "config.json").is_file()
