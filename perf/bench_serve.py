"""First end-to-end serving measurement (GPU): the LLM engine against transformers' generate().

    python perf/bench_serve.py [--out FILE] [--requests 32] [--prompt 512] [--output 64]

Nemotron-H-8B at real size with random bf16 weights (``MODEL_PRESETS["nemotron-h-8b"]``), one batch
of ``--requests`` prompts of ``--prompt`` random tokens, greedy, ``--output`` tokens each (EOS
ignored), all arriving at once:

- ours: ``LLM(model, allocator=..., memory_gib=...)`` for each allocator and engine mode (``--modes``:
  decode through CUDA graphs, and eager steps), chunked prefill under 8192 tokens, the whole batch
  running at once;
- transformers: ``model.generate`` on the same model and GPU, the batch as one padded tensor (all
  prompts have the same length, so no padding), its own cache, ``min_new_tokens`` = ``max_new_tokens``.

Reports the median wall time of ``--repeats`` runs, output tokens/s, and how many of our greedy tokens equal transformers' (bf16:
the two may diverge after a near-tie). Writes JSON (--out) and prints a table last.

Each run records its peak GPU memory above the weights (``torch.cuda.max_memory_allocated``). With
``--equal-memory``, ours runs once more (first allocator and mode) with the arena cut so that its
whole peak above the weights (arena + activations + graph pools, as measured in its first runs)
equals transformers' peak at the batch that fitted: the "same memory" comparison.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import time

import torch
import triton
import transformers

from avmp_triton import LLM, SamplingParams
from avmp_triton.models.loading import random_model


def _sync_time(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def _transformers_generate(model, ids, n_out: int, rows: list, repeats: int):
    """transformers' greedy generate of the whole batch; if that runs out of memory (its torch
    Mamba2 prefill materialises a [B, chunks, chunk, chunk, heads, state]-sized product), the OOM is
    recorded and the batch is run in slices of halving size until one fits."""
    model.generate(ids[:2, :32], max_new_tokens=2, min_new_tokens=2, do_sample=False)   # warm-up
    torch.cuda.reset_peak_memory_stats()
    run = lambda x: model.generate(x, max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False)  # noqa: E731
    B, P, notes, size = ids.shape[0], ids.shape[1], [], ids.shape[0]
    while size >= 1:
        try:
            walls = []
            for _ in range(repeats):
                outs, wall = [], 0.0
                for i in range(0, B, size):
                    out, t = _sync_time(lambda: run(ids[i:i + size]))
                    outs.append(out[:, P:])
                    wall += t
                walls.append(wall)
            wall = sorted(walls)[len(walls) // 2]
            rows.append(dict(engine=f"transformers.generate (batch {size})", wall_s=wall, walls_s=walls,
                             out_tok_s=B * n_out / wall, peak_above_weights_bytes=_peak_above_weights(model)))
            return torch.cat(outs).tolist(), notes
        except torch.OutOfMemoryError as e:
            notes.append(f"batch {size}: {str(e).splitlines()[0]}")
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            size //= 2
    return None, notes


def _peak_above_weights(model) -> int:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return torch.cuda.max_memory_allocated() - weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--memory-gib", type=float, default=24.0)
    ap.add_argument("--allocators", default="avmp,sglang_static")
    ap.add_argument("--preemption", default="recompute", help="comma-separated preemption modes to run each allocator with")
    ap.add_argument("--modes", default="graphs,eager", help="comma-separated engine modes: graphs, eager")
    ap.add_argument("--no-transformers", action="store_true", help="skip transformers' generate()")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per engine (the median is reported)")
    ap.add_argument("--equal-memory", action="store_true",
                    help="run ours again with its peak memory cut to transformers' (needs transformers)")
    args = ap.parse_args()
    if args.equal_memory and args.no_transformers:
        ap.error("--equal-memory compares with transformers: drop --no-transformers")
    model = random_model("nemotron-h-8b", dtype=torch.bfloat16, device="cuda", seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, model.config.vocab_size, (args.requests, args.prompt), generator=gen)
    sp = SamplingParams(temperature=0.0, max_tokens=args.output, ignore_eos=True)
    rows, ours_tokens = [], None
    for name in args.allocators.split(","):
        for mode in args.preemption.split(","):
            for engine in args.modes.split(","):
                rows.append(_ours(model, name, mode, engine, prompts, sp, args))
                toks = rows[-1].pop("tokens")
                ours_tokens = ours_tokens or toks
                # bf16: a recomputed prefill may round differently from the decode steps it replaces
                rows[-1]["tokens_equal_to_first_row"] = sum(a == b for x, y in zip(toks, ours_tokens)
                                                            for a, b in zip(x, y))
    if args.no_transformers:
        _report(args, rows, ours_tokens, None, [])
        return
    hf_tokens, hf_note = _transformers_generate(model, prompts.cuda(), args.output, rows, args.repeats)
    if args.equal_memory and hf_tokens is not None:
        rows.append(_ours_at_memory(model, rows, prompts, sp, args))
    _report(args, rows, ours_tokens, hf_tokens, hf_note)


def _ours_at_memory(model, rows: list, prompts, sp, args) -> dict:
    """Ours (first allocator, preemption mode and engine mode) with the arena cut so that its peak
    above the weights matches transformers': its overhead beside the arena (activations, graph
    pools) is taken from its first run, the arena gets the rest."""
    first, hf = rows[0], rows[-1]
    overhead = first["peak_above_weights_bytes"] - int(args.memory_gib * 2**30)
    arena = hf["peak_above_weights_bytes"] - overhead
    if arena <= 0:
        raise SystemExit(f"transformers' peak {hf['peak_above_weights_bytes'] / 2**30:.2f} GiB is below our "
                         f"overhead beside the arena ({overhead / 2**30:.2f} GiB): no equal-memory run")
    name, mode, engine = first["engine"].split("/")[1:]
    row = _ours(model, name, mode, engine, prompts, sp, argparse.Namespace(**{**vars(args), "memory_gib": arena / 2**30}))
    row.pop("tokens")
    row.update(engine=row["engine"] + " (equal memory)", arena_gib=arena / 2**30,
               transformers_peak_above_weights_bytes=hf["peak_above_weights_bytes"],
               speedup_vs_transformers=row["out_tok_s"] / hf["out_tok_s"])
    return row


def _ours(model, name: str, mode: str, engine: str, prompts, sp, args) -> dict:
    """One allocator, preemption mode and engine mode: the median of ``--repeats`` timed runs after a warm-up."""
    if engine not in ("graphs", "eager"):
        raise ValueError(f"engine mode must be graphs or eager, got {engine!r}")
    llm = LLM(model, allocator=name, memory_gib=args.memory_gib, max_num_seqs=args.requests, preemption_mode=mode,
              max_model_len=args.prompt + args.output, enforce_eager=engine == "eager")
    llm.generate(prompts[:2, :32].tolist(), SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    torch.cuda.reset_peak_memory_stats()
    walls, splits = [], []
    for _ in range(args.repeats):
        outs, wall = _sync_time(lambda: llm.generate(prompts.tolist(), sp))
        walls.append(wall)
        splits.append(dict(llm.last_step_seconds, scheduler=wall - sum(llm.last_step_seconds.values())))
    wall = sorted(walls)[len(walls) // 2]
    peak = _peak_above_weights(model)
    m, llm_graph_steps = llm.last_metrics, llm.last_graph_steps
    llm = None
    gc.collect()
    torch.cuda.empty_cache()   # the next engine's arena must not wait on this one's
    return dict(engine=f"ours/{name}/{mode}/{engine}", graph_steps=llm_graph_steps, wall_s=wall, walls_s=walls,
                step_seconds_per_run=splits, out_tok_s=args.requests * args.output / wall,
                ttft_p50_s=sorted(o.ttft_s for o in outs)[len(outs) // 2],
                tpot_p50_s=sorted(o.tpot_s for o in outs)[len(outs) // 2], steps=m.makespan_ticks,
                preemptions=m.preemptions, recomputed_tokens=m.recomputed_tokens, swapped_out=m.swapped_out,
                swap_bytes=m.swap_bytes, migrations=m.migrations, peak_above_weights_bytes=peak,
                tokens=[o.outputs[0].token_ids for o in outs])


def _report(args, rows, ours_tokens, hf_tokens, hf_note) -> None:
    same = first_div = None
    if hf_tokens is not None:
        same = sum(a == b for x, y in zip(ours_tokens, hf_tokens) for a, b in zip(x, y))
        first_div = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                     for x, y in zip(ours_tokens, hf_tokens)]
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               transformers=transformers.__version__, python=platform.python_version(),
               commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
    res = dict(bench="serve_e2e", env=env, model="nemotron-h-8b (random bf16)", requests=args.requests,
               prompt=args.prompt, output=args.output, memory_gib=args.memory_gib, rows=rows,
               greedy_tokens_equal=same, greedy_tokens_total=args.requests * args.output,
               first_divergence_per_request=first_div, transformers_notes=hf_note)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print(f"{env['gpu']}: {args.requests} x ({args.prompt} prompt + {args.output} out), greedy")
    for r in rows:
        extra = (f"  preempted {r['preemptions']}, recomputed {r['recomputed_tokens']} tokens, swapped "
                 f"{r['swapped_out']} ({r['swap_bytes'] / 2**30:.2f} GiB)" if "preemptions" in r else "")
        split = ""
        if "step_seconds_per_run" in r:
            sp = sorted(r["step_seconds_per_run"], key=lambda d: sum(d.values()))[len(r["walls_s"]) // 2]
            split = f"  (graph {sp['graph']:.2f} s, eager {sp['eager']:.2f} s, scheduler {sp['scheduler']:.2f} s)"
        print(f"{r['engine']:34s} {r['wall_s']:8.2f} s {r['out_tok_s']:9.1f} out tok/s  "
              f"peak {r['peak_above_weights_bytes'] / 2**30:.2f} GiB above weights{split}{extra}")
    if same is not None:
        print(f"greedy tokens equal to transformers': {same}/{args.requests * args.output}; "
              f"first divergence per request: {first_div}")
    for n in hf_note:
        print("transformers:", n[:160])


if __name__ == "__main__":
    main()
