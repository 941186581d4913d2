"""Pure-torch reference of paged prefill / append attention (``avmp_triton.ops.paged_prefill``).

Gathers each request's pages through the handle table into contiguous K/V, then runs plain
causal attention in fp64. Slow, host-synchronising, for tests only. ``resolve_pages_ref``: the
page offsets the kernel reads, in torch ops.
"""
from __future__ import annotations

import torch

from avmp_triton.layout import KVPageLayout
from avmp_triton.memory.allocator import KIND_KV
from avmp_triton.reference.paged_attention import dequantize, gather_kv


def causal_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         compute_dtype: torch.dtype = torch.float64,
                         key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """One request: ``q [Lq, Hq, D]`` are the last Lq positions of ``k, v [L, Hkv, D]``.

    Returns ``[Lq, Hq, D]`` in ``compute_dtype``; a query sees the positions ``<=`` its own, and
    only those where ``key_valid [L]`` (bool) is true if given; a query that sees none gets zeros.
    """
    Lq, Hq, D = q.shape
    L, Hkv, _ = k.shape
    g = Hq // Hkv
    qc = q.to(compute_dtype).transpose(0, 1)                                   # [Hq, Lq, D]
    kc = k.to(compute_dtype).repeat_interleave(g, dim=1).transpose(0, 1)      # [Hq, L, D]
    vc = v.to(compute_dtype).repeat_interleave(g, dim=1).transpose(0, 1)
    s = (qc @ kc.transpose(1, 2)) * scale                                      # [Hq, Lq, L]
    q_pos = torch.arange(L - Lq, L, device=q.device)
    visible = torch.arange(L, device=q.device)[None, :] <= q_pos[:, None]      # [Lq, L]
    if key_valid is not None:
        visible = visible & key_valid.to(q.device)[None, :]
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with nothing visible: 0
    return (p @ vc).transpose(0, 1)


def paged_prefill_attention_ref(q: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                                block_table: torch.Tensor, arena: torch.Tensor, handle_table: torch.Tensor,
                                layout: KVPageLayout, layer: int, scale: float | None = None,
                                compute_dtype: torch.dtype = torch.float64,
                                kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ``paged_prefill_attention`` on raw tensors: the cache's ``arena``,
    ``handle_table`` and ``kv_layout`` (``layout``) in place of a ``PagedCache``, and the metadata in
    this order. Returns ``[T, Hq, D]`` float32. With ``kv_scale`` ``[2, Hkv]`` the pages are
    float8_e4m3fn, dequantised as in ``paged_decode_attention_ref``.

    Rows of q outside ``cu_seqlens_q[0]:cu_seqlens_q[-1]`` are NaN (the kernel leaves them unwritten).
    """
    T, Hq, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    out = torch.full((T, Hq, D), float("nan"), dtype=torch.float32, device=q.device)
    cu = cu_seqlens_q.tolist()
    for b, ctx in enumerate(seq_lens.tolist()):
        lo, hi = cu[b], cu[b + 1]
        if hi == lo:
            continue
        assert ctx >= hi - lo, f"request {b}: seq_len {ctx} < q_len {hi - lo}"
        k, v, ok = gather_kv(arena, handle_table, layout, block_table[b], ctx, layer,
                             q.dtype if kv_scale is None else torch.float8_e4m3fn)
        k, v = dequantize(k, v, kv_scale, compute_dtype)
        assert bool(ok.all()), f"request {b}: the pages of tokens {(~ok).nonzero().flatten().tolist()[:8]} are not readable"
        out[lo:hi] = causal_attention_ref(q[lo:hi], k, v, scale, compute_dtype).float()
    return out


def resolve_pages_ref(block_table: torch.Tensor, handle_table: torch.Tensor, handle_kinds: torch.Tensor,
                      elem_bytes: int) -> torch.Tensor:
    """Reference of ``resolve_pages``: ``[B, W]`` int64 element offsets of the KV pages of
    ``block_table`` (the handles' byte offsets // ``elem_bytes``), -1 where the handle is -1, out
    of range, free or not a KV page."""
    h = block_table.long()
    ok = (h >= 0) & (h < handle_table.shape[0])
    h = torch.where(ok, h, 0)
    off = handle_table[h]
    ok &= (handle_kinds[h] == KIND_KV) & (off >= 0)
    return torch.where(ok, off // elem_bytes, -1)
