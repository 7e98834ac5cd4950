"""The training loop of `opo train`: rollout -> rewards -> loss -> optimizer, step after step.

Each step samples P prompts and G completions each, scores them, then optimises the
method's loss over that rollout for `trainer.epochs` passes of `trainer.mini_batches`
optimizer updates, with pi_old (the sampling policy) frozen for the whole step.
Run it with `opo train [overrides]`; `train(cfg, run_dir)` is the plain function under it.
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

from opo_cli.backends import Backend, BackendOptions, open_backend
from opo_cli.batching import micro_batches, micro_logps
from opo_cli.checkpoint import load_trainer_state, rng_state, save_checkpoint, set_rng_state
from opo_cli.completions import PromptMatcher
from opo_cli.config import TrainSettings, validate_eval, validate_lora, validate_train
from opo_cli.data import Problem, PromptSampler, formatted_problems, load_problems
from opo_cli.errors import UserError
from opo_cli.evaluate import check_held_out, held_out_metrics
from opo_cli.lora import AdapterOff, add_adapter, save_final
from opo_cli.losses import ROW_SEPARABLE, LossInputs, get_loss
from opo_cli.models import load_policy, pick_device, pick_dtype, tiny_model_dir
from opo_cli.rewards import Reward, RewardError
from opo_cli.rollout import Rollout, probed_reward, sample_batch
from opo_cli.runs import list_checkpoints, set_aside_previous_run
from opo_cli.sampling import keeps_sampling_logps
from opo_cli.stopping import BadStepCounter, Diverged, Interrupted, SignalStop
from opo_cli.tracking import PLAIN, Tracker, console, warn_damaged


@dataclass
class Policy:
    model: torch.nn.Module  # with LoRA: the model with the adapter's layers in it
    tok: object
    ref: torch.nn.Module | AdapterOff | None  # frozen reference, only when the method uses one
    adapter: torch.nn.Module | None = None  # with LoRA: PEFT's wrapper of `model` (what is saved)
    backend: Backend | None = None  # the sampler (train opens it); None: rollout.backend per call


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def initial_model_path(cfg: DictConfig, problems: list[Problem]) -> str:
    """The model a fresh run starts from: the configured one, or the cached tiny model."""
    if cfg.model.name_or_path:
        return str(cfg.model.name_or_path)
    return str(tiny_model_dir(cfg.model, cfg.dataset, problems))


def load_models(cfg: DictConfig, start: str, initial: str, device, dtype) -> Policy:
    trust = bool(cfg.model.trust_remote_code)
    lora = validate_lora(cfg)  # the base model loads, then the adapter (new, or saved in start)
    path = initial if lora else start
    model, tok = load_policy(path, device=device, dtype=dtype, trust_remote_code=trust)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora:
        adapter = add_adapter(model, lora, saved=None if start == initial else start)
        ref = AdapterOff(adapter) if cfg.method.reference else None
        return Policy(adapter.get_base_model(), tok, ref, adapter)
    ref = None
    if cfg.method.reference:
        ref, _ = load_policy(initial, device=device, dtype=dtype, trust_remote_code=trust)
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
):
    """Loss of a whole mini-batch and its gradient, accumulated over micro-batches.

    The loss sees every row of the mini-batch at once (group statistics need whole groups).
    With several micro-batches (`micro` rows, or as many as the token budget `tokens` fits),
    the gradient equals one big backward's, by one of two routes:
    - `separable` (the loss is in `losses.ROW_SEPARABLE`): each micro-batch's rows go into
      the loss live, the other rows held at pi_old; their values cannot reach this
      micro-batch's gradient, so the sum over micro-batches is exact. The loss and stats
      come from one more loss call on the micro-batches' log-probs, detached.
    - otherwise (gradient caching): the gradient w.r.t. the log-probs is taken first, from
      a no-grad forward, then pushed through each micro-batch's forward. `current`, the
      rows' log-probs under the weights as they are (known on a step's first update, where
      they are pi_old's), spares that forward.
    """

    def inputs(logps):
        return LossInputs(logps, old, ref, mb.completion_mask, mb.rewards, mb.group_size)

    def logps_of(part):
        ids, mask, width = mb.input_ids, mb.attention_mask, mb.completion_len
        return micro_logps(model, ids, mask, width, part, temperature=temperature)[0]

    parts = micro_batches(mb.attention_mask, mb.completion_len, rows=micro, tokens=tokens)
    if len(parts) == 1:
        loss, stats = loss_fn(inputs(logps_of(parts[0])), **loss_kwargs)
        loss.backward()
        return loss.item(), stats
    if separable:
        live = []
        for part in parts:
            logps = logps_of(part)  # (m, Lc)
            loss_fn(inputs(old.index_put((part.rows,), logps)), **loss_kwargs)[0].backward()
            live.append(logps.detach())
        with torch.no_grad():
            loss, stats = loss_fn(inputs(torch.cat(live)), **loss_kwargs)  # parts in row order
        return loss.item(), stats
    if current is None:
        current, _ = rollout_logps(model, mb, micro, temperature, False, tokens)
    leaf = current.detach().clone().requires_grad_()  # (n, Lc)
    loss, stats = loss_fn(inputs(leaf), **loss_kwargs)
    loss.backward()
    for part in parts:
        logps_of(part).backward(leaf.grad[part.rows])
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
    mismatch = ((kept - old).abs() * mask).sum() / mask.sum().clamp(min=1.0)
    reuse = keeps_sampling_logps(s.rollout.reuse_sampling_logps, model)
    return (kept if reuse else old), entropy, mismatch.item()


def optimise(policy: Policy, opt, sched, rollout: Rollout, s: TrainSettings, cfg, step: int):
    """The step's optimisation passes over one rollout; returns the mean of per-update stats."""
    t, model = s.trainer, policy.model
    micro, tokens = t.micro_batch_size or len(rollout), t.micro_batch_tokens
    temp = s.rollout.temperature
    old, entropy, mismatch = pi_old(model, rollout, s, micro, tokens)
    ref = rollout_logps(policy.ref, rollout, micro, temp, False, tokens)[0] if policy.ref else None
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
            )
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm).item()
            if torch.isfinite(torch.tensor([loss, grad_norm])).all():
                opt.step()
                sched.step()
            else:
                skipped += 1
            updates.append({"train/loss": loss, "train/grad_norm": grad_norm, **stats})
    opt.zero_grad(set_to_none=True)  # no gradient held through the next rollout's KV cache
    model.eval()
    mask = rollout.completion_mask
    stats = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
    stats["train/entropy"] = ((entropy * mask).sum() / mask.sum().clamp(min=1.0)).item()
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
    rollout, sample_stats = sample_batch(
        policy.model, policy.tok, sampler, problems, reward_fn, s.rollout, policy.backend
    )
    t1 = time.perf_counter()
    stats = optimise(policy, opt, sched, rollout, s, cfg, step)
    t2 = time.perf_counter()
    if policy.backend is not None:  # the sampler takes the new weights before the next rollout
        policy.backend.sync(policy.model)
    t3 = time.perf_counter()
    device = rollout.input_ids.device
    completion_tokens = rollout.completion_mask.sum().item()
    train_tokens = rollout.attention_mask.sum().item() * s.trainer.epochs
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


def fresh_state(cfg, s: TrainSettings, start: str, initial: str, device, dtype, n: int):
    """Policy loaded from `start`, new optimizer and sampler over `n` problems, step 0."""
    policy = load_models(cfg, start, initial, device, dtype)
    opt, sched = make_optimizer(policy.model, s)
    seed_everything(s.seed)  # after loading: model construction may draw random numbers
    return RunState(policy, opt, sched, PromptSampler(n, s.seed), 0)


def resumed_state(folder: Path, cfg, s: TrainSettings, initial: str, device, dtype, n: int):
    """The state saved in checkpoint `folder`; a damaged file raises (of any type)."""
    state = fresh_state(cfg, s, str(folder), initial, device, dtype, n)
    saved, optim = load_trainer_state(folder)
    state.opt.load_state_dict(optim["optimizer"])
    state.sched.load_state_dict(optim["scheduler"])
    state.sampler.load_state_dict(saved["sampler"])
    set_rng_state(saved["rng"])
    state.step = int(saved["step"])
    return state


def start_state(cfg, s: TrainSettings, run_dir: Path, initial: str, device, dtype, n: int):
    """The newest readable checkpoint's state (`trainer.resume=auto`), else a fresh start.

    A damaged checkpoint (a cut-off or corrupt file) is skipped with a one-line warning for
    the one before it; when every one is damaged the run stops rather than start over.
    `trainer.resume=never` first moves an earlier run's outputs aside (`set_aside_previous_run`).
    """
    if s.trainer.resume == "never" and (aside := set_aside_previous_run(run_dir)):
        console.print(f"trainer.resume=never: the earlier run's outputs moved to {aside}", **PLAIN)
    checkpoints = list_checkpoints(run_dir) if s.trainer.resume == "auto" else []
    for folder in checkpoints:
        try:
            state = resumed_state(folder, cfg, s, initial, device, dtype, n)
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
    return fresh_state(cfg, s, initial, initial, device, dtype, n)


def save_state(run_dir: Path, state: RunState, s: TrainSettings) -> Path:
    return save_checkpoint(
        run_dir,
        state.step,
        model=state.policy.model if state.policy.adapter is None else state.policy.adapter,
        tok=state.policy.tok,
        optimizer=state.opt,
        scheduler=state.sched,
        trainer_state={"sampler": state.sampler.state_dict()},
        keep_last=s.trainer.keep_last,
    )


def guarded_step(
    run_dir: Path, state: RunState, problems, reward_fn: Reward, s: TrainSettings, cfg, step: int
) -> tuple[Rollout, dict]:
    """`train_step` (its rollout and metrics row), or when the reward fails (raises, returns
    garbage, runs past `dataset.reward_timeout_s`), a checkpoint of the state before the step
    and a one-line `RewardError`: the same command resumes at this step once the reward is
    fixed."""
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
    """
    s = validate_train(cfg)
    ev = validate_eval(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(s.trainer.device)
    dtype = pick_dtype(s.trainer.dtype, device)
    problems, held_out = load_problems(cfg.dataset)
    check_held_out(ev, held_out)
    reward_fn = probed_reward(cfg.dataset, problems)
    if note := inert_mu_note(s):
        console.print(note, **PLAIN)
    initial = initial_model_path(cfg, problems)
    state = start_state(cfg, s, run_dir, initial, device, dtype, len(problems))
    policy = state.policy
    problems = formatted_problems(problems, policy.tok, cfg.dataset)  # as the policy sees them
    prompts = PromptMatcher(problems, state.sampler, policy.tok)  # the logged completions' problems
    tracker = Tracker(
        cfg, run_dir, start_step=state.step, total_steps=s.trainer.steps, prompts=prompts
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
                    row |= held_out_metrics(
                        policy.model,
                        policy.tok,
                        held_out,
                        cfg.dataset,
                        ev,
                        backend=policy.backend,
                        on_graded=tracker.eval_answers,
                    )
                tracker.log(step, row, rollout)
                state.step = step
                diverged = bad_steps.update(row["train/skipped_updates"], updates_per_step)
                if diverged or stop.signum or is_save_step(step, s.trainer):
                    stop_early(state, s, stop, diverged, save_state(run_dir, state, s))
        finally:
            tracker.close()
            if policy.backend is not None:
                policy.backend.close()
        save_final(run_dir / "final", model=policy.model, tok=policy.tok, adapter=policy.adapter)
    console.print(f"done: {run_dir / 'final'}")
    return row
