"""Bad metadata given to the Mamba ops (issue 8): wrong-kind and repeated handles, bad cu_seqlens.

On the device the kernels skip a row whose handle is not a live SSM handle or appears in two rows
(zero output, no byte of any unit read or written) and clamp every request's range to the packed
tokens; the raw custom ops (``torch.ops.avmp.*``, which the launchers call after their checks)
show that behaviour on any device. On CPU-resident metadata the launchers raise instead, naming
the bad value. A decode step is checked against the prefill reference with one token per request
(with its state as the initial state), which is the same computation.
"""
import os
import subprocess
import sys

import pytest
import torch

from avmp_triton import InvalidHandleError, PagedCache
from avmp_triton.ops.mamba_state import (
    causal_conv1d_update, conv1d_launch_config, mamba1_launch_config, mamba1_state_update, mamba2_launch_config,
    mamba2_state_update,
)
from avmp_triton.ops.mamba_prefill import (
    MambaPrefillConfig, causal_conv1d_prefill, conv1d_prefill_launch_config, mamba1_scan_prefill,
    mamba2_scan_prefill,
)
from test_mamba_prefill import CPU_CHUNK, DEVICE, F32, INPUTS_OF, LAYER, N_BLOCKS, SPEC_OF, Env, run_ref

# (op, prefill algorithm or None): every Mamba op, both prefill scans on both paths
OPS = [("mamba1_state_update", None), ("mamba2_state_update", None), ("causal_conv1d_update", None),
       ("causal_conv1d_prefill", None), ("mamba1_scan_prefill", "serial"), ("mamba1_scan_prefill", "chunked"),
       ("mamba2_scan_prefill", "serial"), ("mamba2_scan_prefill", "chunked")]
OP_IDS = ["m1-decode", "m2-decode", "conv-decode", "conv-prefill", "m1-serial", "m1-chunked", "m2-serial",
          "m2-chunked"]
PREFILL_OPS = OPS[3:]
PREFILL_IDS = OP_IDS[3:]
KIND = {"mamba1_state_update": "m1", "mamba2_state_update": "m2", "causal_conv1d_update": "conv",
        "causal_conv1d_prefill": "conv", "mamba1_scan_prefill": "m1", "mamba2_scan_prefill": "m2"}
LENS = [3, 2, 5, 1, 4]       # prefill requests; decode: one token each
PAD = 2                      # prefill tokens past cu_seqlens[B]
SCAN_KEYS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
TOL = dict(atol=2e-4, rtol=2e-4)


def is_decode(op: str) -> bool:
    return op.endswith("_update")


class Case:
    """One op on a fresh Env (random arena, scattered SSM blocks, KV pages), fp32 everywhere."""

    def __init__(self, op: str, algorithm, batch: int = len(LENS)):
        self.op, self.algorithm, self.kind = op, algorithm, KIND[op]
        self.env = Env(SPEC_OF[self.kind], F32)
        a = self.env.alloc
        self.kv = (a.handle_kind == 1).nonzero().flatten()
        pick = torch.randperm(N_BLOCKS, device="cpu")[:batch]
        self.handles = self.env.blocks.cpu()[pick].to(torch.int32).to(DEVICE)
        lens = [1] * batch if is_decode(op) else LENS[:batch]
        self.cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
        self.T = int(self.cu[-1]) + (0 if is_decode(op) else PAD)
        # decode always continues from the block's state; prefill mixes both starts
        init = [1] * batch if is_decode(op) else [1, 0, 1, 1, 0][:batch]
        self.init = torch.tensor(init, dtype=torch.int32, device=DEVICE)
        self.inputs = INPUTS_OF[self.kind](self.env.spec, self.T, F32)

    def nan_out(self):
        return torch.full_like(self.inputs["x"], float("nan"))

    def raw(self, handles, out, cu=None, inputs=None):
        """The custom op itself: no host check of the metadata's values."""
        a, lay, i = self.env.alloc, self.env.layout, inputs or self.inputs
        where = (a.arena, a.handle_table, a.handle_kind, out)   # after the metadata, in every custom op
        meta = (handles, self.cu if cu is None else cu, self.init)
        spec = self.env.spec
        if self.op == "causal_conv1d_update":
            cfg = conv1d_launch_config(spec.conv_channels, spec.d_conv)
            torch.ops.avmp.causal_conv1d_update(i["x"], i["weight"], i["bias"], handles, *where,
                                                lay.conv_offset(LAYER), F32, True, cfg.block, cfg.num_warps)
        elif self.op == "mamba1_state_update":
            cfg = mamba1_launch_config(spec.d_inner, spec.d_state)
            torch.ops.avmp.mamba1_state_update(*[i[k] for k in SCAN_KEYS], handles, *where, lay.ssm_offset(LAYER),
                                               F32, True, cfg.block, cfg.num_warps)
        elif self.op == "mamba2_state_update":
            cfg = mamba2_launch_config(spec.mamba_head_dim, spec.d_state)
            torch.ops.avmp.mamba2_state_update(*[i[k] for k in SCAN_KEYS], handles, *where, lay.ssm_offset(LAYER),
                                               F32, True, cfg.block, cfg.num_warps)
        elif self.op == "causal_conv1d_prefill":
            cfg = conv1d_prefill_launch_config(spec.conv_channels, spec.d_conv)
            torch.ops.avmp.causal_conv1d_prefill(i["x"], i["weight"], i["bias"], *meta, *where,
                                                 lay.conv_offset(LAYER), F32, True, cfg.block_t, cfg.block,
                                                 cfg.num_warps)
        else:   # the scans; channel blocks smaller than the layer, so several programs share a request
            fn = torch.ops.avmp.mamba1_scan_prefill if self.kind == "m1" else torch.ops.avmp.mamba2_scan_prefill
            fn(*[i[k] for k in SCAN_KEYS], *meta, *where, lay.ssm_offset(LAYER), F32, True,
               self.algorithm == "chunked", CPU_CHUNK[self.kind], 8 if self.kind == "m1" else 16, 2)
        return out

    def launch(self, handles, cu=None):
        """The public launcher."""
        i, cache = self.inputs, PagedCache.of(self.env.alloc)
        meta = (handles, self.cu if cu is None else cu, self.init)
        if self.op == "causal_conv1d_update":
            return causal_conv1d_update(i["x"], i["weight"], handles, cache, layer=LAYER, bias=i["bias"],
                                        activation="silu")
        if self.op == "causal_conv1d_prefill":
            return causal_conv1d_prefill(i["x"], i["weight"], *meta, cache, layer=LAYER, bias=i["bias"],
                                         activation="silu")
        scan_in = [i[k] for k in ("x", "dt", "A", "B", "C")]
        scan_kw = dict(layer=LAYER, D=i["D"], z=i["z"], dt_bias=i["dt_bias"], dt_softplus=True)
        if is_decode(self.op):
            fn = mamba1_state_update if self.kind == "m1" else mamba2_state_update
            return fn(*scan_in, handles, cache, **scan_kw)
        fn = mamba1_scan_prefill if self.kind == "m1" else mamba2_scan_prefill
        return fn(*scan_in, *meta, cache, **scan_kw,
                  config=MambaPrefillConfig(algorithm=self.algorithm, chunk_size=CPU_CHUNK[self.kind]))

    def state_mask(self, handles):
        """Arena bytes the op may write: its layer's state in the unit of every handle given."""
        return self.env.state_bytes(handles[handles >= 0], "conv" if self.kind == "conv" else "ssm")

    def rows(self, b: int, cu=None) -> slice:
        cu = (self.cu if cu is None else cu).tolist()
        return slice(cu[b], cu[b + 1])

    def check(self, got, before, skipped, cu=None):
        """``got`` and the arena equal the reference run with the ``skipped`` rows' handles as -1;
        those rows' outputs are zeros; outside the other rows' states, the arena is bit-identical."""
        a = self.env.alloc
        valid = self.handles.clone()
        valid[skipped] = -1
        ref_arena = before.clone()
        want = run_ref(self.kind, self.inputs, ref_arena, a.handle_table, valid, self.cu if cu is None else cu,
                       self.init, self.env.spec)
        assert not got.isnan().any(), "an output element was not written"
        for b in skipped:
            assert torch.all(got[self.rows(b, cu)] == 0), f"skipped row {b}: output not zero"
        torch.testing.assert_close(got, want, **TOL)
        mask = self.state_mask(valid)
        assert torch.equal(a.arena[~mask], before[~mask]), "a byte outside the valid rows' states changed"
        torch.testing.assert_close(a.arena[mask].view(F32), ref_arena[mask].view(F32), **TOL)


def ssm_error(pos, h, why):
    return rf"ssm_handles\[{pos}\] = {h} {why}"


# ------------------------------------------------------------------------------- device behaviour
@pytest.mark.parametrize("op,algorithm", OPS, ids=OP_IDS)
def test_raw_op_skips_kv_and_freed_handles(op, algorithm):
    """A live KV handle (row 1) and a freed SSM handle (row 3): zero outputs, no unit byte touched."""
    c = Case(op, algorithm)
    a = c.env.alloc
    c.handles[1] = c.kv[torch.randint(len(c.kv), ())]
    spare = [h for h in c.env.blocks.tolist() if h not in c.handles.tolist()]
    c.handles[3] = spare[torch.randint(len(spare), ()).item()]
    a.free(c.handles[3:4], "ssm")
    before = a.arena.clone()
    got = c.raw(c.handles, c.nan_out())
    c.check(got, before, skipped=[1, 3])


@pytest.mark.parametrize("op,algorithm", OPS, ids=OP_IDS)
def test_raw_op_skips_repeated_handles(op, algorithm):
    """One SSM handle in rows 0 and 3: both rows give zeros and that state is left as it was."""
    c = Case(op, algorithm)
    c.handles[3] = c.handles[0]
    before = c.env.alloc.arena.clone()
    got = c.raw(c.handles, c.nan_out())
    c.check(got, before, skipped=[0, 3])


# ------------------------------------------------------------------------------- host checks
@pytest.mark.skipif(DEVICE != "cpu", reason="the launchers check values only on CPU-resident metadata")
@pytest.mark.parametrize("op,algorithm", OPS, ids=OP_IDS)
def test_launcher_names_bad_handles(op, algorithm):
    c = Case(op, algorithm)
    arena = c.env.alloc.arena
    before = arena.clone()
    kv = int(c.kv[torch.randint(len(c.kv), ())])
    bad = c.handles.clone()
    bad[2] = kv
    with pytest.raises(InvalidHandleError, match=ssm_error(2, kv, "is a KV page handle, not a SSM block handle")):
        c.launch(bad)
    bad = c.handles.clone()
    bad[4] = bad[1]
    h = int(bad[1])
    with pytest.raises(InvalidHandleError, match=ssm_error(4, h, r"repeats ssm_handles\[1\]")):
        c.launch(bad)
    assert torch.equal(arena, before)


# (name, cu_seqlens of LENS (T = 15 + PAD = 17) made bad, the launcher's message)
BAD_CU = [("past the end", [0, 3, 5, 10, 11, 23], r"cu_seqlens\[-1\]=23 is past the end of the 17 packed tokens"),
          ("decreasing", [0, 6, 2, 10, 11, 15], r"cu_seqlens\[2\]=2 < cu_seqlens\[1\]=6"),
          ("not from 0", [2, 5, 7, 12, 13, 17], r"cu_seqlens\[0\] must be 0, got 2"),
          ("negative and huge", [-5, 3, -2, 2**30, 2**31 - 1, 2**31 - 1], r"cu_seqlens\[0\] must be 0, got -5")]


@pytest.mark.skipif(DEVICE != "cpu", reason="the launchers check values only on CPU-resident metadata")
@pytest.mark.parametrize("op,algorithm", PREFILL_OPS, ids=PREFILL_IDS)
def test_launcher_names_bad_cu_seqlens(op, algorithm):
    c = Case(op, algorithm)
    assert c.T == 17
    arena = c.env.alloc.arena
    before = arena.clone()
    for name, cu, match in BAD_CU:
        with pytest.raises(ValueError, match=match):
            c.launch(c.handles, cu=torch.tensor(cu, dtype=torch.int32))
    assert torch.equal(arena, before)


# ------------------------------------------------------------------------------- bad cu_seqlens, raw
GUARD = 3   # rows of NaN before and after every per-token tensor


def guarded(t: torch.Tensor):
    """(t copied into the middle of a NaN-filled buffer with GUARD rows either side, the buffer)."""
    buf = torch.full((t.shape[0] + 2 * GUARD, *t.shape[1:]), float("nan"), dtype=t.dtype, device=t.device)
    inner = buf[GUARD:GUARD + t.shape[0]]
    inner.copy_(t)
    return inner, buf


def clamped_ranges(cu: list, T: int) -> list:
    """The kernels' reading of any cu_seqlens: request b covers [clamp(cu[b]), clamp(max(cu[b+1], that)))."""
    out = []
    for b in range(len(cu) - 1):
        s = min(max(cu[b], 0), T)
        out.append((s, min(max(cu[b + 1], s), T)))
    return out


def run_bad_cu_case(op: str, algorithm, name: str, cu: list) -> None:
    """The raw op on a bad cu_seqlens, inputs and output inside NaN guards: every access stays in x,
    out and the valid rows' units (guards and other bytes unchanged, no NaN read into an output or a
    state); past the end, the result is the reference's on the clamped cu_seqlens."""
    c = Case(op, algorithm)
    a = c.env.alloc
    inputs, bufs = {}, []
    for k, v in c.inputs.items():
        if v is not None and v.shape[0] == c.T and k not in ("A", "D", "dt_bias", "weight", "bias"):
            v, buf = guarded(v)
            bufs.append(buf)
        inputs[k] = v
    out, out_buf = guarded(c.nan_out())
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    before = a.arena.clone()
    c.raw(c.handles, out, cu=cu_t, inputs=inputs)
    for buf in bufs + [out_buf]:
        assert buf[:GUARD].isnan().all() and buf[-GUARD:].isnan().all(), f"{name}: a guard row was written"
    mask = c.state_mask(c.handles)
    assert torch.equal(a.arena[~mask], before[~mask]), f"{name}: a byte outside the rows' states changed"
    assert not a.arena[mask].view(F32).isnan().any(), f"{name}: a state read a guard row"
    ranges = clamped_ranges(cu, c.T)
    for s, e in ranges + [(min(max(cu[-1], 0), c.T), c.T)]:
        assert not out[s:e].isnan().any(), f"{name}: rows [{s}, {e}) not written or read a guard row"
    if name == "past the end":
        c.check(out, before, skipped=[], cu=torch.tensor([s for s, _ in ranges] + [ranges[-1][1]],
                                                          dtype=torch.int32, device=DEVICE))


def run_bad_cu_cases() -> int:
    """Every prefill op on every bad cu_seqlens, in this process; returns the number of failures."""
    failed = 0
    for op, algorithm in PREFILL_OPS:
        for name, cu, _ in BAD_CU:
            try:
                run_bad_cu_case(op, algorithm, name, cu)
            except Exception as e:  # report every case, not just the first
                failed += 1
                print(f"FAILED {op} {algorithm} {name}: {type(e).__name__}: {e}", flush=True)
    return failed


def test_raw_ops_survive_bad_cu_seqlens():
    """In a child process, so an out-of-bounds access that kills the process fails the test."""
    here = os.path.dirname(os.path.abspath(__file__))
    script = ("import sys; sys.path[:0] = [{0!r}, {1!r}]; import conftest, test_mamba_bad_inputs as t; "
              "sys.exit(min(t.run_bad_cu_cases(), 100))").format(here, os.path.dirname(here))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"


# ------------------------------------------------------------------------------- GPU, compiled
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("op,algorithm", OPS[:3], ids=OP_IDS[:3])
def test_gpu_decode_kv_and_repeated_handles_in_a_large_batch(op, algorithm):
    """1100 rows (more than one 1024-handle pass of the repeat scan): a KV handle at row 5, one SSM
    handle at rows 7 and 1090 (in different passes), the rest of the Env's blocks cycled through
    rows that are then -1 except for one row per block."""
    c = Case(op, algorithm, batch=N_BLOCKS - 1)
    n = 1100
    handles = torch.full((n,), -1, dtype=torch.int32, device="cuda")
    rows = torch.randperm(n, device="cuda")[:N_BLOCKS - 1]
    rows = rows[(rows != 5) & (rows != 7) & (rows != 1090)][:N_BLOCKS - 3]
    handles[rows] = c.handles[:len(rows)]
    handles[5] = c.kv[0]
    handles[7] = handles[1090] = c.handles[-1]
    c.handles = handles
    c.cu = torch.arange(n + 1, dtype=torch.int32, device="cuda")
    c.init = torch.ones(n, dtype=torch.int32, device="cuda")
    c.T = n
    c.inputs = INPUTS_OF[c.kind](c.env.spec, n, F32)
    before = c.env.alloc.arena.clone()
    got = c.raw(handles, c.nan_out())
    c.check(got, before, skipped=[5, 7, 1090] + (handles == -1).nonzero().flatten().tolist())
