"""Pick the launch shapes of the prefill kernels (GPU): chunked Mamba1 scan, chunked Mamba2 scan,
causal conv1d.

    python perf/tune_prefill.py [--op mamba1 mamba2 conv1d] [--out FILE]

One layer of the presets the benchmarks use (Mamba1: Jamba-1.5-Mini, d_inner 8192, d_state 16, z
gate; Mamba2 and conv1d: Nemotron-H-8B, 128 heads x 64, d_state 128, 8 groups, 10240 conv
channels), bf16 activations and states, packed batches (B requests x L tokens): (1 x 4096),
(4 x 1024), (16 x 512), fresh prefill (calls are idempotent), blocks scattered in an
AVMPAllocator arena. Every config is first checked against a trusted result on the same inputs
(scans: the time-serial kernel; conv: the default launch, itself checked against the reference by
the tests and bench_prefill.py): relative error of the output and the final states < 1e-2; then
timed with ``do_bench`` (median, L2 flushed). Bytes: activations in + out + states written, against
a device-to-device copy measured in the same run.
"""
import argparse
import dataclasses
import os
import sys
import time

import torch
import triton.testing

from avmp_triton import AVMPAllocator, PagedCache, get_preset
from avmp_triton.layout import ssm_block_layout
from avmp_triton.ops import mamba_prefill as MP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import copy_bandwidth, environment, finish  # noqa: E402

SHAPES = [(1, 4096), (4, 1024), (16, 512)]
CONFIGS = {
    "mamba1": [dict(chunk_size=c, block_d=d, num_warps=w) for c in (16, 32) for d in (8, 16, 32) for w in (4, 8)],
    "mamba2": [dict(chunk_size=c, block_p=p, num_warps=w) for c in (32, 64, 128) for p in (16, 32, 64)
               for w in (4, 8)],
    "conv1d": [dict(block_t=t, block_c=c, num_warps=w) for t in (8, 16, 32, 64) for c in (64, 128, 256, 512)
               for w in (2, 4, 8) if 1024 <= t * c <= 16384],
}
PRESET = {"mamba1": "jamba-1.5-mini", "mamba2": "nemotron-h-8b", "conv1d": "nemotron-h-8b"}
BLOCK_KEYS = ("block_d", "block_p", "block_c")   # the JSON's names of MambaPrefillConfig.block per op


def build(op: str, B: int, L: int):
    spec = dataclasses.replace(get_preset(PRESET[op]), ssm_dtype=torch.bfloat16, conv_dtype=torch.bfloat16)
    alloc = AVMPAllocator(spec, (2 * B + 8) * spec.ssm_block_bytes + (256 << 20), device="cuda", kv_fraction=0.0)
    live = alloc.alloc_ssm(2 * B + 4)
    handles = live[torch.randperm(live.numel(), device="cuda")[:B]].contiguous()
    T, bf = B * L, torch.bfloat16

    def r(*shape, dtype=bf):
        return torch.randn(*shape, device="cuda", dtype=dtype)

    if op == "mamba1":
        Di, N = spec.d_inner, spec.d_state
        inp = dict(x=r(T, Di), dt=r(T, Di), A=-torch.rand(Di, N, device="cuda") - 0.5, B=r(T, N), C=r(T, N),
                   D=r(Di, dtype=torch.float32), z=r(T, Di), dt_bias=torch.rand(Di, device="cuda") - 2.0)
        nbytes = 2 * T * Di * 4 + 2 * T * N * 2 + B * Di * N * 2
    elif op == "mamba2":
        H, P, N, G = spec.mamba_num_heads, spec.mamba_head_dim, spec.d_state, spec.n_groups
        inp = dict(x=r(T, H, P), dt=r(T, H), A=-torch.rand(H, device="cuda") - 0.5, B=r(T, G, N), C=r(T, G, N),
                   D=r(H, dtype=torch.float32), z=None, dt_bias=torch.rand(H, device="cuda") - 2.0)
        nbytes = 2 * T * H * P * 2 + T * H * 2 + 2 * T * G * N * 2 + B * H * P * N * 2
    else:
        C = spec.conv_channels
        inp = dict(x=r(T, C), weight=r(C, spec.d_conv), bias=r(C))
        nbytes = 2 * T * C * 2 + B * (spec.d_conv - 1) * C * 2
    cu = torch.arange(0, T + 1, L, dtype=torch.int32, device="cuda")
    init = torch.zeros(B, dtype=torch.int32, device="cuda")    # fresh prefill: calls are idempotent
    return spec, alloc, PagedCache.of(alloc), handles, inp, cu, init, nbytes


def config_of(**launch) -> MP.MambaPrefillConfig | None:
    """The ``MambaPrefillConfig`` of a launch as CONFIGS writes it (block_d / block_p / block_c are
    the config's ``block``); None for the op's default launch."""
    if not launch:
        return None
    return MP.MambaPrefillConfig(**{("block" if k in BLOCK_KEYS else k): v for k, v in launch.items()})


def run(op, cache, handles, inp, cu, init, config):
    if op == "conv1d":
        return MP.causal_conv1d_prefill(inp["x"], inp["weight"], handles, cu, init, cache, layer=0, bias=inp["bias"],
                                        activation="silu", config=config)
    fn = MP.mamba1_scan_prefill if op == "mamba1" else MP.mamba2_scan_prefill
    return fn(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], handles, cu, init, cache, layer=0, D=inp["D"],
              z=inp["z"], dt_bias=inp["dt_bias"], dt_softplus=True, config=config)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6))


def tune_op(op: str, copy: dict, rep: int, failures: list) -> dict:
    res = dict(op=op, preset=PRESET[op], shapes=[])
    for B, L in SHAPES:
        spec, alloc, cache, handles, inp, cu, init, nbytes = build(op, B, L)
        lay = ssm_block_layout(spec)
        start, size = ((lay.conv_offset(0), lay.conv_layer_bytes) if op == "conv1d"
                       else (lay.ssm_offset(0), lay.ssm_layer_bytes))
        offs = (alloc.handle_table[handles.long()] + start).tolist()

        def states():
            return torch.stack([alloc.arena[o:o + size].view(torch.bfloat16) for o in offs])

        trusted = config_of(algorithm="serial") if op != "conv1d" else None
        y0 = run(op, cache, handles, inp, cu, init, trusted).clone()
        s0 = states().clone()
        row = dict(B=B, L=L, bytes=nbytes, configs=[])
        if op != "conv1d":
            row["serial_ms"] = triton.testing.do_bench(lambda: run(op, cache, handles, inp, cu, init, trusted),
                                                       rep=rep)
        chunked = {} if op == "conv1d" else dict(algorithm="chunked")
        for launch in [{}] + CONFIGS[op]:
            e = dict(launch or {"default": True})
            config = config_of(**chunked, **launch)
            try:
                y = run(op, cache, handles, inp, cu, init, config)
                e.update(rel_err_y=rel(y, y0), rel_err_state=rel(states(), s0))
                if not (e["rel_err_y"] < 1e-2 and e["rel_err_state"] < 1e-2):
                    failures.append(f"{op} B={B} L={L} {e}")
                    e["check"] = "FAILED"
                else:
                    e["ms"] = triton.testing.do_bench(
                        lambda: run(op, cache, handles, inp, cu, init, config), rep=rep)
                    e["pct_copy"] = 100 * nbytes / (e["ms"] * 1e-3) / 1e9 / copy["gbps"]
            except Exception as exc:  # resources (registers / shared memory) of an oversized tile
                e["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            row["configs"].append(e)
        res["shapes"].append(row)
        alloc = cache = inp = None
        torch.cuda.empty_cache()
    return res


def print_table(res: dict) -> None:
    print(f"copy {res['copy']['gbps']:.0f} GB/s")
    for r in res["ops"]:
        for s in r["shapes"]:
            ok = sorted((c for c in s["configs"] if "ms" in c), key=lambda c: c["ms"])
            default = next((c for c in s["configs"] if c.get("default") and "ms" in c), None)
            ser = f"serial {s['serial_ms'] * 1e3:.0f} us; " if "serial_ms" in s else ""
            dflt = f"default {default['ms'] * 1e3:.0f} us; " if default else ""
            print(f"{r['op']} B={s['B']} L={s['L']}: {ser}{dflt}best:")
            for c in ok[:3]:
                shape = {k: v for k, v in c.items() if k in ("chunk_size", "block_d", "block_p", "block_t", "block_c",
                                                            "num_warps", "default")}
                print(f"   {shape}: {c['ms'] * 1e3:8.1f} us  {c['pct_copy']:5.1f}% copy")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", nargs="+", default=["mamba1", "mamba2", "conv1d"], choices=list(CONFIGS))
    ap.add_argument("--out")
    ap.add_argument("--rep", type=int, default=50)
    args = ap.parse_args()
    t0 = time.time()
    res = dict(env=environment(), copy=copy_bandwidth(2.0, 200), ops=[])
    failures = []
    for op in args.op:
        res["ops"].append(tune_op(op, res["copy"], args.rep, failures))
    res["wall_s"] = time.time() - t0
    finish(res, "tune_prefill", args.out, False, failures, print_table)


if __name__ == "__main__":
    main()
