"""Draft trees as plain data, and the pure functions over them.

    draft.py    DraftTree (what a drafter proposes), its layout, and the verification inputs
                (ancestor mask, positions, Medusa retrieve paths)
    shapes.py   static templates: chains, per-depth branching, Medusa path lists, ranked templates
    sequoia.py  Sequoia's dynamic program: the optimal static tree for a node budget (+ hardware-aware)
    files.py    the JSON files Sequoia's tools exchange (acceptance vectors, forward-time profiles)
    measure.py  measuring what Sequoia needs on a pair: p[k] and forward times

Every module but `measure` is pure (no model); `measure` runs the engine, which imports this package.
"""
