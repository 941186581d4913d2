"""Decode-time Mamba ops over a ``PagedCache``: each updates, in place, one Mamba layer's state
inside every request's SSM block, found through the handle table on the device (no gather, no
scatter, no host sync). Registered as ``torch.ops.avmp.{mamba1_state_update, mamba2_state_update,
causal_conv1d_update}`` (mutating the arena and ``out``), so a step composes with
``torch.compile`` and CUDA graphs.

A row whose handle is -1, out of range, free, of the KV kind, or repeated within the call is
skipped: its output is zeros and no byte of any unit is read or written (two rows would race on
one state). On CPU-resident metadata the launchers raise instead (InvalidHandleError naming the
position and handle).
"""
import dataclasses
import math
from typing import Optional

import torch
import triton

from avmp_triton import _triton_env  # noqa: F401  (before triton: the interpreter on CPU-only hosts)
from avmp_triton._checks import check_tensor
from avmp_triton.kernels import mamba_state as K
from avmp_triton.memory.cache import PagedCache
from avmp_triton.ops._args import (
    check_float, check_mamba1_inputs, check_mamba2_inputs, check_on_host, check_opt_float, check_out, repeat_block,
    resolve_launch, ssm_cache_of,
)

__all__ = [
    "MambaStateConfig", "causal_conv1d_update", "conv1d_launch_config", "mamba1_launch_config",
    "mamba1_state_update", "mamba2_launch_config", "mamba2_state_update",
]

_UNIT_ALIGN_BYTES = 16  # every allocator's units start on a 16-byte boundary


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MambaStateConfig:
    """Launch shape of a state-update kernel; a field left None comes from the op's launch table."""
    block: int | None = None      # per program: channels (Mamba1, conv) or head rows (Mamba2)
    num_warps: int | None = None


# The kernels are bound by memory: each program should move tens of KB with full-width loads
# along d_state. Hand-made, never autotuned (an autotuner re-runs a kernel that updates state).

def mamba1_launch_config(d_inner: int, d_state: int) -> MambaStateConfig:
    """A ``[block, d_state]`` tile of ~2048 states of one request per program (d_state 16: 128
    channels, 4 warps): on the H100 it beat 256 channels x 8 warps at Jamba bf16 B=256 (64.4 against
    67.5 us) and B=64 (21.6 against 22.9; perf/results/sweep_decode_variants_H100_3bc831e.json).
    Several requests per program sharing one A tile lost every cell (B=256: 89.6 us at best against
    73.3; perf/results/sweep_decode_variants_H100_32e7231.json), so there is no such launch."""
    bn = triton.next_power_of_2(d_state)
    block_d = max(4, min(256, 2048 // bn))
    block_d = min(block_d, max(4, triton.next_power_of_2(d_inner)))
    return MambaStateConfig(block=block_d, num_warps=8 if block_d * bn >= 4096 else 4)


def mamba2_launch_config(head_dim: int, d_state: int) -> MambaStateConfig:
    """Up to ~8192 states of one head per program (head_dim 64 x d_state 128: the whole head,
    16 KiB bf16 / 32 KiB fp32 each way)."""
    bn = triton.next_power_of_2(d_state)
    block_p = min(triton.next_power_of_2(head_dim), max(1, 8192 // bn))
    return MambaStateConfig(block=block_p, num_warps=8 if block_p * bn >= 4096 else 4)


def conv1d_launch_config(channels: int, d_conv: int) -> MambaStateConfig:
    """Up to 1024 channels x d_conv per program."""
    return MambaStateConfig(block=min(1024, max(16, triton.next_power_of_2(channels))), num_warps=4)


def _align(state_off_elems: int, itemsize: int) -> int:
    return math.gcd(_UNIT_ALIGN_BYTES // itemsize, state_off_elems)


@torch.library.custom_op("avmp::mamba1_state_update", mutates_args=("arena", "out"))
def _mamba1_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
               ssm_handles: torch.Tensor, arena: torch.Tensor, handle_table: torch.Tensor,
               handle_kinds: torch.Tensor, out: torch.Tensor, state_offset: int, state_dtype: torch.dtype,
               dt_softplus: bool, block_d: int, num_warps: int) -> None:
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
def _(x, dt, A, B, C, D, z, dt_bias, ssm_handles, arena, handle_table, handle_kinds, out, state_offset,
      state_dtype, dt_softplus, block_d, num_warps) -> None:
    return None


@torch.library.custom_op("avmp::mamba2_state_update", mutates_args=("arena", "out"))
def _mamba2_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
               ssm_handles: torch.Tensor, arena: torch.Tensor, handle_table: torch.Tensor,
               handle_kinds: torch.Tensor, out: torch.Tensor, state_offset: int, state_dtype: torch.dtype,
               dt_softplus: bool, block_p: int, num_warps: int) -> None:
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
def _(x, dt, A, B, C, D, z, dt_bias, ssm_handles, arena, handle_table, handle_kinds, out, state_offset,
      state_dtype, dt_softplus, block_p, num_warps) -> None:
    return None


@torch.library.custom_op("avmp::causal_conv1d_update", mutates_args=("arena", "out"))
def _conv1d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ssm_handles: torch.Tensor,
               arena: torch.Tensor, handle_table: torch.Tensor, handle_kinds: torch.Tensor, out: torch.Tensor,
               state_offset: int, conv_dtype: torch.dtype, silu: bool, block_c: int, num_warps: int) -> None:
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
def _(x, weight, bias, ssm_handles, arena, handle_table, handle_kinds, out, state_offset, conv_dtype, silu, block_c,
      num_warps) -> None:
    return None


def _check_softplus(dt_softplus) -> None:
    if not isinstance(dt_softplus, bool):
        raise TypeError(f"dt_softplus must be a bool, got {dt_softplus!r}")


def mamba1_state_update(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        ssm_handles: torch.Tensor, cache: PagedCache, *, layer: int,
                        D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                        dt_bias: Optional[torch.Tensor] = None, dt_softplus: bool = False,
                        out: Optional[torch.Tensor] = None,
                        config: Optional[MambaStateConfig] = None) -> torch.Tensor:
    """Mamba1 selective state update (Jamba), in place in each request's block.

    ``dt = softplus(dt + dt_bias)`` (if ``dt_softplus``); ``state = state * exp(A * dt) + B * dt * x``;
    ``out = sum(state * C, -1) + D * x``; ``out *= silu(z)``. fp32 math, state stored in its dtype.

    Args:
        x, dt: ``[B, d_inner]``; A: ``[d_inner, d_state]`` (fp32); B, C: ``[B, d_state]``;
        D, dt_bias: ``[d_inner]``; z: ``[B, d_inner]``. Last dimensions contiguous.
        ssm_handles: ``[B]`` int32, one SSM handle per request; -1 skips the row.
        cache: ``PagedCache.of(allocator)``; layer: Mamba layer in ``[0, cache.num_mamba_layers)``.
        out: optional ``[B, d_inner]`` output in x's dtype.
        config: ``MambaStateConfig`` overrides of ``mamba1_launch_config`` (block = channels).
    Returns:
        ``out`` ``[B, d_inner]``; skipped rows are zeros.
    """
    layout, _, dtype, batch, dev = ssm_cache_of(cache, ssm_handles, layer, "ssm", 1)
    d, n = layout.d_inner, layout.d_state
    check_mamba1_inputs(dev, batch, d, n, x, dt, A, B, C, D, z, dt_bias)
    _check_softplus(dt_softplus)
    cfg = resolve_launch(config, mamba1_launch_config(d, n))
    out = check_out(out, x)
    check_on_host(cache.handle_table, cache.handle_kinds, ssm_handles)
    torch.ops.avmp.mamba1_state_update(x, dt, A, B, C, D, z, dt_bias, ssm_handles, cache.arena, cache.handle_table,
                                       cache.handle_kinds, out, layout.ssm_offset(layer), dtype, dt_softplus,
                                       cfg.block, cfg.num_warps)
    return out


def mamba2_state_update(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        ssm_handles: torch.Tensor, cache: PagedCache, *, layer: int,
                        D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                        dt_bias: Optional[torch.Tensor] = None, dt_softplus: bool = False,
                        out: Optional[torch.Tensor] = None,
                        config: Optional[MambaStateConfig] = None) -> torch.Tensor:
    """Mamba2 selective state update (Nemotron-H): scalar A per head, grouped B and C.

    The state of a layer is ``[nheads, head_dim, d_state]``; head h reads group
    ``h // (nheads // n_groups)`` of B and C.

    Args:
        x, z: ``[B, nheads, head_dim]``; dt: ``[B, nheads]``; A, D, dt_bias: ``[nheads]``;
        B, C: ``[B, n_groups, d_state]``. Last dimensions contiguous.
        ssm_handles, cache, layer: as in ``mamba1_state_update``.
        out: optional ``[B, nheads, head_dim]`` output in x's dtype.
        config: ``MambaStateConfig`` overrides of ``mamba2_launch_config`` (block = head rows).
    Returns:
        ``out`` ``[B, nheads, head_dim]``; skipped rows are zeros.
    """
    layout, spec, dtype, batch, dev = ssm_cache_of(cache, ssm_handles, layer, "ssm", 2)
    check_tensor(x, "x", device=dev, beside="the cache", dim=3)
    check_mamba2_inputs(dev, batch, layout, spec, x, dt, A, B, C, D, z, dt_bias)
    _check_softplus(dt_softplus)
    cfg = resolve_launch(config, mamba2_launch_config(x.shape[2], layout.d_state))
    out = check_out(out, x)
    check_on_host(cache.handle_table, cache.handle_kinds, ssm_handles)
    torch.ops.avmp.mamba2_state_update(x, dt, A, B, C, D, z, dt_bias, ssm_handles, cache.arena, cache.handle_table,
                                       cache.handle_kinds, out, layout.ssm_offset(layer), dtype, dt_softplus,
                                       cfg.block, cfg.num_warps)
    return out


def causal_conv1d_update(x: torch.Tensor, weight: torch.Tensor, ssm_handles: torch.Tensor, cache: PagedCache, *,
                         layer: int, bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                         out: Optional[torch.Tensor] = None,
                         config: Optional[MambaStateConfig] = None) -> torch.Tensor:
    """One decode step of the depthwise causal conv1d, with the conv state in each request's block.

    ``out[c] = act(sum_k weight[c, k] * window[k] + bias[c])`` with ``window = (state rows, x)``
    oldest first; then the state drops its oldest row and appends x (in the conv dtype).

    Args:
        x: ``[B, channels]`` (Mamba2: the xBC channels); weight: ``[channels, d_conv]``;
        bias: ``[channels]``; activation: None or "silu".
        ssm_handles, cache, layer: as in ``mamba1_state_update``.
        out: optional ``[B, channels]`` output in x's dtype.
        config: ``MambaStateConfig`` overrides of ``conv1d_launch_config`` (block = channels).
    Returns:
        ``out`` ``[B, channels]``; skipped rows are zeros.
    """
    layout, _, dtype, batch, dev = ssm_cache_of(cache, ssm_handles, layer, "conv", None)
    ch = layout.conv_channels
    d_conv = layout.conv_width + 1
    check_float(x, "x", dev, (batch, ch))
    check_tensor(weight, "weight", device=dev, beside="the cache", dim=2)
    if weight.shape[0] == ch and weight.shape[1] != d_conv:
        raise ValueError(f"weight has d_conv={weight.shape[1]}; the layout stores {layout.conv_width} "
                         f"past inputs (d_conv={d_conv})")
    check_float(weight, "weight", dev, (ch, d_conv), inner_contiguous=False)
    if weight.stride(1) != 1:
        raise ValueError(f"weight must be contiguous in its last dimension, got strides {weight.stride()}")
    check_opt_float(bias, "bias", dev, (ch,))
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    cfg = resolve_launch(config, conv1d_launch_config(ch, d_conv))
    out = check_out(out, x)
    check_on_host(cache.handle_table, cache.handle_kinds, ssm_handles)
    torch.ops.avmp.causal_conv1d_update(x, weight, bias, ssm_handles, cache.arena, cache.handle_table,
                                        cache.handle_kinds, out, layout.conv_offset(layer), dtype,
                                        activation == "silu", cfg.block, cfg.num_warps)
    return out
