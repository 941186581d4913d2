"""Allocator microbenchmark (GPU): host and device time of batched alloc / free, growth, compaction.

One run measures, each cell checked against the reference before it is timed:
- launch cost: host time of one launch of the alloc and free kernels (on scratch buffers, so that
  they change nothing) through ``JITFunction.run`` and through the allocator's launcher (the
  compiled kernel launched again; ``avmp_triton/memory/launch.py``), and of one read of a small
  device buffer back to the host (``.tolist()``, which the allocator's reads use, and a stream sync
  + read of pinned memory, which a syncing free uses: its kernel writes its report through);
- per allocator (AVMP and both baselines) and n in 1, 16, 256, 4096: host time of one Python
  ``alloc_kv(n)`` and one ``free`` (wall time of the call, median of many, nothing synchronised
  inside the timed window), on an idle GPU and back to back; the capturable ``alloc_into`` /
  ``free_from`` (checks + launch, no read) and the split derived from them; host reads per call;
  the device time of the pair (CUDA-graph replay median) and of each kernel (profiler mean);
- the one-program free at n=4096 beside the two-launch free;
- grow_kv + release_rows for 256 requests (device time);
- compaction: the copy kernel's device time inside a rebalance that moves M MiB of scattered live
  pages against a torch copy of as many bytes, and the rebalance call's host time.

``--smoke`` runs the same logic on tiny shapes (CPU and Triton's interpreter without a GPU): wall
times only, no graph, no profiler. Writes JSON to --out and prints a table last.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from avmp_triton import AVMPAllocator, HybridModelSpec, PaddedUnifiedAllocator, StaticDualAllocator, get_preset  # noqa: E402
from avmp_triton.kernels import alloc as K  # noqa: E402
from avmp_triton.memory.launch import Launcher, launcher  # noqa: E402
from avmp_triton.memory.model import AllocatorModel, assert_matches  # noqa: E402

GRAPH_REPS = 20
SMOKE_SPEC = HybridModelSpec(
    name="tiny", num_attn_layers=1, num_kv_heads=1, head_dim=4, kv_dtype=torch.float32,
    num_mamba_layers=1, mamba_version=1, d_inner=8, d_state=4, conv_dtype=torch.float32, ssm_dtype=torch.float32)


class Bench:
    """What the sections share: device, repetition counts, the failures so far."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.cuda = torch.cuda.is_available() and not smoke
        self.dev = "cuda" if self.cuda else "cpu"
        self.reps = 8 if smoke else 300
        self.failures: list[str] = []

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def host_us(self, fn, before=None, reps=None) -> float:
        """Median wall time (us) of single calls of ``fn``; ``before()`` runs outside each timed window."""
        xs = []
        for _ in range(reps or self.reps):
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            xs.append(time.perf_counter() - t0)
        return statistics.median(xs) * 1e6

    def graph_us(self, fn) -> float | None:
        """Device time of ``fn`` in us: GRAPH_REPS calls in one CUDA graph, replay median / reps."""
        if not self.cuda:
            return None
        import triton.testing
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(GRAPH_REPS):
                fn()
        return triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median") * 1e3 / GRAPH_REPS

    def kernel_means_us(self, fn, iters=50) -> dict:
        """Mean device time per launch of each Triton kernel in ``fn`` (profiler)."""
        if not self.cuda:
            return {}
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        return {e.key: e.device_time_total / e.count for e in prof.key_averages()
                if e.key.endswith("_kernel") and e.count}

    def guarded(self, label: str, row: dict, fn):
        """Run one cell; a failure is recorded in ``row`` and the run goes on."""
        import harness
        try:
            fn(row)
        except Exception as e:  # noqa: BLE001
            harness.record_failure(row, label, e, label, self.failures, fail_fast=False)
        return row


def bench_launch_cost(b: Bench, ns) -> dict:
    """Host time of one launch of alloc_kernel and free_kernel on scratch buffers (zero tops and
    free handle kinds: the kernels find nothing to pop and nothing live, and change no state),
    through JITFunction.run ("jit") and the launcher's fast path; and of one small read-back."""
    H, dev = 4096, b.dev
    i32 = lambda k: torch.zeros(k, dtype=torch.int32, device=dev)  # noqa: E731
    i64 = lambda k: torch.zeros(k, dtype=torch.int64, device=dev)  # noqa: E731
    state = (i64(H), i32(H), i32(H), i64(H), i64(3), i32(H))
    status, ticket, mark, epoch = i64(3), i32(1), i64(H), i64(1)
    res = {"mode": launcher(K.alloc_kernel).mode, "alloc": {}, "free": {}}
    # the interpreter has one way to launch; a GPU has JITFunction.run and the fast path
    for mode in (("jit", None) if res["mode"] != "interpreter" else (None,)):
        name = mode or launcher(K.alloc_kernel).mode
        lch_a = Launcher(K.alloc_kernel, mode=mode)
        lch_f = Launcher(K.free_kernel, mode=mode)
        for n in ns:
            out, handles = i32(n), torch.arange(n, dtype=torch.int32, device=dev)
            alloc = lch_a.bind(status, ticket, *state, 0, 2048, 512, 4, POOL=0, KIND=1, BLOCK=256, num_warps=4)
            free = lch_f.bind(status, mark, epoch, *state, 0, 2048, 512, 512, 4, H, REQ_KIND=0, POOL_KV=0,
                              POOL_SSM=1, BLOCK=256, REPORT_TOPS=False, num_warps=8)
            grid = ((n + 255) // 256,)
            alloc(grid, out, n)  # compiles (or finds) the kernel before anything is timed
            free((1,), handles, n)
            b.sync()
            res["alloc"].setdefault(name, {})[n] = b.host_us(lambda: alloc(grid, out, n), before=b.sync)
            res["free"].setdefault(name, {})[n] = b.host_us(lambda: free((1,), handles, n), before=b.sync)
            if int(status[0]) != int(K.ERR_NOT_LIVE) or int(ticket[0]) != 0 or int(state[4].abs().sum()) != 0:
                raise AssertionError(f"scratch launches changed state: status {status.tolist()}")
        res.setdefault("launches_fast", {})[name] = lch_a.launches_fast + lch_f.launches_fast
    buf = i64(8)
    res["read_tolist_us"] = b.host_us(buf.tolist, before=b.sync)
    if b.cuda:
        host = torch.zeros(8, dtype=torch.int64, pin_memory=True)

        def mapped():  # what a syncing free reads: the report its kernel wrote through to pinned memory
            torch.cuda.current_stream().synchronize()
            return host.tolist()

        res["read_mapped_sync_us"] = b.host_us(mapped, before=b.sync)
    return res


def check_against_model(b: Bench, ctor, capacity, ns, one_program: bool) -> None:
    """The timed calls (alloc_kv / alloc_ssm / free, through the launcher's fast path once warm) on a
    fresh allocator, against the reference model call by call."""
    a = ctor(capacity)
    if one_program:
        a.free_one_program_max = 1 << 30
    m = AllocatorModel.like(a)
    gen = torch.Generator().manual_seed(5)
    live = []
    for n in list(ns) + list(ns):
        for kind in ("kv", "ssm"):
            k = min(n, m.stats().pools[m.pool_names[a.pool_index(kind)]].free_units // 4)
            got = (a.alloc_kv if kind == "kv" else a.alloc_ssm)(k).tolist()
            want = m.alloc(kind, k)
            if got != want:
                raise AssertionError(f"alloc_{kind}({k}) gave {got[:8]}..., the model {want[:8]}...")
            live += got
        drop = [live[i] for i in torch.randperm(len(live), generator=gen)[: len(live) // 2].tolist()]
        a.free(torch.tensor(drop, dtype=torch.int32, device=b.dev))
        m.free(drop)
        live = [h for h in live if h not in set(drop)]
    assert_matches(m, a)


def bench_alloc_free(b: Bench, name, ctor, capacity, ns, *, one_program=False) -> list[dict]:
    """``one_program``: every free in one single-program launch, to time it beside the two-launch path."""
    rows = []
    check = b.guarded(f"{name} check", {}, lambda r: check_against_model(b, ctor, capacity, ns, one_program))
    if "failures" in check:
        return [dict(allocator=name, n=n, **check) for n in ns]
    alloc = ctor(capacity)
    if one_program:
        alloc.free_one_program_max = 1 << 30
        name += " (free: one program)"
    # half-full pools, scattered: the realistic state for a serving allocator
    pre = alloc.alloc_kv(alloc.stats().pools[alloc.pool_names[0]].free_units // 2)
    alloc.free(pre[torch.randperm(pre.numel(), device=b.dev)[: pre.numel() // 2]].contiguous())
    for n in ns:
        rows.append(b.guarded(f"{name} n={n}", dict(allocator=name, n=n), lambda row: _host_cells(b, alloc, n, row)))
    for row in rows:  # device time last: capturing alloc_into retires the allocator's host bound for good
        if "failures" not in row:
            b.guarded(f"{name} n={row['n']} device", row, lambda r: _device_cells(b, alloc, r))
    return rows


def _host_cells(b: Bench, alloc, n: int, row: dict) -> None:
    """Host time per call: on an idle GPU (synchronised before each timed call, outside its window)
    and back to back (the free then also waits for the alloc's kernel)."""
    out = torch.empty(n, dtype=torch.int32, device=b.dev)
    for _ in range(3):  # warm: compiles, fills the launcher's cache
        alloc.free(alloc.alloc_kv(n))
    got, reads = [], []

    def one_alloc():
        r0 = alloc.host_reads
        got.append(alloc.alloc_kv(n))
        reads.append(alloc.host_reads - r0)

    row["host_us_alloc"] = b.host_us(one_alloc, before=lambda: (got and alloc.free(got.pop()), b.sync()))
    alloc.free(got.pop())
    row["host_reads_per_alloc"] = sum(reads) / len(reads)
    b.sync()
    held = []
    row["host_us_free"] = b.host_us(lambda: alloc.free(held.pop()),
                                    before=lambda: (held.append(alloc.alloc_kv(n)), b.sync()))
    t_a, t_f = [], []
    for _ in range(b.reps):
        t0 = time.perf_counter()
        h = alloc.alloc_kv(n)
        t1 = time.perf_counter()
        alloc.free(h)
        t_a.append(t1 - t0)
        t_f.append(time.perf_counter() - t1)
    row["host_us_alloc_back_to_back"] = statistics.median(t_a) * 1e6
    # the measure the issue's target was set on: the mean host time of one Python alloc + free pair
    row["host_us_python_alloc_plus_free"] = (sum(t_a) + sum(t_f)) / len(t_a) * 1e6
    row["host_us_free_back_to_back"] = statistics.median(t_f) * 1e6
    out.fill_(-1)
    codes = []
    row["host_us_alloc_into"] = b.host_us(lambda: alloc.alloc_into("kv", out),
                                          before=lambda: (codes.append(int(alloc.free_from(out)[0])), b.sync()))
    codes.append(int(alloc.free_from(out)[0]))
    row["host_us_free_from"] = b.host_us(lambda: alloc.free_from(out),
                                         before=lambda: (codes.append(int(alloc.alloc_into("kv", out)[0])), b.sync()))
    # the first free_from had -1s in ``out``: it must fail; every other call succeeds; the last free
    # left nothing to free again
    if codes[0] == 0 or any(codes[1:]) or int(alloc.free_from(out)[0]) == 0:
        raise AssertionError(f"alloc_into / free_from in the host timing loop returned codes {codes}")


def _device_cells(b: Bench, alloc, row: dict) -> None:
    n = row["n"]
    out = torch.empty(n, dtype=torch.int32, device=b.dev)

    def pair():
        alloc.alloc_into("kv", out)
        return alloc.free_from(out)

    row["device_us_alloc_plus_free"] = b.graph_us(pair)
    if int(pair()[0]) != 0:
        raise AssertionError("benchmark pair failed")
    row["profiler_mean_us_per_kernel"] = b.kernel_means_us(pair)
    if b.cuda:  # the status-reading path that remains once a graph captured a call that takes units
        row["host_us_alloc_plus_free_bound_retired"] = b.host_us(lambda: alloc.free(alloc.alloc_kv(n)), before=b.sync)


def bench_grow_release(b: Bench, spec, capacity, R=256, W=512, **extra) -> dict:
    """One decode step's allocator work for R requests: +1 page each, then release of every row."""
    alloc = AVMPAllocator(spec, capacity, device=b.dev, **extra)
    dev = b.dev
    bt = torch.full((R, W), -1, dtype=torch.int32, device=dev)
    npg = torch.zeros(R, dtype=torch.int32, device=dev)
    ones = torch.ones(R, dtype=torch.int32, device=dev)
    rows = torch.arange(R, dtype=torch.int32, device=dev)
    failed = torch.empty(R, dtype=torch.int32, device=dev)
    status = torch.empty(3, dtype=torch.int64, device=dev)

    def step():
        alloc.grow_kv(bt, npg, ones, failed)
        alloc.release_rows(rows, bt, npg, status=status)

    step()
    if int(status[0]) != 0 or int(failed.sum()) != 0 or alloc.stats().handles_live != 0:
        raise AssertionError("grow + release did not leave the allocator empty")
    res = dict(requests=R, width=W, host_us_grow=b.host_us(lambda: alloc.grow_kv(bt, npg, ones, failed),
                                                           before=lambda: (alloc.release_rows(rows, bt, npg,
                                                                                              status=status), b.sync())))
    res["device_us_grow_plus_release"] = b.graph_us(step)
    return res


def _scattered_half_live(b: Bench, spec, mib):
    """An allocator whose KV slabs are each about half live, scattered, so that emptying enough
    slabs for the SSM pool moves about ``mib`` MiB of pages; returns (allocator, slabs to move)."""
    probe = AVMPAllocator(spec, 1 << 30 if not b.smoke else 64 << 10, device=b.dev,
                          **({"slab_bytes": 2048} if b.smoke else {}))
    page, slab, ups = probe.unit_bytes[0], probe.slab_bytes, probe.units_per_slab[0]
    del probe
    n_moves = max(1, int(mib * 2**20) // page)
    victims = math.ceil(1.3 * n_moves / max(1, ups // 2))
    kv_slabs = 3 * victims + 2
    alloc = AVMPAllocator(spec, (kv_slabs + 2) * slab, device=b.dev, kv_fraction=kv_slabs / (kv_slabs + 2),
                          migration_batch=1, **({"slab_bytes": slab} if b.smoke else {}))
    kv = alloc.alloc_kv(alloc.stats().pools["kv"].free_units)
    alloc.arena.random_(0, 256)
    alloc.free(kv[torch.randperm(kv.numel(), device=b.dev)[: kv.numel() // 2]].contiguous())
    b.sync()
    return alloc, victims, kv


def _rebalance_checked(b: Bench, spec, mib):
    """One rebalance on a fresh allocator: (return ms, synced ms, allocator); checks that every live
    page's bytes survived the compaction."""
    alloc, victims, kv = _scattered_half_live(b, spec, mib)
    live = kv[alloc.handle_kind[kv.long()] != 0]
    live = live[torch.randperm(live.numel(), device=b.dev)[:128]]  # a sample: a third of them move
    page = alloc.unit_bytes[0]

    def pages():
        return torch.stack([alloc.arena[o:o + page] for o in alloc.resolve(live).tolist()])

    before = pages().clone()
    b.sync()
    t0 = time.perf_counter()
    alloc.rebalance("ssm", victims)
    t1 = time.perf_counter()
    b.sync()
    t2 = time.perf_counter()
    if alloc.units_moved == 0 or not torch.equal(pages(), before):
        raise AssertionError("compaction lost or overwrote live bytes")
    return (t1 - t0) * 1e3, (t2 - t0) * 1e3, alloc


def _rebalance_device_ms(b: Bench, spec, mib):
    """(move_units_kernel ms, every kernel of the call ms, units moved, unit bytes) from the profiler."""
    alloc, victims, _ = _scattered_half_live(b, spec, mib)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        alloc.rebalance("ssm", victims)
        torch.cuda.synchronize()
    ev = prof.key_averages()
    copy = sum(e.device_time_total for e in ev if e.key == "move_units_kernel") / 1e3
    total = sum(e.device_time_total for e in ev) / 1e3
    return copy, total, alloc.stats().units_moved, alloc.unit_bytes[0]


def bench_compaction(b: Bench, spec, mib_list, reps=3) -> list[dict]:
    """Rebalances that compact M MiB of scattered live pages: the copy kernel's device time (profiler,
    median of ``reps`` fresh allocators) against a torch copy of as many bytes; the call's time to
    return and its synchronised wall time (no profiler attached), whose host part is the wall time
    less the device time of everything it ran."""
    _rebalance_checked(b, spec, mib_list[0])  # compiles every migration kernel, checks the bytes
    rows = []
    for mib in mib_list:
        row = dict(mib_asked=mib)
        b.guarded(f"compaction {mib} MiB", row, lambda r: _compaction_cell(b, spec, mib, reps, r))
        rows.append(row)
    return rows


def _compaction_cell(b: Bench, spec, mib, reps, row) -> None:
    walls = [_rebalance_checked(b, spec, mib)[:2] for _ in range(reps)]
    row.update(rebalance_return_ms=statistics.median(w[0] for w in walls),
               rebalance_call_ms=statistics.median(w[1] for w in walls), rebalance_call_ms_all=[w[1] for w in walls])
    if not b.cuda:
        return
    dev = [_rebalance_device_ms(b, spec, mib) for _ in range(reps)]
    torch.cuda.empty_cache()
    kern_ms, dev_ms = statistics.median(d[0] for d in dev), statistics.median(d[1] for d in dev)
    moved, page = dev[0][2], dev[0][3]
    nbytes = moved * page
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    x.random_(0, 256)
    import triton.testing
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    row.update(mib_moved=nbytes / 2**20, units=moved, unit_bytes=page, kernel_ms=kern_ms,
               kernel_ms_all=[d[0] for d in dev], device_ms_all_kernels=dev_ms, torch_copy_ms=copy_ms,
               kernel_gbps=2 * nbytes / kern_ms / 1e6, torch_copy_gbps=2 * nbytes / copy_ms / 1e6,
               ratio_vs_copy=copy_ms / kern_ms, host_ms=row["rebalance_call_ms"] - dev_ms,
               note="GB/s count bytes read + written; kernel_ms: move_units_kernel inside the rebalance (profiler); "
                    "rebalance_return_ms: the call until it returns (its one read of the slab counters syncs, "
                    "its launches do not); rebalance_call_ms: synchronised after, no profiler; host_ms: "
                    "call ms less the device time of every kernel it ran")
    x = y = None  # noqa: F841 (the lambda above held them)
    torch.cuda.empty_cache()


def _splits(res: dict) -> None:
    """Python checks = the capturable call (checks + launch) less the launch alone, per row."""
    lc = res["launch_cost"]
    fast = lc["mode"]
    for row in res["alloc_free"] + res["free_one_program"]:
        n = row["n"]
        if "host_us_alloc_into" not in row or n not in lc["alloc"].get(fast, {}):
            continue
        row["host_us_launch_only_alloc"] = lc["alloc"][fast][n]
        row["host_us_checks_alloc"] = row["host_us_alloc_into"] - lc["alloc"][fast][n]
        if n <= 1024:  # one launch; larger frees launch twice
            row["host_us_launch_only_free"] = lc["free"][fast][n]
            row["host_us_checks_free"] = row["host_us_free_from"] - lc["free"][fast][n]


def print_table(res: dict) -> None:
    env = res["env"]
    print(f"\n{env.get('gpu')}  torch {env.get('torch')}  triton {env.get('triton')}  commit {str(env.get('commit'))[:12]}"
          f"  launch mode {res['launch_cost']['mode']}")
    lc = res["launch_cost"]
    for what in ("alloc", "free"):
        for mode, by_n in lc[what].items():
            print(f"  launch of {what}_kernel via {mode:8s}: " + "  ".join(f"n={n}: {us:.1f} us" for n, us in by_n.items()))
    print(f"  fast launches so far: {res['launches_fast']}")
    print(f"  read back of 8 int64: .tolist() {lc['read_tolist_us']:.1f} us"
          + (f", stream sync + pinned report {lc['read_mapped_sync_us']:.1f} us" if "read_mapped_sync_us" in lc else ""))
    f = lambda v: "   -" if v is None else f"{v:6.1f}"  # noqa: E731
    print(f"{'allocator':28s} {'n':>5s} {'alloc':>6s} {'free':>6s} {'pair':>6s} {'a_into':>6s} "
          f"{'f_from':>6s} {'chk_a':>6s} {'chk_f':>6s} {'rd/a':>5s} {'dev':>6s} {'a+f-ret':>7s}   (host us per call; "
          "idle GPU; pair: alloc + free back to back; chk: the capturable call less the launch alone; rd/a: "
          "host reads per alloc; dev: graph us of the pair; a+f-ret: alloc + free once a captured alloc_into "
          "retired the bound)")
    for r in res["alloc_free"] + res["free_one_program"]:
        if "failures" in r:
            print(f"{r['allocator']:28s} {r['n']:5d}  FAILED")
            continue
        print(f"{r['allocator']:28s} {r['n']:5d} {f(r['host_us_alloc'])} {f(r['host_us_free'])} "
              f"{f(r['host_us_python_alloc_plus_free'])} {f(r['host_us_alloc_into'])} "
              f"{f(r['host_us_free_from'])} {f(r.get('host_us_checks_alloc'))} {f(r.get('host_us_checks_free'))} "
              f"{r['host_reads_per_alloc']:5.2f} {f(r.get('device_us_alloc_plus_free'))} "
              f"{f(r.get('host_us_alloc_plus_free_bound_retired'))}")
    gr = res["grow_release"]
    print(f"grow_kv + release_rows, {gr.get('requests')} requests: device {gr.get('device_us_grow_plus_release')} us, "
          f"host of grow_kv {gr.get('host_us_grow', float('nan')):.1f} us")
    print(f"{'MiB moved':>10s} {'kernel ms':>10s} {'copy ms':>9s} {'ratio':>6s} {'return ms':>10s} {'call ms':>8s} "
          f"{'host ms':>8s}")
    for r in res["compaction"]:
        if "failures" in r:
            print(f"{r['mib_asked']:10} FAILED")
            continue
        g = lambda k: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
        print(f"{r.get('mib_moved', r['mib_asked']):10.1f} {g('kernel_ms'):>10s} {g('torch_copy_ms'):>9s} "
              f"{g('ratio_vs_copy'):>6s} {g('rebalance_return_ms'):>10s} {g('rebalance_call_ms'):>8s} {g('host_ms'):>8s}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="jamba-1.5-mini")
    ap.add_argument("--capacity-gib", type=float, default=8.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; CPU and Triton's interpreter without a GPU")
    args = ap.parse_args()
    import harness
    b = Bench(args.smoke)
    if not b.cuda and not args.smoke:
        raise SystemExit("bench_alloc needs a CUDA GPU (or --smoke): it reports device time or nothing")
    t_start = time.perf_counter()
    if args.smoke:
        spec, capacity, big, ns, mibs = SMOKE_SPEC, 64 * 2048, 512 * 2048, [1, 16, 40], [0.01, 0.02]
        extra = {"slab_bytes": 2048}
        env = dict(gpu="cpu-smoke", torch=torch.__version__, triton=__import__("triton").__version__,
                   commit=harness.commit())
    else:
        spec, capacity, big, ns, mibs = get_preset(args.spec), int(args.capacity_gib * 2**30), 48 << 30, \
            [1, 16, 256, 4096], [64, 256, 1024]
        extra = {}
        env = harness.environment()
    make = {
        "avmp": lambda c: AVMPAllocator(spec, c, device=b.dev, **extra),
        "static_dual_0.5": lambda c: StaticDualAllocator(spec, c, ssm_fraction=0.5, device=b.dev, **extra),
        # its unit is a whole SSM block: it needs a bigger arena to hold n=4096 units
        "padded_unified": lambda c: PaddedUnifiedAllocator(spec, c, device=b.dev, **extra),
    }
    cap = {"avmp": capacity, "static_dual_0.5": capacity, "padded_unified": big}
    res = dict(env=env, spec=spec.name, capacity_bytes=capacity, smoke=args.smoke, alloc_free=[],
               checks="every alloc_free row's allocator against AllocatorModel first (a failure is in its row)")
    res["launch_cost"] = bench_launch_cost(b, ns)
    for name, ctor in make.items():
        res["alloc_free"] += bench_alloc_free(b, name, ctor, cap[name], ns)
        if b.cuda:
            torch.cuda.empty_cache()
    res["free_one_program"] = bench_alloc_free(b, "avmp", make["avmp"], capacity, [ns[-1]], one_program=True)
    rw = dict(R=8, W=4) if args.smoke else {}
    res["grow_release"] = b.guarded("grow_release", {},
                                    lambda r: r.update(bench_grow_release(b, spec, capacity, **rw, **extra)))
    res["compaction"] = bench_compaction(b, spec, mibs)
    _splits(res)
    res["launches_fast"] = {k.fn.__name__ if hasattr(k, "fn") else str(k): launcher(k).launches_fast
                            for k in (K.alloc_kernel, K.free_kernel, K.free_check_kernel, K.free_commit_kernel)}
    res["wall_s"] = time.perf_counter() - t_start
    harness.finish(res, "bench_alloc", args.out, False, b.failures, print_table)


if __name__ == "__main__":
    main()
