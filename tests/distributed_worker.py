"""What tests/test_distributed.py runs on 2 processes (gloo, CPU): one launch for every case.

python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_worker.py OUT

For every loss in LOSSES, under DDP and FSDP2, each rank back-propagates its half of a global
mini-batch (`opo_cli.train.backward_minibatch`) with a different micro-batch count per rank
and completions of different widths; rank 0 writes, per case, the largest difference to the
gradient and loss of one process on the whole batch. Then each rank generates a different
number of tokens with the weights gathered (`parallel.full_weights`), and the ranks meet in a
collective afterwards: a hang there fails the launch's timeout. Before those, the rollout
metrics of the two halves against the whole batch's, and DAPO's dynamic-sampling rounds.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from opo_cli import distributed
from opo_cli.logprobs import completion_logps
from opo_cli.losses import LOSSES, ROW_SEPARABLE, LossInputs
from opo_cli.parallel import full_weights, shard, trainee
from opo_cli.rollout import Rollout, dynamic_sample, rollout_metrics
from opo_cli.train import backward_minibatch

P, G, LP, LC = 4, 3, 3, 5  # 4 groups of 3 rows; prompts of 3 tokens, completions up to 5
KWARGS = {
    "opo": {"alpha": 0.3, "mu": 2.0},
    "opo_code": {
        "alpha": 0.25,
        "mu": 0.5,
        "use_adaptive_tau": True,  # one tau for the whole batch: couples the ranks' rows
        "logit_reg_coef": 0.01,
        "vocab_size": 32,
    },
    "grpo": {"beta": 0.05},  # with the reference: k3 on every token
    "dapo": {},  # token mean over the batch: the ranks' token counts differ
    "gspo": {"clip_low": 0.05, "clip_high": 0.05},
    "dpo": {"beta": 0.5},
}


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).double()


def global_batch() -> tuple[Rollout, torch.Tensor, torch.Tensor]:
    """P*G rows: left-padded prompts, completions whose lengths differ (rank 1's, the last
    two groups, are at most 3 long: its rollout is narrower); pi_old and reference log-probs
    off the model's, so that ratios and k3 are not trivial."""
    g = torch.Generator().manual_seed(1)
    n = P * G
    ids = torch.randint(1, 32, (n, LP + LC), generator=g)
    lengths = torch.randint(1, LC + 1, (n,), generator=g)
    lengths[n // 2 :] = lengths[n // 2 :].clamp(max=3)
    completion = (torch.arange(LC) < lengths[:, None]).double()  # (N, Lc)
    prompt = torch.ones(n, LP, dtype=torch.long)
    prompt[::2, 0] = 0  # every other prompt left-padded by one
    rewards = torch.randint(0, 3, (n,), generator=g).double()
    rewards[:G] = 1.0  # one uniform group
    ids = ids * torch.cat([prompt, completion.long()], 1)  # padding id 0
    rollout = Rollout(
        input_ids=ids,
        attention_mask=torch.cat([prompt, completion.long()], 1),
        completion_mask=completion,
        truncated=torch.zeros(n, dtype=torch.bool),
        rewards=rewards,
        texts=[""] * n,
        group_size=G,
    )
    noise = 0.1 * torch.randn(n, LC, generator=g, dtype=torch.float64)
    return rollout, noise, 0.1 * torch.randn(n, LC, generator=g, dtype=torch.float64)


def single_process(model, rollout, old_shift, ref_shift, name):
    """Loss and gradient of one process on the whole batch: the definition."""
    model = copy.deepcopy(model)
    logps, _ = completion_logps(model, rollout.input_ids, rollout.attention_mask, LC)
    old = logps.detach() + old_shift
    ref = logps.detach() + ref_shift
    x = LossInputs(logps, old, ref, rollout.completion_mask, rollout.rewards, G)
    loss, _ = LOSSES[name](x, **KWARGS[name])
    loss.backward()
    return loss.item(), {k: p.grad for k, p in model.named_parameters()}, old, ref


def my_share(rollout: Rollout, old, ref, rank: int):
    """This rank's groups, cut to its own widest completion (as its rollout would be)."""
    rows = torch.arange(rank * P // 2 * G, (rank + 1) * P // 2 * G)
    mine = rollout.rows(rows)
    width = int(mine.completion_mask.sum(-1).max())
    end = LP + width
    mine.input_ids, mine.attention_mask = mine.input_ids[:, :end], mine.attention_mask[:, :end]
    mine.completion_mask = mine.completion_mask[:, :width]
    return mine, old[rows, :width], ref[rows, :width]


def full_grads(model) -> dict[str, torch.Tensor]:
    return {
        k: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        for k, p in model.named_parameters()
    }


def gradient_case(base, strategy: str, name: str, rank: int) -> dict[str, float]:
    rollout, old_shift, ref_shift = global_batch()
    want_loss, want, old, ref = single_process(base, rollout, old_shift, ref_shift, name)
    model = copy.deepcopy(base)
    if strategy == "fsdp2":
        shard(model)
    wrapped = trainee(model, strategy)
    mine, my_old, my_ref = my_share(rollout, old, ref, rank)
    micro = 1 if rank == 0 else 4  # 6 micro-batches on rank 0, 2 on rank 1
    loss, _ = backward_minibatch(
        model,
        mine,
        my_old,
        my_ref,
        LOSSES[name],
        KWARGS[name],
        micro,
        1.0,
        separable=name in ROW_SEPARABLE,
        trainee=wrapped,
    )
    got = full_grads(model)
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    scale = max(w.abs().max().item() for w in want.values())
    return {"grad_diff": diff, "grad_scale": scale, "loss_diff": abs(loss - want_loss)}


def generation_case(base, strategy: str, rank: int) -> int:
    """Rank r decodes 2 + 5r tokens with the weights gathered once; returns the count."""
    model = copy.deepcopy(base)
    if strategy == "fsdp2":
        shard(model)
    ids = torch.ones(1 + rank, 3, dtype=torch.long)
    new = 2 + 5 * rank
    with full_weights(model), torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    distributed.barrier()  # both ranks got here: no collective was left unmatched
    return out.shape[1] - ids.shape[1]


def metrics_case(rank: int) -> dict[str, float]:
    """`rollout_metrics` of each rank's half, against the same numbers of the whole batch
    taken by hand: the logged metrics are global, not rank 0's share."""
    rollout, _, _ = global_batch()
    whole = {
        "train/reward_mean": rollout.rewards.mean().item(),
        "train/reward_std": rollout.rewards.std().item(),
        "train/response_len_mean": rollout.completion_mask.sum(-1).mean().item(),
    }
    got = rollout_metrics(rollout.rows(torch.arange(rank * 6, rank * 6 + 6)))
    return {k: abs(got[k] - v) for k, v in whole.items()}


def dynamic_sampling_case(rank: int) -> dict[str, float]:
    """DAPO's rounds agreed: rank 0's first draw is all informative, rank 1's first draw is
    all uniform and its second informative; both must draw twice. Returns rank 0's stats."""
    rounds = []

    def draw(k: int) -> Rollout:
        rounds.append(k)
        informative = rank == 0 or len(rounds) > 1
        rewards = torch.tensor([0.0, 1.0] * k if informative else [1.0, 1.0] * k)
        return Rollout(
            input_ids=torch.ones(2 * k, 2, dtype=torch.long),
            attention_mask=torch.ones(2 * k, 2, dtype=torch.long),
            completion_mask=torch.ones(2 * k, 1),
            truncated=torch.zeros(2 * k, dtype=torch.bool),
            rewards=rewards,
            texts=[""] * 2 * k,
            group_size=2,
        )

    _, _, stats = dynamic_sample(draw, prompts=2, max_extra_rounds=3, pad_id=0)
    return {"rounds": len(rounds), **stats}


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    base = tiny_model()
    results = {
        "metrics": distributed.gather_objects(metrics_case(rank)),
        "dynamic_sampling": distributed.gather_objects(dynamic_sampling_case(rank)),
    }
    for strategy in ("ddp", "fsdp2"):
        for name in LOSSES:
            results[f"{strategy}/{name}"] = gradient_case(base, strategy, name, rank)
        decoded = distributed.gather_objects(generation_case(base, strategy, rank))
        results[f"{strategy}/generated"] = decoded
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
