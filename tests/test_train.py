"""The training loop end to end on the tiny model, and the pieces it is made of."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from opo_cli.checkpoint import list_checkpoints
from opo_cli.config import ConfigError, group_options, validate_train
from opo_cli.data import PromptSampler, load_problems
from opo_cli.logprobs import completion_logps, token_logps
from opo_cli.losses import get_loss
from opo_cli.models import load_policy
from opo_cli.rollout import completion_mask_from_ids, generate_rollout
from opo_cli.train import backward_minibatch, inert_mu_note, initial_model_path, train
from tests.conftest import compose_train

CONTRACT_KEYS = [
    "step",
    "train/reward_mean",
    "train/grad_norm",
    "train/loss",
    "train/entropy",
    "train/response_len_mean",
    "perf/step_s",
    "perf/rollout_s",
]


@pytest.mark.parametrize("group", ["method", "model", "dataset", "logger"])
def test_every_group_option_composes_and_validates(group, tiny_cache):
    for option in group_options(group):
        cfg = compose_train([f"{group}={option}"], tiny_cache, tiny=group != "model")
        assert cfg[group].name
        validate_train(cfg)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("alpha=1.5", "alpha"),
        ("alpha=-0.1", "alpha"),
        ("mu=0", "mu"),
        ("trainer.steps=-3", "trainer.steps"),
        ("rollout.group_size=1", "rollout.group_size"),
        ("trainer.resume=maybe", "trainer.resume"),
        ("trainer.mini_batches=3", "trainer.mini_batches"),
        ("method.loss_kwargs.ratio=cubic", "method.loss_kwargs"),
        ("+method.loss_kwargs.clip_low=0.1", "method.loss_kwargs"),
    ],
)
def test_bad_values_name_the_key(override, key, tiny_cache):
    with pytest.raises(ConfigError, match=f"^{key}[= ]"):
        validate_train(compose_train([override], tiny_cache))


@pytest.mark.parametrize(
    ("overrides", "noted"),
    [
        (["method=opo", "trainer.mini_batches=1"], True),  # one update, at pi = pi_old
        (["method=opo_code", "trainer.mini_batches=1"], True),  # its loss takes mu too
        (["method=opo", "trainer.mini_batches=1", "trainer.epochs=2"], False),  # two updates
        (["method=opo", "trainer.mini_batches=2"], False),
        (["method=grpo", "trainer.mini_batches=1"], False),  # no mu to be inert
    ],
)
def test_a_run_where_mu_cannot_act_says_so(overrides, noted, tiny_cache):
    note = inert_mu_note(validate_train(compose_train(overrides, tiny_cache)))
    assert (note is not None) == noted
    assert note is None or "mu has no effect" in note


@pytest.fixture(scope="module")
def tiny_policy(tiny_cache):
    cfg = compose_train([], tiny_cache)
    problems, _ = load_problems(cfg.dataset)
    path = initial_model_path(cfg, problems)
    model, tok = load_policy(path, device=torch.device("cpu"), dtype=torch.float32)
    return model, tok, problems


def test_two_step_run_writes_the_run_folder_contract(tmp_path, tiny_cache):
    cfg = compose_train(["trainer.keep_last=1"], tiny_cache)
    run = tmp_path / "run"
    train(cfg, run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in CONTRACT_KEYS:
            assert math.isfinite(row[key]), key
        assert any(k.startswith("opo/") for k in row)
    assert [p.name for p in list_checkpoints(run)] == ["step_2"]  # keep_last=1 pruned step_1
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    start = AutoModelForCausalLM.from_pretrained(
        initial_model_path(cfg, load_problems(cfg.dataset)[0])
    )
    changed = [
        not torch.equal(a, b) for a, b in zip(final.parameters(), start.parameters(), strict=True)
    ]
    assert any(changed)


def test_token_logps_values_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 3))
    expected = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(token_logps(logits, targets, 2), expected)
    assert torch.autograd.gradcheck(lambda x: token_logps(x, targets, 2), (logits,))


def test_completion_mask_counts_up_to_and_including_first_eos():
    eos = 9
    ids = torch.tensor([[5, 9, 9, 9], [5, 6, 7, 8], [9, 1, 9, 2]])
    mask, truncated = completion_mask_from_ids(ids, [eos])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_training_logps_equal_sampling_logps_under_left_padding(tiny_policy):
    model, tok, _ = tiny_policy
    enc = tok(["1+2=", "13+15="], return_tensors="pt", padding=True)
    assert enc.attention_mask[0, 0] == 0  # the short prompt is left-padded
    out = model.generate(
        **enc,
        do_sample=True,
        top_k=0,
        max_new_tokens=3,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id,
    )
    completion = out.sequences[:, enc.input_ids.shape[1] :]
    sampled = torch.stack(out.logits, 1).log_softmax(-1)
    sampled = sampled.gather(-1, completion[..., None]).squeeze(-1)
    mask = torch.cat([enc.attention_mask, torch.ones_like(completion)], 1)
    trained, _ = completion_logps(model, out.sequences, mask, completion.shape[1])
    assert torch.allclose(trained, sampled, atol=1e-5)


def off_policy_rollout(tiny_policy):
    """Three groups of four sampled by the tiny policy, and a pi_old 0.05 off its log-probs
    (so that ratios are not 1: clips bind, OPO's mu term acts)."""
    model, tok, problems = tiny_policy
    torch.manual_seed(0)
    rollout = generate_rollout(
        model, tok, [p.prompt for p in problems[:3]], group_size=4, max_new_tokens=4
    )
    rollout.rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1])
    with torch.no_grad():
        old, _ = completion_logps(
            model, rollout.input_ids, rollout.attention_mask, rollout.completion_len
        )
    return model, rollout, old + 0.05 * torch.randn_like(old)


def test_micro_batched_gradient_equals_one_backward(tiny_policy):
    model, rollout, old = off_policy_rollout(tiny_policy)
    kwargs = {"alpha": 0.3, "mu": 2.0}
    grads = []
    for micro in (len(rollout), 5):
        model.zero_grad()
        backward_minibatch(model, rollout, old, None, get_loss("opo"), kwargs, micro, 1.0)
        grads.append([p.grad.clone() for p in model.parameters()])
    for full, cached in zip(*grads, strict=True):
        assert torch.allclose(full, cached, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("opo", {"alpha": 0.3, "mu": 2.0}),
        ("grpo", {"clip_low": 0.02, "clip_high": 0.02}),
        ("dapo", {"agg": "token_mean"}),
        ("gspo", {"clip_low": 0.01, "clip_high": 0.01}),
    ],
)
@pytest.mark.parametrize("micro", [1, 5])
def test_separable_micro_batches_give_one_backward(tiny_policy, name, kwargs, micro, monkeypatch):
    model, rollout, old = off_policy_rollout(tiny_policy)
    results = []
    for rows, separable in ((len(rollout), False), (micro, True)):
        model.zero_grad()
        loss, stats = backward_minibatch(
            model, rollout, old, None, get_loss(name), kwargs, rows, 1.0, separable=separable
        )
        results.append((loss, stats, [p.grad.clone() for p in model.parameters()]))
        monkeypatch.setattr("opo_cli.train.rollout_logps", None)  # no gradient-caching forward
    (loss_a, stats_a, grads_a), (loss_b, stats_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, abs=1e-6)
    assert stats_b == pytest.approx(stats_a, abs=1e-6)
    for full, split in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(full, split, atol=1e-6)


def test_sampler_resumes_where_it_stopped():
    a = PromptSampler(5, seed=3)
    first = a.next(7)  # crosses an epoch boundary
    b = PromptSampler(5, seed=3)
    b.load_state_dict(a.state_dict())
    assert sorted(first[:5]) == list(range(5))
    assert a.next(6) == b.next(6)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["opo", "dpo", "dapo"])
def test_two_steps_on_cuda_in_bfloat16(method, tmp_path, tiny_cache):
    cfg = compose_train([f"method={method}", "trainer.device=cuda"], tiny_cache)
    row = train(cfg, tmp_path / "run")
    assert all(math.isfinite(row[k]) for k in CONTRACT_KEYS if k != "step")
    assert row["perf/peak_mem_gb"] > 0
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert final.dtype == torch.bfloat16


def test_known_current_logps_spare_the_forward_and_keep_the_gradient(tiny_policy):
    model, tok, problems = tiny_policy
    torch.manual_seed(1)
    rollout = generate_rollout(
        model, tok, [p.prompt for p in problems[:2]], group_size=4, max_new_tokens=4
    )
    rollout.rewards = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 1])
    with torch.no_grad():
        old, _ = completion_logps(
            model, rollout.input_ids, rollout.attention_mask, rollout.completion_len
        )
    grads = []
    for micro, current in ((len(rollout), None), (3, old)):  # on-policy: current == old
        model.zero_grad()
        backward_minibatch(
            model, rollout, old, None, get_loss("grpo"), {}, micro, 1.0, current=current
        )
        grads.append([p.grad.clone() for p in model.parameters()])
    for full, cached in zip(*grads, strict=True):
        assert torch.allclose(full, cached, atol=1e-6)
