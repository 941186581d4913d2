"""Allocator microbenchmark (GPU): batched alloc+free, device-side growth/release, compaction.

Measures, all on one GPU in one run:
- device time (CUDA graph replay, do_bench median) of one batched alloc + one batched free,
  n in 1, 16, 256, 4096, for AVMP and both baselines (same kernels, different policy);
- host time per Python-API call (alloc_kv + free, each launching once and syncing once), beside
  the same launches without a status read and one status read alone;
- device time of grow_kv (one page per row) + release_rows for 256 requests;
- compaction throughput: the unit-copy kernel's device time (profiler) inside a rebalance that
  moves M MiB of scattered live pages, against a plain torch device copy of the same number of
  bytes (contiguous), and the whole rebalance call.

Writes JSON to --out (default perf/results/bench_alloc_<gpu>.json) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import time

import torch
import triton
import triton.testing

from avmp_triton import AVMPAllocator, PaddedUnifiedAllocator, StaticDualAllocator, get_preset


def _median_ms(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


GRAPH_REPS = 20


def _per_call_us(fn):
    """Device time of ``fn`` in us: GRAPH_REPS calls captured in one CUDA graph, replay median / reps."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(GRAPH_REPS):
            fn()
    return _median_ms(g.replay) * 1e3 / GRAPH_REPS


def _kernel_means_us(fn, iters=50):
    """Mean device time per launch of each Triton kernel in ``fn``, from the profiler's CUDA events."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / e.count for e in prof.key_averages()
            if e.key.endswith("_kernel") and e.count}


def bench_alloc_free(spec, capacity, make, ns, *, one_program: bool = False):
    """``one_program``: every free in one single-program launch (the path below
    ``free_one_program_max``), to time it beside the two-launch path of large frees."""
    rows = []
    for name, ctor in make.items():
        alloc = ctor(spec, capacity)
        if one_program:
            alloc.free_one_program_max = 1 << 30
            name += " (free: one program)"
        # half-full pools, scattered: the realistic state for a serving allocator
        pre = alloc.alloc_kv(alloc.stats().pools[alloc.pool_names[0]].free_units // 2)
        alloc.free(pre[torch.randperm(pre.numel(), device="cuda")[: pre.numel() // 2]].contiguous())
        for n in ns:
            out = torch.empty(n, dtype=torch.int32, device="cuda")

            def pair():
                alloc.alloc_into("kv", out)
                return alloc.free_from(out)

            dev_us = _per_call_us(pair)
            assert int(pair()[0]) == 0, "benchmark pair failed"
            per_kernel = _kernel_means_us(pair)
            # host time of the Python API: each call launches once and syncs once
            for _ in range(5):
                alloc.free(alloc.alloc_kv(n))
            reps = 200
            t0 = time.perf_counter()
            for _ in range(reps):
                alloc.free(alloc.alloc_kv(n))
            host_us = (time.perf_counter() - t0) / reps * 1e6
            rows.append(dict(allocator=name, n=n, device_us_alloc_plus_free=dev_us,
                             host_us_python_alloc_plus_free=host_us, **_host_parts_us(pair, reps),
                             profiler_mean_us_per_kernel=per_kernel))
        alloc = None
        torch.cuda.empty_cache()
    return rows


def _host_parts_us(pair, reps: int) -> dict:
    """What the Python pair's host time is made of: the two launches alone (no status read, the
    queue absorbs them) and one read of the status buffer on an idle GPU (the sync each call makes)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        status = pair()
    launch_us = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        status.tolist()
    return dict(host_us_launches_only=launch_us, host_us_status_read=(time.perf_counter() - t0) / reps * 1e6)


def bench_grow_release(spec, capacity, R=256, W=512):
    """One decode step's allocator work for R requests: +1 page each, then release of every row."""
    alloc = AVMPAllocator(spec, capacity, device="cuda")
    bt = torch.full((R, W), -1, dtype=torch.int32, device="cuda")
    npg = torch.zeros(R, dtype=torch.int32, device="cuda")
    ones = torch.ones(R, dtype=torch.int32, device="cuda")
    rows = torch.arange(R, dtype=torch.int32, device="cuda")
    failed = torch.empty(R, dtype=torch.int32, device="cuda")
    status = torch.empty(3, dtype=torch.int64, device="cuda")

    def step():
        alloc.grow_kv(bt, npg, ones, failed)
        alloc.release_rows(rows, bt, npg, status=status)

    us = _per_call_us(step)
    torch.cuda.synchronize()
    assert int(status[0]) == 0 and int(failed.sum()) == 0
    return dict(requests=R, width=W, device_us_grow_plus_release=us,
                note="grow_kv(+1 page for each of R rows) then release_rows(all R rows)")


def _scattered_half_live(spec, mib):
    """An allocator whose KV slabs are each about half live, scattered, so that emptying enough
    slabs for the SSM pool moves about ``mib`` MiB of pages; returns (allocator, slabs to move)."""
    probe = AVMPAllocator(spec, 1 << 30, device="cuda")
    page, slab, ups = probe.unit_bytes[0], probe.slab_bytes, probe.units_per_slab[0]
    del probe
    n_moves = (mib << 20) // page
    victims = math.ceil(1.3 * n_moves / (ups // 2))  # margin: live counts per slab vary
    kv_slabs = 3 * victims + 2
    alloc = AVMPAllocator(spec, (kv_slabs + 2) * slab, device="cuda", kv_fraction=kv_slabs / (kv_slabs + 2),
                          migration_batch=1)
    kv = alloc.alloc_kv(alloc.stats().pools["kv"].free_units)
    alloc.arena.random_(0, 256)
    alloc.free(kv[torch.randperm(kv.numel(), device="cuda")[: kv.numel() // 2]].contiguous())
    torch.cuda.synchronize()
    return alloc, victims


def _rebalance_wall_ms(spec, mib) -> float:
    """Wall time of one rebalance call on a fresh allocator, synchronised before and after, with
    no profiler attached (starting CUPTI alone costs milliseconds)."""
    alloc, victims = _scattered_half_live(spec, mib)
    t0 = time.perf_counter()
    alloc.rebalance("ssm", victims)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def _rebalance_device_ms(spec, mib):
    """(move_units_kernel ms, every kernel of the call ms, units moved, unit bytes) of one rebalance
    on a fresh allocator, from the profiler."""
    alloc, victims = _scattered_half_live(spec, mib)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        alloc.rebalance("ssm", victims)
        torch.cuda.synchronize()
    ev = prof.key_averages()
    copy = sum(e.device_time_total for e in ev if e.key == "move_units_kernel") / 1e3
    total = sum(e.device_time_total for e in ev) / 1e3
    return copy, total, alloc.stats().units_moved, alloc.unit_bytes[0]


def bench_compaction(spec, mib_list, reps=3):
    """Rebalances that compact M MiB of scattered live pages: the copy kernel's device time inside
    them (profiler; median of ``reps`` fresh allocators) against a torch copy of as many bytes, and
    the wall time of the whole call timed apart from the profiler, whose host part is the call's
    wall time less the device time of everything it ran."""
    warm, victims = _scattered_half_live(spec, 1)
    warm.rebalance("ssm", victims)  # compiles every migration kernel before anything is timed
    rows = []
    for mib in mib_list:
        dev = [_rebalance_device_ms(spec, mib) for _ in range(reps)]
        torch.cuda.empty_cache()
        walls = [_rebalance_wall_ms(spec, mib) for _ in range(reps)]
        torch.cuda.empty_cache()
        kern = [d[0] for d in dev]
        kern_ms, dev_ms = statistics.median(kern), statistics.median(d[1] for d in dev)
        call_ms = statistics.median(walls)
        moved, page = dev[0][2], dev[0][3]
        nbytes = moved * page
        a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        a.random_(0, 256)
        copy_ms = _median_ms(lambda: b.copy_(a))
        rows.append(dict(mib_moved=nbytes / 2**20, units=moved, unit_bytes=page, kernel_ms=kern_ms,
                         kernel_ms_all=kern, device_ms_all_kernels=dev_ms, torch_copy_ms=copy_ms,
                         kernel_gbps=2 * nbytes / kern_ms / 1e6, torch_copy_gbps=2 * nbytes / copy_ms / 1e6,
                         ratio_vs_copy=copy_ms / kern_ms, rebalance_call_ms=call_ms, rebalance_call_ms_all=walls,
                         host_ms=call_ms - dev_ms,
                         note="GB/s count bytes read + written; kernel_ms: move_units_kernel's device time "
                              "inside the rebalance (profiler); device_ms_all_kernels: every device op of the "
                              "call; rebalance_call_ms: wall time of the whole rebalance (plan, drop, collect, "
                              "copy, adopt), synchronised, without the profiler, compiled beforehand; host_ms: "
                              "the call's wall time less its device time"))
        a = b = None
        torch.cuda.empty_cache()
    return rows


def _commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return os.environ.get("AVMP_COMMIT", "unknown")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="jamba-1.5-mini")
    ap.add_argument("--capacity-gib", type=float, default=8.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_alloc needs a CUDA GPU: it reports device time or nothing")
    spec = get_preset(args.spec)
    capacity = int(args.capacity_gib * 2**30)
    make = {
        "avmp": lambda s, c: AVMPAllocator(s, c, device="cuda"),
        "static_dual_0.5": lambda s, c: StaticDualAllocator(s, c, ssm_fraction=0.5, device="cuda"),
        "padded_unified": lambda s, c: PaddedUnifiedAllocator(s, c, device="cuda"),
    }
    ns = [1, 16, 256, 4096]
    res = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        commit=_commit(), spec=spec.name, capacity_bytes=capacity,
        alloc_free=bench_alloc_free(spec, capacity, {k: v for k, v in make.items() if k != "padded_unified"}, ns)
        # the padded pool's unit is a whole SSM block: it needs a bigger arena to hold n=4096 units
        + bench_alloc_free(spec, 48 << 30, {"padded_unified": make["padded_unified"]}, ns),
        free_one_program=bench_alloc_free(spec, capacity, {"avmp": make["avmp"]}, [n for n in ns if n > 1024],
                                          one_program=True),
        grow_release=bench_grow_release(spec, capacity),
        compaction=bench_compaction(spec, [64, 256, 1024]),
    )
    out = args.out or f"perf/results/bench_alloc_{res['gpu'].replace(' ', '_')}.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"GPU {res['gpu']}  torch {res['torch']}  triton {res['triton']}  commit {res['commit'][:10]}")
    print(f"{'allocator':18s} {'n':>5s} {'pair us':>8s} {'alloc us':>9s} {'free us':>8s} {'host us':>8s} "
          f"{'launch us':>9s} {'read us':>8s}   (device: graph median of the pair; per kernel: profiler mean; "
          "host: the Python pair, its launches alone, one status read)")
    for r in res["alloc_free"] + res["free_one_program"]:
        k = r["profiler_mean_us_per_kernel"]
        free_us = sum(v for name, v in k.items() if name.startswith("free")) if k else float("nan")
        print(f"{r['allocator']:18s} {r['n']:5d} {r['device_us_alloc_plus_free']:8.2f} "
              f"{k.get('alloc_kernel', float('nan')):9.2f} {free_us:8.2f} "
              f"{r['host_us_python_alloc_plus_free']:8.1f} {r['host_us_launches_only']:9.1f} "
              f"{r['host_us_status_read']:8.1f}")
    gr = res["grow_release"]
    print(f"grow_kv + release_rows, {gr['requests']} requests: {gr['device_us_grow_plus_release']:.2f} us device")
    print(f"{'MiB moved':>10s} {'kernel ms':>10s} {'copy ms':>9s} {'kernel GB/s':>12s} {'copy GB/s':>10s} {'ratio':>6s} {'call ms':>8s} {'host ms':>8s}")
    for r in res["compaction"]:
        print(f"{r['mib_moved']:10.1f} {r['kernel_ms']:10.3f} {r['torch_copy_ms']:9.3f} {r['kernel_gbps']:12.0f} "
              f"{r['torch_copy_gbps']:10.0f} {r['ratio_vs_copy']:6.2f} {r['rebalance_call_ms']:8.2f} {r['host_ms']:8.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
