"""The package as installed: where the configs are found, the line when they are not,
`opo --version`, and Hydra's shell completion through the `opo` entry point.

The wheel itself (built, installed into a fresh venv, run from outside the repository) is
checked by `.ci/run`, after this suite.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from opo_cli import __version__, cli
from opo_cli.config import CONF_DIR, ConfigError, check_conf_dir, conf_dirs, find_conf_dir

REPO = Path(__file__).resolve().parents[1]


def _package(root: Path, *, wheel: bool, checkout: bool) -> Path:
    """A fake `opo_cli` folder under `root`, with configs inside it and/or beside it."""
    package = root / "opo_cli"
    package.mkdir(parents=True)
    for conf, present in ((package / "conf", wheel), (root / "conf", checkout)):
        if present:
            conf.mkdir()
            (conf / "train.yaml").write_text("seed: 0\n")
    return package


@pytest.mark.parametrize(
    ("wheel", "checkout", "found"),
    [
        (True, False, "opo_cli/conf"),  # an installed wheel
        (False, True, "conf"),  # a checkout or an editable install
        (True, True, "opo_cli/conf"),  # the package's own configs come first
        (False, False, "opo_cli/conf"),  # none: the wheel's place, for the error to name
    ],
)
def test_configs_are_found_inside_the_package_then_beside_it(tmp_path, wheel, checkout, found):
    package = _package(tmp_path, wheel=wheel, checkout=checkout)
    assert find_conf_dir(package) == tmp_path / found
    assert conf_dirs(package) == (tmp_path / "opo_cli" / "conf", tmp_path / "conf")


def test_this_checkout_reads_its_top_level_conf():
    # the suite runs from a checkout or an editable install: edits to conf/ are live
    assert CONF_DIR == REPO / "conf"


def test_a_config_folder_without_train_yaml_does_not_count(tmp_path):
    package = _package(tmp_path, wheel=False, checkout=True)
    (package / "conf").mkdir()  # e.g. left behind by a broken install, empty
    assert find_conf_dir(package) == tmp_path / "conf"


def test_missing_configs_end_in_one_line_naming_both_places_and_the_fix(tmp_path):
    package = _package(tmp_path, wheel=False, checkout=False)
    with pytest.raises(ConfigError) as e:
        check_conf_dir(package)
    message = str(e.value)
    assert "\n" not in message
    assert f"neither {package / 'conf'} nor {tmp_path / 'conf'} holds train.yaml" in message
    assert "pip install --force-reinstall" in message
    check_conf_dir(_package(tmp_path / "ok", wheel=True, checkout=False))  # no error


@pytest.mark.parametrize("argv", [["train", "logger=none"], ["eval"], ["report", "."]])
def test_every_command_without_configs_stops_with_that_line(tmp_path, monkeypatch, capsys, argv):
    # the reported failure: `logger=none: no such logger; choose one of:` with an empty list
    package = _package(tmp_path, wheel=False, checkout=False)
    monkeypatch.setattr(cli, "check_conf_dir", functools.partial(check_conf_dir, package))
    with pytest.raises(SystemExit) as e:
        cli.dispatch(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("opo: error: no configs: neither ")
    assert "choose one of" not in err


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_prints_the_installed_package_version(capsys, flag):
    cli.dispatch([flag])
    assert capsys.readouterr().out == f"opo {__version__}\n"
    assert version("opo-cli") == __version__  # pyproject reads its version from __version__


def test_help_shows_the_version_and_the_version_flag(capsys):
    cli.dispatch(["--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"opo {__version__}\n")
    assert "-V, --version" in out


def test_every_code_and_config_folder_is_a_package_of_the_wheel():
    # the list is written out: a code package left off it is missing from the wheel, and a
    # config folder left off makes setuptools warn that it "would be ignored"
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"opo_cli.conf": "conf"}
    folders = [REPO / "conf", *(p for p in (REPO / "conf").rglob("*") if p.is_dir())]
    configs = {".".join(("opo_cli", *f.relative_to(REPO).parts)) for f in folders}
    code = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "opo_cli").rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == code | configs


@pytest.mark.parametrize(
    ("line", "offered"),
    [("opo ", "train eval report"), ("opo e", "eval"), ("opo report o", ""), ("opo x y", "")],
)
def test_completion_of_the_command_word_and_of_report(monkeypatch, capsys, line, offered):
    monkeypatch.setenv("COMP_LINE", line)
    cli.dispatch(["-sc", "query=bash"])
    assert capsys.readouterr().out.strip() == offered  # report: empty, the shell offers files


@pytest.fixture
def opo_on_path(tmp_path) -> dict[str, str]:
    """An environment whose PATH starts with an `opo` that runs this checkout's CLI."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "opo"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m opo_cli.cli "$@"\n')
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


# what <TAB> offers at the end of a line: the bash function that Hydra's script installs, called
# as bash calls it (COMP_LINE, COMP_WORDS, COMP_CWORD)
TAB = """
eval "$(opo train --shell-completion install=bash)"
tab() {
  COMP_LINE="$1"; COMP_POINT=${#1}; read -ra COMP_WORDS <<< "$1"
  [[ "$1" == *" " ]] && COMP_WORDS+=("")
  COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
  COMPREPLY=(); hydra_bash_completion; echo "${COMPREPLY[*]}"
}
opo train --shell-completion install=bash | tail -n 1
tab "opo train method=g"
tab "opo eval dataset=math"
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_through_the_opo_entry_point(opo_on_path, tmp_path):
    done = subprocess.run(
        ["bash", "-c", TAB], env=opo_on_path, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    binding, train, evaluate = done.stdout.splitlines()
    assert binding.endswith("-F hydra_bash_completion opo")  # `opo` alone, not `opo train`
    assert train.split() == ["method=grpo", "method=gspo"]  # conf/method/ seen by opo train
    assert evaluate.split() == ["dataset=math", "dataset=math500", "dataset=math_l3"]
