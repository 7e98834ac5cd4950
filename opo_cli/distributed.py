"""One run on several processes: torchrun's (or SLURM's) environment, the process group, and
agreement across ranks, on PyTorch's own `torch.distributed`.

torchrun --standalone --nproc_per_node=2 --no-python opo train   # gloo on CPU, NCCL on CUDA

Everything here is a no-op at world size 1, so the single-process path never branches on it.
"""

from __future__ import annotations

import atexit
import gc
import os
import re
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from opo_cli.errors import UserError, first_line


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the run: rank 0 alone writes files and logs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = Dist()


def slurm_to_torchrun_env(env: dict[str, str]) -> dict[str, str]:
    """The torchrun variables a task started by `srun` (one task per GPU) lacks, from SLURM's.

    hydra-submitit-launcher starts its jobs this way (`srun` runs the job function once per
    task: `hydra.launcher.tasks_per_node` x `nodes` tasks), and so does `srun opo train`.
    Only a task of a multi-task job step counts: `srun` sets `SLURM_STEP_NUM_TASKS`, while a
    batch script itself (rank 0 of `SLURM_NTASKS` by its variables, but alone) has no step.
    submitit's local executor (`hydra/launcher=submitit_local`) names the same numbers
    `SUBMITIT_LOCAL_*` and runs every task on this host. Rank 0 runs on the first host of
    the step's node list. Returns only what is missing; empty when the process is not such
    a task, or when torchrun already set RANK.
    """
    if "RANK" in env:
        return {}
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:
        rank, world, local = "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"
        job, nodes = "SLURM_JOB_ID", env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST"))
    elif int(env.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1 and "SUBMITIT_LOCAL_GLOBALID" in env:
        rank, world, local = (
            "SUBMITIT_LOCAL_GLOBALID",
            "SUBMITIT_LOCAL_NTASKS",
            "SUBMITIT_LOCAL_LOCALID",
        )
        job, nodes = "SUBMITIT_LOCAL_JOB_ID", "localhost"
    else:
        return {}
    out = {
        "RANK": env[rank],
        "WORLD_SIZE": env[world],
        "LOCAL_RANK": env.get(local, "0"),
        "MASTER_PORT": env.get("MASTER_PORT", str(29500 + int(env.get(job, "0")) % 1000)),
    }
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = first_host(nodes or "localhost")
    return out


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (`gpu[01-04],cpu1` -> `gpu01`); scontrol when there."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return parse_first_host(nodelist)


def parse_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list read as SLURM writes it, without scontrol: groups
    joined by commas, each bracket a list of numbers and ranges (`gpu[01-04,07],cpu1` ->
    `gpu01`, `rack[2-3]-n[5,9]` -> `rack2-n5`)."""
    depth, group = 0, ""
    for c in nodelist:
        if c == "," and depth == 0:
            break
        depth += (c == "[") - (c == "]")
        group += c
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], group)


def from_env(env: dict[str, str] | None = None) -> Dist:
    """This process's rank and world size from torchrun's variables (or SLURM's)."""
    env = dict(os.environ if env is None else env)
    env |= slurm_to_torchrun_env(env)
    try:
        return Dist(
            rank=int(env.get("RANK", "0")),
            world_size=int(env.get("WORLD_SIZE", "1")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
        )
    except ValueError as e:
        raise UserError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {e}") from None


def setup(device_name: str, timeout_s: float) -> tuple[Dist, torch.device | None]:
    """Join the process group when launched on several processes.

    Returns this rank's `Dist` and, under several processes, its device (with NCCL
    `cuda:LOCAL_RANK`, or `cuda:0` where SLURM shows each task its own GPU: `cuda_index`;
    `cpu` with gloo); `None` at world size 1, where the caller picks the device.
    A collective that waits longer than `timeout_s` raises instead of hanging. The group
    lives until the process ends (a second call returns the same): under torchrun a group
    made again after `teardown` in the same process finds its peers' old addresses and hangs
    (torch 2.13), so `opo eval -m` jobs in one process share one group.
    """
    os.environ.update(slurm_to_torchrun_env(dict(os.environ)))
    d = from_env()
    if not d.enabled:
        return d, None
    if device_name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda (NCCL) but this machine has no CUDA device")
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda", cuda_index(d.local_rank)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=device if use_cuda else None,
        )
        atexit.register(teardown)
    return d, device


def cuda_index(local_rank: int, visible: int | None = None) -> int:
    """This rank's CUDA device among the `visible` ones (default: all this process sees):
    `local_rank` when the process sees every GPU of its node (torchrun), 0 when it sees one
    (SLURM's `--gpus-per-task=1` binds each task to its own GPU through CUDA_VISIBLE_DEVICES)."""
    visible = torch.cuda.device_count() if visible is None else visible
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise UserError(
            f"LOCAL_RANK={local_rank} but this process sees {visible} GPUs: start one process "
            "per GPU (torchrun --nproc_per_node, or SLURM --ntasks-per-node = GPUs per node)"
        )
    return local_rank


def teardown() -> None:
    """Leave the process group. Objects that hold it (DDP's reducer, FSDP2's state) are
    collected first: one freed after it aborts the process at exit."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    """Where a small collective tensor lives: NCCL works on CUDA tensors only."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, in place (unchanged at world size 1)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_ok(ok: bool) -> bool:
    """True on every rank when `ok` is true on every rank: the vote before a collective
    decision (stop, skip, error), so that no rank is left waiting for the others."""
    if not active():
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return int(flag.item()) == 0


def any_true(flag: bool) -> bool:
    return not all_ok(not flag)


def gather_objects(obj) -> list:
    """Every rank's object, in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Every rank waits here for the others (under the process group's timeout)."""
    all_ok(True)


def global_mean(total: float, count: float) -> float:
    """sum(total) / sum(count) over ranks (count floored at 1): a mean over every rank's items."""
    t = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64, device=_device()))
    return (t[0] / t[1].clamp(min=1.0)).item()


def cat_rows(*ts: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Every rank's rows of each of `ts` (one row count n_r on this rank; each (n_r,) or
    (n_r, w)), in rank order, and where this rank's rows start. Rows are counted and, for 2-D
    tensors, right-padded with zeros to the widest rank's width; one exchange of shapes serves
    every tensor. Unchanged (and 0) at world size 1."""
    if not active():
        return list(ts), 0
    shapes = gather_objects([tuple(t.shape) for t in ts])  # [rank][tensor]
    start = sum(s[0][0] for s in shapes[: dist.get_rank()])
    return [_all_rows(t, [s[i] for s in shapes]) for i, t in enumerate(ts)], start


def _all_rows(t: torch.Tensor, shapes: list[tuple[int, ...]]) -> torch.Tensor:
    """`t`'s rows from every rank, whose shapes are `shapes`, in rank order."""
    rows = max(s[0] for s in shapes)
    pad = [0, max(s[1] for s in shapes) - t.shape[1]] if t.dim() == 2 else []
    full = torch.nn.functional.pad(t, [*pad, 0, rows - t.shape[0]])  # (rows, W) or (rows,)
    parts = [torch.empty_like(full) for _ in shapes]
    dist.all_gather(parts, full.contiguous())
    return torch.cat([p[: s[0]] for p, s in zip(parts, shapes, strict=True)])


def _failures(error: BaseException | None) -> list[tuple[int, type, str]]:
    """Every rank's failure, (rank, UserError type, first line), in rank order; [] when none
    failed. A `UserError` subclass (`RewardError`) keeps its type, so every rank can take the
    same path; any other error is reported as a `UserError`."""
    report = None
    if error is not None:
        kind = type(error) if isinstance(error, UserError) else UserError
        report = (kind, first_line(error))
    reports = gather_objects(report)
    return [(rank, *r) for rank, r in enumerate(reports) if r is not None]


class PeerFailed(Exception):
    """Another rank failed and reports why; this one stops without a message of its own."""


def agree(error: BaseException | None) -> None:
    """Raise on every rank when any rank has an `error`: the lowest failing rank raises its
    own error (the run's one message), the others `PeerFailed`. Nothing when none failed.

    Every rank calls it at the same point, with the error of the work it just did (or None).
    """
    failed = _failures(error)
    if not failed:
        return
    first = failed[0][0]
    if (dist.get_rank() if active() else 0) == first:
        raise error
    raise PeerFailed(f"rank {first} failed")


def agreed(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on every rank, failing on every rank when it fails on any.

    The rank that failed raises its own error; the others raise the same `UserError` type
    naming that rank and its first line. No rank goes on to a collective the failed one
    never reaches.
    """
    try:
        out, err = fn(*args, **kwargs), None
    except Exception as e:  # every error is voted on, then raised again
        out, err = None, e
    failed = _failures(err)
    if err is not None:
        raise err
    if failed:
        rank, kind, line = failed[0]
        raise kind(f"rank {rank} failed: {line}")
    return out


def lost_ranks(e: BaseException) -> bool:
    """A collective that failed: it timed out, or a peer is gone (gloo raises a plain
    RuntimeError naming itself, NCCL and the store a `DistError`)."""
    text = str(e)
    return isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError) and ("gloo" in text or "Timed out" in text)
    )


def agreed_signal(signum: int | None) -> int | None:
    """The first stop signal any rank received (None: none did), the same on every rank."""
    return next((s for s in gather_objects(signum) if s is not None), None)
