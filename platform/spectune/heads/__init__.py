"""Draft heads trained on a target's own features: Medusa, Hydra, EAGLE and EAGLE-3.

    spec.py      what a heads folder is for (kind, sizes, the target it was trained on) and its checks
    vocab.py     the draft vocabulary: all of the target's, or the corpus's most frequent tokens (FR-Spec)
    modules.py   the heads as torch modules, laid out as vLLM's loaders name them
    features.py  one teacher-forced pass of the target over the corpus, cached in bf16
    train.py     training each kind from that cache; agreement with the target on held-out text
    build.py     `spectune heads train`: cache check, lock, training, card, vLLM export
    load.py      heads for a loaded target, with every mismatch named before decoding starts
    export.py    the checkpoint folders vLLM's `speculative_config` loads, and a reader mirroring its loaders

Where a pair keeps them: `<pair>/heads/<kind>/` beside `<pair>/target/`.
"""
