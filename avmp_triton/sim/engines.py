"""How serving engines size a hybrid model's cache, as functions of a ``HybridModelSpec``, so that
a baseline named for an engine follows that engine's own rule (the source is named per rule)."""
from __future__ import annotations

import dataclasses
import math

from avmp_triton.spec import HybridModelSpec

__all__ = ["SGLANG_MAMBA_FULL_MEMORY_RATIO", "VLLM_KERNEL_BLOCK", "VLLM_VERSION", "VllmHybridGeometry",
           "sglang_mamba_fraction", "vllm_hybrid_geometry"]

VLLM_VERSION = "0.34.0"
# vLLM's default block size and the smallest block of its FlashAttention backend (MultipleOf(16)),
# the alignment its hybrid rule rounds to on Hopper GPUs
VLLM_KERNEL_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class VllmHybridGeometry:
    """vLLM v1's cache geometry for a hybrid model: one pool of equal blocks, each holding one KV
    cache group's pages (``group_size`` layers, every layer's page padded to ``page_bytes``)."""
    block_size: int          # tokens per attention block
    attn_page_bytes: int     # one attention layer, block_size tokens, K and V
    mamba_page_bytes: int    # one Mamba layer's conv + SSM state, before padding to attn_page_bytes
    group_size: int          # layers per KV cache group
    attn_groups: int         # groups of attention layers: each needs a block per block_size tokens
    mamba_groups: int        # groups of Mamba layers: each needs one block per request

    @property
    def block_bytes(self) -> int:
        """Bytes of one block id of the pool: a page of each of the group's layers."""
        return self.group_size * self.attn_page_bytes

    @property
    def mamba_padding(self) -> float:
        """The fraction by which vLLM pads a Mamba layer's state to the attention page."""
        return self.attn_page_bytes / self.mamba_page_bytes - 1

    def request_blocks(self, tokens: int) -> int:
        """Blocks a request of ``tokens`` tokens holds (no prefix caching)."""
        return self.attn_groups * math.ceil(tokens / self.block_size) + self.mamba_groups

    def request_bytes(self, tokens: int) -> int:
        return self.request_blocks(tokens) * self.block_bytes


def vllm_hybrid_geometry(spec: HybridModelSpec, kernel_block: int = VLLM_KERNEL_BLOCK) -> VllmHybridGeometry:
    """vLLM 0.34.0's rule, prefix caching off (``mamba_cache_mode`` "none"):

    - block size (``Platform._align_hybrid_block_size`` in ``vllm/platforms/interface.py``): the
      smallest multiple of the kernel block whose page of ONE attention layer (K and V) holds the
      state (conv + SSM) of ONE Mamba layer; the Mamba page is padded up to that page;
    - groups (``_get_kv_cache_groups_uniform_page_size`` in ``vllm/v1/core/kv_cache_planning.py``):
      layers of each type split into groups of ``min`` layers over the types (the ``max`` when
      max < 1.5 min), the last group of a type padded; every group has its own block table.
    """
    attn_1 = 2 * spec.num_kv_heads * spec.head_dim * spec.kv_dtype.itemsize
    mamba = spec.ssm_state_bytes_per_layer + spec.conv_state_bytes_per_layer
    block = kernel_block * math.ceil(mamba / (kernel_block * attn_1))
    counts = (spec.num_attn_layers, spec.num_mamba_layers)
    group = min(counts) if max(counts) >= 1.5 * min(counts) else max(counts)
    return VllmHybridGeometry(block_size=block, attn_page_bytes=block * attn_1, mamba_page_bytes=mamba,
                              group_size=group, attn_groups=math.ceil(counts[0] / group),
                              mamba_groups=math.ceil(counts[1] / group))


# SGLang, sgl-project/sglang at 001ccef0: the default in python/sglang/srt/server_args.py, the split
# in python/sglang/srt/model_executor/model_runner_kv_cache_mixin.py (handle_max_mamba_cache)
SGLANG_MAMBA_FULL_MEMORY_RATIO = 0.9      # --mamba-full-memory-ratio: Mamba state memory / full KV memory


def sglang_mamba_fraction(ratio: float = SGLANG_MAMBA_FULL_MEMORY_RATIO) -> float:
    """The share of the cache budget SGLang gives the Mamba pool when no size is set: it solves
    mamba + kv = budget with mamba / kv = ratio, so ratio / (1 + ratio) (0.9: 47.4%)."""
    return ratio / (1 + ratio)
