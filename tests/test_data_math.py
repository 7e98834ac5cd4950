"""MATH datasets: loading from a file, a dataset folder or the hub id, level filters, skipped
rows, the seeded held-out split, and prompt formatting. Counts come from the data's README."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import DictConfig

from opo_cli.data import (
    DataError,
    Problem,
    dataset_problems,
    format_prompt,
    load_problems,
    parse_level,
    parse_math_rows,
    stratified_sample,
)
from opo_cli.models import train_tokenizer
from tests.conftest import MATH_DIR, compose_config, needs_math

LEVEL3_TEST_BY_SUBJECT = {  # the data README's Level 3 test counts: 1,131 in all
    "Algebra": 261,
    "Counting & Probability": 100,
    "Geometry": 102,
    "Intermediate Algebra": 195,
    "Number Theory": 122,
    "Prealgebra": 224,
    "Precalculus": 127,
}


def dataset_cfg(*overrides: str) -> DictConfig:
    return compose_config("train", overrides).dataset


def row(problem: str, answer: str, level: object = "Level 3", subject: str = "Algebra") -> dict:
    return {
        "problem": problem,
        "level": level,
        "type": subject,
        "solution": f"So $\\boxed{{{answer}}}$.",
    }


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@needs_math
def test_math_l3_on_the_test_file_is_the_1131_level_3_problems():
    cfg = dataset_cfg("dataset=math_l3", f"dataset.path={MATH_DIR / 'test.jsonl'}")
    problems = dataset_problems(cfg)
    assert len(problems) == 1131
    assert {p.meta["level"] for p in problems} == {3}
    assert Counter(p.meta["subject"] for p in problems) == LEVEL3_TEST_BY_SUBJECT
    train, held = load_problems(cfg)
    assert (len(train), len(held)) == (1131 - 100, 100)  # dataset.eval_size = 100
    assert not set(train) & set(held)


@needs_math
def test_level_filter_reads_labels_and_numbers_alike():
    path = f"dataset.path={MATH_DIR / 'test.jsonl'}"
    by_number = dataset_problems(dataset_cfg("dataset=math", path, "dataset.levels=[3]"))
    by_label = dataset_problems(dataset_cfg("dataset=math", path, "dataset.levels=['Level 3']"))
    assert by_number == by_label
    assert len(by_number) == 1131


def test_parse_level():
    cases = [("Level 3", 3), (3, 3), ("3", 3), ("level 5", 5), ("Level ?", None), (None, None)]
    cases += [(True, None), ("Level 3b", None)]
    assert [parse_level(value) for value, _ in cases] == [want for _, want in cases]


def test_a_level_filter_that_is_not_a_level_is_a_user_error(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [json.dumps(row("1+1?", "2"))])
    with pytest.raises(DataError, match=r"dataset.levels=\['hard'\] is not allowed"):
        dataset_problems(
            dataset_cfg("dataset=math", f"dataset.path={path}", "dataset.levels=[hard]")
        )


def test_malformed_rows_are_skipped_and_counted_on_one_line(tmp_path, capsys):
    no_solution = {"problem": "x", "level": "Level 3", "type": "Algebra"}
    lines = [
        json.dumps(row("What is 1+1?", "2")),
        json.dumps(row("Area of a unit square?", "1", subject="Geometry")),
        json.dumps(row("What is 2+2?", "4", level="Level 4")),
        "{not json",  # malformed 1
        json.dumps(no_solution),  # 2: a field missing
        json.dumps(row("   ", "1")),  # 3: empty problem
        json.dumps({**row("y", "1"), "solution": "no box here"}),  # 4: no \boxed{}
        json.dumps({**row("z", "1"), "solution": "so $\\boxed{}$"}),  # 5: an empty box
        "[1, 2]",  # 6: not an object
        json.dumps(row("q", "3", level="Level ?")),  # unknown level
        "",  # blank lines are not rows
    ]
    path = write_jsonl(tmp_path / "m.jsonl", lines)
    problems = dataset_problems(dataset_cfg("dataset=math_l3", f"dataset.path={path}"))
    assert [p.prompt for p in problems] == ["What is 1+1?", "Area of a unit square?"]
    assert problems[1].meta == {"subject": "Geometry", "level": 3}
    assert problems[0].answer == "So $\\boxed{2}$."  # the whole solution: grading reads its box
    err = capsys.readouterr().err
    report = [line for line in err.splitlines() if "skipped" in line]
    assert len(report) == 1
    assert "skipped 6 malformed rows and 1 with an unknown level" in report[0]
    rows = [json.loads(line) for line in lines[1:3] + lines[4:10]]
    kept, skipped = parse_math_rows(rows)
    assert (len(kept), skipped.malformed, skipped.unknown_level) == (2, 5, 1)  # 5: no bad JSON


def test_a_missing_file_is_a_user_error(tmp_path):
    cfg = dataset_cfg("dataset=math_l3", f"dataset.path={tmp_path / 'nope.jsonl'}")
    with pytest.raises(DataError, match="no such file or folder"):
        load_problems(cfg)
    (tmp_path / "m.csv").write_text("problem,solution\n")
    with pytest.raises(DataError, match="unknown format"):
        dataset_problems(dataset_cfg("dataset=math_l3", f"dataset.path={tmp_path / 'm.csv'}"))


def test_nothing_usable_is_a_user_error(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", json.dumps(row("", "1"))])
    with pytest.raises(DataError, match="no usable problems at levels"):
        dataset_problems(dataset_cfg("dataset=math_l3", f"dataset.path={bad}"))
    level4 = write_jsonl(tmp_path / "l4.jsonl", [json.dumps(row("1+1?", "2", level="Level 4"))])
    with pytest.raises(DataError, match=r"no usable problems at levels \[3\]"):
        dataset_problems(dataset_cfg("dataset=math_l3", f"dataset.path={level4}"))


def math500_rows(split: str) -> list[dict]:
    """MATH-500's field layout: subject (not type), an integer level, a separate answer."""
    return [
        {
            "problem": f"{split} {i}+1?",
            "solution": f"$\\boxed{{{i + 1}}}$",
            "answer": str(i + 1),
            "subject": "Algebra",
            "level": i % 5 + 1,
            "unique_id": f"{split}/{i}.json",
        }
        for i in range(5)
    ]


def test_hub_loader_reads_a_local_dataset_folder_and_a_parquet_file(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    folder = tmp_path / "math500"
    folder.mkdir()
    for split in ("train", "test"):
        pq.write_table(pa.Table.from_pylist(math500_rows(split)), folder / f"{split}.parquet")
    from_folder = dataset_problems(dataset_cfg("dataset=math500", f"dataset.path={folder}"))
    assert [p.prompt for p in from_folder] == [f"test {i}+1?" for i in range(5)]  # split=test
    assert [p.meta["level"] for p in from_folder] == [1, 2, 3, 4, 5]
    one_file = f"dataset.path={folder / 'test.parquet'}"
    assert dataset_problems(dataset_cfg("dataset=math500", one_file)) == from_folder


def test_no_path_loads_the_hub_id_with_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name: str, split: str):
        calls.append((name, split))
        return math500_rows(split)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems = dataset_problems(dataset_cfg("dataset=math500", "dataset.levels=[2]"))
    assert calls == [("HuggingFaceH4/MATH-500", "test")]
    assert [p.prompt for p in problems] == ["test 1+1?"]
    dataset_problems(dataset_cfg("dataset=math_l3", "dataset.levels=[1]"))
    assert calls[-1] == ("DigitalLearningGmbH/MATH-lighteval", "train")

    def offline(name: str, split: str):
        raise ConnectionError("Couldn't reach the Hub\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"cannot load dataset '.*MATH-500' split 'test'") as e:
        dataset_problems(dataset_cfg("dataset=math500"))
    assert "\n" not in str(e.value)


@needs_math
def test_the_held_out_split_is_seeded_and_disjoint():
    path = f"dataset.path={MATH_DIR / 'test.jsonl'}"
    train, held = load_problems(dataset_cfg("dataset=math_l3", path))
    again_train, again_held = load_problems(dataset_cfg("dataset=math_l3", path))
    _, other_held = load_problems(dataset_cfg("dataset=math_l3", path, "dataset.split_seed=1"))
    assert (again_train, again_held) == (train, held)
    assert other_held != held
    assert len(set(train) | set(held)) == 1131


@needs_math
def test_held_out_problems_can_come_from_another_level():
    path = f"dataset.path={MATH_DIR / 'test.jsonl'}"
    cfg = dataset_cfg("dataset=math_l3", path, "dataset.eval_levels=[4]")
    train, held = load_problems(cfg)
    assert (len(train), len(held)) == (1131, 100)  # every Level 3 problem trains
    assert {p.meta["level"] for p in held} == {4}
    subset, _ = load_problems(
        dataset_cfg("dataset=math_l3", path, "dataset.eval_levels=[4]", "dataset.train_size=113")
    )
    assert len(subset) == 113 and set(subset) <= set(train)
    with pytest.raises(DataError, match=r"dataset\.train_size=2000 is not allowed: 1\.\.1031"):
        load_problems(dataset_cfg("dataset=math_l3", path, "dataset.train_size=2000"))


def test_format_prompt_plain_chat_and_bare():
    tok = train_tokenizer(["What is 1+1? The answer is 2."], vocab_size=270)
    problem = Problem("What is 1+1?", "2")
    template = "{problem} Put the answer in \\boxed{}."
    assert tok.chat_template is None
    assert format_prompt(problem, tok, template) == "What is 1+1? Put the answer in \\boxed{}."
    assert format_prompt(problem, tok, None) == "What is 1+1?"  # arith: the prompt as it is
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
        "{% if enable_thinking is defined and not enable_thinking %}<no_think>{% endif %}"
    )
    expected = "<user>What is 1+1? Put the answer in \\boxed{}.<assistant><no_think>"
    assert format_prompt(problem, tok, template) == expected
    thinking = format_prompt(problem, tok, template, enable_thinking=True)
    assert thinking == expected.removesuffix("<no_think>")


def test_a_stratified_sample_keeps_each_subject_and_level_in_proportion():
    # a file sorted by subject: 6 Algebra L1, 3 Algebra L2, 1 Geometry L1 -- the first 5 rows
    # would be Algebra Level 1 only
    kinds = [("Algebra", 1)] * 6 + [("Algebra", 2)] * 3 + [("Geometry", 1)]
    problems = [Problem(f"p{i}", "1", {"subject": s, "level": v}) for i, (s, v) in enumerate(kinds)]
    # k = 5: shares 3, 1.5, 0.5 -> 3, 1, 0 and one more to a remainder of .5 (the seed decides)
    draws = {seed: stratified_sample(problems, 5, seed) for seed in range(20)}
    for sample in draws.values():
        counts = Counter((p.meta["subject"], p.meta["level"]) for p in sample)
        assert counts[("Algebra", 1)] == 3
        assert (counts[("Algebra", 2)], counts[("Geometry", 1)]) in {(2, 0), (1, 1)}
        assert sample == sorted(sample, key=lambda p: int(p.prompt[1:]))  # in file order
    assert len({tuple(p.prompt for p in s) for s in draws.values()}) > 1  # the seed matters
    assert stratified_sample(problems, 5, 3) == draws[3]  # and fixes the sample
    # k = 4 over two equal subjects: two of each, whatever the seed
    halves = [Problem(f"q{i}", "1", {"subject": "AB"[i // 10], "level": 3}) for i in range(20)]
    for seed in range(5):
        picked = Counter(p.meta["subject"] for p in stratified_sample(halves, 4, seed))
        assert picked == {"A": 2, "B": 2}
    assert stratified_sample(problems, None, 0) == problems  # no limit: all, in order
    assert stratified_sample(problems, 50, 0) == problems
    arith = [Problem(f"{i}+0=", str(i)) for i in range(30)]  # no strata: a plain seeded sample
    assert len(set(stratified_sample(arith, 7, 1))) == 7
