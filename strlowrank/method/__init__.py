"""The method layer: the operators and layers of STR (Kusupati et al., ICML 2020), on
weights, channels and singular values, their measurements (the budget table) and small pure
helpers (caches).

It imports no other layer of the core; ``strlowrank`` re-exports its public API. Its modules and
the rules between the layers: docs/ARCHITECTURE.md.
"""
