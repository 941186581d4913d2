"""Argument checks every layer shares (the bottom layer: it imports nothing of the package)."""
import numbers
from typing import Optional

import torch


def is_int(x, *, numpy: bool = False) -> bool:
    """A Python int that is not a bool; with ``numpy=True`` NumPy integers count too (the scheduler
    reads request fields that often come from NumPy arrays; launch arguments must be Python ints)."""
    if isinstance(x, bool):
        return False
    return isinstance(x, numbers.Integral) if numpy else isinstance(x, int)


def check_tensor(t, name: str, *, dim: Optional[int] = None, dtypes: Optional[tuple] = None,
                 device: Optional[torch.device] = None, beside: Optional[str] = None,
                 contiguous: bool = False) -> torch.device:
    """A tensor of one of ``dtypes`` with ``dim`` dimensions on ``device`` (each when given);
    ``beside`` names the tensor that set ``device``, for the message. Returns its device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, " + (f"{beside} on {device}" if beside else f"expected {device}"))
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    return t.device
