"""Loading a target/drafter pair through the real path: `from_pretrained(path_or_hub_id)`.

The same call takes the project's own small pairs here and a hub pair on a GPU cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from spectune.engine.budget import pair_context
from spectune.engine.kvcache import KVCache
from spectune.engine.runner import CausalLM, compile_forward
from spectune.methods.base import Models
from spectune.pair_ref import PairError, PairRef
from spectune.prompts import Prompt, prompt_text


@dataclass(frozen=True)
class Pair:
    ref: PairRef  # what was loaded (device resolved)
    tokenizer: PreTrainedTokenizerBase
    target: PreTrainedModel
    drafter: PreTrainedModel | None

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def max_positions(self) -> int:
        """The pair's context: both models must hold the sequence and the draft tree."""
        return pair_context(self.target.config, self.drafter.config if self.drafter is not None else None)

    def runners(self) -> Models:
        """Fresh cache owners over the loaded weights (cheap: weights are shared)."""
        return Models(CausalLM(self.target), CausalLM(self.drafter) if self.drafter is not None else None)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """A prompt's token ids: chat prompts through the target's chat template (an error if it has none)."""
        return self.encode(prompt_text(prompt, self.tokenizer, self.ref.target))

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def load_pair(ref: PairRef) -> Pair:
    ref.check_local()
    ref = ref.model_copy(update={"device": _device(ref.device)})
    target, drafter, device, torch_dtype = ref.target, ref.drafter, ref.device, _DTYPES[ref.dtype]
    tokenizer = _load_tokenizer(target)
    target_model = _load_model(target, device, torch_dtype)
    if ref.compile != "off":
        _compile(target_model, ref.compile)
    drafter_model = None
    if drafter:
        check_same_vocabulary(target, tokenizer, drafter, _load_tokenizer(drafter))
        drafter_model = _load_model(drafter, device, torch_dtype)
        if drafter_model.config.vocab_size != target_model.config.vocab_size:
            raise PairError(
                f"drafter {drafter} has {drafter_model.config.vocab_size} output logits but target {target} "
                f"has {target_model.config.vocab_size}: speculative decoding needs one vocabulary"
            )
    return Pair(ref, tokenizer, target_model, drafter_model)


def check_same_vocabulary(
    target: str, target_tok: PreTrainedTokenizerBase, drafter: str, drafter_tok: PreTrainedTokenizerBase
) -> None:
    target_vocab, drafter_vocab = target_tok.get_vocab(), drafter_tok.get_vocab()
    if target_vocab != drafter_vocab:
        differing = len(set(target_vocab.items()) ^ set(drafter_vocab.items()))
        raise PairError(
            f"drafter {drafter} uses a different tokenizer than target {target} "
            f"({len(drafter_vocab)} vs {len(target_vocab)} tokens, {differing} entries differ): "
            "speculative decoding needs one vocabulary"
        )


def _compile(model: PreTrainedModel, mode: str) -> None:
    """`compile_forward`, refusing a hybrid target: its SSM layers' tree scan and state recording swap mixer
    code per call, which a compiled graph would not see."""
    if KVCache(model.config).hybrid:
        raise PairError(f"compile: {type(model).__name__} is a hybrid SSM-attention target; spectune compiles "
                        "only all-attention targets (their SSM tree scan runs eager)")
    compile_forward(model, mode)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device(device: str) -> str:
    """`auto`: the GPU when there is one (a Serve replica placed on a GPU node), else the CPU."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_tokenizer(path_or_id: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path_or_id)
    except OSError as err:
        raise PairError(f"cannot load the tokenizer of {path_or_id}: {err}") from None


def _load_model(path_or_id: str, device: str, dtype: torch.dtype) -> PreTrainedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, use_safetensors=True)
    except OSError as err:
        raise PairError(f"cannot load model {path_or_id}: {err}") from None
    except (ValueError, KeyError) as err:  # an architecture this transformers does not know (a newer hybrid, say)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PairError(f"cannot load model {path_or_id} with transformers {transformers.__version__}: {reason}") from None
    return model.to(device).eval()
