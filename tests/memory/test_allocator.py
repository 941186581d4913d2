"""Allocator kernels against the reference model (avmp_triton/memory/model.py).

Small odd geometries (2048-byte slabs; one spec whose KV page is larger than its SSM block, one
the other way round with padded odd units), scattered handles, all three allocator classes.
Every live unit holds random bytes that must survive every call, compaction included; every
failing call must leave every state tensor, the arena and the stats exactly as they were.
"""
import dataclasses

import pytest
import torch

from avmp_triton import (
    AVMPAllocator,
    HybridModelSpec,
    InvalidHandleError,
    PaddedUnifiedAllocator,
    PoolExhaustedError,
    StaticDualAllocator,
)
from avmp_triton.memory.allocator import KIND_KV, KIND_SSM
from avmp_triton.memory.model import AllocatorModel, assert_matches, device_state

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLAB = 2048
ARENA_TAIL = 77  # capacity is never a whole number of slabs

# page 16 tokens x 32 B = 512 B (4 per slab); SSM block 96 + 128 = 224 B (9 per slab, 32-B tail)
SPEC_PAGE_BIG = HybridModelSpec(
    name="tiny", num_attn_layers=1, num_kv_heads=1, head_dim=4, kv_dtype=torch.float32,
    num_mamba_layers=1, mamba_version=1, d_inner=8, d_state=4, conv_dtype=torch.float32,
    ssm_dtype=torch.float32)
# page 2 tokens x 20 B = 40 B -> 48-B unit (42 per slab, 32-B tail); block 60 + 440 = 500 B -> 512 B
SPEC_BLOCK_BIG = HybridModelSpec(
    name="tiny-big-ssm", num_attn_layers=1, num_kv_heads=1, head_dim=5, kv_dtype=torch.float16,
    num_mamba_layers=1, mamba_version=1, d_inner=10, d_state=11, conv_dtype=torch.bfloat16,
    ssm_dtype=torch.float32)
GEOMS = {"page>block": (SPEC_PAGE_BIG, 16), "block>page": (SPEC_BLOCK_BIG, 2)}
CLASSES = [AVMPAllocator, StaticDualAllocator, PaddedUnifiedAllocator]
KIND_NAME = {KIND_KV: "kv", KIND_SSM: "ssm"}


def make(cls=AVMPAllocator, geom="page>block", slabs=7, **kw):
    spec, page_tokens = GEOMS[geom]
    return cls(spec, slabs * SLAB + ARENA_TAIL, device=DEVICE, slab_bytes=SLAB, page_tokens=page_tokens, **kw)


def i32(xs) -> torch.Tensor:
    return torch.tensor([int(x) for x in xs], dtype=torch.int32, device=DEVICE)


def shuffled(xs, gen) -> list[int]:
    xs = list(xs)
    return [xs[i] for i in torch.randperm(len(xs), generator=gen).tolist()]


def alloc_both(a, m, kind: str, n: int) -> list[int]:
    got = (a.alloc_kv if kind == "kv" else a.alloc_ssm)(n)
    assert got.dtype == torch.int32 and got.device == a.arena.device and got.shape == (n,)
    want = m.alloc(kind, n)
    assert got.tolist() == want
    return want


class Units:
    """Random bytes written into every live unit, checked back through ``resolve``."""

    def __init__(self, alloc, gen: torch.Generator):
        self.a, self.gen = alloc, gen
        self.data: dict[int, tuple[int, torch.Tensor]] = {}

    def size(self, kind: int) -> int:
        return self.a.unit_bytes[self.a.pool_index(KIND_NAME[kind])]

    def _index(self, offsets: torch.Tensor, size: int) -> torch.Tensor:
        return (offsets[:, None] + torch.arange(size, device=offsets.device)).flatten()

    def stamp(self, handles, kind: int) -> None:
        handles = list(handles)
        if not handles:
            return
        size = self.size(kind)
        offsets = self.a.resolve(i32(handles), kind=KIND_NAME[kind])
        data = torch.randint(0, 256, (len(handles), size), dtype=torch.uint8, generator=self.gen).to(DEVICE)
        assert data.float().std() > 0
        self.a.arena[self._index(offsets, size)] = data.flatten()
        for h, row in zip(handles, data):
            assert h not in self.data, f"handle {h} handed out twice"
            self.data[h] = (kind, row)

    def forget(self, handles) -> None:
        for h in handles:
            del self.data[int(h)]

    def live(self, kind: int | None = None) -> list[int]:
        return sorted(h for h, (k, _) in self.data.items() if kind is None or k == kind)

    def verify(self) -> None:
        """Bytes of every live unit intact; units disjoint, inside one slab of their own pool."""
        spans = []
        owner = self.a.slab_owner.tolist()
        for kind in (KIND_KV, KIND_SSM):
            hs = shuffled(self.live(kind), self.gen)
            if not hs:
                continue
            size = self.size(kind)
            offsets = self.a.resolve(i32(hs), kind=KIND_NAME[kind])
            got = self.a.arena[self._index(offsets, size)].view(len(hs), size)
            want = torch.stack([self.data[h][1] for h in hs])
            bad = (got != want).any(1).nonzero().flatten().tolist()
            assert not bad, f"bytes of handles {[hs[i] for i in bad]} changed"
            for off in offsets.tolist():
                slab = off // SLAB
                assert off % SLAB + size <= SLAB, f"unit at {off} crosses slab {slab}'s end"
                assert owner[slab] == self.a.pool_index(KIND_NAME[kind]), f"{KIND_NAME[kind]} unit at {off} in a slab of another pool"
                spans.append((off, size))
        spans.sort()
        for (o1, s1), (o2, _) in zip(spans, spans[1:]):
            assert o1 + s1 <= o2, f"live units at {o1} (+{s1}) and {o2} overlap"


def raw_state(a) -> dict:
    """Every piece of allocator state: tables, tops and live stack contents, slab maps, the whole
    arena (a failing call writes no byte of it) and the stats. Scratch buffers are not state."""
    return {"state": device_state(a), "arena": a.arena.clone(), "stats": a.stats()}


def assert_same_raw(before: dict, after: dict) -> None:
    for key, want in before["state"].items():
        assert after["state"][key] == want, f"{key} changed"
    assert torch.equal(before["arena"], after["arena"]), "arena bytes changed"
    assert after["stats"] == before["stats"], "stats changed"


def expect_error(a, m, exc, device_call, model_call=None, names=()):
    """``device_call`` raises ``exc`` naming ``names`` and changes nothing; the model raises the same."""
    before = raw_state(a)
    with pytest.raises(exc) as info:
        device_call()
    msg = str(info.value)
    for v in names:
        assert str(v) in msg, f"{msg!r} does not name {v!r}"
    assert_same_raw(before, raw_state(a))
    if model_call is not None:
        snapshot = m.state()
        with pytest.raises(exc) as model_info:
            model_call()
        assert str(model_info.value) == msg
        assert m.state() == snapshot
    assert_matches(m, a)
    return msg


def busy(cls=AVMPAllocator, geom="page>block", slabs=7, seed=0, **kw):
    """An allocator with scattered live KV pages and SSM blocks holding random bytes."""
    gen = torch.Generator().manual_seed(seed)
    a = make(cls, geom, slabs, **kw)
    m = AllocatorModel.like(a)
    units = Units(a, gen)
    for _ in range(2):
        for kind, name in ((KIND_KV, "kv"), (KIND_SSM, "ssm")):
            n = min(a.stats().pools[a.pool_names[a.pool_index(KIND_NAME[kind])]].free_units // 3, 7)
            units.stamp(alloc_both(a, m, name, n), kind)
    drop = shuffled(units.live(), gen)[: len(units.data) // 3]
    a.free(i32(drop))
    m.free(drop)
    units.forget(drop)
    assert_matches(m, a)
    return a, m, units, gen


# ---------------------------------------------------------------------------------------- geometry

def test_geometries_are_the_intended_odd_ones():
    a = make(AVMPAllocator, "page>block")
    assert a.unit_bytes == (512, 224) and a.units_per_slab == (4, 9) and a.num_slabs == 7
    b = make(AVMPAllocator, "block>page")
    assert b.unit_bytes == (48, 512) and b.units_per_slab == (42, 4)
    assert (b.kv_page_raw, b.ssm_block_raw) == (40, 500)
    u = make(PaddedUnifiedAllocator, "block>page")
    assert u.unit_bytes == (512, 512) and u.units_per_slab == (4, 4)


@pytest.mark.parametrize("geom", list(GEOMS))
@pytest.mark.parametrize("cls", CLASSES)
def test_fresh_allocator_matches_model_and_pops_lowest_first(cls, geom):
    a = make(cls, geom)
    m = AllocatorModel.like(a)
    assert_matches(m, a)
    assert a.stats() == m.stats()
    kv_slabs = [s for s, p in enumerate(a.slab_owner.tolist()) if p == a.pool_index('kv')]
    ssm_slabs = [s for s, p in enumerate(a.slab_owner.tolist()) if p == a.pool_index('ssm')]
    # by hand: handle 0 and the lowest slot of the lowest slab come first
    kv = alloc_both(a, m, "kv", 3)
    assert kv == [0, 1, 2]
    page = a.unit_bytes[a.pool_index('kv')]
    assert a.resolve(i32(kv)).tolist() == [kv_slabs[0] * SLAB + i * page for i in range(3)]
    ssm = alloc_both(a, m, "ssm", 2)
    assert ssm == [3, 4]
    block = a.unit_bytes[a.pool_index('ssm')]
    first = ssm_slabs[0] * SLAB if cls is not PaddedUnifiedAllocator else kv_slabs[0] * SLAB + 3 * page
    assert a.resolve(i32(ssm)).tolist() == [first, first + block]
    assert_matches(m, a)


# ---------------------------------------------------------------------------------------- alloc / free / resolve

@pytest.mark.parametrize("geom", list(GEOMS))
@pytest.mark.parametrize("cls", CLASSES)
def test_alloc_free_resolve_against_model(cls, geom):
    gen = torch.Generator().manual_seed(11 + CLASSES.index(cls))
    a = make(cls, geom)
    m = AllocatorModel.like(a)
    units = Units(a, gen)
    for step in range(8):
        for kind, name in ((KIND_KV, "kv"), (KIND_SSM, "ssm")):
            free = a.stats().pools[a.pool_names[a.pool_index(KIND_NAME[kind])]].free_units
            n = int(torch.randint(1, max(2, free // 3 + 1), (1,), generator=gen))
            units.stamp(alloc_both(a, m, name, min(n, free)), kind)
        live = shuffled(units.live(), gen)
        # resolve in scattered order, both kinds mixed
        assert a.resolve(i32(live)).tolist() == m.resolve(live)
        if step % 3 == 2:  # free one kind only, with the kind checked
            kind = (KIND_KV, KIND_SSM)[step % 2]
            drop = shuffled(units.live(kind), gen)[: len(units.live(kind)) // 2]
            a.free(i32(drop), kind=KIND_NAME[kind])
            m.free(drop, kind=KIND_NAME[kind])
        else:  # mixed kinds, as a strided (non-contiguous) view
            drop = live[: len(live) // 2]
            wide = i32([x for h in drop for x in (h, -5)])
            a.free(wide[::2])
            m.free(drop)
        units.forget(drop)
        assert_matches(m, a)
        units.verify()
    # empty calls change nothing
    before = raw_state(a)
    assert a.alloc_kv(0).shape == (0,) and a.alloc_ssm(0).shape == (0,)
    a.free(i32([]))
    assert a.resolve(i32([])).shape == (0,)
    assert_same_raw(before, raw_state(a))


@pytest.mark.parametrize("cls", CLASSES)
def test_free_pushes_units_and_handles_in_input_order(cls):
    """By hand: freed entries come back last-in first-out, per pool for units, shared for handles."""
    a = make(cls)
    m = AllocatorModel.like(a)
    kv = alloc_both(a, m, "kv", 6)
    ssm = alloc_both(a, m, "ssm", 3)
    off = dict(zip(kv + ssm, a.resolve(i32(kv + ssm)).tolist()))
    order = [kv[4], ssm[1], kv[1], kv[3]]
    a.free(i32(order))
    m.free(order)
    assert_matches(m, a)
    # the handle stack now ends ... kv4, ssm1, kv1, kv3 (top); units went to their own pool's stack
    again = alloc_both(a, m, "ssm", 1)
    assert again == [kv[3]]
    if cls is PaddedUnifiedAllocator:  # one pool: kv3's unit is on top of it
        assert a.resolve(i32(again)).tolist() == [off[kv[3]]]
        rest = alloc_both(a, m, "kv", 3)
        assert rest == [kv[1], ssm[1], kv[4]]
        assert a.resolve(i32(rest)).tolist() == [off[kv[1]], off[ssm[1]], off[kv[4]]]
    else:  # the SSM pool's top is ssm1's block
        assert a.resolve(i32(again)).tolist() == [off[ssm[1]]]
        rest = alloc_both(a, m, "kv", 3)
        assert rest == [kv[1], ssm[1], kv[4]]
        assert a.resolve(i32(rest)).tolist() == [off[kv[3]], off[kv[1]], off[kv[4]]]
    assert_matches(m, a)


# ---------------------------------------------------------------------------------------- grow / release

def _tables(R, W, extra=0):
    """A [R, W] block table as a column slice of a wider one (row stride W + extra)."""
    wide = torch.full((R, W + extra), -1, dtype=torch.int32, device=DEVICE)
    return wide, wide[:, :W], torch.zeros(R, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("geom", list(GEOMS))
@pytest.mark.parametrize("cls", CLASSES)
def test_grow_release_against_model(cls, geom):
    gen = torch.Generator().manual_seed(5 + 3 * CLASSES.index(cls))
    a = make(cls, geom)
    m = AllocatorModel.like(a)
    units = Units(a, gen)
    R, W = 7, 5
    wide, bt, npg = _tables(R, W, extra=3)
    ssm = torch.full((R,), -1, dtype=torch.int32, device=DEVICE)
    m_bt, m_npg, m_ssm = [[-1] * W for _ in range(R)], [0] * R, [-1] * R
    loose = alloc_both(a, m, "kv", 3)  # pages outside the table keep the pool scattered
    units.stamp(loose, KIND_KV)

    def check():
        assert bt.tolist() == m_bt and npg.tolist() == m_npg and ssm.tolist() == m_ssm
        assert (wide[:, W:] == -1).all(), "grow wrote outside its columns"
        assert_matches(m, a)
        units.verify()

    for step in range(6):
        need = torch.randint(0, 3, (R,), generator=gen)
        need[int(torch.randint(0, R, (1,), generator=gen))] = 0
        if step == 2:
            need[1] = -1      # bad count
            need[4] = W + 1   # would overflow the row
        before = bt.clone()
        failed = a.grow_kv(bt, npg, need.to(torch.int32).to(DEVICE))
        assert failed.tolist() == m.grow(m_bt, m_npg, need.tolist())
        if step == 2:
            assert failed[1] == 6 and failed[4] == 6
        new = [h for h in bt.flatten().tolist() if h >= 0 and h not in before.flatten().tolist()]
        units.stamp(new, KIND_KV)
        # give some rows an SSM block (scattered rows)
        rows = [r for r in shuffled(range(R), gen) if m_ssm[r] < 0][:2]
        if rows and a.stats().pools[a.pool_names[a.pool_index('ssm')]].free_units >= len(rows):
            hs = alloc_both(a, m, "ssm", len(rows))
            units.stamp(hs, KIND_SSM)
            for r, h in zip(rows, hs):
                ssm[r] = h
                m_ssm[r] = h
        check()
        # release a scattered subset of rows, padded with -1; a duplicated empty row is fine
        picked = shuffled(range(R), gen)[: 1 + step % 3]
        empty = [r for r in range(R) if m_npg[r] == 0 and m_ssm[r] < 0 and r not in picked]
        rows = picked + empty[:1] * 2 + [-1, -1]
        rows = shuffled(rows, gen)
        freed = [h for r in picked for h in m_bt[r][: m_npg[r]]] + [m_ssm[r] for r in picked if m_ssm[r] >= 0]
        status = a.release_rows(i32(rows), bt, npg, ssm)
        assert tuple(status.tolist()) == m.release(rows, m_bt, m_npg, m_ssm) == (0, -1, 0)
        a.check_status(status)
        units.forget(freed)
        check()
    # without an SSM column only KV pages go
    rows = shuffled([r for r in range(R) if m_npg[r] > 0], gen) + [-1]
    freed = [h for r in rows if r >= 0 for h in m_bt[r][: m_npg[r]]]
    status = a.release_rows(i32(rows), bt, npg)
    assert tuple(status.tolist()) == m.release(rows, m_bt, m_npg) == (0, -1, 0)
    units.forget(freed)
    check()
    assert (npg == 0).all() and (bt == -1).all()


def test_grow_serves_rows_in_order_all_or_nothing():
    """By hand: once a row does not fit, later rows with a need wait; bad rows use no budget."""
    a = make(AVMPAllocator, slabs=7)  # 4 KV slabs x 4 pages
    m = AllocatorModel.like(a)
    hold = alloc_both(a, m, "kv", 13)  # 3 pages left
    _, bt, npg = _tables(6, 4)
    m_bt, m_npg = [[-1] * 4 for _ in range(6)], [0] * 6
    need = [2, -1, 5, 4, 0, 1]  # row 1 negative, row 2 overflows W, row 3 does not fit
    failed = a.grow_kv(bt, npg, i32(need))
    assert failed.tolist() == [0, 6, 6, 7, 0, 7] == m.grow(m_bt, m_npg, need)
    assert npg.tolist() == [2, 0, 0, 0, 0, 0]
    # the popped pages are the next two stack entries, handles 13 and 14
    assert bt[0].tolist() == [13, 14, -1, -1]
    # nothing is rebalanced on this path, even though the SSM pool has free slabs
    owner = a.slab_owner.clone()
    failed = a.grow_kv(bt, npg, i32([0, 0, 0, 2, 0, 0]))
    assert failed.tolist() == [0, 0, 0, 7, 0, 0] == m.grow(m_bt, m_npg, [0, 0, 0, 2, 0, 0])
    assert torch.equal(owner, a.slab_owner)
    a.make_room("kv", 2)
    m.make_room("kv", 2)
    assert a.stats().slabs_moved > 0
    failed = a.grow_kv(bt, npg, i32([0, 0, 0, 2, 0, 0]))
    assert failed.tolist() == [0] * 6 == m.grow(m_bt, m_npg, [0, 0, 0, 2, 0, 0])
    assert bt.tolist() == m_bt and npg.tolist() == m_npg
    assert_matches(m, a)
    assert len(hold) == 13


def test_grow_release_over_a_thousand_rows():
    """Over a thousand rows and pages at the real launch shapes (small blocks: see below)."""
    gen = torch.Generator().manual_seed(77)
    a = make(AVMPAllocator, "block>page", slabs=40, kv_fraction=0.75)  # 30 x 42 = 1260 pages
    m = AllocatorModel.like(a)
    R, W = 1100, 3
    _, bt, npg = _tables(R, W)
    m_bt, m_npg = [[-1] * W for _ in range(R)], [0] * R
    need = torch.randint(0, 4, (R,), generator=gen).tolist()  # ~1650 pages asked
    failed = a.grow_kv(bt, npg, i32(need))
    assert failed.tolist() == m.grow(m_bt, m_npg, need)
    assert 0 < failed.tolist().count(7) < R, "want both granted and refused rows"
    assert bt.tolist() == m_bt and npg.tolist() == m_npg
    rows = shuffled(range(R), gen)[:1050] + [-1] * 30
    status = a.release_rows(i32(rows), bt, npg)
    assert tuple(status.tolist()) == m.release(rows, m_bt, m_npg) == (0, -1, 0)
    assert bt.tolist() == m_bt and npg.tolist() == m_npg
    assert_matches(m, a)
    live = shuffled(m.live_handles(), gen)
    assert len(live) > 0
    a.free(i32(live))
    m.free(live)
    assert_matches(m, a)


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink every launch's block so that small inputs take the multi-block / multi-program paths."""
    import avmp_triton.memory.allocator as A

    monkeypatch.setattr(A, "_launch_shape", lambda n: (16, 1))
    # raising=True: if a knob is renamed this fixture fails loudly instead of silently testing less
    # frees of 17-32 handles walk two blocks in one program, longer ones take the two launches
    for name, value in (("_BLOCK", 16), ("_ALLOC_BLOCK", 16), ("_COPY_CHUNK", 32), ("_COPY_BLOCK", 16),
                        ("_FREE_BLOCK", 16)):
        monkeypatch.setattr(A, name, value)
    monkeypatch.setattr(A.ArenaAllocator, "free_one_program_max", 32)


@pytest.mark.parametrize("geom", list(GEOMS))
def test_kernels_walk_several_blocks(geom, small_blocks):
    """Same policy with 16-lane blocks: every loop over handles, rows, pages, slots and words wraps."""
    gen = torch.Generator().manual_seed(41)
    a = make(AVMPAllocator, geom, slabs=12, kv_fraction=0.75)
    m = AllocatorModel.like(a)
    units = Units(a, gen)
    kv = alloc_both(a, m, "kv", a.stats().pools["kv"].free_units - 1)
    assert len(kv) > 16
    units.stamp(kv, KIND_KV)
    drop = shuffled(kv, gen)[: len(kv) // 2]
    a.free(i32(drop))
    m.free(drop)
    units.forget(drop)
    assert_matches(m, a)
    R, W = 37, 2
    _, bt, npg = _tables(R, W)
    m_bt, m_npg = [[-1] * W for _ in range(R)], [0] * R
    need = torch.randint(0, 3, (R,), generator=gen).tolist()
    failed = a.grow_kv(bt, npg, i32(need))
    assert failed.tolist() == m.grow(m_bt, m_npg, need)
    assert bt.tolist() == m_bt and npg.tolist() == m_npg
    units.stamp([h for row in m_bt for h in row if h >= 0], KIND_KV)
    rows = shuffled(list(range(R)) + [-1] * 5, gen)[:33]
    freed = [h for r in rows if r >= 0 for h in m_bt[r][: m_npg[r]]]
    status = a.release_rows(i32(rows), bt, npg)
    assert tuple(status.tolist()) == m.release(rows, m_bt, m_npg) == (0, -1, 0)
    units.forget(freed)
    assert_matches(m, a)
    units.verify()
    # compaction both ways: collect / move / adopt walk slabs of up to 42 units and 128-word units
    _fill_donor_scattered(a, m, units, gen, KIND_SSM)
    a.rebalance("kv", 1)
    m.rebalance("kv", 1)
    _fill_donor_scattered(a, m, units, gen, KIND_KV)
    a.rebalance("ssm", 2)
    m.rebalance("ssm", 2)
    assert a.stats().units_moved > 0
    assert_matches(m, a)
    units.verify()
    # a bad handle deep in a long free is still found first and nothing changes
    live = shuffled(units.live(), gen)
    bad = live[:40] + [a.num_handles] + live[40:45]
    expect_error(a, m, InvalidHandleError, lambda: a.free(i32(bad)), lambda: m.free(bad),
                 names=("handles[40]", f"handle {a.num_handles}"))
    dup = live[:30] + live[3:4]
    expect_error(a, m, InvalidHandleError, lambda: a.free(i32(dup)), lambda: m.free(dup), names=(f"handle {live[3]}",))
    a.free(i32(live))
    m.free(live)
    assert_matches(m, a)
    assert a.stats().handles_live == 0


@pytest.mark.parametrize("cls", CLASSES)
def test_large_free_in_two_launches(cls, small_blocks):
    """A free of more than free_one_program_max handles (validate in one launch, push in a second, 16
    handles a program): the same units and handles in the same order as the model, and on a bad
    or repeated handle in any program, nothing freed and the lowest bad position named."""
    gen = torch.Generator().manual_seed(43)
    a = make(cls, "block>page", slabs=24)   # the unified pool: 4 units a slab
    m = AllocatorModel.like(a)
    units = Units(a, gen)
    kv = alloc_both(a, m, "kv", 60)
    ssm = alloc_both(a, m, "ssm", 12)
    units.stamp(kv, KIND_KV)
    units.stamp(ssm, KIND_SSM)
    live = shuffled(kv + ssm, gen)
    for bad, names in ((live[:50] + [a.num_handles] + live[50:55], ("handles[50]",)),
                       (live[:3] + [-1] + live[3:40], ("handles[3]",)),
                       (live[:40] + live[7:8], (f"handle {live[7]}",))):
        expect_error(a, m, InvalidHandleError, lambda: a.free(i32(bad)), lambda: m.free(bad), names=names)
    wrong = ssm + kv[:30]
    expect_error(a, m, InvalidHandleError, lambda: a.free(i32(wrong), kind="ssm"), lambda: m.free(wrong, kind="ssm"),
                 names=("handles[12]", "is not a 'ssm' handle"))
    m.free(live[:45])
    a.free(i32(live[:45]))
    units.forget(live[:45])
    assert_matches(m, a)
    units.verify()
    assert alloc_both(a, m, "kv", 40) and alloc_both(a, m, "ssm", 5)   # the same units come back
    assert_matches(m, a)


def test_grow_order_is_strict_across_blocks(small_blocks):
    """By hand, with 16-row blocks: a miss in the first block holds back every later block."""
    a = make(AVMPAllocator, slabs=7)
    m = AllocatorModel.like(a)
    alloc_both(a, m, "kv", a.stats().pools["kv"].free_units - 3)  # 3 pages left
    R = 40
    _, bt, npg = _tables(R, 4)
    m_bt, m_npg = [[-1] * 4 for _ in range(R)], [0] * R
    need = [4] + [0] * 19 + [1] * 20
    failed = a.grow_kv(bt, npg, i32(need))
    assert failed.tolist() == [7] + [0] * 19 + [7] * 20 == m.grow(m_bt, m_npg, need)
    assert (npg == 0).all() and (bt == -1).all()
    need = [2] + [0] * 19 + [1] * 20  # now rows 0 and 20 fit, 21.. do not
    failed = a.grow_kv(bt, npg, i32(need))
    assert failed.tolist() == [0] + [0] * 19 + [0] + [7] * 19 == m.grow(m_bt, m_npg, need)
    assert bt.tolist() == m_bt and npg.tolist() == m_npg
    assert_matches(m, a)


@pytest.mark.parametrize("cls", CLASSES)
def test_release_errors_change_nothing(cls):
    gen = torch.Generator().manual_seed(3)
    a = make(cls)
    m = AllocatorModel.like(a)
    units = Units(a, gen)
    R, W = 5, 3
    _, bt, npg = _tables(R, W)
    m_bt, m_npg, m_ssm = [[-1] * W for _ in range(R)], [0] * R, [-1] * R
    need = [2, 1, 3, 0, 2]
    assert a.grow_kv(bt, npg, i32(need)).tolist() == m.grow(m_bt, m_npg, need) == [0] * R
    units.stamp([h for row in m_bt for h in row if h >= 0], KIND_KV)
    blocks = alloc_both(a, m, "ssm", 3)
    units.stamp(blocks, KIND_SSM)
    m_ssm[4], m_ssm[0], m_ssm[3] = blocks
    ssm = i32(m_ssm)

    def attempt(rows, exc, code, pos, val, *names):
        tables = (bt.clone(), npg.clone(), ssm.clone())
        before = raw_state(a)
        status = a.release_rows(i32(rows), bt, npg, ssm)
        assert tuple(status.tolist()) == (code, pos, val)
        assert m.release(rows, m_bt, m_npg, m_ssm) == (code, pos, val)
        assert_same_raw(before, raw_state(a))
        assert all(torch.equal(x, y) for x, y in zip(tables, (bt, npg, ssm)))
        assert bt.tolist() == m_bt and npg.tolist() == m_npg and ssm.tolist() == m_ssm
        with pytest.raises(exc) as info:
            a.check_status(status)
        for v in names:
            assert str(v) in str(info.value)
        with pytest.raises(exc) as model_info:
            m.check_status(status.tolist())
        assert str(model_info.value) == str(info.value)
        assert_matches(m, a)
        units.verify()

    attempt([1, -1, R, 0], ValueError, 5, 2, R, f"rows[2]: row {R}")          # row out of range
    attempt([1, -5, 0], ValueError, 5, 1, -5, "rows[1]: row -5")             # negative row other than -1
    npg[2] = W + 1
    m_npg[2] = W + 1
    attempt([0, 2], ValueError, 6, 1, 2, "rows[1]: row 2")                    # bad page count
    npg[2] = 3
    m_npg[2] = 3
    # the same row twice: its pages come twice (first page of the 2nd copy at flat 2 + 1 + 1 = 4)
    attempt([4, -1, 1, 4], InvalidHandleError, 4, 4, m_bt[4][0], f"handle {m_bt[4][0]}")
    # a page freed behind the table's back
    gone = m_bt[2][1]
    a.free(i32([gone]))
    m.free([gone])
    units.forget([gone])
    attempt([1, 2], InvalidHandleError, 2, 2, gone, f"released entry[2]: handle {gone} is not allocated")
    units.stamp(alloc_both(a, m, "kv", 1), KIND_KV)  # it is live again, as another page's handle
    # a KV handle in the SSM column
    ssm[1] = m_bt[0][0]
    m_ssm[1] = m_bt[0][0]
    # row 3: its block (flat 0); row 1: one page (flat 1), then the KV handle as its block (flat 2)
    attempt([3, 1], InvalidHandleError, 3, 2, m_bt[0][0], f"handle {m_bt[0][0]} is of the wrong kind")
    ssm[1] = -1
    m_ssm[1] = -1
    # a hole (-1) inside the held range
    hole = m_bt[0][1]
    bt[0, 1] = -1
    m_bt[0][1] = -1
    attempt([0], InvalidHandleError, 1, 1, -1, "released entry[1]: handle -1 is out of range")
    bt[0, 1] = hole
    m_bt[0][1] = hole
    # and after all that, a good release still matches
    status = a.release_rows(i32([4, 0]), bt, npg, ssm)
    assert tuple(status.tolist()) == m.release([4, 0], m_bt, m_npg, m_ssm) == (0, -1, 0)
    assert_matches(m, a)


# ---------------------------------------------------------------------------------------- rebalancing

def _fill_donor_scattered(a, m, units, gen, donor_kind: int):
    """Fill the donor pool, then free a scattered half while every slab keeps a live unit."""
    name = KIND_NAME[donor_kind]
    pool = a.pool_index(KIND_NAME[donor_kind])
    n = a.stats().pools[a.pool_names[pool]].free_units
    hs = alloc_both(a, m, name, n)
    units.stamp(hs, donor_kind)
    slab_of = dict(zip(hs, (o // SLAB for o in a.resolve(i32(hs)).tolist())))
    drop = shuffled(hs, gen)[: n // 2]
    for s in set(slab_of.values()):
        mine = [h for h in hs if slab_of[h] == s]
        if all(h in drop for h in mine):
            drop.remove(mine[0])
    a.free(i32(drop))
    m.free(drop)
    units.forget(drop)
    assert_matches(m, a)


@pytest.mark.parametrize("geom", list(GEOMS))
@pytest.mark.parametrize("to_kind", ["ssm", "kv"])
def test_forced_rebalance_compacts_and_keeps_bytes(to_kind, geom):
    gen = torch.Generator().manual_seed(21 + len(to_kind) + len(geom))
    a = make(AVMPAllocator, geom, slabs=8)
    m = AllocatorModel.like(a)
    units = Units(a, gen)
    to = KIND_SSM if to_kind == "ssm" else KIND_KV
    donor_kind = KIND_KV if to == KIND_SSM else KIND_SSM
    d, p = a.pool_index(KIND_NAME[donor_kind]), a.pool_index(KIND_NAME[to])
    units.stamp(alloc_both(a, m, to_kind, 3), to)  # the recipient holds live bytes too
    _fill_donor_scattered(a, m, units, gen, donor_kind)
    owner, live = a.slab_owner.tolist(), a.slab_live.tolist()
    donor = [s for s in range(a.num_slabs) if owner[s] == d]
    assert all(live[s] > 0 for s in donor), "no donor slab may be free: compaction is forced"
    k = len(donor) - -(-sum(live[s] for s in donor) // a.units_per_slab[d])  # most that can be emptied
    assert k >= 1
    # by hand: the k least-occupied donor slabs (ties by index) leave
    victims = sorted(donor, key=lambda s: (live[s], s))[:k]
    a.rebalance(to_kind, k)
    m.rebalance(to_kind, k)
    assert_matches(m, a)
    units.verify()
    st = a.stats()
    assert [s for s in range(a.num_slabs) if a.slab_owner[s] == p and owner[s] == d] == sorted(victims)
    assert st.migrations == 1 and st.slabs_moved == k
    assert st.units_moved == sum(live[s] for s in victims) > 0
    assert st.bytes_copied == st.units_moved * a.unit_bytes[d]
    assert all(a.slab_live[s] == 0 for s in victims)
    # the recipient's next unit is victims[0]'s unit 0, and all of the new capacity is usable
    free_p = st.pools[a.pool_names[p]].free_units
    got = alloc_both(a, m, to_kind, free_p)
    assert a.resolve(i32(got[:1])).tolist() == [victims[0] * SLAB]
    units.stamp(got, to)
    assert a.stats().migrations == 1
    # one more slab cannot be emptied: PoolExhaustedError, nothing changed
    expect_error(a, m, PoolExhaustedError, lambda: a.rebalance(to_kind, len(donor) - k),
                 lambda: m.rebalance(to_kind, len(donor) - k), names=(len(donor) - k,))
    units.verify()


def test_compaction_hands_over_free_slabs_first():
    """Fewer free donor slabs than needed: all free ones go first, then the least occupied."""
    gen = torch.Generator().manual_seed(13)
    a = make(AVMPAllocator, slabs=8)  # 4 KV slabs of 4 pages
    m = AllocatorModel.like(a)
    units = Units(a, gen)
    _fill_donor_scattered(a, m, units, gen, KIND_KV)
    live = a.slab_live.tolist()
    emptied = max(range(4), key=lambda s: (live[s], s))  # empty the fullest slab: it must go first
    mine = [h for h in units.live(KIND_KV) if m.table[h] // SLAB == emptied]
    mine = shuffled(mine, gen)
    a.free(i32(mine))
    m.free(mine)
    units.forget(mine)
    live = a.slab_live.tolist()
    busiest_last = sorted((s for s in range(4) if s != emptied), key=lambda s: (live[s], s))
    a.rebalance("ssm", 2)
    m.rebalance("ssm", 2)
    assert_matches(m, a)
    moved = sorted([emptied, busiest_last[0]])
    assert [s for s in range(4) if a.slab_owner[s] == 1] == moved
    assert a.stats().units_moved == live[busiest_last[0]] > 0
    got = alloc_both(a, m, "ssm", a.stats().pools["ssm"].free_units)
    # the first victim (the free slab) is on top: its unit 0 pops first, then the compacted slab's
    assert a.resolve(i32(got[:2])).tolist() == [emptied * SLAB, emptied * SLAB + 224]
    units.stamp(got, KIND_SSM)
    units.verify()


def test_forced_rebalance_moves_exactly_need_free_slabs():
    a = make(AVMPAllocator, slabs=10, kv_fraction=0.6, migration_batch=16)  # 6 KV slabs
    m = AllocatorModel.like(a)
    gen = torch.Generator().manual_seed(8)
    units = Units(a, gen)
    units.stamp(alloc_both(a, m, "kv", 5), KIND_KV)  # slabs 0 and 1 busy
    a.rebalance("ssm", 2)
    m.rebalance("ssm", 2)
    assert_matches(m, a)
    assert a.slab_owner.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 1, 1]
    st = a.stats()
    assert (st.slabs_moved, st.units_moved, st.bytes_copied) == (2, 0, 0)
    ssm = alloc_both(a, m, "ssm", 2)
    assert a.resolve(i32(ssm)).tolist() == [2 * SLAB, 2 * SLAB + 224]
    units.verify()


@pytest.mark.parametrize("batch", [1, 2, 3, 16])
def test_migration_batch_moves_eagerly_on_alloc_failure(batch):
    a = make(AVMPAllocator, slabs=12, kv_fraction=0.75, migration_batch=batch)  # 9 KV, 3 SSM slabs
    m = AllocatorModel.like(a)
    gen = torch.Generator().manual_seed(batch)
    units = Units(a, gen)
    kv = alloc_both(a, m, "kv", 21)  # slabs 0-4 full, one page in slab 5
    keep = [kv[0], kv[13]]           # one page in slab 0, one in slab 3
    drop = shuffled([h for h in kv if h not in keep], gen)
    a.free(i32(drop))
    m.free(drop)
    units.stamp(keep, KIND_KV)
    units.stamp(alloc_both(a, m, "ssm", 27), KIND_SSM)  # SSM pool full
    free_kv = [1, 2, 4, 5, 6, 7, 8]
    # 10 more blocks: deficit 10 -> 2 slabs needed; eager: up to max(2, batch) free slabs
    got = alloc_both(a, m, "ssm", 10)
    take = min(len(free_kv), max(2, batch))
    moved = [s for s in range(12) if a.slab_owner[s] == 1 and s < 9]
    assert moved == free_kv[:take]
    st = a.stats()
    assert (st.migrations, st.slabs_moved, st.units_moved) == (1, take, 0)
    assert a.resolve(i32(got[:1])).tolist() == [free_kv[0] * SLAB]  # first victim's unit 0 first
    units.stamp(got, KIND_SSM)
    assert_matches(m, a)
    # make_room follows the same eager rule
    left = st.pools["ssm"].free_units
    a.make_room("ssm", left + 1)
    m.make_room("ssm", left + 1)
    assert_matches(m, a)
    remaining = len(free_kv) - take
    if remaining:
        assert a.stats().slabs_moved == take + min(remaining, max(1, batch))
    units.verify()


@pytest.mark.parametrize("geom", list(GEOMS))
def test_alloc_failure_compacts_when_no_slab_is_free(geom):
    gen = torch.Generator().manual_seed(31)
    a = make(AVMPAllocator, geom, slabs=8, migration_batch=4)
    m = AllocatorModel.like(a)
    units = Units(a, gen)
    _fill_donor_scattered(a, m, units, gen, KIND_KV)
    units.stamp(alloc_both(a, m, "ssm", a.stats().pools["ssm"].free_units), KIND_SSM)
    got = alloc_both(a, m, "ssm", 1)  # needs one slab; every KV slab is busy
    st = a.stats()
    assert st.migrations == 1 and st.slabs_moved == 1 and st.units_moved > 0  # exactly need, not batch
    units.stamp(got, KIND_SSM)
    assert_matches(m, a)
    units.verify()


# ---------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("cls", CLASSES)
def test_pool_exhausted_changes_nothing(cls):
    a, m, units, gen = busy(cls)
    H = a.num_handles
    if cls is AVMPAllocator:
        # fill everything so that nothing can be moved
        for kind in (KIND_KV, KIND_SSM):
            n = a.stats().pools[a.pool_names[a.pool_index(KIND_NAME[kind])]].free_units
            units.stamp(alloc_both(a, m, KIND_NAME[kind], n), kind)
        expect_error(a, m, PoolExhaustedError, lambda: a.alloc_ssm(1), lambda: m.alloc("ssm", 1),
                     names=("n=1", "0 free", "'ssm'"))
        expect_error(a, m, PoolExhaustedError, lambda: a.alloc_kv(H), lambda: m.alloc("kv", H),
                     names=(f"n={H}",))
        expect_error(a, m, PoolExhaustedError, lambda: a.make_room("kv", 3), lambda: m.make_room("kv", 3),
                     names=("n=3",))
        expect_error(a, m, PoolExhaustedError, lambda: a.rebalance("kv", 1), lambda: m.rebalance("kv", 1),
                     names=("cannot move 1 slab",))
    else:
        for kind in (KIND_KV, KIND_SSM):
            pool = a.pool_names[a.pool_index(KIND_NAME[kind])]
            free = a.stats().pools[pool].free_units
            expect_error(a, m, PoolExhaustedError, lambda: (a.alloc_kv, a.alloc_ssm)[kind - 1](free + 1),
                         lambda: m.alloc(KIND_NAME[kind], free + 1), names=(f"n={free + 1}", f"{free} free"))
            expect_error(a, m, PoolExhaustedError, lambda: a.make_room(KIND_NAME[kind], free + 2),
                         lambda: m.make_room(KIND_NAME[kind], free + 2), names=(f"n={free + 2}",))
        expect_error(a, m, PoolExhaustedError, lambda: a.rebalance("ssm", 1), lambda: m.rebalance("ssm", 1),
                     names=(cls.__name__,))
    units.verify()


@pytest.mark.parametrize("cls", CLASSES)
def test_invalid_handles_change_nothing(cls):
    a, m, units, gen = busy(cls, seed=4)
    H = a.num_handles
    kv, ssm = shuffled(units.live(KIND_KV), gen), shuffled(units.live(KIND_SSM), gen)
    never = next(h for h in range(H - 1, -1, -1) if a.handle_kind[h] == 0)
    cases = [
        (kv[:2] + [H] + ssm[:1], None, "handles[2]", H, "out of range"),
        ([-1] + kv[:1], None, "handles[0]", -1, "out of range"),
        (ssm[:1] + [-(2**31)], None, "handles[1]", -(2**31), "out of range"),
        ([2**31 - 1], None, "handles[0]", 2**31 - 1, "out of range"),
        (kv[:1] + [never], None, "handles[1]", never, "not allocated"),
        (kv[:1] + ssm[1:2] + kv[:1], None, "handles:", kv[0], "more than once"),
        (ssm[:1] + kv[1:2], "ssm", "handles[1]", kv[1], "is not a 'ssm' handle"),
        (kv[:2] + ssm[:1], "kv", "handles[2]", ssm[0], "is not a 'kv' handle"),
    ]
    for handles, kind, where, val, text in cases:
        names = (where, f"handle {val}", text)
        expect_error(a, m, InvalidHandleError, lambda: a.free(i32(handles), kind=kind),
                     lambda: m.free(handles, kind=kind), names=names)
        if "more than once" not in text:
            expect_error(a, m, InvalidHandleError, lambda: a.resolve(i32(handles), kind=kind),
                         lambda: m.resolve(handles, kind=kind), names=names)
    # already freed: fine once, refused the second time
    gone = kv[2]
    a.free(i32([gone]))
    m.free([gone])
    units.forget([gone])
    expect_error(a, m, InvalidHandleError, lambda: a.free(i32(ssm[:1] + [gone])), lambda: m.free(ssm[:1] + [gone]),
                 names=("handles[1]", f"handle {gone}", "not allocated"))
    expect_error(a, m, InvalidHandleError, lambda: a.resolve(i32([gone])), lambda: m.resolve([gone]),
                 names=(f"handle {gone}",))
    # an error in a long call frees nothing either
    still = [h for h in kv if h != gone][:3]
    assert len(still) == 3
    long = still + [never] * 1099 + [gone]  # position 3 is the first bad one
    expect_error(a, m, InvalidHandleError, lambda: a.free(i32(long)), lambda: m.free(long),
                 names=("handles[3]", f"handle {never}"))
    units.verify()


@pytest.mark.parametrize("cls", CLASSES)
def test_type_and_value_errors_change_nothing(cls):
    a, m, units, gen = busy(cls, seed=9)
    H, S = a.num_handles, a.num_slabs
    kv = units.live(KIND_KV)
    R, W = 3, 2
    _, bt, npg = _tables(R, W)
    need = i32([1, 0, 1])
    # TypeError: non-tensors, wrong dtypes, non-int counts
    expect_error(a, m, TypeError, lambda: a.free(kv[:2]), names=("list",))
    expect_error(a, m, TypeError, lambda: a.free(i32(kv[:2]).long()), names=("torch.int64",))
    expect_error(a, m, TypeError, lambda: a.resolve(i32(kv[:2]).float()), names=("torch.float32",))
    for bad in (2.0, True, "3", torch.tensor(2)):
        expect_error(a, m, TypeError, lambda: a.alloc_kv(bad), lambda: m.alloc("kv", bad),
                     names=(type(bad).__name__,))
        expect_error(a, m, TypeError, lambda: a.make_room("ssm", bad), lambda: m.make_room("ssm", bad),
                     names=(type(bad).__name__,))
    expect_error(a, m, TypeError, lambda: a.grow_kv(bt.long(), npg, need), names=("torch.int64",))
    expect_error(a, m, TypeError, lambda: a.grow_kv(bt, npg, need.to(torch.int16)), names=("torch.int16",))
    expect_error(a, m, TypeError, lambda: a.release_rows([0, 1], bt, npg), names=("list",))
    # ValueError: wrong device, shape, ranges, names
    expect_error(a, m, ValueError, lambda: a.free(torch.zeros(2, dtype=torch.int32, device="meta")),
                 names=("meta",))
    expect_error(a, m, ValueError, lambda: a.free(i32(kv[:4]).view(2, 2)), names=("(2, 2)",))
    expect_error(a, m, ValueError, lambda: a.resolve(i32(kv[:4]).view(2, 2)), names=("(2, 2)",))
    for bad in (-1, H + 1, 10**12):
        expect_error(a, m, ValueError, lambda: a.alloc_ssm(bad), lambda: m.alloc("ssm", bad), names=(bad,))
    expect_error(a, m, ValueError, lambda: a.free(i32(kv[:1]), kind="KV"), lambda: m.free(kv[:1], kind="KV"),
                 names=("'KV'",))
    expect_error(a, m, ValueError, lambda: a.resolve(i32(kv[:1]), kind=1), names=("1",))
    for to, n, name in (("both", 1, "'both'"), ("ssm", -1, "-1"), ("kv", S + 1, str(S + 1)), ("kv", 1.0, "1.0")):
        expect_error(a, m, ValueError, lambda: a.rebalance(to, n), lambda: m.rebalance(to, n), names=(name,))
    expect_error(a, m, ValueError, lambda: a.make_room("mamba", 1), lambda: m.make_room("mamba", 1),
                 names=("'mamba'",))
    expect_error(a, m, ValueError, lambda: a.grow_kv(bt, npg, i32([1, 1])), names=("need", "3", "2"))
    expect_error(a, m, ValueError, lambda: a.grow_kv(bt[0], npg, need), names=("(2,)",))
    expect_error(a, m, ValueError, lambda: a.grow_kv(bt.t(), npg, need), names=("(2, 3)",))
    strided = torch.zeros(6, dtype=torch.int32, device=DEVICE)[::2]
    expect_error(a, m, ValueError, lambda: a.grow_kv(bt, strided, need), names=("num_pages", "contiguous"))
    expect_error(a, m, ValueError, lambda: a.release_rows(i32([0]), bt, npg, i32([-1] * 4)),
                 names=("ssm_handles", "3", "4"))
    assert (bt == -1).all() and (npg == 0).all()
    units.verify()


@pytest.mark.parametrize("cls", CLASSES)
def test_constructor_rejects_bad_arguments(cls):
    spec, page_tokens = GEOMS["page>block"]
    cap = 7 * SLAB

    def build(**kw):
        args = dict(spec=spec, capacity_bytes=cap, device=DEVICE, slab_bytes=SLAB, page_tokens=page_tokens)
        args.update(kw)
        return cls(args.pop("spec"), args.pop("capacity_bytes"), **args)

    def bad(exc, *names, **kw):
        with pytest.raises(exc) as info:
            build(**kw)
        for v in names:
            assert str(v) in str(info.value), f"{info.value} does not name {v!r}"

    bad(ValueError, "'tpu:0'", device="tpu:0")
    bad(ValueError, "'not a device'", device="not a device")
    bad(ValueError, "'meta'", device="meta")
    if not torch.cuda.is_available():
        bad(ValueError, "'cuda'", device="cuda")
    bad(TypeError, "dict", spec={"num_attn_layers": 1})
    bad(ValueError, "'no-mamba'", "num_mamba_layers=0", spec=dataclasses.replace(spec, name="no-mamba", num_mamba_layers=0))
    if cls is PaddedUnifiedAllocator:  # attention-free specs: see the section of their own below
        bad(ValueError, "'no-attn'", "no attention layers", spec=dataclasses.replace(spec, name="no-attn", num_attn_layers=0))
    bad(ValueError, "capacity_bytes", "0", capacity_bytes=0)
    bad(ValueError, "capacity_bytes", "4096.0", capacity_bytes=4096.0)
    bad(ValueError, "capacity_bytes=2000", capacity_bytes=2000)
    bad(ValueError, "slab_bytes", "2000", slab_bytes=2000)      # not a multiple of 128
    bad(ValueError, "slab_bytes", "384", slab_bytes=384)        # smaller than the 512-B page
    bad(ValueError, "page_tokens", "0", page_tokens=0)
    if cls is AVMPAllocator:
        bad(ValueError, "kv_fraction", "1.5", kv_fraction=1.5)
        bad(ValueError, "kv_fraction", "True", kv_fraction=True)
        bad(ValueError, "migration_batch", "0", migration_batch=0)
        bad(ValueError, "migration_batch", "257", migration_batch=257)
        bad(ValueError, "migration_batch", "2.0", migration_batch=2.0)
    if cls is StaticDualAllocator:
        bad(ValueError, "ssm_fraction", "-0.1", ssm_fraction=-0.1)
        bad(ValueError, "ssm_fraction", "'half'", ssm_fraction="half")
    if cls is PaddedUnifiedAllocator:
        assert build(capacity_bytes=SLAB + 5).num_slabs == 1  # one slab is enough for one pool
    else:
        bad(ValueError, f"capacity_bytes={SLAB + 5}", "at least 2", capacity_bytes=SLAB + 5)


@pytest.mark.parametrize("field, dtype", [("kv_dtype", torch.float64), ("kv_dtype", torch.int8),
                                          ("conv_dtype", torch.float64), ("ssm_dtype", torch.int32)])
@pytest.mark.parametrize("cls", CLASSES)
def test_constructor_rejects_dtypes_no_kernel_reads(cls, field, dtype):
    # HybridModelSpec refuses these itself; a spec altered behind its back must not slip through either
    spec = dataclasses.replace(SPEC_PAGE_BIG)
    object.__setattr__(spec, field, dtype)
    with pytest.raises(TypeError, match=f"{field} {dtype} is not supported"):
        cls(spec, 7 * SLAB, device=DEVICE, slab_bytes=SLAB)


# ---------------------------------------------------------------------------------------- accounting

@pytest.mark.parametrize("geom", list(GEOMS))
@pytest.mark.parametrize("cls", CLASSES)
def test_stats_add_up(cls, geom):
    a, m, units, gen = busy(cls, geom, seed=17)
    if cls is AVMPAllocator:
        _fill_donor_scattered(a, m, units, gen, KIND_KV)
        a.rebalance("ssm", 1)
        m.rebalance("ssm", 1)
    st = a.stats()
    assert st == m.stats()
    kinds = a.handle_kind.tolist()
    live_kv, live_ssm = kinds.count(KIND_KV), kinds.count(KIND_SSM)
    assert (st.live_kv, st.live_ssm) == (live_kv, live_ssm) == (len(units.live(KIND_KV)), len(units.live(KIND_SSM)))
    assert st.handles_live == live_kv + live_ssm > 0
    assert st.handles_capacity == a.num_handles
    assert sum(p.slabs for p in st.pools.values()) == a.num_slabs
    assert sum(p.used_units for p in st.pools.values()) == st.handles_live
    owner, live = a.slab_owner.tolist(), a.slab_live.tolist()
    for i, (name, p) in enumerate(st.pools.items()):
        assert p.used_units + p.free_units == p.units == p.slabs * p.units_per_slab
        assert p.free_units == int(a._tops[i])
        assert p.free_slabs == sum(1 for s in range(a.num_slabs) if owner[s] == i and live[s] == 0)
        assert p.slab_tail_bytes == p.slabs * (SLAB % p.unit_bytes)
    assert st.slab_tail_bytes == sum(p.slab_tail_bytes for p in st.pools.values())
    assert st.arena_tail_bytes == ARENA_TAIL
    # padding by hand: page 512/512 B, block 224/224 B; or page 48/40 B, block 512/500 B
    exact = {"page>block": (512, 224), "block>page": (40, 500)}[geom]
    if cls is PaddedUnifiedAllocator:
        unit = max(a.unit_bytes)
        assert st.padding_bytes == live_kv * (unit - exact[0]) + live_ssm * (unit - exact[1]) > 0
    else:
        assert st.padding_bytes == live_kv * (a.unit_bytes[0] - exact[0]) + live_ssm * (a.unit_bytes[1] - exact[1])
    if cls is AVMPAllocator:
        assert st.migrations == 1 and st.slabs_moved == 1
        assert st.bytes_copied == st.units_moved * st.pools["kv"].unit_bytes > 0


# ---------------------------------------------------------------------------------------- determinism

def _script(a, seed: int):
    """A fixed call sequence with scattered frees, growth, release and compacting rebalances."""
    gen = torch.Generator().manual_seed(seed)
    fill = torch.randint(0, 256, (a.arena.numel(),), dtype=torch.uint8, generator=gen)
    a.arena.copy_(fill.to(DEVICE))
    _, bt, npg = _tables(5, 4)
    live = []
    for step in range(5):
        live += a.alloc_kv(3 + step).tolist() + a.alloc_ssm(2 + step % 3).tolist()
        perm = torch.randperm(len(live), generator=gen).tolist()
        drop = [live[i] for i in perm[: len(live) // 3]]
        a.free(i32(drop))
        live = [h for h in live if h not in drop]
        a.grow_kv(bt, npg, i32(torch.randint(0, 3, (5,), generator=gen).tolist()))
        if step % 2:
            a.check_status(a.release_rows(i32([int(torch.randint(0, 5, (1,), generator=gen)), -1]), bt, npg))
        off = a.resolve(i32(live))
        a.arena[off] = torch.randint(0, 256, (len(live),), dtype=torch.uint8, generator=gen).to(DEVICE)
    perm = torch.randperm(len(live), generator=gen).tolist()
    a.free(i32([live[i] for i in perm[: len(live) // 2]]))
    live = [live[i] for i in perm[len(live) // 2:]]
    a.rebalance("ssm", 1)   # compacts: every KV slab is busy by now
    live += a.alloc_ssm(a.stats().pools["ssm"].free_units + 2).tolist()  # alloc-triggered move
    perm = torch.randperm(len(live), generator=gen).tolist()
    a.free(i32([live[i] for i in perm[: len(live) // 2]]))
    a.rebalance("kv", 1)
    return bt, npg


def test_same_calls_give_byte_identical_state():
    a1, a2 = make(AVMPAllocator, slabs=9), make(AVMPAllocator, slabs=9)
    out1, out2 = _script(a1, 99), _script(a2, 99)
    r1, r2 = raw_state(a1), raw_state(a2)
    assert r1["stats"].units_moved > 0 and r1["stats"].migrations >= 3
    assert_same_raw(r1, r2)
    assert all(torch.equal(x, y) for x, y in zip(out1, out2))
    assert device_state(a1) == device_state(a2)
    # and a different sequence does give a different table (the check can fail)
    a3 = make(AVMPAllocator, slabs=9)
    _script(a3, 100)
    assert not torch.equal(a3.handle_table, a1.handle_table) or not torch.equal(a3.arena, a1.arena)


@pytest.mark.parametrize("cls", [AVMPAllocator, StaticDualAllocator])
@pytest.mark.parametrize("page_tokens", [3, 12])
def test_allocators_reject_pages_the_kernels_cannot_read(cls, page_tokens):
    spec, _ = GEOMS["page>block"]
    with pytest.raises(ValueError, match=f"page_tokens must be a power of two in \\[1, 1024\\].*got {page_tokens}"):
        cls(spec, 7 * SLAB, device=DEVICE, slab_bytes=SLAB, page_tokens=page_tokens)
    # the padded baseline keeps vLLM's inflated, non-power-of-two pages (a simulation baseline)
    PaddedUnifiedAllocator(spec, 7 * SLAB, device=DEVICE, slab_bytes=SLAB, page_tokens=page_tokens)


def test_allocators_reject_pages_past_the_limit():
    spec, _ = GEOMS["page>block"]
    with pytest.raises(ValueError, match="page_tokens must be a power of two in \\[1, 1024\\].*got 2048"):
        AVMPAllocator(spec, 1 << 22, device=DEVICE, page_tokens=2048)


@pytest.mark.parametrize("cls", CLASSES)
def test_public_planning_surface_agrees_with_stats(cls):
    """What the scheduler plans with (migrates, pool_index, free_counts) says what stats() says,
    after allocations of both kinds; pool_index names the bad kind."""
    a = make(cls)
    a.alloc_kv(3)
    a.alloc_ssm(2)
    st = a.stats()
    assert a.migrates is (cls is AVMPAllocator)
    counts = a.free_counts.tolist()
    for kind in ("kv", "ssm"):
        p = a.pool_index(kind)
        assert counts[p] == st.pools[a.pool_names[p]].free_units
    assert (a.pool_index("kv") == a.pool_index("ssm")) is (cls is PaddedUnifiedAllocator)
    assert counts[2] == a.num_handles - st.handles_live
    with pytest.raises(ValueError, match="kind must be 'kv' or 'ssm', got 'page'"):
        a.pool_index("page")


@pytest.mark.parametrize("cls", [AVMPAllocator, StaticDualAllocator])
def test_alloc_into_and_free_from_need_no_sync_and_match_the_model(cls):
    """The capturable pair: results only in the returned status; a short pool or a bad handle
    changes nothing (the status says why)."""
    a, m = make(cls), AllocatorModel.like(make(cls))
    out = torch.full((5,), -7, dtype=torch.int32, device=DEVICE)
    status = a.alloc_into("ssm", out)
    assert status.tolist() == [0, 5, status.tolist()[2]] and status.device == a.arena.device
    assert out.tolist() == m.alloc("ssm", 5)
    assert_matches(m, a)

    before = raw_state(a)
    big = torch.full((a.stats().pools[a.pool_names[1]].free_units + 1,), -7, dtype=torch.int32, device=DEVICE)
    if big.numel() <= a.num_handles:
        assert int(a.alloc_into("ssm", big)[0]) != 0
        assert (big == -7).all()
        assert_same_raw(before, raw_state(a))

    bad = torch.cat([out[:2], out[:1]])  # a repeat: all or nothing
    assert int(a.free_from(bad)[0]) != 0
    assert_same_raw(before, raw_state(a))
    assert a.free_from(out).tolist()[0] == 0
    m.free(out.tolist())
    assert_matches(m, a)
    assert a.free_from(out[:0]).tolist() == [0, 0, 0]

    with pytest.raises(ValueError, match="kind must be 'kv' or 'ssm'"):
        a.alloc_into(None, out)
    with pytest.raises(TypeError, match="out must be torch.int32"):
        a.alloc_into("kv", out.long())


# ---------------------------------------------------------------------------------------- attention-free specs

# pure Mamba1: no KV page (0 B, 0 per slab); SSM block 96 + 128 = 224 B, 9 per slab, 32-B tail
SPEC_NO_ATTN = HybridModelSpec(
    name="tiny-mamba", num_attn_layers=0, num_kv_heads=0, head_dim=0, num_mamba_layers=1, mamba_version=1,
    d_inner=8, d_state=4, conv_dtype=torch.float32, ssm_dtype=torch.float32)
TWO_POOL = [AVMPAllocator, StaticDualAllocator]


def make_attention_free(cls=AVMPAllocator, slabs=5, **kw):
    return cls(SPEC_NO_ATTN, slabs * SLAB + ARENA_TAIL, device=DEVICE, slab_bytes=SLAB, **kw)


@pytest.mark.parametrize("cls", TWO_POOL)
def test_attention_free_arena_is_all_ssm_pool(cls):
    """The KV pool has a 0-byte unit and no slab, whatever split is asked for; the handle space is
    the SSM pool's alone; one slab is enough."""
    split = dict(kv_fraction=1.0) if cls is AVMPAllocator else dict(ssm_fraction=0.0)
    a = make_attention_free(cls, **split)
    m = AllocatorModel.like(a)
    assert a.unit_bytes == (0, 224) and a.units_per_slab == (0, 9) and (a.kv_page_raw, a.ssm_block_raw) == (0, 224)
    assert a.slab_owner.tolist() == [a.pool_index("ssm")] * 5
    assert a.num_handles == 5 * 9
    st = a.stats()
    assert st == m.stats()
    assert (st.pools["kv"].slabs, st.pools["kv"].units, st.pools["kv"].slab_tail_bytes) == (0, 0, 0)
    assert st.pools["ssm"].units == 45 and st.slab_tail_bytes == 5 * 32
    assert_matches(m, a)
    assert make_attention_free(cls, slabs=1).num_slabs == 1
    # the default slab size is sized by the SSM block alone
    b = cls(SPEC_NO_ATTN, 4 << 20, device=DEVICE)
    assert b.units_per_slab[0] == 0 and b.slab_bytes % 224 <= 0.01 * b.slab_bytes
    assert b.num_handles == b.num_slabs * b.units_per_slab[1]


@pytest.mark.parametrize("cls", TWO_POOL)
def test_attention_free_alloc_free_release_against_model(cls):
    gen = torch.Generator().manual_seed(41 + TWO_POOL.index(cls))
    a = make_attention_free(cls)
    m = AllocatorModel.like(a)
    units = Units(a, gen)
    R, W = 6, 3
    _, bt, npg = _tables(R, W)
    ssm = torch.full((R,), -1, dtype=torch.int32, device=DEVICE)
    m_bt, m_npg, m_ssm = [[-1] * W for _ in range(R)], [0] * R, [-1] * R
    for step in range(5):
        # a runner grows KV every step; for this spec the demand is always zero: nothing changes
        before, tables = raw_state(a), (bt.clone(), npg.clone())
        assert a.grow_kv(bt, npg, i32([0] * R)).tolist() == m.grow(m_bt, m_npg, [0] * R) == [0] * R
        assert_same_raw(before, raw_state(a))
        assert torch.equal(bt, tables[0]) and torch.equal(npg, tables[1])
        assert a.alloc_kv(0).shape == (0,)
        free = a.stats().pools["ssm"].free_units
        units.stamp(alloc_both(a, m, "ssm", min(free, int(torch.randint(1, 9, (1,), generator=gen)))), KIND_SSM)
        rows = [r for r in shuffled(range(R), gen) if m_ssm[r] < 0][:2]
        if rows and free > 10:
            hs = alloc_both(a, m, "ssm", len(rows))
            units.stamp(hs, KIND_SSM)
            for r, h in zip(rows, hs):
                ssm[r] = m_ssm[r] = h
        loose = [h for h in units.live() if h not in m_ssm]
        assert a.resolve(i32(loose)).tolist() == m.resolve(loose)
        drop = shuffled(loose, gen)[: len(loose) // 2]
        a.free(i32(drop), kind="ssm")
        m.free(drop, kind="ssm")
        units.forget(drop)
        # release rows whose block tables are empty (-1): only their SSM blocks go
        picked = shuffled(range(R), gen)[:2]
        freed = [m_ssm[r] for r in picked if m_ssm[r] >= 0]
        rows = shuffled(picked + [-1, -1], gen)
        status = a.release_rows(i32(rows), bt, npg, ssm)
        assert tuple(status.tolist()) == m.release(rows, m_bt, m_npg, m_ssm) == (0, -1, 0)
        units.forget(freed)
        assert bt.tolist() == m_bt and npg.tolist() == m_npg and ssm.tolist() == m_ssm
        assert_matches(m, a)
        units.verify()
    assert a.stats() == m.stats() and a.stats().live_kv == 0
    # a row that does ask for pages is refused (no capacity), as the model says, and nothing changes
    before = raw_state(a)
    assert a.grow_kv(bt, npg, i32([0, 2, 0, -1, 0, 0])).tolist() == m.grow(m_bt, m_npg, [0, 2, 0, -1, 0, 0]) \
        == [0, 7, 0, 6, 0, 0]
    assert_same_raw(before, raw_state(a))
    assert (bt == -1).all() and (npg == 0).all()


@pytest.mark.parametrize("cls", TWO_POOL)
def test_attention_free_refuses_kv_capacity_and_changes_nothing(cls):
    a = make_attention_free(cls)
    m = AllocatorModel.like(a)
    units = Units(a, torch.Generator().manual_seed(5))
    units.stamp(alloc_both(a, m, "ssm", 11), KIND_SSM)
    named = ("'tiny-mamba'", "no attention layers")
    expect_error(a, m, ValueError, lambda: a.alloc_kv(3), lambda: m.alloc("kv", 3), names=named + ("n=3",))
    expect_error(a, m, ValueError, lambda: a.make_room("kv", 2), lambda: m.make_room("kv", 2), names=named + ("n=2",))
    out = torch.full((2,), -7, dtype=torch.int32, device=DEVICE)
    expect_error(a, m, ValueError, lambda: a.alloc_into("kv", out), names=named + ("n=2",))
    assert (out == -7).all()
    if cls is AVMPAllocator:
        expect_error(a, m, ValueError, lambda: a.rebalance("kv", 1), lambda: m.rebalance("kv", 1), names=named + ("1 slab",))
    else:
        expect_error(a, m, PoolExhaustedError, lambda: a.rebalance("kv", 1), lambda: m.rebalance("kv", 1),
                     names=("never moves",))
    # zero KV demand is no request at all
    before = raw_state(a)
    a.make_room("kv", 0)
    m.make_room("kv", 0)
    assert a.alloc_into("kv", out[:0]).tolist() == [0, 0, 0]
    if cls is AVMPAllocator:
        a.rebalance("kv", 0)
        m.rebalance("kv", 0)
    assert_same_raw(before, raw_state(a))
    assert_matches(m, a)
    units.verify()


def test_attention_free_ssm_pool_cannot_grow_or_compact():
    """There is no other pool to take slabs from or hand them to: a full SSM pool is exhausted
    (AVMP finds nothing to move), and a fragmented one is never compacted; bytes stay put."""
    gen = torch.Generator().manual_seed(9)
    a = make_attention_free(AVMPAllocator, slabs=4)
    m = AllocatorModel.like(a)
    units = Units(a, gen)
    _fill_donor_scattered(a, m, units, gen, KIND_SSM)
    assert all(n > 0 for n in a.slab_live.tolist()), "every slab busy: a move would have to compact"
    expect_error(a, m, ValueError, lambda: a.rebalance("kv", 1), lambda: m.rebalance("kv", 1), names=("'tiny-mamba'",))
    expect_error(a, m, PoolExhaustedError, lambda: a.rebalance("ssm", 1), lambda: m.rebalance("ssm", 1),
                 names=("'kv' pool has 0 slab(s)",))
    units.stamp(alloc_both(a, m, "ssm", a.stats().pools["ssm"].free_units), KIND_SSM)
    expect_error(a, m, PoolExhaustedError, lambda: a.alloc_ssm(1), lambda: m.alloc("ssm", 1), names=("n=1", "'ssm'"))
    st = a.stats()
    assert (st.migrations, st.slabs_moved, st.units_moved, st.bytes_copied) == (0, 0, 0, 0)
    units.verify()


def test_attention_free_refusals_by_the_other_allocators():
    with pytest.raises(ValueError, match="PaddedUnifiedAllocator .*'tiny-mamba' has no attention layers"):
        PaddedUnifiedAllocator(SPEC_NO_ATTN, 5 * SLAB, device=DEVICE, slab_bytes=SLAB)
    from avmp_triton import VllmHybridAllocator
    with pytest.raises(ValueError, match="VllmHybridAllocator .*'tiny-mamba' has no attention layers"):
        VllmHybridAllocator(SPEC_NO_ATTN, 5 * SLAB, device=DEVICE, page_tokens=16, ssm_units=1, slab_bytes=SLAB)
    # the watermark policy would hand SSM slabs to a KV pool that can never fill them
    with pytest.raises(ValueError, match=r"proactive=\(0.1, 0.5\) .*'tiny-mamba' has no attention layers"):
        make_attention_free(AVMPAllocator, proactive=(0.1, 0.5))
