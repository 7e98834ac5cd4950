"""Validation of the composed Hydra config into typed settings, with one-line errors.

Everything a user can type is checked here before any work starts; a bad value raises
`ConfigError` whose message names the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from opo_cli.errors import UserError
from opo_cli.losses import LOSSES

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class ConfigError(UserError):
    """A config value a user can fix; its message is one line."""


def _dirname(override_dirname: str) -> str:
    """Run folder name from the overrides; `default` when there are none."""
    return override_dirname or "default"


OmegaConf.register_new_resolver("run_dir_name", _dirname, replace=True)


@dataclass(frozen=True)
class TrainerSettings:
    steps: int
    epochs: int
    mini_batches: int
    micro_batch_size: int | None
    lr: float
    weight_decay: float
    warmup_updates: int
    max_grad_norm: float
    save_every: int
    keep_last: int
    resume: str
    device: str
    dtype: str
    log_every: int


@dataclass(frozen=True)
class RolloutSettings:
    prompts_per_step: int
    group_size: int
    max_new_tokens: int
    temperature: float
    top_p: float


@dataclass(frozen=True)
class TrainSettings:
    alpha: float
    mu: float
    seed: int
    loss: str
    trainer: TrainerSettings
    rollout: RolloutSettings


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value} is not allowed: {allowed}")


def _int(cfg: DictConfig, key: str, minimum: int) -> int:
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    _require(ok, key, value, f"an integer >= {minimum}")
    return value


def _float(cfg: DictConfig, key: str, low: float, high: float, *, open_low: bool = False) -> float:
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    bracket = "(" if open_low else "["
    _require(ok, key, value, f"a number in {bracket}{low}, {high}]")
    return float(value)


def _choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> str:
    value = OmegaConf.select(cfg, key)
    _require(value in choices, key, value, "one of " + ", ".join(choices))
    return value


def validate_train(cfg: DictConfig) -> TrainSettings:
    """Typed, checked settings of an `opo train` config, or a `ConfigError`."""
    inf = float("inf")
    _require(cfg.method.loss in LOSSES, "method.loss", cfg.method.loss, ", ".join(sorted(LOSSES)))
    micro = OmegaConf.select(cfg, "trainer.micro_batch_size")
    trainer = TrainerSettings(
        steps=_int(cfg, "trainer.steps", 1),
        epochs=_int(cfg, "trainer.epochs", 1),
        mini_batches=_int(cfg, "trainer.mini_batches", 1),
        micro_batch_size=None if micro is None else _int(cfg, "trainer.micro_batch_size", 1),
        lr=_float(cfg, "trainer.lr", 0.0, 1.0, open_low=True),
        weight_decay=_float(cfg, "trainer.weight_decay", 0.0, 1.0),
        warmup_updates=_int(cfg, "trainer.warmup_updates", 0),
        max_grad_norm=_float(cfg, "trainer.max_grad_norm", 0.0, inf, open_low=True),
        save_every=_int(cfg, "trainer.save_every", 0),
        keep_last=_int(cfg, "trainer.keep_last", 1),
        resume=_choice(cfg, "trainer.resume", ("auto", "never")),
        device=_choice(cfg, "trainer.device", ("auto", "cpu", "cuda")),
        dtype=_choice(cfg, "trainer.dtype", ("auto", "float32", "bfloat16")),
        log_every=_int(cfg, "trainer.log_every", 1),
    )
    rollout = RolloutSettings(
        prompts_per_step=_int(cfg, "rollout.prompts_per_step", 1),
        group_size=_int(cfg, "rollout.group_size", 2),
        max_new_tokens=_int(cfg, "rollout.max_new_tokens", 1),
        temperature=_float(cfg, "rollout.temperature", 0.0, inf, open_low=True),
        top_p=_float(cfg, "rollout.top_p", 0.0, 1.0, open_low=True),
    )
    _require(
        trainer.mini_batches <= rollout.prompts_per_step,
        "trainer.mini_batches",
        trainer.mini_batches,
        f"at most rollout.prompts_per_step ({rollout.prompts_per_step}): each holds whole groups",
    )
    return TrainSettings(
        alpha=_float(cfg, "alpha", 0.0, 1.0),
        mu=_float(cfg, "mu", 0.0, inf, open_low=True),
        seed=_int(cfg, "seed", 0),
        loss=cfg.method.loss,
        trainer=trainer,
        rollout=rollout,
    )


def group_options(group: str) -> list[str]:
    """Config files available in `conf/<group>/`, without the extension."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
