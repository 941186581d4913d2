"""Which donor slabs a migration moves: one pure function, shared by the device allocator (which
plans from a host snapshot of its slab counters) and its Python model."""
from __future__ import annotations

import numpy as np


def plan_victims(owner: list[int], live: list[int], donor_pool: int, need: int, donor_units_per_slab: int, *,
                 eager: bool, migration_batch: int) -> list[int] | None:
    """Slabs of ``donor_pool`` to hand over for ``need`` slabs, in order; None if impossible.

    Whole free slabs first, lowest index first (no data moves; with ``eager``, up to
    ``migration_batch`` of them). Otherwise compaction: the free slabs plus the least-occupied
    busy ones, whose live units must fit into the donor slabs that stay."""
    donor = [s for s, o in enumerate(owner) if o == donor_pool]
    free = [s for s in donor if live[s] == 0]
    if len(free) >= need:
        take = min(len(free), max(need, migration_batch)) if eager else need
        return free[:take]
    live_total = sum(live[s] for s in donor)
    if len(donor) < need or (len(donor) - need) * donor_units_per_slab < live_total:
        return None
    busy = sorted((s for s in donor if live[s] > 0), key=lambda s: (live[s], s))
    return free + busy[:need - len(free)]


def donor_holdings(owner: list[int], live: list[int], donor_pool: int) -> tuple[int, int]:
    """(slabs, live units) of ``donor_pool``: what a refused migration's message names."""
    donor = [s for s, o in enumerate(owner) if o == donor_pool]
    return len(donor), sum(live[s] for s in donor)


def plan_victims_array(owner: np.ndarray, live: np.ndarray, donor_pool: int, need: int, donor_units_per_slab: int,
                       *, eager: bool, migration_batch: int) -> np.ndarray | None:
    """``plan_victims`` on arrays, in a few NumPy passes instead of Python loops over the slabs (the
    device allocator plans from its snapshot with it; the same victims in the same order)."""
    donor = np.flatnonzero(owner == donor_pool)
    held = live[donor]
    free = donor[held == 0]
    if len(free) >= need:
        take = min(len(free), max(need, migration_batch)) if eager else need
        return free[:take]
    if len(donor) < need or (len(donor) - need) * donor_units_per_slab < int(held.sum()):
        return None
    busy = held > 0
    # donor is in slab order, so a stable sort on the live counts ties on the slab index
    order = np.argsort(held[busy], kind="stable")[:need - len(free)]
    return np.concatenate([free, donor[busy][order]])
