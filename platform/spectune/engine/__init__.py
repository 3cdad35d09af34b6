"""The decoding engine: tree data, KV cache, one model runner, acceptance rules, the five-phase loop."""
