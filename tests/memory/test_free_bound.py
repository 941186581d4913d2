"""The host-side lower bound of free units (avmp_triton/memory/free_bound.py) that lets an alloc skip
its status read: it never exceeds the device's count, whatever the calls in between, and the
allocs that skip the read hand out what the reference model hands out."""
import pytest
import torch

from avmp_triton import AVMPAllocator, HybridModelSpec, PaddedUnifiedAllocator, StaticDualAllocator
from avmp_triton.memory.free_bound import FreeBound
from avmp_triton.memory.model import AllocatorModel, assert_matches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLAB = 2048
# page 16 tokens x 32 B = 512 B (4 per slab); SSM block 224 B (9 per slab)
SPEC = HybridModelSpec(
    name="tiny", num_attn_layers=1, num_kv_heads=1, head_dim=4, kv_dtype=torch.float32,
    num_mamba_layers=1, mamba_version=1, d_inner=8, d_state=4, conv_dtype=torch.float32, ssm_dtype=torch.float32)
R, W = 4, 6
ALLOCS = {
    "avmp-proactive": lambda: AVMPAllocator(SPEC, 8 * SLAB, device=DEVICE, slab_bytes=SLAB, migration_batch=2,
                                            proactive=(0.3, 0.6)),
    "avmp": lambda: AVMPAllocator(SPEC, 8 * SLAB, device=DEVICE, slab_bytes=SLAB, kv_fraction=0.25),
    "static": lambda: StaticDualAllocator(SPEC, 8 * SLAB, device=DEVICE, slab_bytes=SLAB),
    "unified": lambda: PaddedUnifiedAllocator(SPEC, 8 * SLAB, device=DEVICE, slab_bytes=SLAB),
}


def i32(xs) -> torch.Tensor:
    return torch.tensor([int(x) for x in xs], dtype=torch.int32, device=DEVICE)


def assert_bound_holds(a) -> None:
    tops = a.free_counts.tolist()  # a read of its own: it must not tighten the bound under test
    for p in range(len(a.pool_names)):
        assert not a._bound.covers(p, tops[p] + 1), f"pool {p}: the bound exceeds the {tops[p]} free units"
        assert tops[2] >= tops[p], "free handles >= free units of any pool (the bound relies on it)"


class Counting:
    """Counts the allocator's status reads (each one a host sync on a GPU)."""

    def __init__(self, a, monkeypatch):
        self.n, read = 0, a._read_status

        def counted():
            self.n += 1
            return read()

        monkeypatch.setattr(a, "_read_status", counted)


@pytest.mark.parametrize("name", sorted(ALLOCS))
def test_bound_stays_below_the_device_count_and_allocs_match_the_model(name, monkeypatch):
    a = ALLOCS[name]()
    m = AllocatorModel.like(a)
    reads = Counting(a, monkeypatch)
    gen = torch.Generator().manual_seed(11)
    live: list[int] = []
    bt = torch.full((R, W), -1, dtype=torch.int32, device=DEVICE)
    npg = torch.zeros(R, dtype=torch.int32, device=DEVICE)
    m_bt, m_npg = [[-1] * W for _ in range(R)], [0] * R
    skipped = 0
    for step in range(60):
        op = int(torch.randint(0, 6, (1,), generator=gen))
        if op <= 1:  # alloc, the call under test
            kind = ("kv", "ssm")[int(torch.randint(0, 2, (1,), generator=gen))]
            n = int(torch.randint(1, 6, (1,), generator=gen))
            before = reads.n
            try:
                got = (a.alloc_kv if kind == "kv" else a.alloc_ssm)(n).tolist()
            except Exception as e:  # noqa: BLE001
                with pytest.raises(type(e)):
                    m.alloc(kind, n)
                assert reads.n > before, "a failing alloc must have read its status"
            else:
                assert got == m.alloc(kind, n), f"step {step}: alloc({kind!r}, {n}) differs from the model"
                live += got
                skipped += reads.n == before
        elif op == 2 and live:  # free a random part
            perm = torch.randperm(len(live), generator=gen).tolist()
            drop = [live[i] for i in perm[: max(1, len(live) // 2)]]
            a.free(i32(drop))
            m.free(drop)
            live = [h for h in live if h not in drop]
        elif op == 3:  # grow every row by 0-2 pages (units leave behind the host's back)
            need = torch.randint(0, 3, (R,), generator=gen, dtype=torch.int32)
            need = torch.minimum(need, W - npg.cpu())
            failed = a.grow_kv(bt, npg, need.to(DEVICE))
            assert failed.tolist() == m.grow(m_bt, m_npg, need.tolist())
        elif op == 4:  # release two rows
            rows = torch.randperm(R, generator=gen)[:2].to(torch.int32)
            assert a.release_rows(rows.to(DEVICE), bt, npg).tolist()[0] == 0
            m.release(rows.tolist(), m_bt, m_npg)
        elif isinstance(a, AVMPAllocator):
            a.proactive_step()
            m.proactive_step()
        assert_bound_holds(a)
    assert_matches(m, a)
    assert skipped >= 5, f"only {skipped} allocs took the path without a status read"


def test_alloc_after_calls_the_host_cannot_count_reads_its_status(monkeypatch):
    a = ALLOCS["avmp"]()
    reads = Counting(a, monkeypatch)
    a.alloc_kv(2)
    a.alloc_ssm(3)
    assert reads.n == 0, "a fresh allocator knows its free units"
    bt = torch.full((2, 4), -1, dtype=torch.int32, device=DEVICE)
    npg = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    a.grow_kv(bt, npg, i32([1, 1]))
    a.alloc_ssm(1)
    assert reads.n == 0, "grow_kv takes KV pages only"
    a.alloc_kv(1)
    assert reads.n == 1, "after grow_kv the KV pool's count is unknown"
    a.alloc_kv(1)
    assert reads.n == 1, "the read told the exact count"
    a.rebalance("kv", 1)
    a.alloc_ssm(1)
    assert reads.n == 2, "a migration changes both pools"
    a.alloc_kv(1)
    assert reads.n == 2, "one read tells every pool's count"
    before = a.free_counts.tolist()
    out = torch.empty(before[0] + 1, dtype=torch.int32, device=DEVICE)
    assert int(a.alloc_into("kv", out)[0]) != 0  # refused: nothing taken, but the bound assumed the worst
    a.alloc_kv(before[0])
    assert reads.n == 3


def test_a_captured_call_that_takes_units_disables_the_bound_for_good(monkeypatch):
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    b = FreeBound(2, [10, 20, 40], capture_possible=True)
    assert b.covers(0, 10) and not b.covers(0, 11) and b.covers(1, 20)
    b.taken(0, 4)
    assert b.covers(0, 6) and not b.covers(0, 7)
    capturing[0] = True
    b.forget(0)  # e.g. grow_kv inside torch.cuda.graph
    b.taken(1, 1)  # alloc_into inside torch.cuda.graph
    capturing[0] = False
    b.learn([10, 20, 40])
    assert not b.covers(0, 1) and not b.covers(1, 1) and not b.in_use(0) and not b.in_use(1)
    b2 = FreeBound(2, [10, 20, 40], capture_possible=False)  # CPU: nothing can be captured
    capturing[0] = True
    b2.forget(0)
    b2.learn([3, 5, 9])
    assert b2.covers(0, 3) and b2.covers(1, 5) and not b2.covers(1, 6)


def test_a_syncing_free_reports_its_status_and_the_exact_tops(monkeypatch):
    """A free of up to free_one_program_max handles reads one report (status and tops) that its
    kernel wrote: the bound it learns is exact, and a bad handle is named with nothing changed."""
    from avmp_triton.memory.allocator import InvalidHandleError
    a = ALLOCS["avmp"]()
    reads = Counting(a, monkeypatch)
    kv = a.alloc_kv(3)
    bt = torch.full((1, 2), -1, dtype=torch.int32, device=DEVICE)
    a.grow_kv(bt, torch.zeros(1, dtype=torch.int32, device=DEVICE), i32([1]))  # the KV count is unknown now
    r0 = a.host_reads
    a.free(kv[:2])
    assert a.host_reads == r0 + 1 and reads.n == 0, "one read, the report, not the status buffer"
    a.alloc_kv(a.free_counts.tolist()[0])  # exactly what is free: the report's tops suffice
    assert reads.n == 0
    before = [t.clone() for t in a.decision_state()]
    with pytest.raises(InvalidHandleError, match=rf"handles\[1\]: handle {a.num_handles} "):
        a.free(torch.cat([kv[2:], i32([a.num_handles])]))
    assert all(torch.equal(x, y) for x, y in zip(before, a.decision_state())), "a refused free changed state"
    a.free(kv[2:])
    assert a.host_reads == r0 + 3 and reads.n == 0
    assert_bound_holds(a)
