"""One training step of `opo train` (OPO) against TRL's GRPOTrainer, same shape, same machine.

Builds a model of a named architecture from its config with random weights (no download),
then runs `--steps` steps of our step (`opo_cli.train.train_step`: rollout, rewards, the
optimisation passes) and the same number of rollouts through TRL's `GRPOTrainer`, in this
process, one after the other, each on a fresh copy of the same initial weights. Equal work:

- the same prompts (`--prompts` digit strings of `--prompt-len` tokens each, so no padding),
  `--group` completions each, sampled at temperature 1 without top-k/top-p;
- every completion runs to `--new-tokens`: the tokenizer's EOS id is the model's vocabulary
  size, a token the model cannot sample (TRL and ours stop on the same id);
- the same optimisation per rollout: `--epochs` passes (TRL's `num_iterations`) of
  `--mini-batches` optimizer updates (TRL: `gradient_accumulation_steps` micro-batches of
  `--micro` rows, `steps_per_generation` = rollout rows / `--micro`), AdamW, no reference
  model (`beta=0`), no vLLM, a constant reward, the same gradient checkpointing setting.

The first step of each side is a warm-up and is not timed; the table shows medians over
the timed steps. Rollout time is sampling,
decoding and scoring; training time is the rest of the step (log-probs of pi_old, forward,
backward, optimizer). Peak memory is `torch.cuda.max_memory_allocated` on a GPU and the
process's peak resident set (reset before each side) on a CPU. The table's last column is
ours / TRL: below 1 is faster (times) or leaner (memory), above 1 is more tokens/s.

Needs TRL (`pip install -e .[bench]`). On this CPU (the issue's CPU target: ours >= TRL in
completion tokens/s):

    python scripts/bench_step.py --arch tiny --prompts 8 --group 8 --new-tokens 32 --steps 3

`--arch qwen3-small` (Qwen3's layout at about 40M parameters) checks the GPU shape's paths
(micro-batches, prefill) on a CPU in seconds. On one GPU (the issue's shape: Qwen3-1.7B
sizes, bf16; add `--ours rollout.backend=opo` for our sampling loop, or
`--ours rollout.cache_implementation=static` for generate's compiled static-cache decoding;
`scripts/gpu_check.sh` runs both):

    python scripts/bench_step.py --arch qwen3-1.7b --prompts 32 --group 6 --prompt-len 200 \
        --new-tokens 512 --steps 3

`--ours KEY=VALUE ...` passes Hydra overrides to our side (e.g. `trainer.micro_batch_tokens=8192`,
`rollout.reuse_sampling_logps=true`). With vLLM installed, `--only ours --ours
rollout.backend=vllm` samples through the colocated engine (on a CPU with `model=tiny_vllm`,
whose head size vLLM's CPU attention serves; docs/performance.md).

`--nproc N` measures data-parallel scaling instead (no TRL): `opo train` (model=tiny, OPO) at
the same global batch (`--prompts` x `--group`) as one process and as N processes launched by
`python -m torch.distributed.run --standalone --nproc_per_node=N -m opo_cli train`, each with
`--threads` threads (default 1, so N processes use N times the cores of one), `--steps` + 1
steps; it reads `perf/step_s` and `train/response_len_mean` from each run's metrics.jsonl
(first step a warm-up; the prompts are the dataset's, `--prompt-len` does not apply) and
prints step time, completion tokens/s and the scaling efficiency,
(1-process time) / (N x N-process time), 1.0 being perfect. `--ours` overrides go to both runs:

    python scripts/bench_step.py --nproc 2 --prompts 8 --group 8 --new-tokens 32 --steps 5 \
        --ours model.tiny.warm_start.steps=0

(`--nproc 1` runs the one-process side alone: a check of the plumbing.)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from rich.console import Console
from rich.table import Table
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from opo_cli.config import CONF_DIR, TrainSettings, validate_train
from opo_cli.data import Problem, PromptSampler, arith_problems
from opo_cli.models import build_tiny_model, train_tokenizer
from opo_cli.rewards import build_reward
from opo_cli.train import Policy, make_optimizer, open_run_backend, train_step

QWEN3_1_7B = {  # Qwen/Qwen3-1.7B config.json, written out: no download
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 40960,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
}
QWEN3_SMALL = {  # Qwen3's layout at about 40M parameters: CPU checks of the GPU-shape paths
    **QWEN3_1_7B,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 32000,
}
ARCHS = {"tiny": None, "qwen3-small": QWEN3_SMALL, "qwen3-1.7b": QWEN3_1_7B}


@dataclass
class StepTimes:
    """Medians over the timed steps of one side (robust to a busy machine)."""

    rollout_s: float
    train_s: float
    step_s: float
    completion_tokens: float  # per step
    peak_mem_gb: float

    @property
    def tok_per_s(self) -> float:
        return self.completion_tokens / self.step_s


# ------------------------------------------------------------------ model and tokenizer


def arith_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny model's tokenizer: byte-level BPE trained on arith text, digits one per token."""
    problems = arith_problems(19, "+")
    return train_tokenizer([p.prompt + p.answer for p in problems], vocab_size=300)


def with_unreachable_eos(tok: PreTrainedTokenizerFast, vocab_size: int) -> PreTrainedTokenizerFast:
    """`tok` with its EOS moved to id `vocab_size`: a model of that vocabulary never samples it."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    for added in spec["added_tokens"]:
        if added["content"] == tok.eos_token:
            added["id"] = vocab_size
    spec["model"]["vocab"][tok.eos_token] = vocab_size
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        pad_token=tok.pad_token,
        eos_token=tok.eos_token,
        padding_side="left",
    )


def build_model(arch: str, cfg, tok, device: torch.device, dtype: torch.dtype, seed: int):
    """Random weights of `arch`; the same `seed` gives the same weights on both sides."""
    if arch == "tiny":
        model = build_tiny_model(cfg.model.tiny, tok, seed=seed).to(device, dtype)
    else:
        torch.manual_seed(seed)
        config = Qwen3Config(**ARCHS[arch], pad_token_id=tok.pad_token_id, bos_token_id=None)
        with torch.device(device):
            model = Qwen3ForCausalLM._from_config(config, dtype=dtype)
    vocab = model.config.vocab_size
    model.config.eos_token_id = model.generation_config.eos_token_id = vocab  # unreachable
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def digit_prompts(n: int, length: int, seed: int) -> list[str]:
    """`n` strings of `length` random digits: `length` tokens each under the arith tokenizer."""
    rng = random.Random(seed)
    return ["".join(rng.choice("0123456789") for _ in range(length)) for _ in range(n)]


# ------------------------------------------------------------------ memory


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # else the peak covers the whole process so far
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets peak RSS (VmHWM) to now


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    status = Path("/proc/self/status")
    if status.exists():
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ ours


def shape_overrides(args: argparse.Namespace) -> list[str]:
    """OPO at the benchmark's shape: the overrides both of our sides start from."""
    return [
        "method=opo",
        "logger=none",
        f"seed={args.seed}",
        f"trainer.lr={args.lr}",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.group_size={args.group}",
        f"rollout.max_new_tokens={args.new_tokens}",
        f"trainer.epochs={args.epochs}",
        f"trainer.mini_batches={args.mini_batches}",
        f"trainer.micro_batch_size={args.micro or 'null'}",
    ]


def our_config(args: argparse.Namespace):
    """The real `opo train` config (OPO, tiny-model group) at the benchmark's shape."""
    overrides = [
        *shape_overrides(args),
        f"model.gradient_checkpointing={args.gradient_checkpointing}",
        *args.ours,
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("train", overrides=overrides)


def run_ours(args, tok, device: torch.device, dtype: torch.dtype) -> StepTimes:
    cfg = our_config(args)
    s: TrainSettings = validate_train(cfg)
    model = build_model(args.arch, cfg, args.base_tok, device, dtype, args.seed)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    policy = Policy(model, tok, None, backend=open_backend_on(model, tok, cfg, s, device, dtype))
    opt, sched = make_optimizer(model, s)
    prompts = digit_prompts(args.prompts * (args.steps + 1), args.prompt_len, args.seed)
    problems = [Problem(p, "0") for p in prompts]
    sampler = PromptSampler(len(problems), args.seed)
    reward_fn = build_reward(cfg.dataset)  # exact match against '0': almost always 0
    reset_peak_memory(device)
    rows = []
    for step in range(1, args.steps + 2):
        _, row = train_step(policy, opt, sched, sampler, problems, reward_fn, s, cfg, step)
        rows.append(row)
        print(f"  ours step {step}: {row['perf/step_s']:.2f} s", flush=True)
    timed = rows[1:]
    n = args.prompts * args.group
    result = StepTimes(
        rollout_s=median(r["perf/rollout_s"] for r in timed),
        train_s=median(r["perf/train_s"] for r in timed),
        step_s=median(r["perf/step_s"] for r in timed),
        completion_tokens=median(r["train/response_len_mean"] * n for r in timed),
        peak_mem_gb=peak_memory_gb(device),
    )
    policy.backend.close()
    del policy, model, opt, sched
    release(device)
    return result


def open_backend_on(model, tok, cfg, s: TrainSettings, device, dtype):
    """The sampler `rollout.backend` names, on `model`'s weights (vllm: saved for the engine
    to load, in a folder that goes once it has)."""
    if s.rollout.backend != "vllm":
        return open_run_backend(cfg, s, "", device, dtype)  # samples with `model` itself
    with tempfile.TemporaryDirectory(prefix="opo-bench-model-") as folder:
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        backend = open_run_backend(cfg, s, folder, device, dtype)
    backend.sync(model)
    return backend


def median(values) -> float:
    return statistics.median(list(values))


# ------------------------------------------------------------------ TRL


class Stopwatch:
    """Wraps a bound method; records (seconds, result) of each call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *a, **kw):
        t0 = time.perf_counter()
        out = self.fn(*a, **kw)
        self.calls.append((time.perf_counter() - t0, out))
        return out


def trl_config(args, device: torch.device, output_dir: str):
    from trl import GRPOConfig

    rows = args.prompts * args.group
    micro = args.micro or rows // args.mini_batches
    return GRPOConfig(
        output_dir=output_dir,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        use_cpu=device.type != "cuda",
        bf16=device.type == "cuda",
        seed=args.seed,
        data_seed=args.seed,
        max_steps=(args.steps + 1) * args.epochs * args.mini_batches,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_checkpointing=args.gradient_checkpointing,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=rows // args.mini_batches // micro,
        steps_per_generation=rows // micro,
        num_iterations=args.epochs,
        num_generations=args.group,
        max_completion_length=args.new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        use_vllm=False,
        log_completions=False,
        dataloader_num_workers=0,
    )


def run_trl(args, tok, device: torch.device, dtype: torch.dtype) -> StepTimes:
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOTrainer

    class StepClock(TrainerCallback):
        def __init__(self, updates_per_rollout: int):
            self.per_rollout, self.ends = updates_per_rollout, []

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())
            if len(self.ends) % self.per_rollout == 0:
                print(f"  TRL step {len(self.ends) // self.per_rollout} done", flush=True)

    cfg = our_config(args)
    model = build_model(args.arch, cfg, args.base_tok, device, dtype, args.seed)
    prompts = digit_prompts(args.prompts * (args.steps + 1), args.prompt_len, args.seed)
    per_rollout = args.epochs * args.mini_batches  # optimizer steps per rollout
    clock = StepClock(per_rollout)
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out:
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=lambda completions, **_: [0.0] * len(completions),
            args=trl_config(args, device, out),
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tok,
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)
        generate = trainer._generate = Stopwatch(trainer._generate)
        score = trainer._calculate_rewards = Stopwatch(trainer._calculate_rewards)
        reset_peak_memory(device)
        trainer.train()
        peak = peak_memory_gb(device)
    ends = clock.ends[per_rollout - 1 :: per_rollout]  # (steps + 1,) end of each rollout's updates
    step_s = [b - a for a, b in itertools.pairwise(ends)]
    rollout_s = [g[0] + r[0] for g, r in zip(generate.calls, score.calls, strict=True)][1:]
    tokens = [sum(len(c) for c in g[1][1]) for g in generate.calls][1:]  # completion_ids
    result = StepTimes(
        rollout_s=median(rollout_s),
        train_s=median(b - a for a, b in zip(rollout_s, step_s, strict=True)),
        step_s=median(step_s),
        completion_tokens=median(tokens),
        peak_mem_gb=peak,
    )
    del trainer, model
    release(device)
    return result


# ------------------------------------------------------------------ scaling over processes


def train_command(args, nproc: int, run_dir: Path) -> list[str]:
    """`opo train` at the benchmark's shape on `nproc` processes (1: no launcher)."""
    launcher = [sys.executable]
    if nproc > 1:  # each rank's output also in logs/: rank 1 must not report a run of its own
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        launcher += [f"--log-dir={run_dir.parent / 'logs'}", "--redirects=3", "--tee=3"]
    overrides = [
        *shape_overrides(args),
        f"trainer.steps={args.steps + 1}",
        "trainer.save_every=0",  # only final/: checkpoints are not the step
        f"trainer.device={args.device}",
        *args.ours,
        f"hydra.run.dir={run_dir}",
    ]
    return [*launcher, "-m", "opo_cli", "train", *overrides]


def timed_run(args, nproc: int, out: Path) -> StepTimes:
    """One `opo train` run on `nproc` processes; medians of its metrics after the warm-up step."""
    run_dir = out / f"nproc{nproc}"
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads or 1), "WANDB_MODE": "disabled"}
    print(f"  {' '.join(train_command(args, nproc, run_dir))}", flush=True)
    subprocess.run(train_command(args, nproc, run_dir), env=env, check=True, timeout=args.timeout)
    others = [f for f in (out / "logs").rglob("*.log") if f.parent.name not in ("", "0")]
    if any("done: " in f.read_text() for f in others):  # rank 0 alone ends a run with it
        raise SystemExit(
            f"a rank other than 0 reported a run of its own ({out / 'logs'}): this `opo train` "
            f"trains one run per process, not one run on {nproc} processes"
        )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:]
    n = args.prompts * args.group
    return StepTimes(
        rollout_s=median(r["perf/rollout_s"] for r in timed),
        train_s=median(r["perf/step_s"] - r["perf/rollout_s"] for r in timed),
        step_s=median(r["perf/step_s"] for r in timed),
        completion_tokens=median(r["train/response_len_mean"] * n for r in timed),
        peak_mem_gb=float("nan"),  # another process's: not measured here
    )


def scaling_table(args, one: StepTimes, many: StepTimes | None) -> Table:
    """Step time and tokens/s of 1 and N processes, and N-process efficiency."""
    title = (
        f"opo train {' '.join(args.ours) or 'model=tiny'}: "
        f"{args.prompts} prompts x {args.group} completions (global), {args.new_tokens} new "
        f"tokens, {args.epochs} epoch(s) x {args.mini_batches} mini-batches, "
        f"{args.threads or 1} thread(s) per process, median of {args.steps} steps"
    )
    t = Table(title=title)
    t.add_column("")
    t.add_column("1 process", justify="right")
    if many is not None:
        t.add_column(f"{args.nproc} processes", justify="right")
        t.add_column("efficiency", justify="right")
    for label, attr in (
        ("rollout s", "rollout_s"),
        ("training s", "train_s"),
        ("step s", "step_s"),
    ):
        a = getattr(one, attr)
        cells = [f"{a:.3f}"]
        if many is not None:
            b = getattr(many, attr)
            cells += [f"{b:.3f}", f"{a / (args.nproc * b):.2f}"]
        t.add_row(label, *cells)
    cells = [f"{one.tok_per_s:.1f}"]
    if many is not None:
        cells += [f"{many.tok_per_s:.1f}", f"{many.tok_per_s / (args.nproc * one.tok_per_s):.2f}"]
    t.add_row("completion tokens/s", *cells)
    return t


def run_scaling(args) -> None:
    """`--nproc N`: one process against N at the same global batch (see the docstring)."""
    if args.nproc > 1 and args.prompts % args.nproc:
        raise SystemExit(f"--prompts {args.prompts} is not a multiple of --nproc {args.nproc}")
    console = Console()
    with tempfile.TemporaryDirectory(prefix="opo-bench-nproc-") as out:
        one = timed_run(args, 1, Path(out))
        many = timed_run(args, args.nproc, Path(out)) if args.nproc > 1 else None
    console.print(scaling_table(args, one, many))


# ------------------------------------------------------------------ report


def table(args, ours: StepTimes, trl: StepTimes, device: torch.device, dtype) -> Table:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    title = (
        f"{args.arch}, {args.prompts} prompts x {args.group} completions, "
        f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens, "
        f"{args.epochs} epoch(s) x {args.mini_batches} mini-batches, micro {args.micro or 'all'}, "
        f"{where} ({torch.get_num_threads()} threads), {str(dtype).removeprefix('torch.')}, "
        f"median of {args.steps} steps"
    )
    t = Table(title=title)
    for name in ("", "ours (opo)", "TRL GRPOTrainer", "ours / TRL"):
        t.add_column(name, justify="left" if not name else "right")
    rows = [
        ("rollout s", "rollout_s", "{:.3f}"),
        ("training s", "train_s", "{:.3f}"),
        ("step s", "step_s", "{:.3f}"),
        ("completion tokens/s", "tok_per_s", "{:.1f}"),
        ("peak memory GiB", "peak_mem_gb", "{:.2f}"),
    ]
    for label, attr, fmt in rows:
        a, b = getattr(ours, attr), getattr(trl, attr)
        t.add_row(label, fmt.format(a), fmt.format(b), f"{a / b:.2f}")
    return t


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    p.add_argument("--prompts", type=int, default=8, help="P prompts per step")
    p.add_argument("--group", type=int, default=8, help="G completions per prompt")
    p.add_argument("--prompt-len", type=int, default=16, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per completion")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    p.add_argument("--epochs", type=int, default=1, help="passes per rollout")
    p.add_argument("--mini-batches", type=int, default=2, help="optimizer updates per pass")
    p.add_argument(
        "--micro", type=int, default=None, help="rows per forward (default: tiny all, else 8)"
    )
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--only", choices=("both", "ours", "trl"), default="both", help="sides to run")
    p.add_argument("--ours", nargs="*", default=[], help="Hydra overrides for our side")
    p.add_argument(
        "--nproc", type=int, default=None, help="scaling: 1 process against N (torchrun), no TRL"
    )
    p.add_argument("--timeout", type=float, default=3600, help="--nproc: seconds per run")
    args = p.parse_args()
    real = args.arch != "tiny"
    args.micro = args.micro if args.micro is not None else (8 if real else None)
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = real
    return args


def main() -> None:
    args = parse_args()
    if args.nproc is not None:
        run_scaling(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if want_cuda else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.base_tok = arith_tokenizer()
    vocab = len(args.base_tok) if args.arch == "tiny" else ARCHS[args.arch]["vocab_size"]
    tok = with_unreachable_eos(args.base_tok, vocab)
    console = Console()
    sides = {}
    for name, run in (("ours", run_ours), ("trl", run_trl)):
        if args.only in ("both", name):
            console.print(f"running {name} ...")
            sides[name] = run(args, tok, device, dtype)
            console.print(f"{name}: {sides[name]}")
    if len(sides) == 2:
        console.print(table(args, sides["ours"], sides["trl"], device, dtype))


if __name__ == "__main__":
    main()
