"""Benchmark MATH grading: every Level 3 test solution graded against itself must pass.

Each of the 1,131 Level 3 problems of test.jsonl is graded with `score_math(response=solution,
gold=solution)`: a check that the answer of every reference solution is found, and a measure of
throughput. Two passes: first as `score_math` grades a rollout (string fast path, math-verify
where needed), then with the fast path off so that every case goes through math-verify in the
worker pool (the slow path; a check that math-verify accepts each answer as itself).

    python scripts/bench_grading.py
    python scripts/bench_grading.py --workers 8 --timeout 5 --data /path/to/math
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from opo_cli.rewards import (
    configure_math_grading,
    extract_boxed,
    score_math,
    shutdown_math_grading,
)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "math"


def load_level(path: Path, level: str) -> list[dict]:
    """Rows of a MATH JSONL file at the given level ("Level 3")."""
    with path.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["level"] == level]


def run_mode(rows: list[dict], fast_path: bool) -> list[int]:
    """Grade every solution against itself; print the numbers; the failing row indices."""
    solutions = [r["solution"] for r in rows]
    start = time.perf_counter()
    scores = score_math(solutions, solutions, fast_path=fast_path)
    wall = time.perf_counter() - start
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
    ap.add_argument("--level", default="Level 3")
    ap.add_argument("--workers", type=int, default=None, help="grading processes")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds per case")
    args = ap.parse_args()
    test_file = args.data / "test.jsonl"
    if not test_file.exists():
        print(f"error: {test_file} not found (pass --data)", file=sys.stderr)
        return 2
    rows = load_level(test_file, args.level)
    configure_math_grading(timeout_s=args.timeout, workers=args.workers)
    start = time.perf_counter()
    score_math([r"\boxed{1}"], ["2"])  # start the worker processes outside the timings
    print(f"{len(rows)} {args.level} solutions of {test_file}, each graded against itself")
    print(f"{'pool start':>26}: {time.perf_counter() - start:.2f} s, timeout {args.timeout:g} s")
    failed = run_mode(rows, fast_path=True) + run_mode(rows, fast_path=False)
    shutdown_math_grading()
    print("OK: every answer graded correct" if not failed else f"FAILED: {len(failed)} cases")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
