"""Sweep the paged prefill attention kernel's variants and launch shapes against torch SDPA (GPU).

    python perf/sweep_prefill_variants.py [--out FILE] [--rep MS] [--budget-s S] [--only NAME ...]
    python perf/sweep_prefill_variants.py --smoke      # CPU: tiny cells in the interpreter, checks only

Cells (bf16, causal, Jamba-1.5-mini attention: 32 q heads, 8 KV heads, D 128), as perf/bench_prefill.py:
1x4096, 4x1024, 16x512 fresh and 4x512 after a 1024-token cached prefix, pages of 16 tokens scattered
(randperm) in an AVMPAllocator arena, layer 0 of 4 read. One diagnostic cell more: 1x4096 over pages of
1024 tokens (a block never leaves its page), which prices the gather of 16-token pages with the same
kernel. The first sweep (perf/results/sweep_prefill_variants_H100_2ea8c39.log) set the default
(64x64-w4-s3-carry); this one prices the page resolution's cost, its configs trimmed to the best of
that run and the new options.

Variants (``CONFIGS`` names them ``BMxBN-wW-sS`` plus suffixes):
- plain: handles resolved once per page inside each step (the pipeliner spreads the three dependent
  loads over its stages, K/V prefetched one block ahead), separate loop for the diagonal blocks.
- ``-carry`` (``carry_pages``): each step resolves the next block's pages, so K/V addresses arrive as
  loop-carried values; the page loads themselves are plain (synchronous) loads.
- ``-unroll`` (``unroll_pages``): a block's pages (at most 8) resolved one by one as scalars: no page
  tile, reshape or cross-thread reduction of the usable-page bits (on sm_90 at 64x64: 6 layout
  conversions and 11 barriers in the kernel instead of 10 and 17).
- ``-po`` (``page_offsets=resolve_pages(...)``): the pages' element offsets resolved once a step by
  torch ops (timed apart per cell: ``resolve_pages``, shared by every attention layer of a step, 4
  in Jamba-1.5-mini), one load a page in the kernel instead of handle, kind and offset in a chain.

Each config is first run eagerly and checked against SDPA (flash) on the same K/V gathered into
contiguous ``[B, Hkv, ctx, D]`` tensors (relative error of the whole output < 1e-2, elementwise
``|err| <= 2e-2 + 5e-2 |ref|``), then timed from a CUDA-graph replay that must reproduce the checked
output bit for bit (perf/harness.py ``time_replayed``: median of ``do_bench``, L2 flushed). SDPA flash
(``enable_gqa``) on the contiguous K/V is timed the same way as the peer. TFLOP/s count the visible causal
pairs as bench_prefill does (4 * pairs * Hq * D). The compiled kernel's registers, spills and shared
memory are recorded per config. A config that fails to compile, runs out of resources or is wrong is
recorded and the sweep goes on; a wrong result makes the script exit 1 at the end. ``--budget-s``
(default 180) stops starting new configs past that wall time (the rest are listed as skipped).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from avmp_triton import AVMPAllocator, PagedCache
from avmp_triton.kernels.paged_prefill import paged_prefill_kernel
from avmp_triton.layout import kv_page_layout
from avmp_triton.ops.paged_prefill import PrefillConfig, paged_prefill_attention, resolve_pages
from avmp_triton.reference.paged_attention import gather_kv
import triton  # noqa: E402  (after avmp_triton: it selects the interpreter on CPU-only hosts)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_paged_attention as BA  # noqa: E402
import peers  # noqa: E402
from harness import (QUANTILES, CheckFailed, environment, finish, graphed, is_resource_error,  # noqa: E402
                     record_failure, time_replayed)

# (B, new tokens, cached prefix, page tokens)
CELLS = [(1, 4096, 0, 16), (4, 1024, 0, 16), (16, 512, 0, 16), (4, 512, 1024, 16), (1, 4096, 0, 1024)]
SMOKE_CELLS = [(1, 40, 0, 16), (2, 24, 17, 16)]
TOL = (1e-2, 2e-2, 5e-2)   # bench_prefill's attention tolerance (relative, atol, rtol)


@dataclasses.dataclass(frozen=True)
class Variant:
    config: PrefillConfig
    page_offsets: bool      # pass resolve_pages(...) of the cell


def _cfg(bm, bn, w, s, carry=False, unroll=False, po=False) -> Variant:
    return Variant(PrefillConfig(block_m=bm, block_n=bn, num_warps=w, num_stages=s, carry_pages=carry,
                                 unroll_pages=unroll), po)


def _name(v: Variant) -> str:
    c = v.config
    return (f"{c.block_m}x{c.block_n}-w{c.num_warps}-s{c.num_stages}" + ("-carry" if c.carry_pages else "")
            + ("-unroll" if c.unroll_pages else "") + ("-po" if v.page_offsets else ""))


# most promising first: a budget cut drops the tail
CONFIGS = {_name(c): c for c in [
    _cfg(64, 64, 4, 3, carry=True),                      # the launch table's default at D=128 (201 regs)
    _cfg(64, 64, 4, 3, carry=True, po=True),
    _cfg(64, 64, 4, 3, carry=True, unroll=True),
    _cfg(64, 64, 4, 3, carry=True, unroll=True, po=True),
    _cfg(64, 64, 4, 3, unroll=True, po=True),             # one load a page: the pipeliner may prefetch it
    _cfg(64, 64, 4, 3, po=True),
    _cfg(128, 128, 8, 3, carry=True),                     # the fastest over pages of 1024 tokens
    _cfg(128, 128, 8, 3, carry=True, unroll=True, po=True),   # 242 regs (255 with the page tile)
    _cfg(128, 128, 8, 2),                                 # second at 1x4096 in the first sweep
    _cfg(128, 128, 8, 2, unroll=True, po=True),
    _cfg(64, 128, 4, 3, carry=True, unroll=True, po=True),    # 252 regs, no spill
    _cfg(64, 64, 4, 4, carry=True, unroll=True, po=True),
    _cfg(64, 64, 4, 2, carry=True, unroll=True, po=True),
    _cfg(64, 64, 4, 3, unroll=True),
    _cfg(128, 64, 8, 3, carry=True, unroll=True, po=True),
    _cfg(128, 64, 8, 3),                                  # the default before the first sweep
]}
SMOKE_CONFIGS = ["64x64-w4-s3-carry", "64x64-w4-s3-carry-unroll-po", "128x128-w8-s2-unroll-po"]
# also run on the diagnostic cell (pages of 1024: a block of 64 or 128 lies in one page, unroll_pages idle)
DIAGNOSTIC_CONFIGS = {"64x64-w4-s3-carry", "64x64-w4-s3-carry-po", "128x128-w8-s3-carry"}


@dataclasses.dataclass
class Cell:
    B: int
    L: int
    prefix: int
    page_tokens: int
    q: torch.Tensor
    cu: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    cache: PagedCache
    page_offsets: torch.Tensor   # resolve_pages(block_table, cache)
    k: torch.Tensor          # [B, Hkv, ctx, D] contiguous, gathered from the pages
    v: torch.Tensor
    scale: float

    @property
    def label(self) -> str:
        return (f"{self.B}x{self.L}" + (f"+{self.prefix}" if self.prefix else "")
                + (f" p{self.page_tokens}" if self.page_tokens != 16 else ""))

    @property
    def flops(self) -> float:
        pairs = self.B * (self.L * self.prefix + self.L * (self.L + 1) // 2)
        return 4.0 * pairs * BA.HQ * BA.D


def build(B: int, L: int, prefix: int, page_tokens: int, device: str, seed: int = 0) -> Cell:
    torch.manual_seed(seed + 1000 * B + L + prefix + page_tokens)
    dt = torch.bfloat16 if device != "cpu" else torch.float32
    spec = dataclasses.replace(BA.attn_spec(None, dt), page_tokens=page_tokens)
    ctx = prefix + L
    W = -(-ctx // page_tokens)
    _, slab, slabs = BA.arena_plan(spec, B * W)
    alloc = AVMPAllocator(spec, slabs * slab, device=device, kv_fraction=1.0, slab_bytes=slab, page_tokens=page_tokens)
    alloc.arena.view(dt).normal_()
    handles = alloc.alloc_kv(B * W)
    bt = handles[torch.randperm(handles.numel(), device=handles.device)].view(B, W).contiguous()
    layout = kv_page_layout(spec, page_tokens)
    ks, vs = [], []
    for b in range(B):
        k, v, ok = gather_kv(alloc.arena, alloc.handle_table, layout, bt[b], ctx, 0, dt)
        assert bool(ok.all())
        ks.append(k.transpose(0, 1))
        vs.append(v.transpose(0, 1))
    q = torch.randn(B * L, BA.HQ, BA.D, device=device).to(dt)
    cache = PagedCache.of(alloc)
    cu = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=device)
    sl = torch.full((B,), ctx, dtype=torch.int32, device=device)
    return Cell(B=B, L=L, prefix=prefix, page_tokens=page_tokens, q=q, cu=cu, seq_lens=sl, block_table=bt,
                cache=cache, page_offsets=resolve_pages(bt, cache), k=torch.stack(ks).contiguous(),
                v=torch.stack(vs).contiguous(), scale=BA.D ** -0.5)


def compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    rel, atol, rtol = TOL
    g, w = got.float(), want.float()
    err = (g - w).abs()
    res = dict(rel_err=float((g - w).norm() / w.norm().clamp_min(1e-6)),
               max_abs_err=float(err.nan_to_num(float("inf")).max()),
               excess=float((err - rtol * w.abs()).nan_to_num(float("inf")).max()), nan=int(torch.isnan(g).sum()))
    res["ok"] = res["nan"] == 0 and res["rel_err"] < rel and res["excess"] <= atol
    return res


def kernel_stats(before: set) -> list:
    """Registers, spills and shared memory of the prefill kernels compiled since ``before``."""
    out = []
    for dev_cache in getattr(paged_prefill_kernel, "device_caches", {}).values():
        for key, k in dev_cache[0].items():
            if key in before:
                continue
            try:
                out.append(dict(n_regs=k.n_regs, n_spills=k.n_spills, shared=k.metadata.shared,
                                num_warps=k.metadata.num_warps, num_stages=k.metadata.num_stages))
            except Exception as e:  # noqa: BLE001  (a label only)
                out.append(dict(error=f"{type(e).__name__}: {e}"))
    return out


def compiled_keys() -> set:
    return {key for c in getattr(paged_prefill_kernel, "device_caches", {}).values() for key in c[0]}


def sdpa_runner(cell: Cell, timing: bool):
    from torch.nn.attention import SDPBackend
    q4 = cell.q.view(cell.B, cell.L, BA.HQ, BA.D).transpose(1, 2)
    backend = None if timing else SDPBackend.MATH
    return peers.prepare_sdpa_prefill(q4, cell.k, cell.v, cell.scale, backend=backend)


def peer_row(cell: Cell, args, failures: list) -> tuple[dict, torch.Tensor]:
    """The cell's row with SDPA timed (not in --smoke), and SDPA's output ``[T, Hq, D]`` (the check)."""
    T = cell.B * cell.L
    row = dict(cell=cell.label, B=cell.B, L=cell.L, prefix=cell.prefix, page_tokens=cell.page_tokens,
               flops=cell.flops, configs={}, skipped={})
    sdpa = sdpa_runner(cell, not args.smoke)
    ref = sdpa().transpose(1, 2).reshape(T, BA.HQ, BA.D).clone()
    row["sdpa_path"] = dict(gqa=sdpa.gqa, mask=sdpa.mask, path=sdpa.path)
    if not args.smoke:
        try:
            e = time_replayed(sdpa, sdpa().clone(), args.rep, replay_atol=TOL[1])
            e["tflops"] = cell.flops / e["ms"] / 1e9
            row["sdpa"] = e
        except Exception as exc:  # noqa: BLE001
            record_failure(row, "sdpa", exc, cell.label, failures, False)
        try:
            row["resolve_pages"] = time_resolve(cell, args.rep)
        except Exception as exc:  # noqa: BLE001
            record_failure(row, "resolve_pages", exc, cell.label, failures, False)
    return row, ref


def time_resolve(cell: Cell, rep: int) -> dict:
    """``resolve_pages`` of the cell into a fixed buffer, from a CUDA-graph replay that must reproduce
    the cell's offsets (``time_replayed`` poisons with NaN, which int64 cannot hold)."""
    buf = torch.empty_like(cell.page_offsets)
    g, _ = graphed(lambda: resolve_pages(cell.block_table, cell.cache, out=buf))
    buf.fill_(-7)
    g.replay()
    torch.cuda.synchronize()
    if not torch.equal(buf, cell.page_offsets):
        raise CheckFailed("resolve_pages' CUDA-graph replay differs from its eager output", {})
    med, p20, p80 = triton.testing.do_bench(g.replay, warmup=25, rep=rep, quantiles=QUANTILES)
    return dict(ms=med, p20_ms=p20, p80_ms=p80, timing="cuda_graph")


def run_config(name: str, cell: Cell, row: dict, ref: torch.Tensor, args, failures: list) -> None:
    """Check config ``name`` on ``cell`` against SDPA's ``ref``, then time it; into ``row``."""
    var = CONFIGS[name]
    out = torch.empty_like(cell.q)
    po = cell.page_offsets if var.page_offsets else None

    def fn():
        return paged_prefill_attention(cell.q, cell.block_table, cell.seq_lens, cell.cu, cell.cache, layer=0,
                                       scale=cell.scale, out=out, max_seqlen_q=cell.L, config=var.config,
                                       page_offsets=po)
    e = dict(config=dataclasses.asdict(var.config), page_offsets=var.page_offsets)
    row["configs"][name] = e
    before = compiled_keys()
    try:
        t1 = time.time()
        out.fill_(float("nan"))
        got = fn().clone()
        e["first_call_s"] = time.time() - t1
        e["kernels"] = kernel_stats(before)
        e["check"] = compare(got, ref)
        if not e["check"]["ok"]:
            raise CheckFailed(f"differs from SDPA: {e['check']}", e["check"])
        if not args.smoke:
            e.update(time_replayed(fn, got, args.rep))
            e["tflops"] = cell.flops / e["ms"] / 1e9
            if "sdpa" in row:
                e["ours_over_sdpa"] = e["ms"] / row["sdpa"]["ms"]
    except Exception as exc:  # noqa: BLE001
        if is_resource_error(exc):
            e["error"] = f"resources: {type(exc).__name__}: {str(exc)[:200]}"
        else:
            e["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            record_failure(row, name, exc, cell.label, failures, False)
    print(f"  {cell.label:14s} {name:30s} " + (f"{e['tflops']:6.1f} TF/s" if "tflops" in e else
                                                e.get("error", "checked")[:60]), flush=True)


def print_table(res: dict) -> None:
    rows = res["cells"]
    print(f"\n{res['env'].get('gpu', 'cpu')}; TFLOP/s (causal pairs); ratio = ours time / SDPA time")
    print(f"{'config':30s} " + " ".join(f"{r['cell']:>14s}" for r in rows))
    print(f"{'sdpa flash':30s} " + " ".join(f"{r['sdpa']['tflops']:14.1f}" if "sdpa" in r else f"{'-':>14s}"
                                            for r in rows))
    print(f"{'resolve_pages us':30s} " + " ".join(f"{r['resolve_pages']['ms'] * 1e3:14.1f}" if "resolve_pages" in r
                                                  else f"{'-':>14s}" for r in rows))
    names = list(dict.fromkeys(n for r in rows for n in r["configs"]))
    for n in names:
        cells = []
        for r in rows:
            e = r["configs"].get(n)
            if e is None or "tflops" not in e:
                cells.append(f"{'-' if e is None else ('err' if 'error' in e else 'ok'):>14s}")
            else:
                ratio = f" {e['ours_over_sdpa']:.2f}x" if "ours_over_sdpa" in e else ""
                cells.append(f"{e['tflops']:8.1f}{ratio:>6s}")
        regs = next((k["n_regs"] for r in rows for k in r["configs"].get(n, {}).get("kernels", []) if "n_regs" in k), "")
        print(f"{n:30s} " + " ".join(cells) + (f"   regs {regs}" if regs != "" else ""))
    for r in rows:
        ok = [(e["ms"], n) for n, e in r["configs"].items() if "ms" in e]
        if ok:
            ms, n = min(ok)
            peer = f", SDPA {r['sdpa']['ms'] * 1e3:.0f} us" if "sdpa" in r else ""
            print(f"best {r['cell']}: {n} {ms * 1e3:.0f} us ({r['flops'] / ms / 1e9:.0f} TF/s){peer}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--rep", type=int, default=40, help="do_bench time per measurement, ms")
    ap.add_argument("--budget-s", type=float, default=180.0, help="start no config past this wall time")
    ap.add_argument("--only", nargs="+", choices=list(CONFIGS), help="these configs only")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny cells, checks only")
    args = ap.parse_args()
    t0 = time.time()
    device = "cpu" if args.smoke else "cuda"
    names = args.only or (SMOKE_CONFIGS if args.smoke else list(CONFIGS))
    cells = SMOKE_CELLS if args.smoke else CELLS
    res = dict(env=environment() if not args.smoke else dict(gpu="cpu (interpreter)"), cells=[],
               variants={n: dict(config=dataclasses.asdict(v.config), page_offsets=v.page_offsets)
                         for n, v in CONFIGS.items()}, tolerance=TOL)
    failures: list = []
    built = []
    for B, L, prefix, P in cells:
        cell = build(B, L, prefix, P, device)
        row, ref = peer_row(cell, args, failures)
        res["cells"].append(row)
        built.append((cell, row, ref))
    print(f"cells built, SDPA timed ({time.time() - t0:.0f} s)", flush=True)
    # configs outer, cells inner: one compile serves every cell of a page size, and a budget cut
    # drops whole configs, not whole cells
    for name in names:
        for cell, row, ref in built:
            if cell.page_tokens != 16 and name not in DIAGNOSTIC_CONFIGS:
                continue
            if time.time() - t0 > args.budget_s:
                row["skipped"][name] = f"past --budget-s {args.budget_s}"
                continue
            run_config(name, cell, row, ref, args, failures)
    res["wall_s"] = time.time() - t0
    out = args.out or ("/tmp/prefill_variants_smoke.json" if args.smoke else None)
    finish(res, "sweep_prefill_variants", out, False, failures, print_table)


if __name__ == "__main__":
    main()
