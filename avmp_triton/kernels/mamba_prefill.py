"""Mamba prefill kernels: causal conv1d, Mamba1 and Mamba2 scans (each serial and chunked).

Every kernel runs over a variable-length packed chunk (``cu_seqlens``) and reads and writes each
request's state IN PLACE in its SSM block, resolved through the handle table on the device:

    block offset (bytes) = table[ssm_handles[b]]          (-1: no block)
    layer state          = block offset + state_off_bytes (SSMBlockLayout.ssm_offset/conv_offset)

and the state pointer is the arena viewed as the state dtype, so element index = byte offset /
ELEM_BYTES (blocks are 16-byte aligned, layer offsets a multiple of the element size).

Conventions shared by every kernel here:

- Program axis 0 is the request ``b`` in ``[0, B]``; ``b == B`` stands for the packed tail
  ``[cu_seqlens[B], T)`` (padding, e.g. for CUDA graphs), whose outputs are written as zeros.
- A request whose handle is -1, out of range, free, of the KV kind, or repeated within the call
  is skipped: its outputs are zeros and no byte of any unit is read or written (two rows on one
  state would race). On CPU-resident metadata the launchers raise instead (InvalidHandleError
  naming the position and handle; ValueError naming a bad cu_seqlens value).
- Any ``cu_seqlens`` is safe: each request's range is clamped to ``[0, T]`` (an end below its
  start makes it empty), so every load and store stays inside x, out and the request's own unit.
- ``has_initial_state[b] != 0`` starts from the block's state, else from zeros.
- Math in fp32; the state is stored back in its own dtype.
- Runtime loop bounds use ``while`` (the interpreter cannot run ``range`` over runtime bounds).
"""
import triton
import triton.language as tl

from avmp_triton.kernels.handles import KIND_SSM, REPEAT_BLOCK_MAX, both, first_rows, repeated, unit_offset


@triton.jit
def _request(i_b, B, T, cu_ptr, handles_ptr, init_ptr, table_ptr, kinds_ptr, num_handles, state_off_bytes,
             ELEM_BYTES: tl.constexpr, ALIGN: tl.constexpr, BLOCK_B: tl.constexpr):
    """(start, end, active, has_init, state element base) of request ``i_b`` (``B``: the tail).
    The base is a multiple of ALIGN elements (16-byte aligned units + the layer offset), which
    the compiler is told so that state rows load in wide vectors."""
    is_req = i_b < B
    start = tl.load(cu_ptr + tl.minimum(i_b, B))
    end = tl.load(cu_ptr + i_b + 1, mask=is_req, other=T)
    start = tl.minimum(tl.maximum(start, 0), T)       # defined behaviour on a bad cu_seqlens
    end = tl.minimum(tl.maximum(end, start), T)
    first = first_rows(handles_ptr, B, BLOCK_B)
    handle = tl.load(handles_ptr + i_b, mask=is_req, other=-1).to(tl.int64)
    live, blk = unit_offset(handle, is_req, table_ptr, kinds_ptr, num_handles, KIND_SSM)
    active = tl.where(repeated(handles_ptr, first, i_b, handle, B, BLOCK_B), False, live)
    flag = tl.load(init_ptr + i_b, mask=is_req, other=0).to(tl.int32)
    has_init = active & (flag != 0)
    base = tl.multiple_of((tl.where(active, blk, 0) + state_off_bytes) // ELEM_BYTES, ALIGN)
    return start, end, active, has_init, base


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus with threshold 20
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _conv_input_row(x_ptr, state_ptr, base, pos, start, end, has_init, stride_x_t, C, o_c, m_c, WIDTH: tl.constexpr):
    """Input row ``pos`` of a request's window, fp32 [BLOCK_C]: x inside the chunk, before it the
    block's conv state row (pos - start + WIDTH - 1) if it has one, else zeros (and zeros from
    ``end`` on: a worker with no tokens asks for rows past the request)."""
    row = pos - start + (WIDTH - 1)
    from_state = (pos < start) & has_init & (row >= 0)
    b_x = tl.load(x_ptr + pos.to(tl.int64) * stride_x_t + o_c, mask=both(m_c, (pos >= start) & (pos < end)), other=0.0)
    b_s = tl.load(state_ptr + base + row.to(tl.int64) * C + o_c, mask=both(m_c, from_state), other=0.0)
    return b_x.to(tl.float32) + b_s.to(tl.float32)


@triton.jit
def _conv_tile(x_ptr, t0, stop, o_l, o_c, m_c, stride_x_t):
    """x rows ``[t0, t0 + BLOCK_T)`` in x's dtype, zeros from ``stop`` on."""
    o_t = t0 + o_l
    return tl.load(x_ptr + o_t.to(tl.int64)[:, None] * stride_x_t + o_c[None, :],
                   mask=(o_t < stop)[:, None] & m_c[None, :], other=0.0)


@triton.jit
def _conv_taps(w_ptr, bias_ptr, o_c, m_c, stride_w_c, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Tap weights from the newest input back (taps past WIDTH are zero) and the bias, fp32."""
    w0 = tl.load(w_ptr + o_c * stride_w_c + (WIDTH - 1), mask=m_c, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + o_c * stride_w_c + (WIDTH - 2), mask=m_c & (WIDTH >= 2), other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + o_c * stride_w_c + (WIDTH - 3), mask=m_c & (WIDTH >= 3), other=0.0).to(tl.float32)
    w3 = tl.load(w_ptr + o_c * stride_w_c + (WIDTH - 4), mask=m_c & (WIDTH >= 4), other=0.0).to(tl.float32)
    b_bias = tl.zeros_like(w0)
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)
    return w0, w1, w2, w3, b_bias


@triton.jit
def causal_conv1d_prefill_kernel(
    x_ptr,            # [T, C] input (x, or x|B|C for Mamba2)
    w_ptr,            # [C, WIDTH]
    bias_ptr,         # [C] (unused without HAS_BIAS)
    out_ptr,          # [T, C] output, x's dtype
    state_ptr,        # arena viewed as the conv dtype; a layer's state is [WIDTH - 1, C]
    table_ptr,        # [H] int64 handle -> block byte offset, -1 free
    kinds_ptr,        # [H] int32 handle -> kind (0 free, 1 KV, 2 SSM)
    handles_ptr,      # [B] int32 SSM handle per request, -1 skip
    cu_ptr,           # [B + 1] int32 token ranges in the packed inputs
    init_ptr,         # [B] int32/bool start from the block's state
    T, C, B, num_handles,
    state_off_bytes,  # byte offset of this layer's conv state inside a block
    stride_x_t, stride_out_t, stride_w_c,
    WIDTH: tl.constexpr, BLOCK_W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    ELEM_BYTES: tl.constexpr, ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,    # handles scanned at a time for repeats
    STAGES: tl.constexpr,     # 2: the next token block is loaded before this one is computed and stored
):
    """Grid (B + 1, cdiv(C, BLOCK_C), WORKERS); WIDTH <= 4. Worker w of a request does an equal,
    contiguous span of its token blocks (a grid that does not grow with the longest request).

    A block's [BLOCK_T, BLOCK_C] inputs are loaded in one go, then a window of the last three rows
    slides over them, carried from block to block (only a span's first block reads rows before
    it). Row i is picked from the tile by a select-sum with a constant index; the token axis is
    in-thread, so it folds to register moves. Stores to ``out`` may alias ``x`` as far as the
    compiler knows, so no load moves above an earlier store: STAGES = 2 issues the next block's
    load before this block's stores.

    Only worker 0 touches the state: its first block holds the only tokens whose window reaches
    back before the chunk (BLOCK_T >= WIDTH - 1), and it writes the new state after a barrier, so
    no thread can read an overwritten row."""
    i_b = tl.program_id(0)
    i_c = tl.program_id(1)
    i_w = tl.program_id(2)
    workers = tl.num_programs(2)
    start, end, active, has_init, base = _request(i_b, B, T, cu_ptr, handles_ptr, init_ptr, table_ptr, kinds_ptr,
                                                  num_handles, state_off_bytes, ELEM_BYTES, ALIGN, BLOCK_B)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    o_l = tl.arange(0, BLOCK_T)
    w0, w1, w2, w3, b_bias = _conv_taps(w_ptr, bias_ptr, o_c, m_c, stride_w_c, WIDTH, HAS_BIAS)
    m_act = both(m_c, active)   # output lanes of an active request (others are written as zeros)

    span = tl.cdiv(tl.cdiv(end - start, BLOCK_T), workers) * BLOCK_T
    t0 = tl.minimum(start + i_w * span, end)
    stop = tl.minimum(t0 + span, end)
    h1 = _conv_input_row(x_ptr, state_ptr, base, t0 - 1, start, end, has_init, stride_x_t, C, o_c, m_c, WIDTH)
    h2 = _conv_input_row(x_ptr, state_ptr, base, t0 - 2, start, end, has_init, stride_x_t, C, o_c, m_c, WIDTH)
    h3 = _conv_input_row(x_ptr, state_ptr, base, t0 - 3, start, end, has_init, stride_x_t, C, o_c, m_c, WIDTH)
    if STAGES > 1:
        b_next = _conv_tile(x_ptr, t0, stop, o_l, o_c, m_c, stride_x_t)
    while t0 < stop:
        if STAGES > 1:
            b_tile = b_next.to(tl.float32)
            b_next = _conv_tile(x_ptr, t0 + BLOCK_T, stop, o_l, o_c, m_c, stride_x_t)
        else:
            b_tile = _conv_tile(x_ptr, t0, stop, o_l, o_c, m_c, stride_x_t).to(tl.float32)
        for i in tl.static_range(BLOCK_T):
            b_x = tl.sum(tl.where((o_l == i)[:, None], b_tile, -0.0), axis=0)   # -0.0: x + -0.0 == x
            acc = b_bias + w0 * b_x + w1 * h1 + w2 * h2 + w3 * h3
            if SILU:
                acc = _silu(acc)
            acc = tl.where(m_act, acc, 0.0)
            t = t0 + i
            tl.store(out_ptr + t.to(tl.int64) * stride_out_t + o_c, acc.to(out_ptr.dtype.element_ty),
                     mask=both(m_c, t < stop))
            h3 = h2
            h2 = h1
            h1 = b_x
        t0 += BLOCK_T

    if WIDTH > 1:
        _conv_write_state(x_ptr, state_ptr, base, start, end, active & (i_w == 0), has_init, stride_x_t, C,
                          o_c, m_c, WIDTH, BLOCK_W)


@triton.jit
def _conv_write_state(x_ptr, state_ptr, base, start, end, m_own, has_init, stride_x_t, C, o_c, m_c,
                      WIDTH: tl.constexpr, BLOCK_W: tl.constexpr):
    """New state row r = input (end - (WIDTH - 1) + r) of [old state ; chunk] (``m_own``: the
    program that owns the state)."""
    o_r = tl.arange(0, BLOCK_W)
    m_r = o_r < WIDTH - 1
    pos = end - (WIDTH - 1) + o_r
    m_x = both(m_r & (pos >= start), m_own)
    b_new = tl.load(x_ptr + pos.to(tl.int64)[:, None] * stride_x_t + o_c[None, :],
                    mask=m_x[:, None] & m_c[None, :], other=0.0).to(state_ptr.dtype.element_ty)
    row = pos - start + (WIDTH - 1)
    m_s = both(m_r & (pos < start), has_init & m_own)
    b_old = tl.load(state_ptr + base + row.to(tl.int64)[:, None] * C + o_c[None, :],
                    mask=m_s[:, None] & m_c[None, :], other=0.0)
    b_new = tl.where(m_s[:, None], b_old, b_new)
    tl.debug_barrier()  # every thread has read the old rows it needs
    tl.store(state_ptr + base + o_r.to(tl.int64)[:, None] * C + o_c[None, :], b_new,
             mask=both(m_r, m_own)[:, None] & m_c[None, :])


@triton.jit
def _mamba1_tile(A_ptr, D_ptr, dt_bias_ptr, state_ptr, base, has_init, i_d, D, N, stride_A_d,
                 HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """A Mamba1 program's channel block: offsets and masks, its A, D and dt_bias (fp32; zeros when
    absent) and its [BLOCK_D, N] state (fp32, zeros without an initial state) with the pointers."""
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    b_A = tl.load(A_ptr + o_d[:, None] * stride_A_d + o_n[None, :], mask=m_dn, other=0.0).to(tl.float32)
    b_D = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        b_D = tl.load(D_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_DT_BIAS:
        b_bias = tl.load(dt_bias_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    p_state = state_ptr + base + o_d.to(tl.int64)[:, None] * N + o_n[None, :]
    b_h = tl.load(p_state, mask=both(m_dn, has_init), other=0.0).to(tl.float32)
    return o_d, m_d, o_n, m_n, m_dn, b_A, b_D, b_bias, p_state, b_h


@triton.jit
def _mamba1_token(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, b_h, t, end, o_d, m_d, o_n, m_n, m_act, b_A, b_D,
                  b_bias, stride_x_t, stride_dt_t, stride_z_t, stride_B_t, stride_C_t,
                  HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr):
    """One token of the Mamba1 recurrence (none past ``end``: dt = 0 keeps the state); returns h
    and the token's output (zeros outside ``m_act``), which the caller stores."""
    m_t = t < end
    t64 = t.to(tl.int64)
    b_x = tl.load(x_ptr + t64 * stride_x_t + o_d, mask=both(m_d, m_t), other=0.0).to(tl.float32)
    b_dt = tl.load(dt_ptr + t64 * stride_dt_t + o_d, mask=both(m_d, m_t), other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        b_dt += b_bias
    if DT_SOFTPLUS:
        b_dt = _softplus(b_dt)
    b_dt = tl.where(m_t, b_dt, 0.0)
    b_B = tl.load(B_ptr + t64 * stride_B_t + o_n, mask=both(m_n, m_t), other=0.0).to(tl.float32)
    b_C = tl.load(C_ptr + t64 * stride_C_t + o_n, mask=both(m_n, m_t), other=0.0).to(tl.float32)
    b_h = b_h * tl.exp(b_dt[:, None] * b_A) + (b_dt * b_x)[:, None] * b_B[None, :]
    b_y = tl.sum(b_h * b_C[None, :], axis=1)
    if HAS_D:
        b_y += b_D * b_x
    if HAS_Z:
        b_z = tl.load(z_ptr + t64 * stride_z_t + o_d, mask=both(m_d, m_t), other=0.0).to(tl.float32)
        b_y *= _silu(b_z)
    return b_h, tl.where(m_act, b_y, 0.0)


@triton.jit
def mamba1_scan_prefill_kernel(
    x_ptr,            # [T, D]
    dt_ptr,           # [T, D]
    z_ptr,            # [T, D] (unused without HAS_Z)
    A_ptr,            # [D, N]
    B_ptr,            # [T, N]
    C_ptr,            # [T, N]
    D_ptr,            # [D] (unused without HAS_D)
    dt_bias_ptr,      # [D] (unused without HAS_DT_BIAS)
    out_ptr,          # [T, D] output, x's dtype
    state_ptr,        # arena viewed as the ssm dtype; a layer's state is [D, N]
    table_ptr, kinds_ptr, handles_ptr, cu_ptr, init_ptr,
    T, D, N, B, num_handles,
    state_off_bytes,
    stride_x_t, stride_dt_t, stride_z_t, stride_B_t, stride_C_t, stride_out_t, stride_A_d,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, ELEM_BYTES: tl.constexpr, ALIGN: tl.constexpr, BLOCK_B: tl.constexpr,
    UNROLL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B + 1, cdiv(D, BLOCK_D)): one program carries a [BLOCK_D, N] state through the
    request's tokens in registers. h = exp(dt A) h + dt x B;  y = h C + D x;  y *= silu(z).

    UNROLL tokens per loop step in straight-line code, their outputs gathered into one
    [UNROLL, BLOCK_D] tile stored at the end of the step. Stores to ``out`` may alias the inputs as
    far as the compiler knows, so no load moves above an earlier store: a store per token made
    every token wait a full memory round trip for its loads (~1.1 us a token, 4.5 ms for Jamba
    at 1 x 4096 on an H100, perf/results/sweep_mamba_prefill_H100_32e7231.log); with the store at
    the end, the step's loads depend on no store and one round trip serves UNROLL tokens."""
    i_b = tl.program_id(0)
    i_d = tl.program_id(1)
    start, end, active, has_init, base = _request(i_b, B, T, cu_ptr, handles_ptr, init_ptr, table_ptr, kinds_ptr,
                                                  num_handles, state_off_bytes, ELEM_BYTES, ALIGN, BLOCK_B)
    o_d, m_d, o_n, m_n, m_dn, b_A, b_D, b_bias, p_state, b_h = _mamba1_tile(
        A_ptr, D_ptr, dt_bias_ptr, state_ptr, base, has_init, i_d, D, N, stride_A_d, HAS_D, HAS_DT_BIAS,
        BLOCK_D, BLOCK_N)
    m_act = both(m_d, active)   # output lanes of an active request (others are written as zeros)
    o_u = tl.arange(0, UNROLL)

    t = start
    while t < end:
        b_ys = tl.zeros((UNROLL, BLOCK_D), tl.float32)
        for i in tl.static_range(UNROLL):
            b_h, b_y = _mamba1_token(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, b_h, t + i, end, o_d, m_d, o_n, m_n, m_act,
                                     b_A, b_D, b_bias, stride_x_t, stride_dt_t, stride_z_t, stride_B_t, stride_C_t,
                                     HAS_Z, HAS_D, HAS_DT_BIAS, DT_SOFTPLUS)
            b_ys = tl.where((o_u == i)[:, None], b_y[None, :], b_ys)
        o_t = t + o_u
        tl.store(out_ptr + o_t.to(tl.int64)[:, None] * stride_out_t + o_d[None, :], b_ys.to(out_ptr.dtype.element_ty),
                 mask=(o_t < end)[:, None] & m_d[None, :])
        t += UNROLL
    tl.store(p_state, b_h.to(state_ptr.dtype.element_ty), mask=both(m_dn, active))


@triton.jit
def _linear_recurrence(a1, b1, a2, b2):
    """Compose h -> a1 h + b1 (earlier) with h -> a2 h + b2 (later)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _mamba1_chunk_inputs(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, o_t, m_t, o_d, m_d, o_n, m_n,
                         stride_x_t, stride_dt_t, stride_z_t, stride_B_t, stride_C_t, HAS_Z: tl.constexpr):
    """Raw [L, BLOCK_D] x, dt, z and [L, BLOCK_N] B, C tiles of one chunk (masked rows: zeros)."""
    t64 = o_t.to(tl.int64)[:, None]
    m_td = m_t[:, None] & m_d[None, :]
    m_tn = m_t[:, None] & m_n[None, :]
    b_x = tl.load(x_ptr + t64 * stride_x_t + o_d[None, :], mask=m_td, other=0.0)
    b_dt = tl.load(dt_ptr + t64 * stride_dt_t + o_d[None, :], mask=m_td, other=0.0)
    b_z = b_x
    if HAS_Z:
        b_z = tl.load(z_ptr + t64 * stride_z_t + o_d[None, :], mask=m_td, other=0.0)
    b_B = tl.load(B_ptr + t64 * stride_B_t + o_n[None, :], mask=m_tn, other=0.0)
    b_C = tl.load(C_ptr + t64 * stride_C_t + o_n[None, :], mask=m_tn, other=0.0)
    return b_x, b_dt, b_z, b_B, b_C


@triton.jit
def mamba1_chunk_scan_prefill_kernel(
    x_ptr, dt_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, out_ptr,  # as the serial kernel
    state_ptr, table_ptr, kinds_ptr, handles_ptr, cu_ptr, init_ptr,
    T, D, N, B, num_handles,
    state_off_bytes,
    stride_x_t, stride_dt_t, stride_z_t, stride_B_t, stride_C_t, stride_out_t, stride_A_d,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, ELEM_BYTES: tl.constexpr, ALIGN: tl.constexpr, BLOCK_B: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Chunked Mamba1 selective scan: grid (B + 1, cdiv(D, BLOCK_D)), one program walks its
    request CHUNK tokens at a time with the [BLOCK_D, N] state in registers.

    Mamba1's decay exp(dt A) differs per (channel, state), so there is no matrix form as in
    Mamba2; instead each chunk's recurrence h_t = a_t h_{t-1} + b_t is solved for all of its
    tokens at once by a parallel prefix scan over [CHUNK, BLOCK_D, N] pairs (a, b), and
    h_t = A_t h_in + B_t. The next chunk's inputs are loaded before this chunk's math, so the
    memory latency overlaps the scan. Padded tokens get dt = 0: a = 1, b = 0, the state passes.
    """
    i_b = tl.program_id(0)
    i_d = tl.program_id(1)
    start, end, active, has_init, base = _request(i_b, B, T, cu_ptr, handles_ptr, init_ptr, table_ptr, kinds_ptr,
                                                  num_handles, state_off_bytes, ELEM_BYTES, ALIGN, BLOCK_B)
    o_d, m_d, o_n, m_n, m_dn, b_A, b_D, b_bias, p_state, b_h = _mamba1_tile(
        A_ptr, D_ptr, dt_bias_ptr, state_ptr, base, has_init, i_d, D, N, stride_A_d, HAS_D, HAS_DT_BIAS,
        BLOCK_D, BLOCK_N)
    m_act = both(m_d, active)   # output lanes of an active request (others are written as zeros)
    o_l = tl.arange(0, CHUNK)
    is_last = (o_l == CHUNK - 1)[:, None, None]

    o_t = start + o_l
    m_t = o_t < end
    b_x, b_dt, b_z, b_B, b_C = _mamba1_chunk_inputs(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, o_t, m_t, o_d, m_d, o_n,
                                                    m_n, stride_x_t, stride_dt_t, stride_z_t, stride_B_t,
                                                    stride_C_t, HAS_Z)
    c0 = start
    while c0 < end:
        # prefetch the next chunk (all-masked past the end)
        o_t_next = o_t + CHUNK
        m_t_next = o_t_next < end
        n_x, n_dt, n_z, n_B, n_C = _mamba1_chunk_inputs(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, o_t_next, m_t_next,
                                                        o_d, m_d, o_n, m_n, stride_x_t, stride_dt_t, stride_z_t,
                                                        stride_B_t, stride_C_t, HAS_Z)
        f_x = b_x.to(tl.float32)
        f_dt = b_dt.to(tl.float32)
        if HAS_DT_BIAS:
            f_dt += b_bias[None, :]
        if DT_SOFTPLUS:
            f_dt = _softplus(f_dt)
        f_dt = tl.where(m_t[:, None], f_dt, 0.0)
        b_a = tl.exp(f_dt[:, :, None] * b_A[None, :, :])                                    # [L, BD, N]
        b_b = (f_dt * f_x)[:, :, None] * b_B.to(tl.float32)[:, None, :]
        b_pa, b_pb = tl.associative_scan((b_a, b_b), 0, _linear_recurrence)
        b_hs = b_pa * b_h[None, :, :] + b_pb                                                 # h after each token
        b_y = tl.sum(b_hs * b_C.to(tl.float32)[:, None, :], axis=2)                          # [L, BD]
        if HAS_D:
            b_y += b_D[None, :] * f_x
        if HAS_Z:
            b_y *= _silu(b_z.to(tl.float32))
        b_y = tl.where(m_act[None, :], b_y, 0.0)
        tl.store(out_ptr + o_t.to(tl.int64)[:, None] * stride_out_t + o_d[None, :],
                 b_y.to(out_ptr.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])
        b_h = tl.sum(tl.where(is_last, b_hs, 0.0), axis=0)
        b_x, b_dt, b_z, b_B, b_C = n_x, n_dt, n_z, n_B, n_C
        o_t = o_t_next
        m_t = m_t_next
        c0 += CHUNK
    tl.store(p_state, b_h.to(state_ptr.dtype.element_ty), mask=both(m_dn, active))


@triton.jit
def _mamba2_tile(A_ptr, D_ptr, dt_bias_ptr, state_ptr, base, has_init, i_h, i_p, P, N,
                 HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """A Mamba2 program's [BLOCK_P, N] slice of head ``i_h``: offsets and masks, the head's A, D and
    dt_bias (fp32; zero when absent) and its state (fp32, zeros without an initial state) with the
    pointers."""
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < P
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < N
    m_pn = m_p[:, None] & m_n[None, :]
    b_A = tl.load(A_ptr + i_h).to(tl.float32)
    b_D = 0.0
    if HAS_D:
        b_D = tl.load(D_ptr + i_h).to(tl.float32)
    b_bias = 0.0
    if HAS_DT_BIAS:
        b_bias = tl.load(dt_bias_ptr + i_h).to(tl.float32)
    p_state = state_ptr + base + (i_h * P + o_p).to(tl.int64)[:, None] * N + o_n[None, :]
    b_h = tl.load(p_state, mask=both(m_pn, has_init), other=0.0).to(tl.float32)
    return o_p, m_p, o_n, m_n, m_pn, b_A, b_D, b_bias, p_state, b_h


@triton.jit
def mamba2_scan_prefill_kernel(
    x_ptr,            # [T, NH, P]
    dt_ptr,           # [T, NH]
    z_ptr,            # [T, NH, P] (unused without HAS_Z)
    A_ptr,            # [NH]
    B_ptr,            # [T, G, N]
    C_ptr,            # [T, G, N]
    D_ptr,            # [NH] (unused without HAS_D)
    dt_bias_ptr,      # [NH] (unused without HAS_DT_BIAS)
    out_ptr,          # [T, NH, P] output, x's dtype
    state_ptr,        # arena viewed as the ssm dtype; a layer's state is [NH, P, N]
    table_ptr, kinds_ptr, handles_ptr, cu_ptr, init_ptr,
    T, P, N, B, num_handles, heads_per_group,
    state_off_bytes,
    stride_x_t, stride_x_h, stride_dt_t, stride_z_t, stride_z_h, stride_B_t, stride_B_g,
    stride_C_t, stride_C_g, stride_out_t, stride_out_h,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, ELEM_BYTES: tl.constexpr, ALIGN: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Time-serial Mamba2 (SSD) scan. Grid (B + 1, NH, cdiv(P, BLOCK_P)); a [BLOCK_P, N] state
    slice of head h lives in registers. dA = exp(dt A_h);  h = dA h + dt x B^T;  y = h C + D x."""
    i_b = tl.program_id(0)
    i_h = tl.program_id(1)
    i_p = tl.program_id(2)
    start, end, active, has_init, base = _request(i_b, B, T, cu_ptr, handles_ptr, init_ptr, table_ptr, kinds_ptr,
                                                  num_handles, state_off_bytes, ELEM_BYTES, ALIGN, BLOCK_B)
    i_g = i_h // heads_per_group
    o_p, m_p, o_n, m_n, m_pn, b_A, b_D, b_bias, p_state, b_h = _mamba2_tile(
        A_ptr, D_ptr, dt_bias_ptr, state_ptr, base, has_init, i_h, i_p, P, N, HAS_D, HAS_DT_BIAS,
        BLOCK_P, BLOCK_N)
    m_act = both(m_p, active)   # output lanes of an active request (others are written as zeros)

    t = start
    while t < end:
        t64 = t.to(tl.int64)
        b_x = tl.load(x_ptr + t64 * stride_x_t + i_h * stride_x_h + o_p, mask=m_p, other=0.0).to(tl.float32)
        b_dt = tl.load(dt_ptr + t64 * stride_dt_t + i_h).to(tl.float32)
        if HAS_DT_BIAS:
            b_dt += b_bias
        if DT_SOFTPLUS:
            b_dt = _softplus(b_dt)
        b_B = tl.load(B_ptr + t64 * stride_B_t + i_g * stride_B_g + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_C = tl.load(C_ptr + t64 * stride_C_t + i_g * stride_C_g + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_h = b_h * tl.exp(b_dt * b_A) + (b_dt * b_x)[:, None] * b_B[None, :]
        b_y = tl.sum(b_h * b_C[None, :], axis=1)
        if HAS_D:
            b_y += b_D * b_x
        if HAS_Z:
            b_z = tl.load(z_ptr + t64 * stride_z_t + i_h * stride_z_h + o_p, mask=m_p, other=0.0).to(tl.float32)
            b_y *= _silu(b_z)
        b_y = tl.where(m_act, b_y, 0.0)
        tl.store(out_ptr + t64 * stride_out_t + i_h * stride_out_h + o_p, b_y.to(out_ptr.dtype.element_ty),
                 mask=m_p)
        t += 1
    tl.store(p_state, b_h.to(state_ptr.dtype.element_ty), mask=both(m_pn, active))


@triton.jit
def _chunk_decay(dt_ptr, o_t, m_t, stride_dt_t, i_h, b_bias, b_A, HAS_DT_BIAS: tl.constexpr,
                 DT_SOFTPLUS: tl.constexpr):
    """(dt, inclusive cumsum of dt A, its last value) of a chunk's tokens; dt = 0 past the end, so
    padded tokens neither decay the state nor feed it."""
    b_dt = tl.load(dt_ptr + o_t * stride_dt_t + i_h, mask=m_t, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        b_dt += b_bias
    if DT_SOFTPLUS:
        b_dt = _softplus(b_dt)
    b_dt = tl.where(m_t, b_dt, 0.0)
    b_cum = tl.cumsum(b_dt * b_A, axis=0)            # [L], non-increasing (A < 0)
    b_last = tl.sum(b_dt * b_A, axis=0)
    return b_dt, b_cum, b_last


@triton.jit
def _ssd_chunk_in(x_ptr, dt_ptr, B_ptr, c0, end, i_h, i_g, o_l, o_p, m_p, o_n, m_n, b_A, b_bias,
                  stride_x_t, stride_x_h, stride_dt_t, stride_B_t, stride_B_g,
                  HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr):
    """A chunk's token offsets and mask, its decay (``_chunk_decay``) and its x ``[L, BLOCK_P]`` and
    B ``[L, BLOCK_N]`` tiles (zeros past ``end``)."""
    o_t = (c0 + o_l).to(tl.int64)
    m_t = o_t < end
    b_dt, b_cum, b_last = _chunk_decay(dt_ptr, o_t, m_t, stride_dt_t, i_h, b_bias, b_A, HAS_DT_BIAS, DT_SOFTPLUS)
    b_x = tl.load(x_ptr + o_t[:, None] * stride_x_t + i_h * stride_x_h + o_p[None, :],
                  mask=m_t[:, None] & m_p[None, :], other=0.0)
    b_B = tl.load(B_ptr + o_t[:, None] * stride_B_t + i_g * stride_B_g + o_n[None, :],
                  mask=m_t[:, None] & m_n[None, :], other=0.0)
    return o_t, m_t, b_dt, b_cum, b_last, b_x, b_B


@triton.jit
def _ssd_state_step(b_h, b_x, b_B, b_dt, b_cum, b_last, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The state after a chunk: h exp(c_L) + sum_s exp(c_L - c_s) dt_s x_s B_s^T ([P,L] @ [L,N])."""
    b_w = tl.exp(b_last - b_cum) * b_dt                                          # [L]
    b_xw = (b_x.to(tl.float32) * b_w[:, None]).to(DOT_DTYPE)
    return b_h * tl.exp(b_last) + tl.dot(tl.trans(b_xw), b_B.to(DOT_DTYPE), input_precision=DOT_PRECISION)


@triton.jit
def _ssd_chunk_out(C_ptr, z_ptr, out_ptr, b_h, o_t, m_t, b_dt, b_cum, b_x, b_B, i_h, i_g, causal, o_p, m_p, o_n,
                   m_n, m_act, b_D, stride_z_t, stride_z_h, stride_C_t, stride_C_g, stride_out_t, stride_out_h,
                   HAS_Z: tl.constexpr, HAS_D: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """A chunk's outputs, stored (zeros outside ``m_act``), from the state ``b_h`` entering it:
        y_t = sum_{s<=t} (C_t . B_s) exp(c_t - c_s) dt_s x_s     (intra: [L,L] @ [L,P])
            + exp(c_t) C_t . h                                   (inter: [L,N] @ [N,P])
    The masked decay goes through exp, so nothing above the diagonal can overflow."""
    m_tp = m_t[:, None] & m_p[None, :]
    b_C = tl.load(C_ptr + o_t[:, None] * stride_C_t + i_g * stride_C_g + o_n[None, :],
                  mask=m_t[:, None] & m_n[None, :], other=0.0).to(DOT_DTYPE)
    b_cb = tl.dot(b_C, tl.trans(b_B.to(DOT_DTYPE)), input_precision=DOT_PRECISION)          # [L, L]
    b_seg = tl.where(causal, b_cum[:, None] - b_cum[None, :], float("-inf"))
    b_cb = b_cb * tl.exp(b_seg) * b_dt[None, :]
    b_y = tl.dot(b_cb.to(DOT_DTYPE), b_x.to(DOT_DTYPE), input_precision=DOT_PRECISION)      # [L, P]
    b_y += tl.dot(b_C, tl.trans(b_h).to(DOT_DTYPE), input_precision=DOT_PRECISION) * tl.exp(b_cum)[:, None]
    if HAS_D:
        b_y += b_D * b_x.to(tl.float32)
    if HAS_Z:
        b_z = tl.load(z_ptr + o_t[:, None] * stride_z_t + i_h * stride_z_h + o_p[None, :],
                      mask=m_tp, other=0.0).to(tl.float32)
        b_y *= _silu(b_z)
    b_y = tl.where(m_act[None, :], b_y, 0.0)
    tl.store(out_ptr + o_t[:, None] * stride_out_t + i_h * stride_out_h + o_p[None, :],
             b_y.to(out_ptr.dtype.element_ty), mask=m_tp)


@triton.jit
def _ssd_chunk(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, out_ptr, b_h, c0, end, i_h, i_g, o_l, causal, o_p, m_p, o_n, m_n,
               m_act, b_A, b_D, b_bias, stride_x_t, stride_x_h, stride_dt_t, stride_z_t, stride_z_h, stride_B_t,
               stride_B_g, stride_C_t, stride_C_g, stride_out_t, stride_out_h,
               HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
               LAST_STATE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Chunk ``[c0, c0 + CHUNK)`` of a walk ending at ``end``: its outputs stored from the entering
    state ``b_h``; returns the state after it (after the walk's last chunk only if LAST_STATE)."""
    o_t, m_t, b_dt, b_cum, b_last, b_x, b_B = _ssd_chunk_in(
        x_ptr, dt_ptr, B_ptr, c0, end, i_h, i_g, o_l, o_p, m_p, o_n, m_n, b_A, b_bias, stride_x_t, stride_x_h,
        stride_dt_t, stride_B_t, stride_B_g, HAS_DT_BIAS, DT_SOFTPLUS)
    _ssd_chunk_out(C_ptr, z_ptr, out_ptr, b_h, o_t, m_t, b_dt, b_cum, b_x, b_B, i_h, i_g, causal, o_p, m_p, o_n,
                   m_n, m_act, b_D, stride_z_t, stride_z_h, stride_C_t, stride_C_g, stride_out_t, stride_out_h,
                   HAS_Z, HAS_D, DOT_DTYPE, DOT_PRECISION)
    if LAST_STATE:
        b_h = _ssd_state_step(b_h, b_x, b_B, b_dt, b_cum, b_last, DOT_DTYPE, DOT_PRECISION)
    elif c0 + o_l.shape[0] < end:
        b_h = _ssd_state_step(b_h, b_x, b_B, b_dt, b_cum, b_last, DOT_DTYPE, DOT_PRECISION)
    return b_h


@triton.jit
def _ssd_walk(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, out_ptr, b_h, start, end, i_h, i_g, o_p, m_p, o_n, m_n, m_act,
              b_A, b_D, b_bias, stride_x_t, stride_x_h, stride_dt_t, stride_z_t, stride_z_h, stride_B_t, stride_B_g,
              stride_C_t, stride_C_g, stride_out_t, stride_out_h,
              HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
              LAST_STATE: tl.constexpr, CHUNK: tl.constexpr, STAGES: tl.constexpr, DOT_DTYPE: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """Tokens ``[start, end)`` CHUNK at a time from the state ``b_h`` (``_ssd_chunk``); returns the
    state after them (LAST_STATE) or before their last chunk.

    STAGES > 1 runs a counted loop that Triton's pipeliner software-pipelines, the next chunks'
    loads issued under this chunk's math (a while loop is never pipelined, and as stores to ``out``
    may alias the inputs as far as the compiler knows, there each chunk waits a memory round trip
    for its loads). The counted loop needs a scalar bound, which Triton 3.6's interpreter cannot
    loop to (it holds scalars as 1-element arrays): the launcher runs STAGES = 1 there."""
    o_l = tl.arange(0, CHUNK)
    causal = o_l[:, None] >= o_l[None, :]
    if STAGES > 1:
        for k in tl.range(0, tl.cdiv(end - start, CHUNK), num_stages=STAGES):
            b_h = _ssd_chunk(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, out_ptr, b_h, start + k * CHUNK, end, i_h, i_g, o_l,
                             causal, o_p, m_p, o_n, m_n, m_act, b_A, b_D, b_bias, stride_x_t, stride_x_h, stride_dt_t,
                             stride_z_t, stride_z_h, stride_B_t, stride_B_g, stride_C_t, stride_C_g, stride_out_t,
                             stride_out_h, HAS_Z, HAS_D, HAS_DT_BIAS, DT_SOFTPLUS, LAST_STATE, DOT_DTYPE,
                             DOT_PRECISION)
    else:
        c0 = start
        while c0 < end:
            b_h = _ssd_chunk(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, out_ptr, b_h, c0, end, i_h, i_g, o_l, causal, o_p,
                             m_p, o_n, m_n, m_act, b_A, b_D, b_bias, stride_x_t, stride_x_h, stride_dt_t, stride_z_t,
                             stride_z_h, stride_B_t, stride_B_g, stride_C_t, stride_C_g, stride_out_t, stride_out_h,
                             HAS_Z, HAS_D, HAS_DT_BIAS, DT_SOFTPLUS, LAST_STATE, DOT_DTYPE, DOT_PRECISION)
            c0 += CHUNK
    return b_h


@triton.jit
def mamba2_chunk_scan_prefill_kernel(
    x_ptr, dt_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, out_ptr,  # as the serial kernel
    state_ptr, table_ptr, kinds_ptr, handles_ptr, cu_ptr, init_ptr,
    T, P, N, B, num_handles, heads_per_group,
    state_off_bytes,
    stride_x_t, stride_x_h, stride_dt_t, stride_z_t, stride_z_h, stride_B_t, stride_B_g,
    stride_C_t, stride_C_g, stride_out_t, stride_out_h,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, ELEM_BYTES: tl.constexpr, ALIGN: tl.constexpr, BLOCK_B: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, STAGES: tl.constexpr,
):
    """Chunked Mamba2 (SSD) scan, fused: grid (B + 1, NH, cdiv(P, BLOCK_P)); one program walks its
    request CHUNK tokens at a time, the [BLOCK_P, N] state passed from chunk to chunk in registers
    (``_ssd_chunk_out``, ``_ssd_state_step``; a_t = dt_t A_h, c_t = sum_{s<=t} a_s). Padded tokens
    past the end get dt = 0: they neither decay the state nor feed it.
    The dot operands are cast to DOT_DTYPE (the inputs' dtype on GPU: tensor cores for bf16/fp16;
    fp32 in Triton's interpreter, whose tl.dot multiplies bf16 bit patterns as integers), fp32
    accumulation.
    """
    i_b = tl.program_id(0)
    i_h = tl.program_id(1)
    i_p = tl.program_id(2)
    start, end, active, has_init, base = _request(i_b, B, T, cu_ptr, handles_ptr, init_ptr, table_ptr, kinds_ptr,
                                                  num_handles, state_off_bytes, ELEM_BYTES, ALIGN, BLOCK_B)
    i_g = i_h // heads_per_group
    o_p, m_p, o_n, m_n, m_pn, b_A, b_D, b_bias, p_state, b_h = _mamba2_tile(
        A_ptr, D_ptr, dt_bias_ptr, state_ptr, base, has_init, i_h, i_p, P, N, HAS_D, HAS_DT_BIAS,
        BLOCK_P, BLOCK_N)
    m_act = both(m_p, active)   # output lanes of an active request (others are written as zeros)
    b_h = _ssd_walk(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, out_ptr, b_h, start, end, i_h, i_g, o_p, m_p, o_n, m_n, m_act,
                    b_A, b_D, b_bias, stride_x_t, stride_x_h, stride_dt_t, stride_z_t, stride_z_h, stride_B_t,
                    stride_B_g, stride_C_t, stride_C_g, stride_out_t, stride_out_h, HAS_Z, HAS_D, HAS_DT_BIAS,
                    DT_SOFTPLUS, True, CHUNK, STAGES, DOT_DTYPE, DOT_PRECISION)
    tl.store(p_state, b_h.to(state_ptr.dtype.element_ty), mask=both(m_pn, active))


@triton.jit
def _segments_in(cu_ptr, o_j, B, T, SEG):
    """Segments (of SEG tokens, the last one partial) of requests ``o_j`` (0 past B), their ranges
    clamped as ``_request`` clamps them."""
    m_j = o_j < B
    st = tl.load(cu_ptr + o_j, mask=m_j, other=0)
    en = tl.load(cu_ptr + o_j + 1, mask=m_j, other=0)
    st = tl.minimum(tl.maximum(st, 0), T)
    en = tl.minimum(tl.maximum(en, st), T)
    return tl.where(m_j, (en - st + SEG - 1) // SEG, 0)


@triton.jit
def _segment_hits(i_s, o_j, n, before):
    """(lowest request of ``o_j`` whose segments hold slot ``i_s``, or a large value; its segment
    index there, or 0): ``before`` segments precede the block, ``n`` are its requests' counts."""
    inc = tl.cumsum(n, 0) + before
    hit = (inc > i_s) & (inc - n <= i_s)
    return tl.min(tl.where(hit, o_j, 2147483647), 0), tl.sum(tl.where(hit, i_s - (inc - n), 0), 0)


@triton.jit
def _segment_of(i_s, cu_ptr, B, T, SEG, BLOCK_B: tl.constexpr):
    """(request b, segment k of it) that slot ``i_s`` serves, or b = B when no segment falls on it:
    the requests' segments take consecutive slots in request order (slot = segments of the earlier
    requests + k). Walks the batch in blocks of BLOCK_B as ``repeated`` does."""
    o_j = tl.arange(0, BLOCK_B)
    n = _segments_in(cu_ptr, o_j, B, T, SEG)
    b, k = _segment_hits(i_s, o_j, n, 0)
    if BLOCK_B >= REPEAT_BLOCK_MAX:
        before = tl.sum(n, 0)
        j0 = B * 0 + BLOCK_B
        while j0 < B:   # not range(): Triton 3.6's interpreter cannot loop to a runtime bound
            n = _segments_in(cu_ptr, j0 + o_j, B, T, SEG)
            b2, k2 = _segment_hits(i_s, j0 + o_j, n, before)
            b = tl.minimum(b, b2)
            k += k2
            before += tl.sum(n, 0)
            j0 += BLOCK_B
    return tl.minimum(b, B), k


@triton.jit
def _first_segment(i_b, cu_ptr, B, T, SEG, BLOCK_B: tl.constexpr):
    """(slot of request ``i_b``'s first segment, its segment count): segments of the requests before it."""
    o_j = tl.arange(0, BLOCK_B)
    n = _segments_in(cu_ptr, o_j, B, T, SEG)
    first = tl.sum(tl.where(o_j < i_b, n, 0), 0)
    count = tl.sum(tl.where(o_j == i_b, n, 0), 0)
    if BLOCK_B >= REPEAT_BLOCK_MAX:
        j0 = B * 0 + BLOCK_B
        while j0 < B:
            n = _segments_in(cu_ptr, j0 + o_j, B, T, SEG)
            first += tl.sum(tl.where(j0 + o_j < i_b, n, 0), 0)
            count += tl.sum(tl.where(j0 + o_j == i_b, n, 0), 0)
            j0 += BLOCK_B
    return first, count


@triton.jit
def _segment_range(i_s, S, cu_ptr, handles_ptr, init_ptr, table_ptr, kinds_ptr, B, T, num_handles, state_off_bytes,
                   SEG, ELEM_BYTES: tl.constexpr, ALIGN: tl.constexpr, BLOCK_B: tl.constexpr):
    """(first token, end, active) of slot ``i_s``'s segment; slot S is the packed tail (inactive),
    a slot no segment falls on gets an empty range."""
    i_b, k = _segment_of(i_s, cu_ptr, B, T, SEG, BLOCK_B)
    i_b = tl.where(i_s == S, B, i_b)
    start, end, active, has_init, base = _request(i_b, B, T, cu_ptr, handles_ptr, init_ptr, table_ptr, kinds_ptr,
                                                  num_handles, state_off_bytes, ELEM_BYTES, ALIGN, BLOCK_B)
    seg_start = tl.where(i_s == S, start, tl.minimum(start + k * SEG, end))
    seg_end = tl.where(i_s == S, end, tl.minimum(seg_start + SEG, end))
    seg_end = tl.where((i_b < B) | (i_s == S), seg_end, seg_start)
    return seg_start, seg_end, active


@triton.jit
def _ssd_local_chunk(x_ptr, dt_ptr, B_ptr, b_h, b_decay, c0, end, i_h, i_g, o_l, o_p, m_p, o_n, m_n, b_A, b_bias,
                     stride_x_t, stride_x_h, stride_dt_t, stride_B_t, stride_B_g, HAS_DT_BIAS: tl.constexpr,
                     DT_SOFTPLUS: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Pass 1's step over chunk ``[c0, c0 + CHUNK)``: (state after it, decay so far)."""
    o_t, m_t, b_dt, b_cum, b_last, b_x, b_B = _ssd_chunk_in(
        x_ptr, dt_ptr, B_ptr, c0, end, i_h, i_g, o_l, o_p, m_p, o_n, m_n, b_A, b_bias, stride_x_t, stride_x_h,
        stride_dt_t, stride_B_t, stride_B_g, HAS_DT_BIAS, DT_SOFTPLUS)
    return _ssd_state_step(b_h, b_x, b_B, b_dt, b_cum, b_last, DOT_DTYPE, DOT_PRECISION), b_decay + b_last


@triton.jit
def mamba2_segment_state_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, dt_bias_ptr,
    seg_state_ptr,    # [S, NH, P, N] fp32 out: the state each segment leaves when it starts from zeros
    seg_decay_ptr,    # [S, NH] fp32 out: sum of dt A over the segment
    table_ptr, kinds_ptr, handles_ptr, cu_ptr, init_ptr,
    T, P, N, B, S, NH, num_handles, heads_per_group,
    state_off_bytes, SEG,   # SEG: tokens per segment, a multiple of CHUNK
    stride_x_t, stride_x_h, stride_dt_t, stride_B_t, stride_B_g,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, ELEM_BYTES: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, STAGES: tl.constexpr,
):
    """Pass 1 of the segmented Mamba2 scan. Grid (S, NH, cdiv(P, BLOCK_P)): each slot's segment of
    one request, chunk by chunk from a zero state, in parallel over the segments of a request."""
    i_s = tl.program_id(0)
    i_h = tl.program_id(1)
    i_p = tl.program_id(2)
    seg_start, seg_end, active = _segment_range(i_s, S, cu_ptr, handles_ptr, init_ptr, table_ptr, kinds_ptr, B, T,
                                                num_handles, state_off_bytes, SEG, ELEM_BYTES, ALIGN, BLOCK_B)
    seg_end = tl.where(active, seg_end, seg_start)   # a skipped request's states are never read
    i_g = i_h // heads_per_group
    o_p, m_p, o_n, m_n, m_pn, b_A, b_D, b_bias, p_state, b_h = _mamba2_tile(
        A_ptr, A_ptr, dt_bias_ptr, seg_state_ptr, 0, False, i_h, i_p, P, N, False, HAS_DT_BIAS, BLOCK_P, BLOCK_N)
    o_l = tl.arange(0, CHUNK)
    b_decay = tl.sum(tl.zeros((CHUNK,), tl.float32), 0)
    if STAGES > 1:   # pipelined as in _ssd_walk
        for k in tl.range(0, tl.cdiv(seg_end - seg_start, CHUNK), num_stages=STAGES):
            b_h, b_decay = _ssd_local_chunk(x_ptr, dt_ptr, B_ptr, b_h, b_decay, seg_start + k * CHUNK, seg_end, i_h,
                                            i_g, o_l, o_p, m_p, o_n, m_n, b_A, b_bias, stride_x_t, stride_x_h,
                                            stride_dt_t, stride_B_t, stride_B_g, HAS_DT_BIAS, DT_SOFTPLUS, DOT_DTYPE,
                                            DOT_PRECISION)
    else:
        c0 = seg_start
        while c0 < seg_end:
            b_h, b_decay = _ssd_local_chunk(x_ptr, dt_ptr, B_ptr, b_h, b_decay, c0, seg_end, i_h, i_g, o_l, o_p, m_p,
                                            o_n, m_n, b_A, b_bias, stride_x_t, stride_x_h, stride_dt_t, stride_B_t,
                                            stride_B_g, HAS_DT_BIAS, DT_SOFTPLUS, DOT_DTYPE, DOT_PRECISION)
            c0 += CHUNK
    row = i_s.to(tl.int64) * NH + i_h
    tl.store(seg_state_ptr + row * P * N + o_p[:, None] * N + o_n[None, :], b_h, mask=m_pn)
    tl.store(seg_decay_ptr + row, b_decay, mask=i_p == 0)


@triton.jit
def mamba2_state_pass_kernel(
    seg_state_ptr,    # [S, NH, P, N] fp32: in, pass 1's local states; out, the state entering each segment
    seg_decay_ptr,    # [S, NH] fp32
    state_ptr, table_ptr, kinds_ptr, handles_ptr, cu_ptr, init_ptr,
    T, PN, B, S, NH, num_handles,
    state_off_bytes, SEG,
    ELEM_BYTES: tl.constexpr, ALIGN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Pass 2: grid (B + 1, NH, cdiv(P N, BLOCK_E)); program (b, h, e) walks request b's segments
    in order over BLOCK_E elements of head h's state (the recurrence is elementwise):
        h_in[0] = block state (or zeros);  h_in[k + 1] = exp(decay_k) h_in[k] + local_k,
    writes each h_in[k] over local_k and the final state into the block. Slots past S (only with a
    cu_seqlens whose ranges overlap) are not read or written."""
    i_b = tl.program_id(0)
    i_h = tl.program_id(1)
    i_e = tl.program_id(2)
    start, end, active, has_init, base = _request(i_b, B, T, cu_ptr, handles_ptr, init_ptr, table_ptr, kinds_ptr,
                                                  num_handles, state_off_bytes, ELEM_BYTES, ALIGN, BLOCK_B)
    first, count = _first_segment(i_b, cu_ptr, B, T, SEG, BLOCK_B)
    o_e = i_e * BLOCK_E + tl.arange(0, BLOCK_E)
    m_e = o_e < PN
    p_state = state_ptr + base + i_h.to(tl.int64) * PN + o_e
    b_h = tl.load(p_state, mask=both(m_e, has_init), other=0.0).to(tl.float32)
    last = tl.where(active, tl.minimum(first + count, S), first)
    slot = first
    while slot < last:
        row = slot.to(tl.int64) * NH + i_h
        p_seg = seg_state_ptr + row * PN + o_e
        b_local = tl.load(p_seg, mask=m_e, other=0.0)
        b_decay = tl.load(seg_decay_ptr + row)
        tl.store(p_seg, b_h, mask=m_e)
        b_h = b_h * tl.exp(b_decay) + b_local
        slot += 1
    tl.store(p_state, b_h.to(state_ptr.dtype.element_ty), mask=both(m_e, active))


@triton.jit
def mamba2_segment_scan_kernel(
    x_ptr, dt_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, out_ptr,  # as the fused kernel
    seg_state_ptr,    # [S, NH, P, N] fp32: the state entering each segment (pass 2)
    table_ptr, kinds_ptr, handles_ptr, cu_ptr, init_ptr,
    T, P, N, B, S, NH, num_handles, heads_per_group,
    state_off_bytes, SEG,
    stride_x_t, stride_x_h, stride_dt_t, stride_z_t, stride_z_h, stride_B_t, stride_B_g,
    stride_C_t, stride_C_g, stride_out_t, stride_out_h,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, ELEM_BYTES: tl.constexpr, ALIGN: tl.constexpr, BLOCK_B: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, STAGES: tl.constexpr,
):
    """Pass 3: grid (S + 1, NH, cdiv(P, BLOCK_P)); each slot's segment walked as the fused kernel
    walks a request, from the state pass 2 left for it; slot S writes the packed tail's zeros. The
    state after the segment's last chunk is pass 2's, so it is not computed here."""
    i_s = tl.program_id(0)
    i_h = tl.program_id(1)
    i_p = tl.program_id(2)
    seg_start, seg_end, active = _segment_range(i_s, S, cu_ptr, handles_ptr, init_ptr, table_ptr, kinds_ptr, B, T,
                                                num_handles, state_off_bytes, SEG, ELEM_BYTES, ALIGN, BLOCK_B)
    i_g = i_h // heads_per_group
    row = tl.minimum(i_s, S - 1).to(tl.int64) * NH + i_h
    o_p, m_p, o_n, m_n, m_pn, b_A, b_D, b_bias, p_state, b_h = _mamba2_tile(   # the tile adds (h P + p) N
        A_ptr, D_ptr, dt_bias_ptr, seg_state_ptr, (row - i_h) * P * N, active, i_h, i_p, P, N, HAS_D, HAS_DT_BIAS,
        BLOCK_P, BLOCK_N)
    m_act = both(m_p, active)
    _ssd_walk(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, out_ptr, b_h, seg_start, seg_end, i_h, i_g, o_p, m_p, o_n, m_n,
              m_act, b_A, b_D, b_bias, stride_x_t, stride_x_h, stride_dt_t, stride_z_t, stride_z_h, stride_B_t,
              stride_B_g, stride_C_t, stride_C_g, stride_out_t, stride_out_h, HAS_Z, HAS_D, HAS_DT_BIAS, DT_SOFTPLUS,
              False, CHUNK, STAGES, DOT_DTYPE, DOT_PRECISION)
