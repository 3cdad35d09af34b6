"""Decoding methods. Importing this package registers the built-in ones in METHODS."""

from spectune.methods import builtin  # noqa: F401  (registers ar, sps, tree, pld)
from spectune.methods import selfspec  # noqa: F401  (registers layerskip, del)
from spectune.methods import dytree, multidraft, sequoia  # noqa: F401  (registers dytree, rsd, specinfer, sequoia)
from spectune.methods import ngram, pearl, recycling  # noqa: F401  (registers ngram, pearl, recycling)
from spectune.methods import heads_eagle, heads_falcon, heads_medusa, hidden_transfer, ppd  # noqa: F401  (eagle, eagle3, falcon, medusa, hydra, ppd, hidden-transfer)
from spectune.methods import rasd  # noqa: F401  (registers rasd)
from spectune.methods.registry import METHODS

__all__ = ["METHODS"]
