"""Per-token log-probabilities and entropies of completions, without full float32 logits.

`token_logps` is a custom autograd function: it saves only the model's logits (in their own
dtype) and one float32 log-normaliser per token, and recomputes softmax chunk by chunk in the
backward pass, so at most `chunk` rows of float32 vocabulary-wide values exist at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ROWS = 1024  # token rows of float32 vocabulary-wide values alive at once


class _TokenLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk: int) -> Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for checks
        flat = logits.reshape(-1, logits.shape[-1])  # (R, V)
        lse = torch.empty(flat.shape[0], dtype=acc, device=flat.device)  # (R,)
        for s in range(0, flat.shape[0], chunk):
            lse[s : s + chunk] = flat[s : s + chunk].to(acc).logsumexp(-1)
        picked = flat.gather(-1, targets.reshape(-1, 1)).squeeze(-1).to(acc)  # (R,)
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return (picked - lse).view(targets.shape)  # (N, T)

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, targets, lse = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])  # (R, V)
        idx = targets.reshape(-1, 1)  # (R, 1)
        g = grad.reshape(-1, 1).to(lse.dtype)  # (R, 1)
        out = torch.empty_like(flat)  # (R, V)
        for s in range(0, flat.shape[0], ctx.chunk):
            e = s + ctx.chunk
            probs = (flat[s:e].to(lse.dtype) - lse[s:e, None]).exp()  # (r, V)
            d = -probs * g[s:e]  # (r, V) d logp / d logits = onehot - softmax
            d.scatter_add_(-1, idx[s:e], g[s:e])
            out[s:e] = d.to(out.dtype)
        return out.view_as(logits), None, None


def token_logps(logits: Tensor, targets: Tensor, chunk: int = CHUNK_ROWS) -> Tensor:
    """log softmax(logits)[targets]: (N, T, V), (N, T) -> (N, T), at least float32."""
    return _TokenLogProb.apply(logits, targets, chunk)


@torch.no_grad()
def token_entropy(logits: Tensor, chunk: int = CHUNK_ROWS) -> Tensor:
    """Entropy of softmax(logits) per token: (N, T, V) -> (N, T) float32."""
    flat = logits.reshape(-1, logits.shape[-1])  # (R, V)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)  # (R,)
    for s in range(0, flat.shape[0], chunk):
        lp = flat[s : s + chunk].float().log_softmax(-1)  # (r, V)
        out[s : s + chunk] = -(lp.exp() * lp).sum(-1)
    return out.view(logits.shape[:-1])


def positions(attention_mask: Tensor) -> Tensor:
    """Position of each column counted from the row's first real token: (n, L) -> (n, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logps(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_len: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and optionally entropies) of the last `completion_len` tokens of each row.

    Rows are left-padded prompts followed by completions: (N, L) -> (N, Lc), (N, Lc).
    Positions count from each row's first real token, as in generation.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions(attention_mask),  # (N, L)
        logits_to_keep=completion_len + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1]  # (N, Lc, V) logits at t predict token t + 1
    if temperature != 1.0:
        logits = logits / temperature  # (N, Lc, V)
    targets = input_ids[:, -completion_len:]  # (N, Lc)
    logps = token_logps(logits, targets)  # (N, Lc)
    entropy = token_entropy(logits) if with_entropy else None  # (N, Lc)
    return logps, entropy
