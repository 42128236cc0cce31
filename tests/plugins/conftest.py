"""Triton kernels run on the CPU through Triton's interpreter in CI."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton compiles anything; harmless if triton is absent.
    os.environ.setdefault("TRITON_INTERPRET", "1")
