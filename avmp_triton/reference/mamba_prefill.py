"""Pure-torch references of the Mamba prefill ops (avmp_triton/ops/mamba_prefill.py).

Two levels:

- dense per-request functions (``conv1d_ref``, ``selective_scan_ref``, ``ssd_scan_ref``): one
  request, an explicit initial state in, (outputs, final state) out; fp32 math, a token loop;
- arena wrappers (``*_prefill_ref``) with the ops' inputs, but the cache given as raw tensors and
  a spec (``arena, handle_table, ssm_handles, cu_seqlens, has_initial_state, spec, layer``, where
  the ops take a ``PagedCache`` and ``layer=``): they resolve each request's block through the
  handle table on the host, read and write the state in the arena in its dtype (the spec's
  ``ssm_dtype`` / ``conv_dtype``), and return the output in x's dtype. Same conventions as the
  kernels (-1 handle: zero output, state untouched; padded tail past cu_seqlens[B]: zero output).

The math follows state-spaces/mamba's ``selective_scan_ref`` / SSD and Dao-AILab/causal-conv1d's
``causal_conv1d_ref`` (initial states, final states).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from avmp_triton.layout import ssm_block_layout
from avmp_triton.spec import HybridModelSpec


def _step_sizes(dt, dt_bias, dt_softplus: bool) -> torch.Tensor:
    """dt + dt_bias in fp32, through softplus when the op applies it."""
    dt = dt.float() if dt_bias is None else dt.float() + dt_bias.float()
    return F.softplus(dt) if dt_softplus else dt

def conv1d_ref(x, weight, bias=None, init_state=None, activation=None):
    """x ``[L, C]``, weight ``[C, W]``, init_state ``[W - 1, C]`` (None: zeros), oldest first.
    Returns (out ``[L, C]`` fp32, final state ``[W - 1, C]`` fp32: the last W - 1 inputs)."""
    L, C = x.shape
    W = weight.shape[1]
    if init_state is None:
        init_state = torch.zeros(W - 1, C, dtype=torch.float32, device=x.device)
    full = torch.cat([init_state.float(), x.float()], 0)   # [W - 1 + L, C]
    w = weight.float()
    out = torch.zeros(L, C, dtype=torch.float32, device=x.device)
    for t in range(L):
        out[t] = (full[t:t + W] * w.t()).sum(0)           # window ends at full[W - 1 + t] = x[t]
    if bias is not None:
        out += bias.float()
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return out, full[full.shape[0] - (W - 1):].clone()


def selective_scan_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, h0=None):
    """Mamba1, one request: x, dt, z ``[L, D]``, A ``[D, N]``, B, C ``[L, N]``, h0 ``[D, N]``.
    Returns (y ``[L, D]`` fp32, final state ``[D, N]`` fp32)."""
    L, Di = x.shape
    N = A.shape[1]
    h = torch.zeros(Di, N, dtype=torch.float32, device=x.device) if h0 is None else h0.float().clone()
    dt = _step_sizes(dt, dt_bias, dt_softplus)
    A = A.float()
    y = torch.zeros(L, Di, dtype=torch.float32, device=x.device)
    for t in range(L):
        xt = x[t].float()
        h = torch.exp(dt[t][:, None] * A) * h + (dt[t] * xt)[:, None] * B[t].float()[None, :]
        y[t] = h @ C[t].float()
        if D is not None:
            y[t] += D.float() * xt
        if z is not None:
            y[t] *= F.silu(z[t].float())
    return y, h


def ssd_scan_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, h0=None):
    """Mamba2, one request: x, z ``[L, H, P]``, dt ``[L, H]``, A, D, dt_bias ``[H]``,
    B, C ``[L, G, N]``, h0 ``[H, P, N]``. Returns (y ``[L, H, P]`` fp32, state ``[H, P, N]`` fp32)."""
    L, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    rep = H // G
    h = torch.zeros(H, P, N, dtype=torch.float32, device=x.device) if h0 is None else h0.float().clone()
    dt = _step_sizes(dt, dt_bias, dt_softplus)
    A = A.float()
    y = torch.zeros(L, H, P, dtype=torch.float32, device=x.device)
    for t in range(L):
        xt = x[t].float()                                   # [H, P]
        Bt = B[t].float().repeat_interleave(rep, 0)         # [H, N]
        Ct = C[t].float().repeat_interleave(rep, 0)
        dA = torch.exp(dt[t] * A)                           # [H]
        h = dA[:, None, None] * h + (dt[t][:, None] * xt)[:, :, None] * Bt[:, None, :]
        y[t] = (h * Ct[:, None, :]).sum(-1)
        if D is not None:
            y[t] += D.float()[:, None] * xt
        if z is not None:
            y[t] *= F.silu(z[t].float())
    return y, h


def _state_view(arena, handle_table, handle: int, offset: int, dtype, shape):
    """The state of ``handle`` as a view into the arena, or None for a skipped request."""
    if handle < 0 or handle >= handle_table.numel():
        return None
    blk = int(handle_table[handle])
    if blk < 0:
        return None
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    start = blk + offset
    return arena[start:start + nbytes].view(dtype).view(shape)


def _requests(x, ssm_handles, cu_seqlens, has_initial_state):
    cu = [int(v) for v in cu_seqlens.tolist()]
    for b, h in enumerate(ssm_handles.tolist()):
        yield b, int(h), cu[b], cu[b + 1], bool(has_initial_state[b])


def causal_conv1d_prefill_ref(x, weight, bias, arena, handle_table, ssm_handles, cu_seqlens,
                              has_initial_state, spec: HybridModelSpec, layer: int, *, activation=None):
    """Reference of ``causal_conv1d_prefill``: returns out ``[T, C]`` in x's dtype; updates ``arena``."""
    lay = ssm_block_layout(spec)
    W = spec.d_conv
    out = torch.zeros_like(x)
    for b, h, s, e, init in _requests(x, ssm_handles, cu_seqlens, has_initial_state):
        st = _state_view(arena, handle_table, h, lay.conv_offset(layer), spec.conv_dtype, (W - 1, x.shape[1]))
        if st is None:
            continue
        y, final = conv1d_ref(x[s:e], weight, bias, st if init else None, activation)
        out[s:e] = y.to(x.dtype)
        st.copy_(final.to(spec.conv_dtype))
    return out


def _scan_prefill_ref(scan, state_shape, x, dt, A, B, C, arena, handle_table, ssm_handles, cu_seqlens,
                      has_initial_state, spec, layer, D, z, dt_bias, dt_softplus):
    """Run the dense ``scan`` per request from its block's state; write the final state back."""
    lay = ssm_block_layout(spec)
    out = torch.zeros_like(x)
    for b, h, s, e, init in _requests(x, ssm_handles, cu_seqlens, has_initial_state):
        st = _state_view(arena, handle_table, h, lay.ssm_offset(layer), spec.ssm_dtype, state_shape)
        if st is None:
            continue
        y, hf = scan(x[s:e], dt[s:e], A, B[s:e], C[s:e], D, None if z is None else z[s:e],
                     dt_bias, dt_softplus, st if init else None)
        out[s:e] = y.to(x.dtype)
        st.copy_(hf.to(spec.ssm_dtype))
    return out


def mamba1_scan_prefill_ref(x, dt, A, B, C, arena, handle_table, ssm_handles, cu_seqlens, has_initial_state,
                            spec: HybridModelSpec, layer: int, *, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Reference of ``mamba1_scan_prefill``: returns y ``[T, d_inner]``; updates ``arena``."""
    return _scan_prefill_ref(selective_scan_ref, (spec.d_inner, spec.d_state), x, dt, A, B, C, arena, handle_table,
                             ssm_handles, cu_seqlens, has_initial_state, spec, layer, D, z, dt_bias, dt_softplus)


def mamba2_scan_prefill_ref(x, dt, A, B, C, arena, handle_table, ssm_handles, cu_seqlens, has_initial_state,
                            spec: HybridModelSpec, layer: int, *, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Reference of ``mamba2_scan_prefill``: returns y ``[T, nheads, head_dim]``; updates ``arena``."""
    shape = (spec.mamba_num_heads, spec.mamba_head_dim, spec.d_state)
    return _scan_prefill_ref(ssd_scan_ref, shape, x, dt, A, B, C, arena, handle_table, ssm_handles, cu_seqlens,
                             has_initial_state, spec, layer, D, z, dt_bias, dt_softplus)
