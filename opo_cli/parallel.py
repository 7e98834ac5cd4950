"""Training on several processes: the policy under DDP or sharded by FSDP2, the global
mini-batch every rank's loss sees, and checkpoints of sharded state.

torchrun --standalone --nproc_per_node=2 --no-python opo train trainer.strategy=fsdp2

The gradient of a step equals the single-process gradient on the global batch for every
loss, coupled ones included (opo_code's batch-level tau, DPO's pairs): each rank gathers the
mini-batch's log-probs, rewards and masks of all ranks (`GlobalBatch`, (N, Lc) floats, small
beside a gradient), evaluates the *global* loss and back-propagates only through its own rows.
Summed over ranks that is the full gradient; DDP and FSDP2 average over ranks, so the loss
is scaled by the world size. Micro-batches accumulate without communication (`grad_sync`);
the last one's backward carries the one all-reduce (reduce-scatter under FSDP2) of the update.

FSDP2 (`fully_shard` on each decoder layer, then the root) gathers its parameters in every
forward, a collective: ranks must run the same forwards. So no-grad passes (generation,
pi_old and reference log-probs) run inside `full_weights` (gathered once, no collectives
inside, ranks may decode different lengths), and the micro-batch passes that train are
padded to the same count on every rank (`padded_parts`). Ranks other than 0 may build the
model on the meta device: `shard` fills their shards from rank 0's weights.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from opo_cli import distributed
from opo_cli.losses import LossInputs


def resolve_strategy(name: str, world_size: int) -> str:
    """`single` at world size 1; `auto` is DDP."""
    if world_size == 1:
        return "single"
    return "ddp" if name == "auto" else name


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules HF says never to split (`_no_split_modules`: the decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model: torch.nn.Module, device: torch.device | None = None) -> torch.nn.Module:
    """FSDP2 in place: each decoder layer its own unit, the rest (embeddings, head) the root's.

    When the model is on the meta device on some ranks (all but rank 0 load no weights:
    `models.load_policy(weights=False)`), those ranks allocate their shards on `device` and
    every rank's shards are filled from rank 0's weights, its buffers broadcast as they are.
    """
    empty = distributed.any_true(is_meta(model))
    full = model.state_dict() if empty and dist.get_rank() == 0 else None  # before sharding
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    if empty:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if is_meta(model):
            model.to_empty(device=device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full or {}, options=options)
        for buffer in model.buffers():  # not in a state dict when non-persistent (RoPE's)
            dist.broadcast(buffer, src=0)
    return model


def is_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def trainee(model: torch.nn.Module, strategy: str) -> torch.nn.Module:
    """What the training forwards go through: the DDP wrapper under `ddp`, else the model.
    Buffers are not broadcast in forward (that would be a collective in every forward)."""
    if strategy != "ddp":
        return model
    known = inspect.signature(DistributedDataParallel).parameters  # the name changed in 2.13
    off = "forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers"
    return DistributedDataParallel(model, **{off: False})


def fsdp_units(model) -> list[FSDPModule]:
    if not isinstance(model, torch.nn.Module):
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_weights(model):
    """FSDP2: every parameter gathered once on entry and resharded on exit, so that forwards
    inside (generation, no-grad log-probs) run no collective. Anything else: no-op."""
    units = fsdp_units(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            if unit is not model:
                unit.set_reshard_after_forward(True, recurse=False)


def grad_sync(model, sync: bool):
    """A backward that accumulates gradients locally (`sync=False`) or reduces them over
    ranks (`sync=True`, the update's last micro-batch)."""
    if isinstance(model, DistributedDataParallel):
        return nullcontext() if sync else model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def padded_parts(parts: list, model) -> list:
    """FSDP2: the micro-batches, then `None` (a pass that adds a zero gradient) until every
    rank has as many as the rank with the most. Other models: `parts` unchanged."""
    if not isinstance(model, FSDPModule):
        return parts
    most = max(distributed.gather_objects(len(parts)))
    return parts + [None] * (most - len(parts))


def grad_norm(parameters, max_norm: float) -> float:
    """Clip and return the global gradient norm before clipping (a DTensor's full value)."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


@dataclass
class GlobalBatch:
    """A mini-batch as the loss sees it: every rank's rows in rank order, padded to the widest
    rank's completions; this rank's are rows `start : start + count`, columns `: width`."""

    old: Tensor  # (N, W) pi_old log-probs
    ref: Tensor | None  # (N, W) reference log-probs
    mask: Tensor  # (N, W) completion mask, 0 on every padding column
    rewards: Tensor  # (N,)
    group_size: int
    start: int
    count: int
    width: int

    @classmethod
    def gather(cls, old, ref, mask, rewards, group_size: int) -> GlobalBatch:
        refs = [] if ref is None else [ref]
        (old_all, mask_all, rewards_all, *ref_all), start = distributed.cat_rows(
            old, mask, rewards, *refs
        )
        ref_all = ref_all[0] if ref_all else None
        count, width = old.shape
        return cls(old_all, ref_all, mask_all, rewards_all, group_size, start, count, width)

    def inputs(self, logps: Tensor) -> LossInputs:
        return LossInputs(logps, self.old, self.ref, self.mask, self.rewards, self.group_size)

    def placed(self, local: Tensor) -> Tensor:
        """pi_old's rows everywhere but this rank's, which are `local` ((count, width))."""
        rows = torch.arange(self.start, self.start + self.count, device=local.device)
        wide = torch.nn.functional.pad(local, (0, self.old.shape[1] - self.width))
        return self.old.index_put((rows,), wide)  # (N, W)

    def everyone(self, local: Tensor) -> Tensor:
        """Every rank's `local` rows ((count, width) each), concatenated: (N, W)."""
        return distributed.cat_rows(local)[0][0]

    def mine(self, full: Tensor) -> Tensor:
        """This rank's rows of an (N, W) tensor: (count, width)."""
        return full[self.start : self.start + self.count, : self.width]


# ------------------------------------------------------------------ sharded checkpoints

SHARDS_DIR = "shards"  # the checkpoint's torch.distributed.checkpoint folder (FSDP2)


def save_sharded(folder: Path, model, optimizer) -> None:
    """Every rank writes its shards of the model and optimizer state into `folder/shards`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder / SHARDS_DIR)


def load_sharded(folder: Path, model, optimizer) -> None:
    """The model and optimizer state of `folder/shards`, resharded onto this run's ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=folder / SHARDS_DIR)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def full_state(model) -> dict | None:
    """FSDP2: the full state dict on rank 0 (CPU), None elsewhere; other models: None."""
    if not isinstance(model, FSDPModule):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return state if dist.get_rank() == 0 else None
