"""The paged prefill attention kernel's default beside the previous default and torch SDPA (GPU).

    python perf/sweep_prefill_variants.py [--out FILE] [--rep MS] [--prev-kernel FILE] [--only NAME ...]
    python perf/sweep_prefill_variants.py --smoke      # CPU: tiny cells in the interpreter, checks only

Cells (bf16, causal): at Jamba-1.5-mini's attention (32 q heads, 8 KV heads, D 128) 1x4096, 4x1024,
16x512 fresh and 4x512 after a 1024-token cached prefix, as perf/bench_prefill.py; at Zamba2-2.7B's
(32 q and 32 KV heads, D 160: the launch table's 256 row, masked lanes) 4x1024. Pages of 16 tokens
scattered (randperm) in an AVMPAllocator arena, layer 0 of 4 read. The sweeps before this one
(perf/results/sweep_prefill_variants_H100_2ea8c39 and _c562f19) chose the default.

Variants:
- ``default``: ``paged_prefill_attention`` with its launch table and the cell's ``resolve_pages``
  passed (as the model runner does: resolved once a step for every attention layer).
- ``default-self-resolved``: the same call given no offsets: it resolves them itself (one launch more).
- ``prev-default``: the kernel of commit c562f19 (``--prev-kernel``, that commit's
  avmp_triton/kernels/paged_prefill.py: handles resolved in the kernel, three dependent loads a page)
  with that commit's launch table (D 128: 64x64, 4 warps, 3 stages, pages carried; D 160: 64x32,
  8 warps, 2 stages). Without the file it is recorded as skipped.

``resolve_pages`` (one kernel launch) is timed apart per cell. Each variant is first run eagerly and
checked against SDPA (flash; math in --smoke) on the same K/V gathered into contiguous ``[B, Hkv, ctx, D]``
tensors (relative error of the whole output < 1e-2, elementwise ``|err| <= 2e-2 + 5e-2 |ref|``),
then timed from a CUDA-graph replay that must reproduce the checked output bit for bit
(perf/harness.py ``time_replayed``: median of ``do_bench``, L2 flushed). SDPA flash (``enable_gqa``)
on the contiguous K/V is timed the same way as the peer. TFLOP/s count the visible causal pairs as
bench_prefill does (4 * pairs * Hq * D). The compiled kernel's registers, spills and shared memory
are recorded. A variant that fails to compile, runs out of resources or is wrong is recorded and the
sweep goes on; a wrong result makes the script exit 1 at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time

import torch

from avmp_triton import AVMPAllocator, PagedCache
from avmp_triton.kernels.paged_prefill import paged_prefill_kernel
from avmp_triton.layout import kv_page_layout
from avmp_triton.ops._args import attn_block_d
from avmp_triton.ops.paged_prefill import paged_prefill_attention, prefill_launch_config, resolve_pages
from avmp_triton.reference.paged_attention import gather_kv
import triton  # noqa: E402  (after avmp_triton: it selects the interpreter on CPU-only hosts)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_paged_attention as BA  # noqa: E402
import peers  # noqa: E402
from harness import (QUANTILES, CheckFailed, environment, finish, graphed, is_resource_error,  # noqa: E402
                     record_failure, time_replayed)

# (B, new tokens, cached prefix, page tokens, Hq, Hkv, D)
JAMBA, ZAMBA2 = (32, 8, 128), (32, 32, 160)
CELLS = [(1, 4096, 0, 16, *JAMBA), (4, 1024, 0, 16, *JAMBA), (16, 512, 0, 16, *JAMBA), (4, 512, 1024, 16, *JAMBA),
         (4, 1024, 0, 16, *ZAMBA2)]
SMOKE_CELLS = [(1, 40, 0, 16, 4, 2, 128), (2, 24, 17, 16, 4, 2, 128), (1, 33, 0, 16, 2, 2, 160)]
TOL = (1e-2, 2e-2, 5e-2)   # bench_prefill's attention tolerance (relative, atol, rtol)
VARIANTS = ["default", "default-self-resolved", "prev-default"]
# c562f19's launch table for 16-bit inputs on a GPU, by attn_block_d: (BLOCK_M, BLOCK_N, warps, stages, carry)
PREV_TABLE = {128: (64, 64, 4, 3, True), 256: (64, 32, 8, 2, False)}
PREV_CPU = (32, 32, 4, 1, True)
LOG2E = 1.4426950408889634


@dataclasses.dataclass
class Cell:
    B: int
    L: int
    prefix: int
    page_tokens: int
    hq: int
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
    def D(self) -> int:
        return self.q.shape[-1]

    @property
    def label(self) -> str:
        return (f"{self.B}x{self.L}" + (f"+{self.prefix}" if self.prefix else "")
                + (f" D{self.D}" if self.D != BA.D else ""))

    @property
    def flops(self) -> float:
        pairs = self.B * (self.L * self.prefix + self.L * (self.L + 1) // 2)
        return 4.0 * pairs * self.hq * self.D


def build(B: int, L: int, prefix: int, page_tokens: int, hq: int, hkv: int, D: int, device: str,
          seed: int = 0) -> Cell:
    torch.manual_seed(seed + 1000 * B + L + prefix + page_tokens + D)
    dt = torch.bfloat16 if device != "cpu" else torch.float32
    spec = dataclasses.replace(BA.attn_spec(None, dt), page_tokens=page_tokens, num_kv_heads=hkv, head_dim=D)
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
    q = torch.randn(B * L, hq, D, device=device).to(dt)
    cache = PagedCache.of(alloc)
    cu = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=device)
    sl = torch.full((B,), ctx, dtype=torch.int32, device=device)
    return Cell(B=B, L=L, prefix=prefix, page_tokens=page_tokens, hq=hq, q=q, cu=cu, seq_lens=sl, block_table=bt,
                cache=cache, page_offsets=resolve_pages(bt, cache), k=torch.stack(ks).contiguous(),
                v=torch.stack(vs).contiguous(), scale=D ** -0.5)


def compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    rel, atol, rtol = TOL
    g, w = got.float(), want.float()
    err = (g - w).abs()
    res = dict(rel_err=float((g - w).norm() / w.norm().clamp_min(1e-6)),
               max_abs_err=float(err.nan_to_num(float("inf")).max()),
               excess=float((err - rtol * w.abs()).nan_to_num(float("inf")).max()), nan=int(torch.isnan(g).sum()))
    res["ok"] = res["nan"] == 0 and res["rel_err"] < rel and res["excess"] <= atol
    return res


def kernel_stats(kernel, before: set) -> list:
    """Registers, spills and shared memory of ``kernel``'s compilations not in ``before``."""
    out = []
    for dev_cache in getattr(kernel, "device_caches", {}).values():
        for key, k in dev_cache[0].items():
            if key in before:
                continue
            try:
                out.append(dict(n_regs=k.n_regs, n_spills=k.n_spills, shared=k.metadata.shared,
                                num_warps=k.metadata.num_warps, num_stages=k.metadata.num_stages))
            except Exception as e:  # noqa: BLE001  (a label only)
                out.append(dict(error=f"{type(e).__name__}: {e}"))
    return out


def compiled_keys(kernel) -> set:
    return {key for c in getattr(kernel, "device_caches", {}).values() for key in c[0]}


def load_prev_kernel(path: str):
    """c562f19's ``paged_prefill_kernel`` from a copy of its kernels/paged_prefill.py."""
    spec = importlib.util.spec_from_file_location("prev_paged_prefill", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.paged_prefill_kernel


def prev_runner(kernel, cell: Cell, out: torch.Tensor, on_gpu: bool):
    """A call of c562f19's kernel as that commit's launcher made it (handles resolved in the kernel)."""
    c = cell.cache
    L = c.kv_layout
    T, Hq, D = cell.q.shape
    gqa = Hq // L.num_kv_heads
    bm, bn, warps, stages, carry = PREV_TABLE[attn_block_d(D)] if on_gpu else PREV_CPU
    bm = min(bm, max(16, 1 << (gqa * cell.L - 1).bit_length()))   # its max_seqlen_q rule
    kv = c.arena.view(c.kv_dtype)
    bt = cell.block_table
    grid = (T // (bm // gqa) + cell.B, L.num_kv_heads)

    def fn():
        kernel[grid](cell.q, out, cell.cu, cell.seq_lens, bt, c.handle_table, c.handle_kinds, kv,
                     cell.B, bt.shape[1], c.handle_table.shape[0], kv.numel(), T,
                     cell.q.stride(0), cell.q.stride(1), out.stride(0), out.stride(1), bt.stride(0),
                     0, L.stride_kv, L.stride_head, L.stride_token, cell.scale * LOG2E, cell.seq_lens,
                     GQA=gqa, HEAD_DIM=D, BLOCK_D=attn_block_d(D), PAGE_TOKENS=L.page_tokens,
                     ELEM_BYTES=kv.element_size(), KV_FP8=False, NUM_KV_HEADS=L.num_kv_heads,
                     BLOCK_M=bm, BLOCK_Q=bm // gqa, BLOCK_N=bn, PIPELINE=on_gpu, PAGE_BITS=True, CARRY=carry,
                     RESOLVED=False, UNROLL_PAGES=False,
                     DOT_PRECISION="ieee" if cell.q.dtype == torch.float32 else "tf32", UPCAST_DOT=False,
                     num_warps=warps, num_stages=stages)
        return out
    return fn


def sdpa_runner(cell: Cell, timing: bool):
    from torch.nn.attention import SDPBackend
    q4 = cell.q.view(cell.B, cell.L, cell.hq, cell.D).transpose(1, 2)
    backend = None if timing else SDPBackend.MATH
    return peers.prepare_sdpa_prefill(q4, cell.k, cell.v, cell.scale, backend=backend)


def peer_row(cell: Cell, args, failures: list) -> tuple[dict, torch.Tensor]:
    """The cell's row with SDPA and resolve_pages timed (not in --smoke), and SDPA's output
    ``[T, Hq, D]`` (the check)."""
    T = cell.B * cell.L
    row = dict(cell=cell.label, B=cell.B, L=cell.L, prefix=cell.prefix, page_tokens=cell.page_tokens,
               hq=cell.hq, hkv=cell.k.shape[1], D=cell.D, flops=cell.flops, variants={}, skipped={})
    sdpa = sdpa_runner(cell, not args.smoke)
    ref = sdpa().transpose(1, 2).reshape(T, cell.hq, cell.D).clone()
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


def runner(name: str, cell: Cell, out: torch.Tensor, args, prev_kernel):
    """(the variant's call, the kernel it compiles)."""
    if name == "prev-default":
        return prev_runner(prev_kernel, cell, out, not args.smoke), prev_kernel
    po = cell.page_offsets if name == "default" else None

    def fn():
        return paged_prefill_attention(cell.q, cell.block_table, cell.seq_lens, cell.cu, cell.cache, layer=0,
                                       scale=cell.scale, out=out, max_seqlen_q=cell.L, page_offsets=po)
    return fn, paged_prefill_kernel


def run_variant(name: str, cell: Cell, row: dict, ref: torch.Tensor, args, failures: list, prev_kernel) -> None:
    """Check variant ``name`` on ``cell`` against SDPA's ``ref``, then time it; into ``row``."""
    if name == "prev-default" and prev_kernel is None:
        row["skipped"][name] = "no --prev-kernel file"
        return
    out = torch.empty_like(cell.q)
    fn, kernel = runner(name, cell, out, args, prev_kernel)
    cfg = prefill_launch_config(cell.D, cell.q.dtype, cell.hq // cell.k.shape[1], on_gpu=not args.smoke,
                                max_seqlen_q=cell.L)
    e = dict(config=dataclasses.asdict(cfg) if name != "prev-default" else "c562f19")
    row["variants"][name] = e
    before = compiled_keys(kernel)
    try:
        t1 = time.time()
        out.fill_(float("nan"))
        got = fn().clone()
        e["first_call_s"] = time.time() - t1
        e["kernels"] = kernel_stats(kernel, before)
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
    print(f"  {cell.label:14s} {name:24s} " + (f"{e['tflops']:6.1f} TF/s" if "tflops" in e else
                                                e.get("error", "checked")[:60]), flush=True)


def print_table(res: dict) -> None:
    rows = res["cells"]
    print(f"\n{res['env'].get('gpu', 'cpu')}; TFLOP/s (causal pairs); ratio = ours time / SDPA time")
    print(f"{'variant':24s} " + " ".join(f"{r['cell']:>14s}" for r in rows))
    print(f"{'sdpa flash':24s} " + " ".join(f"{r['sdpa']['tflops']:14.1f}" if "sdpa" in r else f"{'-':>14s}"
                                            for r in rows))
    print(f"{'resolve_pages us/call':24s} " + " ".join(f"{r['resolve_pages']['ms'] * 1e3:14.1f}"
                                                       if "resolve_pages" in r else f"{'-':>14s}" for r in rows))
    for n in VARIANTS:
        cells = []
        for r in rows:
            e = r["variants"].get(n)
            if e is None or "tflops" not in e:
                cells.append(f"{'-' if e is None else ('err' if 'error' in e else 'ok'):>14s}")
            else:
                ratio = f" {e['ours_over_sdpa']:.2f}x" if "ours_over_sdpa" in e else ""
                cells.append(f"{e['tflops']:8.1f}{ratio:>6s}")
        regs = sorted({k["n_regs"] for r in rows for k in r["variants"].get(n, {}).get("kernels", []) if "n_regs" in k})
        print(f"{n:24s} " + " ".join(cells) + (f"   regs {regs}" if regs else ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--rep", type=int, default=40, help="do_bench time per measurement, ms")
    ap.add_argument("--prev-kernel", help="c562f19's avmp_triton/kernels/paged_prefill.py (git show "
                                          "c562f19:avmp_triton/kernels/paged_prefill.py > FILE)")
    ap.add_argument("--only", nargs="+", choices=VARIANTS, help="these variants only")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny cells, checks only")
    args = ap.parse_args()
    t0 = time.time()
    device = "cpu" if args.smoke else "cuda"
    prev_kernel = load_prev_kernel(args.prev_kernel) if args.prev_kernel else None
    res = dict(env=environment() if not args.smoke else dict(gpu="cpu (interpreter)"), cells=[], tolerance=TOL,
               prev_kernel=args.prev_kernel)
    failures: list = []
    for shape in SMOKE_CELLS if args.smoke else CELLS:
        cell = build(*shape, device)
        row, ref = peer_row(cell, args, failures)
        res["cells"].append(row)
        for name in args.only or VARIANTS:
            run_variant(name, cell, row, ref, args, failures, prev_kernel)
    res["wall_s"] = time.time() - t0
    out = args.out or ("/tmp/prefill_variants_smoke.json" if args.smoke else None)
    finish(res, "sweep_prefill_variants", out, False, failures, print_table)


if __name__ == "__main__":
    main()
