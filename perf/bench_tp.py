"""Tensor-parallel serving against one GPU at the same total memory (issue 14's two-GPU run).

    python perf/bench_tp.py [--tp 2] [--model nemotron-h-8b] [--memory-gib 48] [--requests 64]
                            [--prompt 512] [--output 64] [--out FILE]
    TRITON_INTERPRET=1 python perf/bench_tp.py --backend gloo --model nemotron-h-tiny --dtype float32 \\
        --memory-gib 0.01 --requests 4 --prompt 16 --output 8     # a CPU smoke run, no figures

Each configuration (TP=1, then TP=``--tp``) runs in its own processes, one per rank, over NCCL on
GPUs 0..tp-1 (gloo on the CPU): every rank builds the same random model, keeps its shard
(``shard_model``), and serves the same requests through the LLM engine with ``--memory-gib``
divided over the ranks. After a warm-up, median of ``--repeats`` timed runs: output tokens/s, TTFT
and TPOT p50/p99, the host time outside the model steps (scheduler and the replicated allocator),
and on GPUs the share of the step's kernel time in NCCL kernels (torch's profiler over one more
run). Greedy tokens of TP=``--tp`` are compared with TP=1's (bf16 reductions in another order may
flip near-tied argmaxes of random weights; fp32 runs match). Rank 0 writes JSON and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import triton

import harness as H  # perf/harness.py
from avmp_triton import LLM, SamplingParams
from avmp_triton.engine.metrics import percentile
from avmp_triton.models.loading import random_model
from avmp_triton.models.tensor_parallel import shard_model


def _nccl_share(llm: LLM, prompts: list, sp: SamplingParams) -> float | None:
    """NCCL kernels' share of all kernel time in one generate (GPU only)."""
    if not torch.cuda.is_available():
        return None
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        llm.generate(prompts, sp)
        torch.cuda.synchronize()
    total = nccl = 0.0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total += ev.device_time_total
            nccl += ev.device_time_total if "nccl" in ev.name.lower() else 0.0
    return nccl / total if total else None


def _rank(rank: int, world: int, args, store: str, result_file: str) -> None:
    gpu = args.backend == "nccl"
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group(args.backend, init_method="file://" + store, rank=rank, world_size=world)
    dev = f"cuda:{rank}" if gpu else "cpu"
    full = random_model(args.model, dtype=getattr(torch, args.dtype), device=dev, seed=0).eval()
    shard = shard_model(full)
    del full
    llm = LLM(shard, memory_gib=args.memory_gib / world, max_num_seqs=args.requests,
              max_model_len=args.prompt + args.output, enforce_eager=not gpu)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, shard.config.vocab_size, (args.requests, args.prompt), generator=g).tolist()
    sp = SamplingParams(temperature=0.0, max_tokens=args.output, ignore_eos=True)
    llm.generate([p[:16] for p in prompts[:2]], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    runs = []
    for _ in range(args.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp)
        if gpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        runs.append(dict(wall_s=wall, host_outside_steps_s=wall - sum(llm.last_step_seconds.values()),
                         ttft=[o.ttft_s for o in outs], tpot=[o.tpot_s for o in outs]))
    share = _nccl_share(llm, prompts, sp) if world > 1 else None
    if rank == 0:
        run = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
        row = dict(tp=world, wall_s=run["wall_s"], walls_s=[r["wall_s"] for r in runs],
                   out_tok_s=args.requests * args.output / run["wall_s"],
                   ttft_p50_s=percentile(run["ttft"], 50), ttft_p99_s=percentile(run["ttft"], 99),
                   tpot_p50_s=percentile(run["tpot"], 50), tpot_p99_s=percentile(run["tpot"], 99),
                   host_outside_steps_s=run["host_outside_steps_s"], nccl_kernel_share=share,
                   preemptions=llm.last_metrics.preemptions, graph_steps=llm.last_graph_steps,
                   ssm_block_bytes=llm.allocator.spec.ssm_block_bytes,
                   tokens=[o.outputs[0].token_ids for o in outs])
        with open(result_file, "w") as f:
            json.dump(row, f)
    dist.destroy_process_group()


def run_config(world: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "row.json")
        mp.spawn(_rank, args=(world, args, os.path.join(tmp, "store"), result), nprocs=world, join=True)
        with open(result) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--model", default="nemotron-h-8b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--memory-gib", type=float, default=48.0, help="total over the ranks")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.backend == "nccl" and torch.cuda.device_count() < args.tp:
        raise SystemExit(f"--tp {args.tp} over NCCL needs {args.tp} GPUs, {torch.cuda.device_count()} visible")
    rows = [run_config(1, args), run_config(args.tp, args)]
    same = sum(a == b for x, y in zip(rows[0]["tokens"], rows[1]["tokens"]) for a, b in zip(x, y))
    env = dict(gpus=[torch.cuda.get_device_name(i) for i in range(args.tp)] if args.backend == "nccl" else "cpu",
               torch=torch.__version__, triton=triton.__version__, commit=H.commit())
    res = dict(bench="tensor_parallel_serve", env=env, model=f"{args.model} (random {args.dtype})",
               requests=args.requests, prompt=args.prompt, output=args.output, memory_gib_total=args.memory_gib,
               rows=rows, greedy_tokens_equal_to_tp1=same, greedy_tokens_total=args.requests * args.output)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print(f"{env['gpus']}: {args.model}, {args.requests} x ({args.prompt} + {args.output}), "
          f"{args.memory_gib} GiB in all")
    print(f"{'TP':>3s} {'wall s':>8s} {'out tok/s':>10s} {'TTFT p99':>9s} {'TPOT p99':>9s} {'host s':>7s} {'NCCL':>6s}")
    for r in rows:
        share = "-" if r["nccl_kernel_share"] is None else f"{r['nccl_kernel_share']:.1%}"
        print(f"{r['tp']:3d} {r['wall_s']:8.2f} {r['out_tok_s']:10.1f} {r['ttft_p99_s']:9.3f} "
              f"{r['tpot_p99_s']:9.4f} {r['host_outside_steps_s']:7.2f} {share:>6s}")
    print(f"greedy tokens equal to TP=1's: {same}/{args.requests * args.output}; "
          f"median of {args.repeats} (walls {statistics.median(rows[1]['walls_s']):.2f} s at TP={args.tp})")


if __name__ == "__main__":
    main()
