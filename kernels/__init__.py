"""Triton kernels of fastpretrain, installed as ``fastpretrain.kernels``."""
