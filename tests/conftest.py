"""Shared test setup: the project's flat modules are imported from the repo root."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))
# Without a GPU, Triton's kernels (sparse_gpu.py) run on the CPU through its interpreter:
# set before they are defined, as Triton reads it then
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# fp32 means fp32 in the comparisons with the dense computation: on GPUs with
# tensor cores cuDNN may otherwise run fp32 convs in TF32 (10-bit mantissa).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
