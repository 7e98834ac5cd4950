"""`opo train|eval|report`: thin wiring of Hydra apps onto the plain functions.

opo train method=opo alpha=0.6 mu=1.0                      # one run
opo train -m method=opo alpha=0.3,0.6,0.9 mu=0.5,1.0,2.0   # a sweep
eval "$(opo train --shell-completion install=bash)"        # tab completion of overrides
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from opo_cli import __version__
from opo_cli.config import (
    CONF_DIR,
    HUB_UNREACHABLE,
    check_conf_dir,
    group_options,
    validate_train,
)
from opo_cli.errors import UserError
from opo_cli.overrides import check_overrides, folded_errors
from opo_cli.stopping import Diverged, Interrupted

GROUPS = ("method", "model", "dataset", "logger", "sweep", "experiment")
_GROUP_OVERRIDE = re.compile(rf"^[+~]*({'|'.join(GROUPS)})=(.*)$")

USAGE = f"""opo {__version__}
usage: opo COMMAND [overrides ...]

commands:
  train    train a causal LM with OPO or a baseline (opo train --help for the config)
  eval     measure a checkpoint's accuracy on MATH (pass@1, pass@k, maj@k)
  report   tables and plots of runs and sweeps: opo report PATH [PATH ...]

options:
  -h, --help       this help
  -V, --version    the version of opo

examples:
  opo train                                        # the embedded default, offline
  opo train method=opo alpha=0.6 mu=1.0
  opo train -m method=opo alpha=0.3,0.6,0.9 mu=0.5,1.0,2.0
  opo eval checkpoint=outputs/train/default dataset=math_l3 eval.limit=100
  eval "$(opo train --shell-completion install=bash)"   # tab completion in this shell
"""
COMPLETION_FLAGS = ("-sc", "--shell-completion")


def fail(message: str, code: int = 2) -> None:
    """End the program with one clear line on stderr, no traceback."""
    sys.stderr.write(f"opo: error: {message}\n")  # one write: ranks on one pipe keep it whole
    sys.exit(code)


def fail_alike(message: str, code: int = 2) -> None:
    """End the program over an error every process of a torchrun launch finds alike, before
    the processes have met (a bad override or value): rank 0 prints the one line, the others
    end with the same code quietly."""
    from opo_cli import distributed  # torch: imported on this error path only

    try:
        main_process = distributed.from_env().is_main
    except UserError:
        main_process = True
    if main_process:
        fail(message, code)
    sys.exit(code)


def check_group_overrides(args: list[str]) -> None:
    """Unknown config-group options end in one line that lists the valid ones.

    A comma list (`method=opo,grpo`) is checked value by value; sweep functions such as
    `glob(*)` are left to Hydra.
    """
    for arg in args:
        m = _GROUP_OVERRIDE.match(arg)
        if not m or "(" in arg:
            continue
        group, values = m.groups()
        options = group_options(group)
        for value in values.split(","):
            if value and value not in options:
                fail_alike(f"{group}={value}: no such {group}; choose one of: {', '.join(options)}")


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base=None)
def train_app(cfg: DictConfig) -> None:
    from opo_cli.distributed import PeerFailed
    from opo_cli.train import train

    try:
        train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except PeerFailed:  # another rank failed and printed why
        sys.exit(1)
    except UserError as e:
        fail(str(e))
    except Interrupted as e:
        print(f"opo: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Diverged as e:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            fail(str(e), e.exit_code)
        print(f"opo: error: {e}; the sweep goes on", file=sys.stderr)


@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base=None)
def eval_app(cfg: DictConfig) -> None:
    from opo_cli.distributed import PeerFailed
    from opo_cli.evaluate import evaluate

    try:
        evaluate(cfg, Path(HydraConfig.get().runtime.output_dir))
    except PeerFailed:  # another rank failed and printed why
        sys.exit(1)
    except UserError as e:
        fail(str(e))


def run_hydra_app(app, name: str, args: list[str], validate=None) -> None:
    """Check `args` (one line per mistake, before any run folder exists), then start `app`."""
    check_group_overrides(args)
    try:
        check_overrides(name, args, validate)
    except UserError as e:
        fail_alike(str(e))
    completion = any(a in COMPLETION_FLAGS for a in args)  # its script is for `opo`, every command
    sys.argv = ["opo" if completion else f"opo {name}", *args]
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
    try:
        with folded_errors(overrides), initialize_config_dir(str(CONF_DIR), version_base=None):
            cfg = compose("report", overrides=overrides)
        if paths:
            OmegaConf.update(cfg, "paths", paths)
        report(cfg)
    except UserError as e:
        fail(str(e))


def quiet_libraries() -> None:
    """Our progress bar is the one on screen: no per-shard bars or load reports from HF."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def offline_without_hub(timeout_s: float = 5.0) -> None:
    """HF_HUB_OFFLINE=1 when the hub's host name does not resolve, so that a hub id loads
    from the local cache or fails at once, instead of after a minute of retried requests.
    Left alone when HF_HUB_OFFLINE is set or a proxy (which resolves names itself) is."""
    if "HF_HUB_OFFLINE" in os.environ or any(os.environ.get(v) for v in PROXY_VARS):
        return
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    resolved = []

    def resolve() -> None:
        try:
            resolved.append(bool(socket.getaddrinfo(host, 443)))
        except OSError:
            resolved.append(False)

    lookup = threading.Thread(target=resolve, daemon=True)  # a broken resolver may hang
    lookup.start()
    lookup.join(timeout_s)
    if not any(resolved):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ[HUB_UNREACHABLE] = host  # beside HF_HUB_OFFLINE: we turned it on


def main() -> None:
    quiet_libraries()
    offline_without_hub()
    try:
        dispatch(sys.argv[1:])
    except KeyboardInterrupt:  # a second Ctrl-C during a step, or one before training starts
        print("opo: interrupted", file=sys.stderr)
        sys.exit(130)


def completion_query(argv: list[str]) -> str | None:
    """`query=SHELL` of `opo -sc query=SHELL` (or `opo train -sc query=SHELL`); else None."""
    if not any(a in COMPLETION_FLAGS for a in argv[:2]):
        return None
    return next((a for a in argv if a.startswith("query=")), None)


def complete(query: str) -> None:
    """`opo -sc query=SHELL`: what Hydra's completion script runs on <TAB>, with the typed line
    in COMP_LINE. The command word is completed here; after it, the line goes to that command's
    app as if the app were the program (`opo train meth` is asked as `opo meth`). `opo report`
    takes paths: nothing is printed, so the shell completes file names."""
    line = os.environ.get("COMP_LINE", "")
    parts = line.split(None, 2)  # program, command, the rest (with its trailing space)
    if len(parts) < 2 or (len(parts) == 2 and not line.endswith(" ")):
        typed = parts[1] if len(parts) == 2 else ""
        sep = "\n" if query == "query=fish" else " "  # fish reads one candidate a line
        print(sep.join(c for c in ("train", "eval", "report") if c.startswith(typed)))
        return
    apps = {"train": train_app, "eval": eval_app}
    if parts[1] in apps:
        os.environ["COMP_LINE"] = "opo " + (parts[2] if len(parts) == 3 else "")
        sys.argv = ["opo", "-sc", query]
        apps[parts[1]]()


def dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    if argv[0] in ("-V", "--version"):
        print(f"opo {__version__}")
        return
    query = completion_query(argv)
    if query is not None:
        complete(query)
        return
    try:
        check_conf_dir()
    except UserError as e:
        fail(str(e))
    if argv[0] in COMPLETION_FLAGS:  # `opo -sc install=bash`: the same script as `opo train -sc`
        argv = ["train", *argv]
    command, args = argv[0], argv[1:]
    if command == "train":
        run_hydra_app(train_app, "train", args, validate_train)
    elif command == "report":
        run_report(args)
    elif command == "eval":
        from opo_cli.runs import check_eval

        run_hydra_app(eval_app, "eval", args, check_eval)
    else:
        fail(f"unknown command '{command}'; choose one of: train, eval, report")


if __name__ == "__main__":
    main()
