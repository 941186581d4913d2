"""Prefill benchmark (GPU): our prefill ops (state in the arena's SSM blocks, K/V in its pages)
vs vLLM's Triton prefill kernels (vendored) and torch SDPA, on packed batches of fresh prompts and
of continued (chunked-prefill) requests.

    python perf/bench_prefill.py [--quick] [--wheel VLLM_WHEEL] [--out FILE]
                                 [--op mamba2 conv1d mamba1 attention] [--state-dtype bfloat16]

Ops (one layer each; activations bf16, A / D / dt_bias fp32, conv weight / bias bf16, as the models
hold them; states in the preset's dtype, bf16):
- ``mamba2``: ``mamba2_scan_prefill`` (chunked) on Nemotron-H-8B (128 heads x 64, d_state 128,
  8 groups, no z: the gate is applied by the mixer's norm) vs vLLM ``mamba_chunk_scan_combined_varlen``
  called as MambaMixer2 calls it: chunk metadata (cu_chunk_seqlens, seq_idx, last_chunk_indices)
  from vLLM's own builder code, the initial states gathered from its state pool with
  ``torch.where(has_initial_states_p, ssm_state[state_indices], 0)`` inside the timed call when a
  request continues, the final states written into the pool by the scan itself. x, B, C are column
  views of one ``[T, conv_dim]`` buffer and dt a column view of the in_proj output, as in the mixer
  (both ops get the same tensors). vLLM's chunk size is Nemotron-H's config ``chunk_size``
  (``--vllm-chunk-size``, 128); ours runs its default (64).
- ``conv1d``: ``causal_conv1d_prefill`` (silu, with bias) on Nemotron-H's x|B|C channels (10240,
  d_conv 4) vs vLLM ``causal_conv1d_fn`` with the host-built grid metadata of its builder; both read
  x as the xBC column slice of the in_proj output (vLLM: its ``[dim, T]`` transpose, as the mixer).
- ``mamba1``: ``mamba1_scan_prefill`` on Jamba-1.5-Mini (d_inner 8192, d_state 16, z gate),
  algorithm "chunked" vs "serial". No vLLM peer: vLLM's Mamba1 prefill scan (``selective_scan_fn``)
  is a compiled CUDA op of its ``_C`` library (not Triton), and the wheel's library needs its own
  torch (2.14); so ours chunked vs ours serial vs the memory ceiling only.
- ``attention``: ``paged_prefill_attention`` (Jamba attention: 32 q heads, 8 KV heads, D 128,
  pages of 16 tokens, scattered) vs vLLM ``unified_attention`` with varlen q (its Triton backend's
  call, K/V copied to its page layout, same physical pages) vs torch SDPA flash, causal, on
  contiguous per-request K/V (requests of equal length batched): the unpaged ceiling. TFLOP/s too.

Shapes (B requests x new tokens): (1, 4096), (4, 1024), (16, 512) fresh (no initial state, no cached
K/V), and a continuation: B=4 x 512 new tokens after 1024 cached (Mamba: ``has_initial_state=1``,
the states in the arena are the prefix's; attention: 1024 cached tokens in the pages). ``--quick``:
(4, 1024) and the continuation.

Setup as perf/bench_mamba_state.py / bench_paged_attention.py: an ``AVMPAllocator`` of the preset
(``--mamba-layers`` Mamba layers per SSM block, default 4, the middle one used; 2B+16 SSM blocks, B
handles drawn by ``torch.randperm``; this layer's ssm and conv state random in every block, every
other byte zero) or of the attention preset (pages of all 4 attention layers, random bytes,
handles randperm-ed into the block table, layer 0 read). vLLM's state pools hold one row per slot
of our pool plus row 0, which vLLM reserves (NULL_BLOCK_ID, skipped by its conv kernel): its state
indices are our physical slots + 1.

Checks, on every cell before any timing: ours and every peer against the pure-torch references of
avmp_triton/reference/ (mamba_prefill.py, paged_prefill.py; run on the GPU, from the same
starting states): the output, the final states (ssm / conv) of the batch, and every other byte of
the arena or row of the pool unchanged. bf16 tolerances as tests/ops/test_mamba_prefill.py: relative
error of the whole tensor (norm) plus a loose elementwise bound (``TOL``). A failed check or an
unexpected error marks the cell and makes the script exit 1 (after the JSON and the table).

Timing: each callable captured in a CUDA graph (one call per replay; eager launches if capture
fails, recorded); before timing, the states are restored and one replay must reproduce the checked
output (bit for bit, or within the op's atol for a peer, the difference recorded).
``triton.testing.do_bench`` (L2 flushed before each) gives the median and 20/80 % quantiles; a
continued request's state evolves from replay to replay. Bytes moved (the memory ceiling) per op:
activations in + out, the batch's states read (continuation) and written, parameters; GB/s and %
of a device-to-device copy measured in the same run; attention also TFLOP/s (causal: only visible
query-key pairs counted) against a bf16 matmul measured in the same run.

vLLM's kernels come from .vendor/vllm_kernels (perf/vendor_vllm.py), or are vendored first from
``--wheel``. Writes JSON to --out (default perf/results/bench_prefill_<gpu>.json), table last.
A CPU dry run of the same cells (tiny shapes, Triton interpreter, checks only) is part of
perf/check_peers_cpu.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from types import SimpleNamespace

import torch
import triton
import triton.testing

from avmp_triton import AVMPAllocator, PagedCache, get_preset
from avmp_triton.layout import kv_page_layout, ssm_block_layout
from avmp_triton.ops.mamba_prefill import (
    MambaPrefillConfig,
    causal_conv1d_prefill,
    conv1d_prefill_launch_config,
    mamba1_prefill_launch_config,
    mamba2_prefill_launch_config,
    mamba1_scan_prefill,
    mamba2_scan_prefill,
)
from avmp_triton.ops.paged_prefill import paged_prefill_attention, prefill_launch_config
from avmp_triton.reference import paged_prefill as RA
from avmp_triton.reference import mamba_prefill as RM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_paged_attention as BA  # noqa: E402  (perf/bench_paged_attention.py)
import peers  # noqa: E402  (perf/peers.py)
from harness import (CheckFailed, copy_bandwidth, environment, finish, free_memory as free_gpu_memory,  # noqa: E402
                     is_resource_error, record_failure, time_replayed)
from bench_mamba_state import layer_states, pool_plan  # noqa: E402

OPS = ("mamba2", "conv1d", "mamba1", "attention")
MODEL = {"mamba2": "nemotron-h-8b", "conv1d": "nemotron-h-8b", "mamba1": "jamba-1.5-mini",
         "attention": BA.SPEC}
FRESH = [(1, 4096), (4, 1024), (16, 512)]          # (B, new tokens), no cached prefix
CONTINUATION = (4, 512, 1024)                       # (B, new tokens, cached prefix)
QUICK_FRESH = [(4, 1024)]
QUANTILES = [0.5, 0.2, 0.8]
ACT_DTYPE = torch.bfloat16
NEMOTRON_CHUNK_SIZE = 128   # chunk_size of transformers NemotronHConfig (default 128), what vLLM's get_mamba_chunk_size() returns
# (relative error of the whole tensor, elementwise atol, rtol) per op, for bf16 activations; the
# CPU dry run (fp32) uses CPU_TOL. Mamba: as tests/ops/test_mamba_prefill.py's GPU checks.
TOL = {"mamba2": (2e-2, 0.5, 0.1), "mamba1": (1e-2, 0.5, 0.1), "conv1d": (1e-2, 5e-2, 2e-2),
       "attention": (1e-2, 2e-2, 5e-2)}
CPU_TOL = (1e-4, 1e-3, 1e-3)
DEVICE = "cuda"  # the cells' tensors (the CPU dry run swaps it)


def _sync() -> None:
    if torch.cuda.is_available() and str(DEVICE).startswith("cuda"):
        torch.cuda.synchronize()


@dataclasses.dataclass(frozen=True)
class Shape:
    B: int
    L: int                 # new tokens per request
    prefix: int = 0        # tokens already in the state / the cache

    @property
    def T(self) -> int:
        return self.B * self.L

    @property
    def name(self) -> str:
        return f"{self.B}x{self.L}" + (f"+{self.prefix}" if self.prefix else "")


# --------------------------------------------------------------------------------------- setup
@dataclasses.dataclass
class MambaCell:
    spec: object
    layer: int
    shape: Shape
    alloc: AVMPAllocator
    cache: PagedCache              # PagedCache.of(alloc), built once: what our ops read
    handles: torch.Tensor          # [B] int32 SSM handles (ours)
    phys: torch.Tensor             # [B] int64 physical slots of those blocks
    ssm: torch.Tensor              # [N, *ssm state] view of this layer's ssm state of every slot (arena)
    conv: torch.Tensor             # [N, d_conv - 1, channels] view of this layer's conv state (arena)
    cu: torch.Tensor               # [B+1] int32
    init: torch.Tensor             # [B] int32 has_initial_state
    computed: list                 # [B] tokens already in each state (vLLM's num_computed_tokens)
    inputs: dict


def mamba_spec(model: str, state_dtype, mamba_layers: int | None, spec=None):
    spec = get_preset(model) if spec is None else spec
    kw = dict(ssm_dtype=state_dtype, conv_dtype=state_dtype)
    if mamba_layers:
        kw["num_mamba_layers"] = mamba_layers
    return dataclasses.replace(spec, **kw)


def layer_conv_states(alloc, spec, layer: int) -> torch.Tensor:
    """This layer's conv state of every slot, ``[N, d_conv - 1, channels]`` (strided view of the arena)."""
    lay = ssm_block_layout(spec)
    block = alloc.unit_bytes[1]
    dt = spec.conv_dtype
    off = lay.conv_offset(layer)
    assert alloc.slab_bytes % block == 0 and block % dt.itemsize == 0 and off % dt.itemsize == 0
    n = alloc.arena.numel() // block
    elems = alloc.arena.view(dt)
    W, C = spec.d_conv - 1, spec.conv_channels
    return elems.as_strided((n, W, C), (block // dt.itemsize, C, 1), elems.storage_offset() + off // dt.itemsize)


def _rand(*shape, dtype=ACT_DTYPE, scale=1.0, device=None):
    return (torch.randn(*shape, device=device or DEVICE) * scale).to(dtype)


def mamba_inputs(spec, T: int, act_dtype, device) -> dict:
    a = act_dtype
    if spec.mamba_version == 1:
        Di, N = spec.d_inner, spec.d_state
        return dict(x=_rand(T, Di, dtype=a), dt=_rand(T, Di, dtype=a), z=_rand(T, Di, dtype=a),
                    B=_rand(T, N, dtype=a), C=_rand(T, N, dtype=a),
                    A=-torch.rand(Di, N, device=device) - 0.5, D=torch.randn(Di, device=device),
                    dt_bias=torch.rand(Di, device=device) - 2.0)
    H, P, G, N = spec.mamba_num_heads, spec.mamba_head_dim, spec.n_groups, spec.d_state
    d_inner, C_ = H * P, spec.conv_channels
    # in_proj's output [gate | xBC | dt] (MambaMixer2): the conv reads the xBC columns, the scan dt
    proj = _rand(T, d_inner + C_ + H, dtype=a)
    # the conv's output [T, x|B|C] (contiguous, as vLLM's causal_conv1d_fn writes it): the scan's x, B, C
    xbc = _rand(T, C_, dtype=a)
    return dict(conv_x=proj[:, d_inner:d_inner + C_], weight=_rand(C_, spec.d_conv, dtype=a, scale=0.5),
                bias=_rand(C_, dtype=a), dt=proj[:, d_inner + C_:],
                x=xbc[:, :d_inner].view(T, H, P), B=xbc[:, d_inner:d_inner + G * N].view(T, G, N),
                C=xbc[:, d_inner + G * N:].view(T, G, N), z=None,
                A=-torch.rand(H, device=device) - 0.5, D=torch.randn(H, device=device),
                dt_bias=torch.rand(H, device=device) - 2.0)


def build_mamba_cell(spec, shape: Shape, device, act_dtype=ACT_DTYPE, *, seed: int = 0) -> MambaCell:
    torch.manual_seed(seed + 1000 * shape.B + shape.L + 7 * shape.prefix + spec.mamba_version)
    layer = spec.num_mamba_layers // 2
    blocks = 2 * shape.B + 16
    block, slab, slabs = pool_plan(spec, blocks)
    alloc = AVMPAllocator(spec, slabs * slab, device=device, kv_fraction=0.0, slab_bytes=slab)
    alloc.arena.zero_()
    ssm = layer_states(alloc, spec, layer)
    conv = layer_conv_states(alloc, spec, layer)
    ssm.normal_()                                 # every slot's states of this layer random, rest zeros
    conv.normal_()
    live = alloc.alloc_ssm(blocks)
    handles = live[torch.randperm(blocks, device=live.device)[:shape.B]].contiguous()
    off = alloc.handle_table[handles.long()]
    if bool((off % block != 0).any()):
        raise RuntimeError("block offsets are not multiples of the block size: physical slots undefined")
    B, L = shape.B, shape.L
    cu = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=device)
    init = torch.full((B,), int(shape.prefix > 0), dtype=torch.int32, device=device)
    return MambaCell(spec=spec, layer=layer, shape=shape, alloc=alloc, cache=PagedCache.of(alloc),
                     handles=handles.to(torch.int32), phys=(off // block).long(), ssm=ssm, conv=conv, cu=cu,
                     init=init, computed=[shape.prefix] * B, inputs=mamba_inputs(spec, shape.T, act_dtype, device))


def mamba_bytes(cell: MambaCell, op: str) -> dict:
    """Bytes an op must move: activations in + out, the batch's states read (continuation) and
    written, parameters once."""
    i, s, sp = cell.inputs, cell.shape, cell.spec
    nb = (lambda t: 0 if t is None else t.numel() * t.element_size())
    rw = 2 if s.prefix else 1
    if op == "conv1d":
        acts = 2 * nb(i["conv_x"])
        params = nb(i["weight"]) + nb(i["bias"])
        state = rw * s.B * cell.conv[0].numel() * sp.conv_dtype.itemsize
    else:
        acts = sum(nb(i[k]) for k in ("x", "dt", "B", "C", "z")) + nb(i["x"])
        params = sum(nb(i[k]) for k in ("A", "D", "dt_bias"))
        state = rw * s.B * cell.ssm[0].numel() * sp.ssm_dtype.itemsize
    return dict(activation_bytes=acts, state_bytes_read_plus_written=state, param_bytes=params,
                total=acts + state + params)


@dataclasses.dataclass
class AttnCell:
    shape: Shape
    base: BA.Cell                  # bench_paged_attention's cell: allocator, pages, tables (q unused)
    q: torch.Tensor                # [T, Hq, D]
    cu: torch.Tensor               # [B+1] int32
    layout: object

    @property
    def ctx(self) -> int:
        return self.shape.prefix + self.shape.L


def build_attn_cell(spec, shape: Shape, device, *, seed: int = 0) -> AttnCell:
    base = BA.build_cell(shape.B, shape.prefix + shape.L, spec, device, seed=seed + shape.L)
    q = torch.randn(shape.T, BA.HQ, BA.D, device=device).to(spec.kv_dtype)
    cu = torch.arange(0, shape.T + 1, shape.L, dtype=torch.int32, device=device)
    return AttnCell(shape=shape, base=base, q=q, cu=cu, layout=kv_page_layout(spec, BA.PAGE))


def attn_bytes_flops(cell: AttnCell) -> tuple[dict, float]:
    s, el = cell.shape, cell.q.element_size()
    qo = 2 * cell.q.numel() * el
    kv = 2 * s.B * cell.ctx * BA.HKV * BA.D * el
    visible = s.B * (s.L * s.prefix + s.L * (s.L + 1) // 2)          # causal query-key pairs
    flops = 4.0 * visible * BA.HQ * BA.D                              # QK^T and PV
    return dict(q_out_bytes=qo, kv_bytes=kv, total=qo + kv), flops


# -------------------------------------------------------------------------------------- checks
def close(name: str, got: torch.Tensor, want: torch.Tensor, tol) -> dict:
    """Relative error of the whole tensor + elementwise |got - want| <= atol + rtol |want|; no NaN."""
    rel, atol, rtol = tol
    g, w = got.float(), want.float()
    err = (g - w).abs()
    nan = int(torch.isnan(g).sum())
    rel_err = float((g - w).norm() / w.norm().clamp_min(1e-6))
    excess = float((err - rtol * w.abs()).nan_to_num(float("inf")).max()) if err.numel() else 0.0
    ok = nan == 0 and rel_err < rel and excess <= atol
    return dict(rel_err=rel_err, max_abs_err=float(err.nan_to_num(float("inf")).max()) if err.numel() else 0.0,
                max_abs_ref=float(w.abs().max()) if w.numel() else 0.0, nan=nan, tol=list(tol), ok=ok)


def verdict(name: str, parts: dict) -> dict:
    res = dict(kernel=name, **parts)
    res["ok"] = all(v["ok"] if isinstance(v, dict) else bool(v) for v in parts.values())
    if not res["ok"]:
        bad = ", ".join(f"{k}: " + (f"rel {v['rel_err']:.2e} max|err| {v['max_abs_err']:.2e} NaN {v['nan']}"
                                    if isinstance(v, dict) else str(v))
                        for k, v in parts.items() if not (v["ok"] if isinstance(v, dict) else v))
        raise CheckFailed(f"{name}: {bad}", res)
    return res


def written_mask(cell: MambaCell, kind: str) -> torch.Tensor:
    """Arena bytes the op may write: ``kind``'s layer state of each request's block."""
    lay = ssm_block_layout(cell.spec)
    start, nbytes = ((lay.conv_offset(cell.layer), lay.conv_layer_bytes) if kind == "conv"
                     else (lay.ssm_offset(cell.layer), lay.ssm_layer_bytes))
    mask = torch.zeros(cell.alloc.arena.numel(), dtype=torch.bool, device=cell.alloc.arena.device)
    for off in cell.alloc.handle_table[cell.handles.long()].tolist():
        mask[off + start:off + start + nbytes] = True
    return mask


# -------------------------------------------------------------------------------------- timing
def matmul_tflops(n: int, rep: int) -> dict:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    med, p20, p80 = triton.testing.do_bench(lambda: torch.mm(a, b, out=c), warmup=25, rep=rep, quantiles=QUANTILES)
    a = b = c = None
    torch.cuda.empty_cache()
    return dict(n=n, ms=med, p20_ms=p20, p80_ms=p80, tflops=2.0 * n ** 3 / med / 1e9,
                note="torch.mm bf16 [n, n] x [n, n]; TFLOP/s = 2 n^3 / median time")


def free_memory() -> None:
    if str(DEVICE).startswith("cuda"):
        free_gpu_memory()


# ---------------------------------------------------------------------------------------- cells
class Runner:
    """Builds each (op, shape) cell, checks ours and the peers against the reference, times them
    (``timing=False``: checks only, the CPU dry run)."""

    def __init__(self, args, copy_gbps: float | None = None, matmul_tflops_: float | None = None, *,
                 timing: bool = True, specs: dict | None = None, act_dtype=ACT_DTYPE, tol: dict | None = None,
                 chunk: dict | None = None):
        self.args = args
        self.copy_gbps = copy_gbps
        self.mm_tflops = matmul_tflops_
        self.timing = timing
        self.specs = specs or {}
        self.act_dtype = act_dtype
        self.tol = tol or TOL
        # chunk sizes: ours (Mamba2 / Mamba1 chunked; None = the op's default) and vLLM's Mamba2
        self.chunk = {"ours_m2": None, "ours_m1": None, "vllm_m2": args.vllm_chunk_size, **(chunk or {})}
        self.failures: list[str] = []

    # ----------------------------------------------------------------------------- bookkeeping
    def fail(self, row: dict, name: str, exc: BaseException) -> None:
        record_failure(row, name, exc, f"{row['op']} {row['shape']}", self.failures, self.args.fail_fast, tb_limit=8)

    def _measure(self, row, name, make, check, restore, reset, nbytes, flops=None, replay_atol=0.0,
                 annotate=None) -> None:
        """Prepare, warm (compile / autotune), check from the restored states, then time. In its own
        frame, so whatever it made is released on return; the states are reset to the start."""
        fn = y = None
        t0 = time.time()
        try:
            fn = make()
            y = fn()
            _sync()
            first_s = time.time() - t0
            y.fill_(float("nan"))                 # a persistent output buffer must be written again
            restore()
            y = fn()
            _sync()
            row["checks"][name] = check(name, y)
            if not self.timing:
                return
            e = time_replayed(fn, y.clone(), self.args.rep, restore=restore, replay_atol=replay_atol)
            e["prepare_and_first_call_s"] = first_s
            e["gbps"] = nbytes / e["ms"] / 1e6
            e["pct_of_copy"] = 100.0 * e["gbps"] / self.copy_gbps
            if flops:
                e["tflops"] = flops / e["ms"] / 1e9
                e["pct_of_matmul"] = 100.0 * e["tflops"] / self.mm_tflops
            if annotate:
                annotate(fn, e)
            row["kernels"][name] = e
        except Exception as exc:
            if isinstance(exc, CheckFailed) or not is_resource_error(exc):
                self.fail(row, name, exc)
            else:
                row["skipped"][name] = f"out of memory/resources: {str(exc).splitlines()[0][:200]}"
        finally:
            fn = y = None
            reset()
            free_memory()

    def _row(self, op: str, shape: Shape, **extra) -> dict:
        return dict(op=op, model=MODEL[op], shape=shape.name, B=shape.B, L=shape.L, prefix=shape.prefix,
                    T=shape.T, has_initial_state=int(shape.prefix > 0), kernels={}, checks={}, skipped={}, **extra)

    def _tol(self, op: str):
        return self.tol[op] if isinstance(self.tol, dict) else self.tol

    # ----------------------------------------------------------------------------- Mamba cells
    def _mamba_cell(self, op: str, shape: Shape) -> MambaCell:
        a = self.args
        spec = mamba_spec(MODEL[op], getattr(torch, a.state_dtype), a.mamba_layers, self.specs.get(op))
        return build_mamba_cell(spec, shape, DEVICE, self.act_dtype, seed=a.seed)

    def _vllm_pool(self, states: torch.Tensor) -> torch.Tensor:
        """vLLM's state pool: row 0 reserved (NULL_BLOCK_ID), then one row per slot of ours."""
        pool = torch.zeros((states.shape[0] + 1, *states.shape[1:]), dtype=states.dtype, device=states.device)
        pool[1:] = states
        return pool

    def _run_state_op(self, row, op, cell, kind, ref_out, ref_state, ours: dict, vllm_make, nbytes) -> None:
        """Ours (one or more algorithms, in the arena) and vLLM (its pool) on one Mamba cell."""
        tol = self._tol(op)
        states = cell.conv if kind == "conv" else cell.ssm
        start = states.clone()                                             # every slot, this layer
        rows = cell.phys
        old = start[rows]
        arena_before = cell.alloc.arena.clone()
        mask = written_mask(cell, kind)
        row["check_detail"] = dict(reference_s=row.pop("_ref_s"))

        def restore_ours():
            states[rows] = old

        def reset_ours():
            states.copy_(start)

        for name, make in ours.items():
            def check(name, y, make=make):
                parts = dict(out=close(name, y, ref_out, tol), state=close(name, states[rows], ref_state, tol))
                parts["other_arena_bytes_unchanged"] = bool(torch.equal(cell.alloc.arena[~mask], arena_before[~mask]))
                return verdict(name, parts)

            self._measure(row, name, make, check, restore_ours, reset_ours, nbytes)
        arena_before = mask = None

        if self.args.no_vllm or vllm_make is None:
            row["skipped"]["vllm"] = "--no-vllm" if self.args.no_vllm else "no vLLM peer"
            return
        pool = self._vllm_pool(start)
        pool_start = pool.clone()
        idx = (cell.phys + 1).to(torch.int32)
        others = torch.ones(pool.shape[0], dtype=torch.bool, device=pool.device)
        others[idx.long()] = False

        def check_vllm(name, y):
            parts = dict(out=close(name, y, ref_out, tol), state=close(name, pool[idx.long()], ref_state, tol))
            parts["other_pool_rows_unchanged"] = bool(torch.equal(pool[others], pool_start[others]))
            return verdict(name, parts)

        def restore_vllm():
            pool[idx.long()] = old

        self._measure(row, "vllm", lambda: vllm_make(pool, idx), check_vllm, restore_vllm,
                      lambda: pool.copy_(pool_start), nbytes, replay_atol=tol[1],
                      annotate=lambda fn, e: e.update(getattr(fn, "meta", {})))

    def _reference(self, cell: MambaCell, op: str, kind: str):
        """(output, final states [B, ...] in the state dtype) of the pure-torch reference, run on a
        copy of the arena (on the GPU: a token loop of small kernels)."""
        i = cell.inputs
        ref_arena = cell.alloc.arena.clone()
        t0 = time.time()
        args = (ref_arena, cell.alloc.handle_table, cell.handles, cell.cu, cell.init, cell.spec, cell.layer)
        if op == "conv1d":
            out = RM.causal_conv1d_prefill_ref(i["conv_x"], i["weight"], i["bias"], *args, activation="silu")
        else:
            ref = RM.mamba1_scan_prefill_ref if op == "mamba1" else RM.mamba2_scan_prefill_ref
            out = ref(i["x"], i["dt"], i["A"], i["B"], i["C"], *args, D=i["D"], z=i["z"], dt_bias=i["dt_bias"],
                      dt_softplus=True)
        _sync()
        ref_s = time.time() - t0
        # the same slots of the reference's copy of the arena
        a = SimpleNamespace(arena=ref_arena, unit_bytes=cell.alloc.unit_bytes, slab_bytes=cell.alloc.slab_bytes)
        states = layer_conv_states(a, cell.spec, cell.layer) if kind == "conv" else layer_states(a, cell.spec, cell.layer)
        return out, states[cell.phys].clone(), ref_s

    def run_mamba2(self, shape: Shape) -> list[dict]:
        """Nemotron-H: the conv1d and the Mamba2 scan cells share one allocator (conv and ssm state
        of the same layer)."""
        ops = [op for op in ("conv1d", "mamba2") if op in self.args.op]
        if not ops:
            return []
        t0 = time.time()
        cell = self._mamba_cell(ops[0], shape)
        setup_s = time.time() - t0
        i, rows = cell.inputs, []
        for op in ops:
            kind = "conv" if op == "conv1d" else "ssm"
            row = self._row(op, shape, layer=cell.layer, mamba_layers_per_block=cell.spec.num_mamba_layers,
                            state_dtype=str(cell.spec.ssm_dtype).removeprefix("torch."), setup_s=setup_s)
            ref_out, ref_state, row["_ref_s"] = self._reference(cell, op, kind)
            bm = mamba_bytes(cell, op)
            row["bytes"] = bm
            cache = cell.cache
            if op == "conv1d":
                out = torch.empty_like(i["conv_x"], memory_format=torch.contiguous_format)
                row.update(channels=cell.spec.conv_channels, d_conv=cell.spec.d_conv)

                def ours():
                    return causal_conv1d_prefill(i["conv_x"], i["weight"], cell.handles, cell.cu, cell.init, cache,
                                                 layer=cell.layer, bias=i["bias"], activation="silu", out=out)

                def vllm_make(pool, idx):
                    return peers.prepare_vllm_causal_conv1d(i["conv_x"], i["weight"], i["bias"], pool, idx,
                                                            cell.cu, cell.computed, activation="silu")

                impls = {"ours": lambda: ours}
                c = conv1d_prefill_launch_config(cell.spec.conv_channels, cell.spec.d_conv)
                row["ours_config"] = dict(block_t=c.block_t, block_c=c.block, num_warps=c.num_warps)
            else:
                out = torch.empty(shape.T, *i["x"].shape[1:], dtype=i["x"].dtype, device=DEVICE)
                sp = cell.spec
                row.update(state_shape=[sp.mamba_num_heads, sp.mamba_head_dim, sp.d_state], n_groups=sp.n_groups, z=False)
                config = MambaPrefillConfig(algorithm="chunked", chunk_size=self.chunk["ours_m2"])

                def ours():
                    return mamba2_scan_prefill(i["x"], i["dt"], i["A"], i["B"], i["C"], cell.handles, cell.cu,
                                               cell.init, cache, layer=cell.layer, D=i["D"], z=None,
                                               dt_bias=i["dt_bias"], dt_softplus=True, out=out, config=config)

                def vllm_make(pool, idx):
                    return peers.prepare_vllm_mamba2_prefill(i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"],
                                                             i["dt_bias"], pool, idx, cell.cu, cell.computed,
                                                             self.chunk["vllm_m2"])

                impls = {"ours": lambda: ours}
                c = mamba2_prefill_launch_config(sp.mamba_head_dim, sp.d_state, chunked=True)
                row["ours_config"] = dict(algorithm="chunked", chunk_size=self.chunk["ours_m2"] or c.chunk_size,
                                          block_p=c.block, num_warps=c.num_warps)
            self._run_state_op(row, op, cell, kind, ref_out, ref_state, impls, vllm_make, bm["total"])
            self._ratios(row, ["vllm"])
            rows.append(row)
            ref_out = ref_state = out = None
        cell = None
        free_memory()
        return rows

    def run_mamba1(self, shape: Shape) -> list[dict]:
        if "mamba1" not in self.args.op:
            return []
        t0 = time.time()
        cell = self._mamba_cell("mamba1", shape)
        i, cache = cell.inputs, cell.cache
        row = self._row("mamba1", shape, layer=cell.layer, mamba_layers_per_block=cell.spec.num_mamba_layers,
                        state_dtype=str(cell.spec.ssm_dtype).removeprefix("torch."), setup_s=time.time() - t0,
                        state_shape=[cell.spec.d_inner, cell.spec.d_state], z=True)
        ref_out, ref_state, row["_ref_s"] = self._reference(cell, "mamba1", "ssm")
        bm = mamba_bytes(cell, "mamba1")
        row["bytes"] = bm
        c = mamba1_prefill_launch_config(cell.spec.d_inner, cell.spec.d_state, chunked=True)
        row["ours_config"] = dict(chunk_size=self.chunk["ours_m1"] or c.chunk_size, block_d=c.block,
                                  num_warps=c.num_warps)
        out = torch.empty_like(i["x"])

        def make(algorithm):
            config = MambaPrefillConfig(algorithm=algorithm,
                                        chunk_size=None if algorithm == "serial" else self.chunk["ours_m1"])

            def ours():
                return mamba1_scan_prefill(i["x"], i["dt"], i["A"], i["B"], i["C"], cell.handles, cell.cu, cell.init,
                                           cache, layer=cell.layer, D=i["D"], z=i["z"], dt_bias=i["dt_bias"],
                                           dt_softplus=True, out=out, config=config)
            return lambda: ours

        self._run_state_op(row, "mamba1", cell, "ssm", ref_out, ref_state,
                           {"ours": make("chunked"), "ours_serial": make("serial")}, None, bm["total"])
        row["skipped"]["vllm"] = ("vLLM's Mamba1 prefill scan (selective_scan_fn -> _C selective_scan_fwd) is a "
                                  "compiled CUDA op, not Triton; the wheel's library needs torch 2.14: not loadable")
        self._ratios(row, ["ours_serial"])
        cell = ref_out = ref_state = out = None
        free_memory()
        return [row]

    # ----------------------------------------------------------------------------- attention
    def run_attention(self, shape: Shape) -> list[dict]:
        if "attention" not in self.args.op:
            return []
        a = self.args
        spec = self.specs.get("attention") or BA.attn_spec(None, self.act_dtype)
        t0 = time.time()
        cell = build_attn_cell(spec, shape, DEVICE, seed=a.seed)
        base, q, T = cell.base, cell.q, shape.T
        row = self._row("attention", shape, num_q_heads=BA.HQ, num_kv_heads=BA.HKV, head_dim=BA.D,
                        page_tokens=BA.PAGE, attn_layers_per_page=spec.num_attn_layers, layer_read=0,
                        ctx=cell.ctx, setup_s=time.time() - t0)
        t0 = time.time()
        ref = RA.paged_prefill_attention_ref(q, cell.cu, base.seq_lens, base.block_table, base.alloc.arena,
                                             base.alloc.handle_table, cell.layout, 0, base.scale)
        _sync()
        row["check_detail"] = dict(reference_s=time.time() - t0)
        bm, flops = attn_bytes_flops(cell)
        row["bytes"], row["flops"] = bm, flops
        tol = self._tol("attention")
        nothing = (lambda: None)

        def check(to_ours):
            return lambda name, y: verdict(name, dict(out=close(name, to_ours(y), ref, tol)))

        same = (lambda y: y)
        out = torch.empty_like(q)
        cache = base.cache

        def ours():
            return paged_prefill_attention(q, base.block_table, base.seq_lens, cell.cu, cache, layer=0,
                                           scale=base.scale, out=out, max_seqlen_q=shape.L)

        c = prefill_launch_config(BA.D, q.dtype, BA.HQ // BA.HKV, on_gpu=q.is_cuda, max_seqlen_q=shape.L)
        row["ours_config"] = dict(block_m=c.block_m, block_n=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages)
        self._measure(row, "ours", lambda: ours, check(same), nothing, nothing, bm["total"], flops)
        out = None
        if a.no_vllm:
            row["skipped"]["vllm"] = "--no-vllm"
        else:
            self._measure(row, "vllm", lambda: peers.prepare_vllm_unified_attention(
                q, base.k_pages, base.v_pages, base.phys_table, base.seq_lens, base.scale, cu_seqlens_q=cell.cu,
                max_seqlen_q=shape.L), check(same), nothing, nothing, bm["total"], flops, replay_atol=tol[1],
                annotate=lambda fn, e: e.update(path="3D split-K + reduce" if fn.uses_3d else "2D"))
        if a.no_sdpa:
            row["skipped"]["sdpa"] = "--no-sdpa"
        else:
            B, L = shape.B, shape.L
            q4 = q.view(B, L, BA.HQ, BA.D).transpose(1, 2)                   # [B, Hq, L, D], no copy

            def sdpa_note(fn, e):
                e.update(gqa=fn.gqa, mask=fn.mask, path=fn.path)
                if fn.gqa == "repeat_interleave":
                    e["note"] = "flash rejected enable_gqa: K/V repeated to Hq heads, it reads 4x the K/V bytes counted"

            self._measure(row, "sdpa", lambda: peers.prepare_sdpa_prefill(q4, *BA.contiguous_kv(base), base.scale),
                          check(lambda y: y.transpose(1, 2).reshape(T, BA.HQ, BA.D)), nothing, nothing, bm["total"],
                          flops, replay_atol=tol[1], annotate=sdpa_note)
        self._ratios(row, ["vllm", "sdpa"])
        cell = base = ref = q = None
        free_memory()
        return [row]

    def _ratios(self, row: dict, peers_: list) -> None:
        k = row["kernels"]
        row["ratios"] = {f"ours_over_{p}": k["ours"]["ms"] / k[p]["ms"] for p in peers_ if "ours" in k and p in k}

    def run_shape(self, shape: Shape) -> list[dict]:
        rows = []
        for fn in (self.run_mamba2, self.run_mamba1, self.run_attention):
            t0 = time.time()
            got = fn(shape)
            for r in got:
                r["group_s"] = time.time() - t0   # this op group (Nemotron-H: conv1d + mamba2 together)
                if self.copy_gbps:                # the time the bytes take at the copy bandwidth
                    r["bytes"]["at_copy_bandwidth_us"] = r["bytes"]["total"] / self.copy_gbps / 1e3
                if self.mm_tflops and r.get("flops"):
                    r["at_matmul_tflops_us"] = r["flops"] / self.mm_tflops / 1e6
                k = r["kernels"]
                print(f"{r['op']:9s} {shape.name:12s} " + "  ".join(f"{n} {v['ms'] * 1e3:.1f} us" for n, v in k.items())
                      + "  checks " + ", ".join(f"{n} {'ok' if c['ok'] else 'FAIL'}" for n, c in r["checks"].items())
                      + (f"  FAILED {sorted(r['failures'])}" if r.get("failures") else "")
                      + f"  ({r['group_s']:.0f} s)", flush=True)
            rows += got
        return rows


# ---------------------------------------------------------------------------------------- output
PEER_OF = {"mamba2": ["vllm"], "conv1d": ["vllm"], "mamba1": ["ours_serial"], "attention": ["vllm", "sdpa"]}


def print_table(res: dict) -> None:
    e = res["env"]
    print(f"\nGPU {e['gpu']}  torch {e['torch']}  triton {e['triton']}  vllm {e.get('vllm_vendored')}  "
          f"commit {e['commit'][:12]}")
    print(f"copy ceiling {res['copy_bandwidth']['gbps']:.0f} GB/s (read+write); bf16 matmul "
          f"{res['matmul']['tflops']:.0f} TFLOP/s; medians in us; %cp = bytes moved / t / copy ceiling; "
          f"attention: TF = TFLOP/s (causal pairs only)")
    print(f"{'op':9s} {'shape':12s} | {'ours us':>9s} {'%cp':>4s} {'TF':>5s} | {'peer':11s} {'us':>9s} {'%cp':>4s} "
          f"{'TF':>5s} | {'ours/peer':>9s}")
    for r in res.get("cells", []):
        k = r["kernels"]

        def t(n):
            if n not in k:
                tag = "FAIL" if n in r.get("failures", {}) else "skip"
                return f"{tag:>9s} {'':4s} {'':5s}"
            tf = f"{k[n]['tflops']:5.0f}" if "tflops" in k[n] else f"{'':5s}"
            return f"{k[n]['ms'] * 1e3:9.1f} {k[n]['pct_of_copy']:4.0f} {tf}"

        for p in PEER_OF[r["op"]]:
            ratio = r.get("ratios", {}).get(f"ours_over_{p}", float("nan"))
            print(f"{r['op']:9s} {r['shape']:12s} | {t('ours')} | {p:11s} {t(p)} | {ratio:9.2f}")
    for r in res.get("cells", []):
        for n, why in r["skipped"].items():
            if not (r["op"] == "mamba1" and n == "vllm"):
                print(f"  skipped {r['op']} {r['shape']} {n}: {why}")
    print("  mamba1: no vLLM peer (" + res["notes"]["mamba1"] + ")")


def shapes_of(args) -> list[Shape]:
    fresh = QUICK_FRESH if args.quick else FRESH
    out = [Shape(B, L) for B, L in fresh]
    if not args.no_continuation:
        B, L, prefix = CONTINUATION
        out.append(Shape(B, L, prefix))
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="(4, 1024) fresh and the continuation only")
    ap.add_argument("--op", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument("--no-continuation", action="store_true")
    ap.add_argument("--wheel", default=None,
                    help="vendor vLLM's kernels from this wheel first (perf/vendor_vllm.py) instead of using "
                         ".vendor/vllm_kernels")
    ap.add_argument("--state-dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                    help="ssm and conv state dtype (the presets keep bf16; vLLM's Nemotron-H default is fp32)")
    ap.add_argument("--mamba-layers", type=int, default=4,
                    help="Mamba layers per SSM block (0: the preset's, 24 / 28); the middle one is used")
    ap.add_argument("--vllm-chunk-size", type=int, default=NEMOTRON_CHUNK_SIZE,
                    help="vLLM's Mamba2 chunk size (the model config's chunk_size)")
    ap.add_argument("--copy-gib", type=float, default=2.0)
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms of timed replays per kernel)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--fail-fast", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    return ap


NOTES = dict(
    mamba1=("vLLM's Mamba1 prefill scan is selective_scan_fn -> vllm._custom_ops.selective_scan_fwd, a compiled "
            "CUDA op of its _C library, not Triton; the wheel's library is built for torch 2.14 and cannot be "
            "loaded on this torch. Reported: ours chunked vs ours serial vs the memory ceiling"),
    vllm_mamba2=("mamba_chunk_scan_combined_varlen as MambaMixer2.conv_ssm_forward calls it (vLLM 0.33, no "
                 "prefix-caching checkpoints): chunk metadata from BaseMambaAttentionMetadataBuilder."
                 "_compute_chunk_metadata (cut from the wheel), initial states gathered by torch.where(has_initial_"
                 "states_p, ssm_state[state_indices], 0) inside the timed call when any request continues, final "
                 "states written into the pool by the scan (final_states_out / final_state_indices), dt_softplus, "
                 "dt_limit (0, inf), state_dtype = the pool's, z=None"),
    vllm_conv1d=("causal_conv1d_fn on x = xBC columns of the in_proj output transposed to [dim, T] (channel-last), "
                 "conv_states = pool [N, d_conv-1, dim].transpose(-1, -2) (vLLM's default SD layout), "
                 "cache_indices = state indices, has_initial_state = num_computed_tokens > 0, metadata from "
                 "compute_causal_conv1d_metadata (cut from the wheel), as MambaMixer2"),
    pools=("vLLM's pools: row 0 reserved (NULL_BLOCK_ID), then one row per slot of our SSM pool holding the same "
           "states; state indices = our physical slots + 1 (same scattered pattern)"),
    reference=("every cell is checked against avmp_triton/reference on the GPU, all channels (the Mamba "
               "references are token loops of small GPU kernels, about a second per cell; reference_s per row)"),
    bytes=("activations in + out, the batch's states read (continuation only) and written, parameters once; "
           "attention: q + out + K and V of every request's context (layer 0) read once. vLLM's extra traffic "
           "(its initial-state gather, the SSD's intermediate chunk states) is not counted"),
)


def vendor_or_check(args) -> None:
    if args.no_vllm:
        return
    if args.wheel:
        import vendor_vllm

        t0 = time.time()
        info = vendor_vllm.vendor(args.wheel, os.path.abspath(peers.VENDOR))
        print(f"vendored vllm {info['vllm_version']} from {args.wheel} -> {peers.VENDOR} ({time.time() - t0:.1f} s)",
              flush=True)
    if not os.path.isdir(os.path.join(peers.VENDOR, "vllm")):
        raise SystemExit(f"no vendored vLLM kernels in {peers.VENDOR}: run python perf/vendor_vllm.py, pass "
                         f"--wheel, or --no-vllm")
    for m in ("vllm.model_executor.layers.mamba.ops.ssd_combined", "vllm.model_executor.layers.mamba.ops.causal_conv1d",
              "vllm.v1.attention.ops.triton_unified_attention", "vllm.v1.attention.backends.mamba_attn"):
        peers._vllm(m)   # fail here, before any GPU time, if the vendored tree lacks one


def main() -> None:
    args = parser().parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_prefill needs a CUDA GPU (CPU dry run: python perf/check_peers_cpu.py)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: this benchmark times compiled kernels")
    t_start = time.time()
    vendor_or_check(args)
    shapes = shapes_of(args)
    m2, m1 = get_preset(MODEL["mamba2"]), get_preset(MODEL["mamba1"])
    res = dict(
        env=environment(),
        shapes=dict(
            cells=[dataclasses.asdict(s) | dict(name=s.name) for s in shapes],
            mamba2=dict(model=MODEL["mamba2"], nheads=m2.mamba_num_heads, head_dim=m2.mamba_head_dim,
                        d_state=m2.d_state, n_groups=m2.n_groups, z=False, vllm_chunk_size=args.vllm_chunk_size,
                        ours_chunk_size=64),
            conv1d=dict(model=MODEL["conv1d"], channels=m2.conv_channels, d_conv=m2.d_conv, activation="silu",
                        bias=True),
            mamba1=dict(model=MODEL["mamba1"], d_inner=m1.d_inner, d_state=m1.d_state, z=True),
            attention=dict(spec=BA.SPEC, num_q_heads=BA.HQ, num_kv_heads=BA.HKV, head_dim=BA.D, page_tokens=BA.PAGE,
                           dtype="bfloat16", layer_read=0, equal_lengths=True)),
        activation_dtype="bfloat16", params_dtype="float32", state_dtype=args.state_dtype, dt_softplus=True,
        mamba_layers_per_block=args.mamba_layers,
        timing=dict(method="triton.testing.do_bench on a CUDA-graph replay of one call (L2 flushed before each)",
                    warmup_ms=25, rep_ms=args.rep, quantiles=QUANTILES),
        check_tolerance={k: dict(rel_norm=v[0], atol=v[1], rtol=v[2]) for k, v in TOL.items()},
        notes=NOTES,
    )
    res["copy_bandwidth"] = copy_bandwidth(args.copy_gib, args.rep)
    res["matmul"] = matmul_tflops(args.matmul_n, args.rep)
    print(f"copy ceiling: {res['copy_bandwidth']['gbps']:.0f} GB/s; bf16 matmul {res['matmul']['tflops']:.0f} TFLOP/s",
          flush=True)
    runner = Runner(args, res["copy_bandwidth"]["gbps"], res["matmul"]["tflops"])
    res["cells"] = []
    for shape in shapes:
        res["cells"] += runner.run_shape(shape)
    res["failures"] = runner.failures
    res["wall_s"] = time.time() - t_start
    finish(res, "bench_prefill", args.out, False, runner.failures, print_table)


if __name__ == "__main__":
    main()
