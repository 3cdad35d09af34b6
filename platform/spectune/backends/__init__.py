"""Backends: whose engine decodes a configuration. `spectune` (the default) and `vllm` register here.

    from spectune.backends import BACKENDS
    BACKENDS.get("vllm").method("ngram").knobs      # NgramKnobs (pydantic)
    BACKENDS.config(config)                         # a validated DecodeConfig with store columns
"""

from spectune.backends import vllm as _vllm  # noqa: F401  (registers the vllm backend)
from spectune.backends.registry import BACKENDS, Backend, BackendRegistry

__all__ = ["BACKENDS", "Backend", "BackendRegistry"]
