"""Shared test helpers: compose the real config with small overrides (house style), and a
random-weight tiny model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from opo_cli.config import CONF_DIR
from opo_cli.data import arith_problems
from opo_cli.models import build_tiny_model, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
MATH_DIR = Path(os.environ.get("OPO_MATH_DIR", REPO.parent / "shared" / "data" / "math"))
needs_math = pytest.mark.skipif(
    not (MATH_DIR / "test.jsonl").exists(), reason=f"no MATH data at {MATH_DIR}"
)

OPO = [sys.executable, "-m", "opo_cli"]  # the `opo` command, by this interpreter: PATH not needed

TINY = [  # a run that takes about a second on a CPU
    "logger=none",
    "trainer.steps=2",
    "trainer.save_every=1",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=4",
    "model.tiny.warm_start.steps=20",
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
]


def compose_config(name: str, overrides=(), *, hydra: bool = False):
    """The real `conf/<name>.yaml` composed with `overrides` (and Hydra's own keys if asked)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(name, overrides=list(overrides), return_hydra_config=hydra)


def compose_train(overrides: list[str], cache_dir: Path, *, tiny: bool = True):
    """The real `conf/train.yaml` composed with the tiny overrides, then `overrides`."""
    base = [*TINY, f"model.cache_dir={cache_dir}"] if tiny else ["logger=none"]
    return compose_config("train", [*base, *overrides])


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared CPU they spin: one is faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_and_tok():
    """A random-weight tiny Llama and the arith tokenizer, float32 on CPU."""
    tok = train_tokenizer([p.prompt + p.answer for p in arith_problems(19, "+")], 300)
    sizes = OmegaConf.create(
        {"hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 4, "max_positions": 64}
    )
    return build_tiny_model(sizes, tok, seed=0).eval(), tok


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One tiny-model cache for the whole session: the warm start is paid once."""
    return tmp_path_factory.mktemp("opo-cache")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests are skipped on a machine without CUDA, `vllm` tests where vLLM is not
    importable."""
    import importlib.util

    import torch

    missing = {
        "gpu": None if torch.cuda.is_available() else "needs a CUDA device",
        "vllm": None if importlib.util.find_spec("vllm") else "needs vLLM (see tests/test_vllm.py)",
    }
    for item in items:
        for mark, reason in missing.items():
            if reason and mark in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
