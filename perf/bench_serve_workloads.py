"""Serving workloads on the GPU: AVMP against the SGLang-rule and the tuned static split, the same
engine and kernels, at two memory budgets and three arrival rates, over several seeds.

    python perf/bench_serve_workloads.py [--out FILE] [--workloads sharegpt mixed_long]
        [--budgets k32 h200] [--loads x0.5 x1 x2] [--seeds 0 1 2] [--num-requests 200]
        [--allocators avmp sglang_static static_tuned] [--time-limit 1500]

Nemotron-H-8B at real size, random bf16 weights, SSM state in fp32 (as vLLM 0.34 keeps it for
this model), CUDA-graph decode. Every choice below is the simulator sweep's (``sim/sweep.py``), so
the served numbers line up with the simulated ones:

- budgets: ``kK`` holds K typical requests of the workload (pressure), ``h200`` the memory one
  H200 leaves after the weights (``sweep.deployment_bytes``);
- loads: multiples of the rate the vLLM-rule allocator sustains at that budget in the simulator
  (``sweep.setup_group``), requests arriving as a Poisson process (``make_workload``);
- ``static_tuned``: the split ``sweep.tuned_split`` finds on the held-out seeds 100 and 101;
- the vLLM-rule allocator (``vllm_hybrid``) cannot serve yet (its SSM state spans several units)
  and is not run.

Requests are the workload's lengths over random token ids, greedy, EOS ignored, lengths cut to
``--max-model-len``. Per run: output tokens/s, requests/s, TTFT and TPOT p50/p99, goodput,
preemptions and capacity moves; per (workload, budget, load, allocator) the mean and a 95% t
interval over the seeds. The JSON is rewritten after every run (a time limit leaves what ran).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import time

import numpy as np
import torch
import triton
import transformers

from avmp_triton import LLM, SamplingParams
from avmp_triton.cli_serve import trace_requests
from avmp_triton.models.loading import random_model
from avmp_triton.serve.llm import KV_CACHE_DTYPES
from avmp_triton.sim import sweep

METRICS = ("output_tokens_per_s", "requests_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
           "goodput_requests_per_s", "preemptions", "recomputed_tokens", "migrations", "bytes_moved", "completed")
# two-sided 95% t quantiles by degrees of freedom (standard tables); the normal 1.96 past 30
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
       29: 2.045, 30: 2.042}


def interval(xs: list[float]) -> dict:
    """Mean and the half-width of its 95% t interval (None with one sample)."""
    a = np.asarray(xs, dtype=np.float64)
    half = None
    if len(a) > 1:
        half = float(T95.get(len(a) - 1, 1.96) * a.std(ddof=1) / math.sqrt(len(a)))
    return dict(mean=float(a.mean()), ci95=half, n=len(a))


def summarize(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["workload"], r["budget"], r["load"], r["allocator"]), []).append(r)
    return [dict(workload=w, budget=b, load=ld, allocator=a,
                 **{k: interval([r["metrics"][k] for r in rs]) for k in ("output_tokens_per_s", "tpot_p99_s",
                                                                          "ttft_p99_s", "preemptions")})
            for (w, b, ld, a), rs in groups.items()]


def env() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                transformers=transformers.__version__, python=platform.python_version(), commit=commit)


def build_llm(model, allocator: str, capacity: int, split, args) -> LLM:
    kw = dict(ssm_fraction=split.ssm_fraction) if allocator == "static_tuned" else {}
    return LLM(model, allocator=allocator, memory_gib=capacity / 2**30, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=sweep.MAX_NUM_BATCHED_TOKENS, max_model_len=args.max_model_len,
               kv_cache_dtype=args.kv_cache_dtype, **kw)


def run_group(model, spec, workload: str, budget_label: str, args, out: dict, deadline: float) -> None:
    """Every allocator, load and seed of one (workload, budget): an LLM per allocator (its graphs
    captured once), then each trace through it."""
    budget = sweep.make_budget(spec, workload, budget_label)
    setup = sweep.setup_group(spec.name, workload, budget_label, args.num_requests,
                              tune="static_tuned" in args.allocators)
    out["groups"].append(dict(workload=workload, budget=budget_label, capacity_bytes=budget.capacity_bytes,
                              describe=budget.describe(), capacity_rps=setup.capacity_rps,
                              tuned_ssm_fraction=setup.tuned.ssm_fraction if setup.tuned else None))
    for allocator in args.allocators:
        if time.monotonic() > deadline:
            return
        llm = build_llm(model, allocator, budget.capacity_bytes, setup.tuned, args)
        llm.generate([[1, 2, 3]] * 2, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))   # warm-up
        for load in args.loads:
            rate = sweep.parse_load(load) * setup.capacity_rps
            for seed in args.seeds:
                if time.monotonic() > deadline:
                    break
                prompts, params, arrivals = trace_requests(workload, seed, args.num_requests, rate,
                                                           model.config.vocab_size, args.max_model_len)
                t0 = time.perf_counter()
                llm.generate(prompts, params, arrival_s=arrivals)
                m = llm.last_metrics.__dict__
                out["runs"].append(dict(workload=workload, budget=budget_label, load=load, rate_rps=rate,
                                        allocator=allocator, seed=seed, wall_s=time.perf_counter() - t0,
                                        graph_steps=llm.last_graph_steps, steps=llm.last_steps,
                                        metrics={k: m[k] for k in METRICS}))
                write(out, args.out)
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def write(out: dict, path: str | None) -> None:
    out["summary"] = summarize(out["runs"])
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def _fmt(d: dict, scale: float = 1.0) -> str:
    half = f" ±{d['ci95'] * scale:6.1f}" if d["ci95"] is not None else " " * 8
    return f"{d['mean'] * scale:8.1f}{half}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--workloads", nargs="+", default=["sharegpt", "mixed_long"])
    ap.add_argument("--budgets", nargs="+", default=["k32", "h200"])
    ap.add_argument("--loads", nargs="+", default=["x0.5", "x1", "x2"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--allocators", nargs="+", default=["avmp", "sglang_static", "static_tuned"])
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=tuple(KV_CACHE_DTYPES))
    ap.add_argument("--time-limit", type=float, default=1500.0, help="seconds; no new run starts after it")
    args = ap.parse_args()
    deadline = time.monotonic() + args.time_limit
    model = random_model("nemotron-h-8b", dtype=torch.bfloat16, device="cuda", seed=0).eval()
    spec = sweep.serving_spec("nemotron-h-8b")
    out = dict(bench="serve_workloads", env=env(), model="nemotron-h-8b (random bf16, fp32 SSM state)",
               args=vars(args), groups=[], runs=[])
    for workload in args.workloads:
        for budget in args.budgets:
            run_group(model, spec, workload, budget, args, out, deadline)
    write(out, args.out)
    print(f"{out['env']['gpu']}: {len(out['runs'])} runs")
    print(f"{'workload':>10s} {'budget':>6s} {'load':>5s} {'allocator':>14s} {'out tok/s':>16s} {'TPOT p99 ms':>16s} "
          f"{'preempt':>8s}")
    for s in out["summary"]:
        t, p = s["output_tokens_per_s"], s["tpot_p99_s"]
        print(f"{s['workload']:>10s} {s['budget']:>6s} {s['load']:>5s} {s['allocator']:>14s} {_fmt(t)} {_fmt(p, 1e3)} "
              f"{s['preemptions']['mean']:8.1f}")


if __name__ == "__main__":
    main()
