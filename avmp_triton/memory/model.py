"""Executable spec of the allocator state machine, in plain Python (lists and dicts, no kernels).

``AllocatorModel`` keeps the same state as ``avmp_triton.memory.allocator.ArenaAllocator`` keeps in device
tensors and applies exactly the same deterministic policy, so after any sequence of calls the two
must agree entry for entry (``assert_matches``). It does not model the arena's bytes: tests track
those per handle and check that compaction carries them along.

State (device name in brackets):

    table[h]          byte offset of handle h, -1 when free                       [handle_table]
    kinds[h]          0 free, 1 KV page, 2 SSM block                              [handle_kind]
    handle_stack      free handle ids; the list's end is the top                  [_handle_stack, _tops[2]]
    unit_stacks[p]    free unit offsets of pool p; the list's end is the top      [_free_units, _tops[p]]
    slab_owner[s]     pool of slab s                                              [slab_owner]
    slab_live[s]      live units in slab s                                        [slab_live]
    slot_handle[s][i] handle living in unit i of slab s, -1 when free             [_slot_handle]

Policy (mirrors ``kernels/alloc.py``):

- Stacks are LIFO: the i-th unit of a batched pop is ``stack[top-1-i]``, pushes go to
  ``stack[top+i]`` in input order. A fresh allocator pops the lowest slot and handle 0 first.
- ``alloc``: all or nothing from ``min(free units, free handles)``; on shortage AVMP rebalances
  (eagerly) and retries, the baselines raise ``PoolExhaustedError``.
- Attention-free spec (KV unit of 0 bytes): the KV pool never owns a slab; ``alloc``,
  ``make_room`` or ``rebalance`` asking for KV capacity raise ValueError; ``grow`` fails rows with
  a need (``ERR_NO_SPACE``) and grants zero-need ones.
- ``free``: every handle is checked first (range, live, kind, repeated); the first bad one in input
  order is reported and nothing changes. Otherwise units and handles are pushed in input order.
- ``grow``: rows are served in order, each all or nothing; ``need < 0`` or overflowing rows get
  ``ERR_BAD_COUNT``; once a row does not fit, no later row with a non-zero need is granted.
- ``release``: rows checked first (row index, page count), then every entry in flat order (a row's
  KV pages in column order, then its SSM handle) as for ``free``; then pushed in that order.
- Rebalance into pool p from donor d = 1 - p: if the donor has ``need`` completely free slabs,
  hand over the lowest-numbered ones (eagerly up to ``max(need, migration_batch)`` after an
  allocation failure, exactly ``need`` when asked via ``rebalance``). Otherwise compact: victims
  are all free donor slabs, then busy ones by (live units, index); their free units leave the
  donor stack (order of the rest kept), each live unit (victim order, slot order) is copied to a
  unit popped from the donor stack, and the victims' units are pushed onto p's stack so that the
  first victim's unit 0 pops first.
- ``proactive_step`` (AVMP with watermarks (low, high)): with f_p = free units / units of pool p,
  compared exactly as integers (``free * SCALE < round(low * SCALE) * units``; a pool without
  units counts as empty): if f_0 < low and f_1 > high, pool 0 receives from pool 1, else if
  f_1 < low and f_0 > high, pool 1 receives from pool 0. It takes the lowest-numbered completely
  free donor slabs, at most ``migration_batch``, at most as many as keep the donor's free
  fraction >= low, and never the donor's last slab, and hands them over as a rebalance does (drop, then adopt; no copy).
"""
from __future__ import annotations

import math
from typing import Iterable

from avmp_triton._checks import is_int
from avmp_triton.memory.allocator import (
    KIND_FREE,
    WATERMARK_SCALE,
    KIND_KV,
    KIND_SSM,
    AllocatorStats,
    InvalidHandleError,
    PoolExhaustedError,
    PoolStats,
    no_kv_pool_error,
)
from avmp_triton.memory.planner import donor_holdings, plan_victims

# status codes, as the kernels write them
ERR_NONE = 0
ERR_RANGE = 1
ERR_NOT_LIVE = 2
ERR_WRONG_KIND = 3
ERR_DUPLICATE = 4
ERR_BAD_ROW = 5
ERR_BAD_COUNT = 6
ERR_NO_SPACE = 7

KIND_NAMES = {KIND_KV: "kv", KIND_SSM: "ssm"}
KIND_OF_NAME = {None: KIND_FREE, "kv": KIND_KV, "ssm": KIND_SSM}
_HANDLE_ERROR_TEXT = {
    ERR_RANGE: "is out of range",
    ERR_NOT_LIVE: "is not allocated (free or already freed)",
    ERR_WRONG_KIND: "is of the wrong kind",
    ERR_DUPLICATE: "appears more than once in one call",
}


class AllocatorModel:
    """Reference allocator: same state, same policy, same errors as the device allocators."""

    def __init__(self, *, unit_bytes: tuple[int, int], units_per_slab: tuple[int, int], slab_bytes: int,
                 slab_owner: list[int], pool_of: dict[int, int], pool_names: tuple[str, ...],
                 migrates: bool, migration_batch: int, kv_page_raw: int, ssm_block_raw: int,
                 capacity_bytes: int, name: str = "allocator", spec_name: str = "custom",
                 proactive: tuple[float, float] | None = None):
        self.name = name  # the device class name (it appears in one error message)
        self.spec_name = spec_name  # named by the refusals of an attention-free spec
        self.unit_bytes = tuple(unit_bytes)
        self.units_per_slab = tuple(units_per_slab)
        self.slab_bytes = slab_bytes
        self.num_slabs = len(slab_owner)
        self.max_units_per_slab = max(units_per_slab)
        self.num_handles = self.num_slabs * self.max_units_per_slab
        self.pool_of = dict(pool_of)
        self.pool_names = tuple(pool_names)
        self.migrates = migrates
        self.migration_batch = migration_batch
        self.kv_page_raw = kv_page_raw
        self.ssm_block_raw = ssm_block_raw
        self.capacity_bytes = capacity_bytes

        S, H = self.num_slabs, self.num_handles
        self.table = [-1] * H
        self.kinds = [KIND_FREE] * H
        self.handle_stack = list(range(H - 1, -1, -1))  # handle 0 on top
        self.slab_owner = list(slab_owner)
        self.slab_live = [0] * S
        self.slot_handle = [[-1] * self.max_units_per_slab for _ in range(S)]
        self.unit_stacks: list[list[int]] = [[], []]
        for p in range(len(self.pool_names)):
            slots = [o for s in range(S) if self.slab_owner[s] == p for o in self._slab_units(s, p)]
            self.unit_stacks[p] = slots[::-1]  # lowest slot on top
        self.migrations = 0
        self.slabs_moved = 0
        self.units_moved = 0
        self.bytes_copied = 0
        self.last_moves: list[tuple[int, int, int]] = []  # (handle, src, dst) of the last compaction
        self.proactive = None if proactive is None else (float(proactive[0]), float(proactive[1]))
        self.proactive_migrations = 0
        self.proactive_slabs_moved = 0

    @classmethod
    def like(cls, allocator) -> "AllocatorModel":
        """A model of a freshly built ``allocator`` (any of the allocator classes), from its geometry."""
        if (int(allocator._tops[2]) != allocator.num_handles or allocator.migrations
                or any(allocator.proactive_counters())):
            raise ValueError("AllocatorModel.like needs a fresh allocator (no live handle, no migration)")
        return cls(unit_bytes=allocator.unit_bytes, units_per_slab=allocator.units_per_slab,
                   slab_bytes=allocator.slab_bytes, slab_owner=allocator.slab_owner.tolist(),
                   pool_of=allocator._pool_of, pool_names=allocator.pool_names,
                   migrates=allocator._migrates, migration_batch=allocator.migration_batch,
                   kv_page_raw=allocator.kv_page_raw, ssm_block_raw=allocator.ssm_block_raw,
                   capacity_bytes=allocator.capacity_bytes, name=type(allocator).__name__,
                   spec_name=allocator.spec.name, proactive=getattr(allocator, "proactive", None))

    def _slab_units(self, s: int, p: int) -> list[int]:
        return [s * self.slab_bytes + i * self.unit_bytes[p] for i in range(self.units_per_slab[p])]

    def _slot_of(self, off: int, p: int) -> tuple[int, int]:
        s = off // self.slab_bytes
        return s, (off - s * self.slab_bytes) // self.unit_bytes[p]

    def unit_size(self, kind: int) -> int:
        """Bytes of one unit handed out for ``kind`` (KIND_KV / KIND_SSM)."""
        return self.unit_bytes[self.pool_of[kind]]

    def live_handles(self) -> list[int]:
        return [h for h, k in enumerate(self.kinds) if k != KIND_FREE]

    def _check_count(self, n) -> int:
        if not is_int(n):
            raise TypeError(f"n must be an int, got {type(n).__name__} {n!r}")
        if not 0 <= n <= self.num_handles:
            raise ValueError(f"n must be in [0, {self.num_handles}] (the handle capacity), got {n}")
        return n

    @staticmethod
    def _kind_arg(kind) -> int:
        if kind not in KIND_OF_NAME:
            raise ValueError(f"kind must be None, 'kv' or 'ssm', got {kind!r}")
        return KIND_OF_NAME[kind]

    def _check_kv_demand(self, kind: int, n: int, what: str) -> None:
        """A 0-byte KV unit (attention-free spec) means no KV pool: only zero KV demand is valid."""
        if kind == KIND_KV and n and not self.unit_size(KIND_KV):
            raise no_kv_pool_error(self.spec_name, what)

    def _exhausted(self, kind: int, n: int, free: int) -> PoolExhaustedError:
        return PoolExhaustedError(
            f"cannot allocate n={n} {KIND_NAMES[kind]} unit(s): {free} free in pool "
            f"{self.pool_names[self.pool_of[kind]]!r} and no capacity can be moved into it")

    @staticmethod
    def handle_error(code: int, pos: int, val: int, kind: str | None, name: str) -> InvalidHandleError:
        text = _HANDLE_ERROR_TEXT.get(code, f"failed with code {code}")
        if code == ERR_WRONG_KIND and kind:
            text = f"is not a {kind!r} handle"
        where = f"{name}[{pos}]" if code != ERR_DUPLICATE else name
        return InvalidHandleError(f"{where}: handle {val} {text}; nothing was changed")

    def _first_handle_error(self, handles: Iterable[int], req_kinds: Iterable[int]):
        """(code, position, handle) of the first bad entry in input order, or None."""
        seen = set()
        for pos, (h, req) in enumerate(zip(handles, req_kinds)):
            if not 0 <= h < self.num_handles:
                return ERR_RANGE, pos, h
            kind = self.kinds[h]
            if kind == KIND_FREE:
                return ERR_NOT_LIVE, pos, h
            if req != KIND_FREE and kind != req:
                return ERR_WRONG_KIND, pos, h
            if h in seen:
                return ERR_DUPLICATE, pos, h
            seen.add(h)
        return None

    def _pop_bind(self, kind: int) -> int:
        p = self.pool_of[kind]
        off = self.unit_stacks[p].pop()
        h = self.handle_stack.pop()
        self.table[h] = off
        self.kinds[h] = kind
        s, i = self._slot_of(off, p)
        self.slot_handle[s][i] = h
        self.slab_live[s] += 1
        return h

    def _push_unbind(self, h: int) -> None:
        p = self.pool_of[self.kinds[h]]
        off = self.table[h]
        self.unit_stacks[p].append(off)
        self.handle_stack.append(h)
        self.table[h] = -1
        self.kinds[h] = KIND_FREE
        s, i = self._slot_of(off, p)
        self.slot_handle[s][i] = -1
        self.slab_live[s] -= 1

    def _available(self, kind: int) -> int:
        return min(len(self.unit_stacks[self.pool_of[kind]]), len(self.handle_stack))

    def alloc(self, kind: str, n) -> list[int]:
        """``alloc_kv`` / ``alloc_ssm``: ``n`` handles of ``kind`` ("kv" or "ssm")."""
        k = KIND_OF_NAME[kind]
        n = self._check_count(n)
        if n == 0:
            return []
        self._check_kv_demand(k, n, f"cannot allocate n={n} KV pages")
        avail = self._available(k)
        if avail < n:
            if not self.migrates:
                raise self._exhausted(k, n, avail)
            ups = self.units_per_slab[self.pool_of[k]]
            self._move_capacity(k, math.ceil((n - avail) / ups), eager=True, n=n, free=avail)
            assert self._available(k) >= n, "rebalance planned room that the pool does not have"
        return [self._pop_bind(k) for _ in range(n)]

    def free(self, handles: list[int], kind: str | None = None) -> None:
        req = self._kind_arg(kind)
        handles = [int(h) for h in handles]
        err = self._first_handle_error(handles, [req] * len(handles))
        if err is not None:
            raise self.handle_error(*err, kind, "handles")
        for h in handles:
            self._push_unbind(h)

    def resolve(self, handles: list[int], kind: str | None = None) -> list[int]:
        req = self._kind_arg(kind)
        handles = [int(h) for h in handles]
        for pos, h in enumerate(handles):  # no duplicate check: resolving twice is fine
            err = self._first_handle_error([h], [req])
            if err is not None:
                raise self.handle_error(err[0], pos, h, kind, "handles")
        return [self.table[h] for h in handles]

    def grow(self, block_table: list[list[int]], num_pages: list[int], need: list[int]) -> list[int]:
        """``grow_kv``: updates ``block_table`` and ``num_pages`` in place; returns the failed codes."""
        R = len(num_pages)
        W = len(block_table[0]) if R else 0
        avail = self._available(KIND_KV)
        asked = 0
        failed, grants = [0] * R, [0] * R
        for r in range(R):
            held, want = num_pages[r], need[r]
            if want < 0 or held < 0 or held + want > W:
                failed[r] = ERR_BAD_COUNT
                continue
            asked += want
            if want == 0 or asked <= avail:
                grants[r] = want
            else:
                failed[r] = ERR_NO_SPACE
        for r in range(R):  # pages are popped in row order, column order
            for _ in range(grants[r]):
                block_table[r][num_pages[r]] = self._pop_bind(KIND_KV)
                num_pages[r] += 1
        return failed

    def release(self, rows: list[int], block_table: list[list[int]], num_pages: list[int],
                ssm_handles: list[int] | None = None) -> tuple[int, int, int]:
        """``release_rows``: returns the status (code, position, value); all or nothing."""
        R = len(num_pages)
        W = len(block_table[0]) if R else 0
        entries = []  # (row, column or None for the SSM handle, handle, required kind)
        for i, r in enumerate(rows):
            if r == -1:
                continue
            if not 0 <= r < R:
                return ERR_BAD_ROW, i, r
            held = num_pages[r]
            if not 0 <= held <= W:
                return ERR_BAD_COUNT, i, r
            entries += [(r, j, block_table[r][j], KIND_KV) for j in range(held)]
            if ssm_handles is not None and ssm_handles[r] >= 0:
                entries.append((r, None, ssm_handles[r], KIND_SSM))
        err = self._first_handle_error([e[2] for e in entries], [e[3] for e in entries])
        if err is not None:
            return err
        for r, j, h, _ in entries:
            self._push_unbind(h)
        for r, j, h, _ in entries:
            if j is None:
                ssm_handles[r] = -1
            else:
                block_table[r][j] = -1
        for r in rows:
            if r >= 0:
                num_pages[r] = 0
        return ERR_NONE, -1, 0

    def check_status(self, status) -> None:
        """What ``ArenaAllocator.check_status`` raises for a release status."""
        code, pos, val = (int(x) for x in status)
        if code in (ERR_BAD_ROW, ERR_BAD_COUNT):
            what = "is out of range" if code == ERR_BAD_ROW else "has a num_pages outside [0, W]"
            raise ValueError(f"rows[{pos}]: row {val} {what}; nothing was changed")
        if code != ERR_NONE:
            raise self.handle_error(code, pos, val, None, "released entry")

    def rebalance(self, to_kind: str, num_slabs) -> None:
        if to_kind not in ("kv", "ssm"):
            raise ValueError(f"to_kind must be 'kv' or 'ssm', got {to_kind!r}")
        if not is_int(num_slabs) or not 0 <= num_slabs <= self.num_slabs:
            raise ValueError(f"num_slabs must be an int in [0, {self.num_slabs}], got {num_slabs!r}")
        if not self.migrates:
            raise PoolExhaustedError(f"{self.name} never moves capacity between pools")
        self._check_kv_demand(KIND_OF_NAME[to_kind], num_slabs, f"cannot move {num_slabs} slab(s) into it")
        if num_slabs:
            self._move_capacity(KIND_OF_NAME[to_kind], num_slabs, eager=False)

    def make_room(self, kind: str, n) -> None:
        k = KIND_OF_NAME.get(kind)
        if not k:
            raise ValueError(f"kind must be 'kv' or 'ssm', got {kind!r}")
        n = self._check_count(n)
        self._check_kv_demand(k, n, f"cannot make room for n={n} KV pages")
        p = self.pool_of[k]
        free = len(self.unit_stacks[p])
        if free >= n:
            return
        if not self.migrates:
            raise self._exhausted(k, n, free)
        self._move_capacity(k, math.ceil((n - free) / self.units_per_slab[p]), eager=True, n=n, free=free)

    def _move_capacity(self, kind: int, need: int, *, eager: bool, n: int | None = None,
                       free: int | None = None) -> None:
        p = self.pool_of[kind]
        d = 1 - p
        victims = plan_victims(self.slab_owner, self.slab_live, d, need, self.units_per_slab[d], eager=eager,
                               migration_batch=self.migration_batch)
        if victims is None:
            if n is not None:
                raise self._exhausted(kind, n, free)
            slabs, live_total = donor_holdings(self.slab_owner, self.slab_live, d)
            raise PoolExhaustedError(
                f"cannot move {need} slab(s) into the {KIND_NAMES[kind]} pool: the "
                f"{self.pool_names[d]!r} pool has {slabs} slab(s) holding {live_total} live unit(s)")
        self._move_slabs(victims, d, p)

    def _move_slabs(self, victims: list[int], d: int, p: int) -> None:
        leaving = set(victims)
        # drop_slabs: the victims' free units leave the donor stack; the others keep their order
        self.unit_stacks[d] = [o for o in self.unit_stacks[d] if o // self.slab_bytes not in leaving]
        # collect_moves: victims' live units, victim order then slot order, each to a popped unit
        moves = []
        for s in victims:
            for i in range(self.units_per_slab[d]):
                h = self.slot_handle[s][i]
                if h >= 0:
                    moves.append((h, s * self.slab_bytes + i * self.unit_bytes[d], self.unit_stacks[d].pop()))
        # move_units: rebind each handle (its bytes are copied along)
        for h, src, dst in moves:
            self.table[h] = dst
            s, i = self._slot_of(src, d)
            self.slot_handle[s][i] = -1
            s, i = self._slot_of(dst, d)
            self.slot_handle[s][i] = h
            self.slab_live[s] += 1
        # adopt_slabs: last victim pushed first, its units high to low, so victims[0] unit 0 is on top
        for s in reversed(victims):
            self.slab_owner[s] = p
            self.slab_live[s] = 0
            self.slot_handle[s] = [-1] * self.max_units_per_slab
            self.unit_stacks[p].extend(reversed(self._slab_units(s, p)))
        self.last_moves = moves
        self.migrations += 1
        self.slabs_moved += len(victims)
        self.units_moved += len(moves)
        self.bytes_copied += len(moves) * self.unit_bytes[d]

    def proactive_step(self) -> int:
        """The watermark policy of ``AVMPAllocator.proactive_step``; returns the slabs moved."""
        if self.proactive is None:
            return 0
        scale = WATERMARK_SCALE
        low, high = (int(round(x * scale)) for x in self.proactive)
        units = [self.slab_owner.count(p) * self.units_per_slab[p] for p in (0, 1)]
        free = [len(self.unit_stacks[p]) for p in (0, 1)]

        def below(p):
            return free[p] * scale < low * units[p] if units[p] > 0 else low > 0

        def above(p):
            return free[p] * scale > high * units[p]

        if below(0) and above(1):
            p, d = 0, 1
        elif below(1) and above(0):
            p, d = 1, 0
        else:
            return 0
        ups_d = self.units_per_slab[d]
        cap = min(self.migration_batch, (free[d] * scale - low * units[d]) // (ups_d * (scale - low)),
                  self.slab_owner.count(d) - 1)
        victims = [s for s in range(self.num_slabs) if self.slab_owner[s] == d and self.slab_live[s] == 0][:cap]
        if not victims:
            return 0
        leaving = set(victims)
        self.unit_stacks[d] = [o for o in self.unit_stacks[d] if o // self.slab_bytes not in leaving]
        for s in reversed(victims):
            self.slab_owner[s] = p
            self.slot_handle[s] = [-1] * self.max_units_per_slab
            self.unit_stacks[p].extend(reversed(self._slab_units(s, p)))
        self.proactive_migrations += 1
        self.proactive_slabs_moved += len(victims)
        return len(victims)

    def stats(self) -> AllocatorStats:
        pools = {}
        tail_total = 0
        for p, name in enumerate(self.pool_names):
            mine = [s for s in range(self.num_slabs) if self.slab_owner[s] == p]
            units = len(mine) * self.units_per_slab[p]
            tail = len(mine) * (self.slab_bytes - self.units_per_slab[p] * self.unit_bytes[p])
            tail_total += tail
            free = len(self.unit_stacks[p])
            pools[name] = PoolStats(unit_bytes=self.unit_bytes[p], units_per_slab=self.units_per_slab[p],
                                    slabs=len(mine), free_slabs=sum(self.slab_live[s] == 0 for s in mine),
                                    units=units, used_units=units - free, free_units=free,
                                    slab_tail_bytes=tail)
        live_kv = self.kinds.count(KIND_KV)
        live_ssm = self.kinds.count(KIND_SSM)
        padding = (live_kv * (self.unit_size(KIND_KV) - self.kv_page_raw)
                   + live_ssm * (self.unit_size(KIND_SSM) - self.ssm_block_raw))
        return AllocatorStats(
            pools=pools, live_kv=live_kv, live_ssm=live_ssm, handles_live=live_kv + live_ssm,
            handles_capacity=self.num_handles, padding_bytes=padding, slab_tail_bytes=tail_total,
            arena_tail_bytes=self.capacity_bytes - self.num_slabs * self.slab_bytes,
            migrations=self.migrations + self.proactive_migrations,
            slabs_moved=self.slabs_moved + self.proactive_slabs_moved, units_moved=self.units_moved,
            bytes_copied=self.bytes_copied, proactive_migrations=self.proactive_migrations,
            proactive_slabs_moved=self.proactive_slabs_moved)

    def check_invariants(self) -> None:
        """Internal consistency of the model itself (every free or live unit accounted once)."""
        H, S = self.num_handles, self.num_slabs
        live = self.live_handles()
        assert sorted(self.handle_stack + live) == list(range(H)), "handle lost or duplicated"
        for p in range(len(self.pool_names)):
            owned = [o for s in range(S) if self.slab_owner[s] == p for o in self._slab_units(s, p)]
            used = [self.table[h] for h in live if self.pool_of[self.kinds[h]] == p]
            assert sorted(self.unit_stacks[p] + used) == sorted(owned), f"pool {p} units lost or duplicated"
        for s in range(S):
            p = self.slab_owner[s]
            row = self.slot_handle[s]
            assert self.slab_live[s] == sum(h >= 0 for h in row), f"slab {s} live count"
            assert all(h == -1 for h in row[self.units_per_slab[p]:]), f"slab {s} slot past its units"
            for i, h in enumerate(row):
                if h >= 0:
                    assert self.table[h] == s * self.slab_bytes + i * self.unit_bytes[p], f"slot of handle {h}"
                    assert self.pool_of[self.kinds[h]] == p, f"handle {h} in a slab of another pool"

    def state(self) -> dict:
        """Comparable snapshot, same layout as ``device_state``."""
        return {
            "handle_table": list(self.table),
            "handle_kind": list(self.kinds),
            "handle_stack": list(self.handle_stack),
            "unit_stacks": [list(s) for s in self.unit_stacks],
            "slab_owner": list(self.slab_owner),
            "slab_live": list(self.slab_live),
            "slot_handle": [list(r) for r in self.slot_handle],
            "counters": [self.migrations, self.slabs_moved, self.units_moved, self.bytes_copied],
            "proactive": [self.proactive_migrations, self.proactive_slabs_moved],
        }


def device_state(allocator) -> dict:
    """The allocator's device state as plain lists: tables, live stack contents, slab counters."""
    tops = allocator._tops.tolist()
    units = allocator._free_units.tolist()
    stacks = [[], []]
    for p in range(len(allocator.pool_names)):
        base = allocator._stack_base[p]
        stacks[p] = units[base:base + tops[p]]
    return {
        "handle_table": allocator.handle_table.tolist(),
        "handle_kind": allocator.handle_kind.tolist(),
        "handle_stack": allocator._handle_stack.tolist()[:tops[2]],
        "unit_stacks": stacks,
        "slab_owner": allocator.slab_owner.tolist(),
        "slab_live": allocator.slab_live.tolist(),
        "slot_handle": allocator._slot_handle.tolist(),
        "counters": [allocator.migrations, allocator.slabs_moved, allocator.units_moved, allocator.bytes_copied],
        "proactive": list(allocator.proactive_counters()),
    }


def state_diff(model: AllocatorModel, allocator) -> list[str]:
    """Human-readable differences between the model and the device (empty when they agree)."""
    want, got = model.state(), device_state(allocator)
    out = []
    for key in want:
        a, b = want[key], got[key]
        if a == b:
            continue
        if key == "unit_stacks":
            for p, (x, y) in enumerate(zip(a, b)):
                if x != y:
                    out.append(f"unit_stacks[{p}]: model top {len(x)} {_first_diff(x, y)}, device top {len(y)}")
        elif len(a) != len(b):
            out.append(f"{key}: model has {len(a)} entries, device {len(b)}")
        else:
            out.append(f"{key}: {_first_diff(a, b)}")
    return out


def _first_diff(a: list, b: list) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at [{i}]: model {x} vs device {y}"
    return f"lengths {len(a)} vs {len(b)}"


def assert_matches(model: AllocatorModel, allocator) -> None:
    """Exact agreement of every state tensor (and the migration counters) with the model."""
    diff = state_diff(model, allocator)
    assert not diff, "allocator diverged from the model:\n  " + "\n  ".join(diff)
