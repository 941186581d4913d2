"""Mamba prefill variants (GPU, one call): our Mamba2 scan (the fused walk over whole requests vs
the segmented three-pass scan at several segment sizes and tiles), our causal conv1d launch
shapes, and our Mamba1 scan (the unrolled serial walk vs the associative-scan chunks) at
perf/bench_prefill.py's shapes and setup, beside vLLM's Triton kernels where vendored; Mamba2 and
the conv also with their loads pipelined (``stages``).

    python3 perf/sweep_mamba_prefill.py --out FILE [--no-vllm] [--rep MS] [--budget S] [--op ...]
    python3 perf/sweep_mamba_prefill.py --smoke      # CPU: tiny shapes in Triton's interpreter, checks only

Cells: Nemotron-H-8B (Mamba2: 128 heads x 64, d_state 128, 8 groups; conv over x|B|C, 10240
channels) and Jamba-1.5-Mini (Mamba1: d_inner 8192, d_state 16) at 1x4096, 4x1024, 16x512 and
4x512 after a 1024-token prefix (has_initial_state), bf16 activations and states, 4 Mamba layers
per block (bench_prefill's build_mamba_cell). Every variant is checked against the pure-torch
reference (output, final states, every other arena byte unchanged; bench_prefill's tolerances)
before it is timed: CUDA-graph replay median (perf/harness.py time_replayed, which also checks that
a replay reproduces the checked output). A variant that fails to compile or is wrong is recorded
and the sweep goes on; the script exits 1 at the end if any check failed. The registers and spills
of each kernel a variant compiled are recorded (``kernels``). Stops timing new variants past
``--budget`` seconds (recorded as skipped), so it ends well inside 4 minutes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_prefill as BP  # noqa: E402  (perf/bench_prefill.py: cells, references, checks)
import peers  # noqa: E402
from harness import CheckFailed, finish, is_resource_error, record_failure, time_replayed  # noqa: E402

from avmp_triton import HybridModelSpec, get_preset  # noqa: E402
from avmp_triton.kernels import mamba_prefill as K  # noqa: E402
from avmp_triton.ops.mamba_prefill import (  # noqa: E402
    MambaPrefillConfig as Cfg,
    causal_conv1d_prefill,
    mamba1_scan_prefill,
    mamba2_scan_prefill,
)

SHAPES = [BP.Shape(1, 4096), BP.Shape(4, 1024), BP.Shape(16, 512), BP.Shape(4, 512, 1024)]
VLLM_CHUNK = BP.NEMOTRON_CHUNK_SIZE
# name -> config; "auto" is what the launchers pick by themselves (the shipped default). Losers of
# perf/results/sweep_mamba_prefill_H100_32e7231.log dropped (segments of 256, 32-row tiles, 8 warps,
# chunks of 128; conv t16/t32 and 256 channels; Mamba1 serial 64 channels); "sN": N chunks or token
# blocks in flight per program (Mamba2: Triton's pipeliner over a counted loop; conv: next block
# loaded ahead).
M2 = {"auto": Cfg(algorithm="chunked"),
      "whole c64": Cfg(algorithm="chunked", segment=0),          # one program per (request, head)
      "seg1024": Cfg(algorithm="chunked", segment=1024),
      "whole s2": Cfg(algorithm="chunked", segment=0, stages=2),
      "seg1024 s2": Cfg(algorithm="chunked", segment=1024, stages=2),
      "seg1024 s3": Cfg(algorithm="chunked", segment=1024, stages=3),
      "whole c32 s2": Cfg(algorithm="chunked", segment=0, chunk_size=32, stages=2),   # no spills on sm_90
      "seg1024 c32": Cfg(algorithm="chunked", segment=1024, chunk_size=32),
      "seg1024 c32 s2": Cfg(algorithm="chunked", segment=1024, chunk_size=32, stages=2)}
CONV = {"auto": Cfg(),
        "t8 c512 w2 s1": Cfg(block_t=8, block=512, num_warps=2, stages=1),
        "t8 c1024 w4 s1": Cfg(block_t=8, block=1024, num_warps=4, stages=1),
        "t8 c1024 w4 s2": Cfg(block_t=8, block=1024, num_warps=4, stages=2),
        "t8 c512 w4 s2": Cfg(block_t=8, block=512, num_warps=4, stages=2)}    # 4 channels a thread: fewer registers
M1 = {"auto": Cfg(),                         # chunked when requests average over 1024 tokens, else serial
      "chunked (before)": Cfg(algorithm="chunked"),
      "serial u8 d16 w1": Cfg(algorithm="serial", chunk_size=8, block=16, num_warps=1),
      "serial u16 d16 w1": Cfg(algorithm="serial", chunk_size=16, block=16, num_warps=1),
      "serial u32 d16 w1": Cfg(algorithm="serial", chunk_size=32, block=16, num_warps=1),
      "serial u4 d32 w1": Cfg(algorithm="serial", chunk_size=4, block=32, num_warps=1),
      "serial u8 d32 w1": Cfg(algorithm="serial", chunk_size=8, block=32, num_warps=1)}
BASELINE = {"mamba2": "vllm", "conv1d": "vllm", "mamba1": "chunked (before)"}

# --smoke: tiny specs (fp32, the interpreter), segments and chunks small enough to cross
SMOKE_SHAPES = [BP.Shape(1, 70), BP.Shape(2, 24), BP.Shape(2, 16, 8)]
SMOKE_SPECS = dict(
    mamba2=HybridModelSpec(name="m2-smoke", num_attn_layers=1, num_kv_heads=1, head_dim=8, num_mamba_layers=2,
                           mamba_version=2, d_inner=32, mamba_num_heads=4, mamba_head_dim=8, d_state=16, n_groups=2,
                           d_conv=4),
    mamba1=HybridModelSpec(name="m1-smoke", num_attn_layers=1, num_kv_heads=1, head_dim=8, num_mamba_layers=2,
                           mamba_version=1, d_inner=24, d_state=8, d_conv=4))
SMOKE_M2 = {"auto": Cfg(algorithm="chunked", chunk_size=16), "whole": Cfg(algorithm="chunked", chunk_size=16, segment=0),
            "seg16": Cfg(algorithm="chunked", chunk_size=16, segment=16),
            "seg32": Cfg(algorithm="chunked", chunk_size=16, segment=32),
            "seg32 s2": Cfg(algorithm="chunked", chunk_size=16, segment=32, stages=2)}   # the interpreter runs 1
SMOKE_CONV = {"auto": Cfg(), "t4 c16 w1 s1": Cfg(block_t=4, block=16, num_warps=1, stages=1),
              "t4 c16 w1 s2": Cfg(block_t=4, block=16, num_warps=1, stages=2)}
SMOKE_M1 = {"auto": Cfg(chunk_size=4), "chunked (before)": Cfg(algorithm="chunked", chunk_size=4),
            "serial u8 d8 w1": Cfg(algorithm="serial", chunk_size=8, block=8, num_warps=1),
            "serial u32 d8 w1": Cfg(algorithm="serial", chunk_size=32, block=8, num_warps=1)}


def compiled_kernels() -> dict:
    """{kernel: {key: (registers, spills)}} of every kernel of kernels/mamba_prefill.py compiled so far."""
    out = {}
    for name in dir(K):
        fn = getattr(K, name)
        for dev_cache in (getattr(fn, "device_caches", None) or {}).values():
            try:
                for key, k in dev_cache[0].items():
                    out.setdefault(name, {})[str(key)[-60:]] = (getattr(k, "n_regs", None), getattr(k, "n_spills", None))
            except Exception:  # noqa: BLE001 - diagnostics only; Triton's cache layout differs by version
                pass
    return out


def new_kernels(before: dict, after: dict) -> list:
    return [dict(kernel=n, registers=v[0], spills=v[1]) for n, ks in after.items() for key, v in ks.items()
            if key not in before.get(n, {})]


class Sweep:
    def __init__(self, args, smoke: bool):
        self.args, self.smoke = args, smoke
        self.dev = "cpu" if smoke else "cuda"
        self.t0 = time.time()
        self.failures: list[str] = []
        self.tol = {k: BP.CPU_TOL for k in BP.TOL} if smoke else BP.TOL
        self.vllm_why = "--no-vllm" if args.no_vllm or smoke else None
        if self.vllm_why is None:
            try:
                peers.vllm_version()
            except Exception as e:  # noqa: BLE001 - no vendored vLLM: ours only
                self.vllm_why = f"vLLM unavailable: {type(e).__name__}: {e}"

    def sync(self):
        if not self.smoke:
            torch.cuda.synchronize()

    def cell(self, op: str, shape):
        model = BP.MODEL[op]
        spec = SMOKE_SPECS["mamba1" if op == "mamba1" else "mamba2"] if self.smoke else get_preset(model)
        spec = BP.mamba_spec(model, torch.float32 if self.smoke else torch.bfloat16, 4, spec)
        return BP.build_mamba_cell(spec, shape, self.dev, torch.float32 if self.smoke else BP.ACT_DTYPE,
                                   seed=self.args.seed)

    def reference(self, cell, op: str):
        i = cell.inputs
        arena = cell.alloc.arena.clone()
        args = (arena, cell.alloc.handle_table, cell.handles, cell.cu, cell.init, cell.spec, cell.layer)
        if op == "conv1d":
            out = BP.RM.causal_conv1d_prefill_ref(i["conv_x"], i["weight"], i["bias"], *args, activation="silu")
        else:
            ref = BP.RM.mamba1_scan_prefill_ref if op == "mamba1" else BP.RM.mamba2_scan_prefill_ref
            out = ref(i["x"], i["dt"], i["A"], i["B"], i["C"], *args, D=i["D"], z=i["z"], dt_bias=i["dt_bias"],
                      dt_softplus=True)
        from types import SimpleNamespace
        a = SimpleNamespace(arena=arena, unit_bytes=cell.alloc.unit_bytes, slab_bytes=cell.alloc.slab_bytes)
        states = (BP.layer_conv_states(a, cell.spec, cell.layer) if op == "conv1d"
                  else BP.layer_states(a, cell.spec, cell.layer))
        return out, states[cell.phys].clone()

    def ours(self, op: str, cell, cfg, out):
        i, c = cell.inputs, cell
        if op == "conv1d":
            return lambda: causal_conv1d_prefill(i["conv_x"], i["weight"], c.handles, c.cu, c.init, c.cache,
                                                 layer=c.layer, bias=i["bias"], activation="silu", out=out, config=cfg)
        fn = mamba1_scan_prefill if op == "mamba1" else mamba2_scan_prefill
        return lambda: fn(i["x"], i["dt"], i["A"], i["B"], i["C"], c.handles, c.cu, c.init, c.cache, layer=c.layer,
                          D=i["D"], z=i["z"], dt_bias=i["dt_bias"], dt_softplus=True, out=out, config=cfg)

    def measure(self, row, name, fn, states, rows, old, ref_out, ref_state, tol, other_ok, replay_atol=0.0):
        """Check ``fn`` from the starting states, then time it (graph replays)."""
        if time.time() - self.t0 > self.args.budget:
            row["skipped"][name] = f"time budget of {self.args.budget:.0f} s spent"
            return
        before = compiled_kernels()

        def restore():
            states[rows] = old

        try:
            fn()                                   # compile (and autotune, vLLM)
            self.sync()
            restore()
            y = fn()
            self.sync()
            parts = dict(out=BP.close(name, y, ref_out, tol), state=BP.close(name, states[rows], ref_state, tol),
                         other_bytes_unchanged=other_ok())
            row["checks"][name] = BP.verdict(name, parts)
            entry = dict(kernels=new_kernels(before, compiled_kernels()))
            if not self.smoke:
                entry.update(time_replayed(fn, y.clone(), self.args.rep, restore=restore, replay_atol=replay_atol))
            row["variants"][name] = entry
        except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
            if isinstance(exc, CheckFailed) or not is_resource_error(exc):
                record_failure(row, name, exc, f"{row['op']} {row['shape']}", self.failures, self.args.fail_fast)
            else:
                row["skipped"][name] = f"out of memory/resources: {str(exc).splitlines()[0][:200]}"
        finally:
            restore()

    def run(self, op: str, shape, variants: dict) -> dict:
        cell = self.cell(op, shape)
        kind = "conv" if op == "conv1d" else "ssm"
        row = dict(op=op, shape=shape.name, B=shape.B, L=shape.L, prefix=shape.prefix, variants={}, checks={},
                   skipped={}, configs={n: _fields(c) for n, c in variants.items()})
        t0 = time.time()
        ref_out, ref_state = self.reference(cell, op)
        self.sync()
        row["reference_s"] = time.time() - t0
        states = cell.conv if kind == "conv" else cell.ssm
        rows, old = cell.phys, states[cell.phys].clone()
        mask = BP.written_mask(cell, kind)
        arena0 = cell.alloc.arena.clone()
        tol = self.tol[op]
        x = cell.inputs["conv_x"] if op == "conv1d" else cell.inputs["x"]
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        for name, cfg in variants.items():
            self.measure(row, name, self.ours(op, cell, cfg, out), states, rows, old, ref_out, ref_state, tol,
                         lambda: bool(torch.equal(cell.alloc.arena[~mask], arena0[~mask])))
        arena0 = mask = None
        if op != "mamba1":
            self.vllm(row, op, cell, ref_out, ref_state, tol)
        base = row["variants"].get(BASELINE[op], {}).get("ms")
        row["ratios"] = {f"{n}_over_{BASELINE[op]}": v["ms"] / base for n, v in row["variants"].items()
                         if base and "ms" in v}
        return row

    def vllm(self, row, op, cell, ref_out, ref_state, tol):
        if self.vllm_why:
            row["skipped"]["vllm"] = self.vllm_why
            return
        states = cell.conv if op == "conv1d" else cell.ssm
        pool = torch.zeros((states.shape[0] + 1, *states.shape[1:]), dtype=states.dtype, device=states.device)
        pool[1:] = states
        pool0 = pool.clone()
        idx = (cell.phys + 1).to(torch.int32)
        others = torch.ones(pool.shape[0], dtype=torch.bool, device=pool.device)
        others[idx.long()] = False
        i = cell.inputs
        try:
            if op == "conv1d":
                fn = peers.prepare_vllm_causal_conv1d(i["conv_x"], i["weight"], i["bias"], pool, idx, cell.cu,
                                                      cell.computed, activation="silu")
            else:
                fn = peers.prepare_vllm_mamba2_prefill(i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], i["dt_bias"],
                                                       pool, idx, cell.cu, cell.computed, VLLM_CHUNK)
        except Exception as exc:  # noqa: BLE001
            record_failure(row, "vllm", exc, f"{op} {row['shape']}", self.failures, self.args.fail_fast)
            return
        self.measure(row, "vllm", fn, pool, idx.long(), pool0[idx.long()], ref_out, ref_state, tol,
                     lambda: bool(torch.equal(pool[others], pool0[others])), replay_atol=tol[1])


def _fields(cfg) -> dict:
    return {k: getattr(cfg, k) for k in cfg.__slots__ if getattr(cfg, k) is not None}


def print_table(res: dict) -> None:
    e = res["env"]
    print(f"\nGPU {e.get('gpu')}  triton {e.get('triton')}  vllm {e.get('vllm_vendored')}  commit {str(e.get('commit'))[:12]}"
          f"  (medians of CUDA-graph replays, us; ratio = time / the row's baseline)")
    for r in res["cells"]:
        base = BASELINE[r["op"]]
        print(f"{r['op']:7s} {r['shape']:11s} baseline {base}")
        for n in list(r["configs"]) + ["vllm"]:
            v = r["variants"].get(n)
            if v is None:
                why = "FAIL" if n in r.get("failures", {}) else ("skip" if n in r["skipped"] else None)
                if why:
                    print(f"    {n:22s} {why}")
                continue
            us = f"{v['ms'] * 1e3:9.1f}" if "ms" in v else f"{'checked':>9s}"
            ratio = r["ratios"].get(f"{n}_over_{base}")
            regs = ",".join(f"{k['registers']}/{k['spills']}" for k in v.get("kernels", []) if k["registers"] is not None)
            print(f"    {n:22s} {us}  {'' if ratio is None else f'{ratio:5.2f}x'}  {('regs/spills ' + regs) if regs else ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes in the interpreter, checks only")
    ap.add_argument("--op", nargs="+", default=["mamba2", "conv1d", "mamba1"], choices=["mamba2", "conv1d", "mamba1"])
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--rep", type=int, default=40, help="do_bench rep (ms of timed replays per variant)")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds after which no further variant is timed")
    ap.add_argument("--fail-fast", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --smoke)")
    BP.DEVICE = "cpu" if smoke else "cuda"
    sweep = Sweep(args, smoke)
    if smoke:
        import triton
        env = dict(gpu="cpu (interpreter)", triton=triton.__version__, commit="smoke")
    else:
        from harness import environment
        env = environment()
    res = dict(env=env, timing="triton.testing.do_bench on a CUDA-graph replay (harness.time_replayed)",
               vllm_chunk_size=VLLM_CHUNK, cells=[], tolerance={k: list(v) for k, v in sweep.tol.items()})
    table = {"mamba2": SMOKE_M2 if smoke else M2, "conv1d": SMOKE_CONV if smoke else CONV,
             "mamba1": SMOKE_M1 if smoke else M1}
    for shape in SMOKE_SHAPES if smoke else SHAPES:
        for op in args.op:
            t0 = time.time()
            row = sweep.run(op, shape, table[op])
            row["cell_s"] = time.time() - t0
            res["cells"].append(row)
            print(f"{op:7s} {shape.name:11s} " + "  ".join(
                f"{n} {v['ms'] * 1e3:.1f}" if "ms" in v else f"{n} ok" for n, v in row["variants"].items())
                + (f"  FAILED {sorted(row['failures'])}" if row.get("failures") else "") + f"  ({row['cell_s']:.0f} s)",
                flush=True)
            if not smoke:
                BP.free_memory()
    res["failures"] = sweep.failures
    res["wall_s"] = time.time() - sweep.t0
    out = args.out or ("/tmp/sweep_mamba_prefill_smoke.json" if smoke else None)
    finish(res, "sweep_mamba_prefill", out, False, sweep.failures, print_table)


if __name__ == "__main__":
    main()
