"""Argument checks every layer shares (the bottom layer: it imports nothing of the package)."""
import numbers


def is_int(x, *, numpy: bool = False) -> bool:
    """A Python int that is not a bool; with ``numpy=True`` NumPy integers count too (the scheduler
    reads request fields that often come from NumPy arrays; launch arguments must be Python ints)."""
    if isinstance(x, bool):
        return False
    return isinstance(x, numbers.Integral) if numpy else isinstance(x, int)
