"""Draft trees as plain data, and the pure functions over them.

    draft.py    DraftTree (what a drafter proposes), its layout, and the verification inputs
                (ancestor mask, positions, Medusa retrieve paths)
    shapes.py   static templates: chains, per-depth branching, Medusa path lists, ranked templates
    sequoia.py  Sequoia's dynamic program: the optimal static tree for a node budget (+ hardware-aware)
    files.py    the JSON files Sequoia's tools exchange (acceptance vectors, forward-time profiles)
    fusion.py   RASD: a drafter's scored tree fused with retrieved continuations, pruned to a node budget

Every module is pure (no model; of spectune only this package and the torch-free error formatter):
the engine imports this package. Measuring p[k] on a pair runs the engine, so it lives above it
(`spectune.sequoia_inputs`), and the forward timer with the other profilers (`spectune.profiling`).
"""
