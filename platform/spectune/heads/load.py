"""Heads for a loaded target: found, parsed and checked before any decoding starts.

Every refusal is a HeadsError in one line naming the mismatch: no heads folder (and the command
that trains them), a heads file that does not parse, heads trained for another target (hidden size,
vocabulary, layer count, or the same shapes with other weights), a kind the target cannot support.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from spectune.heads.features import fused_layers
from spectune.heads.modules import (
    EagleDraft,
    FalconDraft,
    HydraHeads,
    MedusaHeads,
    PromptTokens,
    TransferMaps,
    eagle_config,
)
from spectune.heads.spec import TRAIN_HINT, WEIGHTS_FILE, HeadsError, HeadsSpec, TargetPrint, check_config, default_folder, read_spec
from spectune.heads.vocab import DraftVocab

VOCAB_KEY = "draft_vocab_ids"  # the draft vocabulary's token ids, stored beside the weights
EAGLE_ARCHITECTURES = ("llama",)  # the draft layer is a Llama decoder layer (vLLM's EagleLlama / Eagle3Llama)


def target_print(model: PreTrainedModel) -> TargetPrint:
    """The target's shape and a fingerprint of its LM head and input embeddings.

    The weights are rounded to bf16 before hashing, so one checkpoint loaded in float32 or bfloat16 has
    one fingerprint; every 64th row is hashed, enough to tell two trainings of one architecture apart.
    """
    digest = hashlib.sha1()
    for weight in (model.get_output_embeddings().weight, model.get_input_embeddings().weight):
        rows = weight.detach()[::64].to("cpu", torch.bfloat16).contiguous()
        digest.update(rows.view(torch.int16).numpy().tobytes())
    config = model.config
    return TargetPrint(name=str(model.name_or_path), model_type=str(config.model_type), hidden_size=config.hidden_size,
                       vocab_size=config.vocab_size, num_hidden_layers=config.num_hidden_layers,
                       weights=digest.hexdigest()[:16])


def check_supported(kind: str, model: PreTrainedModel) -> None:
    """A kind this target cannot support is refused, naming why."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or model.get_input_embeddings() is None:
        raise HeadsError(f"{kind} heads read out through the target's LM head and embeddings; "
                         f"{type(model).__name__} has no linear LM head")
    model_type = model.config.model_type
    if kind in ("eagle", "eagle3") and model_type not in EAGLE_ARCHITECTURES:
        raise HeadsError(f"{kind} heads are one Llama decoder layer (vLLM's Eagle{'3' if kind == 'eagle3' else ''}"
                         f"LlamaForCausalLM); the target is a {model_type} model ({type(model).__name__})")
    if kind == "falcon" and model_type not in EAGLE_ARCHITECTURES:
        raise HeadsError(f"falcon heads are Llama decoder layers shaped like the target's; the target is a "
                         f"{model_type} model ({type(model).__name__})")
    if kind in ("ppd", "transfer") and getattr(model.config, "model_type", "") not in EAGLE_ARCHITECTURES:
        raise HeadsError(f"{kind}'s extra positions ride in the target's tree-masked forward (a Llama-style model: 4-D "
                         f"mask, position ids, input embeddings); the target is a {model.config.model_type} model")
    if kind == "eagle3" and not fused_layers(model.config.num_hidden_layers):
        raise HeadsError(f"eagle3 fuses a low, a middle and a high layer below the last; the target has only "
                         f"{model.config.num_hidden_layers} layers (eagle3 needs >= 4)")


MODULES = {  # kind -> (spec, the target's config) -> an untrained module of its sizes
    "medusa": lambda spec, config: MedusaHeads(spec.target.hidden_size, spec.n_heads, spec.n_layers),
    "hydra": lambda spec, config: HydraHeads(spec.target.hidden_size, spec.n_heads, spec.n_layers),
    "eagle": lambda spec, config: EagleDraft(eagle_config(config), 1, len(spec.feature_layers), spec.draft_vocab_size),
    "eagle3": lambda spec, config: EagleDraft(eagle_config(config), 3, len(spec.feature_layers), spec.draft_vocab_size),
    "falcon": lambda spec, config: FalconDraft(eagle_config(config, spec.n_layers), block=spec.n_heads),
    "ppd": lambda spec, config: PromptTokens(spec.target.hidden_size, spec.n_heads,
                                             float(getattr(config, "initializer_range", 0.02))),
    "transfer": lambda spec, config: TransferMaps(spec.target.hidden_size, spec.n_heads),
}


def new_module(spec: HeadsSpec, config) -> nn.Module:
    """An untrained module of the spec's kind and sizes (the init is the caller's to seed)."""
    return MODULES[spec.kind](spec, config)


@dataclass(frozen=True)
class LoadedHeads:
    folder: Path
    spec: HeadsSpec
    module: nn.Module  # on the target's device and in its dtype, eval mode
    vocab: DraftVocab
    readout: nn.Linear  # [..., d] -> [..., V'] draft logits: the LM head's rows of the draft vocabulary
    embeddings: nn.Module  # the target's input embeddings

    def modules(self) -> tuple[nn.Module, ...]:
        """Every module whose forward is drafting (for timing from outside: `Drafter.draft_modules`)."""
        return (self.module, self.readout)


def resolve_folder(heads: str | None, kind: str, model: PreTrainedModel) -> Path:
    if heads is not None:
        return Path(heads).expanduser()
    folder = default_folder(str(model.name_or_path), kind)
    if folder is None:
        raise HeadsError(f"no {kind} heads for target {model.name_or_path}: it is not a pair folder's target/, "
                         "so give the heads folder (knob heads=DIR)")
    if not folder.is_dir():
        raise HeadsError(f"no {kind} heads for target {model.name_or_path} (looked in {folder}): "
                         + TRAIN_HINT.format(pair=folder.parent.parent, kind=kind))
    return folder


def load_heads(heads: str | None, kind: str, model: PreTrainedModel) -> LoadedHeads:
    """The `kind` heads at `heads` (default: beside the target in its pair folder), checked against `model`."""
    folder = resolve_folder(heads, kind, model)
    spec = read_spec(folder, kind)
    check_supported(kind, model)
    shape = {field: getattr(model.config, field, None) for field in ("hidden_size", "vocab_size", "num_hidden_layers")}
    check_config(spec, shape, folder)
    mine = target_print(model)
    if spec.target.weights != mine.weights:
        raise HeadsError(f"{kind} heads at {folder} were trained for another target ({spec.target.name}, weights "
                         f"{spec.target.weights}): this target ({mine.name}) has the same shape but weights {mine.weights}; "
                         + TRAIN_HINT.format(pair=Path(str(model.name_or_path)).parent, kind=kind))
    module, vocab = _load_weights(folder, spec, model)
    readout = module.lm_head if spec.kind == "eagle3" else readout_of(model, vocab)
    return LoadedHeads(folder, spec, module, vocab, readout, model.get_input_embeddings())


def readout_of(model: PreTrainedModel, vocab: DraftVocab) -> nn.Linear:
    """The target's frozen LM head over the draft vocabulary (its own weight when not reduced: no copy)."""
    weight = vocab.rows(model.get_output_embeddings().weight.detach())  # [V', d]
    readout = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    readout.weight = nn.Parameter(weight, requires_grad=False)
    return readout.eval()


def _load_weights(folder: Path, spec: HeadsSpec, model: PreTrainedModel) -> tuple[nn.Module, DraftVocab]:
    path = folder / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise HeadsError(f"{folder} has {spec.kind} heads described but no {WEIGHTS_FILE}") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise HeadsError(f"{path} does not parse as safetensors: {err}") from None
    ids = state.pop(VOCAB_KEY, None)
    if ids is None or ids.numel() != spec.draft_vocab_size:
        raise HeadsError(f"{path} holds no draft vocabulary of {spec.draft_vocab_size} tokens ({VOCAB_KEY})")
    module = new_module(spec, model.config)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).split("\n")[1].strip() if "\n" in str(err) else str(err)
        raise HeadsError(f"{path} does not fit {spec.kind} heads of {spec.n_heads} x {spec.n_layers}: {first}") from None
    module = module.to(model.device, model.dtype).eval()
    return module, DraftVocab(ids.long(), spec.target.vocab_size)


def save_weights(folder: Path, module: nn.Module, vocab: DraftVocab) -> None:
    """The module's parameters and the draft vocabulary, written to a temporary name and renamed."""
    import os

    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous().cpu() for name, tensor in module.state_dict().items()}
    state[VOCAB_KEY] = vocab.ids.long().contiguous()
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, folder / WEIGHTS_FILE)
