"""Stateful property test: random call sequences on the device allocator and the reference model.

After every step: the model and the device agree on every state tensor; every live unit still holds
the random bytes written when it was allocated (compaction moves them, nothing may lose or overwrite
them); no two live units overlap; the accounting adds up. Every failing call (PoolExhaustedError,
InvalidHandleError, a refused release) must change nothing at all.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

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
KIND_NAME = {KIND_KV: "kv", KIND_SSM: "ssm"}
# the two odd geometries of test_allocator.py: page > block (512 / 224 B), block > page (48 / 512 B)
GEOMS = {
    "page>block": (HybridModelSpec(
        name="tiny", num_attn_layers=1, num_kv_heads=1, head_dim=4, kv_dtype=torch.float32,
        num_mamba_layers=1, mamba_version=1, d_inner=8, d_state=4, conv_dtype=torch.float32,
        ssm_dtype=torch.float32), 16),
    "block>page": (HybridModelSpec(
        name="tiny-big-ssm", num_attn_layers=1, num_kv_heads=1, head_dim=5, kv_dtype=torch.float16,
        num_mamba_layers=1, mamba_version=1, d_inner=10, d_state=11, conv_dtype=torch.bfloat16,
        ssm_dtype=torch.float32), 2),
}
# pure Mamba1 (no attention layer): a 0-byte KV unit, SSM blocks of 224 B
SPEC_NO_ATTN = HybridModelSpec(
    name="tiny-mamba", num_attn_layers=0, num_kv_heads=0, head_dim=0, num_mamba_layers=1, mamba_version=1,
    d_inner=8, d_state=4, conv_dtype=torch.float32, ssm_dtype=torch.float32)
R, W = 4, 3  # block table of the grow / release rules


def i32(xs) -> torch.Tensor:
    return torch.tensor([int(x) for x in xs], dtype=torch.int32, device=DEVICE)


def outcome(call):
    """(result, exception) of a call; any exception type counts, so a wrong one is caught below."""
    try:
        return call(), None
    except Exception as e:  # noqa: BLE001
        return None, e


class AllocatorMachine(RuleBasedStateMachine):
    """alloc / free / resolve / rebalance / make_room / grow / release on one allocator and the model."""

    cls = AVMPAllocator

    def __init__(self):
        super().__init__()
        self.a = None

    # ------------------------------------------------------------------ set-up
    @initialize(geom=st.sampled_from(sorted(GEOMS)), slabs=st.integers(4, 8),
                fraction=st.sampled_from([0.25, 0.5, 0.75]), batch=st.sampled_from([1, 2, 16]),
                seed=st.integers(0, 2**31 - 1))
    def build(self, geom, slabs, fraction, batch, seed):
        self.setup(*GEOMS[geom], slabs, fraction, batch, seed)

    def setup(self, spec, page_tokens, slabs, fraction, batch, seed):
        kw = dict(device=DEVICE, slab_bytes=SLAB, page_tokens=page_tokens)
        if self.cls is AVMPAllocator:
            kw.update(kv_fraction=fraction, migration_batch=batch)
        elif self.cls is StaticDualAllocator:
            kw.update(ssm_fraction=fraction)
        self.a = self.cls(spec, slabs * SLAB + 100, **kw)
        self.m = AllocatorModel.like(self.a)
        self.gen = torch.Generator().manual_seed(seed)
        self.bytes: dict[int, torch.Tensor] = {}  # live handle -> the bytes written into its unit
        self.kind: dict[int, int] = {}
        self.loose: list[int] = []                # handles from alloc (the free rule may free them)
        self.bt = torch.full((R, W), -1, dtype=torch.int32, device=DEVICE)
        self.npg = torch.zeros(R, dtype=torch.int32, device=DEVICE)
        self.ssm = torch.full((R,), -1, dtype=torch.int32, device=DEVICE)
        self.m_bt, self.m_npg, self.m_ssm = [[-1] * W for _ in range(R)], [0] * R, [-1] * R

    # ------------------------------------------------------------------ helpers
    def unit(self, kind: int) -> int:
        return self.a.unit_bytes[self.a.pool_index(KIND_NAME[kind])]

    def stamp(self, handles, kind: int) -> None:
        if not handles:
            return
        size = self.unit(kind)
        off = self.a.resolve(i32(handles), kind=KIND_NAME[kind])
        data = torch.randint(0, 256, (len(handles), size), dtype=torch.uint8, generator=self.gen).to(DEVICE)
        self.a.arena[(off[:, None] + torch.arange(size, device=DEVICE)).flatten()] = data.flatten()
        for h, row in zip(handles, data):
            assert h not in self.bytes, f"live handle {h} handed out again"
            self.bytes[h], self.kind[h] = row, kind

    def forget(self, handles) -> None:
        for h in handles:
            del self.bytes[h], self.kind[h]

    def snapshot(self):
        return (device_state(self.a), self.a.arena.clone(), self.a.stats(),
                self.bt.clone(), self.npg.clone(), self.ssm.clone())

    def assert_unchanged(self, before) -> None:
        after = self.snapshot()
        assert after[0] == before[0], "a failing call changed the state tensors"
        assert torch.equal(after[1], before[1]), "a failing call wrote into the arena"
        assert after[2] == before[2], "a failing call changed the stats"
        assert all(torch.equal(x, y) for x, y in zip(after[3:], before[3:])), "a failing call changed the rows"

    def both(self, device_call, model_call, allowed):
        """Run model and device; same result or same exception (type and message); errors change nothing."""
        before = self.snapshot()
        model_state = self.m.state()
        moved = self.m.units_moved
        want, want_err = outcome(model_call)
        if self.m.units_moved > moved:
            event("compaction moved live units")
        if want_err is not None:
            event(f"refused: {type(want_err).__name__}")
        got, got_err = outcome(device_call)
        assert type(got_err) is type(want_err), f"device raised {got_err!r}, model {want_err!r}"
        if want_err is not None:
            assert isinstance(want_err, allowed), f"unexpected {want_err!r}"
            assert str(got_err) == str(want_err)
            assert self.m.state() == model_state
            self.assert_unchanged(before)
        return got, want, want_err

    def kv_refused(self, kind, err) -> bool:
        """An attention-free spec refuses every request for KV capacity (and names itself)."""
        return kind == "kv" and not self.a.spec.num_attn_layers and "has no KV pool" in str(err)

    def free_handles(self):
        return [h for h in range(self.a.num_handles) if self.m.kinds[h] == 0]

    # ------------------------------------------------------------------ rules
    @rule(kind=st.sampled_from(["kv", "ssm"]), n=st.one_of(st.integers(0, 12), st.integers(0, 70)))
    def alloc(self, kind, n):
        k = KIND_KV if kind == "kv" else KIND_SSM
        got, want, err = self.both(lambda: (self.a.alloc_kv if k == KIND_KV else self.a.alloc_ssm)(n),
                                   lambda: self.m.alloc(kind, n), (PoolExhaustedError, ValueError))
        if isinstance(err, ValueError):
            assert (n > self.a.num_handles or self.kv_refused(kind, err)) and str(n) in str(err)
        if err is None:
            assert got.tolist() == want
            self.stamp(want, k)
            self.loose += want

    @rule(data=st.data(), only=st.sampled_from([None, "kv", "ssm"]),
          bad=st.sampled_from([None, None, "range", "free", "dup", "wrong_kind"]))
    def free(self, data, only, bad):
        pool = [h for h in self.loose if only is None or KIND_NAME[self.kind[h]] == only]
        handles = data.draw(st.permutations(pool))[: data.draw(st.integers(0, len(pool)))]
        intruder = None
        if bad == "range":
            intruder = data.draw(st.sampled_from([-1, -7, self.a.num_handles, self.a.num_handles + 3]))
        elif bad == "free" and self.free_handles():
            intruder = data.draw(st.sampled_from(self.free_handles()))  # never allocated or freed
        elif bad == "dup" and handles:
            intruder = data.draw(st.sampled_from(handles))
        elif bad == "wrong_kind" and only is not None:
            other = [h for h in self.loose if KIND_NAME[self.kind[h]] != only]
            if other:
                intruder = data.draw(st.sampled_from(other))
        if intruder is not None:
            handles.insert(data.draw(st.integers(0, len(handles))), intruder)
        _, _, err = self.both(lambda: self.a.free(i32(handles), kind=only), lambda: self.m.free(handles, kind=only),
                              InvalidHandleError)
        assert (err is not None) == (intruder is not None), f"free of {handles} (bad: {bad}) gave {err!r}"
        if err is None:
            self.forget(handles)
            gone = set(handles)
            self.loose = [h for h in self.loose if h not in gone]
        else:
            assert f"handle {intruder}" in str(err)

    @rule(kind=st.sampled_from(["kv", "ssm"]), data=st.data())
    def fragment(self, kind, data):
        """Fill the pool of ``kind``, then free a scattered share of it while every slab keeps a
        live unit: the next move out of this pool has to compact."""
        k = KIND_KV if kind == "kv" else KIND_SSM
        n = len(self.m.unit_stacks[self.m.pool_of[k]])
        got = (self.a.alloc_kv if k == KIND_KV else self.a.alloc_ssm)(n)
        assert got.tolist() == self.m.alloc(kind, n)
        self.stamp(got.tolist(), k)
        drop = data.draw(st.permutations(got.tolist()))[: data.draw(st.integers(0, n))]
        slab_of = {h: self.m.table[h] // SLAB for h in got.tolist()}
        for s in set(slab_of.values()):
            mine = [h for h in drop if slab_of[h] == s]
            if len(mine) == sum(1 for h in slab_of if slab_of[h] == s):
                drop.remove(mine[0])
        self.a.free(i32(drop))
        self.m.free(drop)
        self.forget(drop)
        self.loose += [h for h in got.tolist() if h not in set(drop)]

    @precondition(lambda self: self.loose)
    @rule(data=st.data(), only=st.sampled_from([None, "kv", "ssm"]))
    def resolve(self, data, only):
        handles = data.draw(st.lists(st.sampled_from(self.loose), min_size=1, max_size=12))  # repeats allowed
        got, want, err = self.both(lambda: self.a.resolve(i32(handles), kind=only),
                                   lambda: self.m.resolve(handles, kind=only), InvalidHandleError)
        if err is None:
            assert got.tolist() == want
        else:
            assert only is not None and any(KIND_NAME[self.kind[h]] != only for h in handles)

    @rule(to_kind=st.sampled_from(["kv", "ssm"]), num_slabs=st.one_of(st.integers(1, 2), st.integers(0, 4)))
    def rebalance(self, to_kind, num_slabs):
        _, _, err = self.both(lambda: self.a.rebalance(to_kind, num_slabs),
                              lambda: self.m.rebalance(to_kind, num_slabs), (PoolExhaustedError, ValueError))
        assert not isinstance(err, ValueError) or self.kv_refused(to_kind, err) or num_slabs > self.a.num_slabs

    @rule(to_kind=st.sampled_from(["kv", "ssm"]), data=st.data())
    def squeeze(self, to_kind, data):
        """Move in as many slabs as the donor can possibly give (compacting when none is free)."""
        if not self.m.migrates:
            return
        d = 1 - self.m.pool_of[KIND_KV if to_kind == "kv" else KIND_SSM]
        donor = [s for s in range(self.m.num_slabs) if self.m.slab_owner[s] == d]
        live = sum(self.m.slab_live[s] for s in donor)
        most = len(donor) - -(-live // self.m.units_per_slab[d]) if donor else 0
        if most >= 1 and not (to_kind == "kv" and not self.a.spec.num_attn_layers):
            k = data.draw(st.integers(1, most))
            self.both(lambda: self.a.rebalance(to_kind, k), lambda: self.m.rebalance(to_kind, k), ())
            assert self.m.stats().pools[self.m.pool_names[d]].slabs == len(donor) - k

    @rule(kind=st.sampled_from(["kv", "ssm"]), n=st.integers(0, 60))
    def make_room(self, kind, n):
        _, _, err = self.both(lambda: self.a.make_room(kind, n), lambda: self.m.make_room(kind, n),
                              (PoolExhaustedError, ValueError))
        if isinstance(err, ValueError):
            assert (n > self.a.num_handles or self.kv_refused(kind, err)) and str(n) in str(err)

    @rule(need=st.lists(st.integers(-1, 3), min_size=R, max_size=R))
    def grow(self, need):
        before = set(h for row in self.m_bt for h in row if h >= 0)
        failed = self.a.grow_kv(self.bt, self.npg, i32(need))
        assert failed.tolist() == self.m.grow(self.m_bt, self.m_npg, need)
        assert self.bt.tolist() == self.m_bt and self.npg.tolist() == self.m_npg
        self.stamp([h for row in self.m_bt for h in row if h >= 0 and h not in before], KIND_KV)

    @rule(row=st.integers(0, R - 1))
    def attach_ssm(self, row):
        if self.m_ssm[row] >= 0:
            return
        got, want, err = self.both(lambda: self.a.alloc_ssm(1), lambda: self.m.alloc("ssm", 1), PoolExhaustedError)
        if err is None:
            assert got.tolist() == want
            self.stamp(want, KIND_SSM)
            self.ssm[row] = self.m_ssm[row] = want[0]

    @rule(rows=st.lists(st.integers(-1, R), max_size=6), with_ssm=st.booleans())
    def release(self, rows, with_ssm):
        before = self.snapshot()
        ssm_dev, ssm_model = (self.ssm, self.m_ssm) if with_ssm else (None, None)
        freed = [h for r in dict.fromkeys(rows) if 0 <= r < R for h in self.m_bt[r][: self.m_npg[r]]]
        if with_ssm:
            freed += [self.m_ssm[r] for r in dict.fromkeys(rows) if 0 <= r < R and self.m_ssm[r] >= 0]
        status = self.a.release_rows(i32(rows), self.bt, self.npg, ssm_dev)
        want = self.m.release(rows, self.m_bt, self.m_npg, ssm_model)
        assert tuple(status.tolist()) == want
        if want[0] == 0:
            self.a.check_status(status)
            self.forget(freed)
        else:
            expected = ValueError if want[0] in (5, 6) else InvalidHandleError
            with pytest.raises(expected):
                self.a.check_status(status)
            self.assert_unchanged(before)
            nonempty = [r for r in rows if 0 <= r < R and (self.m_npg[r] or (with_ssm and self.m_ssm[r] >= 0))]
            assert R in rows or len(set(nonempty)) < len(nonempty), f"a valid release was refused: {want}"
        assert self.bt.tolist() == self.m_bt and self.npg.tolist() == self.m_npg and self.ssm.tolist() == self.m_ssm

    # ------------------------------------------------------------------ after every step
    @invariant()
    def agrees_with_model(self):
        if self.a is None:
            return
        assert_matches(self.m, self.a)
        self.m.check_invariants()
        assert sorted(self.bytes) == self.m.live_handles()

    @invariant()
    def live_bytes_intact_and_disjoint(self):
        if self.a is None or not self.bytes:
            return
        spans = []
        for kind in (KIND_KV, KIND_SSM):
            hs = [h for h in self.bytes if self.kind[h] == kind]
            if not hs:
                continue
            hs = [hs[i] for i in torch.randperm(len(hs), generator=self.gen).tolist()]
            size = self.unit(kind)
            off = self.a.resolve(i32(hs), kind=KIND_NAME[kind])
            got = self.a.arena[(off[:, None] + torch.arange(size, device=DEVICE)).flatten()].view(len(hs), size)
            want = torch.stack([self.bytes[h] for h in hs])
            bad = (got != want).any(1).nonzero().flatten().tolist()
            assert not bad, f"bytes of live handles {[hs[i] for i in bad]} were lost or overwritten"
            spans += [(o, size) for o in off.tolist()]
        spans.sort()
        for (o1, s1), (o2, _) in zip(spans, spans[1:]):
            assert o1 + s1 <= o2, f"live units at {o1} and {o2} overlap"
        assert all(o % SLAB + s <= SLAB for o, s in spans), "a unit crosses a slab boundary"

    @invariant()
    def free_bound_is_a_lower_bound(self):
        """The host bound that lets an alloc skip its status read never promises units the pool lacks."""
        if self.a is None:
            return
        tops = self.a.free_counts.tolist()
        for p in range(len(self.a.pool_names)):
            assert not self.a._bound.covers(p, tops[p] + 1), f"pool {p} has {tops[p]} free units"

    @invariant()
    def accounting_adds_up(self):
        if self.a is None:
            return
        st_ = self.a.stats()
        assert st_ == self.m.stats()
        assert st_.handles_live == st_.live_kv + st_.live_ssm == len(self.bytes)
        assert st_.live_kv == sum(1 for k in self.kind.values() if k == KIND_KV)
        assert sum(p.slabs for p in st_.pools.values()) == self.a.num_slabs
        assert sum(p.used_units for p in st_.pools.values()) == st_.handles_live
        for p in st_.pools.values():
            assert p.used_units + p.free_units == p.units == p.slabs * p.units_per_slab
        unit_kv, unit_ssm = self.unit(KIND_KV), self.unit(KIND_SSM)
        assert st_.padding_bytes == (st_.live_kv * (unit_kv - self.a.kv_page_raw)
                                     + st_.live_ssm * (unit_ssm - self.a.ssm_block_raw))
        lo, hi = sorted((unit_kv, unit_ssm))
        assert st_.units_moved * lo <= st_.bytes_copied <= st_.units_moved * hi
        if self.cls is not AVMPAllocator:
            assert st_.migrations == st_.slabs_moved == st_.units_moved == 0


# Shrinking a failing run takes minutes in the interpreter on 2 cores; the unshrunk run (at most 30
# steps, each checked against the model) is printed either way. AVMP_SHRINK=1 asks for a minimal one.
_PHASES = list(Phase) if os.environ.get("AVMP_SHRINK") == "1" else [p for p in Phase if p != Phase.shrink]
_FAST = dict(deadline=None, suppress_health_check=list(HealthCheck), phases=_PHASES)

TestAVMPAllocatorStateful = AllocatorMachine.TestCase
TestAVMPAllocatorStateful.settings = settings(max_examples=35, stateful_step_count=30, **_FAST)


class StaticDualMachine(AllocatorMachine):
    cls = StaticDualAllocator


class PaddedUnifiedMachine(AllocatorMachine):
    cls = PaddedUnifiedAllocator


class AttentionFreeMachine(AllocatorMachine):
    """AVMP on a pure Mamba spec: every slab is the SSM pool's, KV demand is refused or fails."""

    @initialize(slabs=st.integers(1, 6), fraction=st.sampled_from([0.0, 0.5, 1.0]), batch=st.sampled_from([1, 16]),
                seed=st.integers(0, 2**31 - 1))
    def build(self, slabs, fraction, batch, seed):
        self.setup(SPEC_NO_ATTN, 16, slabs, fraction, batch, seed)

    @invariant()
    def kv_pool_stays_empty(self):
        if self.a is not None:
            assert self.a.stats().pools["kv"].slabs == 0 and not self.m.unit_stacks[0]


TestStaticDualAllocatorStateful = StaticDualMachine.TestCase
TestStaticDualAllocatorStateful.settings = settings(max_examples=10, stateful_step_count=20, **_FAST)
TestPaddedUnifiedAllocatorStateful = PaddedUnifiedMachine.TestCase
TestPaddedUnifiedAllocatorStateful.settings = settings(max_examples=10, stateful_step_count=20, **_FAST)
TestAttentionFreeAllocatorStateful = AttentionFreeMachine.TestCase
TestAttentionFreeAllocatorStateful.settings = settings(max_examples=15, stateful_step_count=25, **_FAST)
