"""Head-dim benchmark (GPU): our paged decode and prefill attention at Zamba2-2.7B's head dim 160 and,
as the control, at 128 (same heads), each beside torch SDPA flash on contiguous K/V of the same values.

    python perf/bench_head_dims.py [--out FILE] [--rep MS] [--mem-budget-gb 60] [--fail-fast]
    TRITON_INTERPRET=1 python perf/bench_head_dims.py --dry-run --out /tmp/x.json    # CPU, control flow only

Zamba2-2.7B attention (32 q and 32 KV heads, bf16, 16-token pages), spec ``dataclasses.replace(
get_preset("zamba2-2.7b"), num_attn_layers=1, head_dim=D)``; pages in an ``AVMPAllocator`` sized by
bench_paged_attention's ``arena_plan`` (random bf16), handles ``torch.randperm``-ed into the block table,
``PagedCache.of(alloc)``, layer 0. Decode B (1, 16, 64) x ctx (512, 4096, 16384): ``paged_decode_attention``
(default config, recorded). Prefill, fresh causal prompts 1x4096, 4x1024, 16x512: ``kv_append`` (untimed),
then ``paged_prefill_attention``. SDPA gets the same K/V, contiguous. Ours is checked against SDPA's output
before timing (|ours - sdpa| <= atol + rtol |sdpa|; decode: bench_paged_attention's bf16 ``TOL``; prefill:
bench_prefill's attention ``TOL``, as its first rows average a few keys); a failure exits 1 after the JSON.
Cells over --mem-budget-gb are skipped (largest: decode B=64 ctx 16384 D=160, 43 GB). Timing as
perf/harness.py (CUDA graph, ``triton.testing.do_bench`` median/p20/p80, us); decode GB/s (live K+V + q +
out) and fraction of a device-to-device copy timed in the same run; prefill TFLOP/s with causal flops
2*2*Hq*D*sum(L^2)/2. JSON to --out (default perf/results/bench_head_dims_<gpu>.json), table last.
``--dry-run``: tiny shapes on the CPU, SDPA math backend in fp32, wall-clock times (meaningless).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import timeit
from types import SimpleNamespace

import torch
import triton
from torch.nn.attention import SDPBackend

from avmp_triton import AVMPAllocator, PagedCache, get_preset
from avmp_triton.ops import decode_config, decode_workspace, kv_append, paged_decode_attention, paged_prefill_attention
from avmp_triton.ops.paged_attention import DEFAULT_SM_COUNT

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_paged_attention as BA  # noqa: E402  (perf/bench_paged_attention.py)
import bench_prefill as BP  # noqa: E402
import peers  # noqa: E402
from harness import (QUANTILES, CheckFailed, bandwidth, commit, copy_bandwidth, finish, free_memory,  # noqa: E402
                     is_resource_error, record_failure, time_replayed)

SPEC, HQ, HKV, PAGE, DTYPE = "zamba2-2.7b", 32, 32, 16, torch.bfloat16
HEAD_DIMS = (160, 128)
CELLS = dict(decode=[(B, ctx) for B in (1, 16, 64) for ctx in (512, 4096, 16384)],
             prefill=[(1, 4096), (4, 1024), (16, 512)])
DRY_CELLS = dict(decode=[(1, 40), (3, 72)], prefill=[(1, 40), (2, 24)])


def head_dim_spec(D: int):
    base = get_preset(SPEC)
    assert (base.num_kv_heads, base.head_dim) == (HKV, 160), "preset no longer has Zamba2-2.7B's attention shape"
    return dataclasses.replace(base, num_attn_layers=1, head_dim=D, kv_dtype=DTYPE)


def build_pages(spec, B: int, ctx: int, device, seed: int) -> SimpleNamespace:
    """B requests of ctx tokens in an arena of random bf16, their pages scattered (randperm)."""
    torch.manual_seed(seed + 1000 * B + ctx + spec.head_dim)
    W = -(-ctx // PAGE)
    page, slab, slabs = BA.arena_plan(spec, B * W)
    alloc = AVMPAllocator(spec, slabs * slab, device=device, kv_fraction=1.0, slab_bytes=slab, page_tokens=PAGE)
    alloc.arena.view(DTYPE).normal_()
    h = alloc.alloc_kv(B * W)
    bt = h[torch.randperm(h.numel(), device=h.device)].view(B, W).contiguous()
    off = alloc.handle_table[bt.long()]
    assert bool((off % page == 0).all()), "page offsets are not multiples of the page size"
    k_pages, v_pages = BA.layer0_views(alloc, DTYPE)
    return SimpleNamespace(cache=PagedCache.of(alloc), bt=bt, phys=(off // page).long(), k_pages=k_pages,
                           v_pages=v_pages, seq_lens=torch.full((B,), ctx, dtype=torch.int32, device=device))


def gather_contiguous(p: SimpleNamespace, ctx: int) -> list[torch.Tensor]:
    """``[B, Hkv, ctx, D]`` K and V copied out of the pages, a request at a time."""
    (B, W), D = p.phys.shape, p.k_pages.shape[-1]
    kv = [torch.empty(B, HKV, ctx, D, dtype=DTYPE, device=p.phys.device) for _ in range(2)]
    for b in range(B):
        for dst, pages in zip(kv, (p.k_pages, p.v_pages)):
            dst[b] = pages[p.phys[b]].transpose(0, 1).reshape(HKV, W * PAGE, D)[:, :ctx]
    return kv


class Runner:
    def __init__(self, args):
        self.args, self.gpu, self.failures, self.copy_gbps = args, not args.dry_run, [], None
        self.device = "cuda" if self.gpu else "cpu"
        self.backend = SDPBackend.FLASH_ATTENTION if self.gpu else SDPBackend.MATH
        self.sdpa_dtype = DTYPE if self.gpu else torch.float32   # CPU math SDPA in bf16 rounds its scores
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count if self.gpu else DEFAULT_SM_COUNT

    def fail(self, row: dict, name: str, exc: BaseException) -> None:
        if isinstance(exc, CheckFailed):
            row.setdefault("check", exc.args[1])       # ours vs SDPA (a replay mismatch keeps that one)
        elif is_resource_error(exc):
            row["skipped"][name] = f"out of memory/resources: {str(exc).splitlines()[0][:200]}"
            return
        record_failure(row, name, exc, f"{row['kind']} D={row['head_dim']} {row['cell']}", self.failures,
                       self.args.fail_fast)

    def fits(self, row: dict, need: int) -> bool:
        row["need_bytes"] = need
        ok, why = BA.fits(need, int(self.args.mem_budget_gb * 1e9)) if self.gpu else (True, "")
        if not ok:
            row["skipped"]["cell"] = why
        return ok

    def time(self, fn, expect: torch.Tensor) -> dict:
        if self.gpu:
            e = time_replayed(fn, expect, self.args.rep, replay_atol=BA.TOL[DTYPE][0])
        else:  # dry run: two eager calls, wall clock
            ts = torch.tensor(timeit.repeat(fn, number=1, repeat=2), dtype=torch.float64) * 1e3
            med, p20, p80 = ts.quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
            e = dict(ms=med, p20_ms=p20, p80_ms=p80, timing="eager wall clock (CPU dry run)")
        return dict(e, us=e["ms"] * 1e3, p20_us=e["p20_ms"] * 1e3, p80_us=e["p80_ms"] * 1e3)

    def measure(self, row: dict, ours, sdpa, to_ours, nbytes: int | None, flops: float | None) -> None:
        """SDPA's output is the reference: ours is checked against it, then both are timed."""
        outs = {}
        for name, fn in (("sdpa", sdpa), ("ours", ours)):
            try:
                y = fn()
                if self.gpu:
                    torch.cuda.synchronize()
                if name == "ours":
                    ref = to_ours(outs["sdpa"]).float()
                    row["check"] = (BA.check("ours", y, ref, DTYPE) if row["kind"] == "decode" else
                                    BP.verdict("ours", dict(out=BP.close("ours", y, ref, BP.TOL["attention"]))))
                outs[name] = y.clone()
            except Exception as exc:
                self.fail(row, name, exc)
                if name == "sdpa":
                    return
        c = row.get("check", {})
        row["max_abs_err"] = c.get("max_abs_err_vs_ref", c.get("out", {}).get("max_abs_err"))
        for name, fn in (("ours", ours), ("sdpa", sdpa)):
            try:
                if name in outs:
                    e = row["kernels"][name] = self.time(fn, outs[name])
                    if flops:
                        e["tflops"] = flops / e["ms"] / 1e9
                    else:
                        bandwidth(e, nbytes, self.copy_gbps)
                        e["frac_of_copy"] = e["pct_of_copy"] / 100
            except Exception as exc:
                self.fail(row, name, exc)
        if {"ours", "sdpa"} <= row["kernels"].keys():
            row["ours_over_sdpa"] = row["kernels"]["ours"]["ms"] / row["kernels"]["sdpa"]["ms"]


def run_decode(R: Runner, row: dict, D: int, B: int, ctx: int) -> None:
    spec = head_dim_spec(D)
    live = 2 * B * ctx * HKV * D * DTYPE.itemsize
    row["bytes_model"] = nbytes = live + 2 * B * HQ * D * DTYPE.itemsize      # K+V live + q + out
    _, slab, slabs = BA.arena_plan(spec, B * -(-ctx // PAGE))
    if not R.fits(row, slab * slabs + live + (1 << 28)):
        return
    p = build_pages(spec, B, ctx, R.device, R.args.seed)
    q = torch.randn(B, HQ, D, device=R.device).to(DTYPE)
    cfg = decode_config(batch=B, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, page_tokens=PAGE, max_seq_len=ctx,
                        sm_count=R.sms)
    row["ours_config"] = dataclasses.asdict(cfg)
    ws, out = decode_workspace(B, HQ, D, cfg.num_splits, R.device), torch.empty_like(q)

    def ours():
        return paged_decode_attention(q, p.bt, p.seq_lens, p.cache, layer=0, out=out, workspace=ws,
                                      max_seq_len=ctx, config=cfg)

    qs, ks, vs = (t.to(R.sdpa_dtype) for t in (q, *gather_contiguous(p, ctx)))
    sdpa = peers.prepare_sdpa_contiguous(qs, ks, vs, D ** -0.5, backend=R.backend)
    R.measure(row, ours, sdpa, lambda y: y, nbytes, None)


def run_prefill(R: Runner, row: dict, D: int, B: int, L: int) -> None:
    spec = head_dim_spec(D)
    T, dev = B * L, R.device
    row["flops"] = flops = 2 * 2 * HQ * D * (B * L * L) / 2                   # causal: half of QK^T and PV
    _, slab, slabs = BA.arena_plan(spec, B * -(-L // PAGE))
    if not R.fits(row, slab * slabs + 4 * T * (HQ + HKV) * D * DTYPE.itemsize):
        return
    p = build_pages(spec, B, L, dev, R.args.seed)
    q, k, v = (torch.randn(T, H, D, device=dev).to(DTYPE) for H in (HQ, HKV, HKV))
    req = torch.arange(B, dtype=torch.int32, device=dev).repeat_interleave(L)
    kv_append(k, v, p.bt, req, torch.arange(L, dtype=torch.int32, device=dev).repeat(B), p.cache, layer=0)
    cu, out = torch.arange(0, T + 1, L, dtype=torch.int32, device=dev), torch.empty_like(q)

    def ours():
        return paged_prefill_attention(q, p.bt, p.seq_lens, cu, p.cache, layer=0, scale=D ** -0.5, out=out,
                                       max_seqlen_q=L)

    qs, ks, vs = (t.view(B, L, -1, D).transpose(1, 2).to(R.sdpa_dtype) for t in (q, k, v))
    sdpa = peers.prepare_sdpa_prefill(qs, ks.contiguous(), vs.contiguous(), D ** -0.5, backend=R.backend)
    row["sdpa_path"] = sdpa.path
    R.measure(row, ours, sdpa, lambda y: y.transpose(1, 2).reshape(T, HQ, D), None, flops)


def short_commit() -> str:
    try:
        return subprocess.check_output(["git", "-C", os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def print_table(res: dict) -> None:
    e, nan = res["env"], float("nan")
    print(f"\nGPU {e['gpu']}  torch {e['torch']}  triton {e['triton']}  commit {e['commit']} ({e['commit_full'][:48]})")
    print(f"copy ceiling {res['copy_bandwidth']['gbps']:.0f} GB/s. us: medians (ours p20-p80); decode GB/s and % of "
          f"copy, prefill TFLOP/s (causal); d160/128: ours at D=160 over D=128 (1.25x the K/V bytes)")
    print(f"{'kind':7s} {'cell':>12s} {'D':>4s} | {'ours us (p20-p80)':>27s} | {'sdpa us':>9s} | {'o/sdpa':>6s} | "
          f"{'ours':>10s} {'sdpa':>10s} | {'d160/128':>8s} | {'max|err|':>8s}")
    for r in res["cells"]:
        k, bad = r["kernels"], r.get("failures", {})

        def col(n, fmt, w):
            return fmt(k[n]) if n in k else f"{'FAIL' if n in bad else 'skip':>{w}s}"

        def metric(x):
            return f"{x['tflops']:7.0f} TF" if "tflops" in x else f"{x['gbps']:5.0f} {x['pct_of_copy']:3.0f}%"

        def us(x):
            return f"{x['us']:9.1f}" + (f" ({x['p20_us']:7.1f}-{x['p80_us']:7.1f})" if x is k.get("ours") else "")

        print(f"{r['kind']:7s} {r['cell']:>12s} {r['head_dim']:4d} | {col('ours', us, 27)} | {col('sdpa', us, 9)} | "
              f"{r.get('ours_over_sdpa', nan):6.2f} | "
              f"{col('ours', metric, 10)} {col('sdpa', metric, 10)} | {r.get('ours_160_over_128', nan):8.2f} | "
              f"{r.get('max_abs_err') or nan:8.2e}")
        for n, why in {**r["skipped"], **{n: f["error"] for n, f in bad.items()}}.items():
            print(f"    {n}: {str(why)[:160]}")


def run_cells(R: Runner, res: dict) -> None:
    for kind, run in (("decode", run_decode), ("prefill", run_prefill)):
        for B, n in (DRY_CELLS if R.args.dry_run else CELLS)[kind]:
            for D in HEAD_DIMS:
                t0 = time.time()
                row = dict(kind=kind, head_dim=D, cell=f"B{B} ctx{n}" if kind == "decode" else f"{B}x{n}", B=B,
                           **{"ctx" if kind == "decode" else "L": n}, kernels={}, skipped={})
                try:
                    run(R, row, D, B, n)
                except Exception as exc:
                    R.fail(row, "setup", exc)
                if R.gpu:
                    free_memory()
                row["cell_s"] = time.time() - t0
                res["cells"].append(row)
                print(f"{kind} D={D} {row['cell']}: " + "  ".join(f"{m} {v['us']:.1f} us" for m, v in
                                                                 row["kernels"].items()), flush=True)
    by = {(r["kind"], r["cell"], r["head_dim"]): r for r in res["cells"]}
    for r in res["cells"]:
        ctl = by.get((r["kind"], r["cell"], 128), {}).get("kernels", {}) if r["head_dim"] == 160 else {}
        r.update({f"{m}_160_over_128": r["kernels"][m]["ms"] / ctl[m]["ms"] for m in ctl if m in r["kernels"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms of timed replays per kernel)")
    ap.add_argument("--copy-gib", type=float, default=2.0, help="size of the copy that measures the ceiling")
    ap.add_argument("--mem-budget-gb", type=float, default=60.0)
    ap.add_argument("--fail-fast", action="store_true", help="stop at the first failed check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.dry_run != (os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")) or not (
            args.dry_run or torch.cuda.is_available()):
        raise SystemExit("needs a CUDA GPU and TRITON_INTERPRET unset; or --dry-run with TRITON_INTERPRET=1 (CPU)")
    t_start, R = time.time(), Runner(args)
    env = dict(gpu=torch.cuda.get_device_name() if R.gpu else "cpu-dry-run", torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda, commit=short_commit(), commit_full=commit())
    res = dict(env=env, dry_run=args.dry_run, cells=[],
               shapes=dict(spec=SPEC, num_q_heads=HQ, num_kv_heads=HKV, head_dims=list(HEAD_DIMS), page_tokens=PAGE,
                           dtype="bfloat16", attn_layers_per_page=1, layer_read=0, prefill_kv_append="untimed"),
               timing=dict(method="triton.testing.do_bench on a CUDA-graph replay of one call (L2 flushed before each)",
                           warmup_ms=25, rep_ms=args.rep, quantiles=QUANTILES),
               sdpa=dict(backend=R.backend.name, dtype=str(R.sdpa_dtype)),
               check=dict(reference="SDPA's output", decode_atol_rtol=BA.TOL[DTYPE],
                          prefill_relnorm_atol_rtol=BP.TOL["attention"]),
               bytes_model="decode: K+V of the live context read once + q + out",
               flops_model="prefill: 2*2*Hq*D*sum(L^2)/2 (causal)", mem_budget_gb=args.mem_budget_gb)
    res["copy_bandwidth"] = (copy_bandwidth(args.copy_gib, args.rep) if R.gpu else
                             dict(gbps=float("nan"), note="not measured in the CPU dry run"))
    R.copy_gbps = res["copy_bandwidth"]["gbps"]
    print(f"copy ceiling: {R.copy_gbps:.0f} GB/s", flush=True)
    run_cells(R, res)
    res["failures"], res["wall_s"] = R.failures, time.time() - t_start
    out = args.out or (os.path.join(tempfile.gettempdir(), "bench_head_dims_dry_run.json") if args.dry_run else None)
    finish(res, "bench_head_dims", out, False, R.failures, print_table)


if __name__ == "__main__":
    main()
