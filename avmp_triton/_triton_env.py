"""Make Triton usable on CPU-only hosts: its interpreter must be chosen before triton is imported."""
import os
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require_interpreter() -> None:
    """CPU tensors only run through Triton's interpreter; say how to get it instead of failing later."""
    if not interpreter_active():
        raise ValueError("device 'cpu' needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                         "triton (or avmp_triton) is imported")
