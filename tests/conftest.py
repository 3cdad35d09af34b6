"""Shared pytest fixtures. Keep this small; put helpers in tests/support.py."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    import torch

    # The test models are tiny: a second thread only adds sync overhead, and CI's 2 cores are shared.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def micro_pair() -> Path:
    """The micro target/drafter pair (seed 0), built once (~30 s) and cached across runs
    in ``$SPECTUNE_CACHE`` or ``~/.cache/spectune`` (``pairs/micro-seed0``)."""
    from spectune.models.build import build_pair
    from spectune.models.presets import default_pair_dir

    return build_pair("micro", default_pair_dir("micro", 0), seed=0, progress=False)


# training steps of the micro heads where not 100: falcon's 2-layer drafter predicts up to 3 tokens ahead of its
# query entry and needs more to agree with the target as often as EAGLE does at the first position
STEPS = {"falcon": 300}


@pytest.fixture(scope="session")
def hybrid_micro_pair() -> Path:
    """The hybrid-micro pair (seed 0: a Bamba SSM-attention target, a Llama drafter), built once (~15 s)
    and cached like micro (``pairs/hybrid-micro-seed0``)."""
    from spectune.models.build import build_pair
    from spectune.models.presets import default_pair_dir

    return build_pair("hybrid-micro", default_pair_dir("hybrid-micro", 0), seed=0, progress=False)


@pytest.fixture(scope="session")
def micro_heads(micro_pair: Path) -> Path:
    """Medusa, Hydra, EAGLE, EAGLE-3, Falcon, PPD and Hidden Transfer heads for the micro pair, in ``<pair>/heads/<kind>`` where the methods
    find them, trained once (a small feature pass and ~100 steps each, seconds) and cached like the pair."""
    from spectune.heads.build import options_for, train_heads
    from spectune.heads.features import FeatureSpec
    from spectune.heads.spec import KINDS
    from spectune.pair import load_pair
    from spectune.pair_ref import PairRef

    pair = load_pair(PairRef.model_validate({"dir": micro_pair}))
    features = FeatureSpec(seq_len=128, train_windows=64, heldout_windows=8)
    for kind in KINDS:
        options = options_for(kind, steps=STEPS.get(kind, 100), batch=4, lr=3e-3)
        train_heads(pair.target, pair.tokenizer, options, features, progress=False)
    return micro_pair / "heads"


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``SPECTUNE_CACHE`` for one test (session fixtures such as ``micro_pair``
    are created first, so they still use the real cache)."""
    cache = tmp_path / "spectune-cache"
    cache.mkdir()
    monkeypatch.setenv("SPECTUNE_CACHE", str(cache))
    return cache


@pytest.fixture
def tiny_stand_in(micro_pair: Path, tmp_cache: Path) -> Path:
    """A cache whose ``tiny`` pair is the micro pair (linked), so specs naming ``pair: tiny`` validate
    on a machine that never built tiny (CI) without the 7-minute build."""
    (tmp_cache / "pairs").mkdir()
    (tmp_cache / "pairs" / "tiny-seed0").symlink_to(micro_pair, target_is_directory=True)
    return tmp_cache


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """Ray's session folder: short (unix socket paths are limited to ~107 bytes) and removed after."""
    folder = Path(tempfile.mkdtemp(prefix="st-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
