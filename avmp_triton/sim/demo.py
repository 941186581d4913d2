"""A short allocator demo (`python -m avmp_triton demo`).

Runs on the GPU when one is present, else on the CPU through Triton's interpreter, and prints
what it did: exact unit sizes, a batched allocation, a decode-step growth on the device, and a
capacity migration with compaction that keeps every live byte in place behind its handle.
"""
from __future__ import annotations

import time

import torch

from avmp_triton.memory.allocator import AVMPAllocator, PaddedUnifiedAllocator
from avmp_triton.spec import get_preset


def _mib(x: int) -> str:
    return f"{x / 2**20:.2f} MiB"


def run_demo(preset: str, slabs: int, device: str | None, seed: int = 0) -> bool:
    spec = get_preset(preset)
    gen = torch.Generator().manual_seed(seed)
    alloc = AVMPAllocator(spec, _capacity(spec, slabs), device=device, kv_fraction=0.75, migration_batch=1)
    dev = alloc.device
    print(f"spec {spec.name}: KV page {_mib(spec.kv_page_bytes)} ({spec.page_tokens} tokens x "
          f"{spec.num_attn_layers} attention layers), SSM block {_mib(spec.ssm_block_bytes)} "
          f"({spec.num_mamba_layers} Mamba{spec.mamba_version} layers)")
    print(f"arena {_mib(alloc.arena.numel())} on {dev}: {alloc.num_slabs} slabs of {_mib(alloc.slab_bytes)} "
          f"({alloc.units_per_slab[0]} pages or {alloc.units_per_slab[1]} block(s) each)")
    t0 = time.perf_counter()

    # 1. decode-style growth on the device: 8 requests get their prompt pages, no host sync
    rows, width = 8, 64
    block_table = torch.full((rows, width), -1, dtype=torch.int32, device=dev)
    num_pages = torch.zeros(rows, dtype=torch.int32, device=dev)
    need = torch.randint(1, 9, (rows,), generator=gen, dtype=torch.int32).to(dev)
    failed = alloc.grow_kv(block_table, num_pages, need)
    ssm = alloc.alloc_ssm(2)
    print(f"grow_kv: {rows} requests received {int(num_pages.sum())} pages in one launch "
          f"({int((failed != 0).sum())} refused); alloc_ssm(2) -> handles {ssm.tolist()}")

    # 2. fill the KV pool, stamp every live unit with random bytes, then free a random half of it
    kv = alloc.alloc_kv(alloc.stats().pools["kv"].free_units)
    kv = kv[torch.randperm(kv.numel(), generator=gen).to(dev)]
    keep, drop = kv[: kv.numel() // 2], kv[kv.numel() // 2:]
    live = torch.cat([keep, block_table[block_table >= 0], ssm])
    stamps = {}
    for h, o in zip(live.tolist(), alloc.resolve(live).tolist()):
        size = alloc.unit_bytes[0] if int(alloc.handle_kind[h]) == 1 else alloc.unit_bytes[1]
        stamps[h] = torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8).to(dev)
        alloc.arena[o:o + size] = stamps[h]
    alloc.free(drop)
    before = alloc.stats()
    print(f"KV pool: {before.pools['kv'].used_units} of {before.pools['kv'].units} pages live, scattered over "
          f"{before.pools['kv'].slabs} slabs ({before.pools['kv'].free_slabs} completely free)")

    # 3. ask for more SSM blocks than the SSM pool has: capacity must move, live pages must move
    want = before.pools["ssm"].free_units + 2 * alloc.units_per_slab[1]
    extra = alloc.alloc_ssm(want)
    after = alloc.stats()
    print(f"alloc_ssm({want}) with {before.pools['ssm'].free_units} free: {after.slabs_moved} slabs moved KV -> SSM, "
          f"{after.units_moved} live pages compacted ({_mib(after.bytes_copied)} copied on the device)")
    moved_ok = all(
        torch.equal(alloc.arena[o:o + stamps[h].numel()], stamps[h])
        for h, o in zip(live.tolist(), alloc.resolve(live).tolist()))
    print(f"every live unit's bytes intact behind its unchanged handle: {moved_ok}")
    alloc.free(torch.cat([extra, ssm, keep]))
    status = alloc.release_rows(torch.arange(rows, dtype=torch.int32, device=dev), block_table, num_pages)
    alloc.check_status(status)
    end = alloc.stats()
    print(f"released everything: {end.handles_live} live handles left")

    padded = PaddedUnifiedAllocator(spec, alloc.capacity_bytes, device=dev)
    print(f"the same arena padded to one unit size ({_mib(padded.unit_bytes[0])}) holds "
          f"{padded.stats().pools['unified'].units} units in all; AVMP holds {after.pools['kv'].units} pages + "
          f"{after.pools['ssm'].units} blocks now, and can move capacity either way")
    print(f"done in {time.perf_counter() - t0:.2f} s")
    return moved_ok and end.handles_live == 0


def _capacity(spec, slabs: int) -> int:
    from avmp_triton.memory.allocator import default_slab_bytes
    page = spec.kv_page_bytes
    return slabs * default_slab_bytes(sorted({page, spec.ssm_block_bytes}))
