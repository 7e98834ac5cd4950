"""`opo train|eval|report`: thin wiring of Hydra apps onto the plain functions.

opo train method=opo alpha=0.6 mu=1.0                      # one run
opo train -m method=opo alpha=0.3,0.6,0.9 mu=0.5,1.0,2.0   # a sweep
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from opo_cli.config import CONF_DIR, group_options
from opo_cli.errors import UserError

GROUPS = ("method", "model", "dataset", "logger", "sweep", "experiment")
_GROUP_OVERRIDE = re.compile(rf"^[+~]*({'|'.join(GROUPS)})=(.*)$")

USAGE = """usage: opo COMMAND [overrides ...]

commands:
  train    train a causal LM with OPO or a baseline (opo train --help for the config)
  eval     measure a checkpoint's accuracy on MATH (pass@1, pass@k, maj@k)
  report   tables and plots of runs and sweeps: opo report PATH [PATH ...]

examples:
  opo train                                        # the embedded default, offline
  opo train method=opo alpha=0.6 mu=1.0
  opo train -m method=opo alpha=0.3,0.6,0.9 mu=0.5,1.0,2.0
"""


def fail(message: str, code: int = 2) -> None:
    """End the program with one clear line on stderr, no traceback."""
    print(f"opo: error: {message}", file=sys.stderr)
    sys.exit(code)


def check_group_overrides(args: list[str]) -> None:
    """Unknown config-group options end in one line that lists the valid ones."""
    for arg in args:
        m = _GROUP_OVERRIDE.match(arg)
        if not m:
            continue
        group, values = m.groups()
        options = group_options(group)
        for value in values.split(","):
            if value and value not in options:
                fail(f"{group}={value}: no such {group}; choose one of: {', '.join(options)}")


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base=None)
def train_app(cfg: DictConfig) -> None:
    from opo_cli.train import train

    try:
        train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except UserError as e:
        fail(str(e))


def run_hydra_app(app, name: str, args: list[str]) -> None:
    check_group_overrides(args)
    sys.argv = [f"opo {name}", *args]
    app()


_OVERRIDE = re.compile(r"^[+~]*[A-Za-z_][\w.]*=")


def split_paths(args: list[str]) -> tuple[list[str], list[str]]:
    """Positional paths and `key=value` overrides of `opo report` (a path may hold '=')."""
    paths, overrides = [], []
    for arg in args:
        is_path = Path(arg).exists() or "/" in arg.split("=", 1)[0] or not _OVERRIDE.match(arg)
        (paths if is_path else overrides).append(arg)
    return paths, overrides


def run_report(args: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from opo_cli.report import report

    paths, overrides = split_paths(args)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("report", overrides=overrides)
    if paths:
        OmegaConf.update(cfg, "paths", paths)
    try:
        report(cfg)
    except UserError as e:
        fail(str(e))


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    command, args = argv[0], argv[1:]
    if command == "train":
        run_hydra_app(train_app, "train", args)
    elif command == "report":
        run_report(args)
    elif command == "eval":
        fail(f"`opo {command}` is not available yet")
    else:
        fail(f"unknown command '{command}'; choose one of: train, eval, report")


if __name__ == "__main__":
    main()
