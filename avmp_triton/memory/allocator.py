"""Device-resident arena allocators: AVMP and its baselines, on one machinery.

Memory model: one uint8 arena split into equal slabs; every slab belongs to one
pool; a pool hands out units of one size (KV page or SSM block, each rounded up to 16 bytes only).
All state is in device tensors and is changed only by the Triton kernels in
``avmp_triton.kernels.alloc``; Python validates arguments, launches, and (on the rare failure
path) plans a rebalance from a small snapshot of the slab counters.

The allocators differ only in policy:

- ``AVMPAllocator``: two pools (KV pages, SSM blocks); on failure capacity moves between them,
  first whole free slabs, else compacted ones (live units copied out, handles rebound).
  For an attention-free spec (pure Mamba: ``num_attn_layers == 0``) the KV unit is 0 bytes and
  its pool owns no slab, ever: the SSM pool is the whole arena (``StaticDualAllocator`` likewise).
- ``StaticDualAllocator``: the same two pools with a fixed split, never rebalanced.
- ``PaddedUnifiedAllocator``: one pool whose unit is max(page, block) of the whole model (a
  simulation baseline: vLLM pads per layer group, not this way).
- ``VllmHybridAllocator``: vLLM's pool for a hybrid model, one pool of equal blocks in which a
  request's state takes one block per Mamba layer group (``avmp_triton.sim.engines``).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from avmp_triton._checks import check_tensor, is_int
from avmp_triton import _triton_env  # first: on CPU-only hosts it chooses the interpreter before triton loads
from avmp_triton.kernels import alloc as K
from avmp_triton.memory.free_bound import FreeBound
from avmp_triton.memory.launch import launcher
from avmp_triton.memory.planner import donor_holdings, plan_victims_array
from avmp_triton.spec import HybridModelSpec, check_cache_dtypes, check_page_tokens

KIND_FREE, KIND_KV, KIND_SSM = 0, 1, 2
_KIND_NAMES = {KIND_KV: "kv", KIND_SSM: "ssm"}
_KIND_OF_NAME = {None: 0, "kv": KIND_KV, "ssm": KIND_SSM}

SLAB_ALIGN = 128
UNIT_ALIGN = 16
MAX_MIGRATION_BATCH = 256

# single-program kernels walk their input in blocks of BLOCK lanes; their time is latency-bound
# (a few dependent memory round trips per block), so a whole batch in one block is fastest
_BLOCK = 1024
_NUM_WARPS = 8


def _launch_shape(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a single-program kernel over ``n`` items: a fixed table, no autotuning
    (these kernels mutate state). Picked on an H100 (perf/results/tune_alloc_block_H100.json)."""
    if n <= 256:
        return 256, 8
    if n <= 1024:
        return 1024, 16
    return 4096, 16
# alloc runs one program per _ALLOC_BLOCK handles
_ALLOC_BLOCK = 256
# a free of more than ArenaAllocator.free_one_program_max handles: one program per _FREE_BLOCK
_FREE_BLOCK = 256
# unit copy: one program copies CHUNK int32 words in BLOCK-word steps
_COPY_CHUNK = 8192
_COPY_BLOCK = 2048


class PoolExhaustedError(RuntimeError):
    """Not enough capacity, even after rebalancing. The allocator is unchanged."""


class InvalidHandleError(ValueError):
    """A handle that is out of range, free, of the wrong kind, or repeated. Nothing was changed."""


def no_kv_pool_error(spec_name: str, what: str) -> ValueError:
    """What a request for KV capacity raises on an attention-free spec (the Python model raises
    the same): no rebalance could serve it, so it is a caller's error, not an exhausted pool."""
    return ValueError(f"spec {spec_name!r} has no attention layers (num_attn_layers=0), so the allocator "
                      f"has no KV pool: {what}")


_ERROR_TEXT = {
    int(K.ERR_RANGE): "is out of range",
    int(K.ERR_NOT_LIVE): "is not allocated (free or already freed)",
    int(K.ERR_WRONG_KIND): "is of the wrong kind",
    int(K.ERR_DUPLICATE): "appears more than once in one call",
}


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def default_slab_bytes(unit_bytes: list[int], min_slab_bytes: int = 2 << 20, waste_ok: float = 0.01) -> int:
    """Smallest multiple of the largest unit (>= ``min_slab_bytes``) whose tail waste is small.

    Tail waste of a pool is ``slab % unit``; we take the first of 8 candidate sizes whose summed
    tail fraction over the pools is at most ``waste_ok``, else the candidate with the least waste.
    Smaller slabs keep migration fine-grained and compaction cheap.
    """
    big = max(unit_bytes)
    k0 = max(1, math.ceil(min_slab_bytes / big))
    best = None
    for k in range(k0, k0 + 8):
        slab = _round_up(k * big, SLAB_ALIGN)
        waste = sum((slab % u) / slab for u in unit_bytes)
        if waste <= waste_ok:
            return slab
        if best is None or waste < best[0]:
            best = (waste, slab)
    return best[1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoolStats:
    unit_bytes: int
    units_per_slab: int
    slabs: int
    free_slabs: int
    units: int
    used_units: int
    free_units: int
    slab_tail_bytes: int  # bytes at the end of this pool's slabs that hold no unit


@dataclasses.dataclass(frozen=True, kw_only=True)
class AllocatorStats:
    pools: dict  # "kv", "ssm" (or "unified") -> PoolStats
    live_kv: int
    live_ssm: int
    handles_live: int
    handles_capacity: int
    padding_bytes: int       # live units' bytes beyond their exact size (padding and alignment)
    slab_tail_bytes: int
    arena_tail_bytes: int    # capacity asked for but not usable as whole slabs
    migrations: int          # rebalance events that moved capacity
    slabs_moved: int
    units_moved: int         # live units relocated by compaction
    bytes_copied: int
    # of ``migrations`` / ``slabs_moved``: the moves of the proactive watermark policy (AVMP only)
    proactive_migrations: int = 0
    proactive_slabs_moved: int = 0


class ArenaAllocator:
    """Shared machinery; use one of the policies below."""

    # frees of up to this many handles run as one program (one launch, latency-bound); larger ones
    # spread over the GPU in two launches. Public so a benchmark can time both ways side by side.
    free_one_program_max = 1024

    _unified: bool = False
    _migrates: bool = False
    # page sizes the attention kernels read (a power of two up to spec.MAX_PAGE_TOKENS)
    _KERNEL_PAGES: bool = True
    # units one request's SSM state takes: one handle from alloc_ssm, and ssm_units - 1 more units
    # that a scheduler holds as extra pages of the request (only VllmHybridAllocator has more than 1)
    ssm_units: int = 1

    def __init__(self, spec: HybridModelSpec, capacity_bytes: int, *, device=None, kv_fraction: float = 0.5,
                 page_tokens: int = 16, slab_bytes: int | None = None, migration_batch: int = 16,
                 materialize: bool = True):
        """``materialize=False``: a meta arena without bytes, for planners that never touch them."""
        self._check_args(spec, capacity_bytes, kv_fraction, page_tokens, migration_batch)
        self.device = _resolve_device(device, runs_kernels=materialize)
        self.spec = spec
        self._kv_pool = spec.num_attn_layers > 0
        self.page_tokens = page_tokens
        self.migration_batch = migration_batch

        # exact unit sizes, then the unit each pool hands out
        self.kv_page_raw = spec.kv_bytes_per_token * page_tokens
        self.ssm_block_raw = spec.ssm_state_raw_bytes
        page = _round_up(self.kv_page_raw, UNIT_ALIGN)  # 0 without attention layers
        block = spec.ssm_block_bytes
        if self._unified:
            self.pool_names = ("unified",)
            unit = max(page, _round_up(-(-block // self.ssm_units), UNIT_ALIGN))
            self.unit_bytes = (unit, unit)
            self._pool_of = {KIND_KV: 0, KIND_SSM: 0}
        else:
            self.pool_names = ("kv", "ssm")
            self.unit_bytes = (page, block)
            self._pool_of = {KIND_KV: 0, KIND_SSM: 1}

        if slab_bytes is None:
            slab_bytes = default_slab_bytes(sorted({u for u in self.unit_bytes if u}))
        if not is_int(slab_bytes) or slab_bytes % SLAB_ALIGN or slab_bytes < max(self.unit_bytes):
            raise ValueError(f"slab_bytes must be a multiple of {SLAB_ALIGN} holding the largest unit "
                             f"({max(self.unit_bytes)} bytes), got {slab_bytes!r}")
        self.slab_bytes = slab_bytes
        self.num_slabs = capacity_bytes // slab_bytes
        min_slabs = 2 if self._kv_pool and not self._unified else 1
        if self.num_slabs < min_slabs:
            raise ValueError(f"capacity_bytes={capacity_bytes} holds {self.num_slabs} slab(s) of {slab_bytes} "
                             f"bytes; at least {min_slabs} needed")
        self.capacity_bytes = capacity_bytes
        # a 0-byte KV unit fits no slab: its pool stays empty and the handle space is the SSM pool's
        self.units_per_slab = tuple(slab_bytes // u if u else 0 for u in self.unit_bytes)
        self.max_units_per_slab = max(self.units_per_slab)
        self.num_handles = self.num_slabs * self.max_units_per_slab  # never fewer than live units

        S, dev = self.num_slabs, self.device
        owner = self._initial_owner(kv_fraction)

        self.arena = torch.empty(S * slab_bytes, dtype=torch.uint8, device=dev if materialize else "meta")
        self._arena_words = self.arena.view(torch.int32)
        H = self.num_handles
        self.handle_table = torch.full((H,), -1, dtype=torch.int64, device=dev)
        self.handle_kind = torch.zeros(H, dtype=torch.int32, device=dev)
        self._handle_stack = torch.arange(H - 1, -1, -1, dtype=torch.int32, device=dev)  # handle 0 pops first
        self._stack_base = (0, S * self.units_per_slab[0])
        self._free_units = torch.empty(self._stack_base[1] + S * self.units_per_slab[1], dtype=torch.int64, device=dev)
        self.slab_owner = owner.to(dev)
        self._slot_handle = torch.full((S, self.max_units_per_slab), -1, dtype=torch.int32, device=dev)
        self._mark = torch.zeros(H, dtype=torch.int64, device=dev)
        self._epoch = torch.zeros(1, dtype=torch.int64, device=dev)
        self._ticket = torch.zeros(1, dtype=torch.int32, device=dev)
        self._init_io(dev)
        tops = [0, 0, H]
        for p in range(len(self.pool_names)):
            slots = _slab_slots(torch.nonzero(owner == p).flatten(), slab_bytes, self.unit_bytes[p],
                                self.units_per_slab[p])
            base = self._stack_base[p]
            self._free_units[base:base + slots.numel()] = slots.flip(0).to(dev)  # lowest slot pops first
            tops[p] = slots.numel()
        self._tops.copy_(torch.tensor(tops, dtype=torch.int64))
        self._state = (self.handle_table, self.handle_kind, self._handle_stack, self._free_units, self._tops,
                       self._slot_handle)
        self._workspaces: dict[int, torch.Tensor] = {}
        self._launches: dict = {}  # the hot launches, their fixed arguments bound once (launch.BoundLaunch)
        self._bound = FreeBound(len(self.pool_names), tops, capture_possible=dev.type == "cuda")

        self.migrations = 0
        self.slabs_moved = 0
        self.units_moved = 0
        self.bytes_copied = 0

    def _init_io(self, dev: torch.device) -> None:
        """The buffers through which calls report to the host."""
        # status [0:3] and stack tops [4:7] in one buffer, so that the one read a call that reports
        # on the host makes brings both (tops at a 32-byte offset keep their 16-byte alignment)
        self._io = torch.zeros(8, dtype=torch.int64, device=dev)
        self._status = self._io[0:3]
        self._tops = self._io[4:7]
        # a syncing free's report (status and tops, as in _io): pinned host memory that the free
        # kernel writes through (CUDA maps pinned memory into the device's address space), so that
        # reading it is a stream sync and no copy; a plain tensor on a CPU-only host
        self._cuda = dev.type == "cuda"
        self._report = torch.zeros(8, dtype=torch.int64, pin_memory=self._cuda)
        # reads of the status, the tops or the slab counters back to the host by alloc, free, resolve,
        # make_room and rebalance (each one a sync on a GPU; stats() is not counted); an alloc that
        # the pool can certainly serve makes none
        self.host_reads = 0

    def _initial_owner(self, kv_fraction: float) -> torch.Tensor:
        """``[S]`` int32 pool of each slab at the start: the KV pool's first, then the SSM pool's."""
        S = self.num_slabs
        if self._unified:
            return torch.zeros(S, dtype=torch.int32)
        # without attention layers kv_fraction is moot: there is no KV page to put in a slab
        n_kv = min(S, int(kv_fraction * S + 0.5)) if self._kv_pool else 0  # round half up, not to even
        owner = torch.ones(S, dtype=torch.int32)
        owner[:n_kv] = 0
        return owner

    def _check_args(self, spec, capacity_bytes, kv_fraction, page_tokens, migration_batch) -> None:
        """Every constructor argument, before anything is allocated; errors name the value."""
        if not isinstance(spec, HybridModelSpec):
            raise TypeError(f"spec must be a HybridModelSpec, got {type(spec).__name__}")
        check_cache_dtypes(spec)  # again here: a spec changed through object.__setattr__ skips its own check
        if spec.num_mamba_layers < 1:
            raise ValueError(f"spec {spec.name!r} has no Mamba layers (num_mamba_layers="
                             f"{spec.num_mamba_layers}); the allocators need an SSM pool")
        if self._unified and spec.num_attn_layers < 1:
            raise ValueError(f"{type(self).__name__} pools KV pages and SSM blocks in one unit size, but spec "
                             f"{spec.name!r} has no attention layers (num_attn_layers=0): use AVMPAllocator or "
                             f"StaticDualAllocator")
        if not is_int(page_tokens) or page_tokens < 1:
            raise ValueError(f"page_tokens must be a positive int, got {page_tokens!r}")
        if self._KERNEL_PAGES:
            check_page_tokens(page_tokens)
        if not is_int(capacity_bytes) or capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        if isinstance(kv_fraction, bool) or not isinstance(kv_fraction, (int, float)) or not 0.0 <= kv_fraction <= 1.0:
            raise ValueError(f"kv_fraction must be in [0, 1], got {kv_fraction!r}")
        if not is_int(migration_batch) or not 1 <= migration_batch <= MAX_MIGRATION_BATCH:
            raise ValueError(f"migration_batch must be an int in [1, {MAX_MIGRATION_BATCH}], got {migration_batch!r}")


    def alloc_kv(self, n: int) -> torch.Tensor:
        """Allocate ``n`` KV pages. Returns ``[n]`` int32 handles on the device.

        One launch. No host sync while the host knows the pool has room (``memory/free_bound.py``);
        otherwise one read of the status (a sync), and on a short pool a rebalance or
        PoolExhaustedError (nothing changed)."""
        return self._alloc(KIND_KV, n)

    def alloc_ssm(self, n: int) -> torch.Tensor:
        """Allocate ``n`` SSM blocks. Returns ``[n]`` int32 handles on the device (as ``alloc_kv``)."""
        return self._alloc(KIND_SSM, n)

    def free(self, handles: torch.Tensor, kind: str | None = None) -> None:
        """Free ``[n]`` int32 handles of either kind (or only ``kind``: "kv" / "ssm"). All or nothing:
        InvalidHandleError names the first bad handle, so the call reads its status back (one sync;
        ``free_from`` is the call without it)."""
        req = self._kind_arg(kind)
        handles = self._handles_arg(handles, "handles")
        n = handles.numel()
        if n == 0:
            return
        if n <= self.free_one_program_max:
            self._free_launch("report", req, n)((1,), handles, n)
            status = self._read_report()
        else:
            self._launch_free(handles, req)
            status = self._read_status()
        self._raise_on_handle_error(status, kind, "handles")

    def alloc_into(self, kind: str, out: torch.Tensor) -> torch.Tensor:
        """Allocate ``out.numel()`` units of ``kind`` ("kv" or "ssm") into ``out``: one launch, no
        host sync, so a CUDA graph can capture it. Capacity is not moved here: when the pool is
        short, nothing is allocated and ``out`` is untouched. Returns the status buffer, ``[3]``
        int64 (code 0 = allocated, else code, n, units available), which the next call overwrites."""
        req = self._kind_arg(kind)
        if req == 0:
            raise ValueError("kind must be 'kv' or 'ssm', got None")
        self._check_vec(out, "out", None)
        n = self._check_count(out.numel())
        self._check_kv_demand(req, n, f"cannot allocate n={n} KV pages")
        if n:
            self._launch_alloc(req, n, out)
            self._bound.taken(self._pool_of[req], n)
        else:
            self._status.zero_()
        return self._status

    def free_from(self, handles: torch.Tensor) -> torch.Tensor:
        """Free ``handles`` (either kind, all or nothing): one launch, no host sync. Returns the
        status buffer, ``[3]`` int64 (code 0 = freed, else code, position, handle: nothing was
        freed), which the next call overwrites."""
        self._check_vec(handles, "handles", None)
        if handles.numel():
            self._launch_free(handles, 0)
        else:
            self._status.zero_()
        return self._status

    def resolve(self, handles: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """Byte offsets ``[n]`` int64 of live handles in the arena."""
        req = self._kind_arg(kind)
        handles = self._handles_arg(handles, "handles")
        out = torch.empty(handles.numel(), dtype=torch.int64, device=self.device)
        if handles.numel():
            block, warps = _launch_shape(handles.numel())
            launcher(K.resolve_kernel)((1,), handles, handles.numel(), out, self._status, self.handle_table,
                                       self.handle_kind, self.num_handles, REQ_KIND=req, BLOCK=block,
                                       num_warps=warps)
            self._raise_on_handle_error(self._read_status(), kind, "handles")
        return out

    def rebalance(self, to_kind: str, num_slabs: int) -> None:
        """Move ``num_slabs`` slabs of capacity into the ``to_kind`` pool now ("kv" or "ssm").

        Free slabs go first; the rest are emptied by compaction. Raises PoolExhaustedError (state
        unchanged) when the other pool cannot give that many, ValueError for bad arguments.
        """
        if to_kind not in ("kv", "ssm"):
            raise ValueError(f"to_kind must be 'kv' or 'ssm', got {to_kind!r}")
        if not is_int(num_slabs) or not 0 <= num_slabs <= self.num_slabs:
            raise ValueError(f"num_slabs must be an int in [0, {self.num_slabs}], got {num_slabs!r}")
        if not self._migrates:
            raise PoolExhaustedError(f"{type(self).__name__} never moves capacity between pools")
        self._check_kv_demand(_KIND_OF_NAME[to_kind], num_slabs, f"cannot move {num_slabs} slab(s) into it")
        if num_slabs:
            self._move_capacity(_KIND_OF_NAME[to_kind], num_slabs, eager=False)

    def grow_kv(self, block_table: torch.Tensor, num_pages: torch.Tensor, need: torch.Tensor,
                failed: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``need[r]`` new KV page handles to row r of ``block_table``, on the device.

        Args:
            block_table: ``[R, W]`` int32, -1 padded; row r holds ``num_pages[r]`` handles.
            num_pages: ``[R]`` int32, updated in place.
            need: ``[R]`` int32 pages to add (0 for rows that need none).
            failed: optional ``[R]`` int32 output buffer.
        Returns:
            ``failed`` ``[R]`` int32: 0 granted; 7 no capacity; 6 bad count (need < 0 or the row
            would pass W). A row gets all its pages or none, rows are served in order, and once
            one row does not fit no later row is granted. Nothing is rebalanced here (no sync):
            call ``make_room`` / ``rebalance`` from the host on failure. On an attention-free spec
            the KV pool stays empty: zero-need rows get 0 and change nothing, others get 7.
        """
        R, W = self._check_table_args(block_table, num_pages)
        self._check_vec(need, "need", R)
        if failed is None:
            failed = torch.empty(R, dtype=torch.int32, device=self.device)
        else:
            self._check_vec(failed, "failed", R)
        rp, log_r = _pow2(R)
        pool = self._pool_of[KIND_KV]
        block, warps = _launch_shape(R)
        launcher(K.grow_kernel)((1,), block_table, num_pages, need, failed, self._workspace(rp), R, W,
                                block_table.stride(0), rp, *self._state, self._stack_base[pool],
                                self.slab_bytes, self.unit_bytes[pool], self.max_units_per_slab,
                                POOL=pool, LOG_R=log_r, BLOCK=block, num_warps=warps)
        self._bound.forget(pool)
        return failed

    def release_rows(self, rows: torch.Tensor, block_table: torch.Tensor, num_pages: torch.Tensor,
                     ssm_handles: torch.Tensor | None = None, status: torch.Tensor | None = None) -> torch.Tensor:
        """Free every handle of the listed rows on the device; reset the rows to -1 / 0.

        Args:
            rows: ``[M]`` int32 row indices, -1 entries skipped (fixed size for CUDA graphs).
            block_table: ``[R, W]`` int32; num_pages: ``[R]`` int32.
            ssm_handles: optional ``[R]`` int32 SSM handle per row (-1 for none), freed too.
            status: optional ``[3]`` int64 output.
        Returns:
            ``status`` ``[3]`` int64 (code, position, value); code 0 = done. On any bad row or
            handle nothing is freed; ``check_status`` turns a failure into an exception.
        """
        R, W = self._check_table_args(block_table, num_pages)
        self._check_vec(rows, "rows", None)
        if ssm_handles is not None:
            self._check_vec(ssm_handles, "ssm_handles", R)
        if status is None:
            status = torch.empty(3, dtype=torch.int64, device=self.device)
        elif status.dtype != torch.int64 or status.shape != (3,) or status.device != self.device:
            raise ValueError(f"status must be a [3] int64 tensor on {self.device}, got "
                             f"{tuple(status.shape)} {status.dtype} on {status.device}")
        M = rows.numel()
        rp, log_r = _pow2(M)
        p0, p1 = self._pool_of[KIND_KV], self._pool_of[KIND_SSM]
        block, warps = _launch_shape(M)
        launcher(K.release_kernel)(
            (1,), rows, M, block_table, num_pages, ssm_handles if ssm_handles is not None else num_pages,
            status, self._workspace(rp), self._mark, self._epoch, R, W, block_table.stride(0), rp,
            *self._state, self._stack_base[1], self.slab_bytes, self.unit_bytes[0],
            self.unit_bytes[1], self.max_units_per_slab, self.num_handles,
            POOL_KV=p0, POOL_SSM=p1, HAS_SSM=ssm_handles is not None, LOG_R=log_r, BLOCK=block,
            num_warps=warps)
        return status

    def check_status(self, status: torch.Tensor) -> None:
        """Host check of a ``release_rows`` status (syncs); raises what the Python API would."""
        code, pos, val = status.tolist()
        if code in (int(K.ERR_BAD_ROW), int(K.ERR_BAD_COUNT)):
            what = "is out of range" if code == int(K.ERR_BAD_ROW) else "has a num_pages outside [0, W]"
            raise ValueError(f"rows[{pos}]: row {val} {what}; nothing was changed")
        self._raise_on_handle_error([code, pos, val], None, "released entry")

    def make_room(self, kind: str, n: int) -> None:
        """Host-side rebalance so that ``n`` more units of ``kind`` fit (AVMP only; syncs)."""
        k = _KIND_OF_NAME.get(kind)
        if not k:
            raise ValueError(f"kind must be 'kv' or 'ssm', got {kind!r}")
        n = self._check_count(n)
        self._check_kv_demand(k, n, f"cannot make room for n={n} KV pages")
        pool = self._pool_of[k]
        free = self._read_tops()[pool]
        if free >= n:
            return
        if not self._migrates:
            raise self._exhausted(k, n, free)
        deficit = n - free
        self._move_capacity(k, math.ceil(deficit / self.units_per_slab[pool]), eager=True, n=n, free=free)

    @property
    def migrates(self) -> bool:
        """Whether capacity can move between the pools (``rebalance``, ``make_room``): AVMP only."""
        return self._migrates

    def pool_index(self, kind: str) -> int:
        """Index in ``pool_names`` (and in ``free_counts``) of the pool that serves ``kind``."""
        if kind not in ("kv", "ssm"):
            raise ValueError(f"kind must be 'kv' or 'ssm', got {kind!r}")
        return self._pool_of[_KIND_OF_NAME[kind]]

    @property
    def free_counts(self) -> torch.Tensor:
        """``[3]`` int64 on the device, live: free units of pool 0 and pool 1, then free handles.
        Read it (``.tolist()`` syncs; ``torch.cat`` into a larger read does not); never write it."""
        return self._tops

    @property
    def slab_live(self) -> torch.Tensor:
        """``[S]`` int32 live units per slab, counted from the reverse map (kept off the hot path:
        per-slab counters updated by every alloc/free would serialise on atomics)."""
        return (self._slot_handle >= 0).sum(1, dtype=torch.int32)

    def stats(self) -> AllocatorStats:
        """A snapshot of the accounting (syncs)."""
        tops = self._tops.tolist()  # not _read_tops: a snapshot leaves the alloc path as it was
        owner = self.slab_owner.cpu()
        live = self.slab_live.cpu()
        kinds = torch.bincount(self.handle_kind.cpu().long(), minlength=3).tolist()
        pools = {}
        tail_total = 0
        for p, name in enumerate(self.pool_names):
            mine = owner == p
            slabs = int(mine.sum())
            units = slabs * self.units_per_slab[p]
            tail = slabs * (self.slab_bytes - self.units_per_slab[p] * self.unit_bytes[p])
            tail_total += tail
            pools[name] = PoolStats(unit_bytes=self.unit_bytes[p], units_per_slab=self.units_per_slab[p],
                                    slabs=slabs, free_slabs=int((mine & (live == 0)).sum()), units=units,
                                    used_units=units - tops[p], free_units=tops[p], slab_tail_bytes=tail)
        live_kv, live_ssm = kinds[KIND_KV], kinds[KIND_SSM]
        padding = (live_kv * (self.unit_bytes[self._pool_of[KIND_KV]] - self.kv_page_raw)
                   + live_ssm * (self.unit_bytes[self._pool_of[KIND_SSM]] - self.ssm_block_raw))
        pro_events, pro_slabs = self.proactive_counters()
        return AllocatorStats(
            pools=pools, live_kv=live_kv, live_ssm=live_ssm, handles_live=live_kv + live_ssm,
            handles_capacity=self.num_handles, padding_bytes=padding, slab_tail_bytes=tail_total,
            arena_tail_bytes=self.capacity_bytes - self.num_slabs * self.slab_bytes,
            migrations=self.migrations + pro_events, slabs_moved=self.slabs_moved + pro_slabs,
            units_moved=self.units_moved, bytes_copied=self.bytes_copied,
            proactive_migrations=pro_events, proactive_slabs_moved=pro_slabs)

    def proactive_step(self) -> None:
        """The proactive watermark policy: only ``AVMPAllocator(proactive=...)`` has one; a no-op
        here, so that a scheduler can call it on any allocator."""

    def proactive_counters(self) -> tuple[int, int]:
        """(events, slabs moved) of the proactive policy so far, read from the device (syncs);
        (0, 0) without a policy."""
        return (0, 0)

    def decision_state(self) -> list[torch.Tensor]:
        """Every device tensor that decides later calls (handles, kinds, free stacks, slab owners),
        int64, with unit byte offsets as (slab, slot) numbers so that allocators whose units differ
        only in bytes (tensor-parallel shards of one model) give equal state for equal histories.
        No host read; free-stack entries above their tops read -1."""
        dev = self.device
        unit_of_kind = torch.tensor([1, self.unit_bytes[self._pool_of[KIND_KV]] or 1,
                                     self.unit_bytes[self._pool_of[KIND_SSM]]], dtype=torch.int64, device=dev)
        state = [self._slot_number(self.handle_table, unit_of_kind[self.handle_kind.long()]),
                 self.handle_kind.long(), self._handle_stack.long(), self._tops, self.slab_owner.long(),
                 self._slot_handle.long().flatten()]
        for p in range(len(self.pool_names)):
            base, end = self._stack_base[p], self._stack_base[p] + self.num_slabs * self.units_per_slab[p]
            live = torch.arange(end - base, device=dev) < self._tops[p]
            slots = self._slot_number(self._free_units[base:end], max(self.unit_bytes[p], 1))
            state.append(torch.where(live, slots, -1))
        return state

    def _slot_number(self, offsets: torch.Tensor, unit) -> torch.Tensor:
        """(slab, slot) of byte offsets as slab * max_units_per_slab + slot; -1 stays -1."""
        slot = (offsets // self.slab_bytes) * self.max_units_per_slab + (offsets % self.slab_bytes) // unit
        return torch.where(offsets < 0, -1, slot)

    def _read_status(self) -> list[int]:
        """The status of the last call (syncs); the tops come with it and tighten the bound."""
        self.host_reads += 1
        io = self._io.tolist()  # one pageable copy: faster on the host than a pinned copy + event
        self._bound.learn(io[4:7])
        return io[0:3]

    def _read_report(self) -> list[int]:
        """The status of the last syncing free, which its kernel wrote to ``_report`` (syncs)."""
        self.host_reads += 1
        if self._cuda:
            torch.cuda.current_stream().synchronize()  # the stream the launcher launched on
        io = self._report.tolist()
        self._bound.learn(io[4:7])
        return io[0:3]

    def _read_tops(self) -> list[int]:
        """Free units of pool 0 and pool 1, free handles (syncs)."""
        self.host_reads += 1
        tops = self._tops.tolist()
        self._bound.learn(tops)
        return tops

    def _alloc(self, kind: int, n) -> torch.Tensor:
        n = self._check_count(n)
        self._check_kv_demand(kind, n, f"cannot allocate n={n} KV pages")
        out = torch.empty(n, dtype=torch.int32, device=self.device)
        if n == 0:
            return out
        pool = self._pool_of[kind]
        certain = self._bound.covers(pool, n)
        self._launch_alloc(kind, n, out)
        if certain:  # the pool has the units: nothing to read back, nothing to report
            self._bound.taken(pool, n)
            return out
        code, _, avail = self._read_status()
        if code == int(K.ERR_NO_SPACE):
            if not self._migrates:
                raise self._exhausted(kind, n, avail)
            self._move_capacity(kind, math.ceil((n - avail) / self.units_per_slab[pool]), eager=True, n=n, free=avail)
            self._launch_alloc(kind, n, out)
            code, _, avail = self._read_status()
            assert code == 0, "rebalance planned room that the pool does not have"
        return out

    def _launch_alloc(self, kind: int, n: int, out: torch.Tensor) -> None:
        """One launch, no sync: status lands in ``self._status`` (code, n, available)."""
        bound = self._launches.get(("alloc", kind))
        if bound is None:
            pool = self._pool_of[kind]
            bound = self._launches["alloc", kind] = launcher(K.alloc_kernel).bind(
                self._status, self._ticket, *self._state, self._stack_base[pool], self.slab_bytes,
                self.unit_bytes[pool], self.max_units_per_slab, POOL=pool, KIND=kind, BLOCK=_ALLOC_BLOCK, num_warps=4)
        bound(((n + _ALLOC_BLOCK - 1) // _ALLOC_BLOCK,), out, n)

    def _launch_free(self, handles: torch.Tensor, req: int) -> None:
        """No sync: status lands in ``self._status`` (code, position, value). Up to
        ``free_one_program_max`` handles in one single-program launch; more in two launches of one
        program per ``_FREE_BLOCK`` handles (validate, then push), which free the same units in
        the same order."""
        n = handles.numel()
        if n <= self.free_one_program_max:
            self._free_launch("free", req, n)((1,), handles, n)
            return
        progs = (n + _FREE_BLOCK - 1) // _FREE_BLOCK
        ws = self._workspace(3 * progs)   # [progs, 6]
        self._free_launch("check", req, n)((progs,), handles, n, ws)
        self._free_launch("commit", req, n)((progs,), handles, n, self._status, ws, progs)

    def _free_launch(self, which: str, req: int, n: int):
        """The bound launch of one free kernel; what varies with ``n`` (block, warps, padding) keys it."""
        if which in ("free", "report"):
            shape = _launch_shape(n)
        else:  # the commit kernel reduces over the programs' counts padded to a power of two
            shape = (_FREE_BLOCK, 4, _pow2((n + _FREE_BLOCK - 1) // _FREE_BLOCK)[0] if which == "commit" else 0)
        key = (which, req) + shape
        bound = self._launches.get(key)
        if bound is not None:
            return bound
        p0, p1 = self._pool_of[KIND_KV], self._pool_of[KIND_SSM]
        geometry = (self._stack_base[1], self.slab_bytes, self.unit_bytes[0], self.unit_bytes[1],
                    self.max_units_per_slab)
        if which in ("free", "report"):
            report = which == "report"
            bound = launcher(K.free_kernel).bind(
                self._report if report else self._status, self._mark, self._epoch, *self._state, *geometry,
                self.num_handles, REQ_KIND=req, POOL_KV=p0, POOL_SSM=p1, BLOCK=shape[0], REPORT_TOPS=report,
                num_warps=shape[1])
        elif which == "check":
            bound = launcher(K.free_check_kernel).bind(
                self._mark, self._epoch, self.handle_kind, self.handle_table, self.num_handles,
                REQ_KIND=req, POOL_KV=p0, POOL_SSM=p1, BLOCK=_FREE_BLOCK, num_warps=4)
        else:
            bound = launcher(K.free_commit_kernel).bind(
                self._ticket, self._epoch, *self._state, *geometry,
                POOL_KV=p0, POOL_SSM=p1, BLOCK=_FREE_BLOCK, PROGS_PAD=shape[2], num_warps=4)
        self._launches[key] = bound
        return bound

    def _exhausted(self, kind: int, n: int, free: int) -> PoolExhaustedError:
        return PoolExhaustedError(
            f"cannot allocate n={n} {_KIND_NAMES[kind]} unit(s): {free} free in pool "
            f"{self.pool_names[self._pool_of[kind]]!r} and no capacity can be moved into it")

    def _move_capacity(self, kind: int, need: int, *, eager: bool, n: int | None = None, free: int | None = None):
        """Plan (from a snapshot of the slab counters) and run a migration of ``need`` slabs."""
        p = self._pool_of[kind]
        d = 1 - p
        # one read (one sync), planned on arrays: no Python loop over the slabs
        owner, live = torch.stack([self.slab_owner, self.slab_live]).cpu().numpy()
        self.host_reads += 1
        victims = plan_victims_array(owner, live, d, need, self.units_per_slab[d], eager=eager,
                                     migration_batch=self.migration_batch)
        if victims is None:
            if n is not None:
                raise self._exhausted(kind, n, free)
            slabs, live_total = donor_holdings(owner.tolist(), live.tolist(), d)
            raise PoolExhaustedError(
                f"cannot move {need} slab(s) into the {_KIND_NAMES[kind]} pool: the "
                f"{self.pool_names[d]!r} pool has {slabs} slab(s) holding {live_total} live unit(s)")
        self._move_slabs(victims, d, p, int(live[victims].sum()))

    def _move_slabs(self, victims: np.ndarray, d: int, p: int, n_moves: int) -> None:
        k = len(victims)
        # the victims and the [S] flags of leaving slabs, built on the host, cross in one copy
        host = np.zeros(k + self.num_slabs, dtype=np.int32)
        host[:k] = victims
        host[k + victims] = 1
        both = torch.from_numpy(host).to(self.device)
        victims_t, flag = both[:k], both[k:]
        stacks_d = self._free_units[self._stack_base[d]:]
        launcher(K.drop_slabs_kernel)((1,), stacks_d, self._tops, flag, self.slab_bytes, POOL=d, BLOCK=_BLOCK,
                                      num_warps=_NUM_WARPS)
        if n_moves:
            moves = torch.empty(3, n_moves, dtype=torch.int64, device=self.device)
            launcher(K.collect_moves_kernel)((1,), victims_t, k, moves, n_moves, stacks_d, self._tops,
                                             self._slot_handle, self.slab_bytes, self.unit_bytes[d],
                                             self.units_per_slab[d], self.max_units_per_slab, POOL=d,
                                             BLOCK=_BLOCK, num_warps=_NUM_WARPS)
            chunks = math.ceil(self.unit_bytes[d] // 4 / _COPY_CHUNK)
            launcher(K.move_units_kernel)((n_moves, chunks), self._arena_words, moves, n_moves, self.handle_table,
                                          self._slot_handle, self.slab_bytes, self.unit_bytes[d],
                                          self.max_units_per_slab, CHUNK=_COPY_CHUNK, BLOCK=_COPY_BLOCK, num_warps=8)
        launcher(K.adopt_slabs_kernel)((1,), victims_t, k, self._free_units[self._stack_base[p]:], self._tops,
                                       self.slab_owner, self._slot_handle, self.slab_bytes,
                                       self.unit_bytes[p], self.units_per_slab[p], self.max_units_per_slab,
                                       POOL=p, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
        self._bound.forget(d, p)
        self.migrations += 1
        self.slabs_moved += len(victims)
        self.units_moved += n_moves
        self.bytes_copied += n_moves * self.unit_bytes[d]

    def _workspace(self, rp: int) -> torch.Tensor:
        # kept per size so a captured CUDA graph replays on the same buffer
        ws = self._workspaces.get(rp)
        if ws is None:
            ws = self._workspaces[rp] = torch.empty(2 * rp, dtype=torch.int64, device=self.device)
        return ws

    def _check_kv_demand(self, kind: int, n: int, what: str) -> None:
        """Host check, no sync: only zero KV demand is valid on an attention-free spec."""
        if kind == KIND_KV and n and not self._kv_pool:
            raise no_kv_pool_error(self.spec.name, what)

    def _kind_arg(self, kind) -> int:
        if kind not in _KIND_OF_NAME:
            raise ValueError(f"kind must be None, 'kv' or 'ssm', got {kind!r}")
        return _KIND_OF_NAME[kind]

    def _check_count(self, n) -> int:
        if not is_int(n):
            raise TypeError(f"n must be an int, got {type(n).__name__} {n!r}")
        if not 0 <= n <= self.num_handles:
            raise ValueError(f"n must be in [0, {self.num_handles}] (the handle capacity), got {n}")
        return int(n)

    def _handles_arg(self, t, name: str) -> torch.Tensor:
        """Validate a 1-D int32 device tensor; the Python API accepts strided views."""
        check_tensor(t, name, dim=1, dtypes=(torch.int32,), device=self.device, beside="the allocator")
        return t.contiguous()

    def _check_vec(self, t, name: str, length: int | None) -> None:
        """Device-path buffers are updated in place, so they must be contiguous already."""
        self._handles_arg(t, name)
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
        if length is not None and t.numel() != length:
            raise ValueError(f"{name} must have {length} entries (one per block-table row), got {t.numel()}")

    def _check_table_args(self, block_table, num_pages):
        check_tensor(block_table, "block_table", dim=2, dtypes=(torch.int32,), device=self.device,
                     beside="the allocator")
        if block_table.stride(1) != 1:
            raise ValueError(f"block_table must be 2-D [R, W] with contiguous rows, got shape "
                             f"{tuple(block_table.shape)} strides {block_table.stride()}")
        R, W = block_table.shape
        self._check_vec(num_pages, "num_pages", R)
        return R, W

    def _raise_on_handle_error(self, status, kind, name: str) -> None:
        code, pos, val = status
        if code == 0:
            return
        text = _ERROR_TEXT.get(code, f"failed with code {code}")
        if code == int(K.ERR_WRONG_KIND) and kind:
            text = f"is not a {kind!r} handle"
        where = f"{name}[{pos}]" if code != int(K.ERR_DUPLICATE) else name
        raise InvalidHandleError(f"{where}: handle {val} {text}; nothing was changed")

    def __repr__(self) -> str:
        pools = ", ".join(f"{n}: {self.units_per_slab[i]} x {self.unit_bytes[i]} B/slab"
                          for i, n in enumerate(self.pool_names))
        return (f"{type(self).__name__}(spec={self.spec.name!r}, slabs={self.num_slabs} x {self.slab_bytes} B, "
                f"{pools}, device={self.device})")


class AVMPAllocator(ArenaAllocator):
    """Two exact-size pools behind one handle space; capacity moves between them on demand.

    Args:
        spec: the model's cache geometry.
        capacity_bytes: arena size; whole slabs of it are used.
        device: "cuda" when available, else "cpu" (kernels in the Triton interpreter).
        kv_fraction: share of slabs the KV pool starts with.
        page_tokens: tokens per KV page.
        slab_bytes: slab size (multiple of 128, holds one SSM block); derived from the spec if None.
        migration_batch: free slabs handed over per rebalance at most beyond the ones needed (1-256).
        proactive: optional ``(low, high)`` watermarks on the pools' free fractions,
            ``0 <= low <= high <= 1``: each ``proactive_step()`` moves up to ``migration_batch``
            completely free slabs into a pool whose free fraction is below ``low`` from the other
            pool when that one's is above ``high`` (decided on the device, no host sync), never
            taking the donor below ``low`` or its last slab. Refused for an attention-free spec,
            whose KV pool must never take a slab.

    With an attention-free spec every slab is the SSM pool's; ``kv_fraction`` is ignored, any
    request for KV capacity (``alloc_kv(n > 0)``, ``make_room("kv", n > 0)``, ``rebalance("kv",
    k > 0)``) raises ValueError, and ``grow_kv`` with zero need and ``release_rows`` work as usual.
    """

    _migrates = True

    def __init__(self, spec: HybridModelSpec, capacity_bytes: int, *, device=None, kv_fraction: float = 0.5,
                 page_tokens: int = 16, slab_bytes: int | None = None, migration_batch: int = 16,
                 proactive: tuple[float, float] | None = None, materialize: bool = True):
        self.proactive = _check_proactive(proactive)
        super().__init__(spec, capacity_bytes, device=device, kv_fraction=kv_fraction, page_tokens=page_tokens,
                         slab_bytes=slab_bytes, migration_batch=migration_batch, materialize=materialize)
        if self.proactive is not None:
            dev = self.device
            self._proactive_fp = tuple(_watermark_fp(x) for x in self.proactive)
            self._proactive_flag = torch.zeros(self.num_slabs, dtype=torch.int32, device=dev)
            self._proactive_victims = torch.zeros(min(self.num_slabs, self.migration_batch), dtype=torch.int32,
                                                  device=dev)
            self._proactive_counters = torch.zeros(2, dtype=torch.int64, device=dev)

    def _check_args(self, spec, *args) -> None:
        super()._check_args(spec, *args)
        if self.proactive is not None and not spec.num_attn_layers:
            # the policy would hand free SSM slabs to a KV pool that has no unit to fill them with
            raise ValueError(f"proactive={self.proactive!r} balances the KV and SSM pools, but spec {spec.name!r} "
                             f"has no attention layers (num_attn_layers=0), so no KV pool")

    def proactive_step(self) -> None:
        """One launch of the watermark policy (see ``kernels/alloc.py:proactive_kernel``): no host
        sync, so it can sit in a captured decode step. Moves only completely free slabs (no data
        moves); counts its moves in a device counter that ``stats()`` reads. No-op without a policy.
        """
        if self.proactive is None:
            return
        low_fp, high_fp = self._proactive_fp
        launcher(K.proactive_kernel)(
            (1,), self._free_units, self._tops, self.slab_owner, self._slot_handle, self._proactive_flag,
            self._proactive_victims, self._proactive_counters, self.num_slabs, self._stack_base[1],
            self.slab_bytes, self.unit_bytes[0], self.unit_bytes[1], self.units_per_slab[0],
            self.units_per_slab[1], self.max_units_per_slab, low_fp, high_fp, self.migration_batch,
            SCALE=WATERMARK_SCALE, BLOCK=_PROACTIVE_BLOCK, BLOCK_U=_PROACTIVE_BLOCK_U, num_warps=4)
        self._bound.forget(0, 1)  # free slabs may have left either pool

    def proactive_counters(self) -> tuple[int, int]:
        if self.proactive is None:
            return (0, 0)
        events, slabs = self._proactive_counters.tolist()
        return int(events), int(slabs)


class StaticDualAllocator(ArenaAllocator):
    """Two exact-size pools with a fixed split; never rebalanced."""

    def __init__(self, spec: HybridModelSpec, capacity_bytes: int, *, ssm_fraction: float = 0.5, device=None,
                 page_tokens: int = 16, slab_bytes: int | None = None, materialize: bool = True):
        if isinstance(ssm_fraction, bool) or not isinstance(ssm_fraction, (int, float)) or not 0.0 <= ssm_fraction <= 1.0:
            raise ValueError(f"ssm_fraction must be in [0, 1], got {ssm_fraction!r}")
        self.ssm_fraction = ssm_fraction
        super().__init__(spec, capacity_bytes, device=device, kv_fraction=1.0 - ssm_fraction,
                         page_tokens=page_tokens, slab_bytes=slab_bytes, materialize=materialize)


class PaddedUnifiedAllocator(ArenaAllocator):
    """One pool whose unit is max(KV page, SSM block) of the whole model; the padding is waste.

    A simulation baseline (not vLLM's rule, which pads per layer group). Its pages (e.g. 544 tokens
    for Jamba) are no power of two, so the attention ops refuse to read them (their layout check
    names the size)."""

    _unified = True
    _KERNEL_PAGES = False

    def __init__(self, spec: HybridModelSpec, capacity_bytes: int, *, device=None, page_tokens: int = 16,
                 slab_bytes: int | None = None):
        super().__init__(spec, capacity_bytes, device=device, page_tokens=page_tokens, slab_bytes=slab_bytes)


class VllmHybridAllocator(ArenaAllocator):
    """vLLM v1's pool for a hybrid model: one pool of equal blocks, each the page of ``page_tokens``
    tokens of every attention layer; a request's Mamba states take ``ssm_units`` blocks of the same
    pool (one per Mamba layer group, each state padded to the block), its KV cache one block per
    ``page_tokens`` tokens. Build it from ``avmp_triton.sim.engines.vllm_hybrid_geometry``
    (block_size, mamba_groups). A simulation baseline: the Mamba ops need a request's state in one
    unit, so ``PagedCache.of`` refuses it."""

    _unified = True
    _KERNEL_PAGES = False

    def __init__(self, spec: HybridModelSpec, capacity_bytes: int, *, page_tokens: int, ssm_units: int,
                 device=None, slab_bytes: int | None = None, materialize: bool = True):
        if not is_int(ssm_units) or ssm_units < 1:
            raise ValueError(f"ssm_units must be a positive int, got {ssm_units!r}")
        self.ssm_units = ssm_units
        super().__init__(spec, capacity_bytes, device=device, page_tokens=page_tokens, slab_bytes=slab_bytes,
                         materialize=materialize)

    def _check_args(self, spec, capacity_bytes, kv_fraction, page_tokens, migration_batch) -> None:
        # after the shared checks: they vouch for the spec and page_tokens this reads
        super()._check_args(spec, capacity_bytes, kv_fraction, page_tokens, migration_batch)
        page = spec.kv_bytes_per_token * page_tokens
        if -(-spec.ssm_block_bytes // self.ssm_units) > _round_up(page, UNIT_ALIGN):
            raise ValueError(f"ssm_units={self.ssm_units} blocks of {page} bytes ({page_tokens} tokens) cannot hold "
                             f"the SSM state of {spec.ssm_block_bytes} bytes")


# watermarks are compared in integers: free * SCALE < round(low * SCALE) * units
WATERMARK_SCALE = 1 << 20
_PROACTIVE_BLOCK = 256
_PROACTIVE_BLOCK_U = 32


def _watermark_fp(x: float) -> int:
    return int(round(float(x) * WATERMARK_SCALE))


def _check_proactive(proactive):
    if proactive is None:
        return None
    try:
        low, high = proactive
    except (TypeError, ValueError):
        raise ValueError(f"proactive must be None or (low, high) watermarks, got {proactive!r}") from None
    for name, x in (("low", low), ("high", high)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x <= 1.0:
            raise ValueError(f"proactive {name} watermark must be a number in [0, 1], got {x!r}")
    if low > high:
        raise ValueError(f"proactive watermarks need low <= high, got low={low!r} high={high!r}")
    return (float(low), float(high))


def _pow2(n: int) -> tuple[int, int]:
    log = max(0, (max(n, 1) - 1).bit_length())
    return 1 << log, log


def _resolve_device(device, runs_kernels: bool = True) -> torch.device:
    if device is None:
        device = _triton_env.default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type == "cpu":
        if runs_kernels:  # a planner's meta arena on CPU runs no Triton, so a GPU host can plan on it
            _triton_env.require_interpreter()
    else:
        raise ValueError(f"device must be cuda or cpu, got {device!r}")
    return dev


def _slab_slots(slabs: torch.Tensor, slab_bytes: int, unit: int, ups: int) -> torch.Tensor:
    """Byte offsets of every unit of ``slabs`` in slab order, unit order."""
    return (slabs.long()[:, None] * slab_bytes + torch.arange(ups)[None, :] * unit).flatten()
