"""LoRA through PEFT (`model.lora.r`) on the tiny model: only the adapter trains, the
reference is the base model with the adapter off, resume is exact, `final/` loads merged and
as an adapter, `opo eval` reads either, and bad settings end in one line.

    pytest tests/test_lora.py -q            # ~1 min on 2 busy cores
    pytest tests/test_lora.py -q -m slow    # does a LoRA run on arith learn? (minutes)
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import opo_cli.train as T
from opo_cli.config import ConfigError, validate_train
from opo_cli.data import load_problems
from opo_cli.evaluate import evaluate
from opo_cli.logprobs import completion_logps
from opo_cli.lora import AdapterOff
from opo_cli.models import load_policy
from opo_cli.tracking import read_metrics
from tests.conftest import OPO, TINY, compose_config, compose_train

CPU, F32 = torch.device("cpu"), torch.float32
LORA = [  # rank 4 on every linear layer; a warm start long enough that some answers are right
    "model.lora.r=4",
    "model.lora.alpha=8",
    "trainer.lr=3e-3",
    "model.tiny.warm_start.steps=150",
    "rollout.prompts_per_step=4",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lora_cfg(cache, *overrides: str):
    return compose_train([*LORA, *overrides], cache)


def initial_path(cfg) -> str:
    return T.initial_model_path(cfg, load_problems(cfg.dataset)[0])


def fresh_policy(cfg) -> T.Policy:
    path = initial_path(cfg)
    return T.load_models(cfg, path, path, CPU, F32)


def token_batch(policy: T.Policy, rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of `rows` solved sums, left-padded as prompts are."""
    texts = [f"{a}+{b}={a + b}" for a, b in [(3, 4), (11, 7), (19, 19)][:rows]]
    enc = policy.tok(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


# ----------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.lora.r=0", "model.lora.r"),
        ("model.lora.r=-2", "model.lora.r"),
        ("model.lora.r=1.5", "model.lora.r"),
        ("model.lora.alpha=0", "model.lora.alpha"),
        ("model.lora.dropout=1.0", "model.lora.dropout"),
        ("model.lora.target_modules=[]", "model.lora.target_modules"),
        ("model.lora.target_modules=q_proj", "model.lora.target_modules"),  # a list, not a name
    ],
)
def test_bad_lora_settings_name_the_key(override, key, tiny_cache):
    with pytest.raises(ConfigError, match=f"^{key}="):
        validate_train(lora_cfg(tiny_cache, override))


def test_lora_with_the_vllm_backend_is_refused_in_one_line(tiny_cache, monkeypatch):
    # the engine is synced from the policy's state dict, which holds PEFT's layer names, not
    # merged weights: refused before any model loads (vLLM itself need not be installed)
    monkeypatch.setattr("opo_cli.config.require_vllm", lambda: None)
    with pytest.raises(ConfigError, match=r"^model\.lora\.r=4 .*rollout\.backend=vllm"):
        validate_train(lora_cfg(tiny_cache, "rollout.backend=vllm"))


def test_lora_is_off_by_default_and_its_settings_are_typed(tiny_cache):
    assert validate_train(compose_train([], tiny_cache)).lora is None
    s = validate_train(lora_cfg(tiny_cache, "model.lora.target_modules=[q_proj,v_proj]")).lora
    assert (s.r, s.alpha, s.dropout, s.target_modules) == (4, 8.0, 0.0, ("q_proj", "v_proj"))


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ("[q_proj,q_prj]", r"no module of LlamaForCausalLM is named 'q_prj'; its linear layers: "
         r"down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj$"),
        ("[input_layernorm]", r"^model\.lora: PEFT cannot put LoRA into LlamaForCausalLM: "),
    ],
)  # fmt: skip
def test_a_target_that_is_no_module_or_no_layer_peft_wraps_is_refused(targets, message, tiny_cache):
    with pytest.raises(ConfigError, match=message) as caught:
        fresh_policy(lora_cfg(tiny_cache, f"model.lora.target_modules={targets}"))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.lora.r=0", "model.lora.r=0 is not allowed"),
        ("model.lora.target_modules=[q_prj]", "model.lora.target_modules: no module"),
    ],
)
def test_opo_train_ends_bad_lora_input_in_one_line(override, named, tiny_cache, tmp_path):
    args = [*TINY, *LORA, override, f"model.cache_dir={tiny_cache}", "hydra.run.dir=."]
    done = subprocess.run(
        [*OPO, "train", *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode != 0
    # the warm start's progress bar may come first when the tiny model is not cached yet
    lines = [x for x in done.stderr.strip().splitlines() if not x.startswith("tiny model warm")]
    assert len(lines) == 1 and lines[0].startswith("opo: error: ") and named in lines[0], lines


# ----------------------------------------------------------------------- the adapter trains


@pytest.mark.parametrize("checkpointing", [False, True])
def test_only_the_adapter_gets_gradients_and_b_zero_keeps_the_base_output(
    checkpointing, tiny_cache
):
    cfg = lora_cfg(tiny_cache, f"model.gradient_checkpointing={str(checkpointing).lower()}")
    policy = fresh_policy(cfg)
    base, _ = load_policy(initial_path(cfg), device=CPU, dtype=F32)
    ids, mask = token_batch(policy)
    policy.model.train()
    out = policy.model(input_ids=ids, attention_mask=mask, labels=ids)
    # B = 0 at the start: the adapter adds B @ A @ x = 0, the base model's logits exactly
    assert torch.equal(out.logits, base(input_ids=ids, attention_mask=mask).logits)
    out.loss.backward()
    named = dict(policy.model.named_parameters())
    with_grad = {n for n, p in named.items() if p.grad is not None}
    assert with_grad == {n for n in named if ".lora_" in n}
    assert not any(p.requires_grad for n, p in named.items() if ".lora_" not in n)
    # d loss / d A = B^T (...) = 0 while B = 0; d loss / d B = (...) (A x)^T is not
    assert all(
        torch.equal(named[n].grad, torch.zeros_like(named[n])) for n in with_grad if "lora_A" in n
    )
    assert any(named[n].grad.abs().sum() > 0 for n in with_grad if "lora_B" in n)
    targets = {n.split(".")[-4] for n in with_grad}  # ...q_proj.lora_A.default.weight
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_training_changes_the_adapter_and_nothing_else(tiny_cache, tmp_path, monkeypatch):
    seen, real_step = {}, T.train_step

    def recording_step(policy, opt, *args):
        weights = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
        seen.setdefault("before", weights)
        seen["optimised"] = {id(p) for group in opt.param_groups for p in group["params"]}
        seen["trainable"] = {id(p) for p in policy.model.parameters() if p.requires_grad}
        row = real_step(policy, opt, *args)
        seen["after"] = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
        return row

    monkeypatch.setattr(T, "train_step", recording_step)
    T.train(lora_cfg(tiny_cache, "trainer.save_every=0"), tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert min(r["train/frac_uniform_groups"] for r in rows) < 1  # some group had a signal
    before, after = seen["before"], seen["after"]
    assert seen["optimised"] == seen["trainable"]
    for name, weight in before.items():  # B moves in the first update, A from the second on
        assert torch.equal(weight, after[name]) == (".lora_" not in name), name


# ----------------------------------------------------------------------- the reference


@pytest.mark.parametrize(
    ("method", "has_reference"),
    [
        (["method=dpo"], True),
        (["method=grpo", "method.loss_kwargs.beta=0.04"], True),
        (["method=grpo"], False),  # beta = 0: no reference at all
        (["method=opo"], False),
    ],
)
def test_the_reference_is_the_policy_with_its_adapter_off(method, has_reference, tiny_cache):
    policy = fresh_policy(lora_cfg(tiny_cache, *method))
    if not has_reference:
        assert policy.ref is None
        return
    assert isinstance(policy.ref, AdapterOff) and policy.ref.wrapped is policy.adapter  # no copy
    base, _ = load_policy(initial_path(lora_cfg(tiny_cache)), device=CPU, dtype=F32)
    with torch.no_grad():  # the adapter as training leaves it: B != 0
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p))
        ids, mask = token_batch(policy)
        ref, _ = completion_logps(policy.ref, ids, mask, 3)  # (3, 3)
        own, _ = completion_logps(policy.model, ids, mask, 3)  # (3, 3)
        expected, _ = completion_logps(base, ids, mask, 3)  # (3, 3)
    assert torch.equal(ref, expected)
    assert not torch.allclose(own, expected)  # the adapter is on again after the reference


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=dpo"],
        ["method=grpo", "method.loss_kwargs.beta=0.04"],
        ["rollout.backend=opo"],
    ],
)
def test_two_lora_steps_of_reference_methods_and_samplers(overrides, tiny_cache, tmp_path):
    row = T.train(lora_cfg(tiny_cache, "trainer.save_every=0", *overrides), tmp_path / "run")
    for key in ("train/reward_mean", "train/loss", "train/grad_norm"):
        assert math.isfinite(row[key]), key
    if "method.loss_kwargs.beta=0.04" in overrides:
        assert math.isfinite(row["train/kl_ref"])  # logged only when the reference is used
    assert (tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------- resume, final/, eval


@pytest.fixture(scope="module")
def lora_run(tiny_cache, tmp_path_factory):
    """4 LoRA steps with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("lora") / "run"
    T.train(lora_cfg(tiny_cache, "trainer.steps=4", "trainer.save_every=2"), run)
    return run


def test_a_checkpoint_holds_the_adapter_and_the_optimizer(lora_run):
    step = lora_run / "checkpoints" / "step_4"
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.pt"} <= {
        p.name for p in step.iterdir()
    }
    assert not (step / "model.safetensors").exists()  # the base model is not copied
    saved = load_file(step / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    state = torch.load(step / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert len(state) == len(saved)  # Adam moments for every adapter matrix, and nothing else


def test_resume_gives_the_uninterrupted_metrics_and_weights(lora_run, tiny_cache, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    shutil.rmtree(run / "checkpoints" / "step_4")
    shutil.rmtree(run / "final")
    T.train(lora_cfg(tiny_cache, "trainer.steps=4", "trainer.save_every=2"), run)
    strip = [
        [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(f)]
        for f in (run / "metrics.jsonl", lora_run / "metrics.jsonl")
    ]
    assert [r["step"] for r in strip[0]] == [1, 2, 3, 4]
    assert strip[0] == strip[1]
    for file in ("adapter/adapter_model.safetensors", "model.safetensors"):
        a, b = load_file(run / "final" / file), load_file(lora_run / "final" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


def test_a_damaged_adapter_checkpoint_is_skipped_for_the_one_before(
    lora_run, tiny_cache, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    shutil.rmtree(run / "final")
    weights = run / "checkpoints" / "step_4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut off mid-write
    T.train(lora_cfg(tiny_cache, "trainer.steps=4", "trainer.save_every=2"), run)
    assert "skipping damaged checkpoint" in capsys.readouterr().err
    a = load_file(run / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(lora_run / "final" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)  # steps 3 and 4 again, from step 2


def test_final_loads_merged_and_as_an_adapter_with_the_same_outputs(lora_run, tiny_cache):
    from peft import PeftModel

    final = lora_run / "final"
    merged = AutoModelForCausalLM.from_pretrained(final)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    merged_at_load, tok = load_policy(str(final / "adapter"), device=CPU, dtype=F32)
    base = AutoModelForCausalLM.from_pretrained(initial_path(lora_cfg(tiny_cache)))
    unmerged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(initial_path(lora_cfg(tiny_cache))), final / "adapter"
    )
    ids = tok(["3+4=7", "19+19=38"], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        logits = merged(input_ids=ids).logits
        torch.testing.assert_close(merged_at_load(input_ids=ids).logits, logits)
        torch.testing.assert_close(unmerged(input_ids=ids).logits, logits)
        assert not torch.allclose(base(input_ids=ids).logits, logits)  # training moved it


def test_opo_eval_reads_the_run_the_merged_model_and_the_adapters_alike(lora_run, tmp_path):
    results = {}
    for name, spec in [
        ("run", lora_run),
        ("merged", lora_run / "final"),
        ("adapter", lora_run / "final" / "adapter"),
        ("checkpoint", lora_run / "checkpoints" / "step_4"),  # the last step: the same adapter
    ]:
        args = [f"checkpoint={spec}", "dataset=arith", "eval.limit=8", "eval.max_new_tokens=4"]
        results[name] = evaluate(compose_config("eval", args), tmp_path / name)
        samples = (tmp_path / name / "samples.jsonl").read_text().splitlines()
        results[name]["responses"] = [json.loads(line)["response"] for line in samples]
    assert results["run"]["checkpoint"] == str(lora_run / "final")
    first = results["run"]
    for result in results.values():
        assert (result["accuracy"], result["responses"]) == (first["accuracy"], first["responses"])


# ----------------------------------------------------------------------- learning


@pytest.mark.slow
def test_a_lora_run_on_arith_learns(tmp_path):
    """The default run (OPO on arith, tiny model warm-started by a noisy teacher) with LoRA:
    the mean reward of the last 10 of 100 steps beats the first 10 by a clear margin."""
    cfg = compose_config(
        "train",
        [
            "logger=none",
            f"model.cache_dir={tmp_path / 'cache'}",
            "model.lora.r=8",
            "trainer.lr=3e-3",
        ],
    )
    T.train(cfg, tmp_path / "run")
    rewards = [r["train/reward_mean"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(rewards) == 100
    assert sum(rewards[-10:]) / 10 - sum(rewards[:10]) / 10 >= 0.25  # measured: +0.38
