"""Triton kernels for token-level Native Sparse Attention (see :mod:`nsaflex.kernels.ops`)."""
