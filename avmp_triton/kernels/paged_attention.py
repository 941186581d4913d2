"""Paged decode attention (split-KV / flash-decoding) and KV append, reading KV pages in place.

Every kernel resolves its pages itself: ``block_table[b, i]`` is a KV handle, ``table[handle]``
its byte offset in the arena (see ``avmp_triton/memory/allocator.py``), and the page layout is the one of
``avmp_triton/layout.py``::

    page[layer][kv (0 = K, 1 = V)][kv_head][token][head_dim]      (elements of the KV dtype)

so the K (or V) rows of one (layer, kv head) of a page are a contiguous ``[PAGE_TOKENS, HEAD_DIM]``
tile. The arena pointer is the arena viewed as the KV dtype; byte offsets are turned into element
offsets (``off // ELEM_BYTES``) after the int64 load, never multiplied in 32 bits.

Head dims that are not powers of two (Zamba2's 160): the head-dim lanes run over ``BLOCK_D =
max(16, next_power_of_2(HEAD_DIM))``, since tl.arange needs a power of two and tl.dot at least 16;
lanes past HEAD_DIM are masked on every load and store (``row_mask``) and every stride stays in real
HEAD_DIM elements. The launchers take multiples of 8 only, so a row of HEAD_DIM elements is whole
16-byte words, which the ``tl.multiple_of`` hints below promise the compiler.

Sentinels: a -1 handle (block-table padding), a handle outside the table, a free handle or an
SSM handle (``kinds[h] != 1``) inside the live length of a request is *skipped* (its tokens are
masked out of the softmax, no byte of its unit is read), since the launcher cannot check device
data without a sync; a request whose every token is skipped (or whose seq_len is 0) gets a zero
output row. ``kv_append`` skips such tokens likewise (nothing is written for them).

fp8 pages (float8_e4m3fn, ``KV_FP8``): K and V of kv head h of a layer are stored divided by that
layer's scales ``kv_scale[0, h]`` and ``kv_scale[1, h]`` and saturated to +-448; decode converts
a loaded tile to DOT_DTYPE (fp16 for the dots under bf16/fp16 q: one conversion per pair of
elements, q brought into fp16's range by ``_q_to_f16``) and folds the scales into the scores (K)
and the output (V), one multiply each per program, since a program reads one kv head.

Decode grid: (B, Hkv, NUM_SPLITS). One program handles every q head of one kv head (the GQA
group, padded to GROUP_PAD rows), so each K/V page is read once per kv head, and walks its split's
tokens BLOCK_N at a time (whole pages, or part of one page when pages are larger than a step's
tile) with an fp32 online softmax (base 2, the scale folded into one multiply); with PREFETCH a
step's pages are resolved one step ahead (``_walk``). DOT_FP32 runs the tl.dot path in fp32
(IEEE): for fp32 q, and for bf16 under the interpreter, whose tl.dot multiplies bf16 bit patterns
as integers (triton 3.6). With NUM_SPLITS > 1 each split writes its unnormalised partial (acc,
max, sum) to an fp32 workspace and ``paged_decode_combine_kernel`` reduces them.
"""
import triton
import triton.language as tl

from avmp_triton.kernels.handles import KIND_KV, both, unit_offset

LOG2E = 1.4426950408889634
FP8_MAX = tl.constexpr(448.0)   # largest finite float8_e4m3fn


@triton.jit
def row_mask(m_rows, o_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[rows, BLOCK_D]`` mask of a tile of head-dim rows: the rows' own, and lanes < HEAD_DIM.

    A power-of-two head dim fills its lanes and keeps the row mask alone, so the kernels tuned on
    the H200 keep their PTX byte for byte (an always-on lane test, though folded, reorders it)."""
    if BLOCK_D == HEAD_DIM:
        return m_rows[:, None]
    else:
        return m_rows[:, None] & (o_d < HEAD_DIM)[None, :]


@triton.jit
def _kv_rows(i_b, tok0, end, lim, block_table_ptr, stride_bt_b, table_ptr, kinds_ptr, num_handles, head_off,
             stride_token, PAGE_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, ELEM_BYTES: tl.constexpr):
    """Element offsets (int64) of the K rows of tokens ``[tok0, tok0 + BLOCK_N)`` and the mask of
    readable ones. Handles resolve once per page, not per token (per token, the kind check cost 38
    registers a thread on sm_90). Both are powers of two, so a step is whole pages or part of one.

    The block-table and handle-table loads are bounded by ``lim`` (>= ``end``): an unsplit program
    passes the table's width, so its first step waits for no load before them (``end`` is the
    loaded seq_len), one dependent round trip less at the walk's start; split programs pass ``end``
    (their start waits on seq_len anyway, and the wider bound cost 13-27 registers on sm_90). Pages
    at or past ``end`` are masked at the token level, so no byte of their units is read."""
    if BLOCK_N >= PAGE_TOKENS:
        i_pg = tok0 // PAGE_TOKENS + tl.arange(0, BLOCK_N // PAGE_TOKENS).to(tl.int64)
        m_pg = i_pg * PAGE_TOKENS < lim
        h = tl.load(block_table_ptr + i_b * stride_bt_b + i_pg, mask=m_pg, other=-1).to(tl.int64)
        ok, off = unit_offset(h, m_pg, table_ptr, kinds_ptr, num_handles, KIND_KV)
        o_tok = tl.arange(0, PAGE_TOKENS).to(tl.int64)
        row = off[:, None] // ELEM_BYTES + head_off + o_tok[None, :] * stride_token
        m = ok[:, None] & (i_pg[:, None] * PAGE_TOKENS + o_tok[None, :] < end)
        row = tl.reshape(tl.where(m, row, 0), [BLOCK_N])
        m = tl.reshape(m, [BLOCK_N])
    else:
        m_pg = tok0 < lim
        h = tl.load(block_table_ptr + i_b * stride_bt_b + tok0 // PAGE_TOKENS, mask=m_pg, other=-1).to(tl.int64)
        ok, off = unit_offset(h, m_pg, table_ptr, kinds_ptr, num_handles, KIND_KV)
        o_tok = tok0 % PAGE_TOKENS + tl.arange(0, BLOCK_N).to(tl.int64)
        m = both(tok0 - tok0 % PAGE_TOKENS + o_tok < end, ok)
        row = tl.where(m, off // ELEM_BYTES + head_off + o_tok * stride_token, 0)
    # units are 16-byte aligned and every stride is a multiple of HEAD_DIM, whose rows are whole
    # 16-byte words (the launchers' head-dim rule): 16-byte vector loads
    row = tl.multiple_of(row, 16 // ELEM_BYTES)
    return row, m


@triton.jit
def _load_kv(arena_ptr, row, m, stride_kv, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """K and V tiles ``[BLOCK_N, BLOCK_D]`` of the rows ``row`` (masked by ``m``) in DOT_DTYPE."""
    o_d = tl.arange(0, BLOCK_D)
    p_k = arena_ptr + (row[:, None] + o_d[None, :])
    m_kv = row_mask(m, o_d, HEAD_DIM, BLOCK_D)
    b_k = tl.load(p_k, mask=m_kv, other=0.0).to(DOT_DTYPE)
    b_v = tl.load(p_k + stride_kv, mask=m_kv, other=0.0).to(DOT_DTYPE)
    return b_k, b_v


@triton.jit
def _softmax_step(q, b_k, b_v, m, m_i, l_i, acc, qk_scale, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
    """One online-softmax step of ``q`` over the tile's tokens (``m``: readable ones)."""
    if USE_DOT:
        if DOT_FP32:
            s = tl.dot(q, tl.trans(b_k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(b_k))                                  # [GROUP_PAD, BLOCK_N] fp32
    else:
        s = tl.sum(q.to(tl.float32)[:, None, :] * b_k.to(tl.float32)[None, :, :], 2)
    s = tl.where(m[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row that has seen no readable token yet keeps max -inf: shift by 0 so exp2 gives 0, not NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if USE_DOT:
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, b_v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v)
    else:
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * b_v.to(tl.float32)[None, :, :], 1)
    return m_new, l_i, acc


@triton.jit
def fp8_scales(qk_scale, kv_scale_ptr, i_kvh, NUM_KV_HEADS: tl.constexpr, KV_FP8: tl.constexpr):
    """(score scale, output scale) of a program's kv head: an fp8 cache's K scale folds into the
    scores and its V scale into the output; (qk_scale, 1) otherwise."""
    if KV_FP8:
        return qk_scale * tl.load(kv_scale_ptr + i_kvh), tl.load(kv_scale_ptr + NUM_KV_HEADS + i_kvh)
    else:
        return qk_scale, 1.0


@triton.jit
def _q_to_f16(q):
    """``q`` (bf16) times a power of two that brings its largest magnitude to [2^14, 2^15), in fp16,
    and the inverse power to fold into the score scale. Exact for every element within 2^-31 of
    the largest (fp16 keeps bf16's 8 significant bits over that range); inf and NaN stay."""
    amax = tl.max(tl.max(tl.abs(q.to(tl.float32)), 1), 0)
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127     # amax's binary exponent
    k = tl.minimum(tl.maximum(14 - e, -64), 64)
    up = ((127 + k) << 23).to(tl.float32, bitcast=True)
    down = ((127 - k) << 23).to(tl.float32, bitcast=True)
    return (q.to(tl.float32) * up).to(tl.float16), down


@triton.jit
def _walk(q, start, end, lim, i_b, arena_ptr, block_table_ptr, stride_bt_b, table_ptr, kinds_ptr, num_handles,
          head_off, stride_kv, stride_token, qk_scale, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
          BLOCK_D: tl.constexpr, PAGE_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, ELEM_BYTES: tl.constexpr,
          USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, DOT_DTYPE: tl.constexpr, PIPELINE: tl.constexpr,
          PREFETCH: tl.constexpr):
    """The online softmax over tokens ``[start, end)``: (max, sum, unnormalised acc) per q row.

    PREFETCH resolves the next step's rows while this step's K/V are read, so the rows reach the
    K/V loads through the loop's carried values: Triton's pipeliner then sees K/V loads with no
    load before them (it spends stages on each level of load-to-load chain, and with the block
    table -> handle table -> K/V chain in the same step it gave K/V one shared-memory buffer)."""
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    row, m = _kv_rows(i_b, start, end, lim, block_table_ptr, stride_bt_b, table_ptr, kinds_ptr, num_handles, head_off,
                      stride_token, PAGE_TOKENS, BLOCK_N, ELEM_BYTES)
    if PIPELINE:
        # compiled: a counted loop, which Triton software-pipelines (num_stages)
        n_iters = tl.cdiv(tl.maximum(end - start, 0), BLOCK_N)
        for it in tl.range(0, n_iters):
            tok0 = start + it * BLOCK_N
            if not PREFETCH:
                row, m = _kv_rows(i_b, tok0, end, lim, block_table_ptr, stride_bt_b, table_ptr, kinds_ptr, num_handles,
                                  head_off, stride_token, PAGE_TOKENS, BLOCK_N, ELEM_BYTES)
            b_k, b_v = _load_kv(arena_ptr, row, m, stride_kv, HEAD_DIM, BLOCK_D, DOT_DTYPE)
            m_i, l_i, acc = _softmax_step(q, b_k, b_v, m, m_i, l_i, acc, qk_scale, USE_DOT, DOT_FP32)
            if PREFETCH:
                row, m = _kv_rows(i_b, tok0 + BLOCK_N, end, lim, block_table_ptr, stride_bt_b, table_ptr, kinds_ptr,
                                  num_handles, head_off, stride_token, PAGE_TOKENS, BLOCK_N, ELEM_BYTES)
    else:
        # the interpreter cannot run range() over loaded bounds
        tok0 = start
        while tok0 < end:
            b_k, b_v = _load_kv(arena_ptr, row, m, stride_kv, HEAD_DIM, BLOCK_D, DOT_DTYPE)
            m_i, l_i, acc = _softmax_step(q, b_k, b_v, m, m_i, l_i, acc, qk_scale, USE_DOT, DOT_FP32)
            tok0 += BLOCK_N
            row, m = _kv_rows(i_b, tok0, end, lim, block_table_ptr, stride_bt_b, table_ptr, kinds_ptr, num_handles,
                              head_off, stride_token, PAGE_TOKENS, BLOCK_N, ELEM_BYTES)
    return m_i, l_i, acc


@triton.jit
def paged_decode_kernel(
    q_ptr,            # [B, Hq, D] KV dtype, rows of D contiguous
    arena_ptr,        # [N] KV dtype: the arena viewed as the KV element type
    table_ptr,        # [H] int64 handle -> byte offset, -1 when free
    kinds_ptr,        # [H] int32 handle -> kind (1 = KV page)
    block_table_ptr,  # [B, W] int32 KV handles, -1 padded
    seq_lens_ptr,     # [B] int32
    out_ptr,          # [B, Hq, D] KV dtype (written when NUM_SPLITS == 1)
    ws_acc_ptr,       # [B, Hq, NUM_SPLITS, D] fp32 partial numerators (NUM_SPLITS > 1), D = HEAD_DIM
    ws_ml_ptr,        # [B, Hq, NUM_SPLITS, 2] fp32 partial (max, sum), base-2 max
    num_handles, W, num_q_heads,
    stride_q_b, stride_q_h, stride_o_b, stride_o_h, stride_bt_b,
    layer_off,        # layer * stride_layer (elements)
    stride_kv, stride_head, stride_token,
    qk_scale,         # softmax scale * log2(e)
    kv_scale_ptr,     # [2, Hkv] fp32 dequantisation scales of an fp8 cache (K row, V row); unused otherwise
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, ELEM_BYTES: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, DOT_DTYPE: tl.constexpr, Q_RESCALE: tl.constexpr,
    PIPELINE: tl.constexpr, PREFETCH: tl.constexpr, KV_FP8: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_kvh = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2).to(tl.int64)
    qk_scale, v_scale = fp8_scales(qk_scale, kv_scale_ptr, i_kvh, NUM_KV_HEADS, KV_FP8)
    # a seq_len past the block table cannot be checked on the host without a sync: clamp it
    seq_len = tl.load(seq_lens_ptr + i_b).to(tl.int64)
    seq_len = tl.minimum(tl.maximum(seq_len, 0), W * PAGE_TOKENS)

    o_g = tl.arange(0, GROUP_PAD)
    m_g = o_g < GROUP
    i_hq = i_kvh * GROUP + o_g
    o_d = tl.arange(0, BLOCK_D)
    m_gd = row_mask(m_g, o_d, HEAD_DIM, BLOCK_D)
    q = tl.load(q_ptr + i_b * stride_q_b + i_hq[:, None] * stride_q_h + o_d[None, :], mask=m_gd, other=0.0)
    if Q_RESCALE:
        q, q_unscale = _q_to_f16(q)
        qk_scale = qk_scale * q_unscale
    q = q.to(DOT_DTYPE)

    if NUM_SPLITS == 1:
        start = i_b * 0      # not seq_len * 0: the first step's handle loads wait on no load
        end = seq_len
        lim = W * PAGE_TOKENS
    else:
        # splits of one request get equal whole blocks of its own length (balanced per request)
        per = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = i_s * per
        end = tl.minimum(start + per, seq_len)
        lim = end
    head_off = layer_off + i_kvh * stride_head

    m_i, l_i, acc = _walk(q, start, end, lim, i_b, arena_ptr, block_table_ptr, stride_bt_b, table_ptr, kinds_ptr,
                          num_handles, head_off, stride_kv, stride_token, qk_scale, GROUP_PAD, HEAD_DIM, BLOCK_D,
                          PAGE_TOKENS, BLOCK_N, ELEM_BYTES, USE_DOT, DOT_FP32, DOT_DTYPE, PIPELINE, PREFETCH)
    if KV_FP8:
        acc = acc * v_scale
    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + i_b * stride_o_b + i_hq[:, None] * stride_o_h + o_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=m_gd)
    else:
        i_row = (i_b * num_q_heads + i_hq) * NUM_SPLITS + i_s             # [GROUP_PAD]
        tl.store(ws_acc_ptr + i_row[:, None] * HEAD_DIM + o_d[None, :], acc, mask=m_gd)
        tl.store(ws_ml_ptr + i_row * 2, m_i, mask=m_g)
        tl.store(ws_ml_ptr + i_row * 2 + 1, l_i, mask=m_g)


@triton.jit
def paged_decode_combine_kernel(
    ws_acc_ptr,       # [B, Hq, NUM_SPLITS, D] fp32
    ws_ml_ptr,        # [B, Hq, NUM_SPLITS, 2] fp32
    out_ptr,          # [B, Hq, D] KV dtype
    num_q_heads, stride_o_b, stride_o_h,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s; 0 where nothing was read."""
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_row = (i_b * num_q_heads + i_h) * NUM_SPLITS
    o_s = tl.arange(0, SPLITS_PAD)
    m_s = o_s < NUM_SPLITS
    b_m = tl.load(ws_ml_ptr + (i_row + o_s) * 2, mask=m_s, other=float("-inf"))
    b_l = tl.load(ws_ml_ptr + (i_row + o_s) * 2 + 1, mask=m_s, other=0.0)
    m_max = tl.max(b_m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_sum = tl.sum(tl.exp2(b_m - m_max) * b_l, 0)
    o_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c in tl.static_range(SPLITS_PAD // CHUNK):
        o_c = c * CHUNK + tl.arange(0, CHUNK)
        m_c = o_c < NUM_SPLITS
        w = tl.exp2(tl.load(ws_ml_ptr + (i_row + o_c) * 2, mask=m_c, other=float("-inf")) - m_max)
        b_a = tl.load(ws_acc_ptr + (i_row + o_c)[:, None] * HEAD_DIM + o_d[None, :],
                      mask=row_mask(m_c, o_d, HEAD_DIM, BLOCK_D), other=0.0)
        acc += tl.sum(w[:, None] * b_a, 0)
    o = acc / tl.where(l_sum > 0, l_sum, 1.0)
    p_o = out_ptr + i_b * stride_o_b + i_h * stride_o_h + o_d
    if BLOCK_D == HEAD_DIM:
        tl.store(p_o, o.to(out_ptr.dtype.element_ty))
    else:
        tl.store(p_o, o.to(out_ptr.dtype.element_ty), mask=o_d < HEAD_DIM)


@triton.jit
def kv_append_kernel(
    k_ptr,            # [T, Hkv, D] KV dtype, rows of D contiguous
    v_ptr,            # [T, Hkv, D] KV dtype, rows of D contiguous
    arena_ptr,        # [N] KV dtype: the arena viewed as the KV element type (written)
    table_ptr,        # [H] int64 handle -> byte offset, -1 when free
    kinds_ptr,        # [H] int32 handle -> kind (1 = KV page)
    block_table_ptr,  # [B, W] int32 KV handles, -1 padded
    token_req_ptr,    # [T] int32 block-table row of each token, -1 = skip
    token_pos_ptr,    # [T] int32 position of each token in its request
    num_handles, B, W,
    stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_bt_b,
    layer_off, stride_kv, stride_head, stride_token,
    kv_scale_ptr,     # [2, Hkv] fp32 scales of an fp8 cache (K row, V row); unused otherwise
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_TOKENS: tl.constexpr, ELEM_BYTES: tl.constexpr, KV_FP8: tl.constexpr, ROUND_IN_FP32: tl.constexpr,
):
    """Token ``pid`` -> slot ``pos % PAGE_TOKENS`` of page ``block_table[req, pos // PAGE_TOKENS]``,
    all kv heads, K and V of layer ``layer``. Tokens whose row, position, handle or table entry is
    invalid (-1 or out of range) are skipped."""
    i_t = tl.program_id(0).to(tl.int64)
    req = tl.load(token_req_ptr + i_t).to(tl.int64)
    pos = tl.load(token_pos_ptr + i_t).to(tl.int64)
    i_page = pos // PAGE_TOKENS
    ok = (req >= 0) & (req < B) & (pos >= 0) & (i_page < W)
    h = tl.load(block_table_ptr + req * stride_bt_b + i_page, mask=ok, other=-1).to(tl.int64)
    ok, off = unit_offset(h, ok, table_ptr, kinds_ptr, num_handles, KIND_KV)
    base = off // ELEM_BYTES + layer_off + (pos % PAGE_TOKENS) * stride_token
    o_h = tl.arange(0, HEADS_PAD)
    o_d = tl.arange(0, BLOCK_D)
    m = both((o_h < NUM_KV_HEADS)[:, None] & (o_d < HEAD_DIM)[None, :], ok)
    b_k = tl.load(k_ptr + i_t * stride_k_t + o_h[:, None] * stride_k_h + o_d[None, :], mask=m)
    b_v = tl.load(v_ptr + i_t * stride_v_t + o_h[:, None] * stride_v_h + o_d[None, :], mask=m)
    if KV_FP8:
        m_h = o_h < NUM_KV_HEADS
        b_k = _quantize(b_k, tl.load(kv_scale_ptr + o_h, mask=m_h, other=1.0), arena_ptr.dtype.element_ty,
                        ROUND_IN_FP32)
        b_v = _quantize(b_v, tl.load(kv_scale_ptr + NUM_KV_HEADS + o_h, mask=m_h, other=1.0),
                        arena_ptr.dtype.element_ty, ROUND_IN_FP32)
    p_dst = arena_ptr + (base + o_h[:, None] * stride_head + o_d[None, :])
    tl.store(p_dst, b_k, mask=m)
    tl.store(p_dst + stride_kv, b_v, mask=m)


@triton.jit
def _quantize(x, scale, dtype: tl.constexpr, ROUND_IN_FP32: tl.constexpr):
    """``x / scale`` per row (kv head), saturated to e4m3's finite range (+-448), in ``dtype``.
    NaN stays NaN. ROUND_IN_FP32 (the interpreter, whose fp8 conversion in triton 3.6 keeps the
    exponent when the mantissa rounds up: 1.97 becomes 1.0): round to the e4m3 grid first
    (nearest, ties to even, by adding and subtracting 1.5 * 2^23 in fp32), so the conversion only
    has exact values to store."""
    y = _saturate(x.to(tl.float32) / scale[:, None])
    if ROUND_IN_FP32:
        step = tl.exp2(tl.floor(tl.log2(tl.maximum(tl.abs(y), 0.015625))) - 3.0)   # 2^-9 below 2^-6
        y = _saturate(((y / step + 12582912.0) - 12582912.0) * step)
        # nor does that conversion keep NaN: store e4m3's NaN bits (0x7f) for it
        nan = tl.full(y.shape, 0x7F, tl.uint8).to(dtype, bitcast=True)
        return tl.where(y != y, nan, y.to(dtype))
    return y.to(dtype)


@triton.jit
def _saturate(y):
    """``y`` clamped to +-448 with NaN kept (GPU min/max would turn it into a bound)."""
    return tl.clamp(y, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
