"""Pure-torch references of paged decode attention and KV append (``avmp_triton.ops.paged_attention``).

Each request's pages are gathered through the block table and the handle table into contiguous
K/V, then attention runs in ``compute_dtype`` (fp64 by default). Same sentinel rules as the kernels:
tokens on a -1 handle, a handle outside the table or a free handle are skipped; a request with
nothing readable gets a zero row. Slow and host-synchronising: for tests only.
"""
from __future__ import annotations

import torch

from avmp_triton.layout import KVPageLayout

FP8_MAX = 448.0   # largest finite float8_e4m3fn


def _elements(arena: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = arena.numel() // dtype.itemsize * dtype.itemsize
    return arena.view(torch.uint8)[:n].view(dtype)


def _token_rows(handle_table: torch.Tensor, layout: KVPageLayout, handles: torch.Tensor, pos: torch.Tensor,
                layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element offset of the K row (kv head 0) of every position, and whether it is readable."""
    table = handle_table.cpu()
    h = handles.long().cpu()[pos // layout.page_tokens]
    ok = (h >= 0) & (h < table.numel())
    off = torch.where(ok, table[h.clamp(0, table.numel() - 1)], torch.full_like(h, -1))
    ok &= off >= 0
    base = (off // layout.elem_bytes + layer * layout.stride_layer
            + (pos % layout.page_tokens) * layout.stride_token)
    return torch.where(ok, base, torch.zeros_like(base)), ok


def gather_kv(arena: torch.Tensor, handle_table: torch.Tensor, layout: KVPageLayout, handles: torch.Tensor,
              seq_len: int, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K, V ``[seq_len, Hkv, D]`` of one request from its page handles, and ``valid`` ``[seq_len]`` bool
    (False for tokens whose page is not readable; their K/V rows are zeros)."""
    elems = _elements(arena, dtype)
    Hkv, D = layout.num_kv_heads, layout.head_dim
    pos = torch.arange(seq_len)
    base, ok = _token_rows(handle_table, layout, handles, pos, layer)
    idx = (base[:, None, None] + torch.arange(Hkv)[None, :, None] * layout.stride_head
           + torch.arange(D)[None, None, :]).to(elems.device)                     # [L, Hkv, D]
    keep = ok.to(elems.device)[:, None, None]
    k = torch.where(keep, elems[idx], torch.zeros((), dtype=dtype, device=elems.device))
    v = torch.where(keep, elems[idx + layout.stride_kv], torch.zeros((), dtype=dtype, device=elems.device))
    return k, v, ok.to(elems.device)


def decode_attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float,
                           compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One request: ``q [Hq, D]`` over ``k, v [L, Hkv, D]`` (GQA: q head h reads kv head h // (Hq / Hkv)),
    tokens with ``valid`` False left out. Returns ``[Hq, D]`` in ``compute_dtype`` (zeros if none valid)."""
    Hq, D = q.shape
    L, Hkv, _ = k.shape
    if L == 0 or not bool(valid.any()):
        return torch.zeros(Hq, D, dtype=compute_dtype, device=q.device)
    g = Hq // Hkv
    kc = k.to(compute_dtype).repeat_interleave(g, dim=1)                           # [L, Hq, D]
    vc = v.to(compute_dtype).repeat_interleave(g, dim=1)
    s = torch.einsum("hd,lhd->hl", q.to(compute_dtype), kc) * scale                 # [Hq, L]
    s = s.masked_fill(~valid.to(q.device)[None, :], float("-inf"))
    return torch.einsum("hl,lhd->hd", torch.softmax(s, dim=-1), vc)


def paged_decode_attention_ref(q: torch.Tensor, arena: torch.Tensor, handle_table: torch.Tensor,
                               layout: KVPageLayout, block_table: torch.Tensor, seq_lens: torch.Tensor, *,
                               layer: int = 0, scale: float | None = None, kv_dtype: torch.dtype | None = None,
                               compute_dtype: torch.dtype = torch.float64,
                               kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ``paged_decode_attention`` on raw tensors: the cache's ``arena``,
    ``handle_table`` and ``kv_layout`` (``layout``) and its ``kv_dtype`` (default: q's) in place of a
    ``PagedCache``. Returns ``[B, Hq, D]`` in ``compute_dtype``. ``seq_lens`` are clamped to
    ``[0, W * page_tokens]`` as the kernel does. ``kv_scale`` ``[2, Hkv]``: the stored K and V of
    kv head h are multiplied by ``kv_scale[0, h]`` and ``kv_scale[1, h]`` (an fp8 cache)."""
    B, Hq, D = q.shape
    dtype = kv_dtype or (q.dtype if kv_scale is None else torch.float8_e4m3fn)
    scale = D ** -0.5 if scale is None else scale
    W = block_table.shape[1]
    out = torch.zeros(B, Hq, D, dtype=compute_dtype, device=q.device)
    for b, n in enumerate(seq_lens.tolist()):
        n = min(max(n, 0), W * layout.page_tokens)
        k, v, ok = gather_kv(arena, handle_table, layout, block_table[b], n, layer, dtype)
        k, v = dequantize(k, v, kv_scale, compute_dtype)
        out[b] = decode_attention_dense(q[b], k, v, ok, scale, compute_dtype)
    return out


def kv_append_ref(k: torch.Tensor, v: torch.Tensor, arena: torch.Tensor, handle_table: torch.Tensor,
                  layout: KVPageLayout, block_table: torch.Tensor, token_req: torch.Tensor, token_pos: torch.Tensor,
                  *, layer: int = 0, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ``kv_append`` on raw tensors (arena, handle table and layout as in
    ``paged_decode_attention_ref``): returns a copy of ``arena`` with the tokens written (tokens on
    an invalid row, position, handle or free handle skipped; a later token wins a shared slot).
    With ``kv_scale`` ``[2, Hkv]`` the cache is float8_e4m3fn: K and V of kv head h are stored
    divided by ``kv_scale[0, h]`` and ``kv_scale[1, h]``, saturated to +-448."""
    out = arena.clone()
    if kv_scale is not None:
        s = kv_scale.to(device=k.device, dtype=torch.float32)
        k, v = (_fp8(x.float() / s[i, :, None]) for i, x in enumerate((k, v)))
    elems = _elements(out, k.dtype)
    B, W = block_table.shape
    Hkv, D = layout.num_kv_heads, layout.head_dim
    heads = torch.arange(Hkv)[:, None] * layout.stride_head + torch.arange(D)[None, :]   # [Hkv, D]
    for t, (r, p) in enumerate(zip(token_req.tolist(), token_pos.tolist())):
        if not (0 <= r < B and p >= 0 and p // layout.page_tokens < W):
            continue
        base, ok = _token_rows(handle_table, layout, block_table[r], torch.tensor([p]), layer)
        if not bool(ok[0]):
            continue
        idx = (int(base[0]) + heads).to(elems.device)
        elems[idx] = k[t]
        elems[idx + layout.stride_kv] = v[t]
    return out


def dequantize(k: torch.Tensor, v: torch.Tensor, kv_scale: torch.Tensor | None,
               compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored K, V ``[L, Hkv, D]`` times their scales ``kv_scale[0 or 1, h]`` (an fp8 cache), in
    ``compute_dtype``; unchanged without scales."""
    if kv_scale is None:
        return k, v
    s = kv_scale.to(device=k.device, dtype=compute_dtype)
    return k.to(compute_dtype) * s[0, None, :, None], v.to(compute_dtype) * s[1, None, :, None]


def _fp8(x: torch.Tensor) -> torch.Tensor:
    """``x`` saturated to float8_e4m3fn's finite range (+-448) and rounded to it."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
