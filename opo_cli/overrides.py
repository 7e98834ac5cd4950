"""Command-line overrides checked before a Hydra app starts; every mistake becomes one line.

`check_overrides("train", args, validate_train)` composes the config the app would run with
and validates it, so a typo, an unknown key, bad override syntax or a bad value ends in one
`opo: error: ...` line before any run folder, model or W&B run exists. In a multirun each
sweep value is composed once (the other sweeps at their first value). Hydra's and
OmegaConf's multi-line messages are folded into one line that names the override.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Callable, Iterator

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from opo_cli.config import CONF_DIR
from opo_cli.errors import UserError, first_line

GRAMMAR_URL = "https://hydra.cc/docs/advanced/override_grammar/basic"
_NOT_IN_STRUCT = re.compile(r"Could not override '([^']+)'")


class OverrideError(UserError):
    """An override Hydra cannot apply: bad syntax, unknown key, missing config."""


def check_overrides(
    config_name: str, args: list[str], validate: Callable[[DictConfig], object] | None = None
) -> None:
    """Compose (and `validate`) every config that `opo <command> args` would run with."""
    ns = hydra_args(args)
    if ns is None:
        return
    parsed = [parse_override(text) for text in ns.overrides or []]
    sweeps = [o for o in parsed if o.is_sweep_override()]
    base = [o.input_line for o in parsed if not o.is_sweep_override()]
    for i, overrides in enumerate(sweep_variants(base, sweeps)):
        cfg = compose_config(config_name, overrides)
        if i == 0 and sweeps and not is_multirun(ns, cfg):
            raise OverrideError(
                f"{sweeps[0].input_line}: a sweep needs -m (multirun); "
                "a list is written key=[a,b], a string with commas key='a,b'"
            )
        if validate is not None and not (ns.cfg or ns.info):
            with folded_errors(overrides):
                validate(cfg)


def hydra_args(args: list[str]) -> argparse.Namespace | None:
    """Hydra's own reading of the command line; None when the app will not compose `args`."""
    ns, unknown = get_args_parser().parse_known_args(args)
    if unknown:
        raise OverrideError(f"{unknown[0]}: unknown option; see the options with --hydra-help")
    flags = (("-m", ns.multirun), ("--cfg", ns.cfg), ("--info", ns.info))
    modes = [flag for flag, on in flags if on]
    if len(modes) > 1:  # Hydra would raise a ValueError with a traceback
        hint = "choose one"
        if "-m" in modes:
            hint = "Hydra prints one run's config: drop -m and give each key one value (a sweep "
            hint += "file, sweep=NAME, prints without -m)"
        raise OverrideError(f"{' and '.join(modes)} do not go together; {hint}")
    elsewhere = (ns.config_path, ns.config_name, ns.config_dir, ns.experimental_rerun)
    if ns.help or ns.hydra_help or ns.shell_completion or any(elsewhere):
        return None
    return ns


def is_multirun(ns: argparse.Namespace, cfg: DictConfig) -> bool:
    """`-m` on the command line, or a config (a sweep file) that sets `hydra.mode`."""
    return bool(ns.multirun) or cfg.hydra.get("mode") == RunMode.MULTIRUN


def parse_override(text: str) -> Override:
    try:
        return OverridesParser.create().parse_override(text)
    except HydraException as e:
        reason = first_line(e).removeprefix("LexerNoViableAltException: ")
        raise OverrideError(f"{text}: bad override syntax ({reason}); see {GRAMMAR_URL}") from e


def sweep_variants(base: list[str], sweeps: list[Override]) -> Iterator[list[str]]:
    """`base` with every sweep at its first value, then each other value of one sweep at a time.

    Sweeps that are not lists of values (`interval(0,1)` for an optimiser sweeper) are left
    to their sweeper.
    """
    values = []
    for o in sweeps:
        with contextlib.suppress(HydraException, AssertionError):
            values.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
    values = [v for v in values if v]
    firsts = [v[0] for v in values]
    yield base + firsts
    for i, options in enumerate(values):
        for value in options[1:]:
            yield [*base, *firsts[:i], value, *firsts[i + 1 :]]


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """The config `conf/<config_name>.yaml` with `overrides`, Hydra's node included."""
    with folded_errors(overrides), initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose(config_name, overrides=overrides, return_hydra_config=True)


@contextlib.contextmanager
def folded_errors(overrides: list[str]) -> Iterator[None]:
    """Hydra and OmegaConf errors raised inside, re-raised as a one-line `OverrideError`."""
    try:
        yield
    except (HydraException, OmegaConfBaseException) as e:
        raise OverrideError(describe(e, overrides)) from e


def describe(e: Exception, overrides: list[str]) -> str:
    """One line for a Hydra or OmegaConf error, naming the override or key at fault."""
    if isinstance(e, MissingConfigException) and e.options:
        return f"no config '{e.missing_cfg_file}'; choose one of: {', '.join(e.options)}"
    m = _NOT_IN_STRUCT.match(str(e))
    if m and "not in struct" in str(e.__cause__):
        key = m.group(1)
        text = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), key)
        full_key = getattr(e.__cause__, "full_key", key)
        return f"{text}: no such key '{full_key}'; a new key is added with +{text}"
    key = getattr(e, "full_key", None)
    lines = [line.strip() for line in str(e).split("Config search path:")[0].splitlines()]
    message = " ".join(
        line for line in lines if line and not line.startswith(("full_key", "object_type"))
    )
    return f"{key}: {message}" if key else message
