"""Decode-time Mamba kernels that update each request's state in place, inside its SSM block.

Every kernel finds the state through the handle table: ``ssm_handles[b]`` -> ``table[h]`` (the
unit's byte offset in the arena) -> the layer's state at a fixed offset inside the unit (see
``avmp_triton/layout.py``)::

    ssm_state [d_inner, d_state]            (Mamba2: [nheads, head_dim, d_state])   ssm dtype
    conv_state[d_conv - 1, channels]        (oldest input first)                    conv dtype

A row whose handle is -1, out of range, free, of the KV kind, or repeated within the call is
skipped: its output is zeros and no byte of any unit is read or written (two rows updating one
state would race). On CPU-resident metadata the launchers raise instead (InvalidHandleError
naming the position and handle).

The arena is passed as a view in the state's dtype, so ``table[h] // ELEM_BYTES`` is the unit's
element offset; units are 16-byte aligned (the allocators guarantee it), and ``ALIGN`` tells the
compiler so, which keeps the state loads wide.

These kernels mutate state: never autotune them (an autotuner re-runs the kernel). Block sizes
come from a small table in the launcher (``avmp_triton/ops/mamba_state.py``).
"""
import triton
import triton.language as tl

from avmp_triton.kernels.handles import KIND_SSM, both, first_rows, repeated, unit_offset


@triton.jit
def _row_unit(handles_ptr, table_ptr, kinds_ptr, i_b, batch, num_handles,
              ELEM_BYTES: tl.constexpr, BLOCK_B: tl.constexpr):
    """(valid, element offset of the unit) of batch row ``i_b``: valid = a live SSM handle that no
    other row holds (offset 0 otherwise).

    All of it runs before the state load: placed after the load, the scan's reduction kept the
    loaded tile live and cost registers, hence resident programs (sm_90: Mamba1 bf16 48 -> 64,
    Mamba2 fp32 75 -> 94, conv update 70 -> 128; 2-16 % slower on the H200)."""
    first = first_rows(handles_ptr, batch, BLOCK_B)
    h = tl.load(handles_ptr + i_b).to(tl.int64)
    live, o_unit = unit_offset(h, h >= 0, table_ptr, kinds_ptr, num_handles, KIND_SSM)
    valid = tl.where(repeated(handles_ptr, first, i_b, h, batch, BLOCK_B), False, live)
    return valid, tl.where(valid, o_unit, 0).to(tl.int64) // ELEM_BYTES


@triton.jit
def _softplus(x):
    # as torch.nn.functional.softplus (threshold 20): linear above it, where exp would overflow
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)


@triton.heuristics({
    "HAS_D": lambda args: args["D_ptr"] is not None,
    "HAS_Z": lambda args: args["z_ptr"] is not None,
    "HAS_DT_BIAS": lambda args: args["dt_bias_ptr"] is not None,
})
@triton.jit
def mamba1_state_update_kernel(
    state_ptr,        # [arena_bytes / ELEM_BYTES] ssm dtype: the arena viewed as the state dtype
    table_ptr,        # [H] int64 handle -> byte offset of its unit, -1 = free
    kinds_ptr,        # [H] int32 handle -> kind (0 free, 1 KV, 2 SSM)
    handles_ptr,      # [B] int32 SSM handle per request, -1 = skip
    x_ptr,            # [B, d_inner] any float
    dt_ptr,           # [B, d_inner] any float
    A_ptr,            # [d_inner, D_STATE] float (fp32)
    B_ptr,            # [B, D_STATE] any float
    C_ptr,            # [B, D_STATE] any float
    D_ptr,            # [d_inner] any float, or None
    z_ptr,            # [B, d_inner] any float, or None
    dt_bias_ptr,      # [d_inner] any float, or None
    out_ptr,          # [B, d_inner] x's dtype (output)
    num_handles,
    batch,            # B: rows of handles_ptr
    state_off,        # element offset of this layer's state inside a unit
    d_inner,
    stride_x_b, stride_dt_b, stride_A_d, stride_B_b, stride_C_b, stride_z_b, stride_out_b,
    D_STATE: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    ELEM_BYTES: tl.constexpr,
    ALIGN: tl.constexpr,      # the state's element offset is a multiple of ALIGN
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,    # next_power_of_2(D_STATE)
    BLOCK_B: tl.constexpr,    # handles compared at a time in the scan for repeats
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
):
    """One program: request ``pid0``, channels ``[pid1 * BLOCK_D, +BLOCK_D)``, all D_STATE states.

    state = state * exp(A * dt) + B * dt * x;  out = state @ C + D * x;  out *= silu(z)
    with dt = softplus(dt + dt_bias) if DT_SOFTPLUS. fp32 math; the state is stored in its dtype
    and ``out`` uses the fp32 state before rounding. The tile ``[BLOCK_D, D_STATE]`` is one
    contiguous run of the state, so it loads and stores with full-width coalesced accesses.
    """
    i_b = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    i_n = tl.arange(0, BLOCK_N)
    m_d = i_d < d_inner
    m_n = i_n < D_STATE

    valid, o_unit = _row_unit(handles_ptr, table_ptr, kinds_ptr, i_b, batch, num_handles, ELEM_BYTES, BLOCK_B)
    o_state = tl.multiple_of(o_unit + state_off, ALIGN)
    m_dn = m_d[:, None] & m_n[None, :]
    m_st = both(m_dn, valid)
    p_state = state_ptr + o_state + i_d[:, None] * D_STATE + i_n[None, :]
    b_state = tl.load(p_state, mask=m_st, other=0.0).to(tl.float32)

    b_x = tl.load(x_ptr + i_b * stride_x_b + i_d, mask=m_d, other=0.0).to(tl.float32)
    b_dt = tl.load(dt_ptr + i_b * stride_dt_b + i_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        b_dt += tl.load(dt_bias_ptr + i_d, mask=m_d, other=0.0).to(tl.float32)
    if DT_SOFTPLUS:
        b_dt = _softplus(b_dt)
    b_A = tl.load(A_ptr + i_d[:, None] * stride_A_d + i_n[None, :], mask=m_dn, other=0.0).to(tl.float32)
    b_B = tl.load(B_ptr + i_b * stride_B_b + i_n, mask=m_n, other=0.0).to(tl.float32)
    b_C = tl.load(C_ptr + i_b * stride_C_b + i_n, mask=m_n, other=0.0).to(tl.float32)

    b_dA = tl.exp(b_A * b_dt[:, None])
    b_state = b_state * b_dA + b_B[None, :] * (b_dt * b_x)[:, None]
    tl.store(p_state, b_state.to(state_ptr.dtype.element_ty), mask=m_st)

    b_out = tl.sum(b_state * b_C[None, :], axis=1)
    if HAS_D:
        b_out += b_x * tl.load(D_ptr + i_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_Z:
        b_z = tl.load(z_ptr + i_b * stride_z_b + i_d, mask=m_d, other=0.0).to(tl.float32)
        b_out *= b_z * tl.sigmoid(b_z)
    b_out = tl.where(both(m_d, valid), b_out, 0.0)
    tl.store(out_ptr + i_b * stride_out_b + i_d, b_out.to(out_ptr.dtype.element_ty), mask=m_d)


@triton.heuristics({
    "HAS_D": lambda args: args["D_ptr"] is not None,
    "HAS_Z": lambda args: args["z_ptr"] is not None,
    "HAS_DT_BIAS": lambda args: args["dt_bias_ptr"] is not None,
})
@triton.jit
def mamba2_state_update_kernel(
    state_ptr,        # [arena_bytes / ELEM_BYTES] ssm dtype: the arena viewed as the state dtype
    table_ptr,        # [H] int64 handle -> byte offset of its unit, -1 = free
    kinds_ptr,        # [H] int32 handle -> kind (0 free, 1 KV, 2 SSM)
    handles_ptr,      # [B] int32 SSM handle per request, -1 = skip
    x_ptr,            # [B, nheads, head_dim] any float
    dt_ptr,           # [B, nheads] any float
    A_ptr,            # [nheads] float (fp32)
    B_ptr,            # [B, n_groups, D_STATE] any float
    C_ptr,            # [B, n_groups, D_STATE] any float
    D_ptr,            # [nheads] any float, or None
    z_ptr,            # [B, nheads, head_dim] any float, or None
    dt_bias_ptr,      # [nheads] any float, or None
    out_ptr,          # [B, nheads, head_dim] x's dtype (output)
    num_handles,
    batch,            # B: rows of handles_ptr
    state_off,        # element offset of this layer's state inside a unit
    head_dim,
    heads_per_group,  # nheads // n_groups: head h reads group h // heads_per_group
    stride_x_b, stride_x_h, stride_dt_b, stride_B_b, stride_B_g, stride_C_b, stride_C_g,
    stride_z_b, stride_z_h, stride_out_b, stride_out_h,
    D_STATE: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    ELEM_BYTES: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,    # next_power_of_2(D_STATE)
    BLOCK_B: tl.constexpr,    # handles compared at a time in the scan for repeats
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
):
    """One program: request ``pid0``, head ``pid1``, head rows ``[pid2 * BLOCK_P, +BLOCK_P)``.

    Scalar A, dt, D per head: dA = exp(A[h] * dt[h]) is one number per program, so the work is
    one streaming pass over the ``[BLOCK_P, D_STATE]`` tile (contiguous in the state).
    """
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_p = tl.program_id(2).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    i_n = tl.arange(0, BLOCK_N)
    i_g = i_h // heads_per_group
    m_p = i_p < head_dim
    m_n = i_n < D_STATE

    valid, o_unit = _row_unit(handles_ptr, table_ptr, kinds_ptr, i_b, batch, num_handles, ELEM_BYTES, BLOCK_B)
    o_state = tl.multiple_of(o_unit + state_off, ALIGN)
    m_st = both(m_p[:, None] & m_n[None, :], valid)
    p_state = state_ptr + o_state + (i_h * head_dim + i_p)[:, None] * D_STATE + i_n[None, :]
    b_state = tl.load(p_state, mask=m_st, other=0.0).to(tl.float32)

    b_x = tl.load(x_ptr + i_b * stride_x_b + i_h * stride_x_h + i_p, mask=m_p, other=0.0).to(tl.float32)
    b_dt = tl.load(dt_ptr + i_b * stride_dt_b + i_h).to(tl.float32)
    if HAS_DT_BIAS:
        b_dt += tl.load(dt_bias_ptr + i_h).to(tl.float32)
    if DT_SOFTPLUS:
        b_dt = _softplus(b_dt)
    b_dA = tl.exp(tl.load(A_ptr + i_h).to(tl.float32) * b_dt)
    b_B = tl.load(B_ptr + i_b * stride_B_b + i_g * stride_B_g + i_n, mask=m_n, other=0.0).to(tl.float32)
    b_C = tl.load(C_ptr + i_b * stride_C_b + i_g * stride_C_g + i_n, mask=m_n, other=0.0).to(tl.float32)

    b_state = b_state * b_dA + (b_x * b_dt)[:, None] * b_B[None, :]
    tl.store(p_state, b_state.to(state_ptr.dtype.element_ty), mask=m_st)

    b_out = tl.sum(b_state * b_C[None, :], axis=1)
    if HAS_D:
        b_out += b_x * tl.load(D_ptr + i_h).to(tl.float32)
    if HAS_Z:
        b_z = tl.load(z_ptr + i_b * stride_z_b + i_h * stride_z_h + i_p, mask=m_p, other=0.0).to(tl.float32)
        b_out *= b_z * tl.sigmoid(b_z)
    b_out = tl.where(both(m_p, valid), b_out, 0.0)
    tl.store(out_ptr + i_b * stride_out_b + i_h * stride_out_h + i_p,
             b_out.to(out_ptr.dtype.element_ty), mask=m_p)


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None})
@triton.jit
def causal_conv1d_update_kernel(
    state_ptr,        # [arena_bytes / ELEM_BYTES] conv dtype: the arena viewed as the conv dtype
    table_ptr,        # [H] int64 handle -> byte offset of its unit, -1 = free
    kinds_ptr,        # [H] int32 handle -> kind (0 free, 1 KV, 2 SSM)
    handles_ptr,      # [B] int32 SSM handle per request, -1 = skip
    x_ptr,            # [B, channels] any float: this step's input
    weight_ptr,       # [channels, D_CONV] any float
    bias_ptr,         # [channels] any float, or None
    out_ptr,          # [B, channels] x's dtype (output)
    num_handles,
    batch,            # B: rows of handles_ptr
    state_off,        # element offset of this layer's conv state inside a unit
    channels,
    stride_x_b, stride_w_c, stride_out_b,
    D_CONV: tl.constexpr,
    SILU: tl.constexpr,
    ELEM_BYTES: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,    # next_power_of_2(D_CONV)
    BLOCK_B: tl.constexpr,    # handles compared at a time in the scan for repeats
    HAS_BIAS: tl.constexpr,
):
    """One program: request ``pid0``, channels ``[pid1 * BLOCK_C, +BLOCK_C)``.

    window[k] = state[k] for k < D_CONV - 1, window[D_CONV - 1] = x (oldest first);
    out = act(sum_k weight[:, k] * window[k] + bias); then state[k] = window[k + 1].
    Each state row is a contiguous run of channels, so every row loads coalesced.
    """
    W: tl.constexpr = D_CONV - 1
    i_b = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    i_k = tl.arange(0, BLOCK_K)
    m_c = i_c < channels

    valid, o_unit = _row_unit(handles_ptr, table_ptr, kinds_ptr, i_b, batch, num_handles, ELEM_BYTES, BLOCK_B)
    o_state = tl.multiple_of(o_unit + state_off, ALIGN)
    p_rows = state_ptr + o_state + i_k[:, None].to(tl.int64) * channels + i_c[None, :]
    b_win = tl.load(p_rows, mask=both((i_k[:, None] < W) & m_c[None, :], valid), other=0.0).to(tl.float32)
    b_x = tl.load(x_ptr + i_b * stride_x_b + i_c, mask=m_c, other=0.0).to(tl.float32)
    b_win = tl.where(i_k[:, None] == W, b_x[None, :], b_win)
    b_w = tl.load(weight_ptr + i_c[None, :] * stride_w_c + i_k[:, None],
                  mask=(i_k[:, None] < D_CONV) & m_c[None, :], other=0.0).to(tl.float32)
    b_out = tl.sum(b_win * b_w, axis=0)
    if HAS_BIAS:
        b_out += tl.load(bias_ptr + i_c, mask=m_c, other=0.0).to(tl.float32)
    if SILU:
        b_out = b_out * tl.sigmoid(b_out)
    b_out = tl.where(both(m_c, valid), b_out, 0.0)
    tl.store(out_ptr + i_b * stride_out_b + i_c, b_out.to(out_ptr.dtype.element_ty), mask=m_c)

    # Shift by one token: row k - 1 <- window[k]. The element loaded from row k is written to
    # row k - 1 by another thread, so every read of the old rows must happen before any write.
    tl.debug_barrier()
    p_shift = state_ptr + o_state + tl.maximum(i_k - 1, 0)[:, None].to(tl.int64) * channels + i_c[None, :]
    tl.store(p_shift, b_win.to(state_ptr.dtype.element_ty),
             mask=both((i_k[:, None] >= 1) & (i_k[:, None] <= W) & m_c[None, :], valid))
