"""Suite-wide test setup.

Without a GPU, Triton kernels run in Triton's interpreter, which must be chosen before triton is first
imported; whichever test module imports it first would otherwise decide for the whole session.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
