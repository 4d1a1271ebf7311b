"""Sparsity and pruning stages.

``masks`` (which weights, magnitude / block / 2:4 masks), ``gmp`` (the GMP schedule and the
``Sparsifier`` training hooks), ``stage`` (``sparsify``: distillation training with masks).
Nothing is imported here, so ``import slimseg.compress.prune`` stays cheap.
"""
