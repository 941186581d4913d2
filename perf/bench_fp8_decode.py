"""fp8 KV pages on the GPU: decode attention over float8_e4m3fn pages against bf16 pages of the same
K/V and SDPA flash on contiguous bf16 K/V, side by side in one run, with the error fp8 adds.

    python perf/bench_fp8_decode.py [--out FILE] [--batch 1 16 64] [--ctx 512 4096 32768] [--rep 100]

Jamba-1.5-Mini's attention shape (Hq=32, Hkv=8, D=128), pages of 16 tokens holding one attention
layer, taken from an ``AVMPAllocator`` and shuffled into the block table. One random bf16 K/V per
cell goes into both arenas through ``kv_append`` (the fp8 one with scales amax / 448 per kv head).
Each output is checked against an fp64 reference over the unquantised K/V, one request at a time (max
and mean abs error, recorded) before timing; times are CUDA-graph replays (``perf/harness.py``), bandwidth
counts the K/V bytes of the live context read once against a device copy measured in the same run.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import harness as H  # perf/harness.py
from avmp_triton import AVMPAllocator, HybridModelSpec, PagedCache
from avmp_triton.ops import kv_append, paged_decode_attention

HQ, HKV, D, PAGE = 32, 8, 128, 16
FP8 = torch.float8_e4m3fn


def spec(kv_dtype: torch.dtype) -> HybridModelSpec:
    return HybridModelSpec(name=f"jamba-attn-{kv_dtype}", num_attn_layers=1, num_kv_heads=HKV, head_dim=D,
                           kv_dtype=kv_dtype, num_mamba_layers=1, mamba_version=1, d_inner=16, d_state=4,
                           conv_dtype=torch.bfloat16, ssm_dtype=torch.bfloat16)


def paged(kv: torch.Tensor, kv_dtype: torch.dtype, gen: torch.Generator):
    """The cell's K/V ``[2, B, ctx, Hkv, D]`` appended into pages of a new arena; returns (cache,
    block table, scales or None)."""
    _, B, ctx = kv.shape[:3]
    s = spec(kv_dtype)
    pages = B * (ctx // PAGE)
    slab = 64 * s.kv_page_bytes
    alloc = AVMPAllocator(s, (pages // 64 + 4) * slab, slab_bytes=slab, kv_fraction=1 - 2 / (pages // 64 + 4),
                          device="cuda")
    handles = alloc.alloc_kv(pages)
    handles = handles[torch.randperm(pages, generator=gen).cuda()]
    bt = handles.view(B, ctx // PAGE).contiguous()
    scale = None
    if kv_dtype == FP8:
        scale = (kv.abs().amax(dim=(1, 2, 4)).float() / 448).contiguous()          # [2, Hkv]
    req = torch.arange(B, dtype=torch.int32, device="cuda").repeat_interleave(ctx)
    pos = torch.arange(ctx, dtype=torch.int32, device="cuda").repeat(B)
    cache = PagedCache.of(alloc)
    kv_append(kv[0].reshape(-1, HKV, D), kv[1].reshape(-1, HKV, D), bt, req, pos, cache, layer=0, kv_scale=scale)
    return cache, bt, scale


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    e = (out.double() - ref).abs()
    return dict(max_abs_err=float(e.max()), mean_abs_err=float(e.mean()), ref_std=float(ref.std()))


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fp64 attention of each request alone: the whole batch in fp64 would need 4x the bf16 K/V
    (64 GiB at B=64 ctx 32768) on top of the arenas."""
    return torch.cat([F.scaled_dot_product_attention(q[b:b + 1, :, None].double(), k[b:b + 1].double(),
                                                     v[b:b + 1].double(), enable_gqa=True)[:, :, 0]
                      for b in range(q.shape[0])])


def run_cell(B: int, ctx: int, args, copy_gbps: float) -> dict:
    gen = torch.Generator().manual_seed(B * 7 + ctx)
    kv = torch.randn(2, B, ctx, HKV, D, generator=gen).to("cuda", torch.bfloat16)
    q = torch.randn(B, HQ, D, generator=gen).to("cuda", torch.bfloat16)
    seq = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    k_c, v_c = (x.transpose(1, 2).contiguous() for x in kv)                     # [B, Hkv, ctx, D]
    ref = reference(q, k_c, v_c)
    row = dict(batch=B, ctx=ctx)
    kv_bytes = 2 * B * ctx * HKV * D
    for name, dtype in (("ours_bf16", torch.bfloat16), ("ours_fp8", FP8)):
        cache, bt, scale = paged(kv, dtype, gen)
        call = lambda: paged_decode_attention(q, bt, seq, cache, layer=0, kv_scale=scale)  # noqa: E731
        out = call()
        row[name] = dict(**errors(out, ref), **H.time_replayed(call, out, args.rep))
        H.bandwidth(row[name], kv_bytes * dtype.itemsize, copy_gbps)
        cache = bt = None
        H.free_memory()
    sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k_c, v_c, enable_gqa=True)  # noqa: E731
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        out = sdpa()
        row["sdpa_flash_contiguous_bf16"] = dict(**errors(out[:, :, 0], ref), **H.time_replayed(sdpa, out, args.rep))
    H.bandwidth(row["sdpa_flash_contiguous_bf16"], kv_bytes * 2, copy_gbps)
    row["fp8_speedup_vs_bf16"] = row["ours_bf16"]["ms"] / row["ours_fp8"]["ms"]
    return row


def print_table(res: dict) -> None:
    print(f"{res['env']['gpu']}: decode, Hq {HQ} Hkv {HKV} D {D}, pages of {PAGE}; copy {res['copy']['gbps']:.0f} GB/s")
    print(f"{'B':>4s} {'ctx':>6s} {'bf16 us':>9s} {'fp8 us':>9s} {'fp8/bf16':>9s} {'SDPA us':>9s} {'bf16 %cp':>9s} "
          f"{'fp8 %cp':>8s} {'fp8 err max / mean':>20s} {'bf16 err max':>13s}")
    for r in res["rows"]:
        a, b, s = r["ours_bf16"], r["ours_fp8"], r["sdpa_flash_contiguous_bf16"]
        print(f"{r['batch']:4d} {r['ctx']:6d} {a['ms'] * 1e3:9.1f} {b['ms'] * 1e3:9.1f} {r['fp8_speedup_vs_bf16']:8.2f}x "
              f"{s['ms'] * 1e3:9.1f} {a['pct_of_copy']:8.0f}% {b['pct_of_copy']:7.0f}% "
              f"{b['max_abs_err']:9.2e} / {b['mean_abs_err']:8.2e} {a['max_abs_err']:13.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--ctx", type=int, nargs="+", default=[512, 4096, 32768])
    ap.add_argument("--rep", type=int, default=100)
    args = ap.parse_args()
    t0 = time.perf_counter()
    copy = H.copy_bandwidth(2.0, args.rep)
    res = dict(bench="fp8_decode", env=H.environment(), copy=copy, rows=[])
    failures = []
    for B in args.batch:
        for ctx in args.ctx:
            row = run_cell(B, ctx, args, copy["gbps"])
            res["rows"].append(row)
            # the bf16 paths must agree with the fp64 reference to bf16 rounding; fp8 is recorded
            for name in ("ours_bf16", "sdpa_flash_contiguous_bf16", "ours_fp8"):
                bound = 0.25 if name == "ours_fp8" else 0.02
                if not row[name]["max_abs_err"] <= bound * row[name]["ref_std"] * 10:
                    failures.append(f"B={B} ctx={ctx} {name}: max abs error {row[name]['max_abs_err']:.3e}")
    res["wall_s"] = time.perf_counter() - t0
    H.finish(res, "fp8_decode", args.out, False, failures, print_table)


if __name__ == "__main__":
    main()
