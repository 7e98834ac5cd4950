"""Run by tests/test_distributed_eval.py on each rank of one torchrun launch: `opo eval`
through the CLI's `main`, several times in one process (each call joins and leaves the
process group), and each rank's exit code and stderr lines written as JSON.

    python -m torch.distributed.run --standalone --nproc_per_node=2 \
        tests/distributed_eval_ranks.py OUT CHECKPOINT

Scenarios: greedy and sampled evaluations into OUT/greedy and OUT/sampled; rank 1 failing
to load the model (OUT/failed, never written); a bad override (eval.n=0).

    tests/distributed_eval_ranks.py OUT CHECKPOINT crash    # in each of 2 SLURM-like tasks

instead dies on rank 1 in its second batch, without a word (`os._exit`), as a process killed
for memory does; rank 0 records how it ended.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

from opo_cli import cli, evaluate

COMMON = ["dataset=arith", "eval.limit=9", "eval.batch_size=2", "eval.max_new_tokens=3"]


def run(args: list[str]) -> dict:
    """`opo eval args` in this process: its exit code and stderr lines."""
    err = io.StringIO()
    sys.argv = ["opo", "eval", *args]
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            cli.main()
        except SystemExit as e:
            code = e.code
    return {"code": code, "errors": [x for x in err.getvalue().splitlines() if "opo:" in x]}


def crash(out: Path, base: list[str]) -> None:
    """Rank 1 exits in the middle of the evaluation; rank 0 writes how its own run ended."""
    rank = int(os.environ["SLURM_PROCID"])
    if rank == 1:
        graded = evaluate.grade_batch
        calls = []

        def dying(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os._exit(9)
            return graded(*args, **kwargs)

        evaluate.grade_batch = dying
    record = run([*base, f"hydra.run.dir={out / 'crash'}"])
    (out / f"crash{rank}.json").write_text(json.dumps(record))


def main() -> None:
    out, checkpoint = Path(sys.argv[1]), sys.argv[2]
    base = [f"checkpoint={checkpoint}", *COMMON]
    if sys.argv[3:] == ["crash"]:
        crash(out, base)
        return
    rank = int(os.environ["RANK"])
    record = {
        "greedy": run([*base, f"hydra.run.dir={out / 'greedy'}"]),
        "sampled": run([*base, "eval.n=3", "seed=7", f"hydra.run.dir={out / 'sampled'}"]),
    }
    if rank == 1:
        real = evaluate.load_first_readable

        def broken(*args, **kwargs):
            raise evaluate.UserError("rank 1 cannot read the checkpoint")

        evaluate.load_first_readable = broken
    record["failed"] = run([*base, f"hydra.run.dir={out / 'failed'}"])
    if rank == 1:
        evaluate.load_first_readable = real
    record["bad_override"] = run([*base, "eval.n=0", f"hydra.run.dir={out / 'bad'}"])
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
