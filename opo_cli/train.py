"""The training loop of `opo train`: rollout -> rewards -> loss -> optimizer, step after step.

Each step samples P prompts and G completions each, scores them, then optimises the
method's loss over that rollout for `trainer.epochs` passes of `trainer.mini_batches`
optimizer updates, with pi_old (the sampling policy) frozen for the whole step.
Run it with `opo train [overrides]`; `train(cfg, run_dir)` is the plain function under it.
Under torchrun it is one run on several processes (`opo_cli.parallel`): each rank samples its
share of the step's groups, the gradient is the global batch's, rank 0 alone writes files.
"""

from __future__ import annotations

import inspect
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from opo_cli import distributed
from opo_cli.backends import Backend, BackendOptions, open_backend
from opo_cli.batching import micro_batches, micro_logps
from opo_cli.checkpoint import (
    is_sharded,
    load_trainer_state,
    rank_rng,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from opo_cli.completions import PromptMatcher
from opo_cli.config import TrainSettings, validate_eval, validate_lora, validate_train
from opo_cli.data import Problem, PromptSampler, formatted_problems, load_problems
from opo_cli.errors import UserError, first_line
from opo_cli.evaluate import check_held_out, held_out_metrics
from opo_cli.lora import AdapterOff, add_adapter, save_final
from opo_cli.losses import ROW_SEPARABLE, LossInputs, get_loss
from opo_cli.models import load_policy, pick_device, pick_dtype, tiny_model_dir
from opo_cli.parallel import (
    GlobalBatch,
    full_state,
    full_weights,
    grad_norm,
    grad_sync,
    load_sharded,
    padded_parts,
    resolve_strategy,
    shard,
    trainee,
)
from opo_cli.rewards import Reward, RewardError
from opo_cli.rollout import Rollout, probed_reward, sample_batch
from opo_cli.runs import list_checkpoints, set_aside_previous_run
from opo_cli.sampling import keeps_sampling_logps
from opo_cli.stopping import BadStepCounter, Diverged, Interrupted, SignalStop
from opo_cli.tracking import PLAIN, SilentTracker, Tracker, console, warn_damaged


@dataclass
class Policy:
    model: torch.nn.Module  # with LoRA: the model with the adapter's layers in it
    tok: object
    ref: torch.nn.Module | AdapterOff | None  # frozen reference, only when the method uses one
    adapter: torch.nn.Module | None = None  # with LoRA: PEFT's wrapper of `model` (what is saved)
    backend: Backend | None = None  # the sampler (train opens it); None: rollout.backend per call
    trainee: torch.nn.Module | None = None  # what training forwards run through: DDP's wrapper
    strategy: str = "single"  # single (one process), ddp or fsdp2 (opo_cli.parallel)


RANK_SEED_STRIDE = 100_003  # rank r samples with seed + r * stride: its own draws


def seed_everything(seed: int) -> None:
    """Seed this rank's sampling: `seed` on rank 0 (and in a single process)."""
    seed += distributed.from_env().rank * RANK_SEED_STRIDE
    random.seed(seed)
    torch.manual_seed(seed)


def distribute(policy: Policy, strategy: str, device) -> Policy:
    """The policy ready for `strategy`: FSDP2 shards it (and a reference model) in place,
    filling the shards of ranks that loaded no weights from rank 0's; DDP wraps it for the
    training forwards (and broadcasts rank 0's weights)."""
    if strategy == "fsdp2":
        shard(policy.model, device)
        if isinstance(policy.ref, torch.nn.Module):
            shard(policy.ref, device)
    policy.trainee = trainee(policy.model, strategy)
    policy.strategy = strategy
    return policy


def initial_model_path(cfg: DictConfig, problems: list[Problem]) -> str:
    """The model a fresh run starts from: the configured one, or the cached tiny model."""
    if cfg.model.name_or_path:
        return str(cfg.model.name_or_path)
    return str(tiny_model_dir(cfg.model, cfg.dataset, problems))


def load_models(
    cfg: DictConfig, start: str, initial: str, device, dtype, weights: bool = True
) -> Policy:
    """The policy (and reference) from `start`; `weights=False`: built on the meta device."""
    trust = bool(cfg.model.trust_remote_code)
    lora = validate_lora(cfg)  # the base model loads, then the adapter (new, or saved in start)
    path = initial if lora else start
    load = {"device": device, "dtype": dtype, "trust_remote_code": trust, "weights": weights}
    model, tok = load_policy(path, **load)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora:
        adapter = add_adapter(model, lora, saved=None if start == initial else start)
        ref = AdapterOff(adapter) if cfg.method.reference else None
        return Policy(adapter.get_base_model(), tok, ref, adapter)
    ref = None
    if cfg.method.reference:
        ref, _ = load_policy(initial, **load)
        ref.eval().requires_grad_(False)
    return Policy(model, tok, ref)


@torch.no_grad()
def rollout_logps(
    model,
    rollout: Rollout,
    micro: int,
    temperature: float,
    with_entropy: bool,
    tokens: int | None = None,
):
    """Log-probs (and entropies) of every completion token, micro-batch by micro-batch.

    Micro-batches hold `micro` rows, or with a token budget `tokens`, as many rows as fit
    (`opo_cli.batching.micro_batches`).
    """
    logps, ents = [], []
    width = rollout.completion_len
    for part in micro_batches(rollout.attention_mask, width, rows=micro, tokens=tokens):
        lp, ent = micro_logps(
            model,
            rollout.input_ids,
            rollout.attention_mask,
            width,
            part,
            temperature=temperature,
            with_entropy=with_entropy,
        )
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)  # (N, Lc), (N, Lc)


def backward_minibatch(
    model,
    mb: Rollout,
    old,
    ref,
    loss_fn,
    loss_kwargs,
    micro,
    temperature,
    tokens=None,
    current=None,
    separable=False,
    trainee=None,
):
    """Loss of a whole mini-batch and its gradient, accumulated over micro-batches.

    The loss sees every row of the mini-batch at once (group statistics need whole groups),
    on several processes every rank's rows (`parallel.GlobalBatch`), and each rank's backward
    goes through its own rows only. With several micro-batches (`micro` rows, or as many as
    the token budget `tokens` fits), the gradient equals one big backward's, by one of two
    routes:
    - `separable` (the loss is in `losses.ROW_SEPARABLE`): each micro-batch's rows go into
      the loss live, the other rows held at pi_old; their values cannot reach this
      micro-batch's gradient, so the sum over micro-batches is exact. The loss and stats
      come from one more loss call on the micro-batches' log-probs, detached.
    - otherwise (gradient caching): the gradient w.r.t. the log-probs is taken first, from
      a no-grad forward, then pushed through each micro-batch's forward. `current`, the
      rows' log-probs under the weights as they are (known on a step's first update, where
      they are pi_old's), spares that forward.
    `trainee`, what the training forwards run through (DDP's wrapper; None: `model`),
    reduces the gradients over ranks once, in the last micro-batch's backward.
    """
    trainee = model if trainee is None else trainee

    def logps_of(part):
        ids, mask, width = mb.input_ids, mb.attention_mask, mb.completion_len
        return micro_logps(trainee, ids, mask, width, part, temperature=temperature)[0]

    parts = micro_batches(mb.attention_mask, mb.completion_len, rows=micro, tokens=tokens)
    if len(parts) == 1 and not distributed.active():
        x = LossInputs(logps_of(parts[0]), old, ref, mb.completion_mask, mb.rewards, mb.group_size)
        loss, stats = loss_fn(x, **loss_kwargs)
        loss.backward()
        return loss.item(), stats
    batch = GlobalBatch.gather(old, ref, mb.completion_mask, mb.rewards, mb.group_size)
    scale = float(distributed.from_env().world_size)  # DDP and FSDP2 average over ranks
    passes = padded_parts(parts, trainee)  # FSDP2: the same count of forwards on every rank
    live, grad = [], None
    if not separable:
        if current is None:
            with full_weights(model):
                current, _ = rollout_logps(model, mb, micro, temperature, False, tokens)
        leaf = batch.everyone(current).detach().requires_grad_()  # (N, W)
        loss, stats = loss_fn(batch.inputs(leaf), **loss_kwargs)
        (loss * scale).backward()
        grad = batch.mine(leaf.grad)  # (n, Lc) d loss / d this rank's log-probs
    for i, part in enumerate(passes):
        with grad_sync(trainee, sync=i == len(passes) - 1):
            if part is None:  # a pass that only keeps FSDP2's collectives in step
                logps = logps_of(parts[0])
                logps.backward(torch.zeros_like(logps))
            elif separable:
                logps = logps_of(part)  # (m, Lc)
                mine = old.index_put((part.rows,), logps)  # (n, Lc)
                (loss_fn(batch.inputs(batch.placed(mine)), **loss_kwargs)[0] * scale).backward()
                live.append(logps.detach())
            else:
                logps_of(part).backward(grad[part.rows])
    if separable:
        with torch.no_grad():  # parts in row order
            loss, stats = loss_fn(batch.inputs(batch.everyone(torch.cat(live))), **loss_kwargs)
    return loss.item(), stats


def pi_old(model, rollout: Rollout, s: TrainSettings, micro: int, tokens: int | None):
    """pi_old's log-probs and entropies (N, Lc) x 2, and the sampler's log-prob mismatch.

    hf and opo keep both while sampling when `rollout.reuse_sampling_logps` allows (no
    forward). vLLM keeps log-probs only: the trainer's forward runs for the entropies, and
    vLLM's log-probs are pi_old when reuse is allowed. Whenever both exist, the mismatch
    `rollout/logp_mismatch` (mean |sampler - trainer| over completion tokens) is returned.
    """
    kept, entropy = rollout.sampling_logps, rollout.sampling_entropy
    if kept is not None and entropy is not None:
        return kept, entropy, None
    temp = s.rollout.temperature
    old, entropy = rollout_logps(model, rollout, micro, temp, True, tokens)  # (N, Lc) x 2
    if kept is None:
        return old, entropy, None
    mask = rollout.completion_mask  # (N, Lc)
    mismatch = distributed.global_mean(((kept - old).abs() * mask).sum().item(), mask.sum().item())
    reuse = keeps_sampling_logps(s.rollout.reuse_sampling_logps, model)
    return (kept if reuse else old), entropy, mismatch


def optimise(policy: Policy, opt, sched, rollout: Rollout, s: TrainSettings, cfg, step: int):
    """The step's optimisation passes over one rollout; returns the mean of per-update stats."""
    t, model = s.trainer, policy.model
    micro, tokens = t.micro_batch_size or len(rollout), t.micro_batch_tokens
    temp = s.rollout.temperature
    with full_weights(model):
        old, entropy, mismatch = pi_old(model, rollout, s, micro, tokens)
    ref = None
    if policy.ref is not None:
        with full_weights(policy.ref):
            ref = rollout_logps(policy.ref, rollout, micro, temp, False, tokens)[0]
    loss_fn = get_loss(s.loss)
    loss_kwargs = OmegaConf.to_container(cfg.method.loss_kwargs, resolve=True)
    G = rollout.group_size
    order = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
    updates, skipped = [], 0
    model.train()
    for epoch in range(t.epochs):
        splits = torch.randperm(len(rollout) // G, generator=order).tensor_split(t.mini_batches)
        for i, groups in enumerate(splits):
            rows = (groups[:, None] * G + torch.arange(G)).flatten()  # (n,) whole groups
            on_policy = epoch == 0 and i == 0  # no update yet: the policy is still pi_old
            opt.zero_grad(set_to_none=True)
            mb_ref = ref[rows] if ref is not None else None
            loss, stats = backward_minibatch(
                model,
                rollout.rows(rows),
                old[rows],
                mb_ref,
                loss_fn,
                loss_kwargs,
                micro,
                temp,
                tokens,
                current=old[rows] if on_policy else None,
                separable=s.loss in ROW_SEPARABLE,
                trainee=policy.trainee,
            )
            norm = grad_norm(model.parameters(), t.max_grad_norm)  # global, every rank the same
            if torch.isfinite(torch.tensor([loss, norm])).all():
                opt.step()
                sched.step()
            else:
                skipped += 1
            updates.append({"train/loss": loss, "train/grad_norm": norm, **stats})
    opt.zero_grad(set_to_none=True)  # no gradient held through the next rollout's KV cache
    model.eval()
    mask = rollout.completion_mask
    stats = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
    stats["train/entropy"] = distributed.global_mean(
        (entropy * mask).sum().item(), mask.sum().item()
    )
    if mismatch is not None:
        stats["rollout/logp_mismatch"] = mismatch
    stats["train/skipped_updates"] = skipped
    stats["train/lr"] = sched.get_last_lr()[0]
    return stats


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def train_step(policy, opt, sched, sampler, problems, reward_fn, s: TrainSettings, cfg, step):
    """One step: sample a rollout, score it, optimise on it; returns the rollout (the
    completion logs read it) and the step's metrics row."""
    t0 = time.perf_counter()
    d = distributed.from_env()
    with full_weights(policy.model):  # FSDP2: gathered once, no collective while decoding
        rollout, sample_stats = sample_batch(
            policy.model,
            policy.tok,
            sampler,
            problems,
            reward_fn,
            s.rollout,
            policy.backend,
            share=(d.rank, d.world_size),
        )
    t1 = time.perf_counter()
    stats = optimise(policy, opt, sched, rollout, s, cfg, step)
    t2 = time.perf_counter()
    if policy.backend is not None:  # the sampler takes the new weights before the next rollout
        policy.backend.sync(policy.model)
    t3 = time.perf_counter()
    device = rollout.input_ids.device
    counts = [rollout.completion_mask.sum().item(), rollout.attention_mask.sum().item()]
    tokens = torch.tensor(counts, dtype=torch.float64, device=device)
    completion_tokens, train_tokens = distributed.all_reduce_sum(tokens).tolist()
    train_tokens *= s.trainer.epochs  # both over every rank
    return rollout, {
        **sample_stats,
        **stats,
        "perf/step_s": t3 - t0,
        "perf/rollout_s": t1 - t0,
        "perf/train_s": t2 - t1,
        "perf/sync_s": t3 - t2,
        "perf/rollout_tok_per_s": completion_tokens / (t1 - t0),
        "perf/train_tok_per_s": train_tokens / (t2 - t1),
        "perf/peak_mem_gb": peak_memory_gb(device),
    }


def open_run_backend(cfg, s: TrainSettings, initial: str, device, dtype) -> Backend:
    """The run's sampler, `rollout.backend` (a vLLM engine is built from `initial`)."""
    r = s.rollout
    options = BackendOptions(
        model_path=initial,
        dtype=dtype,
        device=device,
        trust_remote_code=bool(cfg.model.trust_remote_code),
        cache_implementation=r.cache_implementation,
        share_prefill=r.share_prefill,
        temperature=r.temperature,
        top_p=r.top_p,
        vllm=r.vllm,
    )
    return open_backend(r.backend, options)


def make_optimizer(model, s: TrainSettings):
    t = s.trainer
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    warmup = t.warmup_updates
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: min(1.0, (n + 1) / (warmup + 1)))
    return opt, sched


@dataclass
class RunState:
    """What a step changes, and the last finished step; a checkpoint holds all of it."""

    policy: Policy
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    sampler: PromptSampler
    step: int


def fresh_state(
    cfg, s: TrainSettings, start: str, initial: str, device, dtype, n: int, strategy: str
):
    """Policy loaded from `start` and set up for `strategy`, new optimizer and sampler over
    `n` problems, step 0. A rank that cannot load the model stops every rank."""
    weights = strategy != "fsdp2" or distributed.from_env().is_main  # FSDP2: rank 0 reads
    policy = distributed.agreed(load_models, cfg, start, initial, device, dtype, weights)
    distribute(policy, strategy, device)
    opt, sched = make_optimizer(policy.model, s)
    seed_everything(s.seed)  # after loading: model construction may draw random numbers
    return RunState(policy, opt, sched, PromptSampler(n, s.seed), 0)


class StrategyMismatch(UserError):
    """A checkpoint written under another `trainer.strategy` (sharded or not)."""


def resumed_state(
    folder: Path, cfg, s: TrainSettings, initial: str, device, dtype, n: int, strategy: str
):
    """The state saved in checkpoint `folder`; a damaged file raises (of any type).

    FSDP2 checkpoints hold the model and optimizer as shards (`parallel.load_sharded`, which
    reshards them to any world size and strategy), the others as a model folder and
    `optimizer.pt`. Each rank takes its own saved RNG state; at another world size the ranks
    are reseeded (the sampler state is the same anyway)."""
    sharded = is_sharded(folder)
    if strategy == "fsdp2" and not sharded:
        raise StrategyMismatch(
            f"checkpoint {folder} was written by one process or under DDP: resume it with "
            "trainer.strategy=ddp, or set trainer.resume=never to start over"
        )
    state = fresh_state(
        cfg, s, initial if sharded else str(folder), initial, device, dtype, n, strategy
    )
    saved, optim = distributed.agreed(load_trainer_state, folder)
    if sharded:
        load_sharded(folder, state.policy.model, state.opt)
    else:
        state.opt.load_state_dict(optim["optimizer"])
    state.sched.load_state_dict(optim["scheduler"])
    state.sampler.load_state_dict(saved["sampler"])
    d = distributed.from_env()
    rng = rank_rng(saved, d.rank, d.world_size)
    if rng is None:
        seed_everything(s.seed + int(saved["step"]))
        console.print(f"note: {folder} was saved at another world size: ranks reseeded", **PLAIN)
    else:
        set_rng_state(rng)
    state.step = int(saved["step"])
    return state


def start_state(
    cfg, s: TrainSettings, run_dir: Path, initial: str, device, dtype, n: int, strategy: str
):
    """The newest readable checkpoint's state (`trainer.resume=auto`), else a fresh start.

    A damaged checkpoint (a cut-off or corrupt file) is skipped with a one-line warning for
    the one before it; when every one is damaged the run stops rather than start over.
    `trainer.resume=never` first moves an earlier run's outputs aside (`set_aside_previous_run`).
    """
    main = distributed.from_env().is_main
    if main and s.trainer.resume == "never" and (aside := set_aside_previous_run(run_dir)):
        console.print(f"trainer.resume=never: the earlier run's outputs moved to {aside}", **PLAIN)
    distributed.barrier()  # every rank sees the folder as rank 0 left it
    checkpoints = list_checkpoints(run_dir) if s.trainer.resume == "auto" else []
    for folder in checkpoints:
        try:
            state = resumed_state(folder, cfg, s, initial, device, dtype, n, strategy)
        except StrategyMismatch:
            raise
        except Exception as e:  # safetensors, zip, pickle and OS errors alike: unusable
            warn_damaged(folder, e)
            continue
        console.print(f"resuming from {folder} (step {state.step})", **PLAIN)
        return state
    if checkpoints:
        raise UserError(
            f"trainer.resume=auto: no readable checkpoint in {run_dir / 'checkpoints'}; "
            "set trainer.resume=never to start over"
        )
    return fresh_state(cfg, s, initial, initial, device, dtype, n, strategy)


def save_state(run_dir: Path, state: RunState, s: TrainSettings) -> Path:
    """A checkpoint of `state` (every rank calls it)."""
    return save_checkpoint(
        run_dir,
        state.step,
        model=state.policy.model if state.policy.adapter is None else state.policy.adapter,
        tok=state.policy.tok,
        optimizer=state.opt,
        scheduler=state.sched,
        trainer_state={"sampler": state.sampler.state_dict()},
        keep_last=s.trainer.keep_last,
        sharded=state.policy.strategy == "fsdp2",
    )


def save_final_model(folder: Path, policy: Policy) -> None:
    """`final/` in HF format, from rank 0; FSDP2 first gathers the full weights there."""
    full = full_state(policy.model)  # a collective under FSDP2
    if distributed.from_env().is_main:
        if full is None:
            save_final(folder, model=policy.model, tok=policy.tok, adapter=policy.adapter)
        else:
            policy.model.save_pretrained(folder, state_dict=full, safe_serialization=True)
            policy.tok.save_pretrained(folder)
    distributed.barrier()


def guarded_step(
    run_dir: Path, state: RunState, problems, reward_fn: Reward, s: TrainSettings, cfg, step: int
) -> tuple[Rollout, dict]:
    """`train_step` (its rollout and metrics row), or when the reward fails (raises, returns
    garbage, runs past `dataset.reward_timeout_s`) on any rank, a checkpoint of the state
    before the step and a one-line `RewardError`: the same command resumes at this step once
    the reward is fixed."""
    rng, position = rng_state(), state.sampler.state_dict()
    try:
        p = state.policy
        return train_step(
            p, state.opt, state.sched, state.sampler, problems, reward_fn, s, cfg, step
        )
    except RewardError as e:
        set_rng_state(rng)  # the step's draws never happened: a resume replays them
        state.sampler.load_state_dict(position)
        saved = save_state(run_dir, state, s)
        raise RewardError(
            f"{e}; stopped at step {step} with checkpoint {saved}: "
            "fix the reward and run the same command again to resume"
        ) from e


def is_save_step(step: int, t) -> bool:
    """The last step, and every `trainer.save_every`-th one."""
    return step == t.steps or (t.save_every > 0 and step % t.save_every == 0)


def stop_early(state: RunState, s: TrainSettings, stop: SignalStop, diverged: bool, saved: Path):
    """Raise `Interrupted` after a signal, `Diverged` after max_bad_steps bad steps in a row."""
    t = s.trainer
    if diverged:
        raise Diverged(
            f"trainer.max_bad_steps={t.max_bad_steps}: every update of the last "
            f"{t.max_bad_steps} steps had a non-finite loss or gradient; stopped after step "
            f"{state.step} with checkpoint {saved} (a lower trainer.lr may help)"
        )
    if stop.signum is not None and state.step < t.steps:
        raise Interrupted(
            f"interrupted by {stop.name} after step {state.step}/{t.steps}; checkpoint "
            f"{saved}; run the same command again to resume",
            stop.exit_code,
        )


def inert_mu_note(s: TrainSettings) -> str | None:
    """The console note for a run whose loss takes `mu` but gets one update per rollout:
    that update is at pi = pi_old (Delta = 0), where the mu term has no gradient."""
    updates = s.trainer.epochs * s.trainer.mini_batches
    if updates > 1 or "mu" not in inspect.signature(get_loss(s.loss)).parameters:
        return None
    return (
        "note: trainer.epochs x trainer.mini_batches = 1 update per rollout, made at "
        "pi = pi_old: mu has no effect (trainer.mini_batches=2 lets it act)"
    )


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run (or resume) one training run in `run_dir`; returns the last metrics row.

    SIGINT/SIGTERM end the current step, write a checkpoint and raise `Interrupted`;
    `trainer.max_bad_steps` steps in a row with only skipped updates raise `Diverged`.
    Under torchrun every rank runs this, in one process group (`opo_cli.distributed`) that
    lives until the process exits: one made again after `destroy_process_group` hangs.
    """
    s = validate_train(cfg)
    ev = validate_eval(cfg)
    d, rank_device = distributed.setup(s.trainer.device, s.trainer.dist_timeout_s)
    console.quiet = not d.is_main  # one console: rank 0's
    try:
        return train_run(cfg, run_dir, s, ev, rank_device)
    except Exception as e:
        if not (d.enabled and distributed.lost_ranks(e)):
            raise
        raise UserError(
            f"rank {d.rank}: the other ranks did not answer within trainer.dist_timeout_s="
            f"{s.trainer.dist_timeout_s:g}s or are gone (one failed or hangs; its error is "
            f"above): {first_line(e)}"
        ) from None


def main_first(fn, *args):
    """`fn(*args)` on rank 0, then on the others (a cache rank 0 fills and the others read);
    a failure on any rank stops every rank (`distributed.agreed`)."""
    main = distributed.from_env().is_main
    first = distributed.agreed(fn if main else lambda *_: None, *args)
    return distributed.agreed((lambda *_: first) if main else fn, *args)


def train_run(cfg, run_dir: Path, s: TrainSettings, ev, rank_device) -> dict:
    """`train` on this process, once the process group (if any) is up."""
    run_dir.mkdir(parents=True, exist_ok=True)
    device = rank_device or pick_device(s.trainer.device)
    dtype = pick_dtype(s.trainer.dtype, device)
    strategy = resolve_strategy(s.trainer.strategy, distributed.from_env().world_size)
    problems, held_out = load_problems(cfg.dataset)
    check_held_out(ev, held_out)
    reward_fn = probed_reward(cfg.dataset, problems)
    if note := inert_mu_note(s):
        console.print(note, **PLAIN)
    initial = main_first(initial_model_path, cfg, problems)
    state = start_state(cfg, s, run_dir, initial, device, dtype, len(problems), strategy)
    policy = state.policy
    problems = formatted_problems(problems, policy.tok, cfg.dataset)  # as the policy sees them
    prompts = PromptMatcher(problems, state.sampler, policy.tok)  # the logged completions' problems
    tracker = (
        Tracker(cfg, run_dir, start_step=state.step, total_steps=s.trainer.steps, prompts=prompts)
        if distributed.from_env().is_main
        else SilentTracker()
    )
    bad_steps = BadStepCounter(s.trainer.max_bad_steps)
    updates_per_step = s.trainer.epochs * s.trainer.mini_batches
    row = {}
    with SignalStop() as stop:
        try:
            policy.backend = open_run_backend(cfg, s, initial, device, dtype)
            policy.backend.sync(policy.model)  # a resumed run's weights, not the initial ones
            for step in range(state.step + 1, s.trainer.steps + 1):
                rollout, row = guarded_step(run_dir, state, problems, reward_fn, s, cfg, step)
                if ev.every and step % ev.every == 0:
                    with full_weights(policy.model):  # the ranks share the problems
                        row |= held_out_metrics(
                            policy.model,
                            policy.tok,
                            held_out,
                            cfg.dataset,
                            ev,
                            backend=policy.backend,
                            on_graded=tracker.eval_answers,
                            ranks=distributed.from_env(),
                        )
                tracker.log(step, row, rollout)
                state.step = step
                diverged = bad_steps.update(row["train/skipped_updates"], updates_per_step)
                stop.signum = distributed.agreed_signal(stop.signum)  # one rank's signal stops all
                if diverged or stop.signum or is_save_step(step, s.trainer):
                    stop_early(state, s, stop, diverged, save_state(run_dir, state, s))
        finally:
            tracker.close()
            if policy.backend is not None:
                policy.backend.close()
        save_final_model(run_dir / "final", policy)
    console.print(f"done: {run_dir / 'final'}")
    return row
