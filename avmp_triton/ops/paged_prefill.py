"""Launcher of paged prefill / append attention (``kernels/paged_prefill.py``).

Variable-length causal attention of each request's new tokens over its cached prefix and
themselves, K/V read in place through the handle table. The new tokens' K/V must already be in
the pages (append first, as vLLM and FlashInfer do).

Everything here is decided from shapes: no host synchronisation, fixed grid for fixed shapes, an
``out=`` buffer, so a step can be captured in a CUDA graph. The op is registered as
``torch.ops.avmp.paged_prefill_attention`` and ``torch.ops.avmp.resolve_pages`` (each mutates ``out``).

Head dims: multiples of 8 in [16, 256], the rule of ``_args.check_attn_head_dim`` that decode
shares; one that is not a power of two runs in tiles padded to the next one, masked.

``resolve_pages`` (one launch of ``kernels/page_offsets.py``) turns a step's block table into the
pages' element offsets once, for every attention layer of the step (``page_offsets=``); the
attention kernel loads one value per page instead of a handle, its kind and its offset, one after
the other. A call given no offsets resolves them itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional

import torch

from avmp_triton import _triton_env  # noqa: F401  (before triton: the interpreter on CPU-only hosts)
import triton  # noqa: E402
from avmp_triton._checks import check_tensor, is_int
from avmp_triton._triton_env import interpreter_active
from avmp_triton.kernels.page_offsets import resolve_pages_kernel
from avmp_triton.kernels.paged_prefill import paged_prefill_kernel
from avmp_triton.memory.cache import PagedCache
from avmp_triton.ops._args import (FP8, attn_block_d, check_attn_head_dim, check_kernel_device, check_kv_scale,
                                   check_layer, config_overrides, kv_cache_of)
from avmp_triton.ops._host_checks import (KIND_KV, check_block_table, check_cu_seqlens, check_handles,
                                         live_pages, on_host)

__all__ = ["PrefillConfig", "paged_prefill_attention", "prefill_launch_config", "resolve_pages"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634

# (BLOCK_M rows, BLOCK_N kv positions, num_warps, num_stages) by the head dim padded to the kernel's
# tile (``attn_block_d``: 160 takes the 256 row) for 16-bit inputs on a GPU. Not autotuned (the op
# writes ``out``; no launcher of this package autotunes). D=128 from the H100 sweeps (bf16, GQA 4,
# pages of 16): 64 x 64, 4 warps, 3 stages (perf/results/sweep_prefill_variants_H100_2ea8c39.json)
# over resolved pages taken as scalars (sweep_prefill_variants_H100_c562f19.json: 381, 245, 189 and
# 308 TFLOP/s at 1x4096, 4x1024, 16x512 and 4x512+1024, 0.71-0.97x SDPA flash's time, where handles
# resolved in the kernel took 0.94-1.23x). D <= 64 take it unmeasured: smaller K/V tiles of the same
# shape. D=256 (64 x 32, 8 warps) is the largest tile within 227 KiB of shared memory without
# spills on sm_90, never swept.
_GPU_TABLE = {
    16: (64, 64, 4, 3),
    32: (64, 64, 4, 3),
    64: (64, 64, 4, 3),
    128: (64, 64, 4, 3),
    256: (64, 32, 8, 2),
}
# fp32 (tests only) multiplies in IEEE fp32 without tensor cores: larger tiles spill
_GPU_FP32 = (32, 16, 8, 1)
# the interpreter pays per operation, not per element: middling tiles, few programs
_CPU_CONFIG = (32, 32, 4, 1)
# pages a KV block may span with their usable-page mask kept as the bits of one int32
_MAX_BITS = 32
# entries of the block table per program of ``resolve_pages``
_RESOLVE_BLOCK = 1024


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PrefillConfig:
    """Launch shape of the prefill kernel; a field left None comes from ``prefill_launch_config``."""
    block_m: int | None = None     # rows per tile: query tokens x the Hq // Hkv heads of one KV head
    block_n: int | None = None     # KV positions per step
    num_warps: int | None = None
    num_stages: int | None = None


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (max(n, 1) - 1).bit_length())


def prefill_launch_config(head_dim: int, dtype: torch.dtype, gqa: int, *, on_gpu: bool,
                          max_seqlen_q: int | None = None) -> PrefillConfig:
    """The launch table; ``head_dim`` the real one (the table goes by its padded tile width).

    ``BLOCK_M`` counts rows (query tokens x the ``gqa`` query heads of one KV head); a short
    ``max_seqlen_q`` shrinks it so a decode-like batch does not pad every tile to 128 rows.
    """
    if not on_gpu:
        bm, bn, warps, stages = _CPU_CONFIG
    elif dtype == torch.float32:
        bm, bn, warps, stages = _GPU_FP32
    else:
        bm, bn, warps, stages = _GPU_TABLE[attn_block_d(head_dim)]
    bm = max(bm, _pow2_at_least(gqa))
    if max_seqlen_q is not None:
        short = max(16, _pow2_at_least(gqa * max_seqlen_q))
        if short < bm:
            bm = short
            if on_gpu and bm <= 32:
                warps = 4  # a 16- or 32-row tile keeps no more than one warpgroup busy
    return PrefillConfig(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)


@torch.library.custom_op("avmp::paged_prefill_attention", mutates_args=("out",))
def _paged_prefill_op(
    q: torch.Tensor, page_offsets: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
    kv: torch.Tensor, out: torch.Tensor, page_tokens: int, num_kv_heads: int, layer_off: int, stride_kv: int,
    stride_kv_head: int, stride_kv_token: int, scale: float, block_m: int, block_n: int, num_warps: int,
    num_stages: int, page_elems: int, kv_scale: Optional[torch.Tensor] = None,
) -> None:
    """Validated launch; use ``paged_prefill_attention``. ``kv`` is the arena viewed as the KV dtype
    (q's, or float8_e4m3fn with ``kv_scale``); ``page_elems``: a KV page's elements (all layers),
    which bounds the offsets the kernel takes."""
    T, Hq, D = q.shape
    B = seq_lens.shape[0]
    if T == 0 or B == 0:
        return
    if page_elems < 1:
        raise ValueError(f"page_elems, a KV page's elements, must be >= 1, got {page_elems}")
    gqa = Hq // num_kv_heads
    block_q = block_m // gqa
    grid = (T // block_q + B, num_kv_heads)
    interp = interpreter_active()
    # Triton launches on the current device; q may live on another one
    guard = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with guard:
        paged_prefill_kernel[grid](
            q, out, cu_seqlens_q, seq_lens, page_offsets, kv,
            B, page_offsets.shape[1], kv.numel() - page_elems, T,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), page_offsets.stride(0),
            layer_off, stride_kv, stride_kv_head, stride_kv_token, scale * _LOG2E,
            kv_scale if kv_scale is not None else seq_lens,
            GQA=gqa, HEAD_DIM=D, BLOCK_D=attn_block_d(D), PAGE_TOKENS=page_tokens,
            ELEM_BYTES=kv.element_size(), KV_FP8=kv_scale is not None, NUM_KV_HEADS=num_kv_heads,
            BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
            PIPELINE=not interp, PAGE_BITS=block_n // page_tokens <= _MAX_BITS,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            UPCAST_DOT=interp and q.dtype == torch.bfloat16,
            num_warps=num_warps, num_stages=num_stages)


@_paged_prefill_op.register_fake
def _(q, page_offsets, seq_lens, cu_seqlens_q, kv, out, page_tokens, num_kv_heads, layer_off, stride_kv,
      stride_kv_head, stride_kv_token, scale, block_m, block_n, num_warps, num_stages, page_elems,
      kv_scale=None) -> None:
    return None


@torch.library.custom_op("avmp::resolve_pages", mutates_args=("out",))
def _resolve_pages_op(block_table: torch.Tensor, handle_table: torch.Tensor, handle_kinds: torch.Tensor,
                      out: torch.Tensor, elem_bytes: int) -> None:
    """Validated launch; use ``resolve_pages``."""
    n = block_table.numel()
    if n == 0:
        return
    guard = torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext()
    with guard:
        resolve_pages_kernel[(triton.cdiv(n, _RESOLVE_BLOCK),)](
            block_table, out, handle_table, handle_kinds, handle_table.shape[0], block_table.shape[1], n,
            block_table.stride(0), block_table.stride(1), ELEM_BYTES=elem_bytes, BLOCK=_RESOLVE_BLOCK, num_warps=4)


@_resolve_pages_op.register_fake
def _(block_table, handle_table, handle_kinds, out, elem_bytes) -> None:
    return None


def paged_prefill_attention(
    q: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cache: PagedCache,
    *,
    layer: int,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    config: PrefillConfig | None = None,
    kv_scale: torch.Tensor | None = None,
    page_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed new tokens over their requests' paged KV cache.

    Args:
        q: ``[T, Hq, D]`` in the cache's ``kv_dtype`` (any of fp16, bf16 and fp32 over a
            float8_e4m3fn cache), the new tokens of all requests packed; last dim contiguous; ``Hq``
            a multiple of the cache's KV heads; D a multiple of 8 in [16, 256], the layout's head dim.
        block_table: ``[B, W]`` int32 KV page handles, -1 padded; row b needs
            ``cdiv(seq_lens[b], page_tokens)`` live handles. Rows contiguous.
        seq_lens: ``[B]`` int32, context of request b including its new tokens
            (``seq_lens[b] >= q_len_b``); the new tokens are its last ``q_len_b`` positions.
        cu_seqlens_q: ``[B+1]`` int32, request b's tokens are ``q[cu[b]:cu[b+1]]``
            (non-decreasing, ``cu[0] = 0``, ``cu[B] <= T``; rows past ``cu[B]`` are not written).
        cache: ``PagedCache.of(allocator)``; live page offsets are multiples of 16 bytes (the
            allocators' units are), which the kernel tells the compiler, to load K/V in 16-byte vectors.
        layer: attention layer, in ``[0, cache.num_attn_layers)``.
        scale: softmax scale, default ``D ** -0.5``.
        out: optional ``[T, Hq, D]`` output of q's dtype (last dim contiguous).
        max_seqlen_q: optional upper bound of ``q_len_b`` (a hint for the tile size only; never
            trusted for correctness).
        config: ``PrefillConfig`` overrides of ``prefill_launch_config``: ``block_m`` a power of two
            >= 16 and >= Hq // Hkv, ``block_n`` a power of two >= 16.
        kv_scale: ``[2, Hkv]`` fp32 scales of layer ``layer`` for a float8_e4m3fn cache, as in
            ``paged_decode_attention``; required for fp8, refused otherwise.
        page_offsets: optional ``[B, W]`` int64, ``resolve_pages(block_table, cache)`` of this
            step (block_table's shape, rows contiguous): the kernel reads the pages' offsets from it
            and never the handle table. Build it once a step for all attention layers, after the
            step's allocator calls (a page moved, freed or bound since is read where it was);
            without it the call resolves the pages itself (one more small launch). On the CPU it
            must equal ``resolve_pages``' answer; on a GPU an entry that is -1, misaligned or past
            the arena's last page skips its page.

    Returns:
        ``out`` ``[T, Hq, D]``. Token i of request b (absolute position
        ``seq_lens[b] - q_len_b + i``) attends to positions ``<=`` its own. KV pages whose handle
        is -1, not live or not a KV page are skipped; a row that sees no live position is zero.
        On a GPU the metadata is never read on the host: a bad ``cu_seqlens_q`` only skips the
        rows outside ``[0, T)``. When it is on the CPU, bad values raise (ValueError /
        InvalidHandleError naming the value).
    """
    layout = kv_cache_of(cache)
    dev = _check_q(q, cache)
    T, D = q.shape[0], q.shape[2]
    B = _check_tables(q, block_table, seq_lens, cu_seqlens_q)
    gqa = _check_layout_and_layer(q, layout, layer, cache.num_attn_layers)
    scale = _check_scale(scale, D, max_seqlen_q)
    out = _check_out(out, q)
    cfg = _launch_shape(D, q.dtype, gqa, dev, max_seqlen_q, config)
    if B == 0:
        if T:
            raise ValueError(f"q has T={T} tokens but there are no requests (seq_lens is empty)")
        return out
    if T == 0:
        return out
    if on_host(cu_seqlens_q, seq_lens, block_table, cache.handle_table, cache.handle_kinds):
        _check_metadata(cu_seqlens_q, seq_lens, block_table, cache.handle_table, cache.handle_kinds, T,
                        layout.page_tokens)
    kv_scale = check_kv_scale(kv_scale, cache, dev)
    page_offsets = _page_offsets(page_offsets, block_table, cache)
    # PagedCache guarantees whole elements of the KV dtype
    torch.ops.avmp.paged_prefill_attention(
        q, page_offsets, seq_lens, cu_seqlens_q, cache.arena.view(cache.kv_dtype), out, layout.page_tokens,
        layout.num_kv_heads, layer * layout.stride_layer, layout.stride_kv, layout.stride_head, layout.stride_token,
        float(scale), cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages,
        cache.num_attn_layers * layout.stride_layer, kv_scale)
    return out


def resolve_pages(block_table: torch.Tensor, cache: PagedCache, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The element offsets (in the cache's KV dtype) of the KV pages of ``block_table``.

    Args:
        block_table: ``[B, W]`` int32 KV page handles, -1 padded, on the cache's device.
        cache: ``PagedCache.of(allocator)``.
        out: optional ``[B, W]`` int64 buffer (contiguous), for a CUDA graph's fixed buffers.

    Returns:
        ``out`` ``[B, W]`` int64: the page's element offset in ``cache.arena.view(cache.kv_dtype)``,
        -1 where the handle is -1, out of range, free or not a KV page. One kernel launch (grid from
        the shape), no host sync; valid until the allocator next moves, frees or binds a page.
    """
    layout = kv_cache_of(cache)
    check_tensor(block_table, "block_table", dim=2, dtypes=(torch.int32,), device=cache.device, beside="the cache")
    if out is None:
        out = torch.empty(block_table.shape, dtype=torch.int64, device=block_table.device)
    else:
        check_tensor(out, "out", dim=2, dtypes=(torch.int64,), device=cache.device, beside="the cache",
                     contiguous=True)
        if out.shape != block_table.shape:
            raise ValueError(f"out must have block_table's shape {tuple(block_table.shape)}, got {tuple(out.shape)}")
    torch.ops.avmp.resolve_pages(block_table, cache.handle_table, cache.handle_kinds, out, layout.elem_bytes)
    return out


def _page_offsets(page_offsets, block_table, cache) -> torch.Tensor:
    """The caller's ``page_offsets`` checked (shape, dtype, device; on the host, its values against
    ``resolve_pages``), or ``resolve_pages`` of ``block_table`` when there are none."""
    if page_offsets is None:
        return resolve_pages(block_table, cache)
    check_tensor(page_offsets, "page_offsets", dim=2, dtypes=(torch.int64,), device=block_table.device,
                 beside="q")
    if page_offsets.shape != block_table.shape:
        raise ValueError(f"page_offsets must have block_table's shape {tuple(block_table.shape)}, "
                         f"got {tuple(page_offsets.shape)}")
    if page_offsets.stride(1) != 1:
        raise ValueError(f"page_offsets rows must be contiguous, got strides {page_offsets.stride()}")
    if on_host(page_offsets, block_table, cache.handle_table, cache.handle_kinds):
        want = resolve_pages(block_table, cache)
        bad = (page_offsets != want).nonzero()
        if bad.numel():
            b, j = bad[0].tolist()
            raise ValueError(f"page_offsets[{b}, {j}]={int(page_offsets[b, j])} differs from resolve_pages' "
                             f"{int(want[b, j])} for handle {int(block_table[b, j])} (stale: resolve the pages "
                             f"again after the allocator moves, frees or binds pages)")
    return page_offsets


def _check_q(q, cache) -> torch.device:
    check_tensor(q, "q", dim=3, dtypes=_DTYPES, device=cache.device, beside="the cache")
    check_kernel_device(q, "q")
    if q.dtype != cache.kv_dtype and cache.kv_dtype != FP8:
        raise TypeError(f"q must have the KV dtype {cache.kv_dtype}, got {q.dtype}")
    if q.stride(-1) != 1:
        raise ValueError(f"q must have a contiguous last dim, got strides {q.stride()}")
    return q.device


def _check_tables(q, block_table, seq_lens, cu_seqlens_q) -> int:
    """Shapes, dtypes and devices of the metadata (values: ``_check_metadata``); returns B."""
    dev = q.device
    for t, name in ((cu_seqlens_q, "cu_seqlens_q"), (seq_lens, "seq_lens")):
        check_tensor(t, name, dim=1, dtypes=(torch.int32,), device=dev, beside="q", contiguous=True)
    B = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != B + 1:
        raise ValueError(f"cu_seqlens_q must have B+1 = {B + 1} entries (seq_lens has B = {B}), "
                         f"got {cu_seqlens_q.shape[0]}")
    check_tensor(block_table, "block_table", dim=2, dtypes=(torch.int32,), device=dev, beside="q")
    if block_table.shape[0] != B:
        raise ValueError(f"block_table must have B = {B} rows, got shape {tuple(block_table.shape)}")
    if block_table.shape[1] < 1:
        raise ValueError(f"block_table must have at least one column, got shape {tuple(block_table.shape)}")
    if block_table.stride(1) != 1:
        raise ValueError(f"block_table rows must be contiguous, got strides {block_table.stride()}")
    return B


def _check_layout_and_layer(q, layout, layer, num_layers) -> int:
    """The page layout against q, and the layer; returns the GQA group."""
    D, Hq = q.shape[2], q.shape[1]
    check_attn_head_dim(D, "q")
    if layout.head_dim != D:
        raise ValueError(f"q's head dim D={D} differs from layout.head_dim={layout.head_dim}")
    Hkv = layout.num_kv_heads
    if Hq < 1 or Hq % Hkv:
        raise ValueError(f"q heads Hq={Hq} must be a positive multiple of layout.num_kv_heads={Hkv}")
    check_layer(layer, num_layers, "attention")
    return Hq // Hkv


def _check_scale(scale, D: int, max_seqlen_q) -> float:
    if scale is None:
        scale = D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    if max_seqlen_q is not None and (not is_int(max_seqlen_q) or max_seqlen_q < 1):
        raise ValueError(f"max_seqlen_q must be a positive int, got {max_seqlen_q!r}")
    return scale


def _check_out(out, q) -> torch.Tensor:
    dev = q.device
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        check_tensor(out, "out", dim=3, dtypes=(q.dtype,), device=dev, beside="q")
        if out.shape != q.shape:
            raise ValueError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
        if out.stride(-1) != 1:
            raise ValueError(f"out must have a contiguous last dim, got strides {out.stride()}")
    return out


def _launch_shape(D, dtype, gqa, dev, max_seqlen_q, config) -> PrefillConfig:
    """``prefill_launch_config`` with the caller's overrides, checked."""
    default = prefill_launch_config(D, dtype, gqa, on_gpu=dev.type == "cuda", max_seqlen_q=max_seqlen_q)
    cfg = dataclasses.replace(default, **config_overrides(config, PrefillConfig))
    for name in ("block_m", "block_n"):
        v = getattr(cfg, name)
        if not is_int(v) or v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v!r}")
    if cfg.block_m < gqa:
        raise ValueError(f"block_m={cfg.block_m} must be >= Hq // Hkv = {gqa} (one token's query heads)")
    if cfg.num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {cfg.num_warps!r}")
    if not is_int(cfg.num_stages) or cfg.num_stages < 1:
        raise ValueError(f"num_stages must be a positive int, got {cfg.num_stages!r}")
    return cfg


def _check_metadata(cu_seqlens_q, seq_lens, block_table, handle_table, handle_kinds, T: int,
                    page_tokens: int) -> None:
    """Host checks of CPU-resident metadata (free to read): ranges, lengths, the live pages' handles."""
    check_cu_seqlens(cu_seqlens_q, T, "cu_seqlens_q")
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    for b, (n, q_len) in enumerate(zip(seq_lens.tolist(), q_lens)):
        if n < q_len:
            raise ValueError(f"seq_lens[{b}]={n} is shorter than the request's {q_len} new tokens")
    check_block_table(block_table, seq_lens, page_tokens)
    check_handles(live_pages(block_table, seq_lens, page_tokens), handle_table, handle_kinds, KIND_KV, "block_table",
                  unique=False)
