"""`rollout.backend=opo`: our own sampling loop (`opo_cli.decode`) on the training model.

Shared prefill always; on CUDA a static KV cache and CUDA-graph decoding, kept from one
rollout to the next (`decode.static_decoder`) and freed by `close`.
"""

from __future__ import annotations

import torch

from opo_cli.backends import BackendOptions, Samples
from opo_cli.decode import _DECODER, decode


class OpoBackend:
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
        cuda = ids.device.type == "cuda"
        completion_ids, logps, entropy = decode(
            model,
            ids,
            mask,
            group_size=n,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            pad_id=pad_id,
            temperature=temperature,
            top_p=top_p,
            static=cuda,
            compiled=cuda,
        )  # (N, Lc) x 3
        return Samples(completion_ids, logps, entropy) if keep_logps else Samples(completion_ids)

    def sync(self, model) -> None:
        """Nothing to do: the loop runs the training model itself."""

    def close(self) -> None:
        _DECODER.clear()  # the kept static cache and its compiled forward


def build(o: BackendOptions) -> OpoBackend:
    return OpoBackend()
