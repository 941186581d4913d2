"""Mamba prefill ops over a ``PagedCache``: causal conv1d, Mamba1 selective scan and Mamba2 scan
over a variable-length packed chunk (``cu_seqlens``). Each request starts from its SSM block's
state (``has_initial_state[b] != 0``: chunked prefill continuing a request) or from zeros, and
leaves its final state in place in the block, resolved through the handle table on the device (so
blocks may move between chunks: the handle stays, the table entry changes).

Common arguments: ``ssm_handles`` ``[B]`` int32 (-1 skips a request: zero outputs, state
untouched); ``cu_seqlens`` ``[B + 1]`` int32 token ranges of the requests in the packed ``[T, ...]``
inputs, non-decreasing from 0, at most T (tokens in ``[cu_seqlens[B], T)`` get zero outputs);
``has_initial_state`` ``[B]`` int32 or bool; ``cache`` and ``layer=`` as in the decode ops;
``out=`` must not alias an input. ``dt_softplus`` defaults to False (as in mamba_ssm and vLLM).

A request whose handle is -1, out of range, free, of the KV kind, or repeated within the call is
skipped, and the kernels clamp every range to ``[0, T]``, so no access leaves x, out or the
request's own unit. On CPU-resident metadata the launchers raise instead, naming the value. No
host sync: every launch decision comes from shapes. Registered as ``torch.ops.avmp.*`` custom ops
mutating ``out`` and the arena.
"""
import dataclasses
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from avmp_triton import _triton_env  # sets the interpreter up on CPU-only hosts (before triton)
from avmp_triton._checks import check_tensor
from avmp_triton.kernels import mamba_prefill as K
from avmp_triton.memory.cache import PagedCache
from avmp_triton.ops._args import (
    check_float, check_mamba1_inputs, check_mamba2_inputs, check_on_host, check_opt_float, check_out, config_overrides, repeat_block,
    resolve_launch, sm_count, ssm_cache_of,
)

_ALGORITHMS = ("auto", "serial", "chunked")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MambaPrefillConfig:
    """Launch shape of a prefill kernel; a field left None comes from the op's launch table.
    Fields an op has no use for must stay None."""
    algorithm: str | None = None   # scans: "serial", "chunked" or "auto" (chunked on CUDA)
    chunk_size: int | None = None  # scans, chunked: tokens per chunk
    block: int | None = None       # channels (Mamba1 scan, conv) or head rows (Mamba2) per program
    block_t: int | None = None     # conv: tokens per program step, >= d_conv - 1
    num_warps: int | None = None
    segment: int | None = None     # Mamba2 chunked: tokens per program (0: a whole request), from the shape
    stages: int | None = None      # Mamba2 chunked, conv: token blocks in flight per program (1: none ahead)


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


def _check_stages(stages, most: int) -> int:
    """``stages`` (None: 1) is an int in [1, most]."""
    if stages is None:
        return 1
    if not isinstance(stages, int) or isinstance(stages, bool) or not 1 <= stages <= most:
        raise ValueError(f"stages must be an int in [1, {most}], got {stages!r}")
    return stages


def _check_dt_softplus(v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"dt_softplus must be a bool, got {v!r}")
    return v


def _scan_config(config, dev, table, min_chunk: int, auto_chunked: bool = True) -> tuple[bool, MambaPrefillConfig]:
    """(chunked, launch config) of a scan: the algorithm first, then ``table(chunked)`` under the
    caller's overrides. "auto" on CUDA: chunked if ``auto_chunked`` (a rule from the shapes), else
    serial."""
    algorithm = config_overrides(config, MambaPrefillConfig).get("algorithm", "auto")
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm must be one of {_ALGORITHMS}, got {algorithm!r}")
    chunked = _chunked(algorithm, dev) and (auto_chunked or algorithm == "chunked")
    cfg = resolve_launch(config, table(chunked))
    if cfg.block_t is not None:
        raise ValueError(f"block_t is the conv's launch field; a scan takes none, got {cfg.block_t!r}")
    c = cfg.chunk_size
    if c < min_chunk or c > 256:
        raise ValueError(f"chunk_size must be a power of two in [{min_chunk}, 256], got {c!r}")
    return chunked, cfg


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


def mamba1_prefill_launch_config(d_inner: int, d_state: int, chunked: bool = True, *, batch: int = 1,
                                 sms: int = 132) -> MambaPrefillConfig:
    """The Mamba1 scan's launch table. Serial: one [block, d_state] state tile per program,
    ``chunk_size`` tokens unrolled per loop step (their loads share one round trip); Jamba: 16
    channels x 8 tokens, 1 warp while the (batch + 1) x d_inner / 16 programs fit one wave of 32
    per SM, else 32 channels x 4 tokens (the fastest serial shapes at 1 x 4096, 4 x 1024 and
    4 x 512 after 1024, and at 16 x 512, on an H100: perf/results/sweep_mamba_prefill_H100_32e7231.log).
    Chunked: [CHUNK, BLOCK_D, d_state] fp32 pairs in registers through a parallel prefix scan;
    Jamba (d_state 16): 16 tokens x 16 channels, 4 warps, within 2 % of the fastest swept shape at
    B=1 x 4096, 4 x 1024 and 16 x 512 on an H100 (perf/results/tune_prefill_H100.json)."""
    if not chunked:
        narrow = max(16, 256 // _pow2(d_state))
        if (batch + 1) * triton.cdiv(d_inner, narrow) <= 32 * sms:
            return MambaPrefillConfig(algorithm="serial", chunk_size=8, block=min(_pow2(d_inner), narrow), num_warps=1)
        return MambaPrefillConfig(algorithm="serial", chunk_size=4, block=min(_pow2(d_inner), 2 * narrow),
                                  num_warps=1)
    return MambaPrefillConfig(algorithm="chunked", chunk_size=16,
                              block=min(_pow2(d_inner), max(1, 256 // _pow2(d_state))), num_warps=4)


def mamba1_auto_chunked(tokens: int, batch: int) -> bool:
    """Whether "auto" runs the Mamba1 chunked scan on CUDA: when the requests average over 1024
    tokens. The serial walk is bound by its longest request's length (about 1.1 us a token at
    Jamba's 1 x 4096: 4.5 ms), the chunked scan by the tokens in all (1.25-1.36 ms at 4096, 2.4 ms
    at 16 x 512): chunked wins 1 x 4096 by 3.3x, serial wins 16 x 512 by 1.5x and 4 x 1024 and
    4 x 512 after 1024 by 3 % (perf/results/sweep_mamba_prefill_H100_32e7231.log); the rule gets
    every cell there right. Measured before the serial walk deferred its stores (kernel
    docstring), which cuts its per-token latency: re-check against that sweep's successor."""
    return tokens > 1024 * max(batch, 1)


def conv1d_prefill_launch_config(channels: int, d_conv: int, *, batch: int = 1, tokens: int = 0) -> MambaPrefillConfig:
    """The prefill conv's launch table: 8 tokens a block, the next block loaded while one is
    computed; 1024 channels x 4 warps when the requests average 1024 tokens or more (1x4096 and
    4x1024: 90 and 89 us against 101 and 94 for 512 x 2), else 512 channels x 2 warps (16x512 and
    4x512 after 1024: 158 and 55 us, 1024 x 4 was 166 and 56) on an H100
    (perf/results/sweep_mamba_prefill_H100_32e7231.log)."""
    wide = tokens >= 1024 * max(batch, 1)
    return MambaPrefillConfig(block_t=max(8, _pow2(d_conv - 1)), block=min(1024 if wide else 512, _pow2(channels)),
                              num_warps=4 if wide else 2, stages=2)


def _conv_workers(device: torch.device, T: int, block_t: int, programs: int) -> int:
    """Programs per (request, channel block), each striding over the request's token blocks: enough
    for ~16 programs per SM in all, never more than the token blocks of the whole chunk (in the
    interpreter: 64 programs, so the tests see workers striding)."""
    target = 16 * sm_count(device.index or 0) if device.type == "cuda" else 64
    return max(1, min(triton.cdiv(max(T, 1), block_t), triton.cdiv(target, programs)))


def mamba2_segment(tokens: int, batch: int, nheads: int, p_blocks: int, chunk: int, sms: int) -> int:
    """Tokens per program of the chunked Mamba2 scan, from the shapes alone: segments of 1024 tokens
    when the whole-request grid (one program per request, head and head_dim block) has fewer
    programs than the GPU has SMs, else 0 (one program walks a whole request), and 0 when one
    segment would hold the whole chunk. On an H100 (Nemotron-H, 128 heads:
    perf/results/sweep_mamba_prefill_H100_32e7231.log) 1 x 4096 (128 programs) runs 342 us in
    segments of 1024 against 402 whole (256 and 512: 413, 356); at 4 x 1024, 16 x 512 and 4 x 512
    after 1024 (512 programs and more) whole requests win, 1.6-1.9x. ``sms`` 0 (the interpreter)
    keeps 0: the tests ask for segments explicitly."""
    seg = max(1024, chunk)
    if sms <= 0 or batch * nheads * p_blocks >= sms or seg >= tokens:
        return 0
    return seg


def mamba2_prefill_launch_config(head_dim: int, d_state: int, chunked: bool = True) -> MambaPrefillConfig:
    """The Mamba2 scans' launch table. Chunked (every tl.dot dimension >= 16): up to 64
    head_dim rows, 4 warps: the fastest swept shape with chunk 64 on Nemotron-H at all three
    batches on an H100, 1.2-2.2x faster than 8 warps (perf/results/tune_prefill_H100.json)."""
    if chunked:
        return MambaPrefillConfig(algorithm="chunked", chunk_size=64, block=max(16, min(64, _pow2(head_dim))),
                                  num_warps=4)
    return MambaPrefillConfig(algorithm="serial", chunk_size=64,
                              block=min(_pow2(head_dim), max(1, 2048 // _pow2(d_state))), num_warps=4)


@torch.library.custom_op("avmp::causal_conv1d_prefill", mutates_args=("out", "arena"))
def _causal_conv1d_prefill_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ssm_handles: torch.Tensor,
    cu_seqlens: torch.Tensor, has_initial_state: torch.Tensor, arena: torch.Tensor, handle_table: torch.Tensor,
    handle_kinds: torch.Tensor, out: torch.Tensor, state_offset: int, state_dtype: torch.dtype, silu: bool,
    block_t: int, block_c: int, num_warps: int, stages: int = 1,
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
        BLOCK_B=repeat_block(B), STAGES=stages, num_warps=num_warps)


@_causal_conv1d_prefill_op.register_fake
def _(x, weight, bias, ssm_handles, cu_seqlens, has_initial_state, arena, handle_table, handle_kinds, out,
      state_offset, state_dtype, silu, block_t, block_c, num_warps, stages=1) -> None:
    return None


def causal_conv1d_prefill(
    x: torch.Tensor, weight: torch.Tensor, ssm_handles: torch.Tensor, cu_seqlens: torch.Tensor,
    has_initial_state: torch.Tensor, cache: PagedCache, *, layer: int, bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None, out: Optional[torch.Tensor] = None,
    config: Optional[MambaPrefillConfig] = None,
) -> torch.Tensor:
    """Depthwise causal conv1d over a packed chunk; the block's conv state is the left context.

    Args:
        x: ``[T, channels]`` inputs (Mamba2: x|B|C concatenated), last dim contiguous.
        weight: ``[channels, d_conv]``; bias: ``[channels]`` or None.
        activation: None or "silu".
        config: ``MambaPrefillConfig`` overrides of ``conv1d_prefill_launch_config`` (block_t,
            block = channels, num_warps, stages: 2 loads the next token block ahead, 1 does not).
        (the rest: see the module docstring)
    Returns:
        out ``[T, channels]`` in x's dtype. Afterwards layer ``layer``'s conv state
        ``[d_conv - 1, channels]`` of every active request holds its last d_conv - 1 inputs, oldest
        first (older state rows, or zeros without an initial state, when the request is shorter).
    """
    layout, _, dtype, batch, dev = ssm_cache_of(cache, ssm_handles, layer, "conv", None)
    _check_batch_meta(cu_seqlens, has_initial_state, batch, dev)
    ch, d_conv = layout.conv_channels, layout.conv_width + 1
    if d_conv > 4:
        raise ValueError(f"d_conv must be at most 4 (the kernel keeps 3 past rows), got {d_conv}")
    check_tensor(x, "x", device=dev, beside="the cache", dim=2)
    T = x.shape[0]
    check_float(x, "x", dev, (T, ch))
    check_float(weight, "weight", dev, (ch, d_conv))
    check_opt_float(bias, "bias", dev, (ch,))
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    cfg = resolve_launch(config, conv1d_prefill_launch_config(ch, d_conv, batch=batch, tokens=T))
    if cfg.algorithm is not None or cfg.chunk_size is not None or cfg.segment is not None:
        raise ValueError(f"the conv takes no algorithm, chunk_size or segment, got {cfg.algorithm!r}, "
                         f"{cfg.chunk_size!r}, {cfg.segment!r}")
    _check_stages(cfg.stages, 2)
    if cfg.block_t < d_conv - 1:
        raise ValueError(f"block_t must be >= d_conv - 1 = {d_conv - 1}, got {cfg.block_t}")
    out = check_out(out, x, {"x": x, "weight": weight, "bias": bias, "arena": cache.arena})
    check_on_host(cache.handle_table, cache.handle_kinds, ssm_handles, cu_seqlens, T)
    torch.ops.avmp.causal_conv1d_prefill(
        x, weight, bias, ssm_handles, cu_seqlens, has_initial_state, cache.arena, cache.handle_table,
        cache.handle_kinds, out, layout.conv_offset(layer), dtype, activation is not None, cfg.block_t, cfg.block,
        cfg.num_warps, cfg.stages)
    return out


@torch.library.custom_op("avmp::mamba1_scan_prefill", mutates_args=("out", "arena"))
def _mamba1_scan_prefill_op(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
    ssm_handles: torch.Tensor, cu_seqlens: torch.Tensor, has_initial_state: torch.Tensor, arena: torch.Tensor,
    handle_table: torch.Tensor, handle_kinds: torch.Tensor, out: torch.Tensor, state_offset: int, state_dtype: torch.dtype, dt_softplus: bool,
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
        K.mamba1_scan_prefill_kernel[grid](*args, **flags, UNROLL=chunk_size, BLOCK_D=block_d, num_warps=num_warps)


@_mamba1_scan_prefill_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, ssm_handles, cu_seqlens, has_initial_state, arena, handle_table,
      handle_kinds, out, state_offset, state_dtype, dt_softplus, chunked, chunk_size, block_d, num_warps) -> None:
    return None


def mamba1_scan_prefill(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    ssm_handles: torch.Tensor, cu_seqlens: torch.Tensor, has_initial_state: torch.Tensor, cache: PagedCache, *,
    layer: int, D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None, dt_softplus: bool = False, out: Optional[torch.Tensor] = None,
    config: Optional[MambaPrefillConfig] = None,
) -> torch.Tensor:
    """Mamba1 selective scan (Jamba) over a packed chunk, the state kept in the block.

    Per request and token t (fp32):  dt = softplus(dt_t + dt_bias) (``dt_softplus``, else
    dt_t + dt_bias);  h = exp(dt A) h + dt x_t B_t;  y_t = h C_t + D x_t;  y_t *= silu(z_t).

    Args:
        x, dt: ``[T, d_inner]``; z: ``[T, d_inner]`` or None (no gating). Last dims contiguous.
        A: ``[d_inner, d_state]`` (negative; usually -exp(A_log), fp32).
        B, C: ``[T, d_state]``.
        D, dt_bias: ``[d_inner]`` or None.
        config: ``MambaPrefillConfig`` overrides of ``mamba1_prefill_launch_config``: algorithm
            "serial" (token by token, ``chunk_size`` tokens unrolled per loop step), "chunked"
            (``chunk_size`` tokens at a time through a parallel prefix scan) or "auto" (below);
            chunk_size a power of two in [1, 256]; block = channels per program. "auto" on CUDA:
            chunked when the requests average over 1024 tokens (``mamba1_auto_chunked``).
        (the rest: see the module docstring)
    Returns:
        y ``[T, d_inner]`` in x's dtype; layer ``layer``'s ssm state ``[d_inner, d_state]`` of every
        active request holds its state after its last token, in the state dtype.
    """
    layout, _, dtype, nreq, dev = ssm_cache_of(cache, ssm_handles, layer, "ssm", 1)
    _check_batch_meta(cu_seqlens, has_initial_state, nreq, dev)
    Di, N = layout.d_inner, layout.d_state
    check_tensor(x, "x", device=dev, beside="the cache", dim=2)
    T = x.shape[0]
    check_mamba1_inputs(dev, T, Di, N, x, dt, A, B, C, D, z, dt_bias)
    _check_dt_softplus(dt_softplus)
    sms = sm_count(dev.index or 0) if dev.type == "cuda" else 132
    chunked, cfg = _scan_config(config, dev, lambda c: mamba1_prefill_launch_config(Di, N, c, batch=nreq, sms=sms), 1,
                                auto_chunked=mamba1_auto_chunked(T, nreq))
    if cfg.segment is not None or cfg.stages is not None:
        raise ValueError(f"segment and stages are the Mamba2 scan's; the Mamba1 scan takes none, got "
                         f"{cfg.segment!r}, {cfg.stages!r}")
    out = check_out(out, x, {"x": x, "dt": dt, "z": z, "B": B, "C": C, "arena": cache.arena})
    check_on_host(cache.handle_table, cache.handle_kinds, ssm_handles, cu_seqlens, T)
    torch.ops.avmp.mamba1_scan_prefill(
        x, dt, A, B, C, D, z, dt_bias, ssm_handles, cu_seqlens, has_initial_state, cache.arena, cache.handle_table,
        cache.handle_kinds, out, layout.ssm_offset(layer), dtype, dt_softplus, chunked, cfg.chunk_size, cfg.block,
        cfg.num_warps)
    return out


@torch.library.custom_op("avmp::mamba2_scan_prefill", mutates_args=("out", "arena"))
def _mamba2_scan_prefill_op(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
    ssm_handles: torch.Tensor, cu_seqlens: torch.Tensor, has_initial_state: torch.Tensor, arena: torch.Tensor,
    handle_table: torch.Tensor, handle_kinds: torch.Tensor, out: torch.Tensor, state_offset: int, state_dtype: torch.dtype, dt_softplus: bool,
    chunked: bool, chunk_size: int, block_p: int, num_warps: int, segment: int = 0, stages: int = 1,
) -> None:
    if chunked and segment:
        _mamba2_segmented(x, dt, A, B, C, D, z, dt_bias, ssm_handles, cu_seqlens, has_initial_state, arena,
                          handle_table, handle_kinds, out, state_offset, state_dtype, dt_softplus, chunk_size, block_p,
                          num_warps, segment, stages)
        return
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
            STAGES=stages, num_warps=num_warps)
    else:
        K.mamba2_scan_prefill_kernel[grid](*args, **flags, BLOCK_P=block_p, BLOCK_N=_pow2(d_state),
                                           num_warps=num_warps)


@_mamba2_scan_prefill_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, ssm_handles, cu_seqlens, has_initial_state, arena, handle_table,
      handle_kinds, out, state_offset, state_dtype, dt_softplus, chunked, chunk_size, block_p, num_warps,
      segment=0, stages=1) -> None:
    return None


def _mamba2_segmented(x, dt, A, B, C, D, z, dt_bias, ssm_handles, cu_seqlens, has_initial_state, arena, handle_table,
                      handle_kinds, out, state_offset, state_dtype, dt_softplus, chunk_size, block_p, num_warps,
                      segment, stages) -> None:
    """The chunked scan with each request cut into segments of ``segment`` tokens, three launches:
    every segment's local state from zeros (parallel over segments), the states passed from segment
    to segment per request (elementwise, short), every segment's outputs from the state entering it.
    Slots: at most T // segment + B segments (each request's last one partial), sized from shapes."""
    T, nheads, head_dim = x.shape
    n_groups, d_state = B.shape[1], B.shape[2]
    nreq = ssm_handles.numel()
    S = max(1, T // segment + nreq)
    seg_state = torch.empty((S, nheads, head_dim, d_state), dtype=torch.float32, device=x.device)
    seg_decay = torch.empty((S, nheads), dtype=torch.float32, device=x.device)
    meta = (handle_table, handle_kinds, ssm_handles, cu_seqlens, has_initial_state)
    common = dict(ELEM_BYTES=state_dtype.itemsize, ALIGN=_align(state_offset, state_dtype), BLOCK_B=repeat_block(nreq))
    dots = dict(CHUNK=chunk_size, BLOCK_P=block_p, BLOCK_N=max(16, _pow2(d_state)), DOT_DTYPE=_dot_dtype(x.dtype),
                DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", STAGES=stages, num_warps=num_warps)
    p_blocks = triton.cdiv(head_dim, block_p)
    K.mamba2_segment_state_kernel[(S, nheads, p_blocks)](
        x, dt, A, B, dt_bias if dt_bias is not None else A, seg_state, seg_decay, *meta,
        T, head_dim, d_state, nreq, S, nheads, handle_table.numel(), nheads // n_groups, state_offset, segment,
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1),
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, **common, **dots)
    pn = head_dim * d_state
    block_e = min(1024, _pow2(pn))
    K.mamba2_state_pass_kernel[(nreq + 1, nheads, triton.cdiv(pn, block_e))](
        seg_state, seg_decay, arena.view(state_dtype), *meta, T, pn, nreq, S, nheads, handle_table.numel(),
        state_offset, segment, **common, BLOCK_E=block_e, num_warps=4)
    K.mamba2_segment_scan_kernel[(S + 1, nheads, p_blocks)](
        x, dt, z if z is not None else x, A, B, C, D if D is not None else A, dt_bias if dt_bias is not None else A,
        out, seg_state, *meta, T, head_dim, d_state, nreq, S, nheads, handle_table.numel(), nheads // n_groups,
        state_offset, segment, x.stride(0), x.stride(1), dt.stride(0),
        z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
        B.stride(0), B.stride(1), C.stride(0), C.stride(1), out.stride(0), out.stride(1),
        HAS_Z=z is not None, HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
        **common, **dots)


def mamba2_scan_prefill(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    ssm_handles: torch.Tensor, cu_seqlens: torch.Tensor, has_initial_state: torch.Tensor, cache: PagedCache, *,
    layer: int, D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None, dt_softplus: bool = False, out: Optional[torch.Tensor] = None,
    config: Optional[MambaPrefillConfig] = None,
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
        config: ``MambaPrefillConfig`` overrides of ``mamba2_prefill_launch_config``: algorithm
            "serial", "chunked" (chunks through tl.dot, state passed between chunks) or "auto"
            (chunked on CUDA, serial in the interpreter); chunk_size a power of two in [16, 256];
            block = head_dim rows per program (chunked: >= 16); stages (chunked) = chunks in
            flight through Triton's pipeliner (1: none ahead; the interpreter always runs 1).
        (the rest: see the module docstring)
    Returns:
        y ``[T, nheads, head_dim]`` in x's dtype; layer ``layer``'s ssm state
        ``[nheads, head_dim, d_state]`` of every active request holds its final state.
    """
    layout, spec, dtype, nreq, dev = ssm_cache_of(cache, ssm_handles, layer, "ssm", 2)
    _check_batch_meta(cu_seqlens, has_initial_state, nreq, dev)
    check_tensor(x, "x", device=dev, beside="the cache", dim=3)
    check_mamba2_inputs(dev, x.shape[0], layout, spec, x, dt, A, B, C, D, z, dt_bias)
    _check_dt_softplus(dt_softplus)
    P, N = x.shape[2], layout.d_state
    chunked, cfg = _scan_config(config, dev, lambda c: mamba2_prefill_launch_config(P, N, c), 16)
    if chunked and cfg.block < 16:
        raise ValueError(f"block must be >= 16 for the chunked scan (tl.dot), got {cfg.block}")
    segment = _segment_of(cfg, chunked, x.shape[0], nreq, x.shape[1], triton.cdiv(P, cfg.block), dev)
    if not chunked and cfg.stages not in (None, 1):
        raise ValueError(f"stages is the chunked scan's; the serial scan takes 1 or None, got {cfg.stages!r}")
    stages = _check_stages(cfg.stages, 4)
    if _triton_env.interpreter_active():
        stages = 1   # its counted loops cannot take a runtime bound (kernels' _ssd_walk)
    out = check_out(out, x, {"x": x, "dt": dt, "z": z, "B": B, "C": C, "arena": cache.arena})
    check_on_host(cache.handle_table, cache.handle_kinds, ssm_handles, cu_seqlens, x.shape[0])
    torch.ops.avmp.mamba2_scan_prefill(
        x, dt, A, B, C, D, z, dt_bias, ssm_handles, cu_seqlens, has_initial_state, cache.arena, cache.handle_table,
        cache.handle_kinds, out, layout.ssm_offset(layer), dtype, dt_softplus, chunked, cfg.chunk_size, cfg.block,
        cfg.num_warps, segment, stages)
    return out


def _segment_of(cfg: MambaPrefillConfig, chunked: bool, tokens: int, batch: int, nheads: int, p_blocks: int,
                dev: torch.device) -> int:
    """The config's ``segment``, checked (0, or a power of two multiple of chunk_size; the chunked
    scan only), or ``mamba2_segment``'s pick from the shapes."""
    seg = cfg.segment
    if seg is None:
        sms = sm_count(dev.index or 0) if dev.type == "cuda" and chunked else 0
        return mamba2_segment(tokens, batch, nheads, p_blocks, cfg.chunk_size, sms)
    if not chunked and seg:
        raise ValueError(f"segment is the chunked scan's; the serial scan takes 0 or None, got {seg!r}")
    if not isinstance(seg, int) or isinstance(seg, bool) or seg < 0 or (seg and (seg & (seg - 1) or seg < cfg.chunk_size)):
        raise ValueError(f"segment must be 0 or a power of two >= chunk_size ({cfg.chunk_size}), got {seg!r}")
    return seg
