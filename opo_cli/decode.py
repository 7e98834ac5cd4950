"""Our own sampling loop (`rollout.backend=opo`): shared prefill, static KV cache, compiled
decoding, few host syncs.

Each prompt is run through the model once (`shared_prefill`, P rows), its KV
cache is copied into G rows each, and the N = P * G rows are decoded one token per forward:
sampling at temperature T with nucleus `top_p`, the log-prob and entropy of each sampled
token kept (the distribution at temperature T, before top-p, as `SampledTokenLogps` keeps
them), rows past their EOS (any of the stop ids) fed padding. Whether every row has ended is
read back every `check_every` tokens only, so the host does not wait on the device at each
token.

`static=True` writes the cache into fixed-size buffers (transformers' `StaticCache`), so
every decoding forward has the same shapes and addresses; `compiled=True` then runs that
forward through `torch.compile(mode="reduce-overhead")`, which replays it as a CUDA graph.
The cache and the compiled forward are kept between rollouts (`static_decoder`).
`opo_cli.rollout.generate_rollout` uses CUDA: static and compiled; elsewhere the dynamic cache
in eager mode.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, StaticCache

from opo_cli.logprobs import positions

CHECK_EVERY = 16  # tokens between the reads of "has every row ended"


def cache_argument(model) -> str:
    """The name of the KV-cache argument of `model`'s forward and `generate`: `cache` in newer
    transformers (5.24), `past_key_values` in older ones (5.17), where `cache` is unknown."""
    forward = inspect.signature(type(model).forward)
    return "cache" if "cache" in forward.parameters else "past_key_values"


@torch.no_grad()
def shared_prefill(model, prompt_ids: Tensor, prompt_mask: Tensor, group_size: int):
    """The KV cache of every prompt but its last token, computed once per prompt and repeated
    for its `group_size` samples: (P, Lp) -> a DynamicCache of N = P * G rows, Lp - 1 long.

    `generate` given this cache and the N full prompts runs only their last token before
    decoding (its documented prompt reuse); positions count from each row's first real
    token, as `generate` counts them.
    """
    cache = DynamicCache(config=model.config)
    mask = prompt_mask[:, :-1]  # (P, Lp - 1)
    model(
        input_ids=prompt_ids[:, :-1],
        attention_mask=mask,
        position_ids=positions(mask),  # (P, Lp - 1)
        use_cache=True,
        logits_to_keep=1,
        **{cache_argument(model): cache},
    )
    cache.batch_repeat_interleave(group_size)
    return cache


WIDTH_STEP = 128  # static cache lengths are rounded up to this: fewer shapes, fewer recompiles


class StaticDecoder:
    """A StaticCache of `rows` x `width` positions and the decoding forward over it.

    Kept from one rollout to the next (`static_decoder`), so that the buffers keep their
    addresses and the compiled forward (`compiled`: torch.compile's reduce-overhead mode,
    CUDA graphs on CUDA) is captured once per shape, not once per rollout.
    """

    def __init__(self, model, rows: int, width: int, compiled: bool):
        self.key = (id(model), rows)
        self.model, self.width, self.compiled = model, width, compiled
        self.cache = StaticCache(config=model.config, max_cache_len=width)
        self.kwargs = cache_kwargs(model, self.cache)
        self.step = (
            torch.compile(self.forward, mode="reduce-overhead", dynamic=False)
            if compiled
            else self.forward
        )

    def forward(self, token: Tensor, position: Tensor, mask: Tensor) -> Tensor:
        return one_token(self.model, self.kwargs, token, position, mask)

    def load(self, prefix: DynamicCache, group_size: int) -> None:
        """Empty the buffers, then write `prefix`'s keys and values (P rows) at positions
        0.. of rows i * G .. i * G + G - 1, G = `group_size`, one layer at a time."""
        self.cache.reset()
        for layer, filled in zip(self.cache.layers, prefix.layers, strict=True):
            keys = filled.keys.repeat_interleave(group_size, 0)  # (N, heads, Lp - 1, dim)
            values = filled.values.repeat_interleave(group_size, 0)
            layer.update(keys, values)  # allocates on first use, then writes in place

    def __call__(self, token: Tensor, position: Tensor, mask: Tensor) -> Tensor:
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed
        return self.step(token, position, mask)


_DECODER: list[StaticDecoder] = []  # the one kept: its cache holds rows x width x layers


def static_decoder(model, rows: int, width: int, compiled: bool) -> StaticDecoder:
    """The kept decoder if it fits (same model, rows and mode, at least `width` positions),
    else a new one in its place: lengths only grow, so a run compiles a few times at most."""
    kept = _DECODER[0] if _DECODER else None
    if kept and kept.key == (id(model), rows) and kept.compiled == compiled and kept.width >= width:
        return kept
    _DECODER[:] = []  # free the old buffers first
    _DECODER.append(StaticDecoder(model, rows, width, compiled))
    return _DECODER[0]


def sample_tokens(logits: Tensor, temperature: float, top_p: float):
    """One token per row from softmax(logits / T) cut to its top-p nucleus, with the log-prob
    and entropy of the distribution at temperature T: (n, V) -> (n,) x 3."""
    logp = (logits.float() / temperature).log_softmax(-1)  # (n, V)
    probs = logp.exp()  # (n, V)
    entropy = torch.special.entr(probs).sum(-1)  # (n,)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)  # (n, V)
        cut_sorted = sorted_p.cumsum(-1) - sorted_p >= top_p  # (n, V) mass above reached top_p
        cut = torch.empty_like(cut_sorted).scatter_(-1, order, cut_sorted)  # (n, V)
        probs = probs.masked_fill(cut, 0.0)  # (n, V) the top token always stays
    token = torch.multinomial(probs, 1).squeeze(-1)  # (n,) multinomial renormalises
    return token, logp.gather(-1, token[:, None]).squeeze(-1), entropy


def one_token(model, kwargs: dict, token: Tensor, position: Tensor, mask: Tensor) -> Tensor:
    """Logits of one new token per row, written into the cache in `kwargs`: (n, 1) ids and
    positions, (n, W) mask -> (n, 1, V)."""
    return model(input_ids=token, attention_mask=mask, position_ids=position, **kwargs).logits


def cache_kwargs(model, cache) -> dict:
    """The forward's arguments for decoding into `cache`, one token's logits kept."""
    return {cache_argument(model): cache, "use_cache": True, "logits_to_keep": 1}


@torch.no_grad()
def decode(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    group_size: int,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    static: bool = False,
    compiled: bool = False,
    check_every: int = CHECK_EVERY,
) -> tuple[Tensor, Tensor, Tensor]:
    """`group_size` completions of each of the P left-padded prompts (P, Lp), grouped per
    prompt: the sampled ids (N, Lc), padding after a row's EOS (the first of `stop_ids` it
    samples), and each token's log-prob and entropy (N, Lc). Lc is `max_new_tokens`, or less
    when every row ended sooner.
    """
    if prompt_ids.shape[1] == 1:  # one padding column in front: the prefill has a column
        prompt_ids = F.pad(prompt_ids, (1, 0), value=pad_id)  # (P, 2)
        prompt_mask = F.pad(prompt_mask, (1, 0), value=0)  # (P, 2)
    G, (P, Lp) = group_size, prompt_ids.shape
    N = P * G
    width = Lp + max_new_tokens - 1  # every token fed: the prompt, then all but the last sampled
    if static:
        step = static_decoder(model, N, -(-width // WIDTH_STEP) * WIDTH_STEP, compiled)
        width = step.width  # the kept cache may be longer; its mask spans all of it
        step.load(shared_prefill(model, prompt_ids, prompt_mask, 1), G)  # P rows, Lp - 1 long
    else:
        prefix = shared_prefill(model, prompt_ids, prompt_mask, G)  # N rows, Lp - 1 long
        step = functools.partial(one_token, model, cache_kwargs(model, prefix))
    mask = torch.ones(N, width, dtype=prompt_mask.dtype, device=prompt_mask.device)  # (N, W)
    mask[:, :Lp] = prompt_mask.repeat_interleave(G, 0)
    start = positions(prompt_mask)[:, -1].repeat_interleave(G, 0)[:, None]  # (N, 1)
    token = prompt_ids[:, -1:].repeat_interleave(G, 0)  # (N, 1) the prompts' last tokens
    done = torch.zeros(N, dtype=torch.bool, device=prompt_ids.device)  # (N,)
    stops = torch.as_tensor(list(stop_ids), device=prompt_ids.device)  # (S,)
    ids, logps, entropies = [], [], []
    for t in range(max_new_tokens):
        view = mask if static else mask[:, : Lp + t]  # the static cache's mask spans its buffer
        logits = step(token, start + t, view)[:, -1]  # (N, V)
        new, logp, entropy = sample_tokens(logits, temperature, top_p)  # (N,) x 3
        new = new.masked_fill(done, pad_id)  # (N,)
        ids.append(new)
        logps.append(logp.masked_fill(done, 0.0))
        entropies.append(entropy.masked_fill(done, 0.0))
        done = done | torch.isin(new, stops)
        if (t + 1) % check_every == 0 and bool(done.all()):
            break
        token = new[:, None]  # (N, 1)
    return torch.stack(ids, 1), torch.stack(logps, 1), torch.stack(entropies, 1)  # (N, Lc) x 3
