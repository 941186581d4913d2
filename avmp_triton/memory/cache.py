"""Where a paged cache lives, as one frozen object that every op takes: the arena, the handle
table and kinds, and the layouts of its two units (``PagedCache.of(allocator)``)."""
from __future__ import annotations

import dataclasses

import torch

from avmp_triton._checks import check_tensor, is_int
from avmp_triton.layout import KVPageLayout, SSMBlockLayout, kv_page_layout, ssm_block_layout
from avmp_triton.spec import KV_DTYPES, STATE_DTYPES, HybridModelSpec


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class PagedCache:
    """The tensors and geometry the ops read. Build it with ``of(allocator)``; build it by hand
    only for an arena of your own. Checked at construction, so a bad cache fails before any launch.

    The allocators never replace these tensors (rebalancing rewrites their contents), so a view
    stays valid for the allocator's lifetime.
    """
    arena: torch.Tensor                  # [bytes] uint8, contiguous, 16-byte aligned units
    handle_table: torch.Tensor           # [H] int64 handle -> byte offset of its unit, -1 when free
    handle_kinds: torch.Tensor           # [H] int32 handle -> 0 free, 1 KV page, 2 SSM block
    kv_layout: KVPageLayout | None = None
    num_attn_layers: int = 0             # attention layers in a KV page
    kv_dtype: torch.dtype | None = None
    ssm_layout: SSMBlockLayout | None = None
    ssm_dtype: torch.dtype | None = None
    conv_dtype: torch.dtype | None = None
    spec: HybridModelSpec | None = None  # when built from a model: lets the ops check head counts

    @classmethod
    def of(cls, allocator) -> PagedCache:
        """The view of an allocator (``AVMPAllocator``, ``StaticDualAllocator``, ``PaddedUnifiedAllocator``);
        an attention-free spec's view has no ``kv_layout``, only the SSM side."""
        spec = getattr(allocator, "spec", None)
        if not isinstance(spec, HybridModelSpec) or not isinstance(getattr(allocator, "arena", None), torch.Tensor):
            raise TypeError(f"allocator must be an arena allocator (AVMPAllocator, StaticDualAllocator, "
                            f"PaddedUnifiedAllocator), got {type(allocator).__name__}")
        if getattr(allocator, "ssm_units", 1) != 1:
            raise TypeError(f"{type(allocator).__name__} spreads a request's SSM state over {allocator.ssm_units} units; "
                            f"the Mamba ops read it from one")
        has_kv, has_ssm = spec.num_attn_layers > 0, spec.num_mamba_layers > 0
        return cls(arena=allocator.arena, handle_table=allocator.handle_table, handle_kinds=allocator.handle_kind,
                   kv_layout=kv_page_layout(spec, allocator.page_tokens) if has_kv else None,
                   num_attn_layers=spec.num_attn_layers, kv_dtype=spec.kv_dtype if has_kv else None,
                   ssm_layout=ssm_block_layout(spec) if has_ssm else None,
                   ssm_dtype=spec.ssm_dtype if has_ssm else None, conv_dtype=spec.conv_dtype if has_ssm else None,
                   spec=spec)

    def __post_init__(self):
        check_tensor(self.arena, "arena", dim=1, dtypes=(torch.uint8,), contiguous=True)
        dev = self.arena.device
        check_tensor(self.handle_table, "handle_table", dim=1, dtypes=(torch.int64,), device=dev,
                     beside="the arena", contiguous=True)
        check_tensor(self.handle_kinds, "handle_kinds", dim=1, dtypes=(torch.int32,), device=dev,
                     beside="the arena", contiguous=True)
        if self.handle_kinds.numel() != self.handle_table.numel():
            raise ValueError(f"handle_kinds has {self.handle_kinds.numel()} entries, handle_table "
                             f"{self.handle_table.numel()}")
        if self.kv_layout is None and self.ssm_layout is None:
            raise ValueError("a cache needs a kv_layout, an ssm_layout or both")
        if self.kv_layout is not None:
            self._check_kv()
        if self.ssm_layout is not None:
            self._check_ssm()
        if self.spec is not None:
            self._check_spec()

    @property
    def device(self) -> torch.device:
        return self.arena.device

    @property
    def num_mamba_layers(self) -> int:
        """Mamba layers in an SSM block (0 without one)."""
        lay = self.ssm_layout
        if lay is None:
            return 0
        if lay.ssm_base == 0:
            return lay.conv_base // lay.ssm_layer_bytes if lay.ssm_layer_bytes else 0
        return lay.ssm_base // lay.conv_layer_bytes if lay.conv_layer_bytes else 0

    def _check_kv(self) -> None:
        lay = self.kv_layout
        if not isinstance(lay, KVPageLayout):
            raise TypeError(f"kv_layout must be a KVPageLayout, got {type(lay).__name__}")
        if self.kv_dtype not in KV_DTYPES:
            raise TypeError(f"kv_dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        if lay.elem_bytes != self.kv_dtype.itemsize:
            raise TypeError(f"kv_dtype {self.kv_dtype} is {self.kv_dtype.itemsize} bytes, the kv_layout's "
                            f"elements {lay.elem_bytes}")
        pt = lay.page_tokens
        if not is_int(pt) or pt < 1 or pt & (pt - 1):
            raise ValueError(f"kv_layout.page_tokens must be a power of two, got {pt!r}")
        vec = 16 // lay.elem_bytes
        for f in ("stride_layer", "stride_kv", "stride_head", "stride_token"):
            s = getattr(lay, f)
            if not is_int(s) or s < lay.head_dim or s % vec:
                raise ValueError(f"kv_layout.{f} must be an int >= head_dim and a multiple of {vec} elements "
                                 f"(16 bytes), got {s!r}")
        n = self.num_attn_layers
        if not is_int(n) or n < 1:
            raise ValueError(f"num_attn_layers must be a positive int with a kv_layout, got {n!r}")
        if self.arena.numel() % lay.elem_bytes:
            raise ValueError(f"arena has {self.arena.numel()} bytes, not a whole number of {lay.elem_bytes}-byte "
                             f"elements")
        page_bytes = n * lay.stride_layer * lay.elem_bytes
        if page_bytes > self.arena.numel():
            raise ValueError(f"a page of num_attn_layers={n} layers is {page_bytes} bytes, more than the "
                             f"arena's {self.arena.numel()}")

    def _check_ssm(self) -> None:
        lay = self.ssm_layout
        if not isinstance(lay, SSMBlockLayout):
            raise TypeError(f"ssm_layout must be an SSMBlockLayout, got {type(lay).__name__}")
        for name, dtype, want, have, base in (
                ("ssm_dtype", self.ssm_dtype, lay.d_inner * lay.d_state, lay.ssm_layer_bytes, lay.ssm_base),
                ("conv_dtype", self.conv_dtype, lay.conv_width * lay.conv_channels, lay.conv_layer_bytes,
                 lay.conv_base)):
            if dtype not in STATE_DTYPES:
                raise TypeError(f"{name} must be one of {STATE_DTYPES} with an ssm_layout, got {dtype!r}")
            if self.arena.numel() % dtype.itemsize:
                raise ValueError(f"arena has {self.arena.numel()} bytes, not a whole number of {name} elements")
            if want * dtype.itemsize != have or base % dtype.itemsize:
                raise ValueError(f"{name}={dtype} does not match the ssm_layout ({have} bytes per layer, "
                                 f"expected {want * dtype.itemsize})")
        n = self.num_mamba_layers
        if n < 1:
            raise ValueError(f"the ssm_layout holds no Mamba layer: {lay}")
        block_bytes = max(lay.ssm_offset(n), lay.conv_offset(n))
        if block_bytes > self.arena.numel():
            raise ValueError(f"an SSM block of {n} Mamba layers is {block_bytes} bytes, more than the arena's "
                             f"{self.arena.numel()}")

    def _check_spec(self) -> None:
        """A spec, when given, is the one the layouts and dtypes were made from (the ops read
        head counts from it)."""
        spec = self.spec
        if not isinstance(spec, HybridModelSpec):
            raise TypeError(f"spec must be a HybridModelSpec or None, got {type(spec).__name__}")
        if self.kv_layout is not None and (
                self.kv_layout != kv_page_layout(spec, self.kv_layout.page_tokens)
                or (self.num_attn_layers, self.kv_dtype) != (spec.num_attn_layers, spec.kv_dtype)):
            raise ValueError(f"the KV geometry ({self.kv_layout}, {self.num_attn_layers} layers, {self.kv_dtype}) "
                             f"is not spec {spec.name!r}'s")
        if self.ssm_layout is not None and (
                self.ssm_layout != ssm_block_layout(spec)
                or (self.ssm_dtype, self.conv_dtype) != (spec.ssm_dtype, spec.conv_dtype)):
            raise ValueError(f"the SSM geometry ({self.ssm_layout}, {self.ssm_dtype}, {self.conv_dtype}) "
                             f"is not spec {spec.name!r}'s")
