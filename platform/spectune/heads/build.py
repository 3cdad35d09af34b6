"""`spectune heads train`: heads of one kind for a pair's target, cached beside the pair with a card.

    1. load the target (the pair's tokenizer too) and check the kind can draft for it
    2. the feature pass, cached under `<pair>/heads/features/<digest>/` (shared by every kind)
    3. the draft vocabulary: all tokens, or the corpus's most frequent (FR-Spec)
    4. train from the cache (seeded, deterministic), score agreement on held-out windows
    5. save heads.safetensors and heads.json, the vLLM export (`<pair>/heads/<kind>-vllm`), the card last

A heads folder whose card has the same request (kind, sizes, training options, feature digest, target
fingerprint, builder version) is used as it is, unless forced.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from spectune.heads import train as training
from spectune.heads.falcon import falcon_predictions
from spectune.heads.features import FeatureSpec, cached_features, fused_layers
from spectune.heads.load import check_supported, new_module, save_weights, target_print
from spectune.heads.spec import HEADS_VERSION, KINDS, HeadsError, HeadsSpec, default_folder, write_spec
from spectune.heads.transfer import transfer_layer, transfer_predictions
from spectune.heads.vocab import DraftVocab, frequent_tokens
from spectune.models.cache import build_lock, prepare_out
from spectune.models.card import read_card, write_card
from spectune.models.seeding import derive_seed, seeded_deterministic

AGREEMENT_TOPK = 4  # the card's top-k agreement: the target's argmax among the heads' 4 best
PPD_RANKS = 8  # ppd and transfer score 8 ranks per position: their sparse trees read the card's per-position, per-rank acceptance


@dataclass(frozen=True)
class HeadsOptions:
    """One kind's sizes and training schedule (defaults per kind in DEFAULTS)."""

    kind: str
    n_heads: int  # medusa/hydra: heads (draft depth); eagle/eagle3: unrolled training steps; falcon: the block
    n_layers: int = 1  # medusa/hydra: residual layers per head; eagle*: 1; falcon: decoder layers
    draft_vocab: int = 0  # tokens the heads may propose; 0 = the whole vocabulary
    steps: int = 300
    batch: int = 4
    lr: float = 1e-3
    seed: int = 0
    layer: int = 0  # transfer: the block l after which the pseudo states enter (0: L//2); unused by the others

    def described(self) -> dict:
        """As a dict; without `layer` when 0 (so the heads cached before it existed keep their request)."""
        keyed = asdict(self)
        if not self.layer:
            keyed.pop("layer")
        return keyed


DEFAULTS = {  # sized for the tiny pair: a few minutes per kind on 2 CPU cores
    "medusa": HeadsOptions("medusa", n_heads=4),
    "hydra": HeadsOptions("hydra", n_heads=4),
    "eagle": HeadsOptions("eagle", n_heads=3),
    "eagle3": HeadsOptions("eagle3", n_heads=3),
    "falcon": HeadsOptions("falcon", n_heads=2, n_layers=2),  # blocks of 2 tokens (Falcon's k), two decoder layers
    "ppd": HeadsOptions("ppd", n_heads=3, lr=1e-2),  # n_heads: prompt tokens (PPD's paper: 3)
    "transfer": HeadsOptions("transfer", n_heads=3),  # n_heads: pseudo positions m; layer 0: the target's L//2
}


READ_BY_TARGET = {"ppd": "prompt tokens", "transfer": "pseudo states"}  # kinds the target's own LM head reads out


def takes(kind: str, option: str) -> bool:
    """Whether `kind` has `option`: only transfer heads have a transfer layer; the kinds the target's own LM head
    reads out have no draft vocabulary."""
    if option == "layer":
        return kind == "transfer"
    if option == "draft_vocab":
        return kind not in READ_BY_TARGET
    return True


def options_for(kind: str, **overrides: Any) -> HeadsOptions:
    if kind not in DEFAULTS:
        raise HeadsError(f"unknown heads kind {kind!r}; kinds: {', '.join(KINDS)}")
    if overrides.get("draft_vocab") and not takes(kind, "draft_vocab"):
        raise HeadsError(f"{kind}'s {READ_BY_TARGET[kind]} are read out by the target's own LM head over its whole "
                         "vocabulary: no draft vocabulary (--draft-vocab 0)")
    if overrides.get("layer") and not takes(kind, "layer"):
        raise HeadsError(f"--layer is the transfer layer of transfer heads; {kind} heads have none")
    return replace(DEFAULTS[kind], **{k: v for k, v in overrides.items() if v is not None})


def options_for_each(kinds: list[str], **overrides: Any) -> list[HeadsOptions]:
    """Options for several kinds trained in one call: each option goes to the kinds that have it (`--kind all
    --layer 12` sets transfer's layer); an option that none of them has is an error."""
    for option, value in overrides.items():
        if value and not any(takes(kind, option) for kind in kinds):
            options_for(kinds[0], **{option: value})  # raises that kind's one-line error
    return [options_for(kind, **{k: v for k, v in overrides.items() if takes(kind, k)}) for kind in kinds]


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[spectune heads train] {msg}", file=sys.stderr, flush=True)


def train_heads(model, tokenizer, options: HeadsOptions, features: FeatureSpec, out: Path | None = None, *,
                force: bool = False, progress: bool = True) -> Path:
    """Train `options.kind` heads for `model` (a loaded target) into `out` (default `<pair>/heads/<kind>`)."""
    check_supported(options.kind, model)
    PLANS[options.kind].layers(options, model.config)  # a layer outside the target fails here, before the feature pass
    out = Path(out) if out is not None else default_folder(str(model.name_or_path), options.kind)
    if out is None:
        raise HeadsError(f"target {model.name_or_path} is not a pair folder's target/: give the heads folder (--out)")
    out = prepare_out(out)
    printed = target_print(model)
    request = {"version": HEADS_VERSION, "options": options.described(), "features": features.described(),
               "target": printed.model_dump(), "dtype": str(model.dtype)}
    with build_lock(out):
        card = read_card(out)
        if not force and card and card.get("request") == request and (out / "heads.safetensors").is_file():
            _log(progress, f"using the cached {options.kind} heads at {out}")
            return out
        (out / "card.json").unlink(missing_ok=True)  # a partial build must not look complete
        started = time.perf_counter()
        train, heldout, corpus = cached_features(out.parent / "features", model, tokenizer, features, printed.weights, progress)
        about = {"features": {"path": str(train.path.parent), "seconds": round(time.perf_counter() - started, 2),
                              **features.described(), "fused_layers": list(train.fused)},
                 "corpus": corpus.describe()}
        train_from_features(model, options, train, heldout, out, {"request": request, **about}, progress)
    return out


def train_from_features(model, options: HeadsOptions, train, heldout, out: Path, about: dict,
                        progress: bool = True) -> HeadsSpec:
    """Train, score, save and export one kind from a feature cache (any token source: tests use the
    target's own samples); the card (with `about`) is written last."""
    started = time.perf_counter()
    printed = target_print(model)
    spec, module, vocab, stats, scores = _train(model, options, train, heldout, printed, progress)
    save_weights(out, module, vocab)
    write_spec(out, spec)
    exported = _export(out, spec, module, vocab, model)
    card = {**about, "kind": options.kind, "target": printed.model_dump(),
            "draft_vocab": {"size": vocab.size, "of": vocab.full_size, "heldout_argmax_coverage": _coverage(heldout, vocab)},
            "training": stats, "agreement": scores, "vllm_export": exported,
            "total_seconds": round(time.perf_counter() - started + about.get("features", {}).get("seconds", 0), 2),
            "note": "agreement: per head position (1 = the first draft token after the root), the share of "
                    "held-out positions where the heads' best / k best include the target's argmax"}
    write_card(out, card)
    _log(progress, f"{options.kind}: top-1 agreement by position {scores['top1']}, top-{AGREEMENT_TOPK} "
                   f"{scores['topk']} ({card['total_seconds']:.0f} s) -> {out}")
    return spec


def _train(model, options: HeadsOptions, train, heldout, printed, progress: bool):
    config = model.config
    data = train.load()
    vocab = (frequent_tokens(data["tokens"], options.draft_vocab, config.vocab_size) if options.draft_vocab
             else DraftVocab.full(config.vocab_size))
    plan = PLANS[options.kind]
    spec = HeadsSpec(kind=options.kind, n_heads=options.n_heads, n_layers=options.n_layers,
                     feature_layers=plan.layers(options, config), draft_vocab_size=vocab.size, target=printed,
                     train={k: v for k, v in options.described().items() if k not in ("kind", "n_heads", "n_layers")})
    frozen = training.Frozen(vocab.rows(model.get_output_embeddings().weight).detach().float().cpu(),
                             model.get_input_embeddings().weight.detach().float().cpu(), vocab)
    with seeded_deterministic(derive_seed(options.seed, f"heads:{options.kind}:init")):
        module = new_module(spec, config)
    if options.kind == "eagle3":
        with torch.no_grad():
            module.lm_head.weight.copy_(frozen.readout)  # the target's rows: EAGLE-3's own head starts as (and stays) them
    heads = Training(spec, module, frozen, model)
    predict = plan.predictor(heads, False)
    learn = plan.predictor(heads, True)
    role = f"heads:{options.kind}"
    held = heldout.load()
    with training.frozen_weights(model):  # ppd and transfer backpropagate through the target: into their own parameters
        stats = training.fit(module, lambda w: training.prediction_loss(learn(data, w), vocab), data["tokens"].shape[0],
                             training.TrainOptions(options.steps, options.batch, options.lr, options.seed), role, progress)
        scores = training.agreement(lambda w: predict(held, w), held["tokens"].shape[0], vocab, plan.ranks)
    return spec, module, vocab, stats, scores


@dataclass(frozen=True)
class Training:
    """What a kind's predictor reads: the spec being trained, its module, the target's frozen parts, the target."""

    spec: HeadsSpec
    module: Any
    frozen: training.Frozen
    model: Any


# predictor(heads, learning) -> (data, windows) -> Predictions: draft logits per position for a batch of windows;
# `learning`: as trained (falcon glances), else as drafted
Predictor = Callable[[Training, bool], Callable[[dict, Any], training.Predictions]]


@dataclass(frozen=True)
class KindPlan:
    """How one kind trains: its predictor, the ranks its card scores, the target layers its spec reads."""

    predictor: Predictor
    ranks: int = AGREEMENT_TOPK
    layers: Callable[[HeadsOptions, Any], tuple[int, ...]] = lambda options, config: (config.num_hidden_layers,)


PLANS: dict[str, KindPlan] = {  # every kind of spec.KINDS, keyed by its name: nothing else branches on it
    "medusa": KindPlan(lambda h, _: lambda data, w: training.medusa_predictions(h.module, h.frozen, data, w)),
    "hydra": KindPlan(lambda h, _: lambda data, w: training.hydra_predictions(h.module, h.frozen, data, w)),
    "eagle": KindPlan(lambda h, _: lambda data, w: training.eagle_predictions(h.module, h.frozen, data, w, h.spec.n_heads)),
    "eagle3": KindPlan(lambda h, _: lambda data, w: training.eagle_predictions(h.module, h.frozen, data, w, h.spec.n_heads),
                       layers=lambda options, config: fused_layers(config.num_hidden_layers)),
    "falcon": KindPlan(lambda h, learning: lambda data, w: falcon_predictions(h.module, h.frozen, data, w, glance=learning)),
    "ppd": KindPlan(lambda h, _: lambda data, w: training.ppd_predictions(h.module, h.model, data, w), ranks=PPD_RANKS),
    "transfer": KindPlan(
        lambda h, _: lambda data, w: transfer_predictions(h.module, h.model, data, w, h.spec.feature_layers[0]),
        ranks=PPD_RANKS, layers=lambda options, config: (transfer_layer(options.layer, config.num_hidden_layers),)),
}


def _coverage(heldout, vocab: DraftVocab) -> float:
    """Share of held-out positions whose target argmax the draft vocabulary holds (1.0 when not reduced)."""
    best = heldout.tensor("top_ids")[..., 0].long()
    return round(float((vocab.index_of(best) >= 0).float().mean()), 4)


def _export(out: Path, spec: HeadsSpec, module, vocab: DraftVocab, model) -> str | None:
    from spectune.heads.export import VLLM_METHOD, export_vllm

    if spec.kind not in VLLM_METHOD:
        return None
    return str(export_vllm(out.parent / f"{spec.kind}-vllm", spec, module, vocab, model))
