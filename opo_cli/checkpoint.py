"""Checkpoints: `checkpoints/step_N/` (model, tokenizer, optimizer, scheduler, RNG, data state).

Each is written into a temporary folder and renamed into place, so a `step_N/` folder is
complete or absent; only the newest `keep_last` are kept. Model weights are safetensors,
and trainer state loads with `weights_only=True` (no pickled code).

On several processes every rank calls `save_checkpoint`: rank 0 writes the files, the RNG
state of every rank goes in (`rng_ranks`), and with FSDP2 (`sharded`) every rank writes its
shards of the model and optimizer through `torch.distributed.checkpoint` (`shards/`).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

from opo_cli import distributed
from opo_cli.parallel import SHARDS_DIR, save_sharded
from opo_cli.runs import STATE_FILE, list_checkpoints


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model,
    tok,
    optimizer,
    scheduler,
    trainer_state: dict,
    keep_last: int,
    sharded: bool = False,
) -> Path:
    """Write `checkpoints/step_<step>/` atomically and prune all but the newest `keep_last`.

    Called on every rank; `sharded`: the model and optimizer state as FSDP2 shards."""
    root = run_dir / "checkpoints"
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    main = distributed.from_env().is_main
    rngs = distributed.gather_objects(rng_state())
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    if sharded:
        save_sharded(tmp, model, optimizer)
    if main:
        if sharded:
            model.config.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)  # safetensors: the only format transformers 5 writes
        tok.save_pretrained(tmp)
        optim = {"scheduler": scheduler.state_dict()}
        if not sharded:
            optim["optimizer"] = optimizer.state_dict()
        torch.save(optim, tmp / "optimizer.pt")
        state = {"step": step, "rng": rngs[0], "rng_ranks": rngs, **trainer_state}
        torch.save(state, tmp / STATE_FILE)
    distributed.barrier()
    if main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def is_sharded(folder: Path) -> bool:
    return (folder / SHARDS_DIR).is_dir()


def rank_rng(saved: dict, rank: int, world_size: int) -> dict | None:
    """This rank's saved RNG state; None when the checkpoint was written at another world
    size (the ranks' draws cannot be replayed: the caller reseeds)."""
    ranks = saved.get("rng_ranks", [saved["rng"]])
    return ranks[rank] if len(ranks) == world_size else None


def load_trainer_state(folder: Path) -> tuple[dict, dict]:
    """(trainer state, optimizer + scheduler state) of a checkpoint folder."""
    state = torch.load(folder / STATE_FILE, weights_only=True)
    optim = torch.load(folder / "optimizer.pt", weights_only=True)
    return state, optim
