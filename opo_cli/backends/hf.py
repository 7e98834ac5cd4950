"""`rollout.backend=hf`: sampling with transformers' `generate` on the training model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList

from opo_cli.backends import BackendOptions, Samples
from opo_cli.decode import cache_argument, shared_prefill
from opo_cli.generation import generate_own, sampling_config
from opo_cli.sampling import SampledTokenLogps


@dataclass
class HFBackend:
    """`generate` on the model it is given, under a config of our own (`opo_cli.generation`);
    the KV cache as `cache_implementation` says.

    `cache_implementation="static"` decodes with a fixed-size KV cache, which `generate`
    compiles on CUDA; elsewhere the default dynamic cache is used. `share_prefill` runs each
    prompt through the model once for its n samples (`shared_prefill`), with the dynamic
    cache only: the static one is sized and compiled by `generate` itself.
    """

    cache_implementation: str = "dynamic"
    share_prefill: bool = True

    @torch.no_grad()
    def generate(
        self,
        model,
        ids,
        mask,
        *,
        n,
        max_new_tokens,
        temperature,
        top_p,
        keep_logps,
        stop_ids,
        pad_id,
    ) -> Samples:
        greedy = temperature == 0
        keep = keep_logps and not greedy
        recorder = SampledTokenLogps(ids.shape[1], temperature) if keep else None
        static = self.cache_implementation == "static" and ids.device.type == "cuda"
        config = sampling_config(
            stop_ids=stop_ids,
            pad_id=pad_id,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            greedy=greedy,
            cache_implementation="static" if static else None,
        )
        cache = {}  # the model's default, every row prefilled
        if self.share_prefill and not static and ids.shape[1] > 1:
            cache = {cache_argument(model): shared_prefill(model, ids, mask, n)}
        out = generate_own(
            model,
            config,
            input_ids=ids.repeat_interleave(n, 0),  # (N, Lp)
            attention_mask=mask.repeat_interleave(n, 0),  # (N, Lp)
            logits_processor=LogitsProcessorList([recorder] if recorder else []),
            **cache,
        )
        completion_ids = out[:, ids.shape[1] :]  # (N, Lc)
        if recorder is None:
            return Samples(completion_ids)
        logps, entropy = recorder.finish(completion_ids, torch.ones_like(completion_ids))
        return Samples(completion_ids, logps, entropy)  # (N, Lc) x 3

    def sync(self, model) -> None:
        """Nothing to do: `generate` runs on the training model itself."""

    def close(self) -> None:
        """Nothing held."""


def build(o: BackendOptions) -> HFBackend:
    return HFBackend(o.cache_implementation, o.share_prefill)
