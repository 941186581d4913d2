"""Where the GPU time of a CUDA-graph decode step goes, kernel by kernel (GPU only).

    python perf/profile_decode_kernels.py [--out FILE] [--batch 64] [--prompt 256] [--replays 20]

Nemotron-H-8B at real size, random bf16 weights, fp32 SSM state, the LLM engine with ``avmp`` and
CUDA graphs, B requests of ``--prompt`` tokens. At the tenth decode step the step is replayed
``--replays`` times under torch's profiler (the same rows, each replay appending at the same
position and advancing the states again: the requests' later tokens are meaningless, their units
are still their own). Per replay it reports each kernel's device time, grouped into families (the
weight matmuls, our paged attention, Mamba, conv, the rest), the sum against the replay's wall time
(the gaps between kernels) and against the step's roofline: the weight matmuls alone against
weight bytes over the copy bandwidth measured in the same run. Writes JSON (--out), prints a table.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from avmp_triton import LLM, SamplingParams
from profile_serve_step import load_8b, step_bytes

# substrings of kernel names, first match wins; cuBLAS/CUTLASS names vary by version
FAMILIES = (
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk")),
    ("paged attention", ("paged_decode", "paged_prefill")),
    ("kv append", ("kv_append",)),
    ("mamba state update", ("mamba1_state_update", "mamba2_state_update")),
    ("conv state update", ("causal_conv1d_update",)),
    ("norm / elementwise / other", ("",)),
)


def family(name: str) -> str:
    low = name.lower()
    return next(f for f, keys in FAMILIES if any(k in low for k in keys))


def profile_replays(llm: LLM, prompts: list, replays: int, at_step: int = 10) -> dict:
    """Wrap the engine's graph runner so that its ``at_step``-th call is replayed ``replays``
    times under the profiler and timed; returns the profiler's kernel table and the wall times."""
    graphs = llm.graphs
    run = graphs.run
    found: dict = {}

    def wrapper(*a, **k):
        found["calls"] = found.get("calls", 0) + 1
        if found["calls"] != at_step:
            return run(*a, **k)
        walls = []
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                t = time.perf_counter()
                out = run(*a, **k)
                torch.cuda.synchronize()
                walls.append(time.perf_counter() - t)
        found.update(prof=prof, walls=walls, bucket=graphs.bucket(len(a[1])))
        return out

    graphs.run = wrapper
    try:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=at_step + 2, ignore_eos=True))
    finally:
        graphs.run = run
    if "prof" not in found:
        raise RuntimeError(f"the engine made {found.get('calls', 0)} graph decode calls, fewer than {at_step}")
    return found


def kernel_table(prof, replays: int) -> list[dict]:
    per = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time_total > 0:
            name = ev.name if len(ev.name) < 120 else ev.name[:117] + "..."
            per[name][0] += ev.device_time_total
            per[name][1] += 1
    rows = [dict(kernel=k, family=family(k), us_per_step=v[0] / replays, launches_per_step=v[1] / replays)
            for k, v in per.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--replays", type=int, default=20)
    args = ap.parse_args()
    model, weight_bytes, bw, env = load_8b()
    B = args.batch
    llm = LLM(model, allocator="avmp", memory_gib=40, max_num_seqs=B, max_model_len=args.prompt + 32)
    prompts = torch.randint(0, model.config.vocab_size, (B, args.prompt),
                            generator=torch.Generator().manual_seed(B)).tolist()
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))  # compile, capture
    found = profile_replays(llm, prompts, args.replays)
    kernels = kernel_table(found["prof"], args.replays)
    fams = collections.Counter()
    for r in kernels:
        fams[r["family"]] += r["us_per_step"]
    busy = sum(fams.values())
    wall = statistics.median(found["walls"]) * 1e6
    roof = step_bytes(llm.allocator.spec, B, args.prompt + 10, weight_bytes) / bw * 1e6
    res = dict(bench="profile_decode_kernels", env=env, batch=B, bucket=found["bucket"], prompt=args.prompt,
               replays=args.replays, replay_wall_us=wall, kernel_busy_us=busy, roofline_us=roof,
               weights_over_copy_us=weight_bytes / bw * 1e6, families_us=dict(fams), kernels=kernels)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    print(f"{env['gpu']}  copy {bw / 1e12:.2f} TB/s  B={B} (bucket {found['bucket']})  ctx {args.prompt + 10}")
    for r in kernels[:12]:
        print(f"  {r['us_per_step']:9.1f} us  x{r['launches_per_step']:5.0f}  {r['family']:<26s} {r['kernel'][:70]}")
    print(f"{'family':<28s} {'us/step':>9s} {'share':>7s}")
    for f, us in fams.most_common():
        print(f"{f:<28s} {us:9.1f} {us / busy:7.1%}")
    print(f"kernels {busy:.1f} us, replay wall {wall:.1f} us (gaps {wall - busy:.1f}), roofline {roof:.1f} us; "
          f"weights over copy {res['weights_over_copy_us']:.1f} us vs matmul {fams['matmul']:.1f} us")


if __name__ == "__main__":
    main()
