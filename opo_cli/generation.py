"""What the samplers sample from: a `GenerationConfig` of our own, and the ids that end a text.

The losses assume each completion was sampled from softmax(logits / T) cut to its top-p
nucleus (and greedy evaluation from the argmax of the logits): that is the distribution the
training forward recomputes. A model's own `generation_config.json` often says more (hub
instruct models ship a repetition penalty, top-k, min-p, ...), and `generate` would apply it:
every field a config passed to `generate` leaves unset (None) is filled from
`model.generation_config`. So a config of our own is not enough on its own: `generate_own`
also puts it in the model's place for the call, and nothing of the model's leaks in.

A completion ends at the first of its stop ids (`stop_token_ids`): the tokenizer's EOS and
every EOS the model's generation config names (Qwen3 names `<|im_end|>` and `<|endoftext|>`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from transformers import GenerationConfig


def stop_token_ids(model, tok) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS, then every EOS id the model's
    generation config names, without repeats."""
    named = model.generation_config.eos_token_id
    named = [] if named is None else [named] if isinstance(named, int) else list(named)
    ids = [tok.eos_token_id, *named] if tok.eos_token_id is not None else named
    return list(dict.fromkeys(int(i) for i in ids))


def sampling_config(
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    cache_implementation: str | None = None,
) -> GenerationConfig:
    """Sampling at `temperature` with nucleus `top_p` (or `greedy` decoding), no other
    processor: every setting that shapes the distribution is written out at its neutral
    value, as TRL's GRPO trainer builds its own."""
    shape = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    return GenerationConfig(
        do_sample=not greedy,
        **shape,
        max_new_tokens=max_new_tokens,
        min_length=0,
        num_beams=1,
        num_return_sequences=1,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        guidance_scale=1.0,
        remove_invalid_values=False,
        renormalize_logits=False,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        cache_implementation=cache_implementation,
    )


def generate_own(model, config: GenerationConfig, **inputs) -> Tensor:
    """`model.generate(**inputs)` under `config` alone: the model's own generation config is
    set aside for the call (see the module docstring), then put back."""
    kept = model.generation_config
    model.generation_config = config
    try:
        return model.generate(generation_config=config, **inputs)
    finally:
        model.generation_config = kept
