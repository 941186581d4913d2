"""Pick the launch shape (CHUNK, BLOCK_D, num_warps) of the chunked Mamba1 prefill scan (GPU).

    python perf/tune_mamba1_prefill.py [--out FILE]

Jamba-1.5-Mini layer (d_inner 8192, d_state 16, z gate, bf16 activations, bf16 state), packed
batches (B requests x L tokens): (1 x 4096), (4 x 1024), (16 x 512), blocks scattered in an
AVMPAllocator arena. Every config is first checked against the time-serial kernel on the same
inputs (output and final states, relative error), then timed with ``do_bench`` (median, L2
flushed); the serial kernel is timed too. Bytes: x, dt, z, B, C read + y written + the states
written once, against a device-to-device copy measured in the same run.
"""
import argparse
import dataclasses
import os
import sys
import time

import torch
import triton.testing

from avmp_triton import AVMPAllocator, get_preset
from avmp_triton.layout import ssm_block_layout
from avmp_triton.ops.mamba_prefill import mamba1_prefill_launch_config, mamba1_scan_prefill

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import finish  # noqa: E402
from bench_attention import copy_bandwidth, environment  # noqa: E402

SHAPES = [(1, 4096), (4, 1024), (16, 512)]
CONFIGS = [(c, d, w) for c in (8, 16, 32) for d in (8, 16, 32, 64) for w in (2, 4, 8) if c * d <= 1024]


def build(B: int, L: int):
    spec = dataclasses.replace(get_preset("jamba-1.5-mini"), ssm_dtype=torch.bfloat16)
    alloc = AVMPAllocator(spec, (2 * B + 8) * spec.ssm_block_bytes + (256 << 20), device="cuda", kv_fraction=0.0)
    live = alloc.alloc_ssm(2 * B + 4)
    handles = live[torch.randperm(live.numel(), device="cuda")[:B]].contiguous()
    T, Di, N = B * L, spec.d_inner, spec.d_state
    bf = torch.bfloat16
    inp = dict(x=torch.randn(T, Di, device="cuda", dtype=bf), dt=torch.randn(T, Di, device="cuda", dtype=bf),
               A=-torch.rand(Di, N, device="cuda") - 0.5, B=torch.randn(T, N, device="cuda", dtype=bf),
               C=torch.randn(T, N, device="cuda", dtype=bf), D=torch.randn(Di, device="cuda"),
               z=torch.randn(T, Di, device="cuda", dtype=bf), dt_bias=torch.rand(Di, device="cuda") - 2.0)
    cu = torch.arange(0, T + 1, L, dtype=torch.int32, device="cuda")
    init = torch.zeros(B, dtype=torch.int32, device="cuda")    # fresh prefill: calls are idempotent
    nbytes = 2 * T * Di * 4 + 2 * T * N * 2 + B * Di * N * 2
    return spec, alloc, handles, inp, cu, init, nbytes


def run(spec, alloc, handles, inp, cu, init, **launch):
    return mamba1_scan_prefill(alloc.arena, alloc.handle_table, handles, spec, 0, inp["x"], inp["dt"], inp["A"],
                               inp["B"], inp["C"], inp["D"], inp["z"], inp["dt_bias"], cu_seqlens=cu,
                               has_initial_state=init, dt_softplus=True, **launch)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--rep", type=int, default=100)
    args = ap.parse_args()
    t0 = time.time()
    copy = copy_bandwidth(2.0, 200)
    res = dict(env=environment(), copy=copy, default=mamba1_prefill_launch_config(8192, 16), shapes=[])
    failures = []
    for B, L in SHAPES:
        spec, alloc, handles, inp, cu, init, nbytes = build(B, L)
        offs = alloc.handle_table[handles.long()] + ssm_block_layout(spec).ssm_offset(0)
        lay_bytes = ssm_block_layout(spec).ssm_layer_bytes

        def states():
            return torch.stack([alloc.arena[o:o + lay_bytes].view(torch.bfloat16) for o in offs.tolist()])

        y_ser = run(spec, alloc, handles, inp, cu, init, algorithm="serial").clone()
        s_ser = states().clone()
        ser_ms = triton.testing.do_bench(lambda: run(spec, alloc, handles, inp, cu, init, algorithm="serial"),
                                         rep=args.rep)
        row = dict(B=B, L=L, bytes=nbytes, serial_ms=ser_ms, configs=[])
        for chunk, block_d, warps in CONFIGS:
            launch = dict(algorithm="chunked", chunk_size=chunk, block_d=block_d, num_warps=warps)
            e = dict(chunk=chunk, block_d=block_d, num_warps=warps)
            try:
                y = run(spec, alloc, handles, inp, cu, init, **launch)
                e.update(rel_err_y=rel(y, y_ser), rel_err_state=rel(states(), s_ser))
                if not (e["rel_err_y"] < 1e-2 and e["rel_err_state"] < 1e-2):
                    failures.append(f"B={B} L={L} {e}")
                    e["check"] = "FAILED"
                else:
                    e["ms"] = triton.testing.do_bench(lambda: run(spec, alloc, handles, inp, cu, init, **launch),
                                                      rep=args.rep)
                    e["pct_copy"] = 100 * nbytes / (e["ms"] * 1e-3) / 1e9 / copy["gbps"]
            except Exception as exc:  # resources (registers / shared memory) of an oversized tile
                e["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            row["configs"].append(e)
        res["shapes"].append(row)
        alloc = inp = None
        torch.cuda.empty_cache()
    res["wall_s"] = time.time() - t0

    def table(r):
        print(f"copy {r['copy']['gbps']:.0f} GB/s; default (chunk, block_d, warps) = {r['default']}")
        for s in r["shapes"]:
            ok = sorted((c for c in s["configs"] if "ms" in c), key=lambda c: c["ms"])
            print(f"B={s['B']} L={s['L']}: serial {s['serial_ms'] * 1e3:.0f} us; best chunked:")
            for c in ok[:4]:
                print(f"   chunk {c['chunk']:3d} block_d {c['block_d']:3d} warps {c['num_warps']}: "
                      f"{c['ms'] * 1e3:8.1f} us  {c['pct_copy']:5.1f}% copy  {s['serial_ms'] / c['ms']:5.1f}x serial")
    finish(res, "tune_mamba1_prefill", args.out, False, failures, table)


if __name__ == "__main__":
    main()
