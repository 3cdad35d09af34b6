"""`spectune models distill`: a drafter trained from a target's logits, deterministic and cached."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gguf_export import write_gguf
from spectune.models.card import read_card
from spectune.models.distill import DistillSpec, distill_drafter, kd_loss
from spectune.models.imported import import_model
from spectune.models.presets import ModelSpec
from spectune.pair import load_pair
from spectune.pair_ref import PairRef

SMALL = DistillSpec(ModelSpec(n_layers=1, hidden_size=32, n_heads=2, intermediate_size=64, steps=4, batch=4,
                              seq_len=64, lr=3e-3),
                    chat_windows=1, code_bytes=150_000, heldout_code_bytes=40_000, answers=4, heldout_answers=2,
                    answer_tokens=12, answer_batch=4, top_k=8, eval_windows=2)


@pytest.fixture(scope="module")
def imported_target(micro_pair: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("distill")
    return import_model(gguf=write_gguf(micro_pair / "target", folder / "micro.gguf"), out=folder / "pair",
                        progress=False)


def _copy_target(source: Path, dest: Path) -> Path:
    shutil.copytree(source / "target", dest / "target")
    shutil.copy(source / "card.json", dest / "card.json")
    return dest


def test_a_distilled_drafter_makes_a_pair_with_a_card(imported_target: Path, tmp_path: Path) -> None:
    pair_dir = distill_drafter(_copy_target(imported_target, tmp_path / "a"), SMALL, progress=False)
    pair = load_pair(PairRef.model_validate(str(pair_dir)))  # one vocabulary, both models load
    assert pair.drafter is not None and pair.drafter.config.num_hidden_layers == 1
    entry = read_card(pair_dir)["drafter"]
    assert 0.0 <= entry["heldout"]["agreement_code"] <= 1.0 and entry["heldout"]["agreement_answers"] is not None
    assert entry["data"]["answers"] == 4 and entry["cost"]["float32"]["ratio"] > 0
    assert read_card(pair_dir)["kind"] == "imported"  # the import's card is kept, the drafter added
    weights = pair_dir / "drafter" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    distill_drafter(pair_dir, SMALL, progress=False)  # cached
    assert weights.stat().st_mtime_ns == before


def test_distillation_is_deterministic(imported_target: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    first = distill_drafter(_copy_target(imported_target, tmp_path / "a"), SMALL, seed=3, progress=False)
    second = distill_drafter(_copy_target(imported_target, tmp_path / "b"), SMALL, seed=3, progress=False)
    a, b = (load_file(p / "drafter" / "model.safetensors") for p in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kd_loss_is_smallest_where_the_student_matches() -> None:
    teacher = torch.randn(5, 40) * 3  # [N, V]
    assert kd_loss(teacher, teacher, 8) < kd_loss(torch.randn(5, 40), teacher, 8)
    assert kd_loss(teacher, teacher, 40) == pytest.approx(-(teacher.softmax(-1) * teacher.log_softmax(-1)).sum(-1).mean().item(), rel=1e-4)


def test_a_folder_without_a_target_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no target/ model: import one first"):
        distill_drafter(tmp_path, SMALL, progress=False)


def test_the_answers_are_kept_and_reused(imported_target: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spectune.models import distill

    pair_dir = distill_drafter(_copy_target(imported_target, tmp_path / "a"), SMALL, threads=1, progress=False)
    assert len(list((pair_dir / ".distill").glob("answers-*.json"))) == 1
    monkeypatch.setattr(distill, "_answers", lambda *a, **k: pytest.fail("the answers were generated again"))
    distill_drafter(pair_dir, SMALL, threads=1, force=True, progress=False)
    assert read_card(pair_dir)["drafter"]["train"]["torch_threads"] == 1
