"""Your own task: custom prompt/answer datasets, GSM8K from a local file in the hub's format,
rewards that fail during training, and the README's example run exactly as printed."""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from opo_cli import rewards
from opo_cli.data import DataError, Problem, dataset_kind, load_problems, warm_start_pairs
from opo_cli.evaluate import evaluate
from opo_cli.rewards import RewardError, build_reward, score_gsm8k
from opo_cli.tracking import read_metrics
from opo_cli.train import train
from tests.conftest import OPO, REPO, TINY, compose_config

GSM8K = REPO / "tests" / "data" / "gsm8k_sample.jsonl"
SMALL_WARM_START = ["model.tiny.warm_start.batch_size=8"]  # GSM8K prompts are long for tiny


def custom(path: Path, *overrides: str):
    return compose_config("train", ["dataset=custom", f"dataset.path={path}", *overrides]).dataset


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# ----------------------------------------------------------------------------- custom datasets


def test_custom_rows_fill_the_template_and_malformed_rows_are_counted(tmp_path, capsys):
    path = write_jsonl(
        tmp_path / "rows.jsonl",
        [
            {"q": "2+2", "a": 4, "hint": "add"},  # a number answer is read as text
            {"q": "3*3", "a": "9", "hint": "multiply"},
            {"q": "1-1", "a": "0"},  # no hint: the template cannot be filled
            {"q": "", "a": "1", "hint": "x"},  # empty prompt
            {"q": "5+5", "hint": "x"},  # no answer
            "not json",
            ["a", "list"],
        ],
    )
    cfg = custom(
        path,
        "dataset.prompt_key=q",
        "dataset.answer_key=a",
        "dataset.eval_size=0",
        "dataset.template='{prompt} ({hint}) = ?'",
    )
    train_set, held = load_problems(cfg)
    assert [(p.prompt, p.answer, p.meta) for p in train_set] == [
        ("2+2 (add) = ?", "4", {"hint": "add"}),
        ("3*3 (multiply) = ?", "9", {"hint": "multiply"}),
    ]
    assert held == []
    assert "skipped 5 malformed rows" in capsys.readouterr().err


def test_held_out_rows_by_seed_or_from_eval_path(tmp_path):
    rows = [{"prompt": f"p{i}", "answer": str(i)} for i in range(10)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    train_set, held = load_problems(custom(path, "dataset.eval_size=3", "dataset.split_seed=1"))
    assert len(train_set) == 7 and len(held) == 3 and not set(train_set) & set(held)
    again = load_problems(custom(path, "dataset.eval_size=3", "dataset.split_seed=1"))[1]
    assert again == held  # the same seed holds out the same rows
    other = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "e", "answer": "1"}])
    train_set, held = load_problems(custom(path, f"dataset.eval_path={other}"))
    assert len(train_set) == 10 and held == [Problem("e", "1")]


def test_a_parquet_file_reads_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", "2"], "k": [7, 8]}), path)
    train_set, _ = load_problems(custom(path, "dataset.eval_size=0"))
    assert [(p.prompt, p.answer, p.meta) for p in train_set] == [
        ("a", "1", {"k": 7}),
        ("b", "2", {"k": 8}),
    ]


def test_no_usable_rows_names_the_columns_they_need(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"question": "x", "answer": "1"}])
    with pytest.raises(DataError, match=r"no usable rows .* each needs the columns answer, prompt"):
        load_problems(custom(path))


# ---------------------------------------------------------------------------------------- GSM8K


def test_gsm8k_reads_the_hubs_main_configuration(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(*args, split):
        calls.append((*args, split))
        return [{"question": "1+1?", "answer": "1 + 1 = 2\n#### 2"}] * 3

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = compose_config("train", ["dataset=gsm8k", "dataset.eval_size=1"]).dataset
    train_set, held = load_problems(cfg)
    assert calls == [("openai/gsm8k", "main", "train")] and (len(train_set), len(held)) == (2, 1)


def test_gsm8k_warm_start_states_the_gold_number_in_the_form_the_reward_reads():
    data = ["dataset=gsm8k", f"dataset.path={GSM8K}", "dataset.eval_size=8"]
    cfg = compose_config("train", data).dataset
    problems, held = load_problems(cfg)
    assert (len(problems), len(held)) == (32, 8) and cfg.reward == "gsm8k"
    pairs = warm_start_pairs(dataset_kind(cfg), problems, 20, 0, 1.0)
    golds = {p.prompt: p.answer for p in problems}
    assert all(re.fullmatch(r"The answer is \$\\boxed\{\d+\}\$\.", a) for _, a in pairs)
    assert score_gsm8k([a for _, a in pairs], [golds[q] for q, _ in pairs]) == [1.0] * 20
    assert problems[0].prompt.endswith("put your final answer within \\boxed{}.")


@pytest.fixture(scope="module")
def gsm8k_run(tmp_path_factory, tiny_cache) -> Path:
    """Two training steps of the tiny model on the local GSM8K sample."""
    run = tmp_path_factory.mktemp("gsm8k") / "run"
    data = ["dataset=gsm8k", f"dataset.path={GSM8K}", "dataset.eval_size=8"]
    cfg = compose_config(
        "train", [*TINY, *SMALL_WARM_START, f"model.cache_dir={tiny_cache}", *data]
    )
    train(cfg, run)
    return run


def test_gsm8k_trains_from_a_local_file_and_logs_correctness(gsm8k_run):
    rows = read_metrics(gsm8k_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["reward/gsm8k"] == row["reward/correct"] == row["train/reward_mean"]
        assert all(math.isfinite(v) for v in row.values())


def test_opo_eval_on_gsm8k_measures_the_held_out_rows(gsm8k_run, tmp_path):
    cfg = compose_config(
        "eval",
        [
            f"checkpoint={gsm8k_run}",
            "dataset=gsm8k",
            f"dataset.path={GSM8K}",
            "dataset.eval_size=8",
            "eval.max_new_tokens=8",
            "eval.batch_size=8",
        ],
    )
    result = evaluate(cfg, tmp_path / "eval")
    assert result["n"] == 8 and result["split"] == "held_out" and 0.0 <= result["accuracy"] <= 1.0
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").open()]
    assert len(samples) == 8


# ------------------------------------------------------------------ rewards failing in a run


def odd_length(responses, answers):
    """A reward with spread on an untrained model: 1.0 for an odd-length completion."""
    return [float(len(r) % 2) for r in responses]


def failing_after(calls: int, how: str):
    """`odd_length` for the first `calls` calls (the probe is one), then it raises or hangs."""
    count = [0]

    def reward(responses, answers):
        count[0] += 1
        if count[0] > calls and how == "raises":
            raise RuntimeError("the grader's service is down")
        if count[0] > calls:
            import time

            time.sleep(60)
        return odd_length(responses, answers)

    return reward


@pytest.mark.parametrize("how", ["raises", "hangs"])
def test_a_reward_failing_mid_run_checkpoints_and_the_rerun_resumes_exactly(
    how, tiny_cache, tmp_path, monkeypatch
):
    args = [*TINY, f"model.cache_dir={tiny_cache}", "trainer.save_every=0"]
    args += ["dataset.reward=exact_match", "dataset.reward_timeout_s=2"]
    monkeypatch.setitem(rewards.REWARDS, "exact_match", odd_length)
    train(compose_config("train", args), tmp_path / "reference")
    monkeypatch.setitem(rewards.REWARDS, "exact_match", failing_after(2, how))  # fails at step 2
    with pytest.raises(RewardError) as e:
        train(compose_config("train", args), tmp_path / "run")
    message = str(e.value)
    assert len(message.splitlines()) == 1 and message.startswith("reward 'exact_match'")
    assert ("the grader's service is down" if how == "raises" else "reward_timeout_s=2") in message
    assert (
        f"stopped at step 2 with checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_1'}"
        in message
    )
    monkeypatch.setitem(rewards.REWARDS, "exact_match", odd_length)  # fixed: the rerun resumes
    train(compose_config("train", args), tmp_path / "run")
    ref, run = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("reference", "run"))
    assert [r["step"] for r in run] == [1, 2]
    for a, b in zip(ref, run, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith("perf/")} == {
            k: v for k, v in b.items() if not k.startswith("perf/")
        }


def test_the_paper_experiment_composes_the_shaped_reward_with_accuracy_apart():
    cfg = compose_config("train", ["+experiment=paper_exp1"])
    reward = build_reward(cfg.dataset)
    assert [p.name for p in reward.parts] == ["math", "length_bonus", "repetition_penalty"]
    assert [p.weight for p in reward.parts] == [1.0, 1.0, 1.0] and reward.correctness == "math"
    kwargs = OmegaConf.to_container(cfg.dataset.reward_kwargs, resolve=True)
    assert kwargs["length_bonus"]["max_bonus"] == 0.1
    assert kwargs["repetition_penalty"]["threshold_penalty"] == 0.5


# ------------------------------------------------------------------------- the command line


def opo(args: list[str], cwd: Path, cache: Path, timeout: int = 600):
    env = {**__import__("os").environ, "OPO_CACHE": str(cache), "WANDB_MODE": "disabled"}
    return subprocess.run(
        [*OPO, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("reward", "says"),
    [
        ("no_such_reward", "reward 'no_such_reward': unknown"),
        ("bad.py:score", "reward 'bad.py:score' returned 0 values for 8 responses"),
    ],
)
def test_a_bad_reward_on_the_command_line_is_one_line(reward, says, tmp_path, tiny_cache):
    (tmp_path / "bad.py").write_text("def score(responses, answers):\n    return []\n")
    proc = opo(["train", "logger=none", f"dataset.reward={reward}"], tmp_path, tiny_cache)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"opo: error: {says}") and "Traceback" not in proc.stdout
    assert not list(tmp_path.glob("outputs/train/*/checkpoints"))  # before any model or step


def readme_example() -> tuple[dict[str, str], str]:
    """The files and the command of the README's "Your own task" section."""
    section = (REPO / "README.md").read_text().split("## Your own task")[1].split("\n## ")[0]
    files = dict(re.findall(r"`([\w.]+)`\n\n```\w+\n(.*?)```", section, re.DOTALL))
    command = re.search(r"```bash\n(opo train .*?)\n```", section)[1]
    return files, command


def test_the_readme_example_is_five_rows_a_ten_line_reward_and_one_command():
    files, command = readme_example()
    assert list(files) == ["capitals.jsonl", "capital_reward.py"]
    assert len(files["capitals.jsonl"].splitlines()) == 5
    assert len(files["capital_reward.py"].splitlines()) <= 10
    assert "\n" not in command


def run_readme_example(tmp_path: Path, *extra: str) -> list[dict]:
    """The README's files written to `tmp_path` and its command run there (then `extra`)."""
    files, command = readme_example()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    args = shlex.split(command)
    assert args[0] == "opo"
    proc = opo([*args[1:], *extra], tmp_path, tmp_path / "cache", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = (tmp_path / "outputs" / "train").iterdir()
    assert (run / "final" / "config.json").is_file()
    rows = read_metrics(run / "metrics.jsonl")
    assert all(0.0 <= r["reward/score"] <= 1.0 for r in rows)
    assert "reward/correct" not in rows[0]  # a reward of one's own: no correctness assumed
    return rows


@pytest.mark.slow
def test_the_readme_example_trains_exactly_as_printed(tmp_path):
    rows = run_readme_example(tmp_path)  # ~3 CPU-minutes, most of it the tiny warm start
    assert len(rows) == 20


def test_the_readme_example_trains_with_a_short_warm_start(tmp_path):
    """The printed command with a cheaper warm start and 3 short steps: the fast suite's
    version (unit tests cover the missing-file and other bad-reward messages)."""
    small = ["model.tiny.warm_start.steps=30", "model.tiny.warm_start.batch_size=8"]
    rows = run_readme_example(tmp_path, *small, "trainer.steps=3", "rollout.prompts_per_step=4")
    assert len(rows) == 3
