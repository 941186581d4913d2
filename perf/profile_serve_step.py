"""Where a decode step of the engine goes (GPU): model, sampling, scheduler + allocator, and the step
against its roofline, eager and with CUDA graphs.

    python perf/profile_serve_step.py [--out FILE] [--batch 1 16 64 256] [--modes eager graphs]
                                      [--prompt 256] [--output 24]

Nemotron-H-8B at real size, random bf16 weights, SSM state in fp32 (as vLLM serves it), the LLM
engine with ``allocator=avmp``, eager steps or decode through CUDA graphs. For each mode and batch
size B, B requests of ``--prompt`` tokens generate ``--output`` tokens each, all arriving at once.
The executor's calls are wrapped (with a device synchronisation at each boundary, so the split is
exact but the whole is a little slower than unwrapped): per decode step, the wall time of the
model (the eager forward, or the graph replay with its input staging), of sampling, and of the
rest of the tick (the scheduler's planning and the allocator calls). The roofline of a decode
step: weight bytes + the KV bytes read + the SSM and conv state read and written, over the copy
bandwidth measured in the same run (read + write). With graphs, a decode tick's host time is also
split from the executor's own call spans: the gap between one step's end and the next one's start
(the scheduler) and the executor's time around the replay and the sampling, medians over the decode
ticks. Writes JSON (--out) and prints a table last.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch
import triton

import harness as H  # perf/harness.py
from avmp_triton import LLM, SamplingParams
from avmp_triton.models.loading import random_model
from avmp_triton.serve import executor as ex


def copy_bandwidth(gib: float = 2.0) -> float:
    """Bytes read + written per second of a device-to-device copy (median of 20)."""
    a = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ts = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return 2 * a.numel() / statistics.median(ts)


def load_8b():
    """Nemotron-H-8B with random bf16 weights on the GPU, its weight bytes, the copy bandwidth
    measured now, and the run's environment record."""
    model = random_model("nemotron-h-8b", dtype=torch.bfloat16, device="cuda", seed=0).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth()
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               copy_bytes_per_s=bw, weight_bytes=weight_bytes, commit=H.commit())
    return model, weight_bytes, bw, env


def timed(obj, name: str, sink: list, *, sync_before: bool = True) -> None:
    """Replace ``obj.name`` by a wrapper that appends its synchronised wall time to ``sink``."""
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        if sync_before:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(*a, **k)
        torch.cuda.synchronize()
        sink.append(time.perf_counter() - t)
        return out
    setattr(obj, name, wrapper)


def step_bytes(spec, B: int, ctx: int, weight_bytes: int) -> int:
    kv = B * ctx * spec.kv_bytes_per_token
    return weight_bytes + kv + 2 * B * spec.ssm_state_raw_bytes   # states read and written


def spans(obj, name: str, sink: list):
    """Replace ``obj.name`` by a wrapper that appends its (start, end) wall times to ``sink``;
    returns the function that puts the original back."""
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        sink.append((t, time.perf_counter()))
        return out
    setattr(obj, name, wrapper)
    return lambda: setattr(obj, name, fn)


def decode_tick_split(steps: list, dec: list, smp: list, first: int) -> dict:
    """Per decode tick (graph steps from index ``first`` of the executor's calls): the host time
    between one step's end and the next one's start (the scheduler: its planning, the release
    and the host side of the allocator calls) and the executor's own time around the graph replay
    and the sampling; medians in ms."""
    gaps = [b[0] - a[1] for a, b in zip(steps[first:], steps[first + 1:])]
    own = [(e - s) - d - m for (s, e), d, m in zip(steps[first:], dec, smp[first:])]
    return dict(scheduler_gap_ms=statistics.median(gaps) * 1e3 if gaps else None,
                executor_host_ms=statistics.median(own) * 1e3 if own else None)


def _profile(model, mode: str, B: int, args, weight_bytes: int, bw: float, smp: list) -> dict:
    """One engine mode ("eager" or "graphs") at batch B: per decode step the median model time
    (the eager forward, or the graph replay with its input staging), sampling, and the rest."""
    llm = LLM(model, allocator="avmp", memory_gib=40, max_num_seqs=B, max_model_len=args.prompt + args.output,
              enforce_eager=mode == "eager")
    fwd, dec, steps = [], [], []
    timed(llm.runner, "forward", fwd)
    if llm.graphs is not None:
        timed(llm.graphs, "run", dec)
    prompts = torch.randint(0, model.config.vocab_size, (B, args.prompt), generator=torch.Generator().manual_seed(B)).tolist()
    sp = SamplingParams(temperature=0.0, max_tokens=args.output, ignore_eos=True)
    # warm-up at the same batch: Triton compiles a kernel per new shape class on first use
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    for t in (fwd, dec, smp):
        t.clear()
    restore = spans(ex.ModelExecutor, "step", steps)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.generate(prompts, sp)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    restore()
    step_spans = list(steps)
    steps = llm.last_metrics.makespan_ticks
    n_pre = steps - (args.output - 1)          # prefill ticks (one token each for the rest)
    dec_f = dec if llm.graphs is not None else fwd[n_pre:]
    f, s = statistics.median(dec_f), statistics.median(smp[n_pre:])
    tick = (wall - sum(fwd) - sum(dec) - sum(smp)) / steps
    step = f + s + tick
    roof = step_bytes(llm.allocator.spec, B, args.prompt + args.output // 2, weight_bytes) / bw
    split = decode_tick_split(step_spans, dec, smp, n_pre) if llm.graphs is not None else {}
    return dict(mode=mode, batch=B, steps=steps, decode_steps=len(dec_f), graph_steps=llm.last_graph_steps, **split,
                forward_ms=f * 1e3, sample_ms=s * 1e3, sched_alloc_ms=tick * 1e3, step_ms=step * 1e3,
                roofline_ms=roof * 1e3, roofline_fraction=roof / step, sched_alloc_share=tick / step,
                host_syncs_per_step=llm.last_metrics.host_syncs_per_step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--modes", nargs="+", default=["eager", "graphs"], choices=["eager", "graphs"])
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--output", type=int, default=24)
    args = ap.parse_args()
    model, weight_bytes, bw, env = load_8b()
    rows = []
    res = dict(bench="profile_serve_step", env=env, model="nemotron-h-8b (random bf16, fp32 SSM state)",
               prompt=args.prompt, output=args.output, rows=rows)
    smp: list = []
    timed(ex, "sample", smp, sync_before=False)    # the executor's sampler, for every run below
    for B in args.batch:           # eager and graphs side by side at each batch
        for mode in args.modes:
            rows.append(_profile(model, mode, B, args, weight_bytes, bw, smp))
            gc.collect()   # the timers' wrappers make cycles through the LLM: free its arena now
            torch.cuda.empty_cache()
            if args.out:   # rewritten after every row: a time limit keeps what ran
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as fh:
                    json.dump(res, fh, indent=1)
    print(f"{env['gpu']}  copy {bw / 1e12:.2f} TB/s  weights {weight_bytes / 1e9:.1f} GB")
    print(f"{'mode':>6s} {'B':>4s} {'forward':>9s} {'sample':>8s} {'sched+alloc':>12s} {'step':>8s} {'roofline':>9s} "
          f"{'of roof':>8s} {'decode tick: sched':>19s} {'executor':>9s}")
    for r in rows:
        tick = (f"{r['scheduler_gap_ms']:18.3f}m {r['executor_host_ms']:8.3f}m" if r.get("scheduler_gap_ms") is not None
                else "")
        print(f"{r['mode']:>6s} {r['batch']:4d} {r['forward_ms']:8.2f}m {r['sample_ms']:7.2f}m {r['sched_alloc_ms']:11.2f}m "
              f"{r['step_ms']:7.2f}m {r['roofline_ms']:8.2f}m {r['roofline_fraction']:8.1%} {tick}")


if __name__ == "__main__":
    main()
