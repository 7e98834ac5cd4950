"""Model and tokenizer loading (hub id or local folder), and the offline tiny model.

`load_policy` is the one loading path: a hub model, a checkpoint folder and the tiny model
(built once, warm-started, cached as a Hugging Face folder) all go through it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import track
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from opo_cli.config import HUB_UNREACHABLE, looks_local
from opo_cli.data import Problem, dataset_kind, warm_start_pairs
from opo_cli.errors import UserError, first_line
from opo_cli.lora import quiet_peft

console = Console(stderr=True)
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file: a folder holding it is an adapter


class ModelLoadError(UserError):
    """A model or tokenizer that cannot be loaded; the message is one line for the user."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_policy(
    name_or_path: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    weights: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a hub id or a local folder, ready for left padding.

    A LoRA adapter folder (`adapter_config.json`, no `config.json`: a LoRA run's checkpoint
    or `final/adapter/`) loads as its base model with the adapter merged in. `weights=False`:
    the model built from its config on the meta device, no memory and no file read (FSDP2's
    ranks other than 0, which receive their shards from rank 0: `opo_cli.parallel`).
    """
    local = Path(name_or_path).expanduser()
    if looks_local(name_or_path) and not local.is_dir():
        raise ModelLoadError(f"model folder not found: {name_or_path}")
    base = adapter_base(local)
    try:
        tok = AutoTokenizer.from_pretrained(
            base if base and not (local / "tokenizer_config.json").is_file() else name_or_path,
            trust_remote_code=trust_remote_code,
        )
        if weights or base:
            model = AutoModelForCausalLM.from_pretrained(
                base or name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
            )
        else:
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(
                    config, dtype=dtype, trust_remote_code=trust_remote_code
                )
        if base:
            model = merged_adapter(model, local)
    except (OSError, ValueError) as e:
        first = first_line(e)
        if host := os.environ.get(HUB_UNREACHABLE):
            first += f" ({host} does not resolve here: hub ids load from the local cache only)"
        on = f" (a LoRA adapter on '{base}')" if base else ""
        raise ModelLoadError(f"cannot load model '{name_or_path}'{on}: {first}") from e
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    return (model.to(device) if weights or base else model), tok


def adapter_base(folder: Path) -> str | None:
    """The base model a LoRA adapter folder names; None for anything else."""
    if (folder / "config.json").is_file() or not (folder / ADAPTER_CONFIG).is_file():
        return None
    try:
        base = json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"cannot read {folder / ADAPTER_CONFIG}: {first_line(e)}") from e
    if not isinstance(base, str) or not base:
        raise ModelLoadError(f"{folder / ADAPTER_CONFIG} names no base model")
    return base


def merged_adapter(model: PreTrainedModel, folder: Path) -> PreTrainedModel:
    """`model` with the LoRA adapter saved in `folder` merged into its weights (in place)."""
    from peft import PeftModel

    with quiet_peft():
        return PeftModel.from_pretrained(model, str(folder)).merge_and_unload()


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, digits split one per token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left"
    )


def build_tiny_model(cfg: DictConfig, tok: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A small Llama-architecture model with random weights, from `model.tiny` sizes."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def supervised_warm_start(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], cfg
) -> float:
    """Teacher-forced cross-entropy on the completions of `pairs`; returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    rng = random.Random(0)
    loss = torch.tensor(float("nan"))
    model.train()
    for _ in track(range(cfg.steps), description="tiny model warm start (once)", console=console):
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(cfg.batch_size)]
        ids, labels = _sft_batch(tok, batch, model.config.max_position_embeddings)
        mask = (ids != tok.pad_token_id).long()  # (B, L)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def _sft_batch(
    tok, batch: list[tuple[str, str]], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 on prompt and padding) for prompt+completion+eos.

    Rows longer than `max_len` lose the start of their prompt (long MATH problems would
    otherwise make every warm-start batch as wide as the longest one).
    """
    rows, label_rows = [], []
    for prompt, completion in batch:
        p = tok(prompt, add_special_tokens=False).input_ids
        c = [*tok(completion, add_special_tokens=False).input_ids, tok.eos_token_id]
        rows.append((p + c)[-max_len:])
        label_rows.append(([-100] * len(p) + c)[-max_len:])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)  # (B, L)
    labels = torch.full((len(rows), width), -100)  # (B, L)
    for i, (r, lab) in enumerate(zip(rows, label_rows, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(lab)] = torch.tensor(lab)
    return ids, labels


def tiny_model_dir(cfg: DictConfig, dataset_cfg: DictConfig, problems: list[Problem]) -> Path:
    """The cached folder of the tiny model for this dataset, built and warm-started once."""
    key = {"tiny": OmegaConf.to_container(cfg.tiny), "dataset": OmegaConf.to_container(dataset_cfg)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cfg.cache_dir).expanduser() / f"tiny-{dataset_cfg.name}-{digest}"
    if (folder / "config.json").exists():
        return folder
    tok = train_tokenizer([p.prompt + p.answer for p in problems], cfg.tiny.vocab_size)
    model = build_tiny_model(cfg.tiny, tok, seed=cfg.tiny.seed)
    ws = cfg.tiny.warm_start
    if ws.steps > 0:
        pairs = warm_start_pairs(
            dataset_kind(dataset_cfg), problems, ws.examples, ws.seed, ws.accuracy
        )
        supervised_warm_start(model, tok, pairs, ws)
    _save_atomically(model, tok, folder)
    return folder


def _save_atomically(model: PreTrainedModel, tok: PreTrainedTokenizerBase, folder: Path) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp, ignore_errors=True)
