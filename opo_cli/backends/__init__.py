"""Samplers behind one interface, chosen by name (`rollout.backend`): hf, opo, vllm.

A backend turns P left-padded prompts into n sampled completions each (`generate`), takes
the trainer's weights after each step's optimisation (`sync`), and gives back what it holds
at the end of a run (`close`). `hf` (transformers `generate`) and `opo` (our loop,
`opo_cli.decode`) sample with the training model itself, so their `sync` has nothing to do;
`vllm` runs an engine of its own in the training process. Each lives in its own module here,
imported only when chosen (vLLM is an optional dependency): a fourth engine is one more
module and one more line in `BACKENDS`.

Every backend follows the same sampling rules (`opo_cli.generation`): temperature and nucleus
`top_p` only (no processor from the model's generation config), a row ends at the first of
`stop_ids`, and a temperature of 0 means greedy decoding. Kept log-probs are those of the
distribution at temperature T before the nucleus cut, as the training forward recomputes them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from opo_cli.config import VLLMSettings


@dataclass
class Samples:
    """What a backend sampled: N = P * n rows, grouped per prompt (prompt k: rows kn..kn+n-1)."""

    ids: Tensor  # (N, Lc) sampled token ids; after a row's EOS, anything (the caller masks it)
    logps: Tensor | None = None  # (N, Lc) log-prob of each sampled token at temperature T
    entropy: Tensor | None = None  # (N, Lc) entropy of each sampling step at temperature T


@dataclass(frozen=True)
class BackendOptions:
    """How to build a backend; each reads the fields it needs."""

    model_path: str = ""  # the model folder or hub id the run starts from (vllm loads it)
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    trust_remote_code: bool = False
    cache_implementation: str = "dynamic"  # hf: dynamic, or static (compiled, CUDA only)
    share_prefill: bool = True  # hf: each prompt prefilled once for its n samples
    temperature: float = 1.0  # vllm: the run's sampling temperature (which log-probs it keeps)
    top_p: float = 1.0  # vllm: the run's nucleus mass
    vllm: VLLMSettings = field(default_factory=VLLMSettings)


class Backend(Protocol):
    """A sampler: generate completions, take new weights, release its resources."""

    def generate(
        self,
        model,
        ids: Tensor,
        mask: Tensor,
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        keep_logps: bool,
        stop_ids: list[int],
        pad_id: int,
    ) -> Samples:
        """n completions of each left-padded prompt: ids and mask (P, Lp) -> Samples (P * n rows).

        `keep_logps` asks for the log-probs and entropies; a backend may return log-probs
        without entropies (vllm), or none when its numbers are not the trainer's (vllm with
        top_p < 1 and a temperature other than 1).
        """
        ...

    def sync(self, model) -> None:
        """Take `model`'s current weights (after a step's optimisation, before the next rollout)."""
        ...

    def close(self) -> None:
        """Release the engine and whatever it holds; the backend is not used again."""
        ...


BACKENDS: dict[str, str] = {  # name -> module holding `build(options) -> Backend`
    "hf": "opo_cli.backends.hf",
    "opo": "opo_cli.backends.opo",
    "vllm": "opo_cli.backends.vllm",
}


def open_backend(name: str, options: BackendOptions | None = None) -> Backend:
    """The backend `name` (a key of BACKENDS) built with `options`."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend '{name}'; choose one of: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name]).build(options or BackendOptions())
