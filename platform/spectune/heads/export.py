"""Heads in the checkpoint formats vLLM 0.32's `speculative_config` loads, and a reader that reads them back
the way vLLM's loaders do (the round trip the tests check; a slow test has vLLM itself load them).

    {"method": "medusa", "model": "<pair>/heads/medusa-vllm", "num_speculative_tokens": K}
    {"method": "eagle",  "model": "<pair>/heads/eagle-vllm",  "num_speculative_tokens": n}
    {"method": "eagle3", "model": "<pair>/heads/eagle3-vllm", "num_speculative_tokens": n}

What vLLM 0.32 reads (from its code):

- medusa (`transformers_utils/configs/medusa.py`, `model_executor/models/medusa.py`): config.json with
  model_type "medusa", hidden_size, vocab_size, num_heads, num_hidden_layers (keys holding "num" and
  "heads" / "layers" are renamed to these), truncated_vocab_size, original_lm_head (one LM head for every
  head), medusa_fc_bias; weights `blocks.{k}.layers.{j}.weight|bias`, `lm_head.weight`
  ([truncated vocab, d] rows), `token_map` (the draft vocabulary's ids) when truncated. Its proposer
  reads the target's final hidden state (after the norm) and takes each head's top-1: a chain of K.
- eagle (`llama_eagle.py`): a Llama config.json with one layer (vLLM wraps it as EagleLlamaForCausalLM);
  weights `fc.weight` [d, 2d] (no bias), `layers.0.self_attn.{q,k,v,o}_proj.weight`,
  `layers.0.post_attention_layernorm.weight`, `layers.0.mlp.{gate,up,down}_proj.weight` (no input norm);
  no embed_tokens / lm_head: the target's are shared. Its input is [embedding, the target's final
  hidden state]; it runs no final norm.
- eagle3 (`llama_eagle3.py`): the same config plus draft_vocab_size and
  `eagle_config.eagle_aux_hidden_state_layer_ids` (the target layers whose block outputs, before the
  norm, it fuses); weights `fc.weight` [d, 3d], `midlayer.*` (vLLM maps it to layers.0: input_layernorm,
  hidden_norm, self_attn with q/k/v [., 2d], post_attention_layernorm, mlp), `norm.weight`,
  `lm_head.weight` [draft vocab, d], and when the draft vocabulary is reduced `d2t` (target id - draft id)
  and `t2d` (which target ids are drafted; vLLM skips it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spectune.heads.modules import EagleDraft, MedusaHeads, eagle_config
from spectune.heads.spec import HeadsError, HeadsSpec
from spectune.heads.vocab import DraftVocab

VLLM_METHOD = {"medusa": "medusa", "eagle": "eagle", "eagle3": "eagle3"}  # kinds vLLM loads (Hydra: none)
SPECULATORS = ("eagle3",)  # kinds vLLM 0.32 reads in the speculators format
SPECULATORS_VLLM = "0.32"
SPECULATORS_VERSION = "0.9.0"  # the `speculators` release whose config layout this writes
WEIGHTS = "model.safetensors"
EAGLE_LAYER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
               "mlp.up_proj.weight", "mlp.down_proj.weight")
EAGLE3_LAYER = EAGLE_LAYER + ("input_layernorm.weight", "hidden_norm.weight")


def export_vllm(folder: Path, spec: HeadsSpec, module: nn.Module, vocab: DraftVocab, model) -> Path:
    """Write `spec.kind` heads as vLLM loads them into `folder` (replaced whole: a hidden copy, then a rename)."""
    if spec.kind not in VLLM_METHOD:
        raise HeadsError(f"vLLM has no {spec.kind} speculative method; exportable kinds: {', '.join(VLLM_METHOD)}")
    writer = {"medusa": _medusa, "eagle": _eagle, "eagle3": _eagle3}[spec.kind]
    config, weights = writer(spec, module, vocab, model)
    return _write(Path(folder), config, weights, model)


def export_speculators(folder: Path, spec: HeadsSpec, module: nn.Module, vocab: DraftVocab, model,
                       speculative_tokens: int | None = None) -> Path:
    """Write EAGLE-3 heads in the `speculators` format (the `speculators` package's checkpoints): vLLM loads
    the folder itself as the model (`vllm serve FOLDER`), reading the target to verify with from
    `speculators_config.verifier` and the draft length from its proposal method.

    What vLLM 0.32 reads of it (`transformers_utils/configs/speculators/`): `speculators_model_type`
    (eagle3; its registry holds no eagle-1 or medusa), `transformer_layer_config` (the draft layer's
    Llama config), the EAGLE-3 fields beside it (draft_vocab_size, target_hidden_size,
    norm_before_residual, which it defaults to True, so it is written), and
    `speculators_config.proposal_methods[0].speculative_tokens`. Weights as `speculators` names
    them (`layers.0.*`, not the EAGLE reference code's `midlayer.*`)."""
    if spec.kind not in SPECULATORS:
        raise HeadsError(f"the speculators format (as vLLM {SPECULATORS_VLLM} reads it) holds {', '.join(SPECULATORS)} "
                         f"heads only, not {spec.kind}")
    layer, weights = _eagle3(spec, module, vocab, model)
    eagle3 = {key: layer.pop(key) for key in ("draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids")}
    layer.pop("eagle_config")
    verifier = str(Path(str(model.name_or_path)).resolve()) if Path(str(model.name_or_path)).exists() else spec.target.name
    config = {
        "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION, "transformer_layer_config": layer, **eagle3,
        "norm_before_residual": False, "norm_before_fc": False,  # our layer norms the hidden state after the residual
        "speculators_config": {
            "algorithm": "eagle3", "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens or spec.n_heads,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "verifier": {"name_or_path": verifier, "architectures": list(model.config.architectures or [])},
        },
    }
    renamed = {name.replace("midlayer.", "layers.0."): tensor for name, tensor in weights.items()}
    return _write(Path(folder), config, renamed, model)


def _write(folder: Path, config: dict, weights: dict, model) -> Path:
    """config.json, the weights and the target's tokenizer into `folder`, replaced whole (a hidden copy, then a rename)."""
    staging = folder.with_name(f".{folder.name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    dtype = str(model.dtype).removeprefix("torch.")
    (staging / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(staging / WEIGHTS))
    _copy_tokenizer(model, staging)
    if folder.exists():
        shutil.rmtree(folder)
    os.rename(staging, folder)
    return folder


def _medusa(spec: HeadsSpec, heads: MedusaHeads, vocab: DraftVocab, model):
    config = {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": spec.target.hidden_size,
              "vocab_size": spec.target.vocab_size, "num_heads": spec.n_heads, "num_hidden_layers": spec.n_layers,
              "truncated_vocab_size": vocab.size, "original_lm_head": True, "medusa_fc_bias": True,
              "max_paths": 64, "topk": 10}
    weights = {f"blocks.{name}": tensor for name, tensor in heads.blocks.state_dict().items()}
    weights["lm_head.weight"] = vocab.rows(model.get_output_embeddings().weight)  # [V', d]
    if vocab.reduced:
        weights["token_map"] = vocab.ids.long()
    return config, weights


def _llama_config(model, **extra) -> dict:
    config = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "auto_map"):
        config.pop(key, None)
    return {**config, "num_hidden_layers": 1, "architectures": ["LlamaForCausalLM"], "model_type": "llama", **extra}


def _eagle(spec: HeadsSpec, draft: EagleDraft, vocab: DraftVocab, model):
    state = draft.state_dict()
    weights = {"fc.weight": state["fc.weight"], **{f"layers.0.{n}": state[f"layers.0.{n}"] for n in EAGLE_LAYER}}
    return _llama_config(model), weights


def _eagle3(spec: HeadsSpec, draft: EagleDraft, vocab: DraftVocab, model):
    state = draft.state_dict()
    weights = {"fc.weight": state["fc.weight"], "norm.weight": state["norm.weight"],
               "lm_head.weight": state["lm_head.weight"],
               **{f"midlayer.{n}": state[f"layers.0.{n}"] for n in EAGLE3_LAYER}}
    if vocab.reduced:
        weights["d2t"] = vocab.ids.long() - torch.arange(vocab.size)  # target id = draft id + d2t[draft id]
        t2d = torch.zeros(vocab.full_size, dtype=torch.bool)
        t2d[vocab.ids] = True
        weights["t2d"] = t2d
    layers = list(spec.feature_layers)
    extra = {"draft_vocab_size": vocab.size, "target_hidden_size": spec.target.hidden_size,
             "eagle_aux_hidden_state_layer_ids": layers,
             "eagle_config": {"eagle_aux_hidden_state_layer_ids": layers, "use_aux_hidden_state": True}}
    return _llama_config(model, **extra), weights


def _copy_tokenizer(model, folder: Path) -> None:
    """vLLM reads the target's tokenizer for the draft (same vocabulary); a copy keeps the folder self-describing."""
    source = Path(str(model.name_or_path))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


# --- reading an export back, as vLLM's loaders do -----------------------------------------------


def read_vllm(folder: Path, method: str, model) -> tuple[nn.Module, DraftVocab]:
    """The heads in `folder` rebuilt from vLLM's config keys and weight names (anything vLLM's loader would
    reject is a HeadsError here too): the module and its draft vocabulary, on the CPU in float32."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        weights = load_file(str(folder / WEIGHTS))
    except (OSError, ValueError) as err:
        raise HeadsError(f"{folder} is no vLLM {method} checkpoint: {err}") from None
    reader = {"medusa": _read_medusa, "eagle": _read_eagle, "eagle3": _read_eagle3}.get(method)
    if reader is None:
        raise HeadsError(f"vLLM has no {method} heads; methods: {', '.join(VLLM_METHOD)}")
    return reader(config, weights, model)


def _medusa_config(raw: dict) -> dict:
    """MedusaConfig.from_pretrained: keys holding "num" and "heads"/"layers" become num_heads/num_hidden_layers."""
    config = dict(raw)
    for key in list(config):
        if "num" in key and "heads" in key:
            config["num_heads"] = config.pop(key)
        elif "num" in key and "layers" in key:
            config["num_hidden_layers"] = config.pop(key)
    config.setdefault("truncated_vocab_size", config["vocab_size"])
    return config


def _read_medusa(raw: dict, weights: dict, model):
    config = _medusa_config(raw)
    if config.get("model_type") != "medusa" or not config.get("original_lm_head"):
        raise HeadsError("a spectune medusa export has model_type medusa and one shared LM head (original_lm_head)")
    heads = MedusaHeads(config["hidden_size"], config["num_heads"], config["num_hidden_layers"])
    if not config.get("medusa_fc_bias", False):
        raise HeadsError("medusa_fc_bias must be true: the heads' residual layers have biases")
    blocks = {name.removeprefix("blocks."): w for name, w in weights.items() if name.startswith("blocks.")}
    unexpected = set(weights) - {f"blocks.{n}" for n in blocks} - {"lm_head.weight", "token_map"}
    if unexpected:
        raise HeadsError(f"vLLM's Medusa loader would not know {sorted(unexpected)}")
    heads.blocks.load_state_dict(blocks, strict=True)
    truncated = config["truncated_vocab_size"]
    ids = weights["token_map"] if truncated < config["vocab_size"] else torch.arange(config["vocab_size"])
    if weights["lm_head.weight"].shape != (truncated, config["hidden_size"]) or ids.numel() != truncated:
        raise HeadsError("lm_head.weight / token_map do not match truncated_vocab_size")
    heads.readout = weights["lm_head.weight"]  # vLLM: ParallelLMHead(truncated_vocab_size, hidden)
    return heads.float().eval(), DraftVocab(ids.long(), config["vocab_size"])


def _read_eagle(raw: dict, weights: dict, model):
    names = {"fc.weight", *(f"layers.0.{n}" for n in EAGLE_LAYER)}
    _check_names(weights, names, "EagleLlamaForCausalLM", optional={"embed_tokens.weight", "lm_head.weight"})
    draft = EagleDraft(eagle_config(_as_config(raw, model)), 1, 1, raw["vocab_size"])
    draft.load_state_dict({k: v for k, v in weights.items() if k in names}, strict=True)
    draft.readout = model.get_output_embeddings().weight.detach()  # shared with the target
    return draft.float().eval(), DraftVocab.full(raw["vocab_size"])


def _read_eagle3(raw: dict, weights: dict, model):
    layers = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") or raw.get(
        "eagle_aux_hidden_state_layer_ids")
    if not layers:
        raise HeadsError("an eagle3 export names the target layers it fuses (eagle_aux_hidden_state_layer_ids)")
    mapped = {name.replace("midlayer.", "layers.0."): w for name, w in weights.items()}  # vLLM's WeightsMapper
    names = {"fc.weight", "norm.weight", "lm_head.weight", *(f"layers.0.{n}" for n in EAGLE3_LAYER)}
    _check_names(mapped, names, "Eagle3LlamaForCausalLM", optional={"embed_tokens.weight", "d2t", "t2d"})
    size = int(raw.get("draft_vocab_size") or raw["vocab_size"])
    draft = EagleDraft(eagle_config(_as_config(raw, model)), 3, len(layers), size)
    draft.load_state_dict({k: v for k, v in mapped.items() if k in names}, strict=True)
    if size < raw["vocab_size"]:
        if "d2t" not in mapped:
            raise HeadsError("a reduced draft vocabulary needs d2t")
        ids = torch.arange(size) + mapped["d2t"]  # vLLM: targets = base + draft_id_to_target_id
    else:
        ids = torch.arange(size)
    draft.readout = draft.lm_head.weight
    draft.fused = tuple(layers)
    return draft.float().eval(), DraftVocab(ids.long(), raw["vocab_size"])


def _check_names(weights: dict, required: set[str], loader: str, optional: set[str]) -> None:
    missing, unexpected = required - set(weights), set(weights) - required - optional
    if missing or unexpected:
        raise HeadsError(f"vLLM's {loader} would refuse these weights: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")


def _as_config(raw: dict, model):
    from transformers import LlamaConfig

    if raw.get("model_type") != "llama" or raw.get("num_hidden_layers") != 1:
        raise HeadsError("an EAGLE export is a one-layer Llama config (vLLM wraps it as EAGLEConfig)")
    keep = {k: v for k, v in raw.items() if k not in ("eagle_config",)}
    config = LlamaConfig(**keep)
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(config, key) != getattr(model.config, key):
            raise HeadsError(f"the export's {key} {getattr(config, key)} is not the target's {getattr(model.config, key)}")
    return config
