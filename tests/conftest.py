"""Test-suite set-up that must happen before Triton is imported.

Without a GPU the Triton path runs in Triton's interpreter, so CI tests the kernels
instead of skipping them. TRITON_INTERPRET must be set before `triton` is first imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns unless FMA contraction is chosen explicitly; torch's CUDA kernels
# contract too, so keep it on.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
