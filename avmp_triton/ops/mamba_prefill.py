"""Mamba prefill launchers: causal conv1d, Mamba1 selective scan, Mamba2 scan over a packed chunk.

Each op reads a variable-length packed chunk (``cu_seqlens``), starts every request from its SSM
block's state (``has_initial_state[b] != 0``, chunked prefill continuing a request) or from zeros,
and leaves the final state IN PLACE in the block, resolved through the allocator's handle table on
the device (so blocks may move between chunks: the handle stays, the table entry changes).

Common arguments:
    arena: ``[bytes]`` uint8, the allocator's arena (``AVMPAllocator.arena``); mutated.
    handle_table: ``[H]`` int64 handle -> byte offset of the block, -1 when free.
    ssm_handles: ``[B]`` int32 SSM handle per request; -1 (or a free / out-of-range handle) skips
        the request: its outputs are zeros and its state is untouched.
    cu_seqlens: ``[B + 1]`` int32 token ranges of the requests in the packed ``[T, ...]`` inputs,
        non-decreasing from 0 (not checked on the host: that would sync). Tokens in
        ``[cu_seqlens[B], T)`` (padding) get zero outputs.
    has_initial_state: ``[B]`` int32 or bool.
    spec: the model's ``HybridModelSpec``; the state sits where ``ssm_block_layout(spec)`` says,
        in ``spec.conv_dtype`` / ``spec.ssm_dtype``.
    layer: Mamba layer index in ``[0, spec.num_mamba_layers)``.
    out: optional preallocated output (for CUDA graphs); returned.

No host synchronisation: every launch decision comes from shapes. Each op is registered as a
PyTorch custom op (``torch.ops.avmp.*``) mutating ``out`` and ``arena``.
"""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from avmp_triton import _triton_env  # sets the interpreter up on CPU-only hosts (before triton)
from avmp_triton.kernels import mamba_prefill as K
from avmp_triton.layout import SSMBlockLayout, ssm_block_layout
from avmp_triton.spec import HybridModelSpec

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_ALGORITHMS = ("auto", "serial", "chunked")


# ------------------------------------------------------------------------------- validation
def _tensor(t, name: str, *, ndim: int | None = None, dtypes=None, device=None, shape=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, the arena on {device}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    return t


@functools.lru_cache(maxsize=64)
def _layout(spec: HybridModelSpec) -> SSMBlockLayout:
    return ssm_block_layout(spec)


def _check_common(arena, handle_table, ssm_handles, cu_seqlens, has_initial_state, spec, layer,
                  state_dtype_name: str):
    """Validate the arguments every op shares; returns (B, layout, device)."""
    if not isinstance(spec, HybridModelSpec):
        raise TypeError(f"spec must be a HybridModelSpec, got {type(spec).__name__}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < spec.num_mamba_layers:
        raise ValueError(f"layer must be an int in [0, {spec.num_mamba_layers}) (spec.num_mamba_layers), "
                         f"got {layer!r}")
    _tensor(arena, "arena", ndim=1, dtypes=(torch.uint8,))
    dev = arena.device
    if dev.type == "cpu":
        from avmp_triton._triton_env import require_interpreter
        require_interpreter()
    elif dev.type != "cuda":
        raise ValueError(f"arena must be on a cuda or cpu device, got {dev}")
    itemsize = getattr(spec, state_dtype_name).itemsize
    if arena.numel() % itemsize:
        raise ValueError(f"arena has {arena.numel()} bytes, not a multiple of {state_dtype_name} "
                         f"{getattr(spec, state_dtype_name)}'s {itemsize}")
    _tensor(handle_table, "handle_table", ndim=1, dtypes=(torch.int64,), device=dev)
    _tensor(ssm_handles, "ssm_handles", ndim=1, dtypes=(torch.int32,), device=dev)
    B = ssm_handles.numel()
    _tensor(cu_seqlens, "cu_seqlens", ndim=1, dtypes=(torch.int32,), device=dev)
    if cu_seqlens.numel() != B + 1:
        raise ValueError(f"cu_seqlens must have B + 1 = {B + 1} entries (B = ssm_handles.numel()), "
                         f"got {cu_seqlens.numel()}")
    _tensor(has_initial_state, "has_initial_state", ndim=1, dtypes=(torch.int32, torch.bool), device=dev)
    if has_initial_state.numel() != B:
        raise ValueError(f"has_initial_state must have B = {B} entries, got {has_initial_state.numel()}")
    return B, _layout(spec), dev


def _check_out(out, shape, dtype, device, inputs) -> Optional[torch.Tensor]:
    if out is None:
        return None
    _tensor(out, "out", dtypes=(dtype,), device=device, shape=shape)
    for name, t in inputs.items():
        if t is not None and t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            raise ValueError(f"out must not share memory with {name}")
    return out


def _dot_dtype(dtype: torch.dtype):
    """tl.dot operand type of the chunked scan: the inputs' own on GPU; fp32 in the interpreter,
    whose tl.dot (triton 3.6) multiplies bf16/fp16 bit patterns as integers."""
    if _triton_env.interpreter_active() or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# ------------------------------------------------------------------------------- conv1d
@torch.library.custom_op("avmp::causal_conv1d_prefill", mutates_args=("out", "arena"))
def _causal_conv1d_prefill_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
    arena: torch.Tensor, handle_table: torch.Tensor, ssm_handles: torch.Tensor, cu_seqlens: torch.Tensor,
    has_initial_state: torch.Tensor, state_offset: int, state_dtype: torch.dtype, silu: bool,
    max_seqlen: int,
) -> None:
    T, C = x.shape
    width = weight.shape[1]
    B = ssm_handles.numel()
    block_w = _pow2(width - 1)
    block_t = max(block_w, min(64, _pow2(max_seqlen)))
    block_c = min(128, _pow2(C))
    grid = (B + 1, triton.cdiv(C, block_c), max(1, triton.cdiv(max_seqlen, block_t)))
    K.causal_conv1d_prefill_kernel[grid](
        x, weight, bias if bias is not None else weight, out, arena.view(state_dtype), handle_table,
        ssm_handles, cu_seqlens, has_initial_state, T, C, B, handle_table.numel(), state_offset,
        x.stride(0), out.stride(0), weight.stride(0),
        WIDTH=width, BLOCK_W=block_w, HAS_BIAS=bias is not None, SILU=silu,
        ELEM_BYTES=state_dtype.itemsize, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)


@_causal_conv1d_prefill_op.register_fake
def _(x, weight, bias, out, arena, handle_table, ssm_handles, cu_seqlens, has_initial_state,
      state_offset, state_dtype, silu, max_seqlen) -> None:
    return None


def causal_conv1d_prefill(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], arena: torch.Tensor,
    handle_table: torch.Tensor, ssm_handles: torch.Tensor, cu_seqlens: torch.Tensor,
    has_initial_state: torch.Tensor, spec: HybridModelSpec, layer: int, *,
    activation: Optional[str] = None, out: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    """Depthwise causal conv1d over a packed chunk; the block's conv state is the left context.

    Args:
        x: ``[T, C]`` inputs, C = spec.conv_channels (Mamba2: x|B|C concatenated).
        weight: ``[C, d_conv]``; bias: ``[C]`` or None.
        activation: None or "silu" ("swish" accepted).
        max_seqlen: optional upper bound on every request's length (and on the padded tail
            ``T - cu_seqlens[B]``), host int: fewer empty programs. Defaults to T.
        (the rest: see the module docstring)
    Returns:
        out ``[T, C]`` in x's dtype. Afterwards layer ``layer``'s conv state ``[d_conv - 1, C]`` of
        every active request holds its last d_conv - 1 inputs, oldest first (older state rows, or
        zeros without an initial state, when the request is shorter than d_conv - 1).
    """
    B, layout, dev = _check_common(arena, handle_table, ssm_handles, cu_seqlens, has_initial_state, spec,
                                   layer, "conv_dtype")
    C = spec.conv_channels
    _tensor(x, "x", ndim=2, dtypes=_FLOATS, device=dev)
    if x.shape[1] != C:
        raise ValueError(f"x must be [T, conv_channels={C}], got shape {tuple(x.shape)}")
    _tensor(weight, "weight", dtypes=_FLOATS, device=dev, shape=(C, spec.d_conv))
    if bias is not None:
        _tensor(bias, "bias", dtypes=_FLOATS, device=dev, shape=(C,))
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    T = x.shape[0]
    if max_seqlen is None:
        max_seqlen = T
    elif isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    out = _check_out(out, (T, C), x.dtype, dev, {"x": x, "weight": weight, "bias": bias, "arena": arena})
    if out is None:
        out = torch.empty_like(x)
    torch.ops.avmp.causal_conv1d_prefill(
        x, weight, bias, out, arena, handle_table, ssm_handles, cu_seqlens, has_initial_state,
        layout.conv_offset(layer), spec.conv_dtype, activation is not None, min(max_seqlen, T))
    return out


# ------------------------------------------------------------------------------- Mamba1 scan
@torch.library.custom_op("avmp::mamba1_scan_prefill", mutates_args=("out", "arena"))
def _mamba1_scan_prefill_op(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor], out: torch.Tensor,
    arena: torch.Tensor, handle_table: torch.Tensor, ssm_handles: torch.Tensor, cu_seqlens: torch.Tensor,
    has_initial_state: torch.Tensor, state_offset: int, state_dtype: torch.dtype, dt_softplus: bool,
) -> None:
    T, d_inner = x.shape
    d_state = A.shape[1]
    nreq = ssm_handles.numel()
    block_n = _pow2(d_state)
    block_d = min(_pow2(d_inner), max(16, 1024 // block_n))
    grid = (nreq + 1, triton.cdiv(d_inner, block_d))
    K.mamba1_scan_prefill_kernel[grid](
        x, dt, z if z is not None else x, A, B, C, D if D is not None else A,
        dt_bias if dt_bias is not None else A, out, arena.view(state_dtype), handle_table, ssm_handles,
        cu_seqlens, has_initial_state, T, d_inner, d_state, nreq, handle_table.numel(), state_offset,
        x.stride(0), dt.stride(0), z.stride(0) if z is not None else 0, B.stride(0), C.stride(0),
        out.stride(0), A.stride(0),
        HAS_Z=z is not None, HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
        ELEM_BYTES=state_dtype.itemsize, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=2)


@_mamba1_scan_prefill_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, out, arena, handle_table, ssm_handles, cu_seqlens,
      has_initial_state, state_offset, state_dtype, dt_softplus) -> None:
    return None


def mamba1_scan_prefill(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    arena: torch.Tensor, handle_table: torch.Tensor, ssm_handles: torch.Tensor, cu_seqlens: torch.Tensor,
    has_initial_state: torch.Tensor, spec: HybridModelSpec, layer: int, *,
    D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = True, out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mamba1 selective scan (Jamba) over a packed chunk, time-serial, state kept in the block.

    Per request and token t (fp32):  dt = softplus(dt_t + dt_bias);  h = exp(dt A) h + dt x_t B_t;
    y_t = h C_t + D x_t;  y_t *= silu(z_t).

    Args:
        x, dt: ``[T, d_inner]``; z: ``[T, d_inner]`` or None (no gating).
        A: ``[d_inner, d_state]`` (negative; usually -exp(A_log), fp32).
        B, C: ``[T, d_state]``.
        D, dt_bias: ``[d_inner]`` or None.
        (the rest: see the module docstring)
    Returns:
        y ``[T, d_inner]`` in x's dtype; layer ``layer``'s ssm state ``[d_inner, d_state]`` of every
        active request holds its state after its last token, in spec.ssm_dtype.
    """
    nreq, layout, dev = _check_common(arena, handle_table, ssm_handles, cu_seqlens, has_initial_state, spec,
                                      layer, "ssm_dtype")
    if spec.mamba_version != 1:
        raise ValueError(f"mamba1_scan_prefill needs a Mamba1 spec, got mamba_version={spec.mamba_version} "
                         f"({spec.name!r}); use mamba2_scan_prefill")
    Di, N = spec.d_inner, spec.d_state
    _tensor(x, "x", ndim=2, dtypes=_FLOATS, device=dev)
    if x.shape[1] != Di:
        raise ValueError(f"x must be [T, d_inner={Di}], got shape {tuple(x.shape)}")
    T = x.shape[0]
    _tensor(dt, "dt", dtypes=_FLOATS, device=dev, shape=(T, Di))
    _tensor(A, "A", dtypes=_FLOATS, device=dev, shape=(Di, N))
    _tensor(B, "B", dtypes=_FLOATS, device=dev, shape=(T, N))
    _tensor(C, "C", dtypes=_FLOATS, device=dev, shape=(T, N))
    if z is not None:
        _tensor(z, "z", dtypes=_FLOATS, device=dev, shape=(T, Di))
    if D is not None:
        _tensor(D, "D", dtypes=_FLOATS, device=dev, shape=(Di,))
    if dt_bias is not None:
        _tensor(dt_bias, "dt_bias", dtypes=_FLOATS, device=dev, shape=(Di,))
    out = _check_out(out, (T, Di), x.dtype, dev,
                     {"x": x, "dt": dt, "z": z, "B": B, "C": C, "arena": arena})
    if out is None:
        out = torch.empty_like(x)
    torch.ops.avmp.mamba1_scan_prefill(
        x, dt, A, B, C, D, z, dt_bias, out, arena, handle_table, ssm_handles, cu_seqlens, has_initial_state,
        layout.ssm_offset(layer), spec.ssm_dtype, bool(dt_softplus))
    return out


# ------------------------------------------------------------------------------- Mamba2 scan
@torch.library.custom_op("avmp::mamba2_scan_prefill", mutates_args=("out", "arena"))
def _mamba2_scan_prefill_op(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor], out: torch.Tensor,
    arena: torch.Tensor, handle_table: torch.Tensor, ssm_handles: torch.Tensor, cu_seqlens: torch.Tensor,
    has_initial_state: torch.Tensor, state_offset: int, state_dtype: torch.dtype, dt_softplus: bool,
    chunked: bool, chunk_size: int,
) -> None:
    T, nheads, head_dim = x.shape
    n_groups, d_state = B.shape[1], B.shape[2]
    nreq = ssm_handles.numel()
    args = (x, dt, z if z is not None else x, A, B, C, D if D is not None else A,
            dt_bias if dt_bias is not None else A, out, arena.view(state_dtype), handle_table, ssm_handles,
            cu_seqlens, has_initial_state, T, head_dim, d_state, nreq, handle_table.numel(),
            nheads // n_groups, state_offset,
            x.stride(0), x.stride(1), dt.stride(0),
            z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
            B.stride(0), B.stride(1), C.stride(0), C.stride(1), out.stride(0), out.stride(1))
    flags = dict(HAS_Z=z is not None, HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None,
                 DT_SOFTPLUS=dt_softplus, ELEM_BYTES=state_dtype.itemsize)
    if chunked:
        # tl.dot needs every dimension >= 16
        block_n = max(16, _pow2(d_state))
        block_p = max(16, min(64, _pow2(head_dim)))
        grid = (nreq + 1, nheads, triton.cdiv(head_dim, block_p))
        K.mamba2_chunk_scan_prefill_kernel[grid](
            *args, **flags, CHUNK=chunk_size, BLOCK_P=block_p, BLOCK_N=block_n,
            DOT_DTYPE=_dot_dtype(x.dtype), DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            num_warps=8 if block_n * max(block_p, chunk_size) >= 8192 else 4)
    else:
        block_n = _pow2(d_state)
        block_p = min(_pow2(head_dim), max(1, 2048 // block_n))
        grid = (nreq + 1, nheads, triton.cdiv(head_dim, block_p))
        K.mamba2_scan_prefill_kernel[grid](*args, **flags, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4)


@_mamba2_scan_prefill_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, out, arena, handle_table, ssm_handles, cu_seqlens,
      has_initial_state, state_offset, state_dtype, dt_softplus, chunked, chunk_size) -> None:
    return None


def mamba2_scan_prefill(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    arena: torch.Tensor, handle_table: torch.Tensor, ssm_handles: torch.Tensor, cu_seqlens: torch.Tensor,
    has_initial_state: torch.Tensor, spec: HybridModelSpec, layer: int, *,
    D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = True, out: Optional[torch.Tensor] = None, algorithm: str = "auto",
    chunk_size: int = 64,
) -> torch.Tensor:
    """Mamba2 (SSD) scan (Nemotron-H) over a packed chunk, state kept in the block.

    Per request, head h (group g = h // (nheads / n_groups)) and token t (fp32):
    dt = softplus(dt_t + dt_bias_h);  state = exp(dt A_h) state + dt x_t B_t^T  ([head_dim, d_state]);
    y_t = state C_t + D_h x_t;  y_t *= silu(z_t).

    Args:
        x: ``[T, nheads, head_dim]``; z: same shape or None (no gating, e.g. when a gated RMSNorm
            follows, as in Nemotron-H).
        dt: ``[T, nheads]``; A, D, dt_bias: ``[nheads]`` (D, dt_bias optional).
        B, C: ``[T, n_groups, d_state]``, n_groups dividing nheads.
        algorithm: "serial" (token by token), "chunked" (chunks of ``chunk_size`` tokens through
            tl.dot, state passed between chunks) or "auto" (chunked on CUDA, serial in the
            interpreter).
        chunk_size: power of two >= 16 (chunked only).
        (the rest: see the module docstring)
    Returns:
        y ``[T, nheads, head_dim]`` in x's dtype; layer ``layer``'s ssm state
        ``[nheads, head_dim, d_state]`` of every active request holds its final state, in spec.ssm_dtype.
    """
    nreq, layout, dev = _check_common(arena, handle_table, ssm_handles, cu_seqlens, has_initial_state, spec,
                                      layer, "ssm_dtype")
    if spec.mamba_version != 2:
        raise ValueError(f"mamba2_scan_prefill needs a Mamba2 spec, got mamba_version={spec.mamba_version} "
                         f"({spec.name!r}); use mamba1_scan_prefill")
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm must be one of {_ALGORITHMS}, got {algorithm!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 16 \
            or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size!r}")
    NH, P, N = spec.mamba_num_heads, spec.mamba_head_dim, spec.d_state
    _tensor(x, "x", ndim=3, dtypes=_FLOATS, device=dev)
    if x.shape[1:] != (NH, P):
        raise ValueError(f"x must be [T, nheads={NH}, head_dim={P}], got shape {tuple(x.shape)}")
    T = x.shape[0]
    _tensor(dt, "dt", dtypes=_FLOATS, device=dev, shape=(T, NH))
    _tensor(A, "A", dtypes=_FLOATS, device=dev, shape=(NH,))
    _tensor(B, "B", ndim=3, dtypes=_FLOATS, device=dev)
    G = B.shape[1]
    if B.shape[0] != T or B.shape[2] != N or G < 1:
        raise ValueError(f"B must be [T={T}, n_groups, d_state={N}], got shape {tuple(B.shape)}")
    if NH % G:
        raise ValueError(f"n_groups ({G}, from B.shape[1]) must divide nheads ({NH})")
    _tensor(C, "C", dtypes=_FLOATS, device=dev, shape=(T, G, N))
    if z is not None:
        _tensor(z, "z", dtypes=_FLOATS, device=dev, shape=(T, NH, P))
    if D is not None:
        _tensor(D, "D", dtypes=_FLOATS, device=dev, shape=(NH,))
    if dt_bias is not None:
        _tensor(dt_bias, "dt_bias", dtypes=_FLOATS, device=dev, shape=(NH,))
    out = _check_out(out, (T, NH, P), x.dtype, dev,
                     {"x": x, "dt": dt, "z": z, "B": B, "C": C, "arena": arena})
    if out is None:
        out = torch.empty_like(x)
    chunked = algorithm == "chunked" or (algorithm == "auto" and dev.type == "cuda")
    torch.ops.avmp.mamba2_scan_prefill(
        x, dt, A, B, C, D, z, dt_bias, out, arena, handle_table, ssm_handles, cu_seqlens, has_initial_state,
        layout.ssm_offset(layer), spec.ssm_dtype, bool(dt_softplus), chunked, chunk_size)
    return out
