"""Mutation testing of the core modules with mutmut, one module at a time (`make mutate`).

For each module of `[tool.opo.mutate]` in pyproject.toml this starts a fresh `mutants/` copy,
mutates that module only (or only the functions its `functions` globs name), and runs
against each mutant the tests of the module's own `tests` files that reach the mutated
function (mutmut's `[tool.mutmut]` holds the rest). It prints killed / survived per module
and the score over the mutants that are not equivalent (`equivalent`, each with its reason
in docs/testing.md), and writes the details to `.mutation/<module>.json`. Slow (minutes to
an hour per module on 2 busy cores), so not in CI. Run:
    python scripts/mutate.py                 # every module, one after the other
    python scripts/mutate.py losses runs     # some of them
    python scripts/mutate.py --children 2    # mutants tested at once (default 1)
    python scripts/mutate.py losses --mutants 'opo_cli.losses.x_dpo_loss__*'   # some mutants
Exit status 1 when a module scores under `--target` (default 0.9). Needs Python >= 3.11 (tomllib).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / ".mutation"
KILLED = {"killed", "timeout", "segfault", "caught by type check"}


def settings() -> dict[str, dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["opo"]["mutate"]


def run_one(name: str, children: int, mutants: list[str]) -> None:
    """In this process: mutmut on module `name` alone (its `mutants` if given, names or
    globs), with its own test files."""
    import mutmut.configuration as mc
    from mutmut.__main__ import _run

    module = settings()[name]
    base_reader = mc._config_reader()
    overrides = {
        "only_mutate": [module["path"]],
        "pytest_add_cli_args_test_selection": module["tests"],
    }
    mc._config_reader = lambda: lambda key, default: overrides.get(key, base_reader(key, default))
    mc.reset_config()
    prefix = module["path"].removesuffix(".py").replace("/", ".")
    _run(mutants or module.get("functions", [f"{prefix}.*"]), children)


def score(name: str) -> dict:
    """Counts of a finished run, read from mutmut's metadata of the module."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    module = settings()[name]
    meta = json.loads((REPO / "mutants" / f"{module['path']}.meta").read_text())
    statuses = {
        mutant: status_by_exit_code[code]
        for mutant, code in meta["exit_code_by_key"].items()
        if code is not None  # not selected by `functions`
    }
    equivalent = set(module.get("equivalent", []))
    survived = sorted(m for m, s in statuses.items() if s not in KILLED)
    killed = sum(s in KILLED for s in statuses.values())
    counted = len(statuses) - len(equivalent & set(survived))
    return {
        "module": module["path"],
        "mutants": len(statuses),
        "killed": killed,
        "equivalent": sorted(equivalent & set(survived)),
        "not_killed": [f"{m} ({statuses[m]})" for m in survived if m not in equivalent],
        "score": killed / counted if counted else 1.0,
        "diffs": {m: get_diff_for_mutant(m, path=module["path"]) for m in survived},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", help="names in [tool.opo.mutate]; default all")
    parser.add_argument("--children", type=int, default=1)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--mutants", nargs="+", default=[], help="only these (names or globs)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one module, in-process
    args = parser.parse_args()
    os.chdir(REPO)
    if args.one:
        run_one(args.one, args.children, args.mutants)
        return 0
    names = args.modules or list(settings())
    unknown = sorted(set(names) - set(settings()))
    if unknown:
        parser.error(f"unknown module {', '.join(unknown)}; valid: {', '.join(settings())}")
    RESULTS.mkdir(exist_ok=True)
    # one thread: torch's OpenMP pool does not survive mutmut's fork (children hang)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # the tests run inside mutants/, where tests/conftest.py would look for the MATH data
    # next to mutants/ and skip every test that needs it: point them at the checkout's
    env.setdefault("OPO_MATH_DIR", str(REPO.parent / "shared" / "data" / "math"))
    failed = []
    for name in names:
        shutil.rmtree(REPO / "mutants", ignore_errors=True)
        cmd = [sys.executable, __file__, "--one", name, "--children", str(args.children)]
        cmd += ["--mutants", *args.mutants] if args.mutants else []
        subprocess.run(cmd, env=env, check=True)
        result = score(name)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(
            f"{result['module']}: {result['killed']}/{result['mutants']} killed, "
            f"{len(result['equivalent'])} equivalent, score {result['score']:.1%}",
            *result["not_killed"],
            sep="\n  ",
            flush=True,
        )
        if result["score"] < args.target:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
