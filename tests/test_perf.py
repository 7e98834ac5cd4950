"""The fast paths give the plain path's numbers: kept sampling log-probs, token-budget
micro-batches, the static-cache switch; and every run logs the perf/ metrics."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import opo_cli.train as T
from opo_cli.batching import MicroBatch, micro_batches
from opo_cli.config import ConfigError, validate_train
from opo_cli.data import load_problems
from opo_cli.logprobs import completion_logps
from opo_cli.losses import get_loss
from opo_cli.rollout import Rollout, completion_mask_from_ids, generate_rollout
from opo_cli.sampling import keeps_sampling_logps
from opo_cli.train import backward_minibatch, initial_model_path, load_models, train
from tests.conftest import compose_train

PERF_KEYS = [
    "perf/step_s",
    "perf/rollout_s",
    "perf/train_s",
    "perf/rollout_tok_per_s",
    "perf/train_tok_per_s",
    "perf/peak_mem_gb",
]
PROMPTS = ["1+2=", "13+15=", "7+19=", "0+0="]  # 4 to 6 tokens: rows are left-padded


# ------------------------------------------------------------------ kept sampling log-probs


@pytest.mark.parametrize("backend", ["hf", "opo"])
@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)])
def test_kept_sampling_logps_equal_a_recomputed_forward(model_and_tok, temperature, top_p, backend):
    model, tok = model_and_tok
    torch.manual_seed(0)
    r = generate_rollout(
        model,
        tok,
        PROMPTS,
        group_size=3,
        max_new_tokens=6,
        temperature=temperature,
        top_p=top_p,
        keep_logps=True,
        backend=backend,
    )
    with torch.no_grad():
        logps, ent = completion_logps(
            model,
            r.input_ids,
            r.attention_mask,
            r.completion_len,
            temperature=temperature,
            with_entropy=True,
        )
    m = r.completion_mask  # (N, Lc)
    assert r.sampling_logps.shape == logps.shape
    assert torch.allclose(r.sampling_logps, logps * m, atol=1e-5)
    assert torch.allclose(r.sampling_entropy, ent * m, atol=1e-5)


def test_rollout_without_keep_logps_holds_none(model_and_tok):
    model, tok = model_and_tok
    r = generate_rollout(model, tok, PROMPTS[:1], group_size=2, max_new_tokens=2)
    assert r.sampling_logps is None and r.sampling_entropy is None


def test_auto_keeps_sampling_logps_for_float32_weights_only(model_and_tok):
    model, _ = model_and_tok
    assert keeps_sampling_logps(None, model)
    assert not keeps_sampling_logps(None, copy.deepcopy(model).to(torch.bfloat16))
    assert not keeps_sampling_logps(False, model)
    assert keeps_sampling_logps(True, copy.deepcopy(model).to(torch.bfloat16))


def test_kept_logps_give_the_recomputed_loss_and_gradient(model_and_tok):
    model, tok = model_and_tok
    torch.manual_seed(1)
    r = generate_rollout(model, tok, PROMPTS, group_size=3, max_new_tokens=5, keep_logps=True)
    r.rewards = torch.tensor([1.0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1])
    with torch.no_grad():
        recomputed, _ = completion_logps(model, r.input_ids, r.attention_mask, r.completion_len)
    results = []
    for old in (recomputed, r.sampling_logps):
        model.zero_grad()
        loss, _ = backward_minibatch(
            model, r, old, None, get_loss("opo"), {"alpha": 0.3, "mu": 2.0}, len(r), 1.0
        )
        results.append((loss, [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def first_row(run, cache, overrides: list[str]) -> dict:
    """The metrics of step 1 of a one-update-per-step run: no optimizer step before it, so
    rounding-level differences cannot be amplified by Adam's normalisation."""
    one_update = ["trainer.steps=1", "trainer.save_every=0", "trainer.mini_batches=1"]
    train(compose_train([*one_update, *overrides], cache), run)
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def assert_same_step(a: dict, b: dict) -> None:
    for key in ("train/loss", "train/grad_norm", "train/entropy", "train/reward_mean"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), key


def test_reused_pi_old_skips_its_forward_and_logs_the_same_step(tmp_path, tiny_cache, monkeypatch):
    calls = []
    recompute = T.rollout_logps
    monkeypatch.setattr(T, "rollout_logps", lambda *a, **k: calls.append(1) or recompute(*a, **k))
    plain = first_row(tmp_path / "plain", tiny_cache, ["rollout.reuse_sampling_logps=false"])
    assert len(calls) == 1  # pi_old, recomputed
    reused = first_row(tmp_path / "reused", tiny_cache, ["rollout.reuse_sampling_logps=auto"])
    assert len(calls) == 1  # float32 weights: auto reuses, no forward for pi_old this time
    assert_same_step(plain, reused)
    for key in PERF_KEYS:
        assert math.isfinite(reused[key]) and reused[key] > 0, key


def test_no_gradient_is_held_through_a_rollout(tmp_path, tiny_cache, monkeypatch):
    held = []
    sample = T.sample_batch

    def watching(model, *args, **kwargs):
        held.append(sum(p.grad is not None for p in model.parameters()))
        return sample(model, *args, **kwargs)

    monkeypatch.setattr(T, "sample_batch", watching)
    train(compose_train(["trainer.steps=3", "logger=none"], tiny_cache), tmp_path / "run")
    assert held == [0, 0, 0]  # the gradients of a step's last update are freed after it


# ------------------------------------------------------------------ token-budget micro-batches


def test_token_budget_packing_by_hand():
    # L = 6, Lc = 2 (prompt columns 0-3). Row 0: real columns 2-5 (width 4). Row 1: 0-4,
    # one completion token (width 5). Row 2: 1-4 (width 4).
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0]])
    # budget 10: row 0 alone (1 x 4); rows 0-1 would span columns 0-5: 2 x 6 = 12 > 10.
    # rows 1-2 span columns 0-4: 2 x 5 = 10 <= 10, one completion column kept.
    parts = micro_batches(mask, 2, rows=8, tokens=10)
    got = [(p.rows.tolist(), p.start, p.completion_len) for p in parts]
    assert got == [([0], 2, 2), ([1, 2], 0, 1)]
    # the row cap still applies: at most one row each
    assert [p.rows.tolist() for p in micro_batches(mask, 2, rows=1, tokens=100)] == [[0], [1], [2]]
    # a budget smaller than any row: one row each, never an empty micro-batch
    assert [p.rows.tolist() for p in micro_batches(mask, 2, rows=8, tokens=1)] == [[0], [1], [2]]


def test_without_a_budget_micro_batches_are_rows_at_full_width():
    mask = torch.ones(5, 7, dtype=torch.long)
    parts = micro_batches(mask, 3, rows=2, tokens=None)
    assert [p.rows.tolist() for p in parts] == [[0, 1], [2, 3], [4]]
    assert all(isinstance(p, MicroBatch) and (p.start, p.completion_len) == (0, 3) for p in parts)


def ragged_rollout(tok) -> Rollout:
    """Prompts of 4-6 tokens (left padding) and completions ending at EOS after 1-5 tokens."""
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    prompt_ids = enc.input_ids.repeat_interleave(2, 0)  # (8, Lp)
    prompt_mask = enc.attention_mask.repeat_interleave(2, 0)  # (8, Lp)
    eos = tok.eos_token_id
    ends = [0, 4, 2, 1, 4, 3, 1, 0]  # index of EOS in each completion (4: none, truncated)
    gen = torch.Generator().manual_seed(0)
    completion = torch.randint(2, len(tok), (8, 4), generator=gen)  # (8, 4) no EOS, no pad
    for i, e in enumerate(ends):
        if e < 4:
            completion[i, e] = eos
    mask, truncated = completion_mask_from_ids(completion, [eos])  # (8, 4), (8,)
    completion = torch.where(mask.bool(), completion, tok.pad_token_id)  # (8, 4)
    return Rollout(
        input_ids=torch.cat([prompt_ids, completion], 1),  # (8, Lp + 4)
        attention_mask=torch.cat([prompt_mask, mask.long()], 1),  # (8, Lp + 4)
        completion_mask=mask,
        truncated=truncated,
        rewards=torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 0]),
        texts=[""] * 8,
        group_size=2,
    )


@pytest.mark.parametrize("tokens", [9, 16, 25])
def test_token_budget_gives_the_plain_loss_and_gradient(model_and_tok, tokens):
    model, tok = model_and_tok
    r = ragged_rollout(tok)
    assert len(micro_batches(r.attention_mask, r.completion_len, rows=8, tokens=tokens)) > 1
    with torch.no_grad():
        old, _ = completion_logps(model, r.input_ids, r.attention_mask, r.completion_len)
    old = old + 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1))
    kwargs = {"alpha": 0.3, "mu": 2.0}
    results = []
    for budget in (None, tokens):
        model.zero_grad()
        loss, _ = backward_minibatch(
            model, r, old, None, get_loss("opo"), kwargs, len(r), 1.0, tokens=budget
        )
        results.append((loss, [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_token_budget_run_logs_the_plain_step(tmp_path, tiny_cache):
    plain = first_row(tmp_path / "plain", tiny_cache, [])
    budget = first_row(tmp_path / "budget", tiny_cache, ["trainer.micro_batch_tokens=24"])
    assert_same_step(plain, budget)


@pytest.mark.parametrize("prompts", [PROMPTS, ["1", "13+15=", "7"]])  # rows of 1 real token
def test_shared_prefill_samples_what_a_full_prefill_samples(model_and_tok, prompts):
    model, tok = model_and_tok
    rollouts = []
    for share in (False, True):
        torch.manual_seed(4)
        rollouts.append(
            generate_rollout(
                model,
                tok,
                prompts,
                group_size=3,
                max_new_tokens=6,
                keep_logps=True,
                share_prefill=share,
            )
        )
    full, shared = rollouts
    assert torch.equal(full.input_ids, shared.input_ids)
    assert torch.equal(full.attention_mask, shared.attention_mask)
    assert torch.allclose(full.sampling_logps, shared.sampling_logps, atol=1e-5)
    assert len(set(map(tuple, shared.input_ids.tolist()))) > len(prompts)  # samples differ


def test_shared_prefill_runs_each_prompt_once(model_and_tok, monkeypatch):
    model, tok = model_and_tok
    rows = []
    real_forward = model.forward

    def counting(*args, **kwargs):
        rows.append(kwargs["input_ids"].shape)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    generate_rollout(model, tok, PROMPTS, group_size=3, max_new_tokens=2)
    width = tok(PROMPTS, return_tensors="pt", padding=True).input_ids.shape[1]
    assert rows[0] == (4, width - 1)  # one row per prompt
    assert rows[1] == (12, 1)  # then G rows per prompt, one new column each


# ------------------------------------------------------------------ switches and config


def test_static_cache_is_ignored_off_cuda(model_and_tok):
    model, tok = model_and_tok
    outs = []
    for cache in ("dynamic", "static"):
        torch.manual_seed(2)
        r = generate_rollout(
            model, tok, PROMPTS[:2], group_size=2, max_new_tokens=4, cache_implementation=cache
        )
        outs.append(r.input_ids)
    assert torch.equal(*outs)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.micro_batch_tokens=0", "trainer.micro_batch_tokens"),
        ("rollout.cache_implementation=paged", "rollout.cache_implementation"),
        ("rollout.reuse_sampling_logps=maybe", "rollout.reuse_sampling_logps"),
        ("rollout.share_prefill=sometimes", "rollout.share_prefill"),
        ("rollout.backend=sglang", "rollout.backend"),
    ],
)
def test_bad_fast_path_values_name_the_key(override, key, tiny_cache):
    with pytest.raises(ConfigError, match=f"^{key}="):
        validate_train(compose_train([override], tiny_cache))


@pytest.mark.parametrize(("method", "holds_ref"), [("opo", False), ("dpo", True)])
def test_reference_model_only_when_the_method_needs_one(method, holds_ref, tiny_cache):
    cfg = compose_train([f"method={method}"], tiny_cache)
    path = initial_model_path(cfg, load_problems(cfg.dataset)[0])
    cpu = torch.device("cpu")
    policy = load_models(cfg, path, path, cpu, torch.float32)
    assert (policy.ref is not None) is holds_ref


@pytest.mark.gpu
def test_static_cache_bf16_rollout_on_cuda_keeps_close_logps(model_and_tok):
    model, tok = model_and_tok
    gpu = copy.deepcopy(model).to("cuda", torch.bfloat16)
    torch.manual_seed(3)
    r = generate_rollout(
        gpu,
        tok,
        PROMPTS,
        group_size=2,
        max_new_tokens=8,
        keep_logps=True,
        cache_implementation="static",
    )
    with torch.no_grad():
        logps, _ = completion_logps(gpu, r.input_ids, r.attention_mask, r.completion_len)
    m = r.completion_mask  # (N, Lc)
    assert torch.isfinite(r.sampling_logps).all()
    assert ((r.sampling_logps - logps * m).abs() * m).max() < 0.1  # bf16: kernels differ
