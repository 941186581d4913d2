"""Pure-torch references of the decode-time Mamba ops (``avmp_triton/ops/mamba_state.py``).

The references never touch the arena: ``gather_*`` copies each request's state out of its SSM
block (through the handle table, as the kernels find it), the ``*_ref`` functions compute on
those copies in fp32 and return ``(out, new_state)``, and ``scatter_*`` writes states back (tests
use it to fill blocks with known values). Rows whose handle is -1 (or unbound) are "skipped": the
gathered state is zeros, the reference output is zeros and the new state equals the old one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from avmp_triton.layout import SSMBlockLayout


def _offsets(handle_table: torch.Tensor, ssm_handles: torch.Tensor) -> list[int]:
    """Unit byte offset per row, -1 for a skipped row (handle -1, out of range, or unbound)."""
    table = handle_table.cpu().tolist()
    offs = []
    for h in ssm_handles.cpu().tolist():
        offs.append(table[h] if 0 <= h < len(table) else -1)
    return offs


def valid_rows(handle_table: torch.Tensor, ssm_handles: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: rows the kernels update (a bound handle)."""
    return torch.tensor([o >= 0 for o in _offsets(handle_table, ssm_handles)], dtype=torch.bool,
                        device=ssm_handles.device)


def _gather(arena, handle_table, ssm_handles, byte_off: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    out = torch.zeros((ssm_handles.numel(), *shape), dtype=dtype, device=arena.device)
    for b, o in enumerate(_offsets(handle_table, ssm_handles)):
        if o >= 0:
            out[b] = arena[o + byte_off: o + byte_off + nbytes].view(dtype).view(shape)
    return out


def _scatter(arena, handle_table, ssm_handles, byte_off: int, state: torch.Tensor) -> None:
    nbytes = state[0].numel() * state.dtype.itemsize
    for b, o in enumerate(_offsets(handle_table, ssm_handles)):
        if o >= 0:
            arena[o + byte_off: o + byte_off + nbytes].view(state.dtype).copy_(state[b].flatten())


def gather_ssm_state(arena: torch.Tensor, handle_table: torch.Tensor, ssm_handles: torch.Tensor,
                     layout: SSMBlockLayout, layer: int, dtype: torch.dtype,
                     shape: tuple | None = None) -> torch.Tensor:
    """Copy of ``layer``'s ssm state of every request: ``[B, *shape]`` (default ``[d_inner, d_state]``;
    Mamba2: pass ``(nheads, head_dim, d_state)``). Skipped rows are zeros."""
    shape = (layout.d_inner, layout.d_state) if shape is None else tuple(shape)
    return _gather(arena, handle_table, ssm_handles, layout.ssm_offset(layer), shape, dtype)


def gather_conv_state(arena: torch.Tensor, handle_table: torch.Tensor, ssm_handles: torch.Tensor,
                      layout: SSMBlockLayout, layer: int, dtype: torch.dtype) -> torch.Tensor:
    """Copy of ``layer``'s conv state of every request: ``[B, d_conv - 1, channels]``, oldest first."""
    return _gather(arena, handle_table, ssm_handles, layout.conv_offset(layer),
                   (layout.conv_width, layout.conv_channels), dtype)


def scatter_ssm_state(arena, handle_table, ssm_handles, layout: SSMBlockLayout, layer: int,
                      state: torch.Tensor) -> None:
    """Write ``state`` ``[B, ...]`` (in the ssm dtype) into each request's block; skipped rows untouched."""
    _scatter(arena, handle_table, ssm_handles, layout.ssm_offset(layer), state)


def scatter_conv_state(arena, handle_table, ssm_handles, layout: SSMBlockLayout, layer: int,
                       state: torch.Tensor) -> None:
    """Write ``state`` ``[B, d_conv - 1, channels]`` (in the conv dtype) into each request's block."""
    _scatter(arena, handle_table, ssm_handles, layout.conv_offset(layer), state)


def _finish(out, new_state, state, x, valid):
    """Cast, then apply skip semantics: zero output and unchanged state for invalid rows."""
    out = out.to(x.dtype)
    new_state = new_state.to(state.dtype)
    if valid is not None:
        v = valid.to(torch.bool)
        out = torch.where(v.view(-1, *[1] * (out.dim() - 1)), out, torch.zeros_like(out))
        new_state = torch.where(v.view(-1, *[1] * (state.dim() - 1)), new_state, state)
    return out, new_state


def _dt(dt, dt_bias, dt_softplus):
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    return F.softplus(dt) if dt_softplus else dt


def mamba1_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                            valid=None):
    """Mamba1 selective state update (Jamba).

    Args:
        state: ``[B, d_inner, d_state]`` (ssm dtype), not modified.
        x, dt, z: ``[B, d_inner]``; A: ``[d_inner, d_state]``; B, C: ``[B, d_state]``;
        D, dt_bias: ``[d_inner]``; valid: optional ``[B]`` bool (False rows are skipped).
    Returns:
        ``(out [B, d_inner] in x's dtype, new_state [B, d_inner, d_state] in state's dtype)``.
    """
    dt = _dt(dt, dt_bias, dt_softplus)                                  # [B, d]
    s = state.float() * torch.exp(A.float()[None] * dt[..., None])
    s = s + B.float()[:, None, :] * (dt * x.float())[..., None]
    out = (s * C.float()[:, None, :]).sum(-1)
    if D is not None:
        out = out + x.float() * D.float()
    if z is not None:
        out = out * F.silu(z.float())
    return _finish(out, s, state, x, valid)


def mamba2_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                            valid=None):
    """Mamba2 selective state update (Nemotron-H): heads, scalar A per head, grouped B and C.

    Args:
        state: ``[B, nheads, head_dim, d_state]``, not modified.
        x, z: ``[B, nheads, head_dim]``; dt: ``[B, nheads]``; A, D, dt_bias: ``[nheads]``;
        B, C: ``[B, n_groups, d_state]`` (head h uses group ``h // (nheads // n_groups)``).
    Returns:
        ``(out [B, nheads, head_dim], new_state [B, nheads, head_dim, d_state])``.
    """
    nheads, G = x.shape[1], B.shape[1]
    Bh = B.float().repeat_interleave(nheads // G, dim=1)                # [B, h, n]
    Ch = C.float().repeat_interleave(nheads // G, dim=1)
    dt = _dt(dt, dt_bias, dt_softplus)                                  # [B, h]
    dA = torch.exp(A.float()[None] * dt)                                # [B, h]
    s = state.float() * dA[..., None, None] + (x.float() * dt[..., None])[..., None] * Bh[:, :, None, :]
    out = (s * Ch[:, :, None, :]).sum(-1)
    if D is not None:
        out = out + x.float() * D.float()[None, :, None]
    if z is not None:
        out = out * F.silu(z.float())
    return _finish(out, s, state, x, valid)


def causal_conv1d_update_ref(conv_state, x, weight, bias=None, activation=None, valid=None):
    """One decode step of a depthwise causal conv1d with a token-major state.

    Args:
        conv_state: ``[B, d_conv - 1, channels]``, oldest input first, not modified.
        x: ``[B, channels]``; weight: ``[channels, d_conv]``; bias: ``[channels]``;
        activation: None or "silu".
    Returns:
        ``(out [B, channels] in x's dtype, new_state [B, d_conv - 1, channels])`` where the new
        state drops the oldest input and appends x (in the state's dtype).
    """
    window = torch.cat([conv_state.float(), x.float()[:, None, :]], dim=1)   # [B, d_conv, c]
    out = (window * weight.float().t()[None]).sum(1)
    if bias is not None:
        out = out + bias.float()
    if activation == "silu":
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    new_state = torch.cat([conv_state[:, 1:], x.to(conv_state.dtype)[:, None, :]], dim=1)
    return _finish(out, new_state, conv_state, x, valid)
