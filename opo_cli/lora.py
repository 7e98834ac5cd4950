"""LoRA through PEFT (`opo train model.lora.r=16`): the adapter on the policy, the reference
it gives without a second copy of the model, and the run's final model.

With `model.lora.r` set, LoRA layers are put into the loaded model in place (PEFT's
`get_peft_model`): the training loop, the samplers and the log-prob code keep calling the
same transformers model, and only the adapter's A and B matrices require gradients. B starts
at zero, so the wrapped model first computes exactly what the base model did. The reference
of DPO and of GRPO with beta > 0 is that base model: the policy with its adapter switched off
(`AdapterOff`). Checkpoints hold the adapter alone; `final/` holds the merged model and
`final/adapter/` the adapter (`save_final`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from opo_cli.config import ALL_LINEAR, ConfigError, LoraSettings, looks_local
from opo_cli.errors import first_line

ADAPTER_DIR = "adapter"  # final/adapter/: the adapter beside the merged model


@contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT asks transformers 5 for a name it deprecates: a warning that is no news to users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        yield


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The names (last path part) of the model's linear layers, the output layer aside."""
    output = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output
    }
    return sorted(names)


def check_targets(model: torch.nn.Module, targets: str | tuple[str, ...]) -> None:
    """Every name in `model.lora.target_modules` names some module (as PEFT matches a list:
    the module's path, or its end after a dot); a typo raises `ConfigError` listing the
    model's linear layers."""
    if targets == ALL_LINEAR:
        return
    paths = [path for path, _ in model.named_modules()]
    for target in targets:
        if not any(path == target or path.endswith(f".{target}") for path in paths):
            raise ConfigError(
                f"model.lora.target_modules: no module of {type(model).__name__} is named "
                f"'{target}'; its linear layers: {', '.join(linear_layer_names(model))}"
            )


def add_adapter(model, s: LoraSettings, saved: str | None = None):
    """`model` (changed in place) inside a PEFT wrapper with a trainable LoRA adapter: a new
    one (B = 0), or the one saved in the folder `saved`. Raises `ConfigError` in one line
    for a target that names no module or a model PEFT cannot wrap."""
    check_targets(model, s.target_modules)
    with quiet_peft():
        wrapped = _wrap(model, s, saved)
    base = wrapped.peft_config["default"].base_model_name_or_path
    if base and looks_local(base):  # an absolute path: the adapter loads from any folder
        wrapped.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    return wrapped


def _wrap(model, s: LoraSettings, saved: str | None):
    """PEFT's wrapper of `model` with the adapter saved in `saved`, or with a new one."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if saved is not None:  # its errors are a damaged checkpoint's, for the caller to judge
        return PeftModel.from_pretrained(model, saved, is_trainable=True)
    targets = s.target_modules
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=s.r,
        lora_alpha=s.alpha,
        lora_dropout=s.dropout,
        target_modules=targets if targets == ALL_LINEAR else list(targets),
    )
    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise ConfigError(
            f"model.lora: PEFT cannot put LoRA into {type(model).__name__}: {first_line(e)}"
        ) from e


class AdapterOff:
    """The base model under a LoRA policy, called like a model: each call runs the policy
    with its adapter switched off. The frozen reference, without a second copy."""

    def __init__(self, wrapped):
        self.wrapped = wrapped

    def __call__(self, *args, **kwargs):
        with self.wrapped.disable_adapter():
            return self.wrapped.get_base_model()(*args, **kwargs)


def save_final(folder: Path, *, model, tok, adapter=None) -> None:
    """The run's final model into `folder`, loadable by `from_pretrained`. With LoRA, the
    adapter (and tokenizer) go to `folder/adapter/` first; then the adapter is merged into
    the base weights in place (no second copy: the policy ends as the merged model)."""
    if adapter is not None:
        adapter.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True)
        tok.save_pretrained(folder / ADAPTER_DIR)
        model = adapter.merge_and_unload()
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
