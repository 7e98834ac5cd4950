"""Run folders as a user leaves them: checkpoints written, pruned, overwritten, left half-done by
a crash, resumed from; an earlier run moved aside; `checkpoint=` and `opo eval`'s checks.
In-process and on the tiny model, seconds. Run: pytest tests/test_run_folders.py -q
"""

from __future__ import annotations

import pickle
import random
import shutil
import time
from pathlib import Path

import pytest
import torch

from opo_cli import checkpoint
from opo_cli.checkpoint import (
    is_sharded,
    load_trainer_state,
    rank_rng,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from opo_cli.config import ConfigError
from opo_cli.errors import UserError
from opo_cli.parallel import SHARDS_DIR, load_sharded
from opo_cli.runs import (
    REPLACED_DIR,
    STATE_FILE,
    check_eval,
    list_checkpoints,
    model_candidates,
    set_aside_previous_run,
)
from opo_cli.tracking import WANDB_ID_FILE
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def saving(model_and_tok):
    """The keyword arguments of `save_checkpoint`: the tiny model, one Adam step taken."""
    model, tok = model_and_tok
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return {"model": model, "tok": tok, "optimizer": optimizer, "scheduler": scheduler}


def save(run: Path, step: int, saving: dict, keep_last: int = 3, **state) -> Path:
    return save_checkpoint(
        run, step, trainer_state={"sampler": state or {"pos": step}}, keep_last=keep_last, **saving
    )


# ---------------------------------------------------------------- checkpoints


def test_a_checkpoint_holds_weights_tokenizer_optimizer_and_trainer_state(tmp_path, saving):
    folder = save(tmp_path, 5, saving, pos=17)
    assert folder == tmp_path / "checkpoints" / "step_5"
    assert (folder / "model.safetensors").is_file()  # safetensors, not a pickle
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    state, optim = load_trainer_state(folder)
    assert state["step"] == 5 and state["sampler"] == {"pos": 17}
    assert set(state["rng"]) >= {"python", "torch"}
    assert optim["scheduler"] == saving["scheduler"].state_dict()
    torch.testing.assert_close(
        optim["optimizer"]["state"][0]["exp_avg"],
        saving["optimizer"].state_dict()["state"][0]["exp_avg"],
    )
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_5"]  # no temp left


def test_only_the_newest_keep_last_checkpoints_are_kept(tmp_path, saving):
    for step in (1, 2, 9, 10):  # step_10 is newer than step_9, though it sorts before it
        save(tmp_path, step, saving, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_10", "step_9"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_10", "step_9"]


def test_a_stale_temp_folder_from_a_crashed_save_is_not_carried_into_the_checkpoint(
    tmp_path, saving
):
    # a save killed mid-write left .tmp_step_4 with a half-written file; the rerun's save of
    # step 4 must not pick it up
    # (an adapter file there would make loaders take step_4 for a PEFT adapter)
    stale = tmp_path / "checkpoints" / ".tmp_step_4"
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"cut off")
    folder = save(tmp_path, 4, saving)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "optimizer.pt",
         STATE_FILE, "tokenizer.json", "tokenizer_config.json"]
    )  # fmt: skip
    assert not stale.exists()


def test_the_first_checkpoint_of_a_run_creates_its_folders(tmp_path, saving):
    folder = save(tmp_path / "outputs" / "train" / "new-run", 1, saving)
    assert list_checkpoints(tmp_path / "outputs" / "train" / "new-run") == [folder]


def test_an_old_checkpoint_removed_meanwhile_does_not_fail_the_save(tmp_path, saving, monkeypatch):
    # someone frees disk space by deleting the oldest checkpoint by hand while the run saves:
    # it is listed for pruning, then gone when the save comes to remove it
    for step in (1, 2):
        save(tmp_path, step, saving, keep_last=2)

    def listed_then_deleted(run_dir):
        found = list_checkpoints(run_dir)
        shutil.rmtree(found[-1])
        return found

    monkeypatch.setattr(checkpoint, "list_checkpoints", listed_then_deleted)
    save(tmp_path, 3, saving, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_3"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoint_holds_the_shards_and_reloads_them_exactly(tmp_path, saving):
    # FSDP2's format, written here by one process: torch.distributed.checkpoint needs no
    # process group for that, so the files are the ones rank 0 writes under torchrun
    folder = save_checkpoint(tmp_path, 2, trainer_state={}, keep_last=3, sharded=True, **saving)
    assert is_sharded(folder)
    assert not is_sharded(save(tmp_path, 3, saving))
    assert (folder / SHARDS_DIR).is_dir() and (folder / "config.json").is_file()
    assert not any(p.suffix == ".safetensors" for p in folder.iterdir())  # weights: shards only
    _, optim = load_trainer_state(folder)
    assert set(optim) == {"scheduler"}  # the optimizer state is in the shards
    assert optim["scheduler"] == saving["scheduler"].state_dict()

    model, optimizer = saving["model"], saving["optimizer"]
    torch.manual_seed(1)
    fresh = type(model)(model.config)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    load_sharded(folder, fresh, fresh_optimizer)
    expected, got = model.state_dict(), fresh.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    saved, loaded = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert set(loaded) == set(saved) and len(saved) == len(list(model.parameters()))
    for index, state in saved.items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded[index][key], state[key]), (index, key)


def test_each_rank_gets_its_own_rng_state_only_at_the_world_size_it_was_saved_at(tmp_path, saving):
    torch.manual_seed(5)
    folder = save(tmp_path, 1, saving)
    expected = torch.rand(4)  # the draws a resumed single-process run replays
    state, _ = load_trainer_state(folder)
    assert len(state["rng_ranks"]) == 1
    set_rng_state(rank_rng(state, 0, 1))
    assert torch.equal(torch.rand(4), expected)

    two = {"rng": "rank 0's", "rng_ranks": ["rank 0's", "rank 1's"]}  # saved by 2 ranks
    assert [rank_rng(two, rank, 2) for rank in (0, 1)] == ["rank 0's", "rank 1's"]
    assert rank_rng(two, 0, 1) is None  # resumed at another world size: the caller reseeds
    assert [rank_rng(two, rank, 3) for rank in (0, 1, 2)] == [None] * 3
    older = {"rng": "the only rank's"}  # a checkpoint from before `rng_ranks`
    assert rank_rng(older, 0, 1) == "the only rank's"
    assert [rank_rng(older, rank, 2) for rank in (0, 1)] == [None, None]


class Payload:
    """Anything but tensors and plain containers: unpickling it would run code."""


def test_a_trainer_state_holding_pickled_objects_is_refused(tmp_path, saving):
    # checkpoints may come from elsewhere: loading one must never unpickle arbitrary objects
    folder = save(tmp_path, 1, saving)
    good = (folder / STATE_FILE).read_bytes()
    torch.save({"step": 1, "payload": Payload()}, folder / STATE_FILE)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_trainer_state(folder)
    (folder / STATE_FILE).write_bytes(good)
    torch.save({"optimizer": Payload()}, folder / "optimizer.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_trainer_state(folder)


def test_saving_a_step_again_replaces_it(tmp_path, saving):
    # a run resumed from step 4 that crashed before step 6 saves step 6 again
    save(tmp_path, 6, saving, pos=1)
    (tmp_path / "checkpoints" / "step_6" / "stray.txt").write_text("from the first attempt")
    folder = save(tmp_path, 6, saving, pos=2)
    assert load_trainer_state(folder)[0]["sampler"] == {"pos": 2}
    assert not (folder / "stray.txt").exists()


def test_cuda_generators_are_saved_and_restored_on_a_gpu_machine(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["gpu0-state"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = rng_state()
    assert state["cuda"] == ["gpu0-state"]
    set_rng_state(state)
    assert restored == [["gpu0-state"]]
    set_rng_state({k: v for k, v in state.items() if k != "cuda"})  # saved on a CPU machine
    assert restored == [["gpu0-state"]]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # resumed on a CPU machine
    set_rng_state(state)
    assert restored == [["gpu0-state"]]


def test_rng_state_round_trip_replays_the_same_draws():
    random.seed(3)
    torch.manual_seed(3)
    state = rng_state()
    first = (random.random(), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), torch.rand(3))
    assert first[0] == again[0]
    assert torch.equal(first[1], again[1])


# ---------------------------------------------------------------- which checkpoints a run has


def make_checkpoint(run: Path, step: int, *, complete: bool = True) -> Path:
    folder = run / "checkpoints" / f"step_{step}"
    folder.mkdir(parents=True)
    if complete:
        (folder / STATE_FILE).write_bytes(b"")
    return folder


def test_list_checkpoints_newest_first_and_only_complete_ones(tmp_path):
    assert list_checkpoints(tmp_path) == []  # a run that never saved
    for step in (2, 10, 9):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 11, complete=False)  # no trainer state: not resumable
    (tmp_path / "checkpoints" / ".tmp_step_12").mkdir()
    (tmp_path / "checkpoints" / "step_x").mkdir()
    (tmp_path / "checkpoints" / "step_13.bak").mkdir()
    (tmp_path / "checkpoints" / "step_13.bak" / STATE_FILE).write_bytes(b"")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_10", "step_9", "step_2"]


def test_a_model_folder_and_a_run_without_final(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, 3)
    (run / "final").mkdir()  # final/ without config.json: the save never finished
    assert model_candidates(str(run)) == [str(run / "checkpoints" / "step_3")]
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(UserError) as error:
        model_candidates(str(model))  # a folder, but neither a run nor a model
    assert str(error.value) == (
        f"checkpoint={model}: not a run folder (no final/ or checkpoints/step_N/) "
        "nor a model folder (no config.json) nor a LoRA adapter (no adapter_config.json)"
    )
    (model / "config.json").write_text("{}")
    assert model_candidates(str(model)) == [str(model)]
    with pytest.raises(UserError, match="no such folder"):
        model_candidates("./not-here")  # looks local: never taken for a hub id
    with pytest.raises(UserError, match="no such folder"):
        model_candidates("a/b/c")  # not owner/name


# ---------------------------------------------------------------- trainer.resume=never


def test_a_fresh_start_moves_the_earlier_run_aside(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, 4)
    (run / "final").mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / WANDB_ID_FILE).write_text("abc")
    (run / ".hydra").mkdir()  # the new run's config snapshot: stays
    aside = set_aside_previous_run(run)
    assert aside.parent == run / REPLACED_DIR
    assert sorted(p.name for p in aside.iterdir()) == sorted(
        ["checkpoints", "final", "metrics.jsonl", WANDB_ID_FILE]
    )
    assert (aside / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in run.iterdir()) == [".hydra", REPLACED_DIR]
    assert list_checkpoints(run) == []  # nothing left to resume from


def test_a_fresh_start_in_an_empty_folder_moves_nothing(tmp_path):
    (tmp_path / ".hydra").mkdir()
    assert set_aside_previous_run(tmp_path) is None
    assert not (tmp_path / REPLACED_DIR).exists()


def test_two_fresh_starts_within_a_second_keep_both_earlier_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "gmtime", lambda: time.struct_time((2026, 1, 2, 3, 4, 5, 0, 2, 0)))
    (tmp_path / "metrics.jsonl").write_text("first\n")
    first = set_aside_previous_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("second\n")
    second = set_aside_previous_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("third\n")
    third = set_aside_previous_run(tmp_path)
    assert [first.name, second.name, third.name] == [
        "20260102-030405",
        "20260102-030405-2",
        "20260102-030405-3",
    ]
    assert (second / "metrics.jsonl").read_text() == "second\n"


# ---------------------------------------------------------------- opo eval's checks


def test_opo_eval_with_a_missing_dataset_file_names_it(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    missing = tmp_path / "typo.jsonl"
    cfg = compose_config("eval", [f"checkpoint={model}", f"+dataset.path={missing}"])
    with pytest.raises(ConfigError, match=rf"dataset\.path.*{missing.name}"):
        check_eval(cfg)


def test_opo_eval_checks_settings_and_names_the_model_folders(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    s, candidates = check_eval(compose_config("eval", [f"checkpoint={model}", "eval.n=4"]))
    assert candidates == [str(model)] and s.n == 4
    with pytest.raises(ConfigError, match=r"eval\.limit"):
        check_eval(compose_config("eval", [f"checkpoint={model}", "eval.limit=0"]))
    with pytest.raises(
        UserError, match=r"^checkpoint= is required: a run folder, a model folder or a hub id$"
    ):
        check_eval(compose_config("eval", []))
