"""Decode kernels, variants side by side in one GPU run (issue 13 items 1, 3c, 5).

    python perf/sweep_decode_variants.py --out FILE [--rep 25] [--budget-s 200]
    python perf/sweep_decode_variants.py --smoke      # CPU: the control flow and checks, tiny shapes

In one process, each variant checked against a reference before it is timed (CUDA-graph replay
medians, L2 flushed before each replay, ``perf/harness.py``):

- ceilings: a device copy (bytes read + written) and two read-only passes that write almost
  nothing (a Triton sum over 2 GiB in 16-byte loads, and ``torch.sum``): the larger read figure is
  the ceiling decode attention is held to; per cell, the same passes over the cell's own byte
  count (``same_bytes``, %sz), which pay the fixed costs a short kernel pays (launch, ramp, the
  dirty lines the L2 flush leaves) and so say how much of a small cell's gap is the kernel's;
- decode attention, bf16, Jamba's shape (32/8 heads, D 128, pages of 16 holding 4 attention
  layers, scattered, layer 0 read; ``bench_paged_attention``'s cells): the default launch, the
  previous table's (commit 32e7231: 64 tokens a step, prefetch on, 2 stages unsplit), the default
  with prefetch flipped, and launch variants (splits, tokens a step, stages, register cap); SDPA
  flash on contiguous K/V beside them;
- decode attention over fp8 (e4m3) pages at the same shapes, per-kv-head scales, checked against
  attention over the dequantised pages: the default and a few variants; the bf16 default's time
  at the same cell gives the speed-up;
- Mamba1 state update (Jamba layer, bf16 state) at B=256 and 64: channels x warps of one request
  per program; Mamba2 (Nemotron-H layer) at its default as the control.

Every figure is GB/s of the bytes the kernel must move (decode: live K+V read once + q + out;
Mamba: states read and written + activations + parameters) against the copy and the read ceilings.
A variant that fails to compile or disagrees with the reference is recorded (``failures``) and
the sweep goes on; a variant past ``--budget-s`` is recorded as skipped. Exit 1 if any check failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import torch

from avmp_triton import _triton_env  # noqa: F401  (before triton: the interpreter on CPU-only hosts)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_mamba_state as BM  # noqa: E402
import bench_paged_attention as BA  # noqa: E402
import harness as H  # noqa: E402
import peers  # noqa: E402
from avmp_triton import AVMPAllocator, PagedCache  # noqa: E402
from avmp_triton.layout import kv_page_layout  # noqa: E402
from avmp_triton.ops import (DecodeConfig, MambaStateConfig, decode_config, decode_workspace,  # noqa: E402
                             mamba1_state_update, mamba2_state_update, paged_decode_attention)

FP8 = torch.float8_e4m3fn
HQ, HKV, D, PAGE = BA.HQ, BA.HKV, BA.D, BA.PAGE
BF16_CELLS = [(1, 32768), (16, 4096), (16, 32768), (64, 512), (64, 4096)]
FP8_CELLS = [(1, 32768), (16, 4096), (16, 32768), (64, 4096)]
MAMBA_CELLS = [("mamba1", 256), ("mamba1", 64), ("mamba2", 256)]
# Mamba1 launches besides the default (channels, warps): one request per program
MAMBA1_LAUNCHES = [(512, 8), (512, 16), (1024, 16), (128, 4), (256, 4)]
NO_CAP = 255              # ptxas's own limit: a register cap that caps nothing
SMOKE_DECODE = [(2, 96), (1, 512)]


# ------------------------------------------------------------------------------------- ceilings
@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Program p sums blocks p, p + P, ... of ``x`` (fp32) and writes one number: reads n * 4 bytes."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, n, step):
        o = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + o, mask=o < n, other=0.0)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


def read_ceiling(gib: float, rep: int, sm_count: int) -> dict:
    """GB/s of two read-only passes over ``gib`` GiB: the Triton sum above and ``torch.sum``."""
    n = int(gib * 2**30) // 4
    x = torch.rand(n, device="cuda")
    res = dict(bytes=4 * n)
    grid = sm_count * 4
    out = torch.empty(grid, device="cuda")

    def triton_read():
        _read_kernel[(grid,)](x, out, n, BLOCK=8192, num_warps=8)
        return out

    def torch_read():
        return x.sum()

    for name, fn in (("triton_sum", triton_read), ("torch_sum", torch_read)):
        expect = fn().clone()
        e = H.time_replayed(fn, expect, rep, replay_atol=1e-3 * float(expect.abs().max()))
        e["gbps"] = 4 * n / e["ms"] / 1e6
        res[name] = e
    res["gbps"] = max(res["triton_sum"]["gbps"], res["torch_sum"]["gbps"])
    res["note"] = "bytes read / median time; the ceiling is the larger of the two"
    del x
    H.free_memory()
    return res


# ------------------------------------------------------------------------------------ the sweep
class Sweep:
    """Runs, checks and times variants; records each in ``rows`` (failures and skips too)."""

    def __init__(self, args, smoke: bool):
        self.args, self.smoke = args, smoke
        self.deadline = time.time() + args.budget_s
        self.failures: list[str] = []
        self.copy_gbps = self.read_gbps = None

    def timed(self, fn, expect, *, restore=None, atol=0.0) -> dict:
        if self.smoke:
            return {}
        return H.time_replayed(fn, expect, self.args.rep, restore=restore, replay_atol=atol)

    def rate(self, e: dict, nbytes: int, row: dict) -> None:
        if "ms" in e:
            e["gbps"] = nbytes / e["ms"] / 1e6
            e["pct_of_copy"] = 100.0 * e["gbps"] / self.copy_gbps
            if self.read_gbps:
                e["pct_of_read"] = 100.0 * e["gbps"] / self.read_gbps
            if "same_bytes" in row:
                e["pct_of_same_bytes"] = 100.0 * e["gbps"] / row["same_bytes"]["gbps"]

    def same_bytes(self, row: dict, nbytes: int, kind: str) -> None:
        """The ceiling pass (``read``: the two sums; ``copy``: a copy) over the cell's own byte
        count, timed as the variants are (L2 flushed first): what a kernel moving those bytes and
        nothing else takes, fixed costs (launch, the flush's dirty lines, ramp) included."""
        if self.smoke:
            return
        if kind == "read":
            c = read_ceiling(nbytes / 2**30, self.args.rep, torch.cuda.get_device_properties(0).multi_processor_count)
        else:
            c = H.copy_bandwidth(nbytes / 2 / 2**30, self.args.rep)
        row["same_bytes"] = dict(kind=kind, **c)

    def attempt(self, row: dict, name: str, body) -> dict | None:
        """``body()`` -> entry, recorded in ``row["variants"][name]``; a failure or a resource
        error is recorded instead, and past the budget the variant is skipped."""
        if time.time() > self.deadline:
            row.setdefault("skipped", {})[name] = "time budget used up"
            return None
        t0 = time.time()
        try:
            e = body()
        except Exception as exc:  # noqa: BLE001  (recorded; the sweep goes on)
            if H.is_resource_error(exc) and not isinstance(exc, H.CheckFailed):
                row.setdefault("skipped", {})[name] = f"out of resources: {str(exc).splitlines()[0][:200]}"
            else:
                H.record_failure(row, name, exc, row["label"], self.failures, self.args.fail_fast)
            return None
        finally:
            if not self.smoke:
                H.free_memory()
        e["wall_s"] = time.time() - t0
        row["variants"][name] = e
        ms = f"{e['ms'] * 1e3:8.1f} us" if "ms" in e else "  checked"
        print(f"  {row['label']:22s} {name:34s} {ms}", flush=True)
        return e


# ------------------------------------------------------------------------------ decode, bf16
def prev_default(default: DecodeConfig) -> dict:
    """The launch table of commit 32e7231 (perf/results/sweep_decode_variants_H100_32e7231.json):
    64 tokens a step, prefetch on, 3 stages split and 2 unsplit."""
    split = default.num_splits > 1
    return dict(pages_per_iter=64 // PAGE, num_stages=3 if split else 2, prefetch_rows=True)


def decode_variants(default: DecodeConfig, B: int, ctx: int) -> list[tuple[str, dict]]:
    """(name, DecodeConfig overrides), the default first and the previous table's launch second.
    ``max_registers=NO_CAP`` lifts the unsplit launches' cap (None would mean "the table's")."""
    s = default.num_splits
    out = [("default", {}), ("prev_default", prev_default(default)),
           (f"prefetch_{'off' if default.prefetch_rows else 'on'}", dict(prefetch_rows=not default.prefetch_rows))]
    if s > 1:
        if 2 * s <= 128 and 2 * s * 2 * default.block_tokens <= ctx:
            out.append((f"splits{2 * s}", dict(num_splits=2 * s)))
        out += [("p2", dict(pages_per_iter=2)), ("st2", dict(num_stages=2))]
    else:
        out += [("p4", dict(pages_per_iter=4)), ("p2_st4", dict(pages_per_iter=2, num_stages=4)),
                ("p1_st4", dict(pages_per_iter=1, num_stages=4)), ("nocap", dict(max_registers=NO_CAP)),
                ("splits2", dict(num_splits=2, pages_per_iter=4, prefetch_rows=False))]
    return [(n, o) for n, o in out if n == "default" or any(getattr(default, k) != v for k, v in o.items())]


def _config(default: DecodeConfig, B: int, ctx: int, sms: int, over: dict, fp8: bool) -> DecodeConfig:
    fields = dict(dataclasses.asdict(default), **over, block_tokens=None)
    return decode_config(batch=B, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, page_tokens=PAGE,
                         max_seq_len=ctx, sm_count=sms, kv_fp8=fp8, **fields)


def run_decode(sw: Sweep, cell, ref, tol_dtype, nbytes: int, row: dict, variants, *, kv_scale=None):
    """Each variant of ``variants`` on ``cell``: checked against ``ref``, then timed."""
    B, ctx = cell.B, cell.ctx
    sms = 132 if sw.smoke else torch.cuda.get_device_properties(0).multi_processor_count
    fp8 = kv_scale is not None
    default = decode_config(batch=B, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, page_tokens=PAGE,
                            max_seq_len=ctx, sm_count=sms, kv_fp8=fp8)
    row["default_config"] = dataclasses.asdict(default)
    for name, over in variants(default, B, ctx):
        cfg = _config(default, B, ctx, sms, over, fp8)

        def body(cfg=cfg):
            ws = decode_workspace(B, HQ, D, cfg.num_splits, cell.q.device)
            out = torch.full((B, HQ, D), float("nan"), dtype=cell.q.dtype, device=cell.q.device)

            def fn():
                return paged_decode_attention(cell.q, cell.block_table, cell.seq_lens, cell.cache, layer=0, out=out,
                                              workspace=ws, max_seq_len=ctx, config=cfg, kv_scale=kv_scale)

            fn()
            e = dict(config=dataclasses.asdict(cfg), check=BA.check(name, out, ref, tol_dtype))
            e.update(sw.timed(fn, out.clone(), atol=BA.TOL[tol_dtype][0]))
            sw.rate(e, nbytes, row)
            return e

        sw.attempt(row, name, body)


def bf16_cell(sw: Sweep, B: int, ctx: int) -> dict:
    spec = BA.attn_spec(None, torch.bfloat16)
    dev = "cpu" if sw.smoke else "cuda"
    row = dict(label=f"bf16 B={B} ctx={ctx}", B=B, ctx=ctx, kv="bf16", attn_layers_per_page=spec.num_attn_layers,
               variants={})
    cell = BA.build_cell(B, ctx, spec, dev, seed=0)
    ref = BA.reference(cell, torch.float32)
    nbytes = BA.cell_sizes(spec, B, ctx, torch.bfloat16)["bytes_model"]
    row["bytes"] = nbytes
    sw.same_bytes(row, nbytes, "read")
    run_decode(sw, cell, ref, torch.bfloat16, nbytes, row, decode_variants)
    if not sw.smoke:
        def sdpa():
            run = peers.prepare_sdpa_contiguous(cell.q, *BA.contiguous_kv(cell), cell.scale)
            got = run().clone()
            e = dict(gqa=run.gqa, check=BA.check("sdpa", got, ref, torch.bfloat16))
            e.update(sw.timed(run, got, atol=BA.TOL[torch.bfloat16][0]))
            sw.rate(e, nbytes, row)
            return e

        sw.attempt(row, "sdpa_flash_contiguous", sdpa)
    v = row["variants"]
    if "default" in v and "sdpa_flash_contiguous" in v:
        row["default_over_sdpa"] = v["default"]["ms"] / v["sdpa_flash_contiguous"]["ms"]
    return row


# ------------------------------------------------------------------------------- decode, fp8
@dataclasses.dataclass
class Fp8Cell:
    B: int
    ctx: int
    cache: PagedCache
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    q: torch.Tensor
    kv_scale: torch.Tensor        # [2, Hkv] fp32
    k_pages: torch.Tensor         # [num_pages, Hkv, T, D] fp8 views of layer 0
    v_pages: torch.Tensor
    phys: torch.Tensor            # [B, W] physical page slots
    alloc: AVMPAllocator


def build_fp8_cell(B: int, ctx: int, dev) -> Fp8Cell:
    """Jamba's attention layer over fp8 pages (4 layers a page), random e4m3 values of magnitude up
    to ~250 and per-kv-head scales around 1/64, so dequantised K/V are of order 1."""
    torch.manual_seed(7 + B * 1000 + ctx)
    spec = dataclasses.replace(BA.attn_spec(None, torch.bfloat16), kv_dtype=FP8)
    W = -(-ctx // PAGE)
    page, slab, slabs = BA.arena_plan(spec, B * W)
    alloc = AVMPAllocator(spec, slabs * slab, device=dev, kv_fraction=1.0, slab_bytes=slab, page_tokens=PAGE)
    flat = alloc.arena.view(FP8)
    step = 1 << 28
    for s in range(0, flat.numel(), step):
        chunk = flat[s:s + step]
        chunk.copy_((torch.randn(chunk.numel(), device=dev) * 64).clamp_(-448, 448).to(FP8))
    handles = alloc.alloc_kv(B * W)
    handles = handles[torch.randperm(handles.numel(), device=handles.device)]
    bt = handles.view(B, W).contiguous()
    phys = (alloc.handle_table[bt.long()] // page).to(torch.int32)
    lay = kv_page_layout(spec, PAGE)
    n = alloc.arena.numel() // page
    shape, strides = (n, HKV, PAGE, D), (page, lay.stride_head, lay.stride_token, 1)
    k_pages = flat.as_strided(shape, strides, 0)
    v_pages = flat.as_strided(shape, strides, lay.stride_kv)
    scale = (torch.rand(2, HKV, device=dev) * 0.5 + 0.75) / 64
    q = torch.randn(B, HQ, D, device=dev).to(torch.bfloat16)
    return Fp8Cell(B=B, ctx=ctx, cache=PagedCache.of(alloc), block_table=bt,
                   seq_lens=torch.full((B,), ctx, dtype=torch.int32, device=dev), q=q,
                   kv_scale=scale.contiguous(), k_pages=k_pages, v_pages=v_pages, phys=phys, alloc=alloc)


def fp8_reference(c: Fp8Cell) -> torch.Tensor:
    """fp32 attention over the dequantised pages, one request at a time: ``[B, Hq, D]``."""
    out = torch.empty(c.B, HQ, D, device=c.q.device)
    g = HQ // HKV
    for b in range(c.B):
        rows = c.phys[b].long()
        k = c.k_pages[rows].float().permute(1, 0, 2, 3).reshape(HKV, -1, D)[:, :c.ctx]
        v = c.v_pages[rows].float().permute(1, 0, 2, 3).reshape(HKV, -1, D)[:, :c.ctx]
        k, v = k * c.kv_scale[0][:, None, None], v * c.kv_scale[1][:, None, None]
        qb = c.q[b].float().view(HKV, g, D)
        p = torch.softmax(qb @ k.transpose(1, 2) * D ** -0.5, dim=-1)
        out[b] = (p @ v).view(HQ, D)
    return out


def fp8_variants(default: DecodeConfig, B: int, ctx: int) -> list[tuple[str, dict]]:
    out = [("default", {}), ("prev_default", prev_default(default)),
           (f"prefetch_{'off' if default.prefetch_rows else 'on'}", dict(prefetch_rows=not default.prefetch_rows))]
    if default.num_splits > 1:
        out += [("st3", dict(num_stages=3)), ("splits_x2", dict(num_splits=min(128, 2 * default.num_splits)))]
    else:
        out += [("p2", dict(pages_per_iter=2)), ("nocap", dict(max_registers=NO_CAP))]
    return [(n, o) for n, o in out if n == "default" or any(getattr(default, k) != v for k, v in o.items())]


def fp8_cell(sw: Sweep, B: int, ctx: int, bf16_rows: list) -> dict:
    dev = "cpu" if sw.smoke else "cuda"
    row = dict(label=f"fp8 B={B} ctx={ctx}", B=B, ctx=ctx, kv="fp8_e4m3", attn_layers_per_page=4, variants={})
    c = build_fp8_cell(B, ctx, dev)
    ref = fp8_reference(c)
    nbytes = 2 * B * ctx * HKV * D + 2 * B * HQ * D * 2
    row["bytes"] = nbytes
    sw.same_bytes(row, nbytes, "read")
    run_decode(sw, c, ref, torch.bfloat16, nbytes, row, fp8_variants, kv_scale=c.kv_scale)
    bf = next((r for r in bf16_rows if (r["B"], r["ctx"]) == (B, ctx)), None)
    v = row["variants"]
    if bf and "default" in bf["variants"] and "ms" in v.get("default", {}):
        row["bf16_default_over_fp8_default"] = bf["variants"]["default"]["ms"] / v["default"]["ms"]
    return row


# ------------------------------------------------------------------------------------ Mamba
def mamba_cell(sw: Sweep, case: str, B: int) -> dict:
    dev = "cpu" if sw.smoke else "cuda"
    BM.DEVICE = dev
    cell = BM.build_cell(case, B, torch.bfloat16, None, dev)
    start = cell.states.clone()
    ref_out, ref_state = BM.reference(cell, start[cell.phys.long()])
    nbytes = BM.bytes_model(cell)["total"]
    row = dict(label=f"{case} B={B} bf16", case=case, B=B, state_dtype="bfloat16", bytes=nbytes, variants={})
    sw.same_bytes(row, nbytes, "copy")
    if case == "mamba1":
        launches = [(f"block{b}_w{w}", MambaStateConfig(block=b, num_warps=w))
                    for b, w in MAMBA1_LAUNCHES[:2 if sw.smoke else None]]
        launches.insert(0, ("default", None))
    else:
        launches = [("default", None)]
    op = mamba1_state_update if case == "mamba1" else mamba2_state_update
    i = cell.inputs
    rows = cell.phys.long()
    for name, cfg in launches:
        def body(cfg=cfg):
            out = torch.full_like(i["x"], float("nan"))

            def fn():
                return op(i["x"], i["dt"], i["A"], i["B"], i["C"], cell.handles, cell.cache, layer=cell.layer,
                          D=i["D"], z=i["z"], dt_bias=i["dt_bias"], dt_softplus=True, out=out, config=cfg)

            def restore():
                cell.states[rows] = start[rows]

            try:
                y = fn()
                e = dict(config=None if cfg is None else dataclasses.asdict(cfg),
                         check=BM.check_update(name, cell, cell.states, start, y, ref_out, ref_state))
                e.update(sw.timed(fn, y.reshape(ref_out.shape).clone(), restore=restore))
            finally:
                cell.states.copy_(start)
            sw.rate(e, nbytes, row)
            return e

        sw.attempt(row, name, body)
    return row


# ------------------------------------------------------------------------------------ output
def _us(v: dict | None) -> str:
    return f"{v['ms'] * 1e3:8.1f}" if v and "ms" in v else f"{'-':>8s}"


def _pct(v: dict | None, key: str) -> str:
    return f"{v[key]:5.1f}" if v and key in v else f"{'-':>5s}"


def print_table(res: dict) -> None:
    """One line per cell: the default, the previous table's launch, the fastest variant, SDPA."""
    e = res["env"]
    c = res.get("ceilings", {})
    print(f"\n{e.get('gpu')}  torch {e.get('torch')}  triton {e.get('triton')}  commit {str(e.get('commit'))[:12]}")
    if c:
        print(f"copy {c['copy']['gbps']:.0f} GB/s (read+write); read-only {c['read']['gbps']:.0f} GB/s "
              f"(triton sum {c['read']['triton_sum']['gbps']:.0f}, torch.sum {c['read']['torch_sum']['gbps']:.0f}); "
              f"us = median; %cp, %rd = bytes / t / copy, read-only; %sz = of the same pass over the cell's own "
              f"bytes (read for decode, copy for Mamba); prev = commit 32e7231's launch")
    print(f"{'cell':20s} {'default':>8s} {'%cp':>5s} {'%rd':>5s} {'%sz':>5s} {'prev':>8s} {'best':>8s} {'%rd':>5s} "
          f"{'%sz':>5s} {'sz_us':>8s} {'sdpa':>8s} {'def/sdpa':>8s} {'bf16/fp8':>8s}  best variant")
    for r in res["rows"]:
        v = r["variants"]
        timed = {n: x for n, x in v.items() if "ms" in x and n != "sdpa_flash_contiguous"}
        best_name = min(timed, key=lambda n: timed[n]["ms"]) if timed else None
        best, d = timed.get(best_name), v.get("default")
        sdpa = v.get("sdpa_flash_contiguous")
        ratio = lambda a, b: f"{a['ms'] / b['ms']:8.3f}" if a and b and "ms" in a and "ms" in b else f"{'-':>8s}"  # noqa: E731
        sp = r.get("bf16_default_over_fp8_default")
        sz = r.get("same_bytes")
        sz_us = f"{r['bytes'] / sz['gbps'] / 1e3:8.1f}" if sz else f"{'-':>8s}"
        print(f"{r['label']:20s} {_us(d)} {_pct(d, 'pct_of_copy')} {_pct(d, 'pct_of_read')} "
              f"{_pct(d, 'pct_of_same_bytes')} {_us(v.get('prev_default'))} {_us(best)} {_pct(best, 'pct_of_read')} "
              f"{_pct(best, 'pct_of_same_bytes')} {sz_us} {_us(sdpa)} {ratio(d, sdpa)} "
              f"{f'{sp:8.3f}' if sp else f'{chr(45):>8s}'}  {best_name or ''}")
        for name, why in r.get("skipped", {}).items():
            print(f"{'':20s} skipped {name}: {why[:80]}")
        for name in r.get("failures", {}):
            print(f"{'':20s} FAILED {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--rep", type=int, default=25, help="do_bench rep (ms of timed replays per variant)")
    ap.add_argument("--budget-s", type=float, default=170.0, help="variants past this many seconds are skipped")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter: tiny shapes, checks only, no timing")
    ap.add_argument("--fail-fast", action="store_true")
    args = ap.parse_args()
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --smoke)")
    if not smoke and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: this sweep times compiled kernels")
    t0 = time.time()
    sw = Sweep(args, smoke)
    res = dict(env=H.environment() if not smoke else dict(gpu="cpu (smoke)", torch=torch.__version__,
                                                           triton=triton.__version__, commit=H.commit()),
               timing="triton.testing.do_bench on a CUDA-graph replay (L2 flushed before each), median",
               rep_ms=args.rep, rows=[])
    if not smoke:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        res["ceilings"] = dict(copy=H.copy_bandwidth(1.0, args.rep), read=read_ceiling(2.0, args.rep, sms))
        sw.copy_gbps, sw.read_gbps = res["ceilings"]["copy"]["gbps"], res["ceilings"]["read"]["gbps"]
        print(f"copy {sw.copy_gbps:.0f} GB/s, read-only {sw.read_gbps:.0f} GB/s", flush=True)
    cells = SMOKE_DECODE if smoke else BF16_CELLS
    bf16_rows = [bf16_cell(sw, B, ctx) for B, ctx in cells]
    res["rows"] += bf16_rows
    res["rows"] += [fp8_cell(sw, B, ctx, bf16_rows) for B, ctx in (SMOKE_DECODE if smoke else FP8_CELLS)]
    for case, B in ([("mamba1", 5), ("mamba2", 2)] if smoke else MAMBA_CELLS):
        res["rows"].append(mamba_cell(sw, case, B))
    res["failures"] = sw.failures
    res["wall_s"] = time.time() - t0
    if smoke:
        print_table(res)
        print(f"smoke run: {len(sw.failures)} failure(s), {res['wall_s']:.0f} s")
        raise SystemExit(1 if sw.failures else 0)
    H.finish(res, "sweep_decode_variants", args.out, False, sw.failures, print_table)


if __name__ == "__main__":
    main()
