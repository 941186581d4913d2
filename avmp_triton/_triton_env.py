"""Make Triton usable on CPU-only hosts (its interpreter must be chosen before triton is imported),
and say in one line when the installed Triton is outside the range the suite is run on."""
import os
import sys
import warnings

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def default_device() -> str:
    """"cuda" when torch sees a GPU, else "cpu" (where the kernels run in Triton's interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require_interpreter() -> None:
    """CPU tensors only run through Triton's interpreter; say how to get it instead of failing later."""
    if not interpreter_active():
        raise ValueError("device 'cpu' needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                         "triton (or avmp_triton) is imported")


TESTED_TRITON = ((3, 6), (3, 9))  # .ci/run: 3.6.0 pinned, and the newest release pip resolves


def warn_if_untested(version: str) -> bool:
    """One warning line naming ``version`` when it is outside ``TESTED_TRITON``; True if it warned."""
    try:
        major_minor = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        major_minor = None
    lo, hi = TESTED_TRITON
    if major_minor is not None and lo <= major_minor <= hi:
        return False
    warnings.warn(f"avmp-triton is tested with triton {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}; triton {version} is "
                  f"installed, and its kernels may fail there", RuntimeWarning, stacklevel=3)
    return True
