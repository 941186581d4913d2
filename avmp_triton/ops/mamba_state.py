"""Launchers of the decode-time Mamba kernels (``avmp_triton.kernels.mamba_state``).

Each op updates, in place, the state of one Mamba layer inside every request's SSM block, found
through the handle table on the device: no gather, no scatter, no host sync. The public
functions validate their inputs (metadata only), pick block sizes from a small fixed table (no
autotuning: the kernels mutate state), allocate ``out`` when it is not given, and call a PyTorch
custom op (``avmp::mamba1_state_update``, ``avmp::mamba2_state_update``,
``avmp::causal_conv1d_update``) that mutates ``arena`` and ``out``, so a decode step composes
with ``torch.compile`` and can be captured in a CUDA graph.

Common arguments:
    arena: ``[capacity]`` uint8, the allocator's arena (``allocator.arena``).
    handle_table: ``[H]`` int64 handle -> unit byte offset, -1 when free (``allocator.handle_table``).
    handle_kinds (keyword, required): ``[H]`` int32 handle -> kind, 0 free, 1 KV, 2 SSM
        (``allocator.handle_kind``); the kernels serve SSM handles only.
    ssm_handles: ``[B]`` int32, one SSM handle per request; -1 skips the row (output zeros, no
        state touched).
    layout: the model's ``HybridModelSpec`` (dtypes come from it), or an ``SSMBlockLayout`` with
        ``state_dtype=`` / ``conv_dtype=`` given.
    layer: index of the Mamba layer, in ``[0, num_mamba_layers)``.

A row whose handle is -1, out of range, free, of the KV kind, or repeated within the call is
skipped: its output is zeros and no byte of any unit is read or written (two rows would race on
one state). On CPU-resident metadata the launchers raise instead (InvalidHandleError naming the
position and handle); on a GPU they never read the metadata's values (no sync).

Use ``MambaStateOps(allocator)`` to bind the arena, table, kinds and spec of an allocator once.
"""
import math
from typing import Optional

import torch
import triton

from avmp_triton import _triton_env  # noqa: F401  (sets the interpreter up on CPU-only hosts)
from avmp_triton.kernels import mamba_state as K
from avmp_triton.ops import mamba_prefill
from avmp_triton.ops._args import (
    check_float, check_launch, check_mamba1_inputs, check_on_host, check_opt_float, check_out, check_tensor,
    repeat_block, state_location,
)
from avmp_triton.spec import HybridModelSpec

__all__ = [
    "MambaStateOps", "causal_conv1d_update", "conv1d_launch_config", "mamba1_launch_config",
    "mamba1_state_update", "mamba2_launch_config", "mamba2_state_update",
]

_UNIT_ALIGN_BYTES = 16  # every allocator's units start on a 16-byte boundary
_MAX_GRID_YZ = 65535


# launch table (hand-made, no autotuning: the kernels update state in place)
# Bandwidth-bound: each program should move tens of KB with full-width loads along d_state.

def mamba1_launch_config(d_inner: int, d_state: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for Mamba1: a ``[BLOCK_D, d_state]`` tile of ~4096 states per program
    (d_state 16: 256 channels, 16 KiB of bf16 state read and written plus 16 KiB of fp32 A)."""
    bn = triton.next_power_of_2(d_state)
    block_d = max(4, min(256, 4096 // bn))
    block_d = min(block_d, max(4, triton.next_power_of_2(d_inner)))
    return block_d, 8 if block_d * bn >= 4096 else 4


def mamba2_launch_config(head_dim: int, d_state: int) -> tuple[int, int]:
    """(BLOCK_P, num_warps) for Mamba2: up to ~8192 states of one head per program (head_dim 64 x
    d_state 128: the whole head, 16 KiB bf16 / 32 KiB fp32 each way)."""
    bn = triton.next_power_of_2(d_state)
    block_p = min(triton.next_power_of_2(head_dim), max(1, 8192 // bn))
    return block_p, 8 if block_p * bn >= 4096 else 4


def conv1d_launch_config(channels: int, d_conv: int) -> tuple[int, int]:
    """(BLOCK_C, num_warps) for the conv update: up to 1024 channels x d_conv per program."""
    return min(1024, max(16, triton.next_power_of_2(channels))), 4


# custom ops: the only place that launches; arguments are plain tensors and numbers

def _align(state_off_elems: int, itemsize: int) -> int:
    return math.gcd(_UNIT_ALIGN_BYTES // itemsize, state_off_elems)


@torch.library.custom_op("avmp::mamba1_state_update", mutates_args=("arena", "out"))
def _mamba1_op(arena: torch.Tensor, handle_table: torch.Tensor, handle_kinds: torch.Tensor,
               ssm_handles: torch.Tensor,
               x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
               out: torch.Tensor, state_offset: int, state_dtype: torch.dtype, dt_softplus: bool,
               block_d: int, num_warps: int) -> None:
    batch, d_inner = x.shape
    d_state = A.shape[1]
    if batch == 0:
        return
    itemsize = state_dtype.itemsize
    off = state_offset // itemsize
    grid = (batch, triton.cdiv(d_inner, block_d))
    K.mamba1_state_update_kernel[grid](
        arena.view(state_dtype), handle_table, handle_kinds, ssm_handles, x, dt, A, B, C, D, z, dt_bias, out,
        handle_table.numel(), batch, off, d_inner,
        x.stride(0), dt.stride(0), A.stride(0), B.stride(0), C.stride(0),
        z.stride(0) if z is not None else 0, out.stride(0),
        D_STATE=d_state, DT_SOFTPLUS=dt_softplus, ELEM_BYTES=itemsize, ALIGN=_align(off, itemsize),
        BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(d_state), BLOCK_B=repeat_block(batch),
        num_warps=num_warps)


@_mamba1_op.register_fake
def _(arena, handle_table, handle_kinds, ssm_handles, x, dt, A, B, C, D, z, dt_bias, out, state_offset, state_dtype,
      dt_softplus, block_d, num_warps) -> None:
    return None


@torch.library.custom_op("avmp::mamba2_state_update", mutates_args=("arena", "out"))
def _mamba2_op(arena: torch.Tensor, handle_table: torch.Tensor, handle_kinds: torch.Tensor,
               ssm_handles: torch.Tensor,
               x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
               out: torch.Tensor, state_offset: int, state_dtype: torch.dtype, dt_softplus: bool,
               block_p: int, num_warps: int) -> None:
    batch, nheads, head_dim = x.shape
    n_groups, d_state = B.shape[1], B.shape[2]
    if batch == 0:
        return
    itemsize = state_dtype.itemsize
    off = state_offset // itemsize
    grid = (batch, nheads, triton.cdiv(head_dim, block_p))
    K.mamba2_state_update_kernel[grid](
        arena.view(state_dtype), handle_table, handle_kinds, ssm_handles, x, dt, A, B, C, D, z, dt_bias, out,
        handle_table.numel(), batch, off, head_dim, nheads // n_groups,
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
        out.stride(0), out.stride(1),
        D_STATE=d_state, DT_SOFTPLUS=dt_softplus, ELEM_BYTES=itemsize, ALIGN=_align(off, itemsize),
        BLOCK_P=block_p, BLOCK_N=triton.next_power_of_2(d_state), BLOCK_B=repeat_block(batch),
        num_warps=num_warps)


@_mamba2_op.register_fake
def _(arena, handle_table, handle_kinds, ssm_handles, x, dt, A, B, C, D, z, dt_bias, out, state_offset, state_dtype,
      dt_softplus, block_p, num_warps) -> None:
    return None


@torch.library.custom_op("avmp::causal_conv1d_update", mutates_args=("arena", "out"))
def _conv1d_op(arena: torch.Tensor, handle_table: torch.Tensor, handle_kinds: torch.Tensor,
               ssm_handles: torch.Tensor,
               x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
               state_offset: int, conv_dtype: torch.dtype, silu: bool, block_c: int,
               num_warps: int) -> None:
    batch, channels = x.shape
    d_conv = weight.shape[1]
    if batch == 0:
        return
    itemsize = conv_dtype.itemsize
    off = state_offset // itemsize
    grid = (batch, triton.cdiv(channels, block_c))
    K.causal_conv1d_update_kernel[grid](
        arena.view(conv_dtype), handle_table, handle_kinds, ssm_handles, x, weight, bias, out,
        handle_table.numel(), batch, off, channels, x.stride(0), weight.stride(0), out.stride(0),
        D_CONV=d_conv, SILU=silu, ELEM_BYTES=itemsize, ALIGN=_align(off, itemsize),
        BLOCK_C=block_c, BLOCK_K=triton.next_power_of_2(d_conv), BLOCK_B=repeat_block(batch),
        num_warps=num_warps)


@_conv1d_op.register_fake
def _(arena, handle_table, handle_kinds, ssm_handles, x, weight, bias, out, state_offset, conv_dtype, silu, block_c,
      num_warps) -> None:
    return None


# public ops

def mamba1_state_update(arena: torch.Tensor, handle_table: torch.Tensor, ssm_handles: torch.Tensor,
                        layout, layer: int, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                        B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor] = None,
                        z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None, *,
                        handle_kinds: torch.Tensor, dt_softplus: bool = False,
                        state_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None,
                        block_d: Optional[int] = None, num_warps: Optional[int] = None) -> torch.Tensor:
    """Mamba1 selective state update (Jamba), in place in each request's block.

    ``dt = softplus(dt + dt_bias)`` (if ``dt_softplus``); ``state = state * exp(A * dt) + B * dt * x``;
    ``out = sum(state * C, -1) + D * x``; ``out *= silu(z)``. fp32 math, state stored in its dtype.

    Args:
        x, dt: ``[B, d_inner]``; A: ``[d_inner, d_state]`` (fp32); B, C: ``[B, d_state]``;
        D, dt_bias: ``[d_inner]``; z: ``[B, d_inner]``. Last dimensions contiguous.
        state_dtype: the ssm dtype, required with an ``SSMBlockLayout``.
        out: optional ``[B, d_inner]`` output in x's dtype.
        block_d, num_warps: launch shape (default from ``mamba1_launch_config``).
    Returns:
        ``out`` ``[B, d_inner]``; skipped rows are zeros.
    """
    layout, _, dtype, batch, dev = state_location(arena, handle_table, handle_kinds, ssm_handles, layout, layer,
                                                   state_dtype, "state_dtype", "ssm", 1)
    d, n = layout.d_inner, layout.d_state
    check_mamba1_inputs(dev, batch, d, n, x, dt, A, B, C, D, z, dt_bias)
    if not isinstance(dt_softplus, bool):
        raise TypeError(f"dt_softplus must be a bool, got {dt_softplus!r}")
    block_d, num_warps = check_launch("mamba1", block_d, "block_d", num_warps, mamba1_launch_config(d, n))
    out = check_out(out, x)
    check_on_host(handle_table, handle_kinds, ssm_handles)
    _mamba1_op(arena, handle_table, handle_kinds, ssm_handles, x, dt, A, B, C, D, z, dt_bias, out,
               layout.ssm_offset(layer), dtype, dt_softplus, block_d, num_warps)
    return out


def mamba2_state_update(arena: torch.Tensor, handle_table: torch.Tensor, ssm_handles: torch.Tensor,
                        layout, layer: int, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                        B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor] = None,
                        z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None, *,
                        handle_kinds: torch.Tensor, dt_softplus: bool = False,
                        state_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None,
                        block_p: Optional[int] = None, num_warps: Optional[int] = None) -> torch.Tensor:
    """Mamba2 selective state update (Nemotron-H): scalar A per head, grouped B and C.

    The state of a layer is ``[nheads, head_dim, d_state]``; head h reads group
    ``h // (nheads // n_groups)`` of B and C.

    Args:
        x, z: ``[B, nheads, head_dim]``; dt: ``[B, nheads]``; A, D, dt_bias: ``[nheads]``;
        B, C: ``[B, n_groups, d_state]``. Last dimensions contiguous.
        state_dtype: the ssm dtype, required with an ``SSMBlockLayout``.
        out: optional ``[B, nheads, head_dim]`` output in x's dtype.
        block_p, num_warps: launch shape (default from ``mamba2_launch_config``).
    Returns:
        ``out`` ``[B, nheads, head_dim]``; skipped rows are zeros.
    """
    layout, spec, dtype, batch, dev = state_location(arena, handle_table, handle_kinds, ssm_handles, layout, layer,
                                                      state_dtype, "state_dtype", "ssm", 2)
    check_tensor(x, "x", device=dev, beside="the arena", dim=3)
    nheads, head_dim = x.shape[1], x.shape[2]
    if nheads * head_dim != layout.d_inner:
        raise ValueError(f"x's nheads * head_dim = {nheads} * {head_dim} must equal the layout's "
                         f"d_inner ({layout.d_inner})")
    if spec is not None and (nheads, head_dim) != (spec.mamba_num_heads, spec.mamba_head_dim):
        raise ValueError(f"x has {nheads} heads x {head_dim}; spec {spec.name!r} has "
                         f"{spec.mamba_num_heads} x {spec.mamba_head_dim}")
    n = layout.d_state
    check_float(x, "x", dev, (batch, nheads, head_dim))
    check_float(dt, "dt", dev, (batch, nheads))
    check_float(A, "A", dev, (nheads,))
    check_tensor(B, "B", device=dev, beside="the arena", dim=3)
    n_groups = B.shape[1]
    if n_groups < 1 or nheads % n_groups:
        raise ValueError(f"n_groups (B.shape[1] = {n_groups}) must divide nheads ({nheads})")
    if spec is not None and n_groups != spec.n_groups:
        raise ValueError(f"B has n_groups={n_groups}; spec {spec.name!r} has {spec.n_groups}")
    check_float(B, "B", dev, (batch, n_groups, n))
    check_float(C, "C", dev, (batch, n_groups, n))
    check_opt_float(D, "D", dev, (nheads,))
    check_opt_float(z, "z", dev, (batch, nheads, head_dim))
    check_opt_float(dt_bias, "dt_bias", dev, (nheads,))
    if not isinstance(dt_softplus, bool):
        raise TypeError(f"dt_softplus must be a bool, got {dt_softplus!r}")
    if nheads > _MAX_GRID_YZ:
        raise ValueError(f"nheads={nheads} exceeds the grid limit {_MAX_GRID_YZ}")
    block_p, num_warps = check_launch("mamba2", block_p, "block_p", num_warps,
                                       mamba2_launch_config(head_dim, n))
    out = check_out(out, x)
    check_on_host(handle_table, handle_kinds, ssm_handles)
    _mamba2_op(arena, handle_table, handle_kinds, ssm_handles, x, dt, A, B, C, D, z, dt_bias, out,
               layout.ssm_offset(layer), dtype, dt_softplus, block_p, num_warps)
    return out


def causal_conv1d_update(arena: torch.Tensor, handle_table: torch.Tensor, ssm_handles: torch.Tensor,
                         layout, layer: int, x: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, activation: Optional[str] = None, *,
                         handle_kinds: torch.Tensor, conv_dtype: Optional[torch.dtype] = None,
                         out: Optional[torch.Tensor] = None, block_c: Optional[int] = None,
                         num_warps: Optional[int] = None) -> torch.Tensor:
    """One decode step of the depthwise causal conv1d, with the conv state in each request's block.

    ``out[c] = act(sum_k weight[c, k] * window[k] + bias[c])`` with ``window = (state rows, x)``
    oldest first; then the state drops its oldest row and appends x (in the conv dtype).

    Args:
        x: ``[B, channels]`` (Mamba2: the xBC channels); weight: ``[channels, d_conv]``;
        bias: ``[channels]``; activation: None or "silu".
        conv_dtype: the conv-state dtype, required with an ``SSMBlockLayout``.
        out: optional ``[B, channels]`` output in x's dtype.
        block_c, num_warps: launch shape (default from ``conv1d_launch_config``).
    Returns:
        ``out`` ``[B, channels]``; skipped rows are zeros.
    """
    layout, _, dtype, batch, dev = state_location(arena, handle_table, handle_kinds, ssm_handles, layout, layer,
                                                   conv_dtype, "conv_dtype", "conv", None)
    ch = layout.conv_channels
    d_conv = layout.conv_width + 1
    check_float(x, "x", dev, (batch, ch))
    check_tensor(weight, "weight", device=dev, beside="the arena", dim=2)
    if weight.shape[0] == ch and weight.shape[1] != d_conv:
        raise ValueError(f"weight has d_conv={weight.shape[1]}; the layout stores {layout.conv_width} "
                         f"past inputs (d_conv={d_conv})")
    check_float(weight, "weight", dev, (ch, d_conv), inner_contiguous=False)
    if weight.stride(1) != 1:
        raise ValueError(f"weight must be contiguous in its last dimension, got strides {weight.stride()}")
    check_opt_float(bias, "bias", dev, (ch,))
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    block_c, num_warps = check_launch("conv1d", block_c, "block_c", num_warps,
                                       conv1d_launch_config(ch, d_conv))
    out = check_out(out, x)
    check_on_host(handle_table, handle_kinds, ssm_handles)
    _conv1d_op(arena, handle_table, handle_kinds, ssm_handles, x, weight, bias, out, layout.conv_offset(layer), dtype,
               activation == "silu", block_c, num_warps)
    return out


class MambaStateOps:
    """The Mamba ops (decode and prefill) bound to an allocator's arena, handle table, handle kinds
    and spec.

    ``ops = MambaStateOps(alloc); y = ops.mamba2_state_update(handles, layer, x, dt, A, B, C, ...)``.
    The arena and tables are read at every call, so handles stay valid across rebalancing.
    """

    def __init__(self, allocator):
        spec = getattr(allocator, "spec", None)
        if not isinstance(spec, HybridModelSpec) or not isinstance(getattr(allocator, "arena", None), torch.Tensor):
            raise TypeError(f"allocator must be an arena allocator (AVMPAllocator, ...), got {type(allocator).__name__}")
        self.allocator = allocator
        self.spec = spec

    def mamba1_state_update(self, ssm_handles, layer, x, dt, A, B, C, D=None, z=None, dt_bias=None, **kw):
        a = self.allocator
        return mamba1_state_update(a.arena, a.handle_table, ssm_handles, self.spec, layer, x, dt, A, B, C,
                                   D, z, dt_bias, handle_kinds=a.handle_kind, **kw)

    def mamba2_state_update(self, ssm_handles, layer, x, dt, A, B, C, D=None, z=None, dt_bias=None, **kw):
        a = self.allocator
        return mamba2_state_update(a.arena, a.handle_table, ssm_handles, self.spec, layer, x, dt, A, B, C,
                                   D, z, dt_bias, handle_kinds=a.handle_kind, **kw)

    def causal_conv1d_update(self, ssm_handles, layer, x, weight, bias=None, activation=None, **kw):
        a = self.allocator
        return causal_conv1d_update(a.arena, a.handle_table, ssm_handles, self.spec, layer, x, weight,
                                    bias, activation, handle_kinds=a.handle_kind, **kw)

    def causal_conv1d_prefill(self, ssm_handles, layer, x, weight, bias=None, activation=None, **kw):
        a = self.allocator
        return mamba_prefill.causal_conv1d_prefill(a.arena, a.handle_table, ssm_handles, self.spec, layer, x,
                                                   weight, bias, activation, handle_kinds=a.handle_kind, **kw)

    def mamba1_scan_prefill(self, ssm_handles, layer, x, dt, A, B, C, D=None, z=None, dt_bias=None, **kw):
        a = self.allocator
        return mamba_prefill.mamba1_scan_prefill(a.arena, a.handle_table, ssm_handles, self.spec, layer, x, dt, A,
                                                 B, C, D, z, dt_bias, handle_kinds=a.handle_kind, **kw)

    def mamba2_scan_prefill(self, ssm_handles, layer, x, dt, A, B, C, D=None, z=None, dt_bias=None, **kw):
        a = self.allocator
        return mamba_prefill.mamba2_scan_prefill(a.arena, a.handle_table, ssm_handles, self.spec, layer, x, dt, A,
                                                 B, C, D, z, dt_bias, handle_kinds=a.handle_kind, **kw)
