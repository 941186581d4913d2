"""Paged prefill / append attention (chunked prefill) reading K/V through resolved page offsets.

Every request b has ``q_len_b = cu_seqlens_q[b+1] - cu_seqlens_q[b]`` new query tokens, packed
into ``q [T, Hq, D]``, and a context of ``seq_lens[b]`` tokens whose last ``q_len_b`` are the new
ones (their K/V already appended to the pages). Query token i of request b sits at absolute
position ``seq_lens[b] - q_len_b + i`` and attends causally to positions ``<=`` its own.

K/V live in the arena, one KV page per handle (layout in ``avmp_triton/layout.py``)::

    page[layer][K|V][kv_head][token][head_dim]

Grid: ``(num_tiles, Hkv)``. One program takes one tile of ``BLOCK_Q`` query tokens of one
request and every query head of one KV head's group (GQA packing): its ``BLOCK_M`` rows are
``(token, head-in-group)`` pairs, so a K/V tile loaded once serves the whole group. Tiles are
numbered without a precomputed map: request b owns tiles ``[cu[b] // BLOCK_Q + b,
cu[b+1] // BLOCK_Q + b + 1)`` (at least ``cdiv(q_len_b, BLOCK_Q)`` of them), so
``num_tiles = T // BLOCK_Q + B`` bounds the grid from shapes alone and a program finds its request
by a binary search over ``cu_seqlens_q``; surplus tiles exit at once.

The pages come as a table of element offsets (``kernels/page_offsets.py``: block table -> handle
table -> kinds, done once a step for every attention layer), one load per page instead of three
dependent ones. KV is walked in steps of ``BLOCK_N`` positions (any power of two; each row finds its
own page, so BLOCK_N need not be a multiple of ``page_tokens``), each step resolving the next
block's pages: first the blocks every row of the tile may see (no causal mask), then the diagonal
blocks with the causal mask. Online softmax in fp32 with exp2. A page whose offset is -1 (its
handle -1, out of range, free or not a KV page), misaligned or leaves no whole page in the arena is
skipped (its scores are -inf, no byte of it is read); a row that sees nothing writes zeros; NaN in
q or K/V propagates to the output. Query rows outside ``[0, T)`` (a bad ``cu_seqlens_q``) are
skipped.

Head dims that are not powers of two run padded to ``BLOCK_D`` lanes, masked, and fp8 pages are
read as in decode (``kernels/paged_attention.py``).
"""
import triton
import triton.language as tl

from avmp_triton.kernels.handles import both
from avmp_triton.kernels.paged_attention import fp8_scales, row_mask

# whole pages a KV block may take as scalars (``_kv_block_unrolled``); more take a page tile
UNROLL_MAX = tl.constexpr(8)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton 3.6's interpreter multiplies bf16 operands as their raw uint16 bits
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _page_base(pages_row_ptr, i_pg, m_pg, max_page_off, ELEM_BYTES: tl.constexpr):
    """(usable, element offset of the page, 0 where not usable) of the row's pages ``i_pg`` where
    ``m_pg`` (scalar or block), from the resolved offsets."""
    off = tl.load(pages_row_ptr + i_pg, mask=m_pg, other=-1)
    # the table is the caller's data, not ours: an offset the 16-byte loads or the arena's end
    # cannot take is a missing page, not a fault
    ok = m_pg & (off >= 0) & (off <= max_page_off) & (off % (16 // ELEM_BYTES) == 0)
    return ok, tl.where(ok, off, 0)


@triton.jit
def _kv_block_unrolled(start, kv_end, pages_row_ptr, max_pages, max_page_off, stride_kv_token,
                       PAGE_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, ELEM_BYTES: tl.constexpr):
    """``_kv_block`` of a block of a few whole pages, each resolved as a scalar: the rows select
    their page's offset, the bits gather in a scalar, with no page tile to reshape or reduce
    across threads (a layout conversion and a barrier each step on sm_90; 1.03-1.10x faster at
    64 x 64, perf/results/sweep_prefill_variants_H100_c562f19.json)."""
    o_n = tl.arange(0, BLOCK_N)
    j_n = o_n // PAGE_TOKENS
    base = tl.zeros([BLOCK_N], dtype=tl.int64)
    pages = start * 0
    for j in tl.static_range(BLOCK_N // PAGE_TOKENS):
        i_pg = start // PAGE_TOKENS + j
        ok, off = _page_base(pages_row_ptr, i_pg, (i_pg * PAGE_TOKENS < kv_end) & (i_pg < max_pages), max_page_off,
                             ELEM_BYTES)
        base = tl.where(j_n == j, off, base)
        pages = pages | (ok.to(tl.int32) << j)
    m = (((pages >> j_n) & 1) != 0) & (start + o_n < kv_end)
    row = tl.where(m, base + ((o_n % PAGE_TOKENS) * stride_kv_token).to(tl.int64), 0)
    return tl.multiple_of(row, 16 // ELEM_BYTES), m, pages


@triton.jit
def _kv_block(start, kv_end, pages_row_ptr, max_pages, max_page_off, stride_kv_token, PAGE_TOKENS: tl.constexpr,
              BLOCK_N: tl.constexpr, ELEM_BYTES: tl.constexpr, PAGE_BITS: tl.constexpr):
    """The K rows of positions ``[start, start + BLOCK_N)``: (element offsets ``[BLOCK_N]`` int64 from
    the head's base, 0 where unreadable; the readable rows ``[BLOCK_N]``; the usable pages).

    Pages resolve once per page, not per row. The usable pages come back as bits (bit j: the
    block's j-th page, PAGE_BITS, at most 32 pages a block), so the scores' column mask is computed
    from the column index with no per-column data carried; else as the readable rows themselves.
    A block of 1 to UNROLL_MAX whole pages takes them one by one as scalars (``_kv_block_unrolled``)."""
    if BLOCK_N >= PAGE_TOKENS and BLOCK_N // PAGE_TOKENS <= UNROLL_MAX:
        return _kv_block_unrolled(start, kv_end, pages_row_ptr, max_pages, max_page_off, stride_kv_token,
                                  PAGE_TOKENS, BLOCK_N, ELEM_BYTES)
    if BLOCK_N >= PAGE_TOKENS:
        NUM_PAGES: tl.constexpr = BLOCK_N // PAGE_TOKENS
        o_pg = tl.arange(0, NUM_PAGES)
        i_pg = start // PAGE_TOKENS + o_pg
        m_pg = (i_pg * PAGE_TOKENS < kv_end) & (i_pg < max_pages)
        ok, off = _page_base(pages_row_ptr, i_pg, m_pg, max_page_off, ELEM_BYTES)
        o_tok = tl.arange(0, PAGE_TOKENS)
        m = ok[:, None] & (i_pg[:, None] * PAGE_TOKENS + o_tok[None, :] < kv_end)
        # a row's place inside its page is below the page's size: 32-bit, widened once
        row = off[:, None] + (o_tok * stride_kv_token).to(tl.int64)[None, :]
        if PAGE_BITS:
            # reduced from the [pages, tokens] tile that the rows come from: a reduction of ``ok``
            # alone (another layout) made the compiler load the page vectors twice. A page's first
            # row is readable iff the page is usable (pages past kv_end are not). Distinct powers
            # of two: the sum is their OR (bit 31 wraps to the sign, harmlessly)
            pages = tl.sum(tl.sum(tl.where(m & (o_tok[None, :] == 0), (1 << o_pg)[:, None], 0), 1), 0)
        row = tl.reshape(tl.where(m, row, 0), [BLOCK_N])
        m = tl.reshape(m, [BLOCK_N])
        if not PAGE_BITS:
            pages = m
    else:
        # part of one page (both are powers of two, so a block never straddles two)
        i_pg = start // PAGE_TOKENS
        ok, off = _page_base(pages_row_ptr, i_pg, (start < kv_end) & (i_pg < max_pages), max_page_off, ELEM_BYTES)
        o_tok = start % PAGE_TOKENS + tl.arange(0, BLOCK_N)
        m = both(start + tl.arange(0, BLOCK_N) < kv_end, ok)
        row = tl.where(m, off + (o_tok * stride_kv_token).to(tl.int64), 0)
        if PAGE_BITS:
            pages = ok.to(tl.int32)
        else:
            pages = m
    # units start on 16-byte boundaries (the allocator's UNIT_ALIGN) and rows are whole 16-byte
    # words (the launcher's head-dim rule): say so, or every K/V load is split into element-sized
    # accesses
    return tl.multiple_of(row, 16 // ELEM_BYTES), m, pages


@triton.jit
def _columns_usable(pages, o_n, start, PAGE_TOKENS: tl.constexpr, PAGE_BITS: tl.constexpr):
    """``[BLOCK_N]`` mask of the block's positions ``o_n`` whose page is usable (``_kv_block``)."""
    if PAGE_BITS:
        return ((pages >> ((o_n - start) // PAGE_TOKENS)) & 1) != 0
    else:
        return pages


@triton.jit
def _attn_block(
    acc, m_i, l_i, b_q, start, kv, q_pos, p_kv_head, stride_kv, qk_scale,
    PAGE_TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, KV_FP8: tl.constexpr,
    PAGE_BITS: tl.constexpr,
):
    """One ``BLOCK_N`` step of KV positions ``[start, start + BLOCK_N)`` (``kv``: its ``_kv_block``);
    CAUSAL on diagonal blocks. KV_FP8: the tiles convert to q's dtype (the scales are folded in by
    the caller). ``m_i`` is in scaled (base-2) units; the scores stay raw until the exponent, where
    the scale rides on the subtraction as one FMA (``qk_scale > 0``: the launcher's contract, so max
    and scale commute)."""
    row, m_row, pages = kv
    o_d = tl.arange(0, BLOCK_D)
    p_k = p_kv_head + row[:, None] + o_d[None, :]
    m_kv = row_mask(m_row, o_d, HEAD_DIM, BLOCK_D)
    b_k = tl.load(p_k, mask=m_kv, other=0.0)
    if KV_FP8:
        b_k = b_k.to(b_q.dtype)
    b_s = _dot(b_q, tl.trans(b_k), DOT_PRECISION, UPCAST)
    o_n = start + tl.arange(0, BLOCK_N)
    m_s = _columns_usable(pages, o_n, start, PAGE_TOKENS, PAGE_BITS)[None, :]
    if CAUSAL:
        m_s = m_s & (o_n[None, :] <= q_pos[:, None])
    b_s = tl.where(m_s, b_s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)
    # a row with nothing visible yet keeps m = -inf; subtract 0 then so exp2 never sees -inf - -inf
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    b_p = tl.exp2(b_s * qk_scale - m_use[:, None])
    l_i = l_i * alpha + tl.sum(b_p, 1)
    b_v = tl.load(p_k + stride_kv, mask=m_kv, other=0.0)
    if KV_FP8:
        b_v = b_v.to(b_q.dtype)
    acc = acc * alpha[:, None] + _dot(b_p.to(b_v.dtype), b_v, DOT_PRECISION, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _step(acc, m_i, l_i, nxt, b_q, start, kv_end, q_pos, pages, p_kv_head, stride_kv, qk_scale,
          PAGE_TOKENS: tl.constexpr, ELEM_BYTES: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
          BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
          KV_FP8: tl.constexpr, PAGE_BITS: tl.constexpr):
    """Block ``start`` of ``_attend``'s loop (its pages: ``nxt``); resolves the next one's into ``nxt``."""
    kv = nxt
    nxt = _kv_block(start + BLOCK_N, kv_end, *pages, PAGE_TOKENS, BLOCK_N, ELEM_BYTES, PAGE_BITS)
    acc, m_i, l_i = _attn_block(acc, m_i, l_i, b_q, start, kv, q_pos, p_kv_head, stride_kv, qk_scale, PAGE_TOKENS,
                                HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, DOT_PRECISION, UPCAST, KV_FP8, PAGE_BITS)
    return acc, m_i, l_i, nxt


@triton.jit
def _attend(
    acc, m_i, l_i, b_q, lo, hi, kv_end,
    q_pos, pages_row_ptr, max_pages, max_page_off, p_kv_head, stride_kv, stride_kv_token, qk_scale,
    PAGE_TOKENS: tl.constexpr, ELEM_BYTES: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    KV_FP8: tl.constexpr, PAGE_BITS: tl.constexpr, PIPELINE: tl.constexpr,
):
    """The blocks starting at ``lo, lo + BLOCK_N, ...`` below ``hi``.

    Each step resolves the next block's pages, so a block's K/V addresses come in from the
    previous iteration and the pipeliner sees plain loads (prefetched num_stages - 1 blocks ahead).
    Over resolved pages at 64 x 64 it matched resolving inside the step (381 vs 372 TFLOP/s at
    1x4096, equal elsewhere: sweep_prefill_variants_H100_c562f19); over handles it won 1.1-1.2x
    (sweep_prefill_variants_H100_2ea8c39), so one path, carried."""
    pages = (pages_row_ptr, max_pages, max_page_off, stride_kv_token)
    nxt = _kv_block(lo, kv_end, *pages, PAGE_TOKENS, BLOCK_N, ELEM_BYTES, PAGE_BITS)
    if PIPELINE:
        # scf.for loops get software-pipelined (num_stages); the interpreter cannot run a
        # runtime-bounded range, so it takes the while loop below
        for start in tl.range(lo, hi, BLOCK_N):
            acc, m_i, l_i, nxt = _step(acc, m_i, l_i, nxt, b_q, start, kv_end, q_pos, pages, p_kv_head, stride_kv,
                                       qk_scale, PAGE_TOKENS, ELEM_BYTES, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL,
                                       DOT_PRECISION, UPCAST, KV_FP8, PAGE_BITS)
    else:
        start = lo
        while start < hi:
            acc, m_i, l_i, nxt = _step(acc, m_i, l_i, nxt, b_q, start, kv_end, q_pos, pages, p_kv_head, stride_kv,
                                       qk_scale, PAGE_TOKENS, ELEM_BYTES, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL,
                                       DOT_PRECISION, UPCAST, KV_FP8, PAGE_BITS)
            start += BLOCK_N
    return acc, m_i, l_i


@triton.jit
def _tile_request(i_tile, cu_seqlens_q_ptr, num_seqs, BLOCK_Q: tl.constexpr):
    """Request of a tile: the largest b with cu[b] // BLOCK_Q + b <= i_tile (strictly increasing in b)."""
    lo = i_tile * 0
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        go = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid <= i_tile
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    return lo


@triton.jit
def _tile_rows(q_start, q_lo, q_len, prefix, i_kvh, num_tokens, GQA: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_Q: tl.constexpr):
    """A tile's rows are (token, head-in-group) pairs: (token row in q, q head, row mask, position
    in the context, -1 for a row that sees nothing). Rows outside q (a cu_seqlens_q past T or
    below 0) are neither read nor written."""
    o_m = tl.arange(0, BLOCK_M)
    i_qt = q_lo + o_m // GQA
    i_qh = i_kvh * GQA + o_m % GQA
    o_row = (q_start + i_qt).to(tl.int64)
    m_m = (o_m < BLOCK_Q * GQA) & (i_qt < q_len) & (o_row >= 0) & (o_row < num_tokens)
    q_pos = tl.where(m_m, prefix + i_qt, -1)
    return o_row, i_qh, m_m, q_pos


# sizes only compared against (never strides or offsets): specialising them on 1 or on multiples of
# 16 bought nothing and compiled the kernel again for every batch that changed their class
@triton.jit(do_not_specialize=["num_seqs", "max_pages", "max_page_off", "num_tokens"])
def paged_prefill_kernel(
    q_ptr,             # [T, Hq, D] fp16 / bf16 / fp32
    out_ptr,           # [T, Hq, D] same dtype as q (output)
    cu_seqlens_q_ptr,  # [B+1] int32 query token ranges
    seq_lens_ptr,      # [B] int32 context length including the new tokens
    pages_ptr,         # [B, W] int64 element offsets of the KV pages in kv (resolve_pages), -1 for none
    kv_ptr,            # arena viewed as the KV dtype (q's, or float8_e4m3fn)
    num_seqs, max_pages, max_page_off, num_tokens, stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_pages_b,    # max_page_off: the largest element offset with a whole page in the arena
    layer_off, stride_kv, stride_kv_head, stride_kv_token,   # layer_off: layer * stride_layer, in elements
    qk_scale, kv_scale_ptr,  # softmax scale * log2(e); [2, Hkv] fp32 scales of an fp8 cache (K, V rows)
    GQA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_TOKENS: tl.constexpr,
    ELEM_BYTES: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    PIPELINE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, KV_FP8: tl.constexpr,
    PAGE_BITS: tl.constexpr,
):
    # heaviest tiles (the last ones, furthest along the context) start first
    i_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    i_kvh = tl.program_id(1).to(tl.int64)
    qk_scale, v_scale = fp8_scales(qk_scale, kv_scale_ptr, i_kvh, NUM_KV_HEADS, KV_FP8)
    i_b = _tile_request(i_tile, cu_seqlens_q_ptr, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + i_b)
    q_len = tl.load(cu_seqlens_q_ptr + i_b + 1) - q_start
    q_lo = (i_tile - (q_start // BLOCK_Q + i_b)) * BLOCK_Q
    if q_lo >= q_len:
        return
    ctx_len = tl.load(seq_lens_ptr + i_b)
    prefix = ctx_len - q_len

    o_row, i_qh, m_m, q_pos = _tile_rows(q_start, q_lo, q_len, prefix, i_kvh, num_tokens, GQA, BLOCK_M, BLOCK_Q)
    o_d = tl.arange(0, BLOCK_D)
    m_md = row_mask(m_m, o_d, HEAD_DIM, BLOCK_D)
    p_q = q_ptr + o_row[:, None] * stride_q_t + i_qh[:, None] * stride_q_h + o_d[None, :]
    b_q = tl.load(p_q, mask=m_md, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    pages_row_ptr = pages_ptr + i_b.to(tl.int64) * stride_pages_b
    p_kv_head = kv_ptr + layer_off + i_kvh * stride_kv_head
    kv_end = prefix + tl.minimum(q_lo + BLOCK_Q, q_len)
    # every row of the tile sees positions <= prefix + q_lo: those blocks need no causal mask (one
    # loop masking every block, swept as split_diagonal=False, won only at 16 x 512 and lost at the
    # other cells: perf/results/sweep_prefill_variants_H100_2ea8c39.json)
    full_end = tl.maximum((prefix + q_lo + 1) // BLOCK_N * BLOCK_N, 0)
    args = (q_pos, pages_row_ptr, max_pages, max_page_off, p_kv_head, stride_kv, stride_kv_token, qk_scale)
    acc, m_i, l_i = _attend(acc, m_i, l_i, b_q, full_end * 0, full_end, kv_end, *args, PAGE_TOKENS, ELEM_BYTES,
                            HEAD_DIM, BLOCK_D, BLOCK_N, False, DOT_PRECISION, UPCAST_DOT, KV_FP8, PAGE_BITS,
                            PIPELINE)
    acc, m_i, l_i = _attend(acc, m_i, l_i, b_q, full_end, kv_end, kv_end, *args, PAGE_TOKENS, ELEM_BYTES,
                            HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_PRECISION, UPCAST_DOT, KV_FP8, PAGE_BITS,
                            PIPELINE)

    # a row that saw nothing has acc = 0 and l = 0: divide by 1. A NaN l (NaN in q or K/V) must
    # reach the output, as in decode, so no `l > 0` test here
    if KV_FP8:
        acc = acc * v_scale
    b_o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    p_o = out_ptr + o_row[:, None] * stride_o_t + i_qh[:, None] * stride_o_h + o_d[None, :]
    tl.store(p_o, b_o.to(out_ptr.dtype.element_ty), mask=m_md)
