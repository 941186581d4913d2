"""The serving commands of the command line: ``generate`` (prompts from a file or stdin, tokens
streamed as they are sampled) and ``bench-serve`` (a trace of request lengths with Poisson
arrivals or all at once, served by the ``LLM`` engine in wall-clock time; the serving metrics at
the end, as JSON and PNG plots on request)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

from avmp_triton.engine.sampling import SamplingParams

DEFAULT_MODEL = "nemotron-h-tiny"


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    from avmp_triton.serve.llm import SERVABLE
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory, or a preset with random weights (default: {DEFAULT_MODEL})")
    p.add_argument("--allocator", default="avmp", choices=SERVABLE)
    p.add_argument("--ssm-fraction", type=float, default=None, help="static_tuned's split (share of the SSM pool)")
    p.add_argument("--memory-gib", type=float, default=None, help="arena size (default: 90%% of free GPU memory; "
                   "required on the CPU)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"))
    p.add_argument("--max-model-len", type=int, default=None, help="most tokens of a request (default: the model "
                   "config's max_position_embeddings); bench-serve cuts its trace's lengths to it")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: every step runs eagerly")
    from avmp_triton.serve.llm import KV_CACHE_DTYPES
    p.add_argument("--kv-cache-dtype", default="auto", choices=tuple(KV_CACHE_DTYPES),
                   help="K/V pages in the model's dtype, or float8_e4m3fn (scales 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the trace")


def add_parsers(sub, fmt) -> dict:
    g = sub.add_parser("generate", formatter_class=fmt, help="generate for prompts from a file or stdin",
                       description="Each line of the prompts file (default: stdin) is one prompt of space-separated "
                                   "token ids. Tokens are printed as they are sampled (prompt index, tab, token "
                                   "id), then one summary line per prompt.")
    _add_engine_args(g)
    g.add_argument("--prompts", default="-", help="file of prompts, one per line (default: stdin)")
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--stop-token-ids", type=int, nargs="*", default=())
    b = sub.add_parser("bench-serve", formatter_class=fmt, help="serve a trace and report throughput and latency",
                       description="Requests with a workload's prompt and output lengths (random token ids, EOS "
                                   "ignored) arrive at --request-rate per second (Poisson) or all at once, and "
                                   "run through the engine in wall-clock time.")
    _add_engine_args(b)
    from avmp_triton.sim.workloads import WORKLOADS
    b.add_argument("--workload", default="sharegpt", choices=WORKLOADS)
    b.add_argument("--num-requests", type=int, default=32)
    b.add_argument("--request-rate", type=float, default=math.inf, help="requests per second (default: all at once)")
    b.add_argument("--out", default=None, help="JSON file of the results")
    b.add_argument("--plots", default=None, help="folder for PNG plots of TTFT and TPOT")
    b.add_argument("--no-progress", action="store_true")
    return {"generate": g, "bench-serve": b}


def _llm(args):
    from avmp_triton.serve.llm import LLM
    return LLM(args.model, allocator=args.allocator, memory_gib=args.memory_gib, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, dtype=args.dtype, device=args.device,
               max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, ssm_fraction=args.ssm_fraction,
               seed=args.seed, kv_cache_dtype=args.kv_cache_dtype)


def _read_prompts(path: str, sub) -> list[list[int]]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                prompts.append([int(t) for t in line.split()])
            except ValueError:
                sub.error(f"{path}:{n}: a prompt is space-separated token ids, got {line[:40]!r}")
    if not prompts:
        sub.error(f"{path}: no prompts")
    return prompts


def cmd_generate(args, sub) -> int:
    try:
        sp = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
                            stop_token_ids=tuple(args.stop_token_ids))
        prompts = _read_prompts(args.prompts, sub)
        llm = _llm(args)
        outs = llm.generate(prompts, sp, on_token=lambda i, t: print(f"{i}\t{t}", flush=True))
    except ValueError as e:
        sub.error(str(e))
    for i, o in enumerate(outs):
        c = o.outputs[0]
        tpot = f"{o.tpot_s * 1e3:.1f} ms" if o.tpot_s is not None else "-"
        print(f"# prompt {i}: {len(c.token_ids)} tokens, finish {c.finish_reason}, TTFT "
              f"{o.ttft_s * 1e3:.1f} ms, TPOT {tpot}: {' '.join(map(str, c.token_ids))}")
    return 0


def trace_requests(workload: str, seed: int, n: int, rate: float | None, vocab: int, max_len: int):
    """Prompts (random token ids), greedy ``SamplingParams`` (EOS ignored) and arrival times in
    seconds of ``n`` requests of a workload at ``rate`` per second (None: all at once), prompt and
    output cut to ``max_len`` tokens together."""
    from avmp_triton.sim.workloads import make_workload
    rng = np.random.default_rng(seed)
    prompts, params, arrivals = [], [], []
    for r in make_workload(workload, seed, num_requests=n, rate=rate):
        p = max(1, min(r.prompt_tokens, max_len - 1))
        out = max(1, min(r.output_tokens, max_len - p))
        prompts.append(rng.integers(0, vocab, p).tolist())
        params.append(SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True))
        arrivals.append(float(r.arrival))
    return prompts, params, arrivals


def cmd_bench_serve(args, sub) -> int:
    from tqdm import tqdm
    try:
        llm = _llm(args)
        rate = None if math.isinf(args.request_rate) else args.request_rate
        prompts, params, arrivals = trace_requests(args.workload, args.seed, args.num_requests, rate,
                                                   llm.model.config.vocab_size, llm.max_model_len)
    except ValueError as e:
        sub.error(str(e))
    bar = tqdm(total=len(prompts), desc="bench-serve", unit="req", disable=args.no_progress, file=sys.stderr)
    outs = llm.generate(prompts, params, arrival_s=arrivals, progress=lambda done, total: bar.update(done - bar.n))
    bar.close()
    res = _results(args, llm, outs)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    if args.plots:
        _plots(outs, Path(args.plots))
    _print_summary(res)
    return 0


def _results(args, llm, outs) -> dict:
    import torch
    m = dataclasses.asdict(llm.last_metrics)
    keep = ("completed", "makespan_s", "output_tokens_per_s", "requests_per_s", "ttft_p50_s", "ttft_p99_s",
            "tpot_p50_s", "tpot_p99_s", "goodput_requests_per_s", "slo_ttft_s", "slo_tpot_s", "preemptions",
            "recomputed_tokens", "migrations", "bytes_moved", "kv_util_mean", "ssm_util_mean")
    dev = llm.allocator.device
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return dict(model=args.model, allocator=args.allocator, workload=args.workload, num_requests=len(outs),
                request_rate=None if math.isinf(args.request_rate) else args.request_rate,
                device=str(dev), arena_bytes=llm.allocator.capacity_bytes, peak_gpu_memory_bytes=peak,
                max_model_len=llm.max_model_len, kv_cache_dtype=str(llm.allocator.spec.kv_dtype),
                cuda_graphs=llm.cuda_graphs, steps=llm.last_steps,
                graph_steps=llm.last_graph_steps,
                metrics={k: m[k] for k in keep},
                requests=[dict(prompt=len(o.prompt_token_ids), output=len(o.outputs[0].token_ids),
                               finish=o.outputs[0].finish_reason, ttft_s=o.ttft_s, tpot_s=o.tpot_s) for o in outs])


def _print_summary(res: dict) -> None:
    m = res["metrics"]
    peak = res["peak_gpu_memory_bytes"]
    print(f"{m['completed']} of {res['num_requests']} requests, "
          f"{res['allocator']} on {res['device']}, arena {res['arena_bytes'] / 2**30:.2f} GiB"
          + (f", peak GPU memory {peak / 2**30:.2f} GiB" if peak else ""))
    print(f"output tokens/s {m['output_tokens_per_s']:.1f}   requests/s {m['requests_per_s']:.2f}   "
          f"duration {m['makespan_s']:.2f} s")
    print(f"TTFT p50 {m['ttft_p50_s'] * 1e3:.1f} ms  p99 {m['ttft_p99_s'] * 1e3:.1f} ms   "
          f"TPOT p50 {m['tpot_p50_s'] * 1e3:.1f} ms  p99 {m['tpot_p99_s'] * 1e3:.1f} ms")
    print(f"goodput {m['goodput_requests_per_s']:.2f} req/s (TTFT <= {m['slo_ttft_s']} s, TPOT <= {m['slo_tpot_s']} s)   "
          f"preemptions {m['preemptions']}   migrations {m['migrations']}")


def _plots(outs, folder: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder.mkdir(parents=True, exist_ok=True)
    for name, vals in (("ttft", [o.ttft_s for o in outs]), ("tpot", [o.tpot_s for o in outs])):
        vals = [v * 1e3 for v in vals if v is not None]
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist(vals, bins=20)
        ax.set_xlabel(f"{name.upper()} (ms)")
        ax.set_ylabel("requests")
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png")
        plt.close(fig)
