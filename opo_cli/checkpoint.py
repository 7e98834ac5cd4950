"""Checkpoints: `checkpoints/step_N/` (model, tokenizer, optimizer, scheduler, RNG, data state).

Each is written into a temporary folder and renamed into place, so a `step_N/` folder is
complete or absent; only the newest `keep_last` are kept. Model weights are safetensors,
and trainer state loads with `weights_only=True` (no pickled code).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

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
) -> Path:
    """Write `checkpoints/step_<step>/` atomically and prune all but the newest `keep_last`."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # safetensors: the only format transformers 5 writes
    tok.save_pretrained(tmp)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        tmp / "optimizer.pt",
    )
    torch.save({"step": step, "rng": rng_state(), **trainer_state}, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(folder: Path) -> tuple[dict, dict]:
    """(trainer state, optimizer + scheduler state) of a checkpoint folder."""
    state = torch.load(folder / STATE_FILE, weights_only=True)
    optim = torch.load(folder / "optimizer.pt", weights_only=True)
    return state, optim
