"""Reliability: bad input ends in one line, faults and interruptions lose no work, no hangs.

Bad inputs run as `opo ...` subprocesses, 4 at a time (each fails before any model loads;
of the checks, only the dry call of a loss imports torch); training faults (a NaN loss,
SIGINT/SIGTERM, a damaged checkpoint, W&B failing) run the tiny model a few steps on CPU. Run:
    pytest tests/test_reliability.py -q              # ~1 min on 2 busy cores
    pytest tests/test_reliability.py -q -m slow      # SIGTERM to a real `opo`, offline W&B
"""

import json
import math
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import opo_cli.train as T
from opo_cli import cli
from opo_cli.errors import UserError
from opo_cli.models import load_policy
from opo_cli.rollout import generate_rollout
from opo_cli.stopping import BAD_STEPS_EXIT_CODE, BadStepCounter, Diverged, Interrupted, SignalStop
from opo_cli.tracking import read_metrics
from tests.conftest import OPO, compose_config

TINY = [
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "rollout.max_new_tokens=4",
    "trainer.mini_batches=2",
    "model.tiny.warm_start.steps=0",
    "logger=none",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One tiny-model cache for the module: the model is built once."""
    return tmp_path_factory.mktemp("cache")


def compose_train(cache: Path, *overrides: str):
    return compose_config("train", [*TINY, f"model.cache_dir={cache}", *overrides])


def opo_env(cache: Path, **extra: str) -> dict:
    """The environment of an `opo` subprocess: no W&B settings of the person running tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "OPO_CACHE": str(cache), "NO_COLOR": "1", **extra}


def same_metrics(a: list[dict], b: list[dict]) -> None:
    """Rows equal key by key, timings (perf/*) aside."""
    strip = [
        [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows] for rows in (a, b)
    ]
    assert strip[0] == strip[1]


# ----------------------------------------------------------------------- bad input, one line

BAD_INPUTS = [  # (id, command line, what the one error line must name)
    ("method", ["train", "method=foo"], "method"),
    ("model", ["train", "model=foo"], "model"),
    ("alpha-high", ["train", "alpha=1.5"], "alpha"),
    ("alpha-negative", ["train", "alpha=-0.1"], "alpha"),
    ("mu-zero", ["train", "mu=0"], "mu"),
    ("mu-negative", ["train", "mu=-1"], "mu"),
    ("steps-negative", ["train", "trainer.steps=-3"], "trainer.steps"),
    ("steps-text", ["train", "trainer.steps=abc"], "trainer.steps"),
    ("group-size-1", ["train", "rollout.group_size=1"], "rollout.group_size"),
    ("no-prompts", ["train", "rollout.prompts_per_step=0"], "rollout.prompts_per_step"),
    ("resume", ["train", "trainer.resume=maybe"], "trainer.resume"),
    ("unknown-key", ["train", "trainer.foo=1"], "trainer.foo"),
    ("bad-syntax", ["train", "alpha=[1"], "alpha"),
    ("sweep-value", ["train", "-m", "alpha=0.3,1.5"], "alpha"),
    ("sweep-without-m", ["train", "mu=0.5,1.0"], "mu"),
    ("multirun-cfg", ["train", "-m", "seed=0,1", "--cfg", "hydra"], "-m and --cfg"),
    ("data-file", ["train", "dataset=math_l3", "dataset.path=/nonexistent.jsonl"], "dataset.path"),
    ("model-folder", ["train", "model.name_or_path=/nonexistent"], "model.name_or_path"),
    (
        "mini-batches",
        ["train", "trainer.mini_batches=3", "rollout.prompts_per_step=2"],
        "trainer.mini_batches",
    ),
    ("temperature", ["train", "rollout.temperature=0"], "rollout.temperature"),
    ("max-bad-steps", ["train", "trainer.max_bad_steps=-1"], "trainer.max_bad_steps"),
    ("report-missing", ["report", "/nonexistent"], "/nonexistent"),
    ("report-empty", ["report", "{empty}"], "{empty}"),
    ("report-knob", ["report", "{empty}", "smoothing=2"], "smoothing"),
    ("report-threshold", ["report", "{empty}", "threshold=abc"], "threshold"),
    ("report-unknown-key", ["report", "{empty}", "colour=red"], "colour"),
    ("command", ["frobnicate"], "frobnicate"),
    ("eval-checkpoint-not-a-run", ["eval", "checkpoint={empty}"], "checkpoint={empty}"),
    ("eval-limit", ["eval", "checkpoint={empty}", "eval.limit=0"], "eval.limit"),
    ("eval-dist-timeout", ["eval", "checkpoint={empty}", "eval.dist_timeout_s=0"], "eval.dist"),
    (
        "eval-data-file",
        ["eval", "checkpoint={empty}", "dataset=math_l3", "dataset.path=/nonexistent.jsonl"],
        "dataset.path",
    ),
]


def run_opo(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*OPO, *args], cwd=cwd, env=opo_env(cache), capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory, cache) -> dict:
    """Every BAD_INPUTS command run at once (4 at a time), each in its own empty folder."""

    def run(case):
        name, args, key = case
        cwd = tmp_path_factory.mktemp(name)
        empty = cwd / "empty"
        empty.mkdir()
        args = [a.replace("{empty}", str(empty)) for a in args]
        return run_opo(args, cwd, cache), key.replace("{empty}", str(empty)), cwd

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip([c[0] for c in BAD_INPUTS], pool.map(run, BAD_INPUTS), strict=True))


@pytest.mark.parametrize("name", [c[0] for c in BAD_INPUTS])
def test_bad_input_ends_in_one_line_naming_the_key(bad_input_results, name):
    proc, key, cwd = bad_input_results[name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("opo: error: "), proc.stderr
    assert key in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (cwd / "outputs").exists()  # refused before any run folder was made


def test_the_opo_command_runs_without_its_bin_folder_on_path(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no `opo` (nor anything else) to be found
    proc = subprocess.run([*OPO, "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: opo COMMAND" in proc.stdout


def test_bad_step_counter_counts_only_fully_skipped_steps_in_a_row():
    # 2 updates per step, limit 3: skipped 2,2,1 -> the third step had a good update and
    # resets the count; then 2,2,2 trips on the third of them.
    counter = BadStepCounter(limit=3)
    trips = [counter.update(skipped, 2) for skipped in (2, 2, 1, 2, 2, 2)]
    assert trips == [False, False, False, False, False, True]
    never = BadStepCounter(limit=0)
    assert not any(never.update(2, 2) for _ in range(10))


# ----------------------------------------------------------------------- numerical faults


def test_nan_loss_skips_every_update_and_stops_after_max_bad_steps(cache, tmp_path, monkeypatch):
    real_get_loss = T.get_loss

    def nan_loss(name):
        fn = real_get_loss(name)

        def poisoned(inputs, **kwargs):
            loss, stats = fn(inputs, **kwargs)
            return loss * math.nan, stats  # keeps the graph: backward runs, grads are NaN

        return poisoned

    monkeypatch.setattr(T, "get_loss", nan_loss)
    cfg = compose_train(cache, "trainer.steps=5", "trainer.max_bad_steps=2", "trainer.save_every=0")
    run = tmp_path / "run"
    with pytest.raises(Diverged) as stopped:
        T.train(cfg, run)
    assert stopped.value.exit_code == BAD_STEPS_EXIT_CODE == 3
    assert "trainer.max_bad_steps=2" in str(stopped.value)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]  # stopped after the second bad step
    assert all(r["train/skipped_updates"] == 2 for r in rows)  # 1 epoch x 2 mini-batches
    assert all(math.isnan(r["train/loss"]) for r in rows)
    initial = load_file(next(cache.glob("tiny-arith-*")) / "model.safetensors")
    saved = load_file(run / "checkpoints" / "step_2" / "model.safetensors")
    assert initial.keys() == saved.keys()
    assert all(torch.equal(initial[k], saved[k]) for k in initial)  # no update was applied


# ----------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def reference_run(cache, tmp_path_factory) -> Path:
    """4 uninterrupted steps with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("reference") / "run"
    T.train(compose_train(cache, "trainer.steps=4", "trainer.save_every=2"), run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4"]
    return run


def steps_run(monkeypatch) -> list[int]:
    """The steps `train` runs from now on (it records them as they happen)."""
    steps, real_step = [], T.train_step

    def recording_step(*args):
        steps.append(args[-1])
        return real_step(*args)

    monkeypatch.setattr(T, "train_step", recording_step)
    return steps


def test_resume_from_a_checkpoint_gives_the_uninterrupted_metrics(
    cache, reference_run, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    shutil.rmtree(run / "checkpoints" / "step_4")
    shutil.rmtree(run / "final")
    steps = steps_run(monkeypatch)
    T.train(compose_train(cache, "trainer.steps=4", "trainer.save_every=2"), run)
    assert steps == [3, 4]
    same_metrics(read_metrics(run / "metrics.jsonl"), read_metrics(reference_run / "metrics.jsonl"))


@pytest.mark.parametrize("damaged", ["model.safetensors", "trainer_state.pt"])
def test_damaged_newest_checkpoint_is_skipped_for_the_one_before(
    cache, reference_run, tmp_path, monkeypatch, capsys, damaged
):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    shutil.rmtree(run / "final")
    file = run / "checkpoints" / "step_4" / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # cut off mid-write
    steps = steps_run(monkeypatch)
    T.train(compose_train(cache, "trainer.steps=4", "trainer.save_every=2"), run)
    assert steps == [3, 4]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "skipping damaged" in line]
    assert len(warnings) == 1 and "step_4" in warnings[0]
    same_metrics(read_metrics(run / "metrics.jsonl"), read_metrics(reference_run / "metrics.jsonl"))


def test_no_readable_checkpoint_stops_instead_of_starting_over(cache, reference_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    for step in ("step_2", "step_4"):
        (run / "checkpoints" / step / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"trainer\.resume=never"):
        T.train(compose_train(cache, "trainer.steps=6"), run)
    assert len(read_metrics(run / "metrics.jsonl")) == 4  # the logged steps are kept


def test_resume_never_starts_fresh_with_the_earlier_run_moved_aside(
    cache, reference_run, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)  # 4 steps: step_2, step_4, final/, 4 metrics rows
    steps = steps_run(monkeypatch)
    cfg = compose_train(cache, "trainer.steps=2", "trainer.save_every=1", "trainer.resume=never")
    T.train(cfg, run)
    assert steps == [1, 2]
    # only the new run's checkpoints: the old step_4 neither survives pruning nor replaces one
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1", "step_2"]
    new_final = load_file(run / "final" / "model.safetensors")
    new_step_2 = load_file(run / "checkpoints" / "step_2" / "model.safetensors")
    assert all(torch.equal(new_final[k], new_step_2[k]) for k in new_final)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    [aside] = (run / "replaced").iterdir()
    assert str(aside) in capsys.readouterr().err
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_2", "step_4"]
    old_final = load_file(reference_run / "final" / "model.safetensors")
    moved_final = load_file(aside / "final" / "model.safetensors")
    assert all(torch.equal(old_final[k], moved_final[k]) for k in old_final)
    assert len(read_metrics(aside / "metrics.jsonl")) == 4
    steps.clear()
    T.train(compose_train(cache, "trainer.steps=3", "trainer.save_every=1"), run)
    assert steps == [3]  # a plain rerun resumes the new run, not the old one


def test_signal_stop_records_the_first_signal_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with SignalStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest without the handler
        assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM"
        assert stop.exit_code == 128 + 15
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigint_finishes_the_step_checkpoints_and_the_rerun_matches(
    cache, reference_run, tmp_path, monkeypatch
):
    real_step = T.train_step

    def interrupted_at_step_2(*args):
        row = real_step(*args)
        if args[-1] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # mid-step: after the rollout and the update
        return row

    monkeypatch.setattr(T, "train_step", interrupted_at_step_2)
    run, cfg = tmp_path / "run", compose_train(cache, "trainer.steps=4", "trainer.save_every=0")
    with pytest.raises(Interrupted) as stopped:
        T.train(cfg, run)
    assert stopped.value.exit_code == 130
    assert str(run / "checkpoints" / "step_2") in str(stopped.value)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_2"]
    assert not (run / "final").exists()
    monkeypatch.setattr(T, "train_step", real_step)
    T.train(cfg, run)
    same_metrics(read_metrics(run / "metrics.jsonl"), read_metrics(reference_run / "metrics.jsonl"))


def wait_for_rows(path: Path, rows: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(read_metrics(path)) < rows:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no metrics rows in time"
        time.sleep(0.05)


@pytest.mark.slow  # two `opo` starts and 12 steps: 30-50 s on the shared 2-core box
def test_sigterm_checkpoints_and_the_same_command_resumes_to_identical_metrics(cache, tmp_path):
    steps = 6
    overrides = [*TINY, f"trainer.steps={steps}", "trainer.save_every=1"]
    run = tmp_path / "run"
    command = [*OPO, "train", *overrides, f"hydra.run.dir={run}"]
    env = opo_env(cache)
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    wait_for_rows(run / "metrics.jsonl", 2, proc, timeout_s=240)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM == 143, err
    done = len(read_metrics(run / "metrics.jsonl"))
    assert 2 <= done < steps
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"opo: interrupted by SIGTERM after step {done}/{steps}")
    assert str(run / "checkpoints" / f"step_{done}") in last
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"(step {done})" in rerun.stderr
    uninterrupted = tmp_path / "uninterrupted"
    T.train(compose_train(cache, f"trainer.steps={steps}", "trainer.save_every=1"), uninterrupted)
    same_metrics(read_metrics(run / "metrics.jsonl"), read_metrics(uninterrupted / "metrics.jsonl"))


# ----------------------------------------------------------------------- outside services


def test_wandb_failing_to_start_never_stops_training(cache, tmp_path, monkeypatch, capsys):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    run = tmp_path / "run"
    T.train(compose_train(cache, "trainer.steps=1", "logger=wandb"), run)
    assert len(read_metrics(run / "metrics.jsonl")) == 1
    assert (run / "final" / "model.safetensors").is_file()
    assert "W&B could not start (RuntimeError: network unreachable)" in capsys.readouterr().err


@pytest.mark.slow  # an `opo` start plus W&B's service: 15-30 s on the shared 2-core box
def test_wandb_without_an_account_logs_offline_under_the_run_folder(cache, tmp_path):
    run = tmp_path / "run"
    command = [
        *OPO,
        "train",
        "method=opo",
        "alpha=0.6",
        "mu=1.0",
        *TINY,
        "logger=wandb",
        "trainer.steps=2",
        f"hydra.run.dir={run}",
    ]
    env = opo_env(cache, HOME=str(tmp_path / "home"), NETRC=str(tmp_path / "no-netrc"))
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    notices = [line for line in proc.stderr.splitlines() if "W&B" in line]
    assert len(notices) == 1 and "offline" in notices[0]
    [wandb_file] = (run / "wandb").glob("offline-run-*/run-*.wandb")
    logged = [
        {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in record.history.item
        }
        for record in wandb_records(wandb_file)
        if record.WhichOneof("record_type") == "history"
    ]
    rows = read_metrics(run / "metrics.jsonl")
    for key in ("train/reward_mean", "train/grad_norm"):
        assert [h[key] for h in logged if key in h] == [r[key] for r in rows]


def wandb_history(run_file: Path) -> dict[int, dict]:
    """step -> the metrics of each history record of a W&B run file."""
    out = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            out[record.history.step.num] = items
    return out


@pytest.mark.slow  # two offline W&B runs in process: 20-40 s on the shared 2-core box
def test_a_resumed_wandb_run_gets_only_the_steps_it_lacks(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    args = ("logger=wandb", "trainer.save_every=2")
    T.train(compose_train(cache, "trainer.steps=4", *args), run)
    # the run died after logging step 4, before its checkpoint: it resumes from step 2
    shutil.rmtree(run / "checkpoints" / "step_4")
    shutil.rmtree(run / "final")
    T.train(compose_train(cache, "trainer.steps=6", *args), run)
    first, second = (
        wandb_history(next(d.glob("run-*.wandb")))
        for d in sorted((run / "wandb").glob("offline-run-*"))
    )
    assert sorted(first) == [1, 2, 3, 4]
    assert sorted(second) == [5, 6]  # not 3 and 4 again: W&B would drop them
    rows = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for step, logged in {**first, **second}.items():  # W&B holds the file's values
        for key in ("train/reward_mean", "train/loss", "train/grad_norm"):
            assert logged[key] == pytest.approx(rows[step][key], rel=1e-6)


def wandb_records(path: Path) -> list:
    """The records of a W&B run file: a 7-byte header, then LevelDB-log chunks (4-byte CRC,
    2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, records, pos, pending = path.read_bytes(), [], 7, b""
    while pos + 7 <= len(data):
        left_in_block = 32768 - pos % 32768
        if left_in_block < 7:  # a block's tail too short for a chunk header is padding
            pos += left_in_block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(pending))
            pending = b""
    return records


def test_generation_stops_at_max_new_tokens(cache):
    cfg = compose_train(cache)
    problems, _ = T.load_problems(cfg.dataset)
    folder = T.initial_model_path(cfg, problems)
    model, tok = load_policy(folder, device=torch.device("cpu"), dtype=torch.float32)
    torch.manual_seed(0)
    rollout = generate_rollout(
        model, tok, [p.prompt for p in problems[:4]], group_size=4, max_new_tokens=3
    )
    assert rollout.completion_len <= 3
    assert rollout.completion_mask.sum(-1).max().item() <= 3  # (N,) tokens per completion
    assert rollout.truncated.any()  # random weights rarely say EOS: the limit did the stopping


# ------------------------------------------------------------------ no network to the hub


def lookup_that(behaviour):
    def getaddrinfo(host, port):
        if behaviour == "fails":
            raise OSError("Name or service not known")
        if behaviour == "hangs":
            time.sleep(5)
        return [("resolved",)]

    return getaddrinfo


@pytest.mark.parametrize(
    ("behaviour", "env", "offline"),
    [
        ("fails", {}, True),
        ("hangs", {}, True),
        ("resolves", {}, False),
        ("fails", {"HTTPS_PROXY": "http://proxy:3128"}, False),  # the proxy resolves names
        ("fails", {"HF_HUB_OFFLINE": "0"}, False),  # the user's setting wins
    ],
)
def test_an_unresolvable_hub_turns_hub_loading_offline(monkeypatch, behaviour, env, offline):
    for var in ("HF_HUB_OFFLINE", "OPO_HUB_UNREACHABLE", "HF_ENDPOINT", *cli.PROXY_VARS):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(cli.socket, "getaddrinfo", lookup_that(behaviour))
    t0 = time.perf_counter()
    cli.offline_without_hub(timeout_s=0.5)
    assert time.perf_counter() - t0 < 2.0  # a hanging resolver is not waited for
    assert (os.environ.get("HF_HUB_OFFLINE") == "1") is offline
    assert ("OPO_HUB_UNREACHABLE" in os.environ) is offline
