"""Test-wide setup: without CUDA, Triton kernels run in its CPU interpreter. The variable must be
set before anything imports triton (its language functions are built at import time)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
