"""Requests per GiB of cache with fp8 K/V pages against bf16 ones, on the presets, under AVMP's exact
pools and under vLLM 0.34.0's pool rule (``sim/engines.py: vllm_hybrid_geometry``).

    python perf/fp8_capacity.py [--out FILE]

Computed from the specs and the rules, not measured: a request of context L holds
- AVMP: one SSM block of its exact size and ``ceil(L / 16)`` KV pages of 16 tokens;
- vLLM: one block per Mamba layer group and ``ceil(L / block_size)`` blocks per attention group,
  every block ``block_size`` tokens of ``group_size`` layers, the block size the smallest multiple
  of 16 tokens whose one-layer page holds one Mamba layer's state. fp8 halves the attention page
  per token, so vLLM doubles its block size and a short request takes as many bytes as before.

The SSM state keeps its serving dtype (fp32 for Nemotron-H, as vLLM keeps it; the model's bf16
otherwise) and the conv state bf16.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os

import torch

from avmp_triton.sim import sweep
from avmp_triton.sim.engines import vllm_hybrid_geometry

PRESETS = ("nemotron-h-8b", "jamba-1.5-mini", "granite-4.0-h-small")
CONTEXTS = (512, 4096, 32768, 131072)
GIB = 1 << 30


def avmp_bytes(spec, ctx: int) -> int:
    return spec.ssm_block_bytes + math.ceil(ctx / spec.page_tokens) * spec.kv_page_bytes


def vllm_bytes(spec, ctx: int) -> int:
    g = vllm_hybrid_geometry(spec)
    blocks = g.attn_groups * math.ceil(ctx / g.block_size) + g.mamba_groups
    return blocks * g.attn_page_bytes * g.group_size


def rows(presets=PRESETS, contexts=CONTEXTS) -> list[dict]:
    out = []
    for name in presets:
        bf16 = sweep.serving_spec(name)
        fp8 = dataclasses.replace(bf16, kv_dtype=torch.float8_e4m3fn)
        for ctx in contexts:
            r = dict(model=name, context=ctx)
            for rule, size in (("avmp", avmp_bytes), ("vllm", vllm_bytes)):
                per_bf16, per_fp8 = GIB / size(bf16, ctx), GIB / size(fp8, ctx)
                r[rule] = dict(requests_per_gib_bf16=per_bf16, requests_per_gib_fp8=per_fp8, gain=per_fp8 / per_bf16)
            out.append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    table = rows()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(bench="fp8_capacity", kind="computed from the specs and the pool rules, not measured",
                           rows=table), f, indent=1)
    print(f"{'model':>20s} {'context':>8s} {'AVMP req/GiB bf16 -> fp8':>26s} {'gain':>6s} "
          f"{'vLLM req/GiB bf16 -> fp8':>26s} {'gain':>6s}")
    for r in table:
        a, v = r["avmp"], r["vllm"]
        print(f"{r['model']:>20s} {r['context']:8d} {a['requests_per_gib_bf16']:11.3f} -> {a['requests_per_gib_fp8']:10.3f}"
              f" {a['gain']:5.2f}x {v['requests_per_gib_bf16']:11.3f} -> {v['requests_per_gib_fp8']:10.3f} {v['gain']:5.2f}x")


if __name__ == "__main__":
    main()
