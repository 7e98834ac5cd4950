"""Benchmark MATH grading: accuracy on a labelled set, and throughput.

Three passes, each timed:

1. The labelled set `tests/data/math_answers.jsonl` (see docs/math.md): rewrites and near misses
   of MATH test answers, each with its verdict decided by hand. Reports the accuracy, the false
   positives (wrong answers graded right) and the false negatives.
2. Each of the 1,131 Level 3 test solutions graded against itself with `score_math`, as a
   rollout is graded (string fast path, math-verify where needed): every answer must be found.
3. The same with the fast path off, so that every case goes through math-verify in the worker
   pool (the slow path; a check that math-verify accepts each answer as itself).

    python scripts/bench_grading.py
    python scripts/bench_grading.py --workers 8 --timeout 5 --data /path/to/math
    python scripts/bench_grading.py --workers 2 --repeat 5   # best of 5 on a busy machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from opo_cli.rewards import (
    configure_math_grading,
    extract_boxed,
    score_math,
    shutdown_math_grading,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "math"
LABELLED = REPO / "tests" / "data" / "math_answers.jsonl"


def load_level(path: Path, level: str) -> list[dict]:
    """Rows of a MATH JSONL file at the given level ("Level 3")."""
    with path.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["level"] == level]


REPEAT = 1  # passes per timing; the fastest counts (--repeat, for a machine shared with others)


def timed_scores(responses: list[str], golds: list[str], fast_path: bool) -> tuple[list, float]:
    """The scores, and the fastest wall time of REPEAT gradings."""
    walls = []
    for _ in range(REPEAT):
        start = time.perf_counter()
        scores = score_math(responses, golds, fast_path=fast_path)
        walls.append(time.perf_counter() - start)
    return scores, min(walls)


def run_labelled(path: Path) -> None:
    """Grade the labelled set; print accuracy, throughput and every disagreement."""
    with path.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    scores, wall = timed_scores([r["response"] for r in rows], [r["gold"] for r in rows], True)
    verdicts = [s == 1.0 for s in scores]
    right = sum(v == r["right"] for v, r in zip(verdicts, rows, strict=True))
    fp = [r for v, r in zip(verdicts, rows, strict=True) if v and not r["right"]]
    fn = [r for v, r in zip(verdicts, rows, strict=True) if r["right"] and not v]
    label = f"labelled set ({len(rows)})"
    print(f"{label:>26}: {right} / {len(rows)} right ({right / len(rows):.1%}), ", end="")
    print(f"{len(fp)} false positives, {len(fn)} false negatives, ", end="")
    print(f"{wall:.2f} s wall, {len(rows) / wall:,.0f} answers/s")
    kinds = Counter(r["kind"] for r in rows)
    print(" " * 28 + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    for tag, misses in (("FALSE POSITIVE", fp), ("false negative", fn)):
        for r in misses:
            answer = extract_boxed(r["response"])
            print(f"  {tag} ({r['kind']}): {answer!r} against gold {r['gold']!r}")


def run_mode(rows: list[dict], fast_path: bool) -> list[int]:
    """Grade every solution against itself; print the numbers; the failing row indices."""
    solutions = [r["solution"] for r in rows]
    scores, wall = timed_scores(solutions, solutions, fast_path)
    failed = [i for i, s in enumerate(scores) if s != 1.0]
    mode = "fast path + math-verify" if fast_path else "math-verify on every case"
    print(f"{mode:>26}: {len(rows) - len(failed)} / {len(rows)} correct, ", end="")
    print(f"{wall:.2f} s wall, {len(rows) / wall:,.0f} answers/s")
    for i in failed:
        print(f"  FAIL #{i} {rows[i]['type']}: answer {extract_boxed(solutions[i])!r}")
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with test.jsonl")
    ap.add_argument("--labelled", type=Path, default=LABELLED, help="labelled answers (JSONL)")
    ap.add_argument("--level", default="Level 3")
    ap.add_argument("--workers", type=int, default=None, help="grading processes")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds per case")
    ap.add_argument("--repeat", type=int, default=1, help="time each pass N times, keep the best")
    args = ap.parse_args()
    global REPEAT
    REPEAT = max(1, args.repeat)
    test_file = args.data / "test.jsonl"
    for path in (test_file, args.labelled):
        if not path.exists():
            print(f"error: {path} not found (pass --data or --labelled)", file=sys.stderr)
            return 2
    rows = load_level(test_file, args.level)
    configure_math_grading(timeout_s=args.timeout, workers=args.workers)
    start = time.perf_counter()
    score_math([r"\boxed{x}"], ["y"])  # start the worker processes outside the timings
    print(f"{'pool start':>26}: {time.perf_counter() - start:.2f} s, timeout {args.timeout:g} s")
    run_labelled(args.labelled)
    print(f"{len(rows)} {args.level} solutions of {test_file}, each graded against itself")
    failed = run_mode(rows, fast_path=True) + run_mode(rows, fast_path=False)
    shutdown_math_grading()
    print("OK: every answer graded correct" if not failed else f"FAILED: {len(failed)} cases")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
