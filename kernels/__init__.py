"""Triton kernels for the hot classification path, with plain-PyTorch references."""
