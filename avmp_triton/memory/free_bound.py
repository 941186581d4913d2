"""A host-side lower bound of each pool's free units, so that an alloc the pool can certainly serve
returns without reading its status back (no host sync).

It stays a lower bound because every change of a pool's free count goes through the allocator:

- an alloc of n units (``taken``): the count drops by n, or not at all when the pool is short;
- a free or a release: the count only grows, nothing to note;
- a call that takes an amount the host does not see (``grow_kv``, ``proactive_step``, a migration):
  ``forget``, until the next read of the tops;
- a read of the tops (``learn``): the exact count, after everything queued before it.

A call captured in a CUDA graph may replay at any later time without the host seeing it, so the
capture of one that takes units disables the bound of its pools for good (their allocs read their
status, as before). The free handle count needs no bound of its own: live handles and live units
are bound one to one, and there are at least as many handles as units in the whole arena
(``num_slabs * max_units_per_slab``), so free handles >= free units of any one pool.
"""
from __future__ import annotations

import torch


class FreeBound:
    """Lower bounds, one per pool (None: unknown). All calls of one allocator run on one stream."""

    def __init__(self, pools: int, tops: list[int], *, capture_possible: bool):
        self._lb: list[int | None] = [int(t) for t in tops[:pools]]
        self._dead = [False] * pools
        self._capture_possible = capture_possible

    def covers(self, pool: int, n: int) -> bool:
        """Whether ``n`` units of ``pool`` are certainly free now."""
        lb = self._lb[pool]
        return lb is not None and lb >= n

    def taken(self, pool: int, n: int) -> None:
        """An alloc of ``n`` units of ``pool`` was queued (it may find the pool short and take none)."""
        if self._capturing():
            self._kill(pool)
        lb = self._lb[pool]
        if lb is not None:
            self._lb[pool] = max(0, lb - n)

    def forget(self, *pools: int) -> None:
        """A call took an unknown number of units of ``pools`` (or moved slabs between them)."""
        capturing = self._capturing()
        for p in pools:
            if capturing:
                self._kill(p)
            self._lb[p] = None

    def learn(self, tops: list[int]) -> None:
        """The tops just read: exact counts for every pool whose bound is still in use."""
        for p in range(len(self._lb)):
            if not self._dead[p]:
                self._lb[p] = int(tops[p])

    def in_use(self, pool: int) -> bool:
        """False once a captured call may take units of ``pool`` behind the host's back."""
        return not self._dead[pool]

    def _kill(self, pool: int) -> None:
        self._dead[pool] = True
        self._lb[pool] = None

    def _capturing(self) -> bool:
        return self._capture_possible and torch.cuda.is_current_stream_capturing()
