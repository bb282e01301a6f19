"""Suite-wide set-up. Without a GPU, Triton kernels run under the interpreter: the switch must be set before triton
is first imported, which is why it lives here and not in the kernel tests."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
