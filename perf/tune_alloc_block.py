"""Pick the (BLOCK, num_warps) table of the single-program allocator kernels (GPU).

Times one alloc_kv(n) + free pair (CUDA graph, median) for each shape and n; prints the best per n.
"""
import json
import sys

import torch

import avmp_triton.memory.allocator as A
from avmp_triton import AVMPAllocator, get_preset
from perf.bench_alloc import _per_call_us

spec = get_preset("jamba-1.5-mini")
alloc = AVMPAllocator(spec, 8 << 30, device="cuda")
pre = alloc.alloc_kv(8192)
alloc.free(pre[torch.randperm(pre.numel(), device="cuda")[:4096]].contiguous())
rows = []
for n in (1, 64, 256, 1024, 4096):
    out = torch.empty(n, dtype=torch.int32, device="cuda")
    for block in (256, 1024, 2048, 4096):
        for warps in (4, 8, 16, 32):
            if block < 32 * warps:
                continue
            A._launch_shape = lambda _n, b=block, w=warps: (b, w)

            def pair():
                alloc._launch_alloc(A.KIND_KV, n, out)
                alloc._launch_free(out, 0)

            us = _per_call_us(pair)
            assert int(alloc._status[0]) == 0
            rows.append(dict(n=n, block=block, warps=warps, us_pair=us))
json.dump(rows, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tune.json", "w"), indent=1)
for n in (1, 64, 256, 1024, 4096):
    r = sorted((x for x in rows if x["n"] == n), key=lambda x: x["us_pair"])
    print(n, [(x["block"], x["warps"], round(x["us_pair"], 2)) for x in r[:5]], "worst", round(r[-1]["us_pair"], 2))
