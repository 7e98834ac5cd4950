"""Every sampler draws from the distribution the loss assumes, whatever the model's own
generation config says, and stops at every EOS id that config names (`opo_cli.generation`)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GenerationConfig, WatermarkingConfig

from opo_cli.evaluate import generate_completions
from opo_cli.generation import stop_token_ids
from opo_cli.logprobs import completion_logps
from opo_cli.rollout import generate_rollout

PROMPTS = ["1+2=", "13+15=", "7+19=", "0+0=", "1"]  # left padding, and a one-token prompt


def hostile_config(tok) -> GenerationConfig:
    """A generation config that sets every logits processor and warper `generate` builds
    (transformers 5.24, `_get_logits_processor`), greedy decoding, and a short length."""
    a, b, c, d = (tok.convert_tokens_to_ids(t) for t in ("1", "2", "3", "+"))
    return GenerationConfig(
        do_sample=False,
        max_length=6,
        min_length=3,
        min_new_tokens=2,
        guidance_scale=1.5,
        sequence_bias={(c,): -4.0},
        encoder_repetition_penalty=1.2,
        repetition_penalty=1.3,
        no_repeat_ngram_size=2,
        encoder_no_repeat_ngram_size=2,
        bad_words_ids=[[d]],
        forced_bos_token_id=a,
        forced_eos_token_id=b,
        remove_invalid_values=True,
        exponential_decay_length_penalty=(2, 1.5),
        suppress_tokens=[c],
        begin_suppress_tokens=[b],
        temperature=0.5,
        top_h=0.9,
        top_k=3,
        top_p=0.5,
        min_p=0.2,
        typical_p=0.9,
        epsilon_cutoff=0.01,
        eta_cutoff=0.01,
        watermarking_config=WatermarkingConfig(),
        renormalize_logits=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


@pytest.fixture(scope="module")
def hostile_model(model_and_tok):
    """The tiny model, the same weights, with `hostile_config` as its generation config."""
    model, tok = model_and_tok
    hostile = copy.deepcopy(model)
    hostile.generation_config = hostile_config(tok)
    return hostile


def rollout(model, tok, backend, **kwargs):
    torch.manual_seed(0)
    kwargs |= {"group_size": 3, "max_new_tokens": 8, "keep_logps": True, "backend": backend}
    return generate_rollout(model, tok, PROMPTS, **kwargs)


def test_the_hostile_config_bites_on_a_plain_generate_call(model_and_tok, hostile_model):
    # the test below is not vacuous: generate as the samplers called it before draws other tokens
    model, tok = model_and_tok
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    outs = []
    for m in (model, hostile_model):
        torch.manual_seed(0)
        kwargs = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
        outs.append(m.generate(**enc, max_new_tokens=8, pad_token_id=tok.pad_token_id, **kwargs))
    assert outs[0].shape != outs[1].shape or not torch.equal(*outs)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.parametrize("backend", ["hf", "opo"])
def test_samplers_ignore_the_models_generation_config(model_and_tok, hostile_model, backend, top_p):
    model, tok = model_and_tok
    clean = rollout(model, tok, backend, temperature=0.7, top_p=top_p)
    ours = rollout(hostile_model, tok, backend, temperature=0.7, top_p=top_p)
    assert torch.equal(ours.input_ids, clean.input_ids)
    assert torch.equal(ours.completion_mask, clean.completion_mask)
    assert torch.allclose(ours.sampling_logps, clean.sampling_logps, atol=1e-6)
    # the kept log-probs are those the training forward recomputes at T = 0.7: on-policy
    recomputed, _ = completion_logps(
        hostile_model, ours.input_ids, ours.attention_mask, ours.completion_len, temperature=0.7
    )
    kept_minus_recomputed = (ours.sampling_logps - recomputed) * ours.completion_mask
    assert kept_minus_recomputed.abs().max() < 1e-4
    assert len(set(ours.texts)) > 1 and ours.completion_len == 8  # sampled, full length


@pytest.mark.parametrize("n", [1, 4])
def test_evaluation_ignores_the_models_generation_config(model_and_tok, hostile_model, n):
    model, tok = model_and_tok
    outs = []
    for m in (model, hostile_model):
        torch.manual_seed(0)
        kwargs = {"n": n, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}
        outs.append(generate_completions(m, tok, PROMPTS, **kwargs))
    assert outs[0] == outs[1]
    assert max(outs[1][1]) == 8  # not cut to the hostile max_length


def test_stop_token_ids_joins_the_tokenizers_and_the_configs():
    class Tok:
        eos_token_id = 7

    class Model:
        generation_config = GenerationConfig(eos_token_id=[9, 7, 11])

    assert stop_token_ids(Model(), Tok()) == [7, 9, 11]
    Model.generation_config = GenerationConfig(eos_token_id=7)
    assert stop_token_ids(Model(), Tok()) == [7]
    Model.generation_config = GenerationConfig()
    assert stop_token_ids(Model(), Tok()) == [7]


def first_stop(ids: torch.Tensor, stops: list[int]) -> list[int | None]:
    """Index of the first stop id in each row of (N, L) ids, None if there is none."""
    out = []
    for row in ids.tolist():
        out.append(next((t for t, x in enumerate(row) if x in stops), None))
    return out


@pytest.mark.parametrize("backend", ["hf", "opo"])
def test_samplers_stop_at_every_eos_the_config_names(model_and_tok, backend):
    model, tok = model_and_tok
    plain = rollout(model, tok, backend)  # stops at the tokenizer's EOS only
    completions = plain.input_ids[:, -plain.completion_len :]  # (N, Lc)
    # a second EOS: the token the first row sampled at step 2, so that it stops there
    second = int(completions[0, 2])
    assert second != tok.eos_token_id
    two_eos = copy.deepcopy(model)
    two_eos.generation_config.eos_token_id = [tok.eos_token_id, second]
    ours = rollout(two_eos, tok, backend)  # same seed, same distribution: same tokens
    stops = first_stop(completions, [tok.eos_token_id, second])
    assert stops[0] is not None and stops[0] <= 2  # the second EOS ends a row
    assert stops != first_stop(completions, [tok.eos_token_id])  # ... that would not end there
    lengths = [8 if s is None else s + 1 for s in stops]
    assert ours.completion_mask.sum(-1).long().tolist() == lengths
    assert ours.truncated.tolist() == [s is None for s in stops]
    for i, n in enumerate(lengths):  # the tokens kept are the plain sampler's
        assert torch.equal(ours.input_ids[i, -ours.completion_len :][:n], completions[i, :n])
    cut = [c[:n] for c, n in zip(completions, lengths, strict=True)]
    assert ours.texts == tok.batch_decode(cut, skip_special_tokens=True)


def test_evaluation_stops_at_every_eos_the_config_names(model_and_tok):
    model, tok = model_and_tok
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    greedy = model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=0)
    completions = greedy[:, enc.input_ids.shape[1] :]  # (5, 8) the greedy tokens
    second = int(completions[0, 1])  # the token the first response picks at step 1
    two_eos = copy.deepcopy(model)
    two_eos.generation_config.eos_token_id = [tok.eos_token_id, second]
    _, lengths, truncated = generate_completions(
        two_eos, tok, PROMPTS, n=1, max_new_tokens=8, temperature=1.0, top_p=1.0
    )
    stops = first_stop(completions, [tok.eos_token_id, second])
    assert stops[0] is not None and stops[0] <= 1
    assert lengths == [8 if s is None else s + 1 for s in stops]
    assert truncated == [s is None for s in stops]
