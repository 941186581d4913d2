"""Decode Mamba state-update benchmark (GPU): ours (state inside SSM blocks of the arena) vs vLLM's
``selective_state_update`` (Triton, vendored) on a state pool with scattered ``state_batch_indices``.

    python perf/bench_mamba_state.py [--out FILE] [--batch 1 64 256] [--state-dtype bfloat16 float32]
                               [--mamba-layers 4] [--sweep-configs]

Cases (one Mamba layer each):
- ``mamba1``: Jamba-1.5-Mini, d_inner 8192, d_state 16, gated by z (as vLLM's MambaMixer calls it);
- ``mamba2``: Nemotron-H-8B, 128 heads x 64, d_state 128, 8 groups, no z (vLLM's MambaMixer2 applies
  the gate in its norm, after the update).
Both with dt_softplus, D and dt_bias; x, dt, z, B, C and the output in bf16, A / D / dt_bias fp32
(as the models hold them); state in bf16 or fp32.

For each (case, B, state dtype), in one process:
- ours: an ``AVMPAllocator`` of the preset (``--mamba-layers`` Mamba layers per SSM block, default
  4, the layer in the middle is updated) whose SSM pool holds 2B+16 blocks; B handles are drawn
  from them with ``torch.randperm``. Every slot's state is random, every other byte zero.
- vLLM: a state pool ``[N, ...]`` with one row per slot of our SSM pool, holding the same states;
  ``state_batch_indices`` are the physical slots of our handles (same scattered rows).
Before timing, both run once from the same states and are checked against the fp32 reference
(``avmp_triton/reference/mamba_state.py``): output, the B updated states, and every other row of the
pool unchanged. A failed check or an unexpected error makes the script exit 1 (after the JSON and
the table are written).

Timing: each callable captured in a CUDA graph (one update per replay); before timing, the states
are restored and one replay must reproduce the checked output bit for bit. ``do_bench`` (L2
flushed before each replay) gives the median and 20/80 % quantiles; the state then evolves from
replay to replay, as in decoding. Bandwidth counts the B states read and written + x, dt, z, B,
C, out + A, D, dt_bias once, against a device-to-device copy measured in the same run.

``--sweep-configs`` instead times our launch configs (Mamba1: block_d x num_warps; Mamba2:
block_p x num_warps), each checked, on every cell (within ``--sweep-budget-s``).

Writes JSON to --out (default perf/results/bench_mamba_<gpu>.json) and prints a table last.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time

import torch

from avmp_triton import AVMPAllocator, PagedCache, get_preset
from avmp_triton.layout import ssm_block_layout
from avmp_triton.ops.mamba_state import (
    MambaStateConfig,
    mamba1_launch_config,
    mamba1_state_update,
    mamba2_launch_config,
    mamba2_state_update,
)
from avmp_triton.reference import mamba_state as R

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402  (perf/peers.py)
from harness import CheckFailed, copy_bandwidth, environment, finish, record_failure, time_replayed  # noqa: E402

CASES = {"mamba1": "jamba-1.5-mini", "mamba2": "nemotron-h-8b"}
USE_Z = {"mamba1": True, "mamba2": False}
QUANTILES = [0.5, 0.2, 0.8]
ACT_DTYPE = torch.bfloat16
# (atol, rtol), one step from identical states: the new state is fp32 math rounded to the state
# dtype (1 ulp apart at most between implementations); the output is rounded to bf16.
STATE_TOL = {torch.float32: (2e-4, 2e-4), torch.bfloat16: (6e-2, 2e-2)}
OUT_TOL = (5e-2, 2e-2)
DEVICE = "cuda"  # the cells' tensors (a CPU dry run of the control flow swaps it)


# --------------------------------------------------------------------------------------- setup
@dataclasses.dataclass
class Cell:
    case: str
    B: int
    spec: object
    layer: int
    alloc: AVMPAllocator
    cache: PagedCache              # PagedCache.of(alloc), built once: what our ops read
    handles: torch.Tensor          # [B] int32 SSM handles (ours)
    phys: torch.Tensor             # [B] int32 physical slots (vLLM's state_batch_indices)
    states: torch.Tensor           # [N, *state_shape] view of this layer's state of every slot (arena)
    inputs: dict

    @property
    def state_shape(self) -> tuple:
        return tuple(self.states.shape[1:])


def case_spec(case: str, state_dtype, mamba_layers: int | None):
    spec = get_preset(CASES[case])
    kw = dict(ssm_dtype=state_dtype)
    if mamba_layers:
        kw["num_mamba_layers"] = mamba_layers
    return dataclasses.replace(spec, **kw)


def pool_plan(spec, blocks: int) -> tuple[int, int, int]:
    """(block_bytes, slab_bytes, num_slabs): slabs of 8 whole blocks (a 16-byte-aligned block x 8
    is 128-aligned), so a block's byte offset divided by its size is its physical slot."""
    block = spec.ssm_block_bytes
    per_slab = 8
    slab = max(block * per_slab, -(-spec.kv_page_bytes // 128) * 128)
    slab = -(-slab // block) * block
    assert slab % 128 == 0 and slab % block == 0
    return block, slab, max(2, -(-blocks // (slab // block)))


def layer_states(alloc, spec, layer: int) -> torch.Tensor:
    """This layer's ssm state of every slot of the arena, ``[N, *state_shape]`` (strided view)."""
    lay = ssm_block_layout(spec)
    block = alloc.unit_bytes[1]
    dt = spec.ssm_dtype
    assert alloc.slab_bytes % block == 0 and block % dt.itemsize == 0
    shape = state_shape(spec)
    n = alloc.arena.numel() // block
    elems = alloc.arena.view(dt)
    inner = 1
    strides = []
    for s in reversed(shape):
        strides.append(inner)
        inner *= s
    return elems.as_strided((n, *shape), (block // dt.itemsize, *reversed(strides)),
                            elems.storage_offset() + lay.ssm_offset(layer) // dt.itemsize)


def state_shape(spec) -> tuple:
    if spec.mamba_version == 1:
        return (spec.d_inner, spec.d_state)
    return (spec.mamba_num_heads, spec.mamba_head_dim, spec.d_state)


def make_inputs(case: str, spec, B: int, device) -> dict:
    d, n = spec.d_inner, spec.d_state
    a = ACT_DTYPE
    if spec.mamba_version == 1:
        return dict(x=torch.randn(B, d, device=device, dtype=a), dt=torch.randn(B, d, device=device, dtype=a),
                    A=-torch.rand(d, n, device=device) - 0.5, B=torch.randn(B, n, device=device, dtype=a),
                    C=torch.randn(B, n, device=device, dtype=a), D=torch.randn(d, device=device),
                    z=torch.randn(B, d, device=device, dtype=a) if USE_Z[case] else None,
                    dt_bias=torch.rand(d, device=device) - 2.0)
    h, p, g = spec.mamba_num_heads, spec.mamba_head_dim, spec.n_groups
    return dict(x=torch.randn(B, h, p, device=device, dtype=a), dt=torch.randn(B, h, device=device, dtype=a),
                A=-torch.rand(h, device=device) - 0.5, B=torch.randn(B, g, n, device=device, dtype=a),
                C=torch.randn(B, g, n, device=device, dtype=a), D=torch.randn(h, device=device),
                z=torch.randn(B, h, p, device=device, dtype=a) if USE_Z[case] else None,
                dt_bias=torch.rand(h, device=device) - 2.0)


def build_cell(case: str, B: int, state_dtype, mamba_layers: int | None, device, *, seed: int = 0) -> Cell:
    torch.manual_seed(seed + 1000 * B + (7 if case == "mamba2" else 0) + state_dtype.itemsize)
    spec = case_spec(case, state_dtype, mamba_layers)
    layer = spec.num_mamba_layers // 2
    blocks = 2 * B + 16
    block, slab, slabs = pool_plan(spec, blocks)
    alloc = AVMPAllocator(spec, slabs * slab, device=device, kv_fraction=0.0, slab_bytes=slab)
    alloc.arena.zero_()
    states = layer_states(alloc, spec, layer)
    states.normal_()                       # every slot's state of this layer random, rest zeros
    live = alloc.alloc_ssm(blocks)
    handles = live[torch.randperm(blocks, device=live.device)[:B]].contiguous()
    off = alloc.handle_table[handles.long()]
    if bool((off % block != 0).any()):
        raise RuntimeError("block offsets are not multiples of the block size: physical slots undefined")
    phys = (off // block).to(torch.int32)
    return Cell(case=case, B=B, spec=spec, layer=layer, alloc=alloc, cache=PagedCache.of(alloc), handles=handles,
                phys=phys, states=states, inputs=make_inputs(case, spec, B, device))


def bytes_model(cell: Cell) -> dict:
    inp = cell.inputs
    per_state = cell.states[0].numel() * cell.spec.ssm_dtype.itemsize
    state = 2 * cell.B * per_state
    acts = sum(inp[k].numel() * inp[k].element_size() for k in ("x", "dt", "B", "C", "z") if inp[k] is not None)
    acts += inp["x"].numel() * inp["x"].element_size()       # out
    params = sum(inp[k].numel() * inp[k].element_size() for k in ("A", "D", "dt_bias"))
    return dict(state_bytes_read_plus_written=state, activation_bytes=acts, param_bytes=params,
                total=state + acts + params)


def reference(cell: Cell, old: torch.Tensor):
    """fp32 reference from the states ``old`` ``[B, *state_shape]``: (out, new states)."""
    i = cell.inputs
    ref = R.mamba1_state_update_ref if cell.spec.mamba_version == 1 else R.mamba2_state_update_ref
    return ref(old, i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], i["z"], i["dt_bias"], True)


def ours_fn(cell: Cell, out: torch.Tensor, launch: dict | None = None):
    """One update of ours; ``launch`` as ``launch_default`` writes it (None: the op's default)."""
    i, cache = cell.inputs, cell.cache
    op = mamba1_state_update if cell.spec.mamba_version == 1 else mamba2_state_update
    config = state_config(launch)

    def run():
        return op(i["x"], i["dt"], i["A"], i["B"], i["C"], cell.handles, cache, layer=cell.layer, D=i["D"], z=i["z"],
                  dt_bias=i["dt_bias"], dt_softplus=True, out=out, config=config)

    return run


def vllm_fn(cell: Cell, pool: torch.Tensor):
    i = cell.inputs
    B = cell.B
    flat = (lambda t: None if t is None else t.reshape(B, -1))
    return peers.prepare_vllm_selective_state_update(
        pool, flat(i["x"]), i["dt"], i["A"], i["B"], i["C"], i["D"], flat(i["z"]), i["dt_bias"], cell.phys,
        cell.spec.mamba_version)


def _close(name, got, want, tol) -> dict:
    atol, rtol = tol
    err = (got.float() - want.float()).abs()
    nan = int(torch.isnan(got).sum())
    excess = float((err - rtol * want.float().abs()).nan_to_num(float("inf")).max())
    return dict(max_abs_err=float(err.nan_to_num(float("inf")).max()), max_abs_ref=float(want.float().abs().max()),
                nan=nan, atol=atol, rtol=rtol, ok=nan == 0 and excess <= atol)


def check_update(name: str, cell: Cell, pool: torch.Tensor, before: torch.Tensor, y: torch.Tensor,
                 ref_out: torch.Tensor, ref_state: torch.Tensor) -> dict:
    """Output and the B updated rows of ``pool`` vs the reference; every other row equal to ``before``."""
    rows = cell.phys.long()
    res = dict(kernel=name, out=_close("out", y.reshape(ref_out.shape), ref_out, OUT_TOL),
               state=_close("state", pool[rows], ref_state, STATE_TOL[cell.spec.ssm_dtype]))
    others = torch.ones(pool.shape[0], dtype=torch.bool, device=pool.device)
    others[rows] = False
    res["other_rows_unchanged"] = bool(torch.equal(pool[others], before[others]))
    res["ok"] = res["out"]["ok"] and res["state"]["ok"] and res["other_rows_unchanged"]
    if not res["ok"]:
        raise CheckFailed(f"{name}: out {res['out']['max_abs_err']:.3e} (ok={res['out']['ok']}), state "
                          f"{res['state']['max_abs_err']:.3e} (ok={res['state']['ok']}), other rows unchanged: "
                          f"{res['other_rows_unchanged']}", res)
    return res


# -------------------------------------------------------------------------------------- timing
def free_memory() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _is_resource_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return isinstance(exc, torch.OutOfMemoryError) or "OutOfResources" in text or "out of resource" in text


def launch_default(spec) -> dict:
    """The op's default launch, as the JSON records it: ``block_d`` (Mamba1) or ``block_p`` (Mamba2)
    and ``num_warps``."""
    if spec.mamba_version == 1:
        c = mamba1_launch_config(spec.d_inner, spec.d_state)
        return dict(block_d=c.block, num_warps=c.num_warps)
    c = mamba2_launch_config(spec.mamba_head_dim, spec.d_state)
    return dict(block_p=c.block, num_warps=c.num_warps)


def state_config(launch: dict | None) -> MambaStateConfig | None:
    """The ``MambaStateConfig`` of a launch dict as ``launch_default`` writes it (block_d / block_p
    are the config's ``block``)."""
    if launch is None:
        return None
    return MambaStateConfig(block=launch.get("block_d", launch.get("block_p")), num_warps=launch["num_warps"])


# ---------------------------------------------------------------------------------------- cells
class Runner:
    def __init__(self, args, copy_gbps: float):
        self.args = args
        self.copy_gbps = copy_gbps
        self.failures: list[str] = []
        self.sweep_deadline = float("inf")

    def fail(self, row: dict, name: str, exc: BaseException) -> None:
        record_failure(row, name, exc, f"{row['case']} B={row['B']} state {row['state_dtype']}", self.failures,
                       self.args.fail_fast)

    def _setup(self, case, B, state_dtype):
        cell = build_cell(case, B, state_dtype, self.args.mamba_layers, DEVICE, seed=self.args.seed)
        start = cell.states.clone()                                    # every slot, this layer
        ref_out, ref_state = reference(cell, start[cell.phys.long()])  # from the batch's states
        return cell, start, ref_out, ref_state

    def _time(self, row, name, fn, pool, start, ref_out, ref_state, cell, nbytes, extra=None) -> None:
        try:
            y = fn()
            torch.cuda.synchronize()
            row["checks"][name] = check_update(name, cell, pool, start, y, ref_out, ref_state)
            expect = y.reshape(ref_out.shape).clone()
            rows = cell.phys.long()
            old = start[rows]

            def restore():
                pool[rows] = old

            e = time_replayed(fn, expect, self.args.rep, restore=restore)
            e.update(extra or {})
            e["gbps"] = nbytes / e["ms"] / 1e6
            e["pct_of_copy"] = 100.0 * e["gbps"] / self.copy_gbps
            row["kernels"][name] = e
            row.setdefault("outputs", {})[name] = expect
        except Exception as exc:
            if isinstance(exc, CheckFailed) or not _is_resource_error(exc):
                self.fail(row, name, exc)
            else:
                row["skipped"][name] = f"out of memory/resources: {str(exc).splitlines()[0][:200]}"
        finally:
            pool.copy_(start)                                          # the next kernel starts where this one did

    def run_cell(self, case: str, B: int, state_dtype) -> dict:
        cell, start, ref_out, ref_state = self._setup(case, B, state_dtype)
        bm = bytes_model(cell)
        row = dict(case=case, model=CASES[case], B=B, state_dtype=str(state_dtype).removeprefix("torch."),
                   state_shape=list(cell.state_shape), layer=cell.layer, mamba_layers_per_block=cell.spec.num_mamba_layers,
                   pool_slots=cell.states.shape[0], z=USE_Z[case], bytes=bm, kernels={}, checks={}, skipped={})
        out = torch.full_like(cell.inputs["x"], float("nan"))
        self._time(row, "ours", ours_fn(cell, out), cell.states, start, ref_out, ref_state, cell, bm["total"],
                   dict(config=launch_default(cell.spec)))
        if self.args.no_vllm:
            row["skipped"]["vllm"] = "--no-vllm"
        else:
            pool = start.clone()                                       # vLLM's state pool: same rows
            try:
                run = vllm_fn(cell, pool)
            except Exception as exc:
                self.fail(row, "vllm", exc)
            else:
                self._time(row, "vllm", run, pool, start, ref_out, ref_state, cell, bm["total"])
            pool = run = None
        o = row.pop("outputs", {})
        if "ours" in o and "vllm" in o:
            row["max_abs_diff_ours_vs_vllm"] = float((o["ours"].float() - o["vllm"].float()).abs().max())
        k = row["kernels"]
        if "ours" in k and "vllm" in k:
            row["ratios"] = dict(ours_over_vllm=k["ours"]["ms"] / k["vllm"]["ms"])
        cell = start = ref_out = ref_state = out = None
        free_memory()
        return row

    def sweep_cell(self, case: str, B: int, state_dtype) -> dict:
        cell, start, ref_out, ref_state = self._setup(case, B, state_dtype)
        bm = bytes_model(cell)
        row = dict(case=case, B=B, state_dtype=str(state_dtype).removeprefix("torch."), bytes=bm,
                   default_config=launch_default(cell.spec), configs=[], skipped=[])
        out = torch.full_like(cell.inputs["x"], float("nan"))
        if cell.spec.mamba_version == 1:
            grid = [dict(block_d=b, num_warps=w) for b in (16, 32, 64, 128, 256, 512) for w in (1, 2, 4, 8)]
        else:
            grid = [dict(block_p=b, num_warps=w) for b in (4, 8, 16, 32, 64) for w in (1, 2, 4, 8)]
        grid.sort(key=lambda c: c != row["default_config"])              # the default first
        for launch in grid:
            if time.time() > self.sweep_deadline:
                row["skipped"].append(dict(config=launch, reason="sweep time budget used up"))
                continue
            name = " ".join(f"{k}={v}" for k, v in launch.items())
            tmp = dict(case=case, B=B, state_dtype=row["state_dtype"], kernels={}, checks={}, skipped={})
            self._time(tmp, name, ours_fn(cell, out, launch), cell.states, start, ref_out, ref_state, cell,
                       bm["total"])
            e = dict(config=launch, default=launch == row["default_config"])
            if name in tmp["kernels"]:
                e.update(tmp["kernels"][name])
                e["check"] = tmp["checks"][name]
            else:
                e["error"] = tmp.get("failures", {}).get(name, {}).get("error") or tmp["skipped"].get(name)
            row["configs"].append(e)
            print(f"  {case} B={B:<3d} {row['state_dtype']:8s} {name:22s} "
                  + (f"{e['ms'] * 1e3:8.2f} us {e['gbps']:6.0f} GB/s" if "ms" in e else str(e.get("error"))),
                  flush=True)
        good = [e for e in row["configs"] if "ms" in e]
        if good:
            b = min(good, key=lambda e: e["ms"])
            d = next((e for e in good if e["default"]), None)
            row["best"] = dict(config=b["config"], ms=b["ms"], gbps=b["gbps"],
                               speedup_vs_default=d["ms"] / b["ms"] if d else None)
        cell = start = ref_out = ref_state = out = None
        free_memory()
        return row


def print_table(res: dict) -> None:
    e = res["env"]
    print(f"\nGPU {e['gpu']}  torch {e['torch']}  triton {e['triton']}  vllm {e.get('vllm_vendored')}  "
          f"commit {e['commit'][:12]}")
    print(f"copy ceiling {res['copy_bandwidth']['gbps']:.0f} GB/s (read+write); medians in us; GB/s = (states read "
          f"+ written + activations + params) / t")
    if res.get("cells"):
        print(f"{'case':7s} {'B':>4s} {'state':8s} {'state MB':>8s} | {'ours us':>8s} {'GB/s':>5s} {'%cp':>4s} | "
              f"{'vllm us':>8s} {'GB/s':>5s} {'%cp':>4s} | {'o/vllm':>6s} | ours config")
        for r in res["cells"]:
            k = r["kernels"]

            def t(n):
                if n in k:
                    return f"{k[n]['ms'] * 1e3:8.2f} {k[n]['gbps']:5.0f} {k[n]['pct_of_copy']:4.0f}"
                tag = "FAIL" if n in r.get("failures", {}) else "skip"
                return f"{tag:>8s} {'':5s} {'':4s}"

            cfg = k["ours"]["config"] if "ours" in k else {}
            print(f"{r['case']:7s} {r['B']:4d} {r['state_dtype']:8s} "
                  f"{r['bytes']['state_bytes_read_plus_written'] / 2 / 1e6:8.2f} | {t('ours')} | {t('vllm')} | "
                  f"{r.get('ratios', {}).get('ours_over_vllm', float('nan')):6.2f} | "
                  + " ".join(f"{a}={b}" for a, b in cfg.items()))
        for r in res["cells"]:
            for n, why in r["skipped"].items():
                print(f"  skipped {r['case']} B={r['B']} {r['state_dtype']} {n}: {why}")
    for r in res.get("sweep", []):
        b = r.get("best")
        if b:
            print(f"sweep {r['case']} B={r['B']:<3d} {r['state_dtype']:8s} best "
                  + " ".join(f"{a}={v}" for a, v in b["config"].items())
                  + f" {b['ms'] * 1e3:.2f} us {b['gbps']:.0f} GB/s "
                  f"({(b['speedup_vs_default'] or float('nan')):.2f}x vs default "
                  + " ".join(f"{a}={v}" for a, v in r["default_config"].items()) + ")")
        else:
            print(f"sweep {r['case']} B={r['B']} {r['state_dtype']}: nothing measured")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--case", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--state-dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    ap.add_argument("--mamba-layers", type=int, default=4,
                    help="Mamba layers per SSM block (0: the preset's, 28 / 24); the middle one is updated")
    ap.add_argument("--copy-gib", type=float, default=2.0)
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms of timed replays per kernel)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--sweep-configs", action="store_true", help="time our launch configs instead")
    ap.add_argument("--sweep-budget-s", type=float, default=400.0)
    ap.add_argument("--fail-fast", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_mamba_state needs a CUDA GPU: it reports device time or nothing")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: this benchmark times compiled kernels")
    t_start = time.time()
    res = dict(
        env=environment(),
        shapes={c: dict(model=CASES[c], state_shape=list(state_shape(get_preset(CASES[c]))),
                        n_groups=get_preset(CASES[c]).n_groups, z=USE_Z[c]) for c in args.case},
        activation_dtype="bfloat16", params_dtype="float32", dt_softplus=True,
        timing=dict(method="triton.testing.do_bench on a CUDA-graph replay of one update (L2 flushed before each)",
                    warmup_ms=25, rep_ms=args.rep, quantiles=QUANTILES),
        check_tolerance=dict(out=OUT_TOL, state={str(k): v for k, v in STATE_TOL.items()}),
        pool="ours: SSM pool of 2B+16 blocks, B handles drawn by randperm; vLLM: one state row per slot of that "
             "pool, state_batch_indices = the physical slots of our handles",
    )
    res["copy_bandwidth"] = copy_bandwidth(args.copy_gib, args.rep)
    print(f"copy ceiling: {res['copy_bandwidth']['gbps']:.0f} GB/s", flush=True)
    runner = Runner(args, res["copy_bandwidth"]["gbps"])
    key = "sweep" if args.sweep_configs else "cells"
    res[key] = []
    if args.sweep_configs:
        runner.sweep_deadline = t_start + args.sweep_budget_s
    for case in args.case:
        for sd in args.state_dtype:
            for B in args.batch:
                t0 = time.time()
                if args.sweep_configs:
                    row = runner.sweep_cell(case, B, getattr(torch, sd))
                else:
                    row = runner.run_cell(case, B, getattr(torch, sd))
                    k = row["kernels"]
                    print(f"{case} B={B:<3d} {sd:8s} " + "  ".join(f"{n} {v['ms'] * 1e3:.2f} us" for n, v in k.items())
                          + f"  ({time.time() - t0:.0f} s)", flush=True)
                row["cell_s"] = time.time() - t0
                res[key].append(row)
    res["failures"] = runner.failures
    res["wall_s"] = time.time() - t_start
    finish(res, "bench_mamba_state", args.out, args.sweep_configs, runner.failures, print_table)

if __name__ == "__main__":
    main()
