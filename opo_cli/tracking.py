"""Where metrics go: `metrics.jsonl` (one row per step), a rich console, and W&B; with them,
the sampled completions of some steps (`opo_cli.completions`).

W&B is a no-op object when `logger=none`, so the training loop never branches on it. Without
an account, W&B runs offline by itself; if it cannot start at all, training goes on without it.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from opo_cli.completions import CompletionLog, PromptMatcher, sample_line, wandb_table
from opo_cli.config import validate_tracking
from opo_cli.errors import first_line

console = Console(stderr=True, soft_wrap=True)  # a long line stays one line in logs
PLAIN = {"markup": False, "highlight": False, "soft_wrap": True}  # one console line, verbatim


def warn_damaged(folder, error: BaseException) -> None:
    """The one-line warning for a checkpoint that does not load and is passed over."""
    console.print(f"warning: skipping damaged checkpoint {folder}: {first_line(error)}", **PLAIN)


CONSOLE_KEYS = {  # metric -> short console label
    "train/reward_mean": "reward",
    "train/loss": "loss",
    "train/grad_norm": "gnorm",
    "train/entropy": "ent",
    "train/response_len_mean": "len",
    "eval/accuracy": "eval",
    "perf/step_s": "s/step",
}


def is_number(x) -> bool:
    """True for finite ints and floats (bools and NaN excluded)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def load_metrics(path: Path) -> tuple[list[dict], int]:
    """Rows of a metrics.jsonl, sorted by step, and the count of damaged lines (cut off,
    garbage, no step). A step logged twice (a resumed run) keeps its later row."""
    by_step: dict[float, dict] = {}
    damaged = 0
    if not path.exists():
        return [], 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                damaged += 1
                continue
            if not isinstance(row, dict) or not is_number(row.get("step")):
                damaged += 1
                continue
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)], damaged


def read_metrics(path: Path) -> list[dict]:
    """The readable rows of a metrics.jsonl (see `load_metrics`)."""
    return load_metrics(path)[0]


class MetricsFile:
    """Append-only metrics.jsonl; on resume, rows after the checkpoint's step are dropped.
    `last_logged` is the last step the file held before (0 for a new file)."""

    def __init__(self, path: Path, keep_until_step: int):
        rows = read_metrics(path)
        self.last_logged = int(rows[-1]["step"]) if rows else 0
        kept = [r for r in rows if r["step"] <= keep_until_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._f = path.open("a")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


WANDB_ID_FILE = "wandb_run_id"  # the run folder's W&B run id: a rerun resumes that W&B run


def wandb_mode(requested: str) -> str:
    """online or offline: the user's choice, else online only when an account is configured."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    )
    return "online" if has_key else "offline"


class NullRun:
    """Stands in for a W&B run when tracking is off."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def config_tags(cfg: DictConfig) -> list[str]:
    """W&B tags from the config: method and model of a training run, `eval` and the dataset of
    an evaluation (whose config has no method)."""
    if "method" in cfg:
        return [cfg.method.name, cfg.model.name]
    return ["eval", cfg.dataset.name]


def start_wandb(cfg: DictConfig, run_dir: Path, name: str):
    """A W&B run (resumed when the run folder has one), or `NullRun` when off or failing."""
    lcfg = cfg.logger
    if lcfg.name != "wandb":
        return NullRun()
    try:
        import wandb

        mode = wandb_mode(lcfg.mode)
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        if mode == "offline" and lcfg.mode == "auto" and not os.environ.get("WANDB_MODE"):
            console.print("[yellow]W&B: no account configured, logging offline[/] (`wandb sync`)")
        return wandb.init(
            project=lcfg.project,
            entity=lcfg.entity,
            group=lcfg.group,
            name=name,
            tags=[*config_tags(cfg), *lcfg.tags],
            config=OmegaConf.to_container(cfg, resolve=True),
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            mode=mode,
            settings=wandb.Settings(init_timeout=90, silent=True),
        )
    except Exception as e:  # W&B must never stop training
        console.print(f"[yellow]W&B could not start ({type(e).__name__}: {e}); going on without it")
        return NullRun()


class Tracker:
    """One `log(step, metrics)` call per step feeds the file, the console and W&B.

    On resume, the steps between the checkpoint and the last step logged before are run
    again. W&B keeps the first value of a step and drops steps at or below its last one, so
    a resumed W&B run is sent only the steps after the last one it holds (`wandb_after`: the
    last step of metrics.jsonl before the resume, written just before W&B's). Resuming is
    deterministic (same rows but timings), so W&B's first values are the file's values.
    """

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        *,
        start_step: int,
        total_steps: int,
        prompts: PromptMatcher | None = None,
    ):
        self.metrics = MetricsFile(run_dir / "metrics.jsonl", keep_until_step=start_step)
        self.completions = CompletionLog(cfg, run_dir, validate_tracking(cfg), start_step)
        self.completions.prompts = prompts
        resumes_wandb = (run_dir / WANDB_ID_FILE).exists()
        self.wandb_after = self.metrics.last_logged if resumes_wandb else 0
        self.run = start_wandb(cfg, run_dir, name=cfg.run_name)
        self.log_every = cfg.trainer.log_every
        self.total = total_steps
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[summary]}"),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=start_step, summary=""
        )
        self.progress.start()

    def log(self, step: int, metrics: dict, rollout=None) -> None:
        """The step's metrics row, and on the steps `tracking.completions_every` names, the
        completions of `rollout` (the step's training batch) and of a pending evaluation."""
        samples = self.completions.step_rows(step, rollout)
        tables = self.completions.write(step, samples)
        row = {"step": step, **metrics}
        self.metrics.write(row)
        if step > self.wandb_after:
            sent = metrics
            if tables and not isinstance(self.run, NullRun):
                sent = metrics | {name: wandb_table(rows) for name, rows in tables.items()}
            self.run.log(sent, step=step)
        summary = format_metrics(metrics)
        self.progress.update(self.task, completed=step, summary=summary)
        if step % self.log_every == 0 or step == self.total:
            self.progress.console.print(f"step {step:>5}/{self.total}  {summary}", highlight=False)
        if self.completions.s.show_completion and samples:
            self.progress.console.print(
                sample_line(samples[0], self.progress.console.width), **PLAIN
            )

    def eval_answers(self, graded: list) -> None:
        """An evaluation's graded answers (`opo_cli.evaluate.Graded`), logged with the next
        `log` call's step: the first `tracking.eval_completions` of them."""
        self.completions.pending_eval = list(graded)

    def close(self) -> None:
        self.progress.stop()
        self.metrics.close()
        self.completions.close()
        self.run.finish()


class SilentTracker:
    """A rank other than 0 under torchrun: it logs nothing (rank 0 logs the global metrics)."""

    def log(self, step: int, metrics: dict, rollout=None) -> None:
        pass

    def eval_answers(self, graded: list) -> None:
        pass

    def close(self) -> None:
        pass


def format_metrics(metrics: dict) -> str:
    """The compact console summary of a metrics row."""
    parts = []
    for key, label in CONSOLE_KEYS.items():
        if key in metrics:
            parts.append(f"{label} {metrics[key]:.3g}")
    return "  ".join(parts)
