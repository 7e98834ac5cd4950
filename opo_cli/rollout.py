"""Rollouts: G sampled completions per prompt, stored grouped contiguously, with masks.

Row layout (N = P * G rows): left-padded prompt tokens, then completion tokens. The
completion mask is 1 up to and including the first EOS; a completion with no EOS within
`max_new_tokens` is truncated (mask 1 on all of its tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class Rollout:
    input_ids: Tensor  # (N, Lp + Lc) left-padded prompts, then completions
    attention_mask: Tensor  # (N, Lp + Lc) 1 on real prompt and completion tokens
    completion_mask: Tensor  # (N, Lc) float, 1 on completion tokens up to and including EOS
    truncated: Tensor  # (N,) bool, no EOS within max_new_tokens
    rewards: Tensor  # (N,) float
    texts: list[str]  # decoded completions, special tokens removed
    group_size: int  # G

    @property
    def completion_len(self) -> int:
        return self.completion_mask.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: Tensor) -> Rollout:
        """The sub-rollout of rows `index` (whole groups keep group statistics meaningful)."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                picked[f.name] = value[index]
            elif isinstance(value, list):
                picked[f.name] = [value[i] for i in index.tolist()]
            else:
                picked[f.name] = value
        return Rollout(**picked)


def completion_mask_from_ids(completion_ids: Tensor, eos_id: int) -> tuple[Tensor, Tensor]:
    """Mask up to and including the first EOS, and the truncated flag: (N, Lc) -> (N, Lc), (N,)."""
    is_eos = completion_ids == eos_id  # (N, Lc)
    seen_before = is_eos.long().cumsum(-1) - is_eos.long()  # (N, Lc) EOS strictly before t
    mask = (seen_before == 0).float()  # (N, Lc)
    return mask, ~is_eos.any(-1)


@torch.no_grad()
def generate_rollout(
    model,
    tok,
    prompts: list[str],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> Rollout:
    """Sample `group_size` completions of each prompt; rewards are filled in by the caller."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    prompt_ids = enc.input_ids.repeat_interleave(group_size, 0).to(device)  # (N, Lp)
    prompt_mask = enc.attention_mask.repeat_interleave(group_size, 0).to(device)  # (N, Lp)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model.train(was_training)
    completion_ids = out[:, prompt_ids.shape[1] :]  # (N, Lc)
    mask, truncated = completion_mask_from_ids(completion_ids, tok.eos_token_id)
    completion_ids = torch.where(mask.bool(), completion_ids, tok.pad_token_id)  # (N, Lc)
    texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(
        input_ids=torch.cat([prompt_ids, completion_ids], 1),  # (N, Lp + Lc)
        attention_mask=torch.cat([prompt_mask, mask.long()], 1),  # (N, Lp + Lc)
        completion_mask=mask,
        truncated=truncated,
        rewards=torch.zeros(len(texts), device=device),
        texts=texts,
        group_size=group_size,
    )
