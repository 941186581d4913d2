"""The scheduler's two backends: the allocator's kernels on fixed device buffers ("device"), or
``AllocatorModel``, the pure-Python model of the same state machine ("model"), much faster than
Triton's interpreter on a CPU. Both give identical decisions (tests/engine/test_scheduler.py).

The device backend's buffers (``DeviceTables``: block table, page counts, SSM handles, the grow
call's input and failure flags, the counts' host copy) live at fixed addresses for an engine's
lifetime, so that a captured CUDA graph can run a tick's allocator calls itself: with a model
runner, the backend defers growth, the proactive policy and the counts' snapshot
(``PendingCalls``), and the runner either replays them inside its decode graph or flushes them
before an eager step.
"""
from __future__ import annotations

import numpy as np
import torch

from avmp_triton.memory.allocator import UNIT_ALIGN, ArenaAllocator

__all__ = ["Counts", "DeviceBackend", "DeviceTables", "ModelBackend", "PendingCalls", "Staged"]


class Counts:
    __slots__ = ("free", "free_handles", "slabs")

    def __init__(self, free: list[int], free_handles: int, slabs: list[int]):
        self.free, self.free_handles, self.slabs = free, free_handles, slabs


class Staged:
    """A device buffer filled from the host without a sync: the host writes a pinned buffer (once
    its last copy has left it) and the copy is queued on the stream. A plain ``copy_`` from
    pageable memory would wait for the stream to drain."""

    def __init__(self, n: int, dtype: torch.dtype, dev):
        cuda = dev.type == "cuda"
        self.dev = torch.zeros(n, dtype=dtype, device=dev)
        self._host = torch.zeros(n, dtype=dtype, pin_memory=cuda)
        self._done = torch.cuda.Event() if cuda else None

    def host(self) -> np.ndarray:
        """The host side to fill (a numpy view), free to write."""
        if self._done is not None:
            self._done.synchronize()   # already complete unless no sync has happened since the last copy
        return self._host.numpy()

    def send(self) -> torch.Tensor:
        self.dev.copy_(self._host, non_blocking=True)
        if self._done is not None:
            self._done.record()
        return self.dev


class DeviceTables:
    """One engine's scheduler state on the device, ``R`` rows of ``W`` pages, at fixed addresses
    (a CUDA graph may capture them), and ``device_calls``: the last tick's release, this tick's
    growth, the proactive step and the counts' snapshot, in the order the scheduler makes them."""

    def __init__(self, allocator: ArenaAllocator, R: int, W: int):
        dev = allocator.device
        self.a, self.R, self.W = allocator, R, W
        self.block_table = torch.full((R, W), -1, dtype=torch.int32, device=dev)
        self.num_pages = torch.zeros(R, dtype=torch.int32, device=dev)
        self.ssm_handles = torch.full((R,), -1, dtype=torch.int32, device=dev)
        self.need = Staged(R, torch.int32, dev)
        self.release = Staged(R, torch.int32, dev)   # rows to release, -1 padded
        self.failed = torch.zeros(R, dtype=torch.int32, device=dev)
        self.status = torch.zeros(3, dtype=torch.int64, device=dev)
        self.release_err = torch.zeros(1, dtype=torch.int64, device=dev)
        self._pools = torch.arange(2, device=dev).unsqueeze(1)
        v = self.counts_vector()
        self.snap = torch.empty(v.shape, dtype=v.dtype, pin_memory=dev.type == "cuda")  # the counts' host copy

    def reset(self) -> None:
        """Empty rows and clear flags, in place (a run starts on a drained allocator)."""
        self.block_table.fill_(-1)
        self.num_pages.zero_()
        self.ssm_handles.fill_(-1)
        self.failed.zero_()
        self.release_err.zero_()

    def counts_vector(self) -> torch.Tensor:
        """Tops, slabs per pool, and the grow and release error flags, in one device vector."""
        a = self.a
        # not torch.bincount: on CUDA it reads its input's min and max on the host, two more syncs
        slabs = (a.slab_owner.unsqueeze(0) == self._pools).sum(1)
        return torch.cat([a.free_counts, slabs, torch.count_nonzero(self.failed).view(1), self.release_err])

    def release_rows(self, rows: torch.Tensor) -> None:
        """Frees every unit of ``rows`` (``[M]`` int32, -1 skipped) and empties them; a refusal
        is kept in ``release_err`` for the next read."""
        self.a.release_rows(rows, self.block_table, self.num_pages, self.ssm_handles, self.status)
        torch.maximum(self.release_err, self.status[:1], out=self.release_err)

    def device_calls(self, release: torch.Tensor | None, need: torch.Tensor | None) -> None:
        """The release of ``release`` (``[R]`` int32 rows, -1 padded; None: none), growth by
        ``need`` (``[R]`` int32; None: none), the proactive policy (a no-op without one) and the
        counts' copy to the host, in the scheduler's order: no host sync, capturable."""
        if release is not None:
            self.release_rows(release)
        if need is not None:
            self.a.grow_kv(self.block_table, self.num_pages, need, self.failed)
        self.a.proactive_step()
        self.snap.copy_(self.counts_vector(), non_blocking=True)


class PendingCalls:
    """The device calls the backend has deferred: the release of the rows that finished last tick
    and this tick's growth, proactive step and snapshot. The model runner takes them into a graph
    replay (``take``, then ``replayed``) or runs them before an eager step (``flush``)."""

    def __init__(self, backend: "DeviceBackend"):
        self._be = backend

    def take(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(rows to release, growth per row), None for a call not to make, handing them to the
        caller, whose replay must run ``DeviceTables.device_calls`` on them."""
        be = self._be
        if be.pending is None:
            raise RuntimeError("no device calls are pending")
        need, release = be.pending, be.pending_release
        be.pending = be.pending_release = None
        return release, None if isinstance(need, bool) else need

    def replayed(self) -> None:
        """The caller's replay has run the calls: the snapshot's copy is queued."""
        self._be.snapshot_queued()

    def flush(self) -> None:
        self._be.flush()


class DeviceBackend:
    """The allocator's own kernels on ``DeviceTables`` (an engine's own, or fresh ones).

    ``defer``: a release waits until the next tick's calls, and growth, the proactive step and the
    snapshot wait in ``pending`` until the model runner runs them (``calls``); every other call
    flushes them first, so the device sees the scheduler's order either way."""

    name = "device"

    def __init__(self, alloc: ArenaAllocator, R: int, W: int, tables: DeviceTables | None = None,
                 defer: bool = False):
        if tables is None:
            tables = DeviceTables(alloc, R, W)
        elif (tables.a, tables.R, tables.W) != (alloc, R, W):
            raise ValueError(f"tables of {tables.R} rows x {tables.W} pages on another allocator or shape "
                             f"than the run's {R} x {W}")
        tables.reset()
        self.a, self.t = alloc, tables
        self.block_table, self.num_pages, self.ssm_handles = tables.block_table, tables.num_pages, tables.ssm_handles
        self._snap_done = torch.cuda.Event() if alloc.device.type == "cuda" else None
        self._snap_pending = False
        self.defer = defer
        self.pending: np.ndarray | bool | None = None   # deferred tick calls: the growth per row, or True (none)
        self.pending_release: np.ndarray | None = None  # deferred release: its rows
        self.syncs = 0

    @property
    def calls(self) -> PendingCalls:
        # made on demand: a stored one would make a reference cycle, and the pinned buffers of a
        # run's backend would then be freed by the garbage collector at any later time
        return PendingCalls(self)

    def grow(self, need: np.ndarray) -> None:
        """Growth now, not deferred."""
        self.flush()
        self.t.need.host()[:] = need
        self.a.grow_kv(self.block_table, self.num_pages, self.t.need.send(), self.t.failed)

    def _staged_release(self, rows: np.ndarray) -> torch.Tensor:
        host = self.t.release.host()
        host.fill(-1)
        host[:len(rows)] = rows
        return self.t.release.send()

    def flush(self) -> None:
        """Runs the deferred calls now (eagerly), in order."""
        need, rows = self.pending, self.pending_release
        self.pending = self.pending_release = None
        release = None if rows is None else self._staged_release(rows)
        if need is None:
            if release is not None:
                self.t.release_rows(release)
            return
        if not isinstance(need, bool):
            self.t.need.host()[:] = need
        self.t.device_calls(release, None if isinstance(need, bool) else self.t.need.send())
        self.snapshot_queued()

    def snapshot_queued(self) -> None:
        if self._snap_done is not None:
            self._snap_done.record()
        self._snap_pending = True

    def tick_calls(self, need: np.ndarray | None) -> None:
        """The tick's growth (None: none), proactive step and counts' snapshot: deferred (with a
        release still pending), or now. The snapshot is queued without waiting: the step's own
        sync (its sampled tokens) completes it, so the next ``probe`` costs no round trip."""
        if self.pending is not None:
            self.flush()
        self.pending = True if need is None else need.copy()
        if not self.defer:
            self.flush()

    def release(self, rows: list[int]) -> None:
        """Frees the rows' units: now, or (deferred) first thing in the next tick's calls."""
        self.flush()
        self.pending_release = np.asarray(rows, dtype=np.int32)
        if not self.defer:
            self.flush()

    def probe(self, fresh: bool = False) -> Counts:
        """The counts: the pending snapshot's unless ``fresh`` or none is pending, else a read now.
        A read the host has to wait for counts as a sync (on the CPU every read does). A release
        still deferred stays so: the snapshot predates it and the scheduler adds it itself."""
        if fresh or not self._snap_pending:
            self.flush()
        if self._snap_pending and not fresh:
            self._snap_pending = False
            if self._snap_done is None or not self._snap_done.query():
                self.syncs += 1
                if self._snap_done is not None:
                    self._snap_done.synchronize()
            v = self.t.snap.tolist()
        else:
            self._snap_pending = False
            v = self.t.counts_vector().tolist()
            self.syncs += 1
        if v[5] or v[6]:
            raise AssertionError(f"allocator refused a planned call (grow failures {v[5]}, release code {v[6]})")
        return Counts([v[0], v[1]], v[2], [v[3], v[4]])

    def alloc_ssm(self, rows: list[int]) -> None:
        self.flush()
        h = self.a.alloc_ssm(len(rows))  # syncs once (its status)
        self.syncs += 1
        self.ssm_handles[torch.tensor(rows, dtype=torch.long, device=self.a.device)] = h

    def make_room(self, kind: str, n: int, free_now: int) -> None:
        self.flush()
        self.syncs += 1 if n <= free_now else 3  # tops; then slab owners and live counts to plan
        self.a.make_room(kind, n)

    def rebalance(self, kind: str, num_slabs: int) -> None:
        self.flush()
        self.syncs += 2  # slab owners and live counts to plan
        self.a.rebalance(kind, num_slabs)

    def swap_out(self, row: int, pages: int) -> list[torch.Tensor]:
        """Copies of the row's ``pages`` page units and its SSM block in host memory (pinned on a
        GPU), queued on the stream before anything can free or reuse the units."""
        self.flush()
        return [self._copy_units(h, kind) for h, kind in self._units(row, pages)]

    def swap_in(self, row: int, pages: int, saved: list[torch.Tensor]) -> None:
        """The copies back into the row's new units (its first ``pages`` pages and its SSM block)."""
        self.flush()
        for (h, kind), host in zip(self._units(row, pages), saved):
            self._arena16().index_copy_(0, self._unit_rows(h, kind), host.to(self.a.device, non_blocking=True))

    def _units(self, row: int, pages: int):
        return [(self.block_table[row, :pages], "kv"), (self.ssm_handles[row:row + 1], "ssm")]

    def _arena16(self) -> torch.Tensor:
        return self.a.arena.view(-1, UNIT_ALIGN)   # units start and end on 16-byte boundaries

    def _unit_rows(self, handles: torch.Tensor, kind: str) -> torch.Tensor:
        """Rows of ``_arena16`` that the units of ``handles`` cover, unit after unit."""
        self.syncs += 1  # resolve checks the handles
        unit = self.a.unit_bytes[self.a.pool_index(kind)] // UNIT_ALIGN
        first = self.a.resolve(handles, kind) // UNIT_ALIGN
        return (first[:, None] + torch.arange(unit, device=first.device)[None, :]).flatten()

    def _copy_units(self, handles: torch.Tensor, kind: str) -> torch.Tensor:
        data = self._arena16()[self._unit_rows(handles, kind)]
        host = torch.empty(data.shape, dtype=data.dtype, pin_memory=data.is_cuda)
        host.copy_(data, non_blocking=True)
        return host

    def stats(self):
        self.flush()
        return self.a.stats()


class ModelBackend:
    """``AllocatorModel.like(allocator)``: the same decisions in pure Python, no kernel launch."""

    name = "model"

    def __init__(self, alloc: ArenaAllocator, R: int, W: int):
        from avmp_triton.memory.model import AllocatorModel
        self.m = AllocatorModel.like(alloc)
        self.block_table = [[-1] * W for _ in range(R)]
        self.num_pages = [0] * R
        self.ssm_handles = [-1] * R
        self._snap: Counts | None = None
        self.syncs = 0

    def tick_calls(self, need: np.ndarray | None) -> None:
        """As the device backend's: growth (None: none), the proactive step, the counts' snapshot."""
        if need is not None:
            self.grow(need)
        self.m.proactive_step()
        self._snap = self.probe(fresh=True)

    def probe(self, fresh: bool = False) -> Counts:
        """As the device backend's: the snapshot's counts once, if one is pending and not ``fresh``."""
        snap, self._snap = self._snap, None
        if snap is not None and not fresh:
            return snap
        m = self.m
        npools = len(m.pool_names)
        free = [len(m.unit_stacks[p]) for p in range(npools)] + [0] * (2 - npools)
        slabs = [m.slab_owner.count(0), m.slab_owner.count(1)]
        return Counts(free, len(m.handle_stack), slabs)

    def grow(self, need: np.ndarray) -> None:
        # rows with need 0 take nothing, so serving only the others (in row order) is the same call
        rows = np.flatnonzero(need).tolist()
        sub_np = [self.num_pages[r] for r in rows]
        failed = self.m.grow([self.block_table[r] for r in rows], sub_np, need[rows].tolist())
        if any(failed):
            raise AssertionError(f"allocator refused a planned growth: {failed}")
        for r, n in zip(rows, sub_np):
            self.num_pages[r] = n

    def alloc_ssm(self, rows: list[int]) -> None:
        for r, h in zip(rows, self.m.alloc("ssm", len(rows))):
            self.ssm_handles[r] = h

    def release(self, rows: list[int]) -> None:
        code = self.m.release(rows, self.block_table, self.num_pages, self.ssm_handles)
        if code[0]:
            raise AssertionError(f"allocator refused a planned release: {code}")

    def make_room(self, kind: str, n: int, free_now: int) -> None:
        self.m.make_room(kind, n)

    def rebalance(self, kind: str, num_slabs: int) -> None:
        self.m.rebalance(kind, num_slabs)

    def stats(self):
        return self.m.stats()
