"""`opo eval`'s bookkeeping without a model: summaries (greedy and sampled, one problem),
batching and grading, the result files, W&B names, and the choice of checkpoint. Generation
is replaced by a scripted one (the model itself is tested in test_generation.py and
test_eval.py), so every number here is known by hand. Run: pytest tests/test_eval_metrics.py -q
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import opo_cli.evaluate as E
from opo_cli import distributed
from opo_cli.config import validate_eval
from opo_cli.data import Problem, dataset_problems, stratified_sample
from opo_cli.distributed import SINGLE, Dist
from opo_cli.errors import UserError
from tests.conftest import compose_config


def graded(correct, *, truncated=None, lengths=None, answers=None, meta=None) -> E.Graded:
    n = len(correct)
    answers = answers or ["1" if ok else "2" for ok in correct]
    return E.Graded(
        Problem("p", "\\boxed{1}", meta or {}),
        [f"\\boxed{{{a}}}" for a in answers],
        list(correct),
        lengths or [4] * n,
        truncated or [False] * n,
    )


# ---------------------------------------------------------------- summaries


def test_greedy_summary_of_one_problem_has_no_pass_at_k():
    # n = 1 (greedy): accuracy is pass@1 and there is nothing to draw k samples from
    out = E.summarise([graded([True], truncated=[True], lengths=[7])], (1,), E.VOTING["math"])
    assert out == {
        "accuracy": 1.0,
        "n": 1,
        "samples_per_problem": 1,
        "response_len_mean": 7.0,
        "truncated_frac": 1.0,
        "by_subject": {},
        "by_level": {},
    }


def test_sampled_summary_has_pass_and_maj_at_each_k():
    results = [
        graded([True, False], truncated=[False, True], lengths=[3, 8]),
        graded([False, False], truncated=[True, True], lengths=[8, 8]),
    ]
    out = E.summarise(results, (1, 2), E.VOTING["math"])
    assert out["accuracy"] == 0.25
    assert out["truncated_frac"] == 0.75  # 3 of the 4 responses hit max_new_tokens
    assert out["response_len_mean"] == pytest.approx(27 / 4)
    assert out["pass@1"] == 0.25 and out["pass@2"] == 0.5
    assert out["maj@1"] == 0.5  # the first answer alone: right, then wrong
    assert out["maj@2"] == 0.5  # 1 vs 2, a tie: the answer seen first wins
    assert set(out) == {
        "accuracy", "n", "samples_per_problem", "response_len_mean", "truncated_frac",
        "pass@1", "pass@2", "maj@1", "maj@2", "by_subject", "by_level",
    }  # fmt: skip


def test_breakdowns_by_subject_and_level():
    results = [
        graded([True, True], meta={"subject": "Algebra", "level": 3}),
        graded([True, False], meta={"subject": "Algebra", "level": 5}),
        graded([False, False], meta={"subject": "Geometry", "level": 3}),
    ]
    out = E.summarise(results, (1,), E.VOTING["math"])
    assert out["by_subject"] == {
        "Algebra": {"n": 2, "accuracy": 0.75},
        "Geometry": {"n": 1, "accuracy": 0.0},
    }
    assert out["by_level"] == {
        "Level 3": {"n": 2, "accuracy": 0.5},
        "Level 5": {"n": 1, "accuracy": 0.5},
    }
    assert E.wandb_metrics(out | {"checkpoint": "x"}) == {
        "eval/accuracy": 0.5,  # (1 + 0.5 + 0) / 3
        "eval/n": 3,
        "eval/samples_per_problem": 2,
        "eval/response_len_mean": 4.0,
        "eval/truncated_frac": 0.0,
        "eval/pass@1": 0.5,
        "eval/maj@1": pytest.approx(2 / 3),
        "eval/subject/Algebra": 0.75,
        "eval/subject/Geometry": 0.0,
        "eval/level/Level 3": 0.5,
        "eval/level/Level 5": 0.5,
    }


def test_pass_at_k_edges():
    assert E.pass_at_k(3, 3, 3) == 1.0
    assert E.pass_at_k(3, 0, 1) == 0.0
    assert E.pass_at_k(4, 2, 3) == 1.0  # 2 wrong cannot fill 3 draws
    assert E.pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)


# ---------------------------------------------------------------- maj@k voting


def test_wrong_answers_the_grader_calls_equal_outvote_the_right_one():
    # right: 7 once; wrong: 1/2 and 0.5 (one answer to the grader) and 3
    responses = ["\\boxed{7}", "\\boxed{\\frac12}", "\\boxed{0.5}", "\\boxed{3}"]
    assert E.majority_correct(responses, [True, False, False, False], E.VOTING["math"]) is False
    # 3 and 4 are two answers: each has one vote, tied with 7, which came first
    responses = ["\\boxed{7}", "\\boxed{3}", "\\boxed{4}"]
    assert E.majority_correct(responses, [True, False, False], E.VOTING["math"]) is True
    # a later, equal-sized wrong group loses the tie; an earlier one wins it
    responses = ["\\boxed{3}", "\\boxed{7}", "\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{7}"]
    assert E.majority_correct(responses, [False, True, False, False, True], E.VOTING["math"])
    responses = ["\\boxed{0.5}", "\\boxed{7}", "\\boxed{1/2}", "\\boxed{7}"]
    assert not E.majority_correct(responses, [False, True, False, True], E.VOTING["math"])


def test_key_groups_and_joined_groups():
    voting = E.Voting(
        str, str.lower, lambda pairs: [a[0].lower() == b[0].lower() for a, b in pairs]
    )
    groups = E.key_groups([(0, "A"), (2, "b"), (3, "a"), (5, "B"), (6, "ab")], voting)
    assert groups == [(0, 2, "A"), (2, 2, "b"), (6, 1, "ab")]
    # "A" and "ab" share their first letter: one group of 3 from index 0
    assert sorted(E.joined_groups(groups, voting)) == [(0, 3), (2, 2)]
    assert E.joined_groups([(4, 2, "x")], voting) == [(4, 2)]
    asked = []

    def chain(pairs):  # x~y and y~z: all three join, whichever pair is seen first
        asked.extend(pairs)
        return [{a, b} != {"x", "z"} for a, b in pairs]

    joined = E.joined_groups([(5, 1, "z"), (1, 2, "x"), (3, 1, "y")], E.Voting(str, str, chain))
    assert joined == [(1, 4)]
    assert len(asked) == 3


def test_exact_match_voting_reads_the_whole_completion():
    voting = E.VOTING["exact_match"]
    assert E.majority_correct(["12", " 12 ", "13"], [True, True, False], voting)
    assert not E.majority_correct(["13", "13", "12"], [False, False, True], voting)
    assert not E.majority_correct(["  ", "12"], [False, False], voting)
    assert E.majority_correct(["", "", "12"], [False, False, True], voting)  # blanks: no vote
    assert E.majority_correct(["12", "13", "14"], [True, False, False], voting)  # 1 : 1 : 1


def test_math_same_asks_the_grader():
    assert E.math_same([("\\frac12", "0.5"), ("3", "4")]) == [True, False]


# ---------------------------------------------------------------- batching and grading


class ScriptedModel(torch.nn.Module):
    """No weights worth the name: `generate_completions` is replaced by `script`."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)


@pytest.fixture
def scripted(monkeypatch):
    """Replaces generation: answers right on problems whose first operand is even, with the
    prompt's length as the token count and truncation on odd lengths; records each call
    (prompts, n, max_new_tokens, tokenizer, backend, the RNG's seed)."""
    calls = []

    def fake(model, tok, prompts, *, n, max_new_tokens, temperature, top_p, backend=None):
        assert not model.training  # generation runs in eval mode
        calls.append((list(prompts), n, max_new_tokens, tok, backend, torch.initial_seed()))
        texts, lengths, truncated = [], [], []
        for p in prompts:
            a, b = (int(v) for v in p.rstrip("=").split("+"))
            for j in range(n):
                right = a % 2 == 0 or j == 1  # the second sample is always right
                texts.append(str(a + b if right else a + b + 1))
                lengths.append(len(p))
                truncated.append(len(p) % 2 == 1)
        return texts, lengths, truncated

    monkeypatch.setattr(E, "generate_completions", fake)
    return calls


def arith_cfg(*overrides: str):
    return compose_config("eval", ["dataset=arith", *overrides])


def test_problems_are_batched_by_prompt_length_and_kept_in_order(scripted):
    problems = [Problem(p, str(eval(p[:-1])), {}) for p in ("10+10=", "2+3=", "1+11=", "4+4=")]
    cfg = arith_cfg("eval.batch_size=3", "eval.n=2")
    model, seen = ScriptedModel().train(), []
    out = E.evaluate_problems(model, None, problems, cfg.dataset, validate_eval(cfg), seen.append)
    assert [c[0] for c in scripted] == [["2+3=", "4+4=", "1+11="], ["10+10="]]  # shortest first
    assert all(c[1:3] == (2, cfg.eval.max_new_tokens) for c in scripted)
    assert seen == [3, 1]
    assert model.training  # put back as it was
    assert [g.problem for g in out] == problems
    assert [g.correct for g in out] == [[True, True], [True, True], [False, True], [True, True]]
    assert out[2].responses == ["13", "12"]
    assert out[0].lengths == [6, 6] and out[0].truncated == [False, False]
    assert out[1].truncated == [False, False] and out[2].truncated == [True, True]  # 4, 5 chars


def test_held_out_metrics_are_greedy_accuracy_on_the_limit(scripted):
    cfg = compose_config("train", ["dataset=arith", "eval.limit=6"])
    problems = dataset_problems(cfg.dataset)
    s = validate_eval(cfg)
    metrics = E.held_out_metrics(ScriptedModel(), None, problems, cfg.dataset, s)
    assert set(metrics) == {"eval/accuracy", "eval/response_len_mean", "perf/eval_s"}
    asked = [p for call in scripted for p in call[0]]
    assert len(asked) == 6 and all(call[1] == 1 for call in scripted)
    even = sum(int(p.split("+")[0]) % 2 == 0 for p in asked)
    assert metrics["eval/accuracy"] == pytest.approx(even / 6)
    assert metrics["eval/response_len_mean"] == pytest.approx(sum(map(len, asked)) / 6)


def test_eval_every_without_held_out_problems_is_refused():
    s = validate_eval(compose_config("train", ["dataset=arith", "eval.every=5"]))
    with pytest.raises(UserError, match=r"eval\.every=5 needs held-out problems"):
        E.check_held_out(s, [])
    E.check_held_out(s, [Problem("1+1=", "2")])
    E.check_held_out(validate_eval(compose_config("train", ["dataset=arith"])), [])


# ---------------------------------------------------------------- opo eval, end to end


@pytest.fixture
def model_folder(tmp_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def test_opo_eval_writes_its_results(scripted, model_folder, tmp_path, monkeypatch):
    loaded = []

    def load(path, **kwargs):
        loaded.append((path, kwargs))
        return ScriptedModel(), None

    monkeypatch.setattr(E, "load_policy", load)
    cfg = arith_cfg(f"checkpoint={model_folder}", "eval.limit=4", "eval.n=2", "eval.batch_size=3")
    out = E.evaluate(cfg, tmp_path / "eval")
    assert loaded == [
        (str(model_folder), {"device": torch.device("cpu"), "dtype": torch.float32,
                             "trust_remote_code": False})
    ]  # fmt: skip
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved == out | {"eval_s": saved["eval_s"]}
    assert out["checkpoint"] == str(model_folder)
    assert (out["dataset"], out["split"], out["split_size"]) == ("arith", "held_out", 40)
    assert out["sample"] == "stratified by subject and level, seed 0 (dataset.split_seed)"
    assert out["path"] is None and out["n"] == 4 and out["samples_per_problem"] == 2
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").open()]
    assert [(r["index"], r["sample"]) for r in rows] == [(i, j) for i in range(4) for j in (0, 1)]
    asked = [p for call in scripted for p in call[0]]
    for row in rows:
        a, b = (int(v) for v in row["problem"].rstrip("=").split("+"))
        assert row["gold"] == str(a + b) and row["problem"] in asked
        assert row["correct"] == (a % 2 == 0 or row["sample"] == 1)
        assert row["response"] == str(a + b if row["correct"] else a + b + 1)
        assert row["tokens"] == len(row["problem"])
        assert row["truncated"] == (len(row["problem"]) % 2 == 1)
    assert out["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 8)


def test_the_sample_note_says_how_problems_were_chosen():
    assert E.sample_note(None, 40, 0) == "all"
    assert E.sample_note(40, 40, 0) == "all"
    assert E.sample_note(50, 40, 0) == "all"
    assert (
        E.sample_note(39, 40, 7) == "stratified by subject and level, seed 7 (dataset.split_seed)"
    )


def test_a_damaged_candidate_is_passed_over_for_the_next(monkeypatch, capsys):
    seen = []

    def load(path, **kwargs):
        seen.append(kwargs)
        if path != "good":
            raise OSError(f"{path}: truncated safetensors header\nmore detail")
        return "model", "tok"

    monkeypatch.setattr(E, "load_policy", load)
    assert E.load_first_readable(["bad", "good", "later"], "cpu", None, False) == (
        "good",
        "model",
        "tok",
    )
    assert seen == [{"device": "cpu", "dtype": None, "trust_remote_code": False}] * 2
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint bad: bad: truncated safetensors header" in err
    assert "more detail" not in err
    with pytest.raises(OSError, match="last: truncated"):
        E.load_first_readable(["bad", "last"], "cpu", None, False)


def test_results_name_the_gold_answer_not_the_solution(tmp_path):
    g = E.Graded(
        Problem("Q?", "We work... so $\\boxed{42}$.", {"subject": "Algebra", "level": 2}),
        ["\\boxed{42}"],
        [True],
        [5],
        [False],
    )
    E.write_results(tmp_path, {"accuracy": 1.0}, [g])
    (row,) = [json.loads(line) for line in (tmp_path / "samples.jsonl").open()]
    assert row == {
        "index": 0, "sample": 0, "subject": "Algebra", "level": 2, "problem": "Q?",
        "gold": "42", "response": "\\boxed{42}", "correct": True, "tokens": 5, "truncated": False,
    }  # fmt: skip
    assert (tmp_path / "eval.json").read_text() == '{\n  "accuracy": 1.0\n}\n'  # for reading


# ---------------------------------------------------------------- what opo eval shows and logs


class RecordingRun:
    """A W&B run that keeps what it is given."""

    def __init__(self):
        self.logged, self.finished = [], False

    def log(self, metrics, step):
        self.logged.append((metrics, step))

    def finish(self):
        self.finished = True


def test_opo_eval_prints_tables_and_a_summary_and_logs_to_wandb(
    scripted, model_folder, tmp_path, monkeypatch, capsys
):
    # MATH-like problems (subject and level) stand in for the dataset; the path is any file
    subjects = ["Algebra", "Geometry"]
    problems = [
        Problem(f"{a}+{a + 1}=", str(2 * a + 1), {"subject": subjects[a % 2], "level": 1 + a % 3})
        for a in range(6)
    ]
    runs, tok = [], object()
    monkeypatch.setattr(E, "dataset_problems", lambda cfg: problems)
    monkeypatch.setattr(E, "load_policy", lambda path, **kw: (ScriptedModel(), tok))
    monkeypatch.setattr(
        E, "start_wandb", lambda cfg, run_dir, name: runs.append((run_dir, name)) or run
    )
    run = RecordingRun()
    data = tmp_path / "problems.jsonl"
    data.write_text("")
    out_dir = tmp_path / "deep" / "eval-folder-with-a-name-long-enough-to-wrap-an-80-column-line"
    cfg = arith_cfg(
        f"checkpoint={model_folder}", "eval.n=2", f"+dataset.path={data}", "eval.limit=4"
    )
    cfg.dataset.split_seed = 5
    out = E.evaluate(cfg, out_dir)
    assert all(call[3] is tok for call in scripted)  # the checkpoint's tokenizer
    asked = [p for call in scripted for p in call[0]]
    assert sorted(asked) == sorted(p.prompt for p in stratified_sample(problems, 4, 5))
    assert out["path"] == str(data)
    assert 0.0 <= out["eval_s"] < 60.0
    assert runs == [(out_dir, "eval-arith")]
    assert run.logged == [(E.wandb_metrics(out), 0)] and run.finished
    err = capsys.readouterr().err
    assert "Accuracy by subject" in err and "Accuracy by level" in err
    assert "Level 2" in err and "Geometry" in err
    extra = "  ".join(f"{k} {out[k]:.3f}" for k in ("pass@1", "pass@2", "maj@1", "maj@2"))
    assert f"\naccuracy {out['accuracy']:.3f} on 4 problems  {extra}\n" in err
    assert f"\nresults: {out_dir / 'eval.json'}\n" in err  # one line, however long
    E.evaluate(cfg, out_dir)  # the same command again writes into the same folder


def test_a_greedy_summary_line_has_no_trailing_space(
    scripted, model_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(E, "load_policy", lambda path, **kw: (ScriptedModel(), None))
    E.evaluate(arith_cfg(f"checkpoint={model_folder}", "eval.limit=2"), tmp_path / "eval")
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("accuracy ")]
    assert line.endswith(" on 2 problems")


def test_trust_remote_code_reaches_the_loader(scripted, model_folder, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        E, "load_policy", lambda path, **kw: seen.append(kw) or (ScriptedModel(), None)
    )
    cfg = arith_cfg(f"checkpoint={model_folder}", "eval.limit=1", "eval.trust_remote_code=true")
    E.evaluate(cfg, tmp_path / "eval")
    assert seen[0]["trust_remote_code"] is True


class PlainTokenizer:
    chat_template = None  # a base model: the template is used as plain text


class ChatTokenizer:
    chat_template = "{{ messages }}"  # an instruct model: the prompt is one user turn

    def apply_chat_template(self, messages, *, tokenize, add_generation_prompt, enable_thinking):
        assert not tokenize and add_generation_prompt and not enable_thinking
        (turn,) = messages
        return f"<|{turn['role']}|>{turn['content']}<|assistant|>"


@pytest.mark.parametrize(
    ("tok", "prompt"),
    [(PlainTokenizer(), "Q: 2+3="), (ChatTokenizer(), "<|user|>Q: 2+3=<|assistant|>")],
    ids=["base model", "chat model"],
)
def test_prompts_go_through_the_dataset_template_and_sampling_settings(monkeypatch, tok, prompt):
    calls = []

    def fake(model, tok, prompts, *, n, max_new_tokens, temperature, top_p, backend=None):
        calls.append((tok, prompts, temperature, top_p))
        return ["5"] * (len(prompts) * n), [1] * (len(prompts) * n), [False] * (len(prompts) * n)

    monkeypatch.setattr(E, "generate_completions", fake)
    cfg = arith_cfg("eval.n=2", "eval.temperature=0.7", "eval.top_p=0.8")
    dataset = OmegaConf.to_container(cfg.dataset) | {"template": "Q: {problem}"}
    dataset = OmegaConf.create(dataset)  # arith's config with a template of its own
    out = E.evaluate_problems(
        ScriptedModel(), tok, [Problem("2+3=", "5")], dataset, validate_eval(cfg)
    )
    assert calls == [(tok, [prompt], 0.7, 0.8)]
    assert out[0].correct == [True, True]


def test_held_out_problems_are_the_same_seeded_sample_at_every_step(scripted):
    cfg = compose_config("train", ["dataset=arith", "eval.limit=5", "dataset.split_seed=9"])
    problems = dataset_problems(cfg.dataset)
    E.held_out_metrics(ScriptedModel(), None, problems, cfg.dataset, validate_eval(cfg))
    E.held_out_metrics(ScriptedModel(), None, problems, cfg.dataset, validate_eval(cfg))
    first, second = ([p for p in call[0]] for call in scripted)
    assert (
        sorted(first)
        == sorted(second)
        == sorted(p.prompt for p in stratified_sample(problems, 5, 9))
    )


def test_held_out_metrics_use_the_run_s_tokenizer_and_sampler_and_time_themselves(scripted):
    cfg = compose_config("train", ["dataset=arith", "eval.limit=4"])
    problems = dataset_problems(cfg.dataset)
    tok, backend, told = object(), object(), []  # the run's tokenizer and sampler

    def on_graded(graded):  # the completion logs; their time counts in perf/eval_s
        told.append(graded)
        time.sleep(0.05)

    start = time.perf_counter()
    metrics = E.held_out_metrics(
        ScriptedModel(), tok, problems, cfg.dataset, validate_eval(cfg), backend, on_graded
    )
    elapsed = time.perf_counter() - start
    assert scripted and all(call[3] is tok and call[4] is backend for call in scripted)
    (graded,) = told
    assert [g.problem for g in graded] == stratified_sample(problems, 4, cfg.dataset.split_seed)
    assert metrics["eval/accuracy"] == sum(g.correct[0] for g in graded) / 4
    assert 0.05 <= metrics["perf/eval_s"] <= elapsed


def test_held_out_metrics_of_sampled_settings_are_the_mean_pass_at_1(scripted):
    # opo eval's block (n = 2, ks [1, 2]) rather than training's greedy one: pass@k and
    # maj@k are computed on the way (with the dataset's voting) and the accuracy is c / n
    cfg = arith_cfg("eval.n=2", "eval.limit=6")
    told = []
    metrics = E.held_out_metrics(
        ScriptedModel(), None, dataset_problems(cfg.dataset), cfg.dataset, validate_eval(cfg),
        on_graded=told.append,
    )  # fmt: skip
    (graded,) = told
    even = [int(g.problem.prompt.split("+")[0]) % 2 == 0 for g in graded]
    assert 0 < sum(even) < 6  # a wrong answer to vote on, and a right one
    assert [g.correct for g in graded] == [[e, True] for e in even]  # the second is right
    assert metrics["eval/accuracy"] == pytest.approx((sum(even) + 6) / 12)


def test_the_backend_given_samples_every_batch(scripted):
    backend = object()  # the run's sampler (vLLM, opo's engine): only passed along
    cfg = arith_cfg("eval.batch_size=2")
    problems = [Problem(f"{a}+1=", str(a + 1)) for a in range(3)]
    s = validate_eval(cfg)
    E.evaluate_problems(ScriptedModel(), None, problems, cfg.dataset, s, backend=backend)
    assert len(scripted) == 2 and all(call[4] is backend for call in scripted)


# ---------------------------------------------------------------- several ranks (no process group)

GLOO_LOST = "[../third_party/gloo/transport/tcp/pair.cc:534] Connection closed by peer\nat ..."


def peer_gone(*args):
    raise RuntimeError(GLOO_LOST)


def lost_line(timeout: str) -> str:
    return "^" + re.escape(
        "the process group broke: another rank stopped, or kept this one waiting past "
        f"eval.dist_timeout_s={timeout} s ([../third_party/gloo/transport/tcp/pair.cc:534] "
        "Connection closed by peer)"
    ) + "$"  # fmt: skip


def test_each_rank_grades_every_other_batch_and_together_they_grade_each_once(
    scripted, monkeypatch
):
    # prompt lengths 7, 4, 8, 5, 6: by length, the batches of 2 are [1, 3], [4, 0], [2]
    prompts = ["100+10=", "1+1=", "100+100=", "10+1=", "10+10="]
    problems = [Problem(p, str(eval(p[:-1])), {}) for p in prompts]
    cfg = arith_cfg("eval.batch_size=2", "eval.n=2")
    s = validate_eval(cfg)
    one = E.evaluate_problems(ScriptedModel(), None, problems, cfg.dataset, s, seed=3)
    seed = 3 * 2**20  # batch_seed(3, 0): batch b samples with seed + b at any world size
    batch = [(["1+1=", "10+1="], seed), (["10+10=", "100+10="], seed + 1), (["100+100="], seed + 2)]
    assert [(call[0], call[5]) for call in scripted] == batch
    share = {0: {1: one[1], 3: one[3], 2: one[2]}, 1: {4: one[4], 0: one[0]}}  # batches 0, 2 | 1
    for rank, mine in ((0, [batch[0], batch[2]]), (1, [batch[1]])):
        scripted.clear()
        sent, seen = [], []

        def gather(obj, rank=rank, sent=sent):  # all_gather_object, the other share known
            if not isinstance(obj, dict):  # the agreement after each round: no failure
                return [obj]
            sent.append(obj)
            return [obj if r == rank else share[r] for r in (0, 1)]

        monkeypatch.setattr(distributed, "gather_objects", gather)
        out = E.evaluate_problems(
            ScriptedModel(), None, problems, cfg.dataset, s, seen.append, seed=3,
            ranks=Dist(rank=rank, world_size=2),
        )  # fmt: skip
        assert [(call[0], call[5]) for call in scripted] == mine
        assert sent == [share[rank]]
        assert seen == [4, 1]  # each round's problems, both ranks': batches 0 and 1, then 2
        assert out == one


@pytest.mark.parametrize("ranks", [SINGLE, Dist(rank=1, world_size=2)], ids=["1 rank", "rank 1"])
def test_an_error_while_grading_a_batch_ends_as_that_error(monkeypatch, ranks):
    calls = []

    def fake(model, tok, prompts, **kwargs):
        calls.append(prompts)
        raise ValueError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(E, "generate_completions", fake)
    problems = [Problem(f"{a}+1=", str(a + 1)) for a in range(4)]
    cfg = arith_cfg("eval.batch_size=1")
    seen = []
    with pytest.raises(ValueError, match=r"^CUDA out of memory"):
        E.evaluate_problems(
            ScriptedModel(), None, problems, cfg.dataset, validate_eval(cfg), seen.append,
            ranks=ranks,
        )  # fmt: skip
    assert len(calls) == 1 and seen == []  # it stops at the failing batch's round


@pytest.mark.parametrize("where", ["after a batch", "gathering the results"])
def test_a_rank_lost_during_evaluation_is_one_line(scripted, monkeypatch, where):
    if where == "after a batch":
        monkeypatch.setattr(distributed, "agree", peer_gone)
    else:  # the rounds agree, then the other rank is gone
        gather = distributed.gather_objects

        def lost(obj):
            return peer_gone() if isinstance(obj, dict) else gather(obj)

        monkeypatch.setattr(distributed, "gather_objects", lost)
    cfg = arith_cfg("eval.dist_timeout_s=30")
    problems = [Problem(f"{a}+1=", str(a + 1)) for a in range(3)]
    with pytest.raises(UserError, match=lost_line("30")):
        E.evaluate_problems(
            ScriptedModel(), None, problems, cfg.dataset, validate_eval(cfg),
            ranks=Dist(rank=0, world_size=2),
        )  # fmt: skip


def test_a_checkpoint_that_does_not_load_ends_as_the_loader_s_error(
    model_folder, tmp_path, monkeypatch
):
    def load(path, **kwargs):
        raise OSError(f"{path}/model.safetensors: incomplete metadata, file not fully covered")

    monkeypatch.setattr(E, "load_policy", load)
    with pytest.raises(OSError, match="incomplete metadata"):
        E.evaluate(arith_cfg(f"checkpoint={model_folder}"), tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_a_rank_lost_while_the_model_loads_is_one_line(model_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(E, "join_ranks", lambda s: (Dist(rank=0, world_size=2), None))
    monkeypatch.setattr(E, "load_policy", lambda path, **kw: (ScriptedModel(), None))
    monkeypatch.setattr(distributed, "agree", peer_gone)
    cfg = arith_cfg(f"checkpoint={model_folder}", "eval.dist_timeout_s=45")
    with pytest.raises(UserError, match=lost_line("45")):
        E.evaluate(cfg, tmp_path / "eval")


# ---------------------------------------------------------------- what a dataset votes with


@pytest.mark.parametrize(
    "dataset, kind", [("math", "math"), ("gsm8k", "gsm8k"), ("arith", "exact_match")]
)
def test_maj_at_k_groups_answers_by_the_datasets_grader(dataset, kind):
    # MATH's votes read the last \boxed{} and join equivalent forms (1/2 and 0.5); GSM8K's
    # read the final number; arith's compare the stripped text
    assert E.voting(compose_config("eval", [f"dataset={dataset}"]).dataset) is E.VOTING[kind]
    votes = E.VOTING[kind]
    if kind == "math":
        assert votes.extract("so \\boxed{2} then \\boxed{\\frac12}") == "\\frac12"
        assert votes.same([("\\frac12", "0.5")]) == [True]
    elif kind == "gsm8k":
        assert votes.extract("It costs $1,200.00 in all.") == "1200"
    else:
        assert votes.extract("  13 ") == "13" and votes.extract("   ") is None


def test_a_reward_of_ones_own_without_correctness_votes_by_exact_text(tmp_path, monkeypatch):
    # a user's reward says how good an answer is, not which answers are the same one
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text(
        "def score(responses, answers):\n    return [0.5] * len(responses)\n"
    )
    cfg = compose_config("eval", ["dataset=arith", "dataset.reward=mine.py:score"])
    assert E.voting(cfg.dataset) is E.VOTING["exact_match"]


def test_vllm_under_torchrun_is_refused_before_anything_loads(tmp_path):
    cfg = compose_config("eval", ["dataset=arith"])
    s = dataclasses.replace(validate_eval(cfg), backend="vllm")  # as if vllm were installed
    no_model = [str(tmp_path / "none")]  # nothing loads: the refusal comes first
    refused = r"vllm under torchrun \(2 processes\) is not built: run opo eval with vllm as one"
    with pytest.raises(UserError, match=refused):
        E.load_for_eval(cfg, s, no_model, torch.device("cpu"), Dist(rank=1, world_size=2))
    with pytest.raises(UserError, match="none"):  # one process: on to loading, which fails
        E.load_for_eval(cfg, s, no_model, torch.device("cpu"), SINGLE)


def test_the_sampler_gets_the_loaded_model_and_the_eval_settings(monkeypatch):
    # what `opo eval` hands its sampler: the folder that loaded, its dtype and device, the
    # sampling settings; no shared prefill (one sample per prompt when greedy)
    cfg = compose_config("eval", ["dataset=arith", "eval.limit=4", "eval.temperature=0.7"])
    s = dataclasses.replace(validate_eval(cfg), top_p=0.9, dtype="bfloat16")
    monkeypatch.setattr(E, "load_first_readable", lambda c, d, t, trust: (c[1], "M", "T"))
    opened = []
    monkeypatch.setattr(E, "open_backend", lambda name, o: opened.append((name, o)) or "B")
    out = E.load_for_eval(cfg, s, ["a", "b"], torch.device("cpu"), SINGLE)
    problems, size, path, model, tok, backend = out
    assert (len(problems), path, model, tok, backend) == (4, "b", "M", "T", "B")
    assert size == len(dataset_problems(cfg.dataset))
    ((name, o),) = opened
    assert name == s.backend
    assert (o.model_path, o.dtype, o.device) == ("b", torch.bfloat16, torch.device("cpu"))
    assert (o.trust_remote_code, o.share_prefill) == (False, False)
    assert (o.temperature, o.top_p, o.vllm) == (0.7, 0.9, s.vllm)
