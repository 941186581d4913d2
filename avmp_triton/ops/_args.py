"""Argument checks shared by the launchers of every op family.

Metadata only, never a host sync, so the launchers stay capturable in CUDA graphs; the values of
handles and ``cu_seqlens`` are checked only where they already live on the host
(``check_on_host``). Every error names the bad argument and value.
"""
from typing import Optional

import torch

from avmp_triton import _triton_env  # before triton: the interpreter on CPU-only hosts
from avmp_triton._checks import is_int
from avmp_triton.kernels.handles import REPEAT_BLOCK_MAX
from avmp_triton.layout import SSMBlockLayout, ssm_block_layout
from avmp_triton.ops._host_checks import KIND_SSM, check_cu_seqlens, check_handles, on_host
from avmp_triton.spec import HybridModelSpec

_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NUM_WARPS = (1, 2, 4, 8, 16, 32)


def check_tensor(t, name: str, *, dim: Optional[int] = None, dtypes: Optional[tuple] = None,
                 device: Optional[torch.device] = None, beside: Optional[str] = None,
                 contiguous: bool = False) -> torch.device:
    """A tensor of one of ``dtypes`` with ``dim`` dimensions on ``device`` (each when given);
    ``beside`` names the tensor that set ``device``, for the message. Returns its device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, " + (f"{beside} on {device}" if beside else f"expected {device}"))
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    return t.device


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


def check_launch(name: str, block, block_name: str, warps, default) -> tuple[int, int]:
    if block is None:
        block = default[0]
    if warps is None:
        warps = default[1]
    if not is_int(block) or block < 1 or block & (block - 1):
        raise ValueError(f"{block_name} must be a power of two >= 1, got {block!r}")
    if not is_int(warps) or warps not in _NUM_WARPS:
        raise ValueError(f"num_warps must be one of {_NUM_WARPS}, got {warps!r}")
    return block, warps


def num_mamba_layers_of(layout: SSMBlockLayout) -> int:
    if layout.ssm_base == 0:
        return layout.conv_base // layout.ssm_layer_bytes if layout.ssm_layer_bytes else 0
    return layout.ssm_base // layout.conv_layer_bytes if layout.conv_layer_bytes else 0


def state_location(arena, handle_table, handle_kinds, ssm_handles, layout, layer, dtype, dtype_name: str,
                   kind: str, version: Optional[int]):
    """Validate the common arguments; return (layout, spec or None, dtype, B, device)."""
    if not isinstance(arena, torch.Tensor):
        raise TypeError(f"arena must be a torch.Tensor, got {type(arena).__name__}")
    dev = arena.device
    if arena.dtype != torch.uint8 or arena.dim() != 1 or not arena.is_contiguous():
        raise ValueError(f"arena must be a contiguous 1-D uint8 tensor, got {arena.dtype} shape "
                         f"{tuple(arena.shape)} strides {arena.stride()}")
    check_kernel_device(arena, "arena")
    check_tensor(handle_table, "handle_table", device=dev, beside="the arena", dim=1)
    if handle_table.dtype != torch.int64 or not handle_table.is_contiguous():
        raise ValueError(f"handle_table must be a contiguous int64 tensor, got {handle_table.dtype} "
                         f"strides {handle_table.stride()}")
    check_tensor(handle_kinds, "handle_kinds", device=dev, beside="the arena", dim=1)
    if (handle_kinds.dtype != torch.int32 or not handle_kinds.is_contiguous()
            or handle_kinds.numel() != handle_table.numel()):
        raise ValueError(f"handle_kinds (the allocator's handle_kind) must be a contiguous int32 tensor of "
                         f"handle_table's {handle_table.numel()} entries, got {handle_kinds.dtype} shape "
                         f"{tuple(handle_kinds.shape)} strides {handle_kinds.stride()}")
    check_tensor(ssm_handles, "ssm_handles", device=dev, beside="the arena", dim=1)
    if ssm_handles.dtype != torch.int32:
        raise TypeError(f"ssm_handles must be int32, got {ssm_handles.dtype}")
    if not ssm_handles.is_contiguous():
        raise ValueError(f"ssm_handles must be contiguous, got strides {ssm_handles.stride()}")

    spec = None
    if isinstance(layout, HybridModelSpec):
        spec = layout
        if version is not None and spec.mamba_version != version:
            raise ValueError(f"spec {spec.name!r} is a Mamba{spec.mamba_version} model; this op is Mamba{version}")
        spec_dtype = spec.ssm_dtype if kind == "ssm" else spec.conv_dtype
        if dtype is not None and dtype != spec_dtype:
            raise ValueError(f"{dtype_name}={dtype} disagrees with spec {spec.name!r} ({spec_dtype})")
        dtype = spec_dtype
        n_layers = spec.num_mamba_layers
        layout = ssm_block_layout(spec)
    elif isinstance(layout, SSMBlockLayout):
        if dtype is None:
            raise TypeError(f"{dtype_name} is required when layout is an SSMBlockLayout (it has no dtype)")
        n_layers = num_mamba_layers_of(layout)
    else:
        raise TypeError(f"layout must be a HybridModelSpec or SSMBlockLayout, got {type(layout).__name__}")
    if dtype not in _STATE_DTYPES:
        raise TypeError(f"{dtype_name} must be float32, bfloat16 or float16, got {dtype!r}")
    if kind == "ssm":
        want = layout.d_inner * layout.d_state * dtype.itemsize
        have, off = layout.ssm_layer_bytes, layout.ssm_base
    else:
        want = layout.conv_width * layout.conv_channels * dtype.itemsize
        have, off = layout.conv_layer_bytes, layout.conv_base
    if want != have or off % dtype.itemsize:
        raise ValueError(f"{dtype_name}={dtype} does not match the layout ({have} bytes per layer, "
                         f"expected {want})")
    if not is_int(layer) or not 0 <= layer < n_layers:
        raise ValueError(f"layer must be an int in [0, {n_layers}), got {layer!r}")
    if arena.numel() % dtype.itemsize:
        raise ValueError(f"arena size {arena.numel()} is not a multiple of {dtype_name}'s {dtype.itemsize} bytes")
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
