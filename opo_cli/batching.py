"""Micro-batches: which rows of a rollout go through one forward, and at what width.

Rows are left-padded prompts followed by right-padded completions, all of one width L.
By rows (`trainer.micro_batch_size`), a micro-batch is that many consecutive rows at width L:
the plain path. By tokens (`trainer.micro_batch_tokens`), consecutive rows are packed while
rows x width <= budget, the width leaving out the padding columns that every row of the
micro-batch shares (left of the earliest first token, right of the latest last token); a row
wider than the budget goes alone. Those columns are masked out of attention and positions
count from each row's first real token, so cutting them leaves every real token's log-prob
as it was (to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from opo_cli.logprobs import completion_logps


@dataclass(frozen=True)
class MicroBatch:
    rows: Tensor  # (n,) consecutive row indices
    start: int  # first column kept
    completion_len: int  # completion columns kept, counted from the first completion column


def micro_batches(
    attention_mask: Tensor, completion_len: int, *, rows: int, tokens: int | None
) -> list[MicroBatch]:
    """The micro-batches of a (N, L) rollout: `rows` rows each, or packed by a token budget."""
    n, width = attention_mask.shape
    if tokens is None:
        return [MicroBatch(r, 0, completion_len) for r in torch.arange(n).split(rows)]
    real = attention_mask.bool()  # (N, L)
    first = real.int().argmax(-1).tolist()  # (N,) first real column of each row
    last = (width - 1 - real.flip(-1).int().argmax(-1)).tolist()  # (N,) last real column
    prompt_len = width - completion_len
    spans: list[list[int]] = []  # [first row, end row, lo column, hi column]
    for i in range(n):
        if spans:
            lo, hi = min(spans[-1][2], first[i]), max(spans[-1][3], last[i])
            count = i - spans[-1][0] + 1
            if count <= rows and count * (hi - lo + 1) <= tokens:
                spans[-1][1:] = [i + 1, lo, hi]
                continue
        spans.append([i, i + 1, first[i], max(last[i], prompt_len)])
    return [MicroBatch(torch.arange(a, b), lo, hi - prompt_len + 1) for a, b, lo, hi in spans]


def micro_logps(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_len: int,
    mb: MicroBatch,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """`completion_logps` of the rows of `mb` at its width, zero-padded back to (n, Lc)."""
    end = input_ids.shape[1] - (completion_len - mb.completion_len)
    logps, entropy = completion_logps(
        model,
        input_ids[mb.rows, mb.start : end],  # (n, w)
        attention_mask[mb.rows, mb.start : end],  # (n, w)
        mb.completion_len,
        temperature=temperature,
        with_entropy=with_entropy,
    )
    pad = (0, completion_len - mb.completion_len)
    return F.pad(logps, pad), (None if entropy is None else F.pad(entropy, pad))  # (n, Lc) x 2
