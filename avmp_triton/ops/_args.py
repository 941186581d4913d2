"""Argument checks shared by the launchers of every op family.

Metadata only, never a host sync, so the launchers stay capturable in CUDA graphs; the values of
handles and ``cu_seqlens`` are checked only where they already live on the host
(``check_on_host``). Every error names the bad argument and value.
"""
import dataclasses
from typing import Optional

import torch

from avmp_triton import _triton_env  # before triton: the interpreter on CPU-only hosts
from avmp_triton._checks import check_tensor, is_int
from avmp_triton.kernels.handles import REPEAT_BLOCK_MAX
from avmp_triton.layout import KVPageLayout
from avmp_triton.memory.cache import PagedCache
from avmp_triton.ops._host_checks import KIND_SSM, check_cu_seqlens, check_handles, on_host

FP8 = torch.float8_e4m3fn   # the one quantised KV dtype: K/V stored / kv_scale

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NUM_WARPS = (1, 2, 4, 8, 16, 32)


_SM_COUNTS: dict[int, int] = {}


@torch.compiler.assume_constant_result
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: launch rules read it on every call)."""
    n = _SM_COUNTS.get(device_index)
    if n is None:
        n = _SM_COUNTS[device_index] = torch.cuda.get_device_properties(device_index).multi_processor_count
    return n


def check_kernel_device(t: torch.Tensor, name: str) -> None:
    """A device the kernels run on: CUDA, or the CPU under Triton's interpreter."""
    if t.device.type == "cpu":
        _triton_env.require_interpreter()
    elif t.device.type != "cuda":
        raise ValueError(f"{name} must be on a cuda device (or the cpu under Triton's interpreter), got {t.device}")


def check_float(t, name: str, device, shape: tuple, *, inner_contiguous: bool = True) -> torch.Tensor:
    """A float tensor of exactly ``shape`` whose last dimension is contiguous (outer strides free)."""
    check_tensor(t, name, device=device, beside="the arena")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if inner_contiguous and t.numel() and t.stride(-1) != 1 and t.shape[-1] != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
    return t


def check_opt_float(t, name, device, shape):
    return None if t is None else check_float(t, name, device, shape)


_POW2_FIELDS = ("block", "block_t", "chunk_size")


def resolve_launch(config, default):
    """``default`` (the launch table's pick, an instance of the family's config class) with the
    fields set in ``config`` put in, checked: block sizes powers of two, ``num_warps`` one of
    Triton's."""
    cfg = dataclasses.replace(default, **config_overrides(config, type(default)))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "num_warps" and (not is_int(v) or v not in _NUM_WARPS):
            raise ValueError(f"num_warps must be one of {_NUM_WARPS}, got {v!r}")
        if f.name in _POW2_FIELDS and v is not None and (not is_int(v) or v < 1 or v & (v - 1)):
            raise ValueError(f"{f.name} must be a power of two >= 1, got {v!r}")
    return cfg
def config_overrides(config, cls) -> dict:
    """The fields the caller set in ``config`` (an instance of the op family's config ``cls``, or
    None): the launch table fills the rest."""
    if config is None:
        return {}
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__} or None, got {type(config).__name__}")
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if getattr(config, f.name) is not None}


def check_layer(layer, num_layers: int, kind: str) -> int:
    """``layer`` is a required int in ``[0, num_layers)`` (the cache's layers of that kind)."""
    if not is_int(layer) or not 0 <= layer < num_layers:
        raise ValueError(f"layer must be an int in [0, {num_layers}) (the cache's {kind} layers), got {layer!r}")
    return layer


# The attention kernels' head dims. A multiple of 8 makes a K/V row of 2-byte elements whole 16-byte
# words, which the kernels promise the compiler (``tl.multiple_of``) for 16-byte vector loads; the
# kernels pad the head dim to a power of two of lanes (BLOCK_D), and the launch tables are sized for
# at most 256 of them.
ATTN_HEAD_DIM_MULTIPLE = 8
ATTN_HEAD_DIM_MIN, ATTN_HEAD_DIM_MAX = 16, 256


def check_attn_head_dim(head_dim: int, name: str) -> None:
    """``name``'s head dim (the last dim of an attention op's q or k) against the kernels' rule."""
    if not (ATTN_HEAD_DIM_MIN <= head_dim <= ATTN_HEAD_DIM_MAX and head_dim % ATTN_HEAD_DIM_MULTIPLE == 0):
        raise ValueError(f"{name} has head_dim {head_dim}; the attention kernels take a multiple of "
                         f"{ATTN_HEAD_DIM_MULTIPLE} in [{ATTN_HEAD_DIM_MIN}, {ATTN_HEAD_DIM_MAX}]")


def attn_block_d(head_dim: int) -> int:
    """Head-dim lanes of the attention kernels' tiles (BLOCK_D): the next power of two, at least 16
    (tl.dot's smallest K). Register- and shared-memory-bound launch choices go by this, not head_dim."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _check_cache(cache) -> None:
    if not isinstance(cache, PagedCache):
        raise TypeError(f"cache must be a PagedCache (PagedCache.of(allocator)), got {type(cache).__name__}")
    check_kernel_device(cache.arena, "the cache's arena")


def kv_cache_of(cache) -> KVPageLayout:
    """The KV page layout of a cache that has one."""
    _check_cache(cache)
    if cache.kv_layout is None:
        raise ValueError("this cache has no KV pages (kv_layout is None)")
    return cache.kv_layout


def ssm_cache_of(cache, ssm_handles, layer, kind: str, version: Optional[int]):
    """Check a Mamba op's cache, handles and layer; return (layout, spec or None, the state's dtype,
    B, device). ``kind`` is "ssm" or "conv"; ``version`` 1 or 2 when the op serves only that Mamba."""
    _check_cache(cache)
    layout, spec = cache.ssm_layout, cache.spec
    if layout is None:
        raise ValueError("this cache has no SSM blocks (ssm_layout is None)")
    if spec is not None and version is not None and spec.mamba_version != version:
        raise ValueError(f"spec {spec.name!r} is a Mamba{spec.mamba_version} model; this op is Mamba{version}")
    dev = cache.device
    check_tensor(ssm_handles, "ssm_handles", device=dev, beside="the cache", dim=1, dtypes=(torch.int32,),
                 contiguous=True)
    check_layer(layer, cache.num_mamba_layers, "Mamba")
    dtype = cache.ssm_dtype if kind == "ssm" else cache.conv_dtype
    return layout, spec, dtype, ssm_handles.numel(), dev


def check_on_host(handle_table, handle_kinds, ssm_handles, cu_seqlens=None, num_tokens: int = 0) -> None:
    """Where the metadata lives on the host (reading it costs no sync), raise on what the kernels
    would skip or clamp: a handle that is not a live SSM handle, one in two rows
    (InvalidHandleError), a bad ``cu_seqlens`` (ValueError). On a GPU the kernels' masking stands."""
    meta = (ssm_handles, handle_table, handle_kinds, cu_seqlens)
    if not on_host(*meta):
        return
    check_handles(ssm_handles, handle_table, handle_kinds, KIND_SSM, "ssm_handles", unique=True)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, num_tokens)


def repeat_block(batch: int) -> int:
    """Handles a kernel compares at a time when looking for repeats (``kernels/handles.repeated``):
    the whole batch in one pass up to ``REPEAT_BLOCK_MAX``, a power of two (a register or two per
    thread); past that the kernel walks the rest in blocks of that size."""
    return min(REPEAT_BLOCK_MAX.value, 1 << max(int(batch) - 1, 0).bit_length())


def check_out(out, x, inputs: Optional[dict] = None, name="out"):
    """``out`` shaped and typed like ``x`` (allocated when None); with ``inputs`` (name -> tensor or
    None) it must share memory with none of them."""
    if out is None:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    check_float(out, name, x.device, tuple(x.shape))
    if out.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {out.dtype}")
    for other, t in (inputs or {}).items():
        if t is not None and t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            raise ValueError(f"{name} must not share memory with {other}")
    return out


def check_mamba1_inputs(dev, rows: int, d_inner: int, d_state: int, x, dt, A, B, C, D, z, dt_bias) -> None:
    """Shapes of a Mamba1 step or chunk: x, dt, z ``[rows, d_inner]``; A ``[d_inner, d_state]``;
    B, C ``[rows, d_state]``; D, dt_bias ``[d_inner]`` (D, z, dt_bias optional)."""
    check_float(x, "x", dev, (rows, d_inner))
    check_float(dt, "dt", dev, (rows, d_inner))
    check_float(A, "A", dev, (d_inner, d_state))
    check_float(B, "B", dev, (rows, d_state))
    check_float(C, "C", dev, (rows, d_state))
    check_opt_float(D, "D", dev, (d_inner,))
    check_opt_float(z, "z", dev, (rows, d_inner))
    check_opt_float(dt_bias, "dt_bias", dev, (d_inner,))


_MAX_GRID_YZ = 65535


def check_mamba2_inputs(dev, rows: int, layout, spec, x, dt, A, B, C, D, z, dt_bias) -> None:
    """Shapes of a Mamba2 step or chunk: x, z ``[rows, nheads, head_dim]`` with nheads * head_dim =
    the layout's d_inner (and the spec's heads, when the cache has a spec); dt ``[rows, nheads]``;
    A, D, dt_bias ``[nheads]``; B, C ``[rows, n_groups, d_state]`` (D, z, dt_bias optional)."""
    nheads, head_dim = x.shape[1], x.shape[2]
    if nheads * head_dim != layout.d_inner:
        raise ValueError(f"x's nheads * head_dim = {nheads} * {head_dim} must equal the layout's "
                         f"d_inner ({layout.d_inner})")
    if spec is not None and (nheads, head_dim) != (spec.mamba_num_heads, spec.mamba_head_dim):
        raise ValueError(f"x has {nheads} heads x {head_dim}; spec {spec.name!r} has "
                         f"{spec.mamba_num_heads} x {spec.mamba_head_dim}")
    check_float(x, "x", dev, (rows, nheads, head_dim))
    check_float(dt, "dt", dev, (rows, nheads))
    check_float(A, "A", dev, (nheads,))
    check_tensor(B, "B", device=dev, beside="the cache", dim=3)
    n_groups = B.shape[1]
    if n_groups < 1 or nheads % n_groups:
        raise ValueError(f"n_groups (B.shape[1] = {n_groups}) must divide nheads ({nheads})")
    if spec is not None and n_groups != spec.n_groups:
        raise ValueError(f"B has n_groups={n_groups}; spec {spec.name!r} has {spec.n_groups}")
    check_float(B, "B", dev, (rows, n_groups, layout.d_state))
    check_float(C, "C", dev, (rows, n_groups, layout.d_state))
    check_opt_float(D, "D", dev, (nheads,))
    check_opt_float(z, "z", dev, (rows, nheads, head_dim))
    check_opt_float(dt_bias, "dt_bias", dev, (nheads,))
    if nheads > _MAX_GRID_YZ:
        raise ValueError(f"nheads={nheads} exceeds the grid limit {_MAX_GRID_YZ}")


def check_kv_scale(kv_scale, cache, dev) -> torch.Tensor | None:
    """``[2, Hkv]`` fp32 scales for an fp8 cache (finite and positive, checked where that is free),
    None for any other."""
    if cache.kv_dtype != FP8:
        if kv_scale is not None:
            raise ValueError(f"kv_scale is for float8_e4m3fn caches; this cache holds {cache.kv_dtype}")
        return None
    if kv_scale is None:
        raise ValueError("a float8_e4m3fn cache needs kv_scale: [2, num_kv_heads] fp32 (K row, V row)")
    hkv = cache.kv_layout.num_kv_heads
    check_tensor(kv_scale, "kv_scale", dtypes=(torch.float32,), dim=2, device=dev, contiguous=True)
    if tuple(kv_scale.shape) != (2, hkv):
        raise ValueError(f"kv_scale must be [2, {hkv}] (K row, V row per kv head), got {tuple(kv_scale.shape)}")
    if on_host(kv_scale):
        bad = ~(torch.isfinite(kv_scale) & (kv_scale > 0))
        if bool(bad.any()):
            i, h = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"kv_scale[{i}, {h}] = {float(kv_scale[i, h])} must be finite and positive")
    return kv_scale
