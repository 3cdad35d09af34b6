"""The heads as torch modules, each laid out (parameter names, shapes, order of operations) exactly as
the vLLM 0.32 model that loads its export runs it, so an exported head computes what it computed here.

- Medusa-1 (Cai et al. 2024): K residual blocks on the target's final feature (the final norm's
  output), head k predicting the token k+1 after the next, read out through the target's frozen LM
  head. vLLM `model_executor/models/medusa.py`: `blocks.{k}.layers.{j}` Linear(d, d) with
  `x = x + silu(W x + b)`, shared `lm_head` when `original_lm_head`.
- Hydra (Ankner et al. 2024): head k also reads the embeddings of the k tokens before the one it
  predicts (the root and the k-1 drafted before it), so the heads are sequentially dependent.
  vLLM has no Hydra; these stay spectune's.
- EAGLE (Li et al. 2024): one Llama decoder layer over fc([embedding of the next token, feature]),
  predicting the next feature, read out by the target's frozen LM head, drafting autoregressively
  in feature space. vLLM `llama_eagle.py`: fc without bias, layer 0 without its input norm, no final
  norm; the layer's output is both the next feature and what the LM head reads.
- PPD (Chen et al. 2024, parallel prompt decoding): m trainable prompt-token embeddings, the only
  parameters; appended after a node in the target's own forward, prompt k's output predicts the
  token k after the node's next one. vLLM has none; spectune's own.
- Hidden Transfer (Wu et al. 2024): m transfer maps from the target's block-l output at a node to pseudo
  states of the m positions after it, which the target's own blocks l+1..L read out in the verification
  forward (`spectune.engine.layer_transfer`). vLLM has none; spectune's own.
- EAGLE-3 (Li et al. 2025): fc fuses a low, a middle and a high layer of the target (their
  pre-norm block outputs); the layer's attention reads [input_norm(embedding), hidden_norm(h)]
  (2d wide); a final norm and the heads' own LM head over the draft vocabulary (`d2t` maps it to
  the target's ids). vLLM `llama_eagle3.py`.
- Falcon (Gao et al. 2024): EAGLE's input (fc over [embedding, feature]) through a few Llama decoder
  layers (two by default), but each output predicts the feature `block` positions ahead, so the
  last `block` entries, read together as a block, draft `block` tokens in one pass
  (semi-autoregressive). vLLM has no Falcon; these stay spectune's.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, PretrainedConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)


# --- Medusa and Hydra ---------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """`x = x + silu(W x + b)` per layer; zero weights at init, so a new head starts as the LM head itself."""

    def __init__(self, hidden: int, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_layers))
        for layer in self.layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + F.silu(layer(x))
        return x


class MedusaHeads(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_layers: int = 1) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResidualBlock(hidden, n_layers) for _ in range(n_heads))

    @property
    def n_heads(self) -> int:
        return len(self.blocks)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """feature [..., d] -> [K, ..., d]: what each head hands the LM head."""
        return torch.stack([block(feature) for block in self.blocks])


class HydraHead(nn.Module):
    """Reads [feature, k token embeddings] ((k+1)·d wide): a projected residual plus silu(W x + b), then blocks."""

    def __init__(self, hidden: int, n_inputs: int, n_layers: int) -> None:
        super().__init__()
        self.project = nn.Linear(n_inputs * hidden, hidden)  # the residual path: starts as "take the feature"
        self.linear = nn.Linear(n_inputs * hidden, hidden)
        self.blocks = ResidualBlock(hidden, n_layers - 1)
        with torch.no_grad():
            self.project.weight.zero_()
            self.project.weight[:, :hidden] = torch.eye(hidden)
            self.project.bias.zero_()
            self.linear.weight.zero_()
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.project(x) + F.silu(self.linear(x)))


class HydraHeads(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_layers: int = 1) -> None:
        super().__init__()
        self.heads = nn.ModuleList(HydraHead(hidden, k + 1, n_layers) for k in range(1, n_heads + 1))

    @property
    def n_heads(self) -> int:
        return len(self.heads)

    def head(self, k: int, feature: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Head k (1-based) predicts draft depth k: feature [..., d], embeds [..., k, d] of the root and the
        k-1 tokens drafted after it -> [..., d] for the LM head."""
        return self.heads[k - 1](torch.cat([feature, embeds.flatten(-2)], dim=-1))  # [..., (k+1)·d] -> [..., d]


# --- PPD ------------------------------------------------------------------------------------------


class PromptTokens(nn.Module):
    """PPD's prompt tokens: m input embeddings [m, d], the target's own forward reads them (nothing else trained)."""

    def __init__(self, hidden: int, n_prompts: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(torch.randn(n_prompts, hidden) * init_std)  # [m, d]

    @property
    def n_heads(self) -> int:
        return self.embeddings.shape[0]


# --- Hidden Transfer --------------------------------------------------------------------------------


class TransferMaps(nn.Module):
    """m transfer layers: map k sends the block-l output h_t to the pseudo state of position t+k,
    h_t + W_k h_t + b_k. Zero at init, so each starts as a copy of h_t (near identity, as the paper's)."""

    def __init__(self, hidden: int, n_maps: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_maps, hidden, hidden))  # [m, d_in, d_out]
        self.bias = nn.Parameter(torch.zeros(n_maps, hidden))  # [m, d]

    @property
    def n_heads(self) -> int:
        return self.weight.shape[0]

    def forward(self, anchors: torch.Tensor) -> torch.Tensor:
        """anchors [..., k, d]: slot j holds the state map j+1 reads (k <= m) -> [..., k, d] the pseudo states."""
        k = anchors.shape[-2]
        moved = torch.einsum("...kd,kde->...ke", anchors, self.weight[:k].to(anchors.dtype))  # [..., k, d]
        return anchors + moved + self.bias[:k].to(anchors.dtype)


# --- EAGLE and EAGLE-3 --------------------------------------------------------------------------


def eagle_config(target: PretrainedConfig, n_layers: int = 1) -> LlamaConfig:
    """The draft layers' config: the target's attention and MLP shapes, `n_layers` layers, SDPA attention."""
    config = LlamaConfig(**copy.deepcopy(target.to_dict()))
    config.num_hidden_layers = n_layers
    config._attn_implementation = "sdpa"
    return config


class EagleLayer(nn.Module):
    """One Llama decoder layer; for EAGLE-3 its q/k/v read [embedding, hidden] (2d) and it has a hidden norm.
    EAGLE's layer has no input norm (vLLM replaces it with Identity)."""

    def __init__(self, config: LlamaConfig, version: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.self_attn = LlamaAttention(config, layer_idx=0)
        if version == 3:
            attn = self.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                old = getattr(attn, name)
                setattr(attn, name, nn.Linear(2 * hidden, old.out_features, bias=old.bias is not None))
            self.input_layernorm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
            self.hidden_norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)


class EagleDraft(nn.Module):
    """EAGLE (version 1) or EAGLE-3 (version 3): `combine` turns the target's features into the layer's
    hidden input; `forward` runs the layer over (hidden, embedding of the token at the next position)."""

    def __init__(self, config: LlamaConfig, version: int, n_features: int, draft_vocab_size: int) -> None:
        super().__init__()
        if version not in (1, 3):
            raise ValueError(f"EAGLE version must be 1 or 3, got {version}")
        hidden = config.hidden_size
        self.version = version
        self.config = config
        fc_inputs = 2 if version == 1 else n_features  # EAGLE: [embedding, feature]; EAGLE-3: the fused layers
        self.fc = nn.Linear(fc_inputs * hidden, hidden, bias=False)
        self.layers = nn.ModuleList([EagleLayer(config, version)])
        self.rotary = LlamaRotaryEmbedding(config)  # no parameters: inv_freq is a non-persistent buffer
        if version == 3:
            self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
            self.lm_head = nn.Linear(hidden, draft_vocab_size, bias=False)
            self.lm_head.weight.requires_grad_(False)  # the target's rows of the draft vocabulary, frozen

    def combine(self, features: torch.Tensor) -> torch.Tensor:
        """Target features -> the layer's hidden input: EAGLE [..., d] as is; EAGLE-3 [..., 3d] through fc."""
        return features if self.version == 1 else self.fc(features)

    def forward(
        self,
        hidden: torch.Tensor,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, embeds [B, n, d]; positions [B, n]; mask [B|1, 1, n, past+n] additive; cache: a transformers
        cache whose layer 0 holds the past (or None). Returns (what the LM head reads, the next hidden), [B, n, d]."""
        layer = self.layers[0]
        if self.version == 1:
            x = self.fc(torch.cat([embeds, hidden], dim=-1))  # [B, n, d]
            residual, attn_in = x, x  # no input norm
        else:
            residual = hidden
            attn_in = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)  # [B, n, 2d]
        cos_sin = self.rotary(residual, positions)
        attended, _ = layer.self_attn(hidden_states=attn_in, position_embeddings=cos_sin, attention_mask=mask, cache=cache)
        x = residual + attended
        x = x + layer.mlp(layer.post_attention_layernorm(x))  # [B, n, d]
        if self.version == 1:
            return x, x
        return self.norm(x), x


# --- Falcon ---------------------------------------------------------------------------------------


class FalconDraft(nn.Module):
    """fc([embedding of token j+1, feature j]) through `n_layers` Llama decoder layers: entry j's output is the
    predicted feature at j + block (read out by the target's frozen LM head). How entries attend (causal for
    committed ones, a block seeing itself whole) is the mask's business: `spectune.heads.falcon`."""

    def __init__(self, config: LlamaConfig, block: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.block = block
        self.config = config
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, layer_idx=i) for i in range(config.num_hidden_layers))
        self.rotary = LlamaRotaryEmbedding(config)  # no parameters

    def forward(self, features: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                cache=None) -> torch.Tensor:
        """features, embeds [B, n, d]; positions [B, n]; mask [B|1, 1, n, past+n] additive; cache: a transformers
        cache of `n_layers` layers holding the past (or None). Returns the predicted features [B, n, d]."""
        x = self.fc(torch.cat([embeds, features], dim=-1))  # [B, n, d]
        cos_sin = self.rotary(x, positions)
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_ids=positions, cache=cache,
                      position_embeddings=cos_sin)  # [B, n, d]
        return x
