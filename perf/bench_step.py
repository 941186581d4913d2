"""Step-time calibration (GPU): what each part of a hybrid model's serving step costs with the
project's kernels, and whole steps of the layer stack to check the sum against.

    python perf/bench_step.py [--out FILE] [--rep MS] [--quick]
    python perf/bench_step.py --tiny          # CPU dry run (Triton interpreter, tiny dims): it runs

Parts, each timed as a CUDA-graph replay (median of ``triton.testing.do_bench``), over every layer
of its kind in one replay (so that no layer's data is still in L2 from the one before, as in a
real step) and divided by that layer count:

- ``attn_decode``: ``kv_append`` of B new tokens + ``paged_decode_attention`` (B rows, ctx tokens,
  pages of 16 scattered by ``torch.randperm``); (B, ctx) on a grid.
- ``attn_prefill``: ``kv_append`` of the chunk + ``paged_prefill_attention`` (B requests of L new
  tokens after ``prefix`` cached ones).
- ``mamba_decode``: ``causal_conv1d_update`` + the Mamba1/Mamba2 state update, B rows, bf16 and
  fp32 state.
- ``mamba_prefill``: ``causal_conv1d_prefill`` + the chunked scan, (B, L, prefix), both dtypes.
- ``linear``: every distinct weight shape of the model's linear layers (``MODELS``, from the
  models' config.json) at T tokens, bf16 ``torch.mm``; distinct weight copies cycled so that no
  copy stays in L2.
- ``glue``: the torch work of a layer that is neither an op nor a matmul (RMSNorm, residual add,
  the MLP activation, Mamba2's gated norm), per layer type, at T tokens.
- ``migrate``: ``AVMPAllocator.rebalance`` compacting live KV pages out of n slabs (eager, CUDA
  events around the host call: it plans on the host), with the bytes the allocator copied.
- ``alloc``: one ``grow_kv`` and one ``release_rows`` call for R rows (eager, CUDA events).

``step``: whole steps of Nemotron-H-8B's 52 layers in its layer order (hybrid_override_pattern),
every linear at its real shape with random bf16 weights, the caches in one ``AVMPAllocator``
arena, for decode batches, a mixed decode + prefill-chunk step and prefill chunks; captured in one
CUDA graph each. ``perf/fit_steptime.py`` fits the parts and reports its error on these steps.
Not a model forward (logits are not checked against transformers: that is issue 11's runner).

Writes JSON (--out, default perf/results/bench_step_<gpu>.json): environment, every timing with its
shape, and the copy bandwidth and matmul rate measured in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch
import triton
import triton.testing

from avmp_triton import AVMPAllocator, PagedCache, get_preset
from avmp_triton.ops import (causal_conv1d_prefill, causal_conv1d_update, kv_append, mamba1_scan_prefill,
                             mamba1_state_update, mamba2_scan_prefill, mamba2_state_update, paged_decode_attention,
                             paged_prefill_attention)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_models as SM  # noqa: E402  (perf/step_models.py)

SPECS = ("nemotron-h-8b", "jamba-1.5-mini", "granite-4.0-h-small")
T_GRID = (1, 4, 16, 64, 256, 1024, 2048, 4096, 8192)
DEC_B = (1, 8, 32, 128, 256)
DEC_CTX = (512, 4096, 16384)
MAX_DEC_TOKENS = 1 << 21                     # B * ctx cap for the decode grid (KV of 4 layers: 32 GiB)
MAMBA_B = (1, 8, 32, 128, 256)
PREFILL = ((1, 256, 0), (1, 1024, 0), (1, 4096, 0), (1, 8192, 0), (4, 2048, 0), (16, 512, 0),
           (1, 2048, 8192), (2, 1024, 16384), (8, 1024, 2048))
MIGRATE_SLABS = (1, 4, 16)
ALLOC_ROWS = (8, 64, 256)
# whole steps of Nemotron-H-8B: (decode rows, their context, [(new tokens, prefix) per prefill chunk])
STEPS = ((1, 1024, ()), (64, 4096, ()), (256, 1024, ()), (32, 2048, ((2048, 0),)),
         (0, 0, ((8192, 0),)), (0, 0, ((4096, 8192),)), (128, 512, ((512, 0), (512, 1024))))
ACT = torch.bfloat16
DEV = "cuda"


# ------------------------------------------------------------------------------------- timing
def timed(fn, rep: int) -> dict:
    """Median / p20 / p80 ms of ``fn`` replayed from a CUDA graph (on the CPU: perf_counter, eager)."""
    if DEV != "cuda":
        fn()
        ts = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return dict(ms=sorted(ts)[len(ts) // 2], p20_ms=min(ts), p80_ms=max(ts), timing="cpu_eager")
    from harness import graphed
    g, _ = graphed(fn)
    g.replay()
    torch.cuda.synchronize()
    med, p20, p80 = triton.testing.do_bench(g.replay, warmup=10, rep=rep, quantiles=[0.5, 0.2, 0.8])
    del g
    return dict(ms=med, p20_ms=p20, p80_ms=p80, timing="cuda_graph")


def event_ms(setup, call, reps: int = 5) -> dict:
    """Median ms of ``call(setup())`` between CUDA events (host planning included); ``call`` returns
    what to record beside the time."""
    ts, extra = [], None
    for _ in range(reps):
        state = setup()
        sync()
        if DEV == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            extra = call(state)
            b.record()
            sync()
            ts.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            extra = call(state)
            ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return dict(ms=ts[len(ts) // 2], p20_ms=ts[0], p80_ms=ts[-1], timing="cuda_events_eager", extra=extra)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def free() -> None:
    import gc
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def rand(*shape, dtype=ACT, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


# --------------------------------------------------------------------------------------- arena
@dataclasses.dataclass
class Arena:
    """One allocator holding ``rows`` requests: each with pages for ``tokens[r]`` tokens (scattered)
    and one SSM block; block table, seq lens and SSM handles ready for the ops."""
    alloc: AVMPAllocator
    cache: PagedCache
    block_table: torch.Tensor
    ssm: torch.Tensor


def build_arena(spec, tokens: list[int], extra_pages: int = 0) -> Arena:
    R = max(1, len(tokens))
    pages = [max(1, -(-t // spec.page_tokens)) for t in tokens] or [1]
    n_pages = sum(pages) + extra_pages
    slab = max(2 << 20, 2 * spec.ssm_block_bytes)      # room for the slab tails of both pools
    cap = int((n_pages * spec.kv_page_bytes + R * spec.ssm_block_bytes) * 1.05) + 4 * slab
    alloc = AVMPAllocator(spec, cap, device=DEV, kv_fraction=n_pages * spec.kv_page_bytes / cap)
    alloc.arena.view(torch.bfloat16).normal_(0, 0.5)
    if alloc.free_counts.tolist()[alloc.pool_index("kv")] < n_pages:
        alloc.make_room("kv", n_pages)
    h = alloc.alloc_kv(n_pages)
    h = h[torch.randperm(h.numel(), device=h.device)]
    W = max(pages)
    bt = torch.full((R, W), -1, dtype=torch.int32, device=DEV)
    i = 0
    for r, p in enumerate(pages):
        bt[r, :p] = h[i:i + p]
        i += p
    ssm = alloc.alloc_ssm(R).to(torch.int32)
    ssm = ssm[torch.randperm(R, device=ssm.device)].contiguous()
    return Arena(alloc=alloc, cache=PagedCache.of(alloc), block_table=bt, ssm=ssm)


def with_state_dtype(spec, dtype):
    return dataclasses.replace(spec, ssm_dtype=dtype, conv_dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------- op parts
def attn_decode_fn(spec, ar: Arena, B: int, ctx: int):
    Hq, Hkv, D = SM.q_heads(spec), spec.num_kv_heads, spec.head_dim
    q, k, v = rand(B, Hq, D), rand(B, Hkv, D), rand(B, Hkv, D)
    seq = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
    req = torch.arange(B, dtype=torch.int32, device=DEV)
    pos = seq - 1
    out = torch.empty_like(q)
    bt = ar.block_table[:B]

    def one(layer):
        kv_append(k, v, bt, req, pos, ar.cache, layer=layer)
        paged_decode_attention(q, bt, seq, ar.cache, layer=layer, out=out, max_seq_len=ctx)
    return one


def packed_meta(chunks):
    """cu_seqlens, seq_lens (prefix + new), token row and position of packed prefill chunks."""
    lens = [L for L, _ in chunks]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=DEV)
    seq = torch.tensor([L + p for L, p in chunks], dtype=torch.int32, device=DEV)
    req = torch.cat([torch.full((L,), r, dtype=torch.int32) for r, (L, _) in enumerate(chunks)]).to(DEV)
    pos = torch.cat([torch.arange(p, p + L, dtype=torch.int32) for L, p in chunks]).to(DEV)
    return cu, seq, req, pos


def attn_prefill_fn(spec, ar: Arena, chunks, row0: int = 0):
    Hq, Hkv, D = SM.q_heads(spec), spec.num_kv_heads, spec.head_dim
    T = sum(L for L, _ in chunks)
    cu, seq, req, pos = packed_meta(chunks)
    q, k, v = rand(T, Hq, D), rand(T, Hkv, D), rand(T, Hkv, D)
    out = torch.empty_like(q)
    bt = ar.block_table[row0:row0 + len(chunks)]
    max_q = max(L for L, _ in chunks)

    def one(layer):
        kv_append(k, v, bt, req, pos, ar.cache, layer=layer)
        paged_prefill_attention(q, bt, seq, cu, ar.cache, layer=layer, out=out, max_seqlen_q=max_q)
    return one


def mamba_params(spec):
    if spec.mamba_version == 1:
        Di, N = spec.d_inner, spec.d_state
        return dict(A=-torch.rand(Di, N, device=DEV) - 0.5, D=torch.randn(Di, device=DEV),
                    dt_bias=torch.rand(Di, device=DEV) - 2.0)
    H = spec.mamba_num_heads
    return dict(A=-torch.rand(H, device=DEV) - 0.5, D=torch.randn(H, device=DEV),
                dt_bias=torch.rand(H, device=DEV) - 2.0)


def mamba_acts(spec, T: int) -> dict:
    """The conv input and the scan inputs of T tokens (Mamba2: x, B, C views of the conv output)."""
    C_ = spec.conv_channels
    xbc = rand(T, C_)
    a = dict(conv_in=rand(T, C_), conv_out=xbc, w=rand(C_, spec.d_conv, scale=0.5), b=rand(C_))
    if spec.mamba_version == 1:
        Di, N = spec.d_inner, spec.d_state
        a.update(x=xbc, dt=rand(T, Di), z=rand(T, Di), B=rand(T, N), C=rand(T, N))
    else:
        H, P, G, N = spec.mamba_num_heads, spec.mamba_head_dim, spec.n_groups, spec.d_state
        Di = H * P
        a.update(x=xbc[:, :Di].view(T, H, P), B=xbc[:, Di:Di + G * N].view(T, G, N),
                 C=xbc[:, Di + G * N:].view(T, G, N), dt=rand(T, H), z=None)
    return a


def mamba_decode_fn(spec, ar: Arena, B: int, row0: int = 0):
    a, p = mamba_acts(spec, B), mamba_params(spec)
    h = ar.ssm[row0:row0 + B]
    update = mamba1_state_update if spec.mamba_version == 1 else mamba2_state_update
    conv_out = torch.empty_like(a["conv_in"])
    y = torch.empty_like(a["x"])

    def one(layer):
        causal_conv1d_update(a["conv_in"], a["w"], h, ar.cache, layer=layer, bias=a["b"], activation="silu",
                             out=conv_out)
        update(a["x"], a["dt"], p["A"], a["B"], a["C"], h, ar.cache, layer=layer, D=p["D"], z=a["z"],
               dt_bias=p["dt_bias"], dt_softplus=True, out=y)
    return one


def mamba_prefill_fn(spec, ar: Arena, chunks, row0: int = 0):
    T = sum(L for L, _ in chunks)
    a, p = mamba_acts(spec, T), mamba_params(spec)
    cu = packed_meta(chunks)[0]
    init = torch.tensor([int(pf > 0) for _, pf in chunks], dtype=torch.int32, device=DEV)
    h = ar.ssm[row0:row0 + len(chunks)]
    scan = mamba1_scan_prefill if spec.mamba_version == 1 else mamba2_scan_prefill
    conv_out = torch.empty_like(a["conv_in"])
    y = torch.empty_like(a["x"])

    def one(layer):
        causal_conv1d_prefill(a["conv_in"], a["w"], h, cu, init, ar.cache, layer=layer, bias=a["b"],
                              activation="silu", out=conv_out)
        scan(a["x"], a["dt"], p["A"], a["B"], a["C"], h, cu, init, ar.cache, layer=layer, D=p["D"], z=a["z"],
             dt_bias=p["dt_bias"], dt_softplus=True, out=y)
    return one


def all_layers(one, n: int):
    """One replay of a part over every layer of its kind."""
    def fn():
        for layer in range(n):
            one(layer)
    return fn


# --------------------------------------------------------------------------------- the parts
def run_attention(spec, rep: int, quick: bool) -> list[dict]:
    rows = []
    for B in DEC_B[::2] if quick else DEC_B:
        for ctx in DEC_CTX[:2] if quick else DEC_CTX:
            if B * ctx > MAX_DEC_TOKENS:
                continue
            ar = build_arena(spec, [ctx] * B)
            rows.append(dict(part="attn_decode", B=B, ctx=ctx, layers=spec.num_attn_layers,
                             kv_bytes_per_layer=B * ctx * spec.kv_bytes_per_token // spec.num_attn_layers,
                             **timed(all_layers(attn_decode_fn(spec, ar, B, ctx), spec.num_attn_layers), rep)))
            del ar
            free()
    for B, L, pf in PREFILL[:4] if quick else PREFILL:
        ar = build_arena(spec, [L + pf] * B)
        rows.append(dict(part="attn_prefill", B=B, L=L, prefix=pf, layers=spec.num_attn_layers,
                         tokens=B * L, pairs=B * (L * pf + L * (L + 1) // 2),
                         **timed(all_layers(attn_prefill_fn(spec, ar, [(L, pf)] * B), spec.num_attn_layers), rep)))
        del ar
        free()
    return rows


def run_mamba(spec, rep: int, quick: bool) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        sp = with_state_dtype(spec, dtype)
        ar = build_arena(sp, [16] * max(MAMBA_B))
        for B in MAMBA_B[::2] if quick else MAMBA_B:
            rows.append(dict(part="mamba_decode", spec=spec.name, state_dtype=str(dtype).split(".")[1], B=B,
                             layers=sp.num_mamba_layers,
                             state_bytes_per_layer=2 * B * (sp.ssm_state_bytes_per_layer + sp.conv_state_bytes_per_layer),
                             **timed(all_layers(mamba_decode_fn(sp, ar, B), sp.num_mamba_layers), rep)))
        for B, L, pf in PREFILL[:4] if quick else PREFILL:
            rows.append(dict(part="mamba_prefill", spec=spec.name, state_dtype=str(dtype).split(".")[1], B=B, L=L,
                             prefix=pf, tokens=B * L, layers=sp.num_mamba_layers,
                             **timed(all_layers(mamba_prefill_fn(sp, ar, [(L, pf)] * B), sp.num_mamba_layers), rep)))
        del ar
        free()
    return rows


def run_linear(spec_name: str, rep: int, quick: bool) -> list[dict]:
    rows = []
    for K, N in SM.distinct_shapes(spec_name):
        nbytes = K * N * 2
        copies = max(2, min(8, math.ceil((256 << 20) / nbytes)))
        ws = [rand(K, N, scale=0.02) for _ in range(copies)]
        for T in T_GRID[::2] if quick else T_GRID:
            x = rand(T, K)
            outs = [torch.empty(T, N, device=DEV, dtype=ACT) for _ in range(copies)]

            def fn(x=x, ws=ws, outs=outs):
                for w, o in zip(ws, outs):
                    torch.mm(x, w, out=o)
            r = timed(fn, rep)
            r["ms"], r["p20_ms"], r["p80_ms"] = (r[k] / copies for k in ("ms", "p20_ms", "p80_ms"))
            rows.append(dict(part="linear", spec=spec_name, K=K, N=N, T=T, copies=copies, **r))
            del outs, x
        del ws
        free()
    return rows


def run_glue(spec_name: str, rep: int, quick: bool) -> list[dict]:
    rows = []
    m = SM.MODELS[spec_name]
    for kind in SM.glue_kinds(m):
        for T in T_GRID[::2] if quick else T_GRID:
            fn = SM.glue_fn(m, kind, T, DEV)
            rows.append(dict(part="glue", spec=spec_name, kind=kind, T=T, **timed(fn, rep)))
        free()
    return rows


def run_migrate(spec) -> list[dict]:
    rows = []
    for n in MIGRATE_SLABS:
        def setup(n=n):
            slab = -(-spec.ssm_block_bytes // (1 << 20)) << 20     # a slab must hold an SSM block
            a = AVMPAllocator(spec, (4 * n + 8) * slab, device=DEV, kv_fraction=0.75, slab_bytes=slab)
            kv = a.alloc_kv(int(a.free_counts.tolist()[a.pool_index("kv")]))
            a.free(kv[torch.randperm(kv.numel(), device=kv.device)[: kv.numel() // 2]])  # half live, scattered
            return a

        def call(a, n=n):
            before = a.stats().bytes_copied
            a.rebalance("ssm", n)
            return a.stats().bytes_copied - before
        r = event_ms(setup, call)
        rows.append(dict(part="migrate", slabs=n, bytes_moved=r.pop("extra"), **r))
        free()
    return rows


def run_alloc(spec) -> list[dict]:
    rows = []
    for R in ALLOC_ROWS:
        def setup(R=R):
            # at least a few slabs per pool, whatever the tiny spec's unit sizes
            cap = max(R * 4 * spec.kv_page_bytes + 4 * R * spec.ssm_block_bytes, 16 * (2 << 20))
            a = AVMPAllocator(spec, cap, device=DEV, kv_fraction=0.5)
            bt = torch.full((R, 8), -1, dtype=torch.int32, device=DEV)
            return a, bt, torch.zeros(R, dtype=torch.int32, device=DEV), torch.ones(R, dtype=torch.int32, device=DEV)

        def call(s):
            a, bt, npg, need = s
            a.grow_kv(bt, npg, need)
            a.release_rows(torch.arange(bt.shape[0], dtype=torch.int32, device=DEV), bt, npg)
            return None
        r = event_ms(setup, call)
        r.pop("extra")
        rows.append(dict(part="alloc", rows=R, calls=2, **r))
        free()
    return rows


# ---------------------------------------------------------------------------------- whole steps
def run_steps(spec_name: str, rep: int, quick: bool, spec) -> list[dict]:
    model = SM.MODELS[spec_name]
    weights = SM.make_weights(model, DEV)
    rows = []
    for n_dec, ctx, chunks in STEPS[:3] if quick else STEPS:
        tokens = [ctx] * n_dec + [L + pf for L, pf in chunks]
        ar = build_arena(spec, tokens)
        step = SM.LayerStack(model, spec, weights, ar, n_dec, ctx, list(chunks), DEV,
                             parts=dict(attn_decode=attn_decode_fn, attn_prefill=attn_prefill_fn,
                                        mamba_decode=mamba_decode_fn, mamba_prefill=mamba_prefill_fn))
        rows.append(dict(part="step", spec=spec_name, decode_rows=n_dec, decode_ctx=ctx,
                         chunks=[list(c) for c in chunks], tokens=n_dec + sum(L for L, _ in chunks),
                         **timed(step.forward, rep)))
        del step, ar
        free()
    del weights
    free()
    return rows


# ------------------------------------------------------------------------------------------ main
def tiny_setup():
    """The CPU dry run: toy dims and grids, the same code paths."""
    global T_GRID, DEC_B, DEC_CTX, MAMBA_B, PREFILL, STEPS, MIGRATE_SLABS, ALLOC_ROWS, DEV
    DEV = "cpu"
    T_GRID, DEC_B, DEC_CTX, MAMBA_B = (1, 8), (1, 2), (32,), (1, 2)
    PREFILL, MIGRATE_SLABS, ALLOC_ROWS = ((1, 16, 0), (2, 8, 16)), (1,), (4,)
    STEPS = ((2, 32, ()), (1, 16, ((8, 0),)))
    base = get_preset("nemotron-h-8b")
    spec = dataclasses.replace(base, name="tiny", num_attn_layers=1, num_mamba_layers=2, num_kv_heads=2, head_dim=64,
                               d_inner=64, mamba_num_heads=4, mamba_head_dim=16, d_state=16, n_groups=2)
    return spec


def environment() -> dict:
    import platform
    from harness import commit
    env = dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version(), commit=commit())
    if DEV == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(), sm_count=p.multi_processor_count, gpu_memory_bytes=p.total_memory,
                   cuda=torch.version.cuda)
    else:
        env.update(gpu="none (CPU dry run, Triton interpreter)")
    return env


def ceilings(rep: int) -> dict:
    from harness import copy_bandwidth
    from bench_prefill import matmul_tflops
    return dict(copy=copy_bandwidth(2.0, rep), matmul=matmul_tflops(8192, rep))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--rep", type=int, default=40, help="do_bench rep (ms) per timing")
    ap.add_argument("--quick", action="store_true", help="every other point of each grid")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run at toy size")
    ap.add_argument("--specs", nargs="+", default=list(SPECS))
    args = ap.parse_args(argv)
    t0 = time.time()
    specs = {"tiny": tiny_setup()} if args.tiny else {n: get_preset(n) for n in args.specs}
    res = dict(bench="bench_step", env=environment(), args=vars(args), rows=[])
    if DEV == "cuda":
        res["ceilings"] = ceilings(args.rep)
    out = args.out or f"perf/results/bench_step_{res['env']['gpu'].split(' (')[0].replace(' ', '_')}.json"
    first = next(iter(specs.values()))
    # the three presets share the attention geometry (8 KV heads of 128, 32 query heads): timed once
    add(res, out, t0, [dict(r, spec=first.name) for r in run_attention(first, args.rep, args.quick)])
    for name, spec in specs.items():
        print(f"[{time.time() - t0:6.0f} s] {name}", flush=True)
        add(res, out, t0, run_mamba(spec, args.rep, args.quick))
        add(res, out, t0, run_linear(name, args.rep, args.quick))
        add(res, out, t0, run_glue(name, args.rep, args.quick))
    add(res, out, t0, [dict(r, spec=first.name) for r in run_migrate(first) + run_alloc(first)])
    step_spec = "tiny" if args.tiny else "nemotron-h-8b"
    if step_spec in specs:
        add(res, out, t0, run_steps(step_spec, args.rep, args.quick, specs[step_spec]))
    print_table(res)
    print(f"wrote {out} ({res['wall_s']:.0f} s)")
    return 0


def add(res: dict, out: str, t0: float, rows: list[dict]) -> None:
    """Append a part's rows and rewrite the file, so that a run cut short keeps what it measured."""
    res["rows"] += rows
    res["wall_s"] = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


def print_table(res: dict) -> None:
    by = {}
    for r in res["rows"]:
        by.setdefault(r["part"], []).append(r)
    for part, rows in by.items():
        ms = [r["ms"] for r in rows]
        print(f"{part:14s} {len(rows):3d} timings, {min(ms) * 1e3:9.1f} - {max(ms) * 1e3:9.1f} us")
    for r in by.get("step", []):
        print(f"  step dec {r['decode_rows']:4d} x {r['decode_ctx']:6d} chunks {r['chunks']}: {r['ms']:.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
