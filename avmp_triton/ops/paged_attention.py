"""Paged decode attention and KV append over a ``PagedCache``: argument checks, the launch table,
the custom ops ``torch.ops.avmp.paged_decode_attention`` and ``torch.ops.avmp.kv_append``.

The launchers decide from shapes only (no ``.item()``, no host sync; every buffer they allocate has
a size fixed by the shapes), so a step composes with ``torch.compile`` and CUDA graphs. On the
device, a -1 block-table entry, a handle outside the table, a free handle or an SSM handle inside a
request's live length is skipped (masked out of the softmax, no byte of its unit read); a request
with nothing readable gets a zero row; a ``seq_len`` past ``W * page_tokens`` is clamped. Metadata
on the CPU is checked first instead (``_host_checks``: errors that name the value).

Head dims: multiples of 8 in [16, 256] (``_args.check_attn_head_dim``); one that is not a power of
two runs in tiles padded to the next one (Zamba2's 160 in those of 256, masked).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from avmp_triton import _triton_env
from avmp_triton._checks import check_tensor, is_int
from avmp_triton.kernels import paged_attention as K
from avmp_triton.layout import KVPageLayout
from avmp_triton.memory.cache import PagedCache
from avmp_triton.ops._args import (FP8, attn_block_d, check_attn_head_dim, check_kernel_device, check_kv_scale,
                                   check_layer, config_overrides, kv_cache_of, sm_count)
from avmp_triton.ops._host_checks import KIND_KV, check_block_table, check_handles, live_pages, on_host

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)   # of q, k, v and out
MAX_SPLITS = 128          # explicit num_splits at most
MAX_AUTO_SPLITS = 32      # what the launcher picks by itself at most
MIN_BLOCKS_PER_SPLIT = 2  # a split should walk at least this many BLOCK_N blocks of the longest request
WAVES = 2                 # split until B * Hkv * num_splits fills this many waves of the SMs
FP8_PREFETCH_MAX_SPLITS = 16  # fp8 split launches prefetch pages below this many splits
DEFAULT_SM_COUNT = 132    # H100 SXM; used where no CUDA device says otherwise (CPU runs)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DecodeConfig:
    """Launch parameters of the decode kernel (each a compile-time constant of it). A field left
    None is picked by ``decode_config``'s table; ``decode_config`` returns every field set."""
    num_splits: int | None = None      # split-KV programs per (request, kv head); 1 = no workspace
    pages_per_iter: int | None = None  # pages gathered per loop step
    block_tokens: int | None = None    # tokens per loop step (BLOCK_N): follows from pages_per_iter
    num_warps: int | None = None
    num_stages: int | None = None
    use_dot: bool | None = None        # scores and P@V with tl.dot (group padded to >= 16 rows)
    max_registers: int | None = None   # ptxas cap per thread (Triton's maxnreg)
    prefetch_rows: bool | None = None  # resolve the next step's pages during this step (see kernels._walk)


def decode_config(*, batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, page_tokens: int,
                  max_seq_len: int, sm_count: int = DEFAULT_SM_COUNT, num_splits: int | None = None,
                  pages_per_iter: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None, use_dot: bool | None = None,
                  max_registers: int | None = None, block_tokens: int | None = None,
                  prefetch_rows: bool | None = None, kv_fp8: bool = False) -> DecodeConfig:
    """The launch table: a few shape rules, no autotuning; every field can be overridden.
    ``kv_fp8``: the pages are float8_e4m3fn (the rules below differ for them where measured).

    - ``use_dot``: tensor cores for GQA groups of >= 4 q heads (padded to 16 rows; decode is bound by
      memory, so the padding costs nothing but registers); smaller groups broadcast-multiply and sum.
    - ``BLOCK_N``: 64 tokens per step for D <= 128, 32 for D = 256 (dot path); the broadcast path keeps
      its [group, BLOCK_N, D] fp32 product at <= 8192 elements. At least one page, at least 16 tokens,
      except that a page larger than that is walked in steps of that size (a whole 1024-token page
      per step ran out of shared memory on the H200). Unsplit dot launches over pages that are not
      fp8 walk 32 tokens a step.
    - ``num_warps``: 4 for D <= 128, else 8.
    - ``num_splits``: enough splits that B * Hkv * splits fills ``WAVES`` waves of ``sm_count`` SMs, but
      no more than leave ``MIN_BLOCKS_PER_SPLIT`` blocks of the longest context per split (counted
      in steps of the D rule above).
    - ``num_stages``: 3, and 4 for split launches over fp8 pages.
    - ``max_registers``: 128 for unsplit launches with 4 warps, so 4 programs fit an SM (the
      compiler's 160 left room for 3, and B=64 x 8 KV heads then took two waves of 132 SMs: 387 ->
      267 us at B=64 ctx 4096 on the H200, perf/results/decode_variants_H200/).
    - ``prefetch_rows`` (resolve the next step's pages during this step, ``kernels._walk``): on for
      unsplit launches and for fp8 splits below ``FP8_PREFETCH_MAX_SPLITS``; off for other splits.

    Measured on the H100 (perf/results/sweep_decode_variants_H100_32e7231.json, Jamba: 32/8 heads,
    D 128, pages of 16): unsplit bf16, 32 tokens and 3 stages beat 64 and 2 (B=64 ctx 512: 61.0 vs
    62.4 us; ctx 4096: 356.2 vs 361.6); fp8 keeps 64 (32 tokens: 280.5 vs 266.5 us at B=64 ctx
    4096, 3 stages). Split bf16 launches lose to prefetching at long context (B=16 ctx 32768: 759.6
    with it, 698.0 without; same splits and stages; neutral at B=16 ctx 4096 and B=1 ctx 32768),
    while fp8 ones gain from it (B=16 ctx 4096: 82.9 vs 107.9; ctx 32768: 595.5 vs 670.0) except
    with many short splits (B=1 ctx 32768, 32 splits: 59.2 vs 52.8); 4 stages: fp8 B=16 ctx 32768
    541.4 vs 595.5 (neutral at ctx 4096), bf16 splits slower (878.8 vs 759.6).

    D above is the head dim padded to the kernel's tile (``attn_block_d``: 160 -> 256), which is
    what registers and shared memory go by.
    """
    group = num_q_heads // num_kv_heads
    block_d = attn_block_d(head_dim)
    if use_dot is None:
        use_dot = group >= 4
    if use_dot:
        block_n = 64 if block_d <= 128 else 32
    else:
        block_n = min(64, max(16, 8192 // (triton.next_power_of_2(group) * block_d)))
    if num_warps is None:
        num_warps = 4 if block_d <= 128 else 8
    if num_splits is None:
        step = block_n if pages_per_iter is None else _step_tokens(pages_per_iter, page_tokens, block_n)
        ctas = max(1, batch * num_kv_heads)
        want = math.ceil(WAVES * sm_count / ctas)
        blocks = math.ceil(max_seq_len / step)
        num_splits = max(1, min(want, blocks // MIN_BLOCKS_PER_SPLIT, MAX_AUTO_SPLITS))
    if pages_per_iter is None:
        if num_splits == 1 and use_dot and not kv_fp8:
            block_n = min(block_n, 32)
        pages_per_iter = max(1, block_n // page_tokens)
    derived = _step_tokens(pages_per_iter, page_tokens, block_n)
    if block_tokens is not None and block_tokens != derived:
        raise ValueError(f"block_tokens={block_tokens!r} disagrees with pages_per_iter={pages_per_iter} "
                         f"(which gives {derived}); leave it None")
    block_tokens = derived
    if num_stages is None:
        num_stages = 4 if num_splits > 1 and kv_fp8 else 3
    if max_registers is None and num_splits == 1 and num_warps == 4:
        max_registers = 128
    if prefetch_rows is None:
        prefetch_rows = num_splits == 1 or (kv_fp8 and num_splits < FP8_PREFETCH_MAX_SPLITS)
    return DecodeConfig(num_splits=num_splits, pages_per_iter=pages_per_iter, block_tokens=block_tokens,
                        num_warps=num_warps, num_stages=num_stages, use_dot=use_dot,
                        max_registers=max_registers, prefetch_rows=prefetch_rows)


def _step_tokens(pages_per_iter: int, page_tokens: int, block_n: int) -> int:
    """Tokens a loop step walks: whole pages, or ``block_n`` of one page larger than that."""
    if pages_per_iter == 1 and page_tokens > block_n:
        return block_n
    return pages_per_iter * page_tokens


def decode_workspace_numel(batch: int, num_q_heads: int, head_dim: int, num_splits: int) -> int:
    """fp32 elements of the split-KV workspace: partial acc [B, Hq, S, D] then (max, sum) [B, Hq, S, 2]."""
    return 0 if num_splits <= 1 else batch * num_q_heads * num_splits * (head_dim + 2)


def decode_workspace(batch: int, num_q_heads: int, head_dim: int, num_splits: int, device) -> torch.Tensor:
    """A workspace to pass as ``workspace=`` (allocate it before capturing a CUDA graph)."""
    return torch.empty(max(1, decode_workspace_numel(batch, num_q_heads, head_dim, num_splits)),
                       dtype=torch.float32, device=device)


# Scratch workspaces used when the caller passes none, one per (device, size) and never freed, so a
# CUDA graph captured on one keeps a valid buffer. Shared by every call: two calls running at the
# same time on different streams must pass their own ``workspace``.
_SCRATCH: dict[tuple[str, int], torch.Tensor] = {}


def _scratch(device: torch.device, numel: int) -> torch.Tensor:
    key = (str(device), numel)
    ws = _SCRATCH.get(key)
    if ws is None:
        ws = _SCRATCH[key] = torch.empty(numel, dtype=torch.float32, device=device)
    return ws


def _layout_args(layout: KVPageLayout) -> list[int]:
    return [layout.page_tokens, layout.num_kv_heads, layout.head_dim, layout.elem_bytes,
            layout.stride_layer, layout.stride_kv, layout.stride_head, layout.stride_token]


@torch.library.custom_op("avmp::paged_decode_attention", mutates_args=("out", "workspace"))
def _paged_decode_op(q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, arena: torch.Tensor,
                     handle_table: torch.Tensor, handle_kinds: torch.Tensor, out: torch.Tensor,
                     workspace: Optional[torch.Tensor], layout: list[int], layer: int, scale: float, num_splits: int,
                     block_tokens: int, num_warps: int, num_stages: int, use_dot: bool,
                     max_registers: Optional[int] = None, kv_scale: Optional[torch.Tensor] = None,
                     prefetch_rows: bool = True) -> None:
    """Validated inputs only (see ``paged_decode_attention``); writes ``out``. ``kv_scale`` given:
    the pages are float8_e4m3fn."""
    page_tokens, num_kv_heads, head_dim, elem_bytes, s_layer, s_kv, s_head, s_token = layout
    B, Hq, D = q.shape
    if B == 0:
        return
    _check_aligned(arena)
    interp = _triton_env.interpreter_active()
    group = Hq // num_kv_heads
    block_d = attn_block_d(D)
    if num_splits > 1:
        n = decode_workspace_numel(B, Hq, D, num_splits)
        ws = _scratch(q.device, n) if workspace is None else workspace
        ws_acc, ws_ml = ws[:B * Hq * num_splits * D], ws[B * Hq * num_splits * D:n]
    else:
        ws_acc = ws_ml = out  # unused
    fp8 = kv_scale is not None
    dot_dtype, dot_fp32 = _dot_dtype(q.dtype, fp8, use_dot, interp)
    K.paged_decode_kernel[(B, num_kv_heads, num_splits)](
        q, arena.view(FP8 if fp8 else q.dtype), handle_table, handle_kinds, block_table, seq_lens, out, ws_acc,
        ws_ml, handle_table.numel(), block_table.shape[1], Hq,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        layer * s_layer, s_kv, s_head, s_token, scale * K.LOG2E, kv_scale if fp8 else seq_lens,
        GROUP=group, GROUP_PAD=max(16 if use_dot else 1, triton.next_power_of_2(group)), HEAD_DIM=D,
        BLOCK_D=block_d, PAGE_TOKENS=page_tokens, BLOCK_N=block_tokens, NUM_SPLITS=num_splits,
        ELEM_BYTES=elem_bytes, USE_DOT=use_dot, DOT_FP32=dot_fp32, DOT_DTYPE=dot_dtype,
        Q_RESCALE=dot_dtype == tl.float16 and q.dtype == torch.bfloat16, PIPELINE=not interp,
        PREFETCH=prefetch_rows, KV_FP8=fp8, NUM_KV_HEADS=num_kv_heads,
        num_warps=num_warps, num_stages=num_stages, maxnreg=max_registers)
    if num_splits > 1:
        splits_pad = triton.next_power_of_2(num_splits)
        K.paged_decode_combine_kernel[(B, Hq)](
            ws_acc, ws_ml, out, Hq, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_PAD=splits_pad, CHUNK=min(splits_pad, 16), HEAD_DIM=D,
            BLOCK_D=block_d, num_warps=4 if block_d <= 128 else 8)


def _dot_dtype(q_dtype: torch.dtype, fp8: bool, use_dot: bool, interp: bool):
    """(dtype the K/V tiles and q are converted to, whether the dots run in IEEE fp32).

    fp8 pages under bf16/fp16 q take fp16 dots: e4m3 converts to fp16 in one instruction per pair
    (to bf16 it went through fp16, two), and q is brought into fp16's range by a power of two
    (``_q_to_f16``). fp32 q, and bf16 under the interpreter (whose tl.dot multiplies bf16 bit
    patterns as integers in triton 3.6), take IEEE fp32 dots; the broadcast path (no tl.dot)
    widens fp8 tiles to fp32 directly."""
    if q_dtype == torch.float32 or (interp and q_dtype == torch.bfloat16 and not (fp8 and use_dot)):
        return tl.float32, True
    if fp8:
        return (tl.float16 if use_dot else tl.float32), False
    return (tl.bfloat16 if q_dtype == torch.bfloat16 else tl.float16), False


@_paged_decode_op.register_fake
def _(q, block_table, seq_lens, arena, handle_table, handle_kinds, out, workspace, layout, layer, scale, num_splits,
      block_tokens, num_warps, num_stages, use_dot, max_registers=None, kv_scale=None, prefetch_rows=True):
    return None


@torch.library.custom_op("avmp::kv_append", mutates_args=("arena",))
def _kv_append_op(k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor, token_req: torch.Tensor,
                  token_pos: torch.Tensor, arena: torch.Tensor, handle_table: torch.Tensor,
                  handle_kinds: torch.Tensor, layout: list[int], layer: int,
                  kv_scale: Optional[torch.Tensor] = None) -> None:
    """Validated inputs only (see ``kv_append``); writes into ``arena`` (quantised to
    float8_e4m3fn with ``kv_scale`` when given)."""
    page_tokens, num_kv_heads, head_dim, elem_bytes, s_layer, s_kv, s_head, s_token = layout
    T = k.shape[0]
    if T == 0:
        return
    _check_aligned(arena)
    fp8 = kv_scale is not None
    K.kv_append_kernel[(T,)](
        k, v, arena.view(FP8 if fp8 else k.dtype), handle_table, handle_kinds, block_table, token_req, token_pos,
        handle_table.numel(), block_table.shape[0], block_table.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), block_table.stride(0),
        layer * s_layer, s_kv, s_head, s_token, kv_scale if fp8 else token_pos,
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
        BLOCK_D=attn_block_d(head_dim), PAGE_TOKENS=page_tokens, ELEM_BYTES=elem_bytes, KV_FP8=fp8,
        ROUND_IN_FP32=fp8 and _triton_env.interpreter_active(), num_warps=4)


@_kv_append_op.register_fake
def _(k, v, block_table, token_req, token_pos, arena, handle_table, handle_kinds, layout, layer, kv_scale=None):
    return None


def paged_decode_attention(q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                           cache: PagedCache, *, layer: int, scale: float | None = None,
                           out: torch.Tensor | None = None, workspace: torch.Tensor | None = None,
                           max_seq_len: int | None = None, config: DecodeConfig | None = None,
                           kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of one query token per request over its KV pages in ``cache``.

    Args:
        q: ``[B, Hq, D]`` in the cache's ``kv_dtype`` (rows of D contiguous), or any of fp16, bf16 and
            fp32 over a float8_e4m3fn cache; ``Hq`` a multiple of Hkv; D a multiple of 8 in [16, 256]
            (of 16 for fp8), the layout's head dim.
        block_table: ``[B, W]`` int32 KV handles, -1 padded (rows contiguous).
        seq_lens: ``[B]`` int32 tokens per request (0 allowed: zero output row).
        cache: ``PagedCache.of(allocator)``.
        layer: attention layer, in ``[0, cache.num_attn_layers)``.
        scale: softmax scale, ``D ** -0.5`` by default.
        out: optional ``[B, Hq, D]`` output buffer of q's dtype.
        workspace: optional fp32 buffer of >= ``decode_workspace_numel(B, Hq, D, num_splits)`` elements
            (only used when num_splits > 1); by default a shared per-size scratch buffer.
        max_seq_len: upper bound of ``seq_lens`` used to pick num_splits (shape-based, no sync);
            default ``W * page_tokens``.
        config: a ``DecodeConfig``; its fields that are set override ``decode_config``'s table.
        kv_scale: ``[2, Hkv]`` fp32 scales of layer ``layer`` for a float8_e4m3fn cache (K row, V row:
            a stored element times its scale is the value); required for fp8, refused otherwise.
    Returns:
        ``out`` ``[B, Hq, D]`` in q's dtype.
    """
    dev = _check_q_like(q, "q", cache)
    B, Hq, D = q.shape
    layout = cache.kv_layout
    layer = check_layer(layer, cache.num_attn_layers, "attention")
    Hkv = layout.num_kv_heads
    if Hq < 1 or Hq % Hkv:
        raise ValueError(f"q has {Hq} heads, not a positive multiple of the layout's num_kv_heads={Hkv}")
    _check_block_table(block_table, B, dev)
    check_tensor(seq_lens, "seq_lens", dtypes=(torch.int32,), dim=1, device=dev, contiguous=True)
    if seq_lens.shape[0] != B:
        raise ValueError(f"seq_lens must have B={B} entries, got {seq_lens.shape[0]}")
    scale = _check_scale(scale, D)
    if max_seq_len is None:
        max_seq_len = block_table.shape[1] * layout.page_tokens
    elif not is_int(max_seq_len) or max_seq_len < 0:
        raise ValueError(f"max_seq_len must be a non-negative int, got {max_seq_len!r}")
    cfg = decode_config(batch=B, num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D, page_tokens=layout.page_tokens,
                        max_seq_len=max_seq_len, sm_count=sm_count(dev.index) if dev.type == "cuda" else DEFAULT_SM_COUNT,
                        kv_fp8=cache.kv_dtype == FP8, **config_overrides(config, DecodeConfig))
    _check_config(cfg, layout.page_tokens)
    out = _check_out(out, q)
    _check_workspace(workspace, decode_workspace_numel(B, Hq, D, cfg.num_splits), cfg.num_splits, dev)
    if on_host(block_table, seq_lens, cache.handle_table, cache.handle_kinds):
        check_block_table(block_table, seq_lens, layout.page_tokens)
        check_handles(live_pages(block_table, seq_lens, layout.page_tokens), cache.handle_table, cache.handle_kinds,
                      KIND_KV, "block_table", unique=False)
    kv_scale = check_kv_scale(kv_scale, cache, dev)
    torch.ops.avmp.paged_decode_attention(
        q, block_table, seq_lens, cache.arena, cache.handle_table, cache.handle_kinds, out, workspace,
        _layout_args(layout), layer, scale, cfg.num_splits, cfg.block_tokens, cfg.num_warps, cfg.num_stages,
        cfg.use_dot, cfg.max_registers, kv_scale, cfg.prefetch_rows)
    return out


def kv_append(k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor, token_req: torch.Tensor,
              token_pos: torch.Tensor, cache: PagedCache, *, layer: int,
              kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Write K and V of new tokens into their page slots of ``cache`` (attention layer ``layer``).

    Args:
        k, v: ``[T, Hkv, D]`` in the cache's ``kv_dtype`` (rows of D contiguous), or any of fp16,
            bf16 and fp32 for a float8_e4m3fn cache, which stores them divided by ``kv_scale`` and
            saturated to +-448; D as in ``paged_decode_attention``.
        block_table: ``[B, W]`` int32 KV handles, -1 padded.
        token_req: ``[T]`` int32 block-table row of each token; -1 = padding, skipped.
        token_pos: ``[T]`` int32 position of each token in its request: it goes to slot
            ``pos % page_tokens`` of page ``block_table[req, pos // page_tokens]``.
        cache, layer, kv_scale: as in ``paged_decode_attention``.
    Returns:
        ``cache.arena``, written in place.

    Tokens with an invalid row, a negative position, a position past the table width, a -1 handle,
    a handle outside the table, a free handle or an SSM handle are skipped on the device (nothing is
    written for them); with CPU-resident metadata the launcher raises instead, naming the value.
    Two tokens aimed at the same slot race: the written value is one of them.
    """
    dev = _check_q_like(k, "k", cache)
    check_tensor(v, "v", dtypes=(k.dtype,), dim=3, device=dev)
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if v.stride(2) != 1:
        raise ValueError(f"v must have contiguous rows (stride 1 over D), got strides {v.stride()}")
    T, Hkv, D = k.shape
    layout = cache.kv_layout
    layer = check_layer(layer, cache.num_attn_layers, "attention")
    if Hkv != layout.num_kv_heads:
        raise ValueError(f"k has {Hkv} kv heads, the layout {layout.num_kv_heads}")
    _check_block_table(block_table, None, dev)
    for name, t in (("token_req", token_req), ("token_pos", token_pos)):
        check_tensor(t, name, dtypes=(torch.int32,), dim=1, device=dev, contiguous=True)
        if t.shape[0] != T:
            raise ValueError(f"{name} must have T={T} entries (one per token), got {t.shape[0]}")
    if on_host(block_table, token_req, token_pos, cache.handle_table, cache.handle_kinds):
        _check_append_targets(block_table, token_req, token_pos, cache.handle_table, cache.handle_kinds,
                              layout.page_tokens)
    kv_scale = check_kv_scale(kv_scale, cache, dev)
    torch.ops.avmp.kv_append(k, v, block_table, token_req, token_pos, cache.arena, cache.handle_table,
                             cache.handle_kinds, _layout_args(layout), layer, kv_scale)
    return cache.arena


def _check_q_like(t, name: str, cache) -> torch.device:
    """q, k: ``[rows, heads, D]`` in the cache's KV dtype and head dim, on the cache's device."""
    layout = kv_cache_of(cache)
    dev = check_tensor(t, name, dtypes=SUPPORTED_DTYPES, dim=3, device=cache.device, beside="the cache")
    check_kernel_device(t, name)
    if t.dtype != cache.kv_dtype and cache.kv_dtype != FP8:
        raise TypeError(f"{name} must have the KV dtype {cache.kv_dtype}, got {t.dtype}")
    if t.stride(2) != 1:
        raise ValueError(f"{name} must have contiguous rows (stride 1 over D), got strides {t.stride()}")
    D = t.shape[2]
    check_attn_head_dim(D, name)
    if layout.head_dim != D:
        raise ValueError(f"{name} has head_dim {D}, the layout {layout.head_dim}")
    return dev


def _check_block_table(block_table, B, dev) -> None:
    check_tensor(block_table, "block_table", dtypes=(torch.int32,), dim=2, device=dev)
    if (B is not None and block_table.shape[0] != B) or block_table.shape[1] < 1 or block_table.stride(1) != 1:
        raise ValueError(f"block_table must be [B={'B' if B is None else B}, W>=1] with contiguous rows, got "
                         f"shape {tuple(block_table.shape)} strides {block_table.stride()}")


def _check_scale(scale, D: int) -> float:
    if scale is None:
        return D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    return float(scale)


def _check_out(out, q) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    check_tensor(out, "out", dtypes=(q.dtype,), dim=3, device=q.device)
    if out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must be [B, Hq, D]={list(q.shape)} with contiguous rows, got shape "
                         f"{tuple(out.shape)} strides {out.stride()}")
    return out


def _check_workspace(workspace, need: int, num_splits: int, dev) -> None:
    if workspace is None:
        return
    check_tensor(workspace, "workspace", dtypes=(torch.float32,), dim=1, device=dev, contiguous=True)
    if workspace.numel() < need:
        raise ValueError(f"workspace has {workspace.numel()} elements; num_splits={num_splits} needs {need}")


def _check_append_targets(block_table, token_req, token_pos, handle_table, handle_kinds, page_tokens) -> None:
    """Host check of CPU-resident append metadata: rows, positions and the pages they address."""
    B, W = block_table.shape
    for t, (r, p) in enumerate(zip(token_req.tolist(), token_pos.tolist())):
        if r == -1:
            continue
        if not 0 <= r < B:
            raise ValueError(f"token_req[{t}]={r} is not a block_table row (B={B}) or -1")
        if not 0 <= p < W * page_tokens:
            raise ValueError(f"token_pos[{t}]={p} is outside [0, {W * page_tokens}) (block_table width {W} x "
                             f"page_tokens {page_tokens})")
        check_handles(block_table[r, p // page_tokens], handle_table, handle_kinds, KIND_KV,
                      f"block_table[{r}, {p // page_tokens}] (token {t})", unique=False)


def _check_aligned(arena: torch.Tensor) -> None:
    # inside the ops, on real tensors: dynamo cannot trace data_ptr()
    if arena.data_ptr() % 16:
        raise ValueError(f"arena must start 16-byte aligned, its data pointer is {arena.data_ptr():#x}")


def _check_config(cfg: DecodeConfig, page_tokens: int) -> None:
    if not is_int(cfg.num_splits) or not 1 <= cfg.num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be an int in [1, {MAX_SPLITS}], got {cfg.num_splits!r}")
    p = cfg.pages_per_iter
    if not is_int(p) or p < 1 or p & (p - 1):
        raise ValueError(f"pages_per_iter must be a power of two, got {p!r}")
    if not isinstance(cfg.use_dot, bool):
        raise TypeError(f"use_dot must be a bool, got {cfg.use_dot!r}")
    if cfg.use_dot and cfg.block_tokens < 16:
        raise ValueError(f"use_dot needs >= 16 tokens per step: pages_per_iter={p} x page_tokens={page_tokens}")
    if cfg.num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {cfg.num_warps!r}")
    if not is_int(cfg.num_stages) or not 1 <= cfg.num_stages <= 8:
        raise ValueError(f"num_stages must be an int in [1, 8], got {cfg.num_stages!r}")
    r = cfg.max_registers
    if r is not None and (not is_int(r) or not 24 <= r <= 255):
        raise ValueError(f"max_registers must be None or an int in [24, 255], got {r!r}")
    if not isinstance(cfg.prefetch_rows, bool):
        raise TypeError(f"prefetch_rows must be a bool, got {cfg.prefetch_rows!r}")
