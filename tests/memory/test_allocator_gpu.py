"""GPU-only allocator checks: offsets past 2^31, compaction at real unit sizes, CUDA-graph replay."""
import pytest
import torch

from avmp_triton import AVMPAllocator, PoolExhaustedError, StaticDualAllocator, get_preset

pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
def test_arena_over_4gib_offsets_and_compaction():
    spec = get_preset("jamba-1.5-mini")  # 256 KiB pages, 8.3 MiB blocks
    gen = torch.Generator(device="cuda").manual_seed(1234)
    alloc = AVMPAllocator(spec, 5 << 30, device="cuda", kv_fraction=0.9, migration_batch=1)
    assert alloc.arena.numel() > 2**32
    kv = alloc.alloc_kv(alloc.stats().pools["kv"].free_units)
    offsets = alloc.resolve(kv)
    assert int(offsets.max()) > 2**32, "the KV pool must reach past 4 GiB for this test"
    # stamp every page, free a scattered half, then force capacity into the SSM pool
    page = alloc.unit_bytes[0]
    data = torch.randint(0, 256, (kv.numel(), page), dtype=torch.uint8, device="cuda", generator=gen)
    alloc.arena.view(-1)[(offsets[:, None] + torch.arange(page, device="cuda")).flatten()] = data.flatten()
    perm = torch.randperm(kv.numel(), device="cuda", generator=gen)
    keep, drop = perm[: kv.numel() // 2], perm[kv.numel() // 2:]
    alloc.free(kv[drop])
    need = alloc.stats().pools["ssm"].free_units + 40
    blocks = alloc.alloc_ssm(need)
    st = alloc.stats()
    assert st.units_moved > 0 and st.bytes_copied == st.units_moved * page
    new_off = alloc.resolve(kv[keep])
    got = alloc.arena.view(-1)[(new_off[:, None] + torch.arange(page, device="cuda")).flatten()].view(-1, page)
    assert torch.equal(got, data[keep]), "compaction lost or overwrote live bytes"
    blk = alloc.resolve(blocks)
    every = torch.cat([new_off, blk]).sort()
    sizes = torch.cat([torch.full_like(new_off, page), torch.full_like(blk, alloc.unit_bytes[1])])[every.indices]
    assert bool((every.values[:-1] + sizes[:-1] <= every.values[1:]).all()), "live units overlap"
    alloc.free(torch.cat([kv[keep], blocks]))
    assert alloc.stats().handles_live == 0


@requires_cuda
def test_grow_release_cuda_graph_replay():
    spec = get_preset("nemotron-h-8b")
    alloc = AVMPAllocator(spec, 2 << 30, device="cuda", kv_fraction=0.6)
    R, W = 64, 128
    bt = torch.full((R, W), -1, dtype=torch.int32, device="cuda")
    npg = torch.zeros(R, dtype=torch.int32, device="cuda")
    need = torch.zeros(R, dtype=torch.int32, device="cuda")
    rows = torch.full((R,), -1, dtype=torch.int32, device="cuda")
    failed = torch.empty(R, dtype=torch.int32, device="cuda")
    status = torch.empty(3, dtype=torch.int64, device="cuda")
    # warm up (compiles, allocates the workspaces) before capture
    alloc.grow_kv(bt, npg, need, failed)
    alloc.release_rows(rows, bt, npg, status=status)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        alloc.grow_kv(bt, npg, need, failed)
        alloc.release_rows(rows, bt, npg, status=status)
    gen = torch.Generator().manual_seed(7)
    held = torch.zeros(R, dtype=torch.int64)
    for step in range(6):
        n = torch.randint(0, 4, (R,), generator=gen, dtype=torch.int32)
        n = torch.minimum(n, W - held.to(torch.int32))
        done = torch.randperm(R, generator=gen)[:8]
        rows_h = torch.full((R,), -1, dtype=torch.int32)
        rows_h[: done.numel()] = done.to(torch.int32)
        need.copy_(n)
        rows.copy_(rows_h)
        g.replay()
        torch.cuda.synchronize()
        assert int(status[0]) == 0
        assert int((failed != 0).sum()) == 0
        held += n.long()
        held[done] = 0
        assert torch.equal(npg.cpu().long(), held)
        valid = bt >= 0
        assert torch.equal(valid.sum(1).cpu(), held), "block table rows hold exactly num_pages handles"
        live = bt[valid]
        assert live.unique().numel() == live.numel()
        assert int((alloc.handle_kind[live.long()] == 1).sum()) == live.numel()
        assert alloc.stats().live_kv == int(held.sum())


@requires_cuda
def test_alloc_with_room_makes_no_host_sync_and_takes_the_fast_launch():
    from avmp_triton.kernels import alloc as K
    from avmp_triton.memory.launch import launcher
    from avmp_triton.memory.model import AllocatorModel, assert_matches

    alloc = AVMPAllocator(get_preset("nemotron-h-8b"), 1 << 30, device="cuda")
    model = AllocatorModel.like(alloc)
    for kind in ("kv", "ssm"):  # compiles, and keeps the kernels for counts of this class (not 1, not 16k)
        alloc.free((alloc.alloc_kv if kind == "kv" else alloc.alloc_ssm)(3))
        model.free(model.alloc(kind, 3))
    fast0 = launcher(K.alloc_kernel).launches_fast
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [alloc.alloc_kv(5), alloc.alloc_ssm(2), alloc.alloc_kv(4)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [g.tolist() for g in got] == [model.alloc("kv", 5), model.alloc("ssm", 2), model.alloc("kv", 4)]
    assert launcher(K.alloc_kernel).mode == "compiled" and launcher(K.alloc_kernel).launches_fast == fast0 + 3
    alloc.free(torch.cat(got))
    model.free(torch.cat(got).tolist())
    assert_matches(model, alloc)


@requires_cuda
def test_growth_captured_in_a_graph_retires_the_host_bound():
    """Replays take KV pages the host never sees: a later alloc must read its status, not trust
    the count it had before the capture."""
    spec = get_preset("nemotron-h-8b")
    alloc = StaticDualAllocator(spec, 1 << 30, ssm_fraction=0.5, device="cuda")
    free_kv = int(alloc.free_counts[0])
    R, W = 8, free_kv
    bt = torch.full((R, W), -1, dtype=torch.int32, device="cuda")
    npg = torch.zeros(R, dtype=torch.int32, device="cuda")
    need = torch.ones(R, dtype=torch.int32, device="cuda")
    failed = torch.empty(R, dtype=torch.int32, device="cuda")
    alloc.grow_kv(bt, npg, need, failed)  # warm up before capture
    alloc.alloc_kv(1)  # the bound is exact again after this read
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        alloc.grow_kv(bt, npg, need, failed)
    for _ in range((free_kv - R - 1) // R):
        g.replay()
    left = int(alloc.free_counts[0])
    assert left < R
    with pytest.raises(PoolExhaustedError, match=f"{left} free"):
        alloc.alloc_kv(left + 1)
    h = alloc.alloc_kv(left)
    held = torch.cat([bt[bt >= 0], h])
    assert held.unique().numel() == held.numel() == free_kv - 1
    assert int((alloc.handle_kind[held.long()] == 1).sum()) == held.numel()
