"""Mamba prefill launchers: causal conv1d, Mamba1 selective scan, Mamba2 scan over a packed chunk.

Same calling convention as the decode ops (``avmp_triton.ops.mamba_state``): where the state lives
first (arena, handle table, handles, layout, layer), then the op's inputs, then keyword options;
``dt_softplus`` defaults to False everywhere (as in mamba_ssm and vLLM). Each op reads a
variable-length packed chunk (``cu_seqlens``), starts every request from its SSM block's state
(``has_initial_state[b] != 0``, chunked prefill continuing a request) or from zeros, and leaves
the final state IN PLACE in the block, resolved through the allocator's handle table on the
device (so blocks may move between chunks: the handle stays, the table entry changes).

Common arguments:
    arena: ``[bytes]`` uint8, the allocator's arena (``AVMPAllocator.arena``); mutated.
    handle_table: ``[H]`` int64 handle -> byte offset of the block, -1 when free. Offsets are
        16-byte aligned (every allocator's units are); the kernels rely on it for wide loads.
    handle_kinds (keyword, required): ``[H]`` int32 handle -> kind, 0 free, 1 KV, 2 SSM
        (``AVMPAllocator.handle_kind``); the kernels serve SSM handles only.
    ssm_handles: ``[B]`` int32 SSM handle per request; -1 skips the request: its outputs are zeros
        and its state is untouched.
    layout: the model's ``HybridModelSpec`` (dtypes come from it), or an ``SSMBlockLayout`` with
        ``state_dtype=`` / ``conv_dtype=`` given.
    layer: Mamba layer index in ``[0, num_mamba_layers)``.
    cu_seqlens (keyword): ``[B + 1]`` int32 token ranges of the requests in the packed
        ``[T, ...]`` inputs, non-decreasing from 0, at most T. Tokens in ``[cu_seqlens[B], T)``
        (padding) get zero outputs.
    has_initial_state (keyword): ``[B]`` int32 or bool.
    out: optional preallocated output (for CUDA graphs); returned. Must not alias an input.

A request whose handle is -1, out of range, free, of the KV kind, or repeated within the call is
skipped: its outputs are zeros and no byte of any unit is read or written. Any ``cu_seqlens`` is
safe on the device: the kernels clamp each range to ``[0, T]``, so no access leaves x, out or the
request's own unit. On CPU-resident metadata the launchers raise instead (InvalidHandleError
naming the position and handle; ValueError naming a bad cu_seqlens value).

No host synchronisation: every launch decision comes from shapes, and device metadata is never
read on the host. Each op is registered as a PyTorch custom op (``torch.ops.avmp.*``) mutating
``out`` and ``arena``.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from avmp_triton import _triton_env  # sets the interpreter up on CPU-only hosts (before triton)
from avmp_triton.kernels import mamba_prefill as K
from avmp_triton._checks import is_int
from avmp_triton.ops._args import (
    check_float, check_launch, check_mamba1_inputs, check_on_host, check_opt_float, check_out, check_tensor,
    repeat_block, sm_count, state_location,
)

_ALGORITHMS = ("auto", "serial", "chunked")


def _check_batch_meta(cu_seqlens, has_initial_state, batch: int, dev) -> None:
    check_tensor(cu_seqlens, "cu_seqlens", device=dev, beside="the arena", dim=1)
    if cu_seqlens.dtype != torch.int32 or not cu_seqlens.is_contiguous():
        raise TypeError(f"cu_seqlens must be a contiguous int32 tensor, got {cu_seqlens.dtype} "
                        f"strides {cu_seqlens.stride()}")
    if cu_seqlens.numel() != batch + 1:
        raise ValueError(f"cu_seqlens must have B + 1 = {batch + 1} entries (B = ssm_handles.numel()), "
                         f"got {cu_seqlens.numel()}")
    check_tensor(has_initial_state, "has_initial_state", device=dev, beside="the arena", dim=1)
    if has_initial_state.dtype not in (torch.int32, torch.bool) or not has_initial_state.is_contiguous():
        raise TypeError(f"has_initial_state must be a contiguous int32 or bool tensor, got "
                        f"{has_initial_state.dtype} strides {has_initial_state.stride()}")
    if has_initial_state.numel() != batch:
        raise ValueError(f"has_initial_state must have B = {batch} entries, got {has_initial_state.numel()}")


def _check_dt_softplus(v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"dt_softplus must be a bool, got {v!r}")
    return v


def _check_algorithm(algorithm, chunk_size, min_chunk: int) -> None:
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm must be one of {_ALGORITHMS}, got {algorithm!r}")
    if chunk_size is not None and (not is_int(chunk_size) or chunk_size < min_chunk
                                   or chunk_size & (chunk_size - 1) or chunk_size > 256):
        raise ValueError(f"chunk_size must be a power of two in [{min_chunk}, 256], got {chunk_size!r}")


def _chunked(algorithm: str, dev: torch.device) -> bool:
    """"auto": chunked on CUDA; serial in the interpreter, where it is the cheaper one."""
    return algorithm == "chunked" or (algorithm == "auto" and dev.type == "cuda")


def _dot_dtype(dtype: torch.dtype):
    """tl.dot operand type of the chunked scan: the inputs' own on GPU; fp32 in the interpreter,
    whose tl.dot (triton 3.6) multiplies bf16/fp16 bit patterns as integers."""
    if _triton_env.interpreter_active() or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def _align(state_offset: int, dtype: torch.dtype) -> int:
    """Largest power of two (elements) dividing every state base: units are 16-byte aligned."""
    return math.gcd(16 // dtype.itemsize, state_offset // dtype.itemsize)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def mamba1_prefill_launch_config(d_inner: int, d_state: int) -> tuple[int, int, int]:
    """(CHUNK, BLOCK_D, num_warps) of the chunked Mamba1 scan: [CHUNK, BLOCK_D, d_state] fp32 pairs
    in registers. Jamba (d_state 16): 16 tokens x 16 channels, 4 warps, within 2 % of the fastest
    of the swept shapes at B=1 x 4096, 4 x 1024 and 16 x 512 on an H100
    (perf/results/tune_prefill_H100.json)."""
    block_d = min(_pow2(d_inner), max(1, 256 // _pow2(d_state)))
    return 16, block_d, 4


def conv1d_prefill_launch_config(channels: int, d_conv: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_C, num_warps) of the prefill conv: 8 tokens x 512 channels, 2 warps, within 4 %
    of the fastest swept shape at B=1 x 4096, 4 x 1024 and 16 x 512 on an H100
    (perf/results/conv1d_prefill_variants_H100.json)."""
    return max(8, _pow2(d_conv - 1)), min(512, _pow2(channels)), 2


def _conv_workers(device: torch.device, T: int, block_t: int, programs: int) -> int:
    """Programs per (request, channel block), each striding over the request's token blocks: enough
    for ~16 programs per SM in all, never more than the token blocks of the whole chunk (in the
    interpreter: 64 programs, so the tests see workers striding)."""
    target = 16 * sm_count(device.index or 0) if device.type == "cuda" else 64
    return max(1, min(triton.cdiv(max(T, 1), block_t), triton.cdiv(target, programs)))


def mamba2_prefill_launch_config(head_dim: int, d_state: int, chunked: bool, chunk_size: int) -> tuple[int, int]:
    """(BLOCK_P, num_warps) of the Mamba2 scans. Chunked (every tl.dot dimension >= 16): up to 64
    head_dim rows, 4 warps: the fastest swept shape with chunk 64 on Nemotron-H at all three
    batches on an H100, 1.2-2.2x faster than 8 warps (perf/results/tune_prefill_H100.json)."""
    if chunked:
        return max(16, min(64, _pow2(head_dim))), 4
    return min(_pow2(head_dim), max(1, 2048 // _pow2(d_state))), 4


@torch.library.custom_op("avmp::causal_conv1d_prefill", mutates_args=("out", "arena"))
def _causal_conv1d_prefill_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
    arena: torch.Tensor, handle_table: torch.Tensor, handle_kinds: torch.Tensor, ssm_handles: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_initial_state: torch.Tensor, state_offset: int, state_dtype: torch.dtype, silu: bool,
    block_t: int, block_c: int, num_warps: int,
) -> None:
    T, C = x.shape
    width = weight.shape[1]
    B = ssm_handles.numel()
    c_blocks = triton.cdiv(C, block_c)
    grid = (B + 1, c_blocks, _conv_workers(x.device, T, block_t, (B + 1) * c_blocks))
    K.causal_conv1d_prefill_kernel[grid](
        x, weight, bias if bias is not None else weight, out, arena.view(state_dtype), handle_table,
        handle_kinds, ssm_handles, cu_seqlens, has_initial_state, T, C, B, handle_table.numel(), state_offset,
        x.stride(0), out.stride(0), weight.stride(0),
        WIDTH=width, BLOCK_W=_pow2(width - 1), HAS_BIAS=bias is not None, SILU=silu,
        ELEM_BYTES=state_dtype.itemsize, ALIGN=_align(state_offset, state_dtype), BLOCK_T=block_t, BLOCK_C=block_c,
        BLOCK_B=repeat_block(B), num_warps=num_warps)


@_causal_conv1d_prefill_op.register_fake
def _(x, weight, bias, out, arena, handle_table, handle_kinds, ssm_handles, cu_seqlens, has_initial_state,
      state_offset, state_dtype, silu, block_t, block_c, num_warps) -> None:
    return None


def causal_conv1d_prefill(
    arena: torch.Tensor, handle_table: torch.Tensor, ssm_handles: torch.Tensor, layout, layer: int,
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
    *, handle_kinds: torch.Tensor, cu_seqlens: torch.Tensor, has_initial_state: torch.Tensor,
    conv_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None, block_t: Optional[int] = None,
    block_c: Optional[int] = None, num_warps: Optional[int] = None,
) -> torch.Tensor:
    """Depthwise causal conv1d over a packed chunk; the block's conv state is the left context.

    Args:
        x: ``[T, channels]`` inputs (Mamba2: x|B|C concatenated), last dim contiguous.
        weight: ``[channels, d_conv]``; bias: ``[channels]`` or None.
        activation: None or "silu".
        conv_dtype: the conv-state dtype, required with an ``SSMBlockLayout``.
        block_t, block_c, num_warps: launch shape (tokens >= d_conv - 1 and channels per program,
            powers of two), defaults from ``conv1d_prefill_launch_config``.
        (the rest: see the module docstring)
    Returns:
        out ``[T, channels]`` in x's dtype. Afterwards layer ``layer``'s conv state
        ``[d_conv - 1, channels]`` of every active request holds its last d_conv - 1 inputs, oldest
        first (older state rows, or zeros without an initial state, when the request is shorter).
    """
    layout, _, dtype, batch, dev = state_location(arena, handle_table, handle_kinds, ssm_handles, layout, layer,
                                                  conv_dtype, "conv_dtype", "conv", None)
    _check_batch_meta(cu_seqlens, has_initial_state, batch, dev)
    ch, d_conv = layout.conv_channels, layout.conv_width + 1
    if d_conv > 4:
        raise ValueError(f"d_conv must be at most 4 (the kernel keeps 3 past rows), got {d_conv}")
    check_tensor(x, "x", device=dev, beside="the arena", dim=2)
    T = x.shape[0]
    check_float(x, "x", dev, (T, ch))
    check_float(weight, "weight", dev, (ch, d_conv))
    check_opt_float(bias, "bias", dev, (ch,))
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    d_t, d_c, d_w = conv1d_prefill_launch_config(ch, d_conv)
    block_t, num_warps = check_launch("causal_conv1d_prefill", block_t, "block_t", num_warps, (d_t, d_w))
    block_c, _ = check_launch("causal_conv1d_prefill", block_c, "block_c", None, (d_c, d_w))
    if block_t < d_conv - 1:
        raise ValueError(f"block_t must be >= d_conv - 1 = {d_conv - 1}, got {block_t}")
    out = check_out(out, x, {"x": x, "weight": weight, "bias": bias, "arena": arena})
    check_on_host(handle_table, handle_kinds, ssm_handles, cu_seqlens, T)
    torch.ops.avmp.causal_conv1d_prefill(
        x, weight, bias, out, arena, handle_table, handle_kinds, ssm_handles, cu_seqlens, has_initial_state,
        layout.conv_offset(layer), dtype, activation is not None, block_t, block_c, num_warps)
    return out


@torch.library.custom_op("avmp::mamba1_scan_prefill", mutates_args=("out", "arena"))
def _mamba1_scan_prefill_op(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor], out: torch.Tensor,
    arena: torch.Tensor, handle_table: torch.Tensor, handle_kinds: torch.Tensor, ssm_handles: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_initial_state: torch.Tensor, state_offset: int, state_dtype: torch.dtype, dt_softplus: bool,
    chunked: bool, chunk_size: int, block_d: int, num_warps: int,
) -> None:
    T, d_inner = x.shape
    d_state = A.shape[1]
    nreq = ssm_handles.numel()
    args = (x, dt, z if z is not None else x, A, B, C, D if D is not None else A,
            dt_bias if dt_bias is not None else A, out, arena.view(state_dtype), handle_table, handle_kinds,
            ssm_handles,
            cu_seqlens, has_initial_state, T, d_inner, d_state, nreq, handle_table.numel(), state_offset,
            x.stride(0), dt.stride(0), z.stride(0) if z is not None else 0, B.stride(0), C.stride(0),
            out.stride(0), A.stride(0))
    flags = dict(HAS_Z=z is not None, HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None,
                 DT_SOFTPLUS=dt_softplus, ELEM_BYTES=state_dtype.itemsize,
                 ALIGN=_align(state_offset, state_dtype), BLOCK_N=_pow2(d_state), BLOCK_B=repeat_block(nreq))
    grid = (nreq + 1, triton.cdiv(d_inner, block_d))
    if chunked:
        K.mamba1_chunk_scan_prefill_kernel[grid](*args, **flags, CHUNK=chunk_size, BLOCK_D=block_d,
                                                 num_warps=num_warps)
    else:
        K.mamba1_scan_prefill_kernel[grid](*args, **flags, BLOCK_D=block_d, num_warps=num_warps)


@_mamba1_scan_prefill_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, out, arena, handle_table, handle_kinds, ssm_handles, cu_seqlens,
      has_initial_state, state_offset, state_dtype, dt_softplus, chunked, chunk_size, block_d, num_warps) -> None:
    return None


def mamba1_scan_prefill(
    arena: torch.Tensor, handle_table: torch.Tensor, ssm_handles: torch.Tensor, layout, layer: int,
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
    *, handle_kinds: torch.Tensor, cu_seqlens: torch.Tensor, has_initial_state: torch.Tensor, dt_softplus: bool = False,
    state_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None, algorithm: str = "auto",
    chunk_size: Optional[int] = None, block_d: Optional[int] = None, num_warps: Optional[int] = None,
) -> torch.Tensor:
    """Mamba1 selective scan (Jamba) over a packed chunk, the state kept in the block.

    Per request and token t (fp32):  dt = softplus(dt_t + dt_bias) (``dt_softplus``, else
    dt_t + dt_bias);  h = exp(dt A) h + dt x_t B_t;  y_t = h C_t + D x_t;  y_t *= silu(z_t).

    Args:
        x, dt: ``[T, d_inner]``; z: ``[T, d_inner]`` or None (no gating). Last dims contiguous.
        A: ``[d_inner, d_state]`` (negative; usually -exp(A_log), fp32).
        B, C: ``[T, d_state]``.
        D, dt_bias: ``[d_inner]`` or None.
        state_dtype: the ssm dtype, required with an ``SSMBlockLayout``.
        algorithm: "serial" (token by token), "chunked" (``chunk_size`` tokens at a time through a
            parallel prefix scan; the fast one) or "auto" (chunked on CUDA, serial in the
            interpreter).
        chunk_size, block_d, num_warps: launch shape, defaults from
            ``mamba1_prefill_launch_config`` (chunk_size: power of two in [1, 256]).
        (the rest: see the module docstring)
    Returns:
        y ``[T, d_inner]`` in x's dtype; layer ``layer``'s ssm state ``[d_inner, d_state]`` of every
        active request holds its state after its last token, in the state dtype.
    """
    layout, _, dtype, nreq, dev = state_location(arena, handle_table, handle_kinds, ssm_handles, layout, layer,
                                                 state_dtype, "state_dtype", "ssm", 1)
    _check_batch_meta(cu_seqlens, has_initial_state, nreq, dev)
    _check_algorithm(algorithm, chunk_size, 1)
    Di, N = layout.d_inner, layout.d_state
    check_tensor(x, "x", device=dev, beside="the arena", dim=2)
    T = x.shape[0]
    check_mamba1_inputs(dev, T, Di, N, x, dt, A, B, C, D, z, dt_bias)
    _check_dt_softplus(dt_softplus)
    chunked = _chunked(algorithm, dev)
    d_chunk, d_block, d_warps = mamba1_prefill_launch_config(Di, N)
    if not chunked:   # one [BLOCK_D, N] state tile per program, token by token
        d_block, d_warps = min(_pow2(Di), max(16, 1024 // _pow2(N))), 2
    chunk_size = d_chunk if chunk_size is None else chunk_size
    block_d, num_warps = check_launch("mamba1_scan_prefill", block_d, "block_d", num_warps, (d_block, d_warps))
    out = check_out(out, x, {"x": x, "dt": dt, "z": z, "B": B, "C": C, "arena": arena})
    check_on_host(handle_table, handle_kinds, ssm_handles, cu_seqlens, T)
    torch.ops.avmp.mamba1_scan_prefill(
        x, dt, A, B, C, D, z, dt_bias, out, arena, handle_table, handle_kinds, ssm_handles, cu_seqlens,
        has_initial_state, layout.ssm_offset(layer), dtype, dt_softplus, chunked, chunk_size, block_d, num_warps)
    return out


@torch.library.custom_op("avmp::mamba2_scan_prefill", mutates_args=("out", "arena"))
def _mamba2_scan_prefill_op(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor], out: torch.Tensor,
    arena: torch.Tensor, handle_table: torch.Tensor, handle_kinds: torch.Tensor, ssm_handles: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_initial_state: torch.Tensor, state_offset: int, state_dtype: torch.dtype, dt_softplus: bool,
    chunked: bool, chunk_size: int, block_p: int, num_warps: int,
) -> None:
    T, nheads, head_dim = x.shape
    n_groups, d_state = B.shape[1], B.shape[2]
    nreq = ssm_handles.numel()
    args = (x, dt, z if z is not None else x, A, B, C, D if D is not None else A,
            dt_bias if dt_bias is not None else A, out, arena.view(state_dtype), handle_table, handle_kinds,
            ssm_handles,
            cu_seqlens, has_initial_state, T, head_dim, d_state, nreq, handle_table.numel(),
            nheads // n_groups, state_offset,
            x.stride(0), x.stride(1), dt.stride(0),
            z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
            B.stride(0), B.stride(1), C.stride(0), C.stride(1), out.stride(0), out.stride(1))
    flags = dict(HAS_Z=z is not None, HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None,
                 DT_SOFTPLUS=dt_softplus, ELEM_BYTES=state_dtype.itemsize,
                 ALIGN=_align(state_offset, state_dtype), BLOCK_B=repeat_block(nreq))
    grid = (nreq + 1, nheads, triton.cdiv(head_dim, block_p))
    if chunked:
        K.mamba2_chunk_scan_prefill_kernel[grid](
            *args, **flags, CHUNK=chunk_size, BLOCK_P=block_p, BLOCK_N=max(16, _pow2(d_state)),  # tl.dot: >= 16
            DOT_DTYPE=_dot_dtype(x.dtype), DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            num_warps=num_warps)
    else:
        K.mamba2_scan_prefill_kernel[grid](*args, **flags, BLOCK_P=block_p, BLOCK_N=_pow2(d_state),
                                           num_warps=num_warps)


@_mamba2_scan_prefill_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, out, arena, handle_table, handle_kinds, ssm_handles, cu_seqlens,
      has_initial_state, state_offset, state_dtype, dt_softplus, chunked, chunk_size, block_p, num_warps) -> None:
    return None


def mamba2_scan_prefill(
    arena: torch.Tensor, handle_table: torch.Tensor, ssm_handles: torch.Tensor, layout, layer: int,
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
    *, handle_kinds: torch.Tensor, cu_seqlens: torch.Tensor, has_initial_state: torch.Tensor, dt_softplus: bool = False,
    state_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None, algorithm: str = "auto",
    chunk_size: int = 64, block_p: Optional[int] = None, num_warps: Optional[int] = None,
) -> torch.Tensor:
    """Mamba2 (SSD) scan (Nemotron-H) over a packed chunk, the state kept in the block.

    Per request, head h (group g = h // (nheads / n_groups)) and token t (fp32):
    dt = softplus(dt_t + dt_bias_h) (``dt_softplus``);  state = exp(dt A_h) state + dt x_t B_t^T
    (``[head_dim, d_state]``);  y_t = state C_t + D_h x_t;  y_t *= silu(z_t).

    Args:
        x: ``[T, nheads, head_dim]``; z: same shape or None (no gating, e.g. when a gated RMSNorm
            follows, as in Nemotron-H). Last dims contiguous.
        dt: ``[T, nheads]``; A, D, dt_bias: ``[nheads]`` (D, dt_bias optional).
        B, C: ``[T, n_groups, d_state]``, n_groups dividing nheads.
        state_dtype: the ssm dtype, required with an ``SSMBlockLayout``.
        algorithm: "serial" (token by token), "chunked" (chunks of ``chunk_size`` tokens through
            tl.dot, state passed between chunks) or "auto" (chunked on CUDA, serial in the
            interpreter).
        chunk_size: power of two in [16, 256] (chunked only).
        block_p, num_warps: launch shape (head_dim rows per program; chunked: >= 16), defaults
            from ``mamba2_prefill_launch_config``.
        (the rest: see the module docstring)
    Returns:
        y ``[T, nheads, head_dim]`` in x's dtype; layer ``layer``'s ssm state
        ``[nheads, head_dim, d_state]`` of every active request holds its final state.
    """
    layout, spec, dtype, nreq, dev = state_location(arena, handle_table, handle_kinds, ssm_handles, layout, layer,
                                                    state_dtype, "state_dtype", "ssm", 2)
    _check_batch_meta(cu_seqlens, has_initial_state, nreq, dev)
    _check_algorithm(algorithm, chunk_size, 16)
    check_tensor(x, "x", device=dev, beside="the arena", dim=3)
    T, NH, P = x.shape
    N = layout.d_state
    if NH * P != layout.d_inner:
        raise ValueError(f"x's nheads * head_dim = {NH} * {P} must equal the layout's d_inner ({layout.d_inner})")
    if spec is not None and (NH, P) != (spec.mamba_num_heads, spec.mamba_head_dim):
        raise ValueError(f"x has {NH} heads x {P}; spec {spec.name!r} has "
                         f"{spec.mamba_num_heads} x {spec.mamba_head_dim}")
    check_float(x, "x", dev, (T, NH, P))
    check_float(dt, "dt", dev, (T, NH))
    check_float(A, "A", dev, (NH,))
    check_tensor(B, "B", device=dev, beside="the arena", dim=3)
    G = B.shape[1]
    if G < 1 or NH % G:
        raise ValueError(f"n_groups (B.shape[1] = {G}) must divide nheads ({NH})")
    check_float(B, "B", dev, (T, G, N))
    check_float(C, "C", dev, (T, G, N))
    check_opt_float(z, "z", dev, (T, NH, P))
    check_opt_float(D, "D", dev, (NH,))
    check_opt_float(dt_bias, "dt_bias", dev, (NH,))
    _check_dt_softplus(dt_softplus)
    chunked = _chunked(algorithm, dev)
    block_p, num_warps = check_launch("mamba2_scan_prefill", block_p, "block_p", num_warps,
                                      mamba2_prefill_launch_config(P, N, chunked, chunk_size))
    if chunked and block_p < 16:
        raise ValueError(f"block_p must be >= 16 for the chunked scan (tl.dot), got {block_p}")
    out = check_out(out, x, {"x": x, "dt": dt, "z": z, "B": B, "C": C, "arena": arena})
    check_on_host(handle_table, handle_kinds, ssm_handles, cu_seqlens, T)
    torch.ops.avmp.mamba2_scan_prefill(
        x, dt, A, B, C, D, z, dt_bias, out, arena, handle_table, handle_kinds, ssm_handles, cu_seqlens,
        has_initial_state, layout.ssm_offset(layer), dtype, dt_softplus, chunked, chunk_size, block_p, num_warps)
    return out
