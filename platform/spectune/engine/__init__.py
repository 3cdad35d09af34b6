"""The decoding engine: the drafter protocol, KV cache, one model runner, acceptance rules, the
context budget, the five-phase loop. It imports torch, transformers and `spectune.trees` only:
methods plug in from above (tests/unit/test_engine_layering.py guards this)."""
