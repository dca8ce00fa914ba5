"""Session-wide test setup.

Triton's interpreter must be switched on before triton is imported (``import torchvision`` imports it),
so this runs before any test module: on a machine without CUDA, Triton kernels run on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
