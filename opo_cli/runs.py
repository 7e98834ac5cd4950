"""Run folders without torch: which checkpoints a run holds, which model folders a
`checkpoint=` names, and `opo eval`'s argument check. Kept free of heavy imports, so that
a bad `opo eval` command ends before torch and transformers load."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from omegaconf import DictConfig

from opo_cli.config import EvalSettings, check_paths, looks_local, validate_eval
from opo_cli.errors import UserError
from opo_cli.tracking import WANDB_ID_FILE

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
REPLACED_DIR = "replaced"  # where `trainer.resume=never` moves an earlier run's outputs
RUN_OUTPUTS = ("checkpoints", "final", "metrics.jsonl", "wandb", WANDB_ID_FILE)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, newest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True) if (p / STATE_FILE).exists()]


def set_aside_previous_run(run_dir: Path) -> Path | None:
    """Move what an earlier run left in `run_dir` (`RUN_OUTPUTS`: its checkpoints, final/,
    metrics and W&B run and id) into `run_dir/replaced/<UTC time>/`; returns that folder,
    None when there was nothing.

    `trainer.resume=never` calls it: the run folder is named by the overrides, so a fresh
    start reuses the folder, and the old checkpoints would otherwise be pruned in place of
    the new ones (they have the higher step numbers), resumed from by the next plain rerun,
    or named in place of the new run's by `checkpoint=`.
    """
    found = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target, n = run_dir / REPLACED_DIR / stamp, 1
    while target.exists():  # two fresh starts within a second
        n += 1
        target = run_dir / REPLACED_DIR / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for path in found:
        os.replace(path, target / path.name)
    return target


def model_candidates(spec: str) -> list[str]:
    """The model folders `checkpoint=` names, best first: a run folder's final/ and then its
    checkpoints/step_N newest first (the loader takes the first that reads), a model
    folder, or a hub id (owner/name) left as it is."""
    path = Path(spec).expanduser()
    if path.is_dir():
        final = [str(path / "final")] if (path / "final" / "config.json").is_file() else []
        saved = final + [str(p) for p in list_checkpoints(path)]
        if saved:
            return saved
        if (path / "config.json").is_file():
            return [str(path)]
        raise UserError(
            f"checkpoint={spec}: not a run folder (no final/ or checkpoints/step_N/) "
            "nor a model folder (no config.json)"
        )
    if looks_local(spec) or spec.count("/") != 1:
        raise UserError(
            f"checkpoint={spec}: no such folder (a run folder, a model folder or owner/name)"
        )
    return [spec]


def check_eval(cfg: DictConfig) -> tuple[EvalSettings, list[str]]:
    """The checked `eval.*` settings and the model folders (or hub id) of `checkpoint=`."""
    s = validate_eval(cfg)
    check_paths(cfg)
    if not cfg.checkpoint:
        raise UserError("checkpoint= is required: a run folder, a model folder or a hub id")
    return s, model_candidates(str(cfg.checkpoint))
