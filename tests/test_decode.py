"""Our sampling loop (`rollout.backend=opo`, `opo_cli.decode`) against HF `generate`: the
same tokens from the same seed, the same kept log-probs, with either KV cache."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from opo_cli.data import load_problems
from opo_cli.decode import _DECODER, decode, sample_tokens
from opo_cli.logprobs import completion_logps
from opo_cli.models import build_tiny_model, load_policy
from opo_cli.rollout import generate_rollout
from opo_cli.train import initial_model_path, train
from tests.conftest import compose_train

RAGGED = ["1+2=", "13+15=", "7+19=", "0+0=", "1"]  # left padding, and a one-token prompt


def sample(model, tok, prompts, backend, seed=0, **kwargs):
    torch.manual_seed(seed)
    return generate_rollout(
        model,
        tok,
        prompts,
        group_size=3,
        max_new_tokens=8,
        keep_logps=True,
        backend=backend,
        **kwargs,
    )


@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("prompts", [RAGGED, ["5"]], ids=["ragged", "one-token"])
def test_our_loop_samples_what_generate_samples(model_and_tok, prompts, temperature, top_p):
    model, tok = model_and_tok
    kwargs = {"temperature": temperature, "top_p": top_p}
    hf, ours = (sample(model, tok, prompts, backend, **kwargs) for backend in ("hf", "opo"))
    assert torch.equal(ours.input_ids, hf.input_ids)
    assert torch.equal(ours.attention_mask, hf.attention_mask)
    assert torch.equal(ours.completion_mask, hf.completion_mask)
    assert ours.texts == hf.texts
    assert torch.allclose(ours.sampling_logps, hf.sampling_logps, atol=1e-6)
    assert torch.allclose(ours.sampling_entropy, hf.sampling_entropy, atol=1e-6)
    assert len(set(ours.texts)) > 1  # the samples differ: the comparison is not vacuous


def decode_both(model, tok, prompts, max_new_tokens):
    """decode() with the dynamic and then the static cache, same seed: two (ids, logps, ent)."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    kwargs = {"group_size": 2, "stop_ids": [tok.eos_token_id], "pad_id": 0}
    outs = []
    for static in (False, True):
        torch.manual_seed(3)
        outs.append(
            decode(
                model,
                enc.input_ids,
                enc.attention_mask,
                static=static,
                max_new_tokens=max_new_tokens,
                **kwargs,
            )
        )
    return outs


def test_static_cache_decodes_what_the_dynamic_one_does_and_is_kept(model_and_tok):
    model, tok = model_and_tok
    pointers = []
    # a first shape; shorter prompts reuse its buffers; a longer rollout grows them once
    for prompts, new in ((RAGGED, 6), (["1+2="] * 5, 6), (RAGGED, 6), (RAGGED, 200)):
        (ids, logps, ent), (ids_s, logps_s, ent_s) = decode_both(model, tok, prompts, new)
        assert torch.equal(ids_s, ids)
        assert torch.allclose(logps_s, logps, atol=1e-6) and torch.allclose(ent_s, ent, atol=1e-6)
        pointers.append(_DECODER[0].cache.layers[0].keys.data_ptr())
    assert pointers[0] == pointers[1] == pointers[2]
    assert _DECODER[0].width >= 200 and _DECODER[0].width % 128 == 0


def test_decoding_stops_once_every_row_has_ended(tiny_cache):
    cfg = compose_train([], tiny_cache)
    problems, _ = load_problems(cfg.dataset)
    model, tok = load_policy(
        initial_model_path(cfg, problems), device=torch.device("cpu"), dtype=torch.float32
    )
    enc = tok([p.prompt for p in problems[:4]], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    ids, logps, _ = decode(
        model,
        enc.input_ids,
        enc.attention_mask,
        group_size=4,
        max_new_tokens=40,
        temperature=0.3,
        stop_ids=[tok.eos_token_id],
        pad_id=tok.pad_token_id,
        check_every=4,
    )
    ended = ids == tok.eos_token_id  # (N, Lc) warm-started answers end within a few tokens
    assert ended.any(-1).all()
    assert ids.shape[1] < 40 and ids.shape[1] % 4 == 0  # stopped at the first check after
    after = ended.long().cumsum(-1) - ended.long() > 0  # (N, Lc) past each row's EOS
    assert (ids[after] == tok.pad_token_id).all() and (logps[after] == 0).all()


def test_top_p_keeps_the_smallest_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps the first two (0.5 < 0.75 <= 0.8)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(4000, 1)
    torch.manual_seed(0)
    token, logp, entropy = sample_tokens(logits, 1.0, 0.75)
    counts = torch.bincount(token, minlength=4).float() / 4000
    assert counts[2:].sum() == 0
    assert counts[0].item() == pytest.approx(0.5 / 0.8, abs=0.03)
    assert torch.allclose(logp, logits[0].log_softmax(-1)[token])  # before the cut, at T
    h = -(torch.tensor([0.5, 0.3, 0.15, 0.05]) * torch.tensor([0.5, 0.3, 0.15, 0.05]).log()).sum()
    assert torch.allclose(entropy, h.expand(4000))


def test_a_run_with_our_loop_learns_the_same_first_step(tmp_path, tiny_cache):
    one = ["trainer.steps=1", "trainer.save_every=0", "trainer.mini_batches=1", "logger=none"]
    rows = []
    for backend in ("hf", "opo"):
        row = train(
            compose_train([*one, f"rollout.backend={backend}"], tiny_cache), tmp_path / backend
        )
        rows.append(row)
    for key in ("train/reward_mean", "train/loss", "train/grad_norm", "train/response_len_mean"):
        assert rows[1][key] == pytest.approx(rows[0][key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_tokens(model_and_tok):
    model, tok = model_and_tok
    enc = tok(RAGGED, return_tensors="pt", padding=True)
    kwargs = {"group_size": 3, "max_new_tokens": 8, "stop_ids": [tok.eos_token_id], "pad_id": 0}
    outs = []
    for compiled in (False, True, True):  # compiles once, then reuses the graph
        torch.manual_seed(1)
        outs.append(
            decode(
                model, enc.input_ids, enc.attention_mask, static=True, compiled=compiled, **kwargs
            )
        )
    for ids, logps, _ in outs[1:]:
        assert torch.equal(ids, outs[0][0])
        assert torch.allclose(logps, outs[0][1], atol=1e-5)


@pytest.mark.gpu
def test_cuda_graph_rollout_in_bf16_matches_a_recomputed_forward(model_and_tok):
    model, tok = model_and_tok
    model = build_tiny_model(
        OmegaConf.create(
            {
                "hidden_size": 64,
                "intermediate_size": 128,
                "layers": 2,
                "heads": 4,
                "max_positions": 64,
            }
        ),
        tok,
        seed=0,
    ).to("cuda", torch.bfloat16)
    rollouts = [sample(model, tok, RAGGED, "opo", seed=s) for s in (0, 1)]  # capture, replay
    for r in rollouts:
        with torch.no_grad():
            logps, _ = completion_logps(model, r.input_ids, r.attention_mask, r.completion_len)
        m = r.completion_mask
        assert (r.sampling_logps - logps * m).abs().max().item() < 0.1  # bf16 kernels differ
    assert _DECODER[0].compiled
