"""Log-probs and entropies of the sampled tokens, recorded while `generate` samples them.

With `rollout.reuse_sampling_logps`, these are pi_old for the step: the first optimisation
pass is exactly on-policy (the rollout was sampled by the current weights), so the usual
no-grad forward over the whole rollout that recomputes them is skipped. In float32 the two
agree to about 1e-6 (cached decoding and a full forward sum in different orders), so `auto`
turns it on for float32 weights (the CPU default; a third off the training time of the tiny
benchmark step). In bf16 the decoding and training kernels differ by more, so `auto` leaves
it off there and pi_old is recomputed, as verl and TRL do.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LogitsProcessor


def keeps_sampling_logps(setting: bool | None, model) -> bool:
    """`rollout.reuse_sampling_logps`: True, False, or None (auto: True for float32 weights)."""
    if setting is None:
        return next(model.parameters()).dtype == torch.float32
    return setting


class SampledTokenLogps(LogitsProcessor):
    """A logits processor that keeps log softmax(scores / T)[sampled token] at every step.

    Passed to `generate(logits_processor=...)`, it runs after the model's own processors and
    before temperature and top-p (which `generate` appends last), and returns the scores
    unchanged. The rollout's generate call runs under a config of our own that sets no other
    processor (`opo_cli.generation`), so the scores it sees are the raw logits: the
    distribution the training forward recomputes at temperature T.
    The token sampled at step t is read at step t + 1, where it ends `input_ids`; `finish`
    reads the last one.
    """

    def __init__(self, prompt_len: int, temperature: float):
        self.prompt_len = prompt_len
        self.temperature = temperature
        self.logps: list[Tensor] = []  # (N,) per sampled token
        self.entropies: list[Tensor] = []  # (N,) per step
        self.last: Tensor | None = None  # (N, V) log-probs of the latest step

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if input_ids.shape[1] > self.prompt_len:
            self.logps.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))  # (N,)
        logp = (scores.float() / self.temperature).log_softmax(-1)  # (N, V)
        self.entropies.append(torch.special.entr(logp.exp()).sum(-1))  # (N,)
        self.last = logp
        return scores

    def finish(self, completion_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probs and entropies of the completions, 0 where `mask` is 0: (N, Lc) -> (N, Lc) x 2.

        `generate` may run a step or two past the last kept token (deferred stop checks);
        those extra steps are dropped.
        """
        width = completion_ids.shape[1]
        logps = self.logps[:width]
        if len(logps) < width:  # the last token was sampled by the last step seen
            logps.append(self.last.gather(-1, completion_ids[:, width - 1 :]).squeeze(-1))
        self.last = None
        keep = mask.bool()  # (N, Lc)
        logps = torch.stack(logps, 1).where(keep, 0.0)  # (N, Lc)
        return logps, torch.stack(self.entropies[:width], 1).where(keep, 0.0)  # (N, Lc) x 2
