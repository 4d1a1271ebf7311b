"""Compression stages that act on the canonical graph: quantization (:mod:`.quant`), and later
sparsity, pruning and distillation. Submodules are imported on use, never here."""
