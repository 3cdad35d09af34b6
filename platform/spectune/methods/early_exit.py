"""Early exits of a target model: shallow views that share its weights, and its head on any layer.

Self-speculation (LayerSkip, DEL) drafts with the target's first l layers followed by its
own final norm and lm_head. A target trained with an early-exit loss (spectune's pairs are)
gives usable logits there. Nothing here copies a parameter: a view holds the very modules
of the target, so it costs no memory and always sees the target's current weights.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from transformers import PreTrainedModel


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder blocks of a Llama-style causal LM (`model.<base>.layers`)."""
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} keeps no `layers` list in its base model: self-speculation needs a "
            "Llama-style decoder (Llama, Qwen2, Mistral, ...)"
        )
    return layers


def n_layers(model: PreTrainedModel) -> int:
    return len(decoder_layers(model))


def check_exit_layer(field: str, layer: int, model: PreTrainedModel) -> None:
    """An exit layer must leave at least one layer for the full model to add: 1..L-1."""
    total = n_layers(model)
    if total < 2:
        raise ValueError(f"{field}: self-speculation needs a target with >= 2 layers; this one has {total}")
    if not 1 <= layer <= total - 1:
        raise ValueError(f"{field} must be in 1..{total - 1} (the target has {total} layers), got {layer}")


def exit_view(model: PreTrainedModel, exit_layer: int) -> PreTrainedModel:
    """A causal LM that runs `model`'s first `exit_layer` layers, then its final norm and lm_head.

    transformers' Llama-style models loop over `layers[: config.num_hidden_layers]` and size
    their cache from the config, so the view is the same class built (on the meta device,
    allocating nothing) from a config that says `exit_layer` layers, whose submodules are
    then replaced by the target's own.
    """
    check_exit_layer("exit_layer", exit_layer, model)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = exit_layer
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (Qwen2, ...)
        config.layer_types = config.layer_types[:exit_layer]
    with torch.device("meta"):
        view = type(model)(config)
    _share_children(model.base_model, view.base_model, exit_layer)
    for name, child in model.named_children():
        if child is not model.base_model:
            setattr(view, name, child)  # lm_head and anything else beside the base model
    leftover = [name for name, t in _tensors(view) if t.is_meta]
    if leftover:
        raise ValueError(f"cannot build an exit view of {type(model).__name__}: {', '.join(leftover)} not shared")
    return view.eval()


def _share_children(source: nn.Module, view: nn.Module, exit_layer: int) -> None:
    for name, child in source.named_children():
        if name == "layers":
            child = nn.ModuleList(list(child)[:exit_layer])  # same block objects, fewer of them
        setattr(view, name, child)


def _tensors(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


class ExitHead:
    """The target's final norm and lm_head, applied to the hidden state after any layer."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.norm = getattr(model.base_model, "norm", None)
        self.lm_head = model.get_output_embeddings()
        if self.norm is None or self.lm_head is None:
            raise ValueError(f"{type(model).__name__} has no final `norm` and lm_head to exit through")

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] hidden states after some layer -> [..., V] logits."""
        return self.lm_head(self.norm(hidden)).float()

