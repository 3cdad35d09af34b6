"""Backends: whose engine decodes a configuration. `spectune` (the default) and `vllm` register here.

    from spectune.backends import BACKENDS
    BACKENDS.get("vllm").method("ngram").knobs      # NgramKnobs (pydantic)
    BACKENDS.config(config)                         # a validated DecodeConfig with store columns

A new backend is one module here that registers a `Backend`, imported below.
"""

from spectune.backends import spectune as _spectune  # noqa: F401  (registers spectune's own engine)
from spectune.backends import vllm as _vllm  # noqa: F401  (registers the vllm backend)
from spectune.backends.registry import BACKENDS, Backend, BackendRegistry, Serving, resolve

__all__ = ["BACKENDS", "Backend", "BackendRegistry", "Serving", "resolve"]
