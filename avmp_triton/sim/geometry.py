"""What each allocator variant's units are, and what one request holds in them (the geometry the
CLI prints and every sweep cell records beside its metrics)."""
from __future__ import annotations

from avmp_triton.sim.engines import VLLM_VERSION, vllm_hybrid_geometry

__all__ = ["variant_geometry"]


def variant_geometry(alloc, tokens: int) -> dict:
    """How ``alloc`` sizes its units, and what a request of ``tokens`` tokens holds in it, beside
    the exact bytes (its tokens' K/V and one SSM state); vLLM's block size and groups for its pool."""
    spec, pt, su = alloc.spec, alloc.page_tokens, alloc.ssm_units
    unit_kv, unit_ssm = alloc.unit_bytes[alloc.pool_index("kv")], alloc.unit_bytes[alloc.pool_index("ssm")]
    held = (-(-tokens // pt) + su - 1) * unit_kv + unit_ssm
    exact = tokens * spec.kv_bytes_per_token + spec.ssm_state_raw_bytes
    g = {"allocator": type(alloc).__name__, "ssm_dtype": str(spec.ssm_dtype).replace("torch.", ""),
         "pools": list(alloc.pool_names), "page_tokens": pt,
         "pool_units": {k: p.units for k, p in alloc.stats().pools.items()},
         "kv_unit_bytes": unit_kv, "ssm_unit_bytes": unit_ssm, "ssm_units_per_request": su,
         "request_tokens": tokens, "request_bytes": held, "request_exact_bytes": exact,
         "request_overhead": held / exact - 1}
    if type(alloc).__name__ == "VllmHybridAllocator":
        v = vllm_hybrid_geometry(spec)
        g["vllm"] = {"version": VLLM_VERSION, "block_size": v.block_size, "group_size": v.group_size,
                     "attn_groups": v.attn_groups, "mamba_groups": v.mamba_groups,
                     "block_bytes": v.block_bytes, "mamba_padding": v.mamba_padding,
                     "request_blocks": v.request_blocks(tokens), "request_bytes": v.request_bytes(tokens),
                     "source": "vllm/platforms/interface.py (_align_hybrid_block_size), "
                               "vllm/v1/core/kv_cache_planning.py (_get_kv_cache_groups_uniform_page_size)"}
    return g
