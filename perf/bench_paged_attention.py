"""Decode attention benchmark (GPU): ours (paged, arena) vs vLLM unified attention vs FlexAttention
paged vs torch SDPA flash on contiguous K/V, Jamba-1.5-Mini attention shape, bf16.

    python perf/bench_paged_attention.py [--out FILE] [--attn-layers N] [--batch 1 16 64 256]
                                   [--ctx 512 4096 32768] [--no-flex] [--sweep-configs]

Shape: Hq=32, Hkv=8, D=128, page 16 tokens; every request of a cell has the same context. For
each cell (B, ctx), in one process:

- the pages come from an ``AVMPAllocator`` of the ``jamba-1.5-mini`` preset (pages hold all
  ``--attn-layers`` attention layers, default the spec's 4; layer 0 is read) whose KV pool holds
  exactly the cell's pages (a cell whose arena does not fit is rerun with 1 layer per page,
  marked ``*`` and noted: B=256 ctx 32768 needs 137 GB with 4); the handles are ``torch.randperm``-ed into the block table, so
  consecutive logical pages sit anywhere in the arena. The whole arena is random bf16.
- ours: ``paged_decode_attention`` with its default launch config (reported);
- vLLM ``unified_attention`` (Triton, vendored by perf/vendor_vllm.py) on the same K/V copied into
  vLLM's layout ``[num_pages, 16, Hkv, D]``: its page ids are the physical slots of our pages, so
  it reads the same scattered pattern;
- FlexAttention (torch.compile) through torch's PagedAttention helper, same physical pages; skipped
  (reason recorded) when it does not fit or its compile exceeds the time budget;
- SDPA flash backend on contiguous ``[B, Hkv, ctx, D]`` K/V: the unpaged ceiling.

Every output is checked (NaN-free, |x - ref| <= atol + rtol |ref|) against an fp64 reference of the
same pages before anything is timed; a failed check or an unexpected error makes the script exit 1
(after writing the JSON and the table). Peers run one after another and each copy is freed before
the next, so a cell needs arena + the largest copy; ours and vLLM run only where the arena plus
vLLM's copy fit ``--mem-budget-gb``.

Timing: each callable is captured in a CUDA graph (one decode call per replay; eager launch if
capture fails, recorded), warmed up, then ``triton.testing.do_bench`` (L2 flushed before every
replay) gives the median and the 20/80 % quantiles. Bandwidth counts K+V of the live context read
once + q + out, against a device-to-device copy measured in the same run (bytes read + written).

``--sweep-configs`` instead times several of our launch configs (num_splits, pages_per_iter,
num_warps, num_stages, use_dot) on B=1 ctx 4096, B=16 ctx 32768, B=64 ctx 512, B=64 ctx 4096, each
checked against the reference, to tune the default table in ``decode_config``.

Writes JSON to --out (default perf/results/bench_paged_attention_<gpu>.json) and prints a table last.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import torch

from avmp_triton import AVMPAllocator, PagedCache, get_preset
from avmp_triton.layout import kv_page_layout
from avmp_triton.ops.paged_attention import DecodeConfig, decode_config, decode_workspace, paged_decode_attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402  (perf/peers.py)
from harness import (QUANTILES, CheckFailed, CompileTimeout, bandwidth, copy_bandwidth, environment,  # noqa: E402
                     finish, free_memory, is_resource_error, record_failure, time_replayed, with_timeout)

HQ, HKV, D, PAGE = 32, 8, 128, 16
SPEC = "jamba-1.5-mini"
# bf16 output vs the fp64 reference: output rounding is 2^-8 relative; P is rounded to bf16 before
# P @ V (ours, vLLM, flash), which adds far less. Mis-read pages move outputs by ~1/sqrt(ctx).
TOL = {torch.bfloat16: (2e-3, 2e-2), torch.float16: (5e-4, 5e-3), torch.float32: (1e-5, 1e-4)}
SWEEP_CELLS = [(1, 4096), (16, 32768), (64, 512), (64, 4096)]
DEVICE = "cuda"  # the cells' tensors (a CPU dry run of the control flow swaps it)





# --------------------------------------------------------------------------------------- setup
@dataclasses.dataclass
class Cell:
    """One (B, ctx) problem: the allocator, its pages and every view of them (device-agnostic)."""
    B: int
    ctx: int
    dtype: torch.dtype
    alloc: AVMPAllocator
    cache: PagedCache              # PagedCache.of(alloc), built once: what our ops read
    block_table: torch.Tensor      # [B, W] int32 handles (ours)
    phys_table: torch.Tensor       # [B, W] int32 physical page slots (peers)
    seq_lens: torch.Tensor         # [B] int32
    k_pages: torch.Tensor          # [num_pages, Hkv, T, D] view of layer 0 K in the arena
    v_pages: torch.Tensor
    q: torch.Tensor                # [B, Hq, D]
    scale: float

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[0]


def attn_spec(attn_layers: int | None, dtype: torch.dtype):
    spec = get_preset(SPEC)
    assert (spec.num_kv_heads, spec.head_dim) == (HKV, D), "preset no longer has the Jamba attention shape"
    kw = dict(kv_dtype=dtype)
    if attn_layers is not None:
        kw["num_attn_layers"] = attn_layers
    return dataclasses.replace(spec, **kw)


def arena_plan(spec, pages: int) -> tuple[int, int, int]:
    """(page_bytes, slab_bytes, num_slabs) for a KV pool of at least ``pages`` pages.

    The slab is a whole number of pages (and holds one SSM block, as the allocator requires), so
    a page's byte offset divided by the page size is its physical slot in the arena."""
    page = -(-spec.kv_page_bytes // 16) * 16
    per_slab = max(64, -(-spec.ssm_block_bytes // page))
    per_slab = -(-per_slab // 8) * 8                # page is 16-aligned: 8 pages are 128-aligned
    slabs = max(2, -(-pages // per_slab))
    return page, per_slab * page, slabs


def layer0_views(alloc, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of layer 0 of every page slot, ``[num_pages, Hkv, T, D]`` strided views of the arena."""
    lay = kv_page_layout(alloc.spec, alloc.page_tokens)
    page = alloc.unit_bytes[0]
    assert alloc.slab_bytes % page == 0 and page % dtype.itemsize == 0
    elems = alloc.arena.view(dtype)
    n = alloc.arena.numel() // page
    shape = (n, lay.num_kv_heads, lay.page_tokens, lay.head_dim)
    strides = (page // dtype.itemsize, lay.stride_head, lay.stride_token, 1)
    base = elems.storage_offset()
    return (elems.as_strided(shape, strides, base),
            elems.as_strided(shape, strides, base + lay.stride_kv))


def build_cell(B: int, ctx: int, spec, device, *, seed: int = 0) -> Cell:
    torch.manual_seed(seed + 1000 * B + ctx)
    dtype = spec.kv_dtype
    W = -(-ctx // PAGE)
    page, slab, slabs = arena_plan(spec, B * W)
    alloc = AVMPAllocator(spec, slabs * slab, device=device, kv_fraction=1.0, slab_bytes=slab, page_tokens=PAGE)
    alloc.arena.view(dtype).normal_()          # random K/V everywhere (and in the tails)
    handles = alloc.alloc_kv(B * W)
    handles = handles[torch.randperm(handles.numel(), device=handles.device)]
    bt = handles.view(B, W).contiguous()
    off = alloc.handle_table[bt.long()]
    if bool((off % page != 0).any()):
        raise RuntimeError("page offsets are not multiples of the page size: physical slots undefined")
    phys = (off // page).to(torch.int32)
    k_pages, v_pages = layer0_views(alloc, dtype)
    q = torch.randn(B, HQ, D, device=device).to(dtype)
    sl = torch.full((B,), ctx, dtype=torch.int32, device=device)
    return Cell(B=B, ctx=ctx, dtype=dtype, alloc=alloc, cache=PagedCache.of(alloc), block_table=bt, phys_table=phys,
                seq_lens=sl, k_pages=k_pages, v_pages=v_pages, q=q, scale=D ** -0.5)


def _gather_chunk(pages_view, phys_rows, ctx):
    """``[c, Hkv, ctx, D]`` contiguous copy of the pages listed in ``phys_rows`` ``[c, W]``."""
    c, W = phys_rows.shape
    x = pages_view[phys_rows.long()]                                     # [c, W, Hkv, T, D]
    return x.permute(0, 2, 1, 3, 4).reshape(c, HKV, W * PAGE, D)[:, :, :ctx]


def _chunk_rows(ctx: int, bytes_per_elem: int, budget: int = 1 << 30) -> int:
    return max(1, budget // (2 * HKV * ctx * D * bytes_per_elem))


def reference(cell: Cell, compute_dtype=torch.float64) -> torch.Tensor:
    """fp64 decode attention of every request over its pages (chunks of requests): ``[B, Hq, D]``."""
    B, G = cell.B, HQ // HKV
    out = torch.empty(B, HQ, D, dtype=compute_dtype, device=cell.q.device)
    step = _chunk_rows(cell.ctx, 2 * compute_dtype.itemsize)
    for s in range(0, B, step):
        rows = cell.phys_table[s:s + step]
        k = _gather_chunk(cell.k_pages, rows, cell.ctx).to(compute_dtype)  # [c, Hkv, S, D]
        v = _gather_chunk(cell.v_pages, rows, cell.ctx).to(compute_dtype)
        q = cell.q[s:s + step].to(compute_dtype).view(-1, HKV, G, D)       # q head h -> kv head h // G
        p = torch.softmax(q @ k.transpose(-1, -2) * cell.scale, dim=-1)     # [c, Hkv, G, S]
        out[s:s + step] = (p @ v).view(-1, HQ, D)
        del k, v, p
    return out


def contiguous_kv(cell: Cell) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, Hkv, ctx, D]`` K and V gathered from the pages (the unpaged input of SDPA)."""
    k = torch.empty(cell.B, HKV, cell.ctx, D, dtype=cell.dtype, device=cell.q.device)
    v = torch.empty_like(k)
    step = _chunk_rows(cell.ctx, 2 * cell.dtype.itemsize)
    for s in range(0, cell.B, step):
        rows = cell.phys_table[s:s + step]
        k[s:s + step] = _gather_chunk(cell.k_pages, rows, cell.ctx)
        v[s:s + step] = _gather_chunk(cell.v_pages, rows, cell.ctx)
    return k, v


def check(name: str, got: torch.Tensor, ref: torch.Tensor, dtype, other: dict | None = None) -> dict:
    """Compare ``got`` with the reference; raise CheckFailed (after recording) on a mismatch."""
    atol, rtol = TOL[dtype]
    g, r = got.to(ref.dtype), ref
    err = (g - r).abs()
    nan = int(torch.isnan(got).sum())
    worst = float(err.nan_to_num(float("inf")).max())
    excess = float((err - rtol * r.abs()).nan_to_num(float("inf")).max())
    res = dict(kernel=name, max_abs_err_vs_ref=worst, max_abs_ref=float(r.abs().max()), nan=nan,
               atol=atol, rtol=rtol, ok=nan == 0 and excess <= atol)
    for k, t in (other or {}).items():
        res[f"max_abs_diff_vs_{k}"] = float((got.float() - t.float()).abs().max())
    if not res["ok"]:
        raise CheckFailed(f"{name}: max|err| {worst:.3e} (|ref| max {res['max_abs_ref']:.3e}, atol {atol}, "
                          f"rtol {rtol}, NaNs {nan})", res)
    return res


# -------------------------------------------------------------------------------------- timing
# ---------------------------------------------------------------------------------------- cells
def cell_sizes(spec, B: int, ctx: int, dtype) -> dict:
    W = -(-ctx // PAGE)
    page, slab, slabs = arena_plan(spec, B * W)
    arena = slabs * slab
    pool_pages = arena // page
    layer_page = 2 * HKV * PAGE * D * dtype.itemsize                  # K + V of one layer in a page
    live_kv = 2 * B * ctx * HKV * D * dtype.itemsize
    qo = 2 * B * HQ * D * dtype.itemsize
    return dict(pages=B * W, pool_pages=pool_pages, page_bytes=page, arena_bytes=arena,
                live_kv_bytes=live_kv, q_out_bytes=qo, bytes_model=live_kv + qo,
                vllm_copy_bytes=pool_pages * layer_page,
                flex_copy_bytes=pool_pages * layer_page + 2 * B * pool_pages * 8,
                sdpa_copy_bytes=live_kv,
                reference_temp_bytes=min(live_kv * 3 * 4, 3 << 30))


def fits(need: int, budget: int) -> tuple[bool, str]:
    free, _ = torch.cuda.mem_get_info()
    have = min(budget, free - (1 << 30))
    return need <= have, f"needs {need / 1e9:.1f} GB, budget {budget / 1e9:.1f} GB, free {free / 1e9:.1f} GB"


class Runner:
    def __init__(self, args, copy_gbps: float):
        self.args = args
        self.copy_gbps = copy_gbps
        self.flex_left = args.flex_budget_s
        self.flex_timed_out = False
        self.failures: list[str] = []

    def fail(self, row: dict, name: str, exc: BaseException) -> None:
        record_failure(row, name, exc, f"B={row['B']} ctx={row['ctx']}", self.failures, self.args.fail_fast)

    def _peer(self, row, name, prepare, ref, outs, nbytes, dtype, *, annotate=None, timeout=None) -> None:
        """Prepare a peer, check its output, time it. In its own frame, so every copy it made is
        released on return, whatever happened."""
        t0 = time.time()
        try:
            run = prepare()
            first = (lambda: run().clone()) if timeout is None else (lambda: with_timeout(timeout, lambda: run().clone()))
            got = first()
            torch.cuda.synchronize()
            first_s = time.time() - t0
            row["checks"][name] = check(name, got, ref, dtype, outs)
            outs[name] = got
            e = time_replayed(run, got, self.args.rep, replay_atol=TOL[got.dtype][0])
            e["prepare_and_first_call_s"] = first_s
            if annotate:
                annotate(run, e)
            bandwidth(e, nbytes, self.copy_gbps)
            row["kernels"][name] = e
        except CompileTimeout as exc:
            # an interrupted compile can leave dynamo/inductor half-done: no more of it after this
            self.flex_left, self.flex_timed_out = 0, True
            row["skipped"][name] = f"torch.compile took too long: {exc}; off for later cells"
        except Exception as exc:
            if isinstance(exc, CheckFailed) or not is_resource_error(exc):
                self.fail(row, name, exc)
            else:
                row["skipped"][name] = f"out of memory/resources: {str(exc).splitlines()[0][:200]}"
        finally:
            run = got = first = None
            free_memory()

    def run_cell(self, spec, B: int, ctx: int) -> dict:
        a = self.args
        dtype = spec.kv_dtype
        sz = cell_sizes(spec, B, ctx, dtype)
        row = dict(B=B, ctx=ctx, sizes=sz, kernels={}, checks={}, skipped={})
        budget = int(a.mem_budget_gb * 1e9)

        def need(z):
            return z["arena_bytes"] + max(z["vllm_copy_bytes"], z["reference_temp_bytes"])

        ok, why = fits(need(sz), budget)
        if not ok and spec.num_attn_layers > 1 and not a.no_fit_layers:
            # pages of one attention layer hold the same layer-0 K/V tiles at a quarter of the arena
            spec1 = dataclasses.replace(spec, num_attn_layers=1)
            sz1 = cell_sizes(spec1, B, ctx, dtype)
            ok1, why1 = fits(need(sz1), budget)
            if ok1:
                row["note"] = (f"arena with {spec.num_attn_layers} layers per page does not fit ({why}): "
                               f"run with 1 attention layer per page instead")
                spec, sz, ok, why = spec1, sz1, ok1, why1
                row["sizes"] = sz
        row["attn_layers_per_page"] = spec.num_attn_layers
        if not ok:
            reason = f"arena {sz['arena_bytes'] / 1e9:.1f} GB + vLLM copy {sz['vllm_copy_bytes'] / 1e9:.1f} GB: {why}"
            for k in ("ours", "vllm", "flex", "sdpa"):
                row["skipped"][k] = reason
            return row
        t0 = time.time()
        cell = build_cell(B, ctx, spec, DEVICE, seed=a.seed)
        ref = reference(cell)
        torch.cuda.synchronize()
        row["setup_s"] = time.time() - t0
        nbytes = sz["bytes_model"]
        outs = {}

        # ours (default launch config)
        cfg = decode_config(batch=B, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, page_tokens=PAGE,
                            max_seq_len=ctx, sm_count=_sm_count())
        ws = decode_workspace(B, HQ, D, cfg.num_splits, DEVICE)
        out = torch.full((B, HQ, D), float("nan"), dtype=dtype, device=DEVICE)

        def ours():
            return paged_decode_attention(cell.q, cell.block_table, cell.seq_lens, cell.cache, layer=0, out=out,
                                          workspace=ws, max_seq_len=ctx)

        try:
            ours()
            torch.cuda.synchronize()
            row["checks"]["ours"] = check("ours", out, ref, dtype)
            outs["ours"] = out.clone()
            e = time_replayed(ours, out.clone(), a.rep, replay_atol=TOL[out.dtype][0])
            e["config"] = dataclasses.asdict(cfg)
            bandwidth(e, nbytes, self.copy_gbps)
            row["kernels"]["ours"] = e
        except Exception as exc:
            self.fail(row, "ours", exc)
        out = ws = None
        free_memory()

        # vLLM unified attention on a copy in its layout, same physical pages
        if a.no_vllm:
            row["skipped"]["vllm"] = "--no-vllm"
        else:
            self._peer(row, "vllm", lambda: peers.prepare_vllm_unified_attention(
                cell.q, cell.k_pages, cell.v_pages, cell.phys_table, cell.seq_lens, cell.scale),
                ref, outs, nbytes, dtype,
                annotate=lambda run, e: e.update(path="3D split-K + reduce" if run.uses_3d else "2D"))

        # SDPA flash on contiguous K/V (gathered from the same pages)
        ok, why = fits(sz["arena_bytes"] + sz["sdpa_copy_bytes"], budget)
        if a.no_sdpa:
            row["skipped"]["sdpa"] = "--no-sdpa"
        elif not ok:
            row["skipped"]["sdpa"] = f"contiguous K/V copy does not fit: {why}"
        else:
            def sdpa_note(run, e):
                e["gqa"] = run.gqa
                if run.gqa == "repeat_interleave":
                    e["note"] = "flash rejected enable_gqa: K/V repeated to Hq heads, it reads 4x the bytes counted"

            self._peer(row, "sdpa", lambda: peers.prepare_sdpa_contiguous(cell.q, *contiguous_kv(cell), cell.scale),
                       ref, outs, nbytes, dtype, annotate=sdpa_note)

        # FlexAttention paged (compiled), with a compile deadline
        ok, why = fits(sz["arena_bytes"] + sz["flex_copy_bytes"], budget)
        if a.no_flex:
            row["skipped"]["flex"] = "--no-flex"
        elif not ok:
            row["skipped"]["flex"] = f"its paged cache copy does not fit: {why}"
        elif self.flex_left <= 0:
            row["skipped"]["flex"] = (f"FlexAttention compile budget ({a.flex_budget_s:.0f} s) used up"
                                      + (" or off after a compile timeout" if self.flex_timed_out else ""))
        else:
            t0 = time.time()
            self._peer(row, "flex", lambda: peers.prepare_flex_paged_attention(
                cell.q, cell.k_pages, cell.v_pages, cell.phys_table, cell.seq_lens, cell.scale, compile=True),
                ref, outs, nbytes, dtype, timeout=min(a.flex_timeout_s, self.flex_left))
            self.flex_left -= time.time() - t0

        k = row["kernels"]
        row["ratios"] = {f"ours_over_{p}": k["ours"]["ms"] / k[p]["ms"]
                         for p in ("vllm", "sdpa", "flex") if "ours" in k and p in k}
        cell = ref = outs = None
        free_memory()
        return row

    def sweep_cell(self, spec, B: int, ctx: int) -> dict:
        """Several launch configs of ours on one cell, each checked, then timed."""
        a = self.args
        dtype = spec.kv_dtype
        sz = cell_sizes(spec, B, ctx, dtype)
        row = dict(B=B, ctx=ctx, sizes=sz, configs=[], skipped=[])
        ok, why = fits(sz["arena_bytes"] + sz["reference_temp_bytes"], int(a.mem_budget_gb * 1e9))
        if not ok:
            row["skipped_cell"] = why
            return row
        cell = build_cell(B, ctx, spec, DEVICE, seed=a.seed)
        ref = reference(cell)
        sms = _sm_count()
        default = decode_config(batch=B, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, page_tokens=PAGE,
                                max_seq_len=ctx, sm_count=sms)
        row["default_config"] = dataclasses.asdict(default)
        seen: dict[tuple, dict] = {}
        out = torch.empty(B, HQ, D, dtype=dtype, device=DEVICE)

        def measure(**over) -> dict | None:
            cfg = sweep_config(default, B, ctx, sms, **over)
            key = dataclasses.astuple(cfg)
            if key in seen:
                return seen[key]
            if time.time() > self.sweep_deadline:
                row["skipped"].append(dict(config=dataclasses.asdict(cfg), reason="sweep time budget used up"))
                return None
            if cfg.use_dot and cfg.pages_per_iter * PAGE < 16:
                return None
            ws = decode_workspace(B, HQ, D, cfg.num_splits, DEVICE)

            def fn():
                return paged_decode_attention(cell.q, cell.block_table, cell.seq_lens, cell.cache, layer=0,
                                              out=out, workspace=ws, max_seq_len=ctx, config=cfg)

            entry = dict(config=dataclasses.asdict(cfg), default=cfg == default)
            try:
                out.fill_(float("nan"))
                fn()
                torch.cuda.synchronize()
                entry["check"] = check("ours", out, ref, dtype)
                entry.update(time_replayed(fn, out.clone(), a.rep, replay_atol=TOL[out.dtype][0]))
                bandwidth(entry, sz["bytes_model"], self.copy_gbps)
            except Exception as exc:
                if isinstance(exc, CheckFailed) or not is_resource_error(exc):
                    self.fail(dict(B=B, ctx=ctx), f"ours {dataclasses.asdict(cfg)}", exc)
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            seen[key] = entry
            row["configs"].append(entry)
            print(f"  B={B:<3d} ctx={ctx:<5d} {_cfg_str(cfg):34s} "
                  + (f"{entry['ms'] * 1e3:9.1f} us {entry['gbps']:6.0f} GB/s" if "ms" in entry else entry.get("error", "")),
                  flush=True)
            return entry

        def best(entries):
            good = [e for e in entries if e and "ms" in e]
            return min(good, key=lambda e: e["ms"]) if good else None

        measure()
        blocks = math.ceil(ctx / default.block_tokens)
        splits = [s for s in (1, 2, 4, 8, 16, 32, 64) if s <= max(1, blocks)]
        b = best([measure(num_splits=s) for s in splits])
        base = dict(num_splits=b["config"]["num_splits"]) if b else {}
        tiles = [measure(**base, pages_per_iter=p, num_warps=w, num_stages=st)
                 for p in (2, 4, 8) for w in (4, 8) for st in (2, 3, 4)]
        b = best(tiles) or b
        if b:
            c = b["config"]
            # the split count again around the best tile, and the broadcast (no tl.dot) path
            for s in splits:
                measure(num_splits=s, pages_per_iter=c["pages_per_iter"], num_warps=c["num_warps"],
                        num_stages=c["num_stages"])
            for p in (1, 2):
                for w in (4, 8):
                    measure(num_splits=c["num_splits"], pages_per_iter=p, num_warps=w, num_stages=c["num_stages"],
                            use_dot=False)
        b = best(row["configs"])
        d = seen.get(dataclasses.astuple(default))
        if b:
            row["best"] = dict(config=b["config"], ms=b["ms"], gbps=b["gbps"],
                               speedup_vs_default=(d["ms"] / b["ms"]) if d and "ms" in d else None)
        cell = ref = out = None
        free_memory()
        return row


def _sm_count() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def sweep_config(default: DecodeConfig, B: int, ctx: int, sms: int, **over) -> DecodeConfig:
    """``default`` with the fields in ``over`` replaced, every field set: ``block_tokens`` is
    derived again from ``pages_per_iter`` (``decode_config`` rejects a stale one)."""
    fields = dict(dataclasses.asdict(default), **over, block_tokens=None)
    return decode_config(batch=B, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, page_tokens=PAGE, max_seq_len=ctx,
                         sm_count=sms, **fields)


def _cfg_str(c) -> str:
    return (f"s{c.num_splits} p{c.pages_per_iter} w{c.num_warps} st{c.num_stages} "
            f"{'dot' if c.use_dot else 'bcast'}{'' if c.max_registers is None else f' r{c.max_registers}'}")


# ------------------------------------------------------------------------------------ metadata
def print_table(res: dict) -> None:
    e = res["env"]
    print(f"\nGPU {e['gpu']}  torch {e['torch']}  triton {e['triton']}  vllm {e.get('vllm_vendored')}  "
          f"commit {e['commit'][:12]}")
    cb = res["copy_bandwidth"]
    print(f"copy ceiling {cb['gbps']:.0f} GB/s (read+write); medians in us; %cp = (K+V live + q + out) / t / ceiling; "
          f"pages hold {res['shapes']['attn_layers_per_page']} layer(s), layer 0 read")
    if res.get("cells"):
        names = ("ours", "vllm", "flex", "sdpa")
        print(f"{'B':>4s} {'ctx':>6s} | " + " | ".join(f"{n + ' us':>9s} {'%cp':>4s}" for n in names)
              + f" | {'o/vllm':>6s} {'o/flex':>6s} {'o/sdpa':>6s} | ours config (s=splits p=pages/iter w=warps st=stages)")
        for r in res["cells"]:
            k = r["kernels"]

            def t(n):
                if n in k:
                    return f"{k[n]['ms'] * 1e3:9.1f} {k[n]['pct_of_copy']:4.0f}"
                return f"{'FAIL' if n in r.get('failures', {}) else 'skip':>9s} {'':4s}"

            ra = r.get("ratios", {})
            cfg = k["ours"]["config"] if "ours" in k else None
            star = "*" if r.get("attn_layers_per_page") != res["shapes"]["attn_layers_per_page"] else " "
            print(f"{r['B']:4d} {r['ctx']:5d}{star} | " + " | ".join(t(n) for n in names) + " | "
                  + " ".join(f"{ra.get('ours_over_' + p, float('nan')):6.2f}" for p in ("vllm", "flex", "sdpa"))
                  + f" | {_cfg_str(argparse.Namespace(**cfg)) if cfg else ''}")
        for r in res["cells"]:
            if "note" in r:
                print(f"  * B={r['B']} ctx={r['ctx']}: {r['note']}")
        skipped = [(r["B"], r["ctx"], n, why) for r in res["cells"] for n, why in r["skipped"].items()]
        for B, ctx, n, why in skipped:
            print(f"  skipped B={B} ctx={ctx} {n}: {why}")
    for r in res.get("sweep", []):
        b, d = r.get("best"), r.get("default_config")
        if b:
            print(f"sweep B={r['B']:<3d} ctx={r['ctx']:<5d} best {_cfg_str(argparse.Namespace(**b['config']))} "
                  f"{b['ms'] * 1e3:.1f} us {b['gbps']:.0f} GB/s ({(b['speedup_vs_default'] or float('nan')):.2f}x "
                  f"vs default {_cfg_str(argparse.Namespace(**d))}); {len(r['configs'])} configs, "
                  f"{len(r['skipped'])} skipped")
        else:
            print(f"sweep B={r['B']} ctx={r['ctx']}: nothing measured ({r.get('skipped_cell', '')})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--ctx", type=int, nargs="+", default=[512, 4096, 32768])
    ap.add_argument("--attn-layers", type=int, default=None,
                    help="attention layers per KV page (default: the spec's 4)")
    ap.add_argument("--no-fit-layers", action="store_true",
                    help="skip a cell whose arena does not fit, instead of rerunning it with 1 layer per page")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--mem-budget-gb", type=float, default=70.0)
    ap.add_argument("--copy-gib", type=float, default=2.0, help="size of the copy that measures the ceiling")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms of timed replays per kernel)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--flex-timeout-s", type=float, default=60.0, help="per-cell FlexAttention compile limit")
    ap.add_argument("--flex-budget-s", type=float, default=150.0, help="total FlexAttention compile time")
    ap.add_argument("--sweep-configs", action="store_true", help="time several of our launch configs instead")
    ap.add_argument("--sweep-budget-s", type=float, default=420.0)
    ap.add_argument("--fail-fast", action="store_true", help="stop at the first failed check")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_paged_attention needs a CUDA GPU: it reports device time or nothing")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: this benchmark times compiled kernels")
    # every cell is a new shape for torch.compile(flex_attention); the default limit (8) would
    # silently fall back to eager flex after 8 cells
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    t_start = time.time()
    dtype = getattr(torch, args.dtype)
    spec = attn_spec(args.attn_layers, dtype)
    res = dict(
        env=environment(),
        shapes=dict(spec=SPEC, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, page_tokens=PAGE, dtype=args.dtype,
                    attn_layers_per_page=spec.num_attn_layers, layer_read=0, page_bytes=spec.kv_page_bytes,
                    same_context_for_all_requests=True),
        timing=dict(method="triton.testing.do_bench on a CUDA-graph replay of one call (L2 flushed before each)",
                    warmup_ms=25, rep_ms=args.rep, quantiles=QUANTILES),
        bytes_model="K+V of the live context (layer 0) read once + q + out; block table, workspace not counted",
        check_tolerance={str(k): v for k, v in TOL.items()},
        mem_budget_gb=args.mem_budget_gb,
    )
    res["copy_bandwidth"] = copy_bandwidth(args.copy_gib, args.rep)
    print(f"copy ceiling: {res['copy_bandwidth']['gbps']:.0f} GB/s", flush=True)
    runner = Runner(args, res["copy_bandwidth"]["gbps"])
    if args.sweep_configs:
        runner.sweep_deadline = t_start + args.sweep_budget_s
        res["sweep"] = [runner.sweep_cell(spec, B, ctx) for B, ctx in SWEEP_CELLS]
    else:
        res["cells"] = []
        for B in args.batch:
            for ctx in args.ctx:
                t0 = time.time()
                row = runner.run_cell(spec, B, ctx)
                row["cell_s"] = time.time() - t0
                res["cells"].append(row)
                k = row["kernels"]
                print(f"B={B:<3d} ctx={ctx:<5d} " + "  ".join(f"{n} {v['ms'] * 1e3:.1f} us" for n, v in k.items())
                      + f"  ({row['cell_s']:.0f} s)", flush=True)
    res["failures"] = runner.failures
    res["wall_s"] = time.time() - t_start
    finish(res, "bench_paged_attention", args.out, args.sweep_configs, runner.failures, print_table)

if __name__ == "__main__":
    main()
