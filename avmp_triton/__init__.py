"""avmp-triton: Asymmetric Virtual Memory Paging for hybrid Mamba-Transformer inference.

Two physically distinct pools (KV pages, SSM blocks) behind one handle space, all state in
device tensors, allocation and migration done by Triton kernels.
"""
from avmp_triton import _triton_env  # noqa: F401  (must run before triton is imported)
from avmp_triton.memory.allocator import (
    AllocatorStats,
    AVMPAllocator,
    InvalidHandleError,
    PaddedUnifiedAllocator,
    PoolExhaustedError,
    PoolStats,
    StaticDualAllocator,
    VllmHybridAllocator,
)
from avmp_triton.engine.sampling import SamplingParams
from avmp_triton.memory.cache import PagedCache
from avmp_triton.spec import HybridModelSpec, get_preset, list_presets

import triton  # noqa: E402  (after _triton_env, which must run first)

_triton_env.warn_if_untested(triton.__version__)

__all__ = [
    "AVMPAllocator", "AllocatorStats", "HybridModelSpec", "InvalidHandleError", "PaddedUnifiedAllocator",
    "LLM", "PagedCache", "PoolExhaustedError", "PoolStats", "SamplingParams", "StaticDualAllocator", "VllmHybridAllocator", "get_preset",
    "list_presets",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # the engine imports the model runners and the simulator: load it on first use, not with the package
    if name == "LLM":
        from avmp_triton.serve import LLM
        return LLM
    raise AttributeError(f"module 'avmp_triton' has no attribute {name!r}")
