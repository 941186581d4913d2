"""Mamba prefill ops (avmp_triton/ops/mamba_prefill.py) against the pure-torch references.

Each op runs over one packed chunk of requests with lengths 5, 1, 3 (skipped: handle -1), 17, 2
and two padding tokens past cu_seqlens[B]; the SSM blocks are scattered over an AVMPAllocator
arena full of random bytes (random state values in every live block), has_initial_state mixed.
Checks: outputs (NaN-poisoned, so every element must be written), final states in the arena,
every other byte of the arena unchanged; two chunks (the second continuing) == one chunk, also
with a compaction between the chunks that moves the live blocks.
"""
import dataclasses

import pytest
import torch

from avmp_triton import AVMPAllocator, HybridModelSpec, PagedCache
from avmp_triton.layout import ssm_block_layout
from avmp_triton.ops.mamba_prefill import (
    MambaPrefillConfig,
    causal_conv1d_prefill,
    mamba1_scan_prefill,
    mamba2_scan_prefill,
)
from avmp_triton.reference.mamba_prefill import (
    causal_conv1d_prefill_ref,
    mamba1_scan_prefill_ref,
    mamba2_scan_prefill_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LENS = [5, 1, 3, 17, 2]
SKIP = 2                     # request with handle -1
INIT = [1, 0, 1, 0, 1]       # len 5 and len 2 continue, len 1 and len 17 start from zeros
PAD = 2                      # packed tokens past cu_seqlens[B]
LAYER = 1
N_BLOCKS = 30

_BASE = dict(num_attn_layers=1, num_kv_heads=1, head_dim=8, kv_dtype=torch.float16, num_mamba_layers=2)
CONV_SPEC = HybridModelSpec(name="conv20", **_BASE, mamba_version=1, d_inner=20, d_state=4, d_conv=4)
M1_SPEC = HybridModelSpec(name="m1", **_BASE, mamba_version=1, d_inner=24, d_state=8, d_conv=4)
M2_SPEC = HybridModelSpec(name="m2", **_BASE, mamba_version=2, d_inner=32, mamba_num_heads=4,
                          mamba_head_dim=8, d_state=16, n_groups=2, d_conv=4)

F32, BF16 = torch.float32, torch.bfloat16
# (input dtype, state dtype)
DTYPES = [(F32, F32), (F32, BF16), (BF16, BF16)]
DT_IDS = ["in32-st32", "in32-st16", "in16-st16"]


def _tol(in_dtype, state_dtype, chunked=False):
    if in_dtype == BF16:
        return dict(atol=6e-2, rtol=4e-2) if chunked else dict(atol=3e-2, rtol=2e-2)
    if state_dtype == BF16:
        return dict(atol=2e-2, rtol=1e-2)
    return dict(atol=2e-4, rtol=2e-4)


# ------------------------------------------------------------------------------- fixtures
class Env:
    """An allocator with N_BLOCKS scattered SSM blocks of random states and random bytes elsewhere."""

    def __init__(self, spec: HybridModelSpec, state_dtype, ssm_slabs: int = 9, per_slab: int = 4):
        spec = dataclasses.replace(spec, conv_dtype=state_dtype, ssm_dtype=state_dtype)
        self.spec = spec
        self.layout = ssm_block_layout(spec)
        slab = -(-per_slab * spec.ssm_block_bytes // 128) * 128
        kv_slabs = 3
        self.alloc = AVMPAllocator(spec, (kv_slabs + ssm_slabs) * slab, device=DEVICE, slab_bytes=slab,
                                   kv_fraction=kv_slabs / (kv_slabs + ssm_slabs))
        a = self.alloc
        a.arena.copy_(torch.randint(0, 256, a.arena.shape, dtype=torch.uint8, device=DEVICE))
        # a few KV pages first, so SSM handles are not 0..n-1 either
        a.alloc_kv(3)
        self.blocks = a.alloc_ssm(N_BLOCKS)
        for h in self.blocks.tolist():
            self.fill_block(h)
        self.cache = PagedCache.of(a)   # a view: stays valid while the allocator moves blocks

    def view(self, arena, table=None, kinds=None, spec=True) -> PagedCache:
        """A PagedCache built by hand over ``arena`` (a copy of the allocator's) and the
        allocator's handle table and kinds (or the given copies): the spec's SSM layout and
        dtypes, the spec itself unless ``spec=False``."""
        return PagedCache(arena=arena, handle_table=self.alloc.handle_table if table is None else table,
                          handle_kinds=self.alloc.handle_kind if kinds is None else kinds,
                          ssm_layout=self.layout, ssm_dtype=self.spec.ssm_dtype, conv_dtype=self.spec.conv_dtype,
                          spec=self.spec if spec else None)

    def fill_block(self, h: int) -> None:
        """Random (finite, moderate) states in every layer of block ``h``."""
        off = int(self.alloc.handle_table[h])
        for layer in range(self.spec.num_mamba_layers):
            for start, nbytes, dt in (
                    (self.layout.ssm_offset(layer), self.layout.ssm_layer_bytes, self.spec.ssm_dtype),
                    (self.layout.conv_offset(layer), self.layout.conv_layer_bytes, self.spec.conv_dtype)):
                region = self.alloc.arena[off + start:off + start + nbytes].view(dt)
                region.copy_(torch.randn(region.numel(), device=DEVICE).to(dt))

    def batch(self, lens=LENS, init=INIT, skip=SKIP, pad=PAD, handles=None):
        """(ssm_handles, cu_seqlens, has_initial_state, T) with scattered handles."""
        if handles is None:
            pick = torch.randperm(N_BLOCKS, device="cpu")[:len(lens)]
            handles = self.blocks.cpu()[pick].clone()
            if skip is not None:
                handles[skip] = -1
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        return (handles.to(torch.int32).to(DEVICE), cu.to(DEVICE),
                torch.tensor(init, dtype=torch.int32, device=DEVICE), int(cu[-1]) + pad)

    def state_bytes(self, handles, kind: str, layer: int = LAYER) -> torch.Tensor:
        """Mask of the arena bytes the op may write: ``kind``'s layer state of each live handle."""
        mask = torch.zeros(self.alloc.arena.numel(), dtype=torch.bool, device=DEVICE)
        start = self.layout.conv_offset(layer) if kind == "conv" else self.layout.ssm_offset(layer)
        nbytes = self.layout.conv_layer_bytes if kind == "conv" else self.layout.ssm_layer_bytes
        for h in handles.tolist():
            if h >= 0:
                off = int(self.alloc.handle_table[h])
                mask[off + start:off + start + nbytes] = True
        return mask


def check_arena(env: Env, before, got, want, handles, kind: str, state_dtype, tol) -> None:
    """Untouched bytes exact; written states close to the reference's."""
    mask = env.state_bytes(handles, kind)
    assert torch.equal(got[~mask], before[~mask]), "bytes outside the written states changed"
    g = got[mask].view(state_dtype).float()
    w = want[mask].view(state_dtype).float()
    torch.testing.assert_close(g, w, **tol)
    assert not torch.equal(got[mask], before[mask]), "no state was written"


def rand(*shape, dtype=F32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def conv_inputs(spec, T, in_dtype, bias=True):
    C = spec.conv_channels
    return dict(x=rand(T, C, dtype=in_dtype), weight=rand(C, spec.d_conv, scale=0.5),
                bias=rand(C) if bias else None)


def m1_inputs(spec, T, in_dtype):
    Di, N = spec.d_inner, spec.d_state
    return dict(x=rand(T, Di, dtype=in_dtype), dt=rand(T, Di, dtype=in_dtype, scale=0.5),
                A=-torch.rand(Di, N, device=DEVICE) * 1.5 - 0.2, B=rand(T, N, dtype=in_dtype),
                C=rand(T, N, dtype=in_dtype), D=rand(Di), z=rand(T, Di, dtype=in_dtype), dt_bias=rand(Di, scale=0.5) - 1.0)


def m2_inputs(spec, T, in_dtype, G=None):
    H, P, N = spec.mamba_num_heads, spec.mamba_head_dim, spec.d_state
    G = spec.n_groups if G is None else G
    return dict(x=rand(T, H, P, dtype=in_dtype), dt=rand(T, H, dtype=in_dtype, scale=0.5),
                A=-torch.rand(H, device=DEVICE) * 1.5 - 0.2, B=rand(T, G, N, dtype=in_dtype),
                C=rand(T, G, N, dtype=in_dtype), D=rand(H), z=rand(T, H, P, dtype=in_dtype),
                dt_bias=rand(H, scale=0.5) - 1.0)


TOKEN_INPUTS = ("x", "dt", "B", "C", "z")


def _take(inputs: dict, idx: torch.Tensor) -> dict:
    """The tokens ``idx`` of the per-token inputs; parameters untouched."""
    return {k: (v[idx].contiguous() if k in TOKEN_INPUTS and v is not None else v) for k, v in inputs.items()}


# ------------------------------------------------------------------------------- ops, uniformly
# chunk sizes on the CPU: small, so LENS cross several chunk boundaries (Mamba2's tl.dot needs 16)
CPU_CHUNK = {"m1": 4, "m2": 16}


def run_op(kind, inputs, cache, handles, cu, init, *, out=None, algorithm="serial", activation="silu",
           chunk_size="cpu", dt_softplus=True):
    if kind == "conv":
        return causal_conv1d_prefill(inputs["x"], inputs["weight"], handles, cu, init, cache, layer=LAYER,
                                     bias=inputs["bias"], activation=activation, out=out)
    fn = mamba1_scan_prefill if kind == "m1" else mamba2_scan_prefill
    chunk = None if chunk_size is None else CPU_CHUNK[kind] if chunk_size == "cpu" else chunk_size
    return fn(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], handles, cu, init, cache,
              layer=LAYER, D=inputs["D"], z=inputs["z"], dt_bias=inputs["dt_bias"], dt_softplus=dt_softplus, out=out,
              config=MambaPrefillConfig(algorithm=algorithm, chunk_size=chunk))


def run_ref(kind, inputs, arena, table, handles, cu, init, spec, activation="silu", dt_softplus=True):
    if kind == "conv":
        return causal_conv1d_prefill_ref(inputs["x"], inputs["weight"], inputs["bias"], arena, table, handles,
                                         cu, init, spec, LAYER, activation=activation)
    fn = mamba1_scan_prefill_ref if kind == "m1" else mamba2_scan_prefill_ref
    return fn(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], arena, table, handles, cu, init,
              spec, LAYER, D=inputs["D"], z=inputs["z"], dt_bias=inputs["dt_bias"], dt_softplus=dt_softplus)


SPEC_OF = {"conv": CONV_SPEC, "m1": M1_SPEC, "m2": M2_SPEC}
INPUTS_OF = {"conv": conv_inputs, "m1": m1_inputs, "m2": m2_inputs}
STATE_KIND = {"conv": "conv", "m1": "ssm", "m2": "ssm"}
# (op, algorithm): both scans on both paths
CASES = [("conv", None), ("m1", "serial"), ("m1", "chunked"), ("m2", "serial"), ("m2", "chunked")]
CASE_IDS = ["conv", "mamba1-serial", "mamba1-chunked", "mamba2-serial", "mamba2-chunked"]


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("in_dtype,state_dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("kind,algorithm", CASES, ids=CASE_IDS)
def test_prefill_matches_reference(kind, algorithm, in_dtype, state_dtype):
    env = Env(SPEC_OF[kind], state_dtype)
    handles, cu, init, T = env.batch()
    inputs = INPUTS_OF[kind](env.spec, T, in_dtype)
    a = env.alloc
    before = a.arena.clone()
    ref_arena = a.arena.clone()
    want = run_ref(kind, inputs, ref_arena, a.handle_table, handles, cu, init, env.spec)
    out = torch.full_like(want, float("nan"))
    got = run_op(kind, inputs, env.cache, handles, cu, init, out=out, algorithm=algorithm)
    assert got is out
    tol = _tol(in_dtype, state_dtype, chunked=algorithm == "chunked")
    torch.testing.assert_close(got.float(), want.float(), **tol)
    s, e = int(cu[SKIP]), int(cu[SKIP + 1])
    assert torch.all(got[s:e] == 0) and torch.all(got[T - PAD:] == 0), "skipped / padding tokens not zero"
    check_arena(env, before, a.arena, ref_arena, handles, STATE_KIND[kind], state_dtype, tol)


@pytest.mark.parametrize("kind,algorithm", CASES, ids=CASE_IDS)
def test_two_chunks_equal_one(kind, algorithm):
    """Each request split in two (some parts empty); the second chunk continues from the blocks."""
    state_dtype = F32
    env = Env(SPEC_OF[kind], state_dtype)
    first = [2, 1, 0, 9, 0]
    second = [n - f for n, f in zip(LENS, first)]         # [3, 0, 3, 8, 2]
    handles, cu, init, T = env.batch(pad=0)
    inputs = INPUTS_OF[kind](env.spec, T, F32)
    a = env.alloc
    one_arena = a.arena.clone()
    want = run_op(kind, inputs, env.view(one_arena), handles, cu, init, algorithm=algorithm)

    # the same tokens, reordered into two packed chunks
    starts = cu.tolist()
    idx1 = torch.cat([torch.arange(starts[b], starts[b] + first[b]) for b in range(len(LENS))]).to(DEVICE)
    idx2 = torch.cat([torch.arange(starts[b] + first[b], starts[b + 1]) for b in range(len(LENS))]).to(DEVICE)
    in1, in2 = _take(inputs, idx1), _take(inputs, idx2)
    _, cu1, _, _ = env.batch(lens=first, handles=handles, pad=0)
    _, cu2, init2, _ = env.batch(lens=second, init=[1] * len(LENS), handles=handles, pad=0)
    y1 = run_op(kind, in1, env.cache, handles, cu1, init, algorithm=algorithm)
    y2 = run_op(kind, in2, env.cache, handles, cu2, init2, algorithm=algorithm)
    got = torch.empty_like(want)
    got[idx1] = y1
    got[idx2] = y2
    tol = dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(got, want, **tol)
    mask = env.state_bytes(handles, STATE_KIND[kind])
    assert torch.equal(a.arena[~mask], one_arena[~mask])
    torch.testing.assert_close(a.arena[mask].view(state_dtype), one_arena[mask].view(state_dtype), **tol)


@pytest.mark.parametrize("kind,algorithm", CASES, ids=CASE_IDS)
def test_compaction_between_chunks(kind, algorithm):
    """Free the other blocks and hand SSM slabs to the KV pool between two chunks: the live blocks
    move (table entries change) and the second chunk follows them. Outputs and blocks equal, bit for
    bit, the same two chunks run on a copy where nothing moved (the state is rounded to its dtype
    between chunks in both, so a bf16 state compares exactly)."""
    state_dtype = BF16 if kind == "m1" else F32
    env = Env(SPEC_OF[kind], state_dtype)
    a = env.alloc
    per_slab = a.units_per_slab[1]
    slab_of = lambda h: int(a.handle_table[h]) // a.slab_bytes  # noqa: E731
    while True:  # live blocks on more slabs than they need, so handing the rest over must move one
        handles, cu, init, T = env.batch(pad=0, skip=None)
        if len({slab_of(h) for h in handles.tolist()}) > -(-handles.numel() // per_slab):
            break
    inputs = INPUTS_OF[kind](env.spec, T, F32)
    first = [3, 1, 2, 10, 1]
    second = [n - f for n, f in zip(LENS, first)]
    starts = cu.tolist()
    idx1 = torch.cat([torch.arange(starts[b], starts[b] + first[b]) for b in range(len(LENS))]).to(DEVICE)
    idx2 = torch.cat([torch.arange(starts[b] + first[b], starts[b + 1]) for b in range(len(LENS))]).to(DEVICE)
    in1, in2 = _take(inputs, idx1), _take(inputs, idx2)
    _, cu1, _, _ = env.batch(lens=first, handles=handles, pad=0)
    _, cu2, init2, _ = env.batch(lens=second, init=[1] * len(LENS), handles=handles, pad=0)

    still_arena, still_table, still_kinds = a.arena.clone(), a.handle_table.clone(), a.handle_kind.clone()
    still = env.view(still_arena, still_table, still_kinds)
    w1 = run_op(kind, in1, still, handles, cu1, init, algorithm=algorithm)
    w2 = run_op(kind, in2, still, handles, cu2, init2, algorithm=algorithm)

    cache = env.cache   # taken before the compaction: the view follows the moved blocks
    y1 = run_op(kind, in1, cache, handles, cu1, init, algorithm=algorithm)
    live = set(handles.tolist())
    others = torch.tensor([h for h in env.blocks.tolist() if h not in live], dtype=torch.int32, device=DEVICE)
    a.free(others, "ssm")
    old = a.handle_table[handles.long()].clone()
    ssm_slabs = int((a.slab_owner == 1).sum())
    a.rebalance("kv", ssm_slabs - -(-len(live) // per_slab))
    moved = a.handle_table[handles.long()] != old
    assert bool(moved.any()), "compaction moved none of the live blocks"
    y2 = run_op(kind, in2, cache, handles, cu2, init2, algorithm=algorithm)

    assert torch.equal(y1, w1) and torch.equal(y2, w2)
    block = env.spec.ssm_block_bytes
    for h in handles.tolist():
        o_new, o_old = int(a.handle_table[h]), int(still_table[h])
        # the whole block moved with its handle: every layer, conv and ssm state
        assert torch.equal(a.arena[o_new:o_new + block], still_arena[o_old:o_old + block]), h


@pytest.mark.parametrize("d_conv", [2, 3])
def test_conv_other_widths_and_no_bias(d_conv):
    spec = dataclasses.replace(CONV_SPEC, d_conv=d_conv)
    env = Env(spec, F32)
    handles, cu, init, T = env.batch()
    inputs = conv_inputs(env.spec, T, F32, bias=False)
    a = env.alloc
    before, ref_arena = a.arena.clone(), a.arena.clone()
    want = run_ref("conv", inputs, ref_arena, a.handle_table, handles, cu, init, env.spec, activation=None)
    got = run_op("conv", inputs, env.cache, handles, cu, init, activation=None)
    tol = _tol(F32, F32)
    torch.testing.assert_close(got, want, **tol)
    check_arena(env, before, a.arena, ref_arena, handles, "conv", F32, tol)


def test_conv_short_request_keeps_older_rows():
    """A 1-token chunk after a state: the new state is [old row 1, old row 2, x]."""
    env = Env(CONV_SPEC, F32)
    handles, cu, init, T = env.batch(lens=[1], init=[1], skip=None, pad=0)
    inputs = conv_inputs(env.spec, T, F32)
    off = int(env.alloc.handle_table[int(handles[0])]) + env.layout.conv_offset(LAYER)
    state = env.alloc.arena[off:off + env.layout.conv_layer_bytes].view(F32).view(3, -1)
    old = state.clone()
    run_op("conv", inputs, env.cache, handles, cu, init)
    assert torch.equal(state[:2], old[1:]) and torch.equal(state[2], inputs["x"][0])


@pytest.mark.parametrize("block_t", [4, 16, 64])
def test_conv_many_token_blocks(block_t):
    """Requests of many token blocks, each worker striding over several: only worker 0 (block 0)
    reads and writes the state."""
    env = Env(CONV_SPEC, F32)
    handles, cu, init, T = env.batch(lens=[150, 3, 70, 65], init=[1, 1, 0, 1], skip=None, pad=1)
    inputs = conv_inputs(env.spec, T, F32)
    a = env.alloc
    before, ref_arena = a.arena.clone(), a.arena.clone()
    want = run_ref("conv", inputs, ref_arena, a.handle_table, handles, cu, init, env.spec)
    out = torch.full_like(want, float("nan"))
    got = causal_conv1d_prefill(inputs["x"], inputs["weight"], handles, cu, init, env.cache, layer=LAYER,
                                bias=inputs["bias"], activation="silu", out=out,
                                config=MambaPrefillConfig(block_t=block_t))
    assert got is out
    tol = _tol(F32, F32)
    torch.testing.assert_close(got, want, **tol)
    check_arena(env, before, a.arena, ref_arena, handles, "conv", F32, tol)


@pytest.mark.parametrize("G", [1, 4])
def test_mamba2_group_counts(G):
    """Groups other than the spec's (1 = shared B/C, 4 = one per head), bool has_initial_state. A
    cache with the spec holds B/C to the spec's groups; one of the layout and dtypes only (no
    spec) takes any group count that divides the heads."""
    env = Env(M2_SPEC, F32)
    handles, cu, init, T = env.batch()
    init = init.bool()
    inputs = m2_inputs(env.spec, T, F32, G=G)
    a = env.alloc
    with pytest.raises(ValueError, match=f"B has n_groups={G}; spec 'm2' has 2"):
        run_op("m2", inputs, env.view(a.arena.clone()), handles, cu, init)
    ref_arena = a.arena.clone()
    want = run_ref("m2", inputs, ref_arena, a.handle_table, handles, cu, init, env.spec)
    for algorithm in ("serial", "chunked"):
        arena = a.arena.clone()
        got = run_op("m2", inputs, env.view(arena, spec=False), handles, cu, init, algorithm=algorithm)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(arena.view(F32), ref_arena.view(F32), atol=2e-4, rtol=2e-4, equal_nan=True)


@pytest.mark.parametrize("kind,algorithm", CASES[1:], ids=CASE_IDS[1:])
def test_optional_inputs_absent(kind, algorithm):
    """No D, z, dt_bias; no softplus (the default; dt given positive)."""
    env = Env(SPEC_OF[kind], F32)
    handles, cu, init, T = env.batch()
    inputs = INPUTS_OF[kind](env.spec, T, F32)
    inputs.update(D=None, z=None, dt_bias=None)
    inputs["dt"] = inputs["dt"].abs()
    a = env.alloc
    ref_arena = a.arena.clone()
    fn_ref = mamba1_scan_prefill_ref if kind == "m1" else mamba2_scan_prefill_ref
    fn = mamba1_scan_prefill if kind == "m1" else mamba2_scan_prefill
    args = (inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"])
    want = fn_ref(*args, ref_arena, a.handle_table, handles, cu, init, env.spec, LAYER)
    got = fn(*args, handles, cu, init, env.cache, layer=LAYER,
             config=MambaPrefillConfig(algorithm=algorithm, chunk_size=CPU_CHUNK[kind]))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(a.arena.view(F32), ref_arena.view(F32), atol=2e-4, rtol=2e-4, equal_nan=True)


@pytest.mark.parametrize("kind,algorithm", CASES, ids=CASE_IDS)
def test_layout_instead_of_spec(kind, algorithm):
    """A cache of an SSMBlockLayout plus the state dtypes (no spec) addresses the same bytes as the spec's."""
    env = Env(SPEC_OF[kind], BF16)
    handles, cu, init, T = env.batch()
    inputs = INPUTS_OF[kind](env.spec, T, F32)
    a = env.alloc
    arena2 = a.arena.clone()
    want = run_op(kind, inputs, env.view(arena2), handles, cu, init, algorithm=algorithm)
    cache = PagedCache(arena=a.arena, handle_table=a.handle_table, handle_kinds=a.handle_kind, ssm_layout=env.layout,
                       ssm_dtype=BF16, conv_dtype=BF16)
    meta = (handles, cu, init, cache)
    if kind == "conv":
        got = causal_conv1d_prefill(inputs["x"], inputs["weight"], *meta, layer=LAYER, bias=inputs["bias"],
                                    activation="silu")
    else:
        fn = mamba1_scan_prefill if kind == "m1" else mamba2_scan_prefill
        got = fn(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], *meta, layer=LAYER,
                 D=inputs["D"], z=inputs["z"], dt_bias=inputs["dt_bias"], dt_softplus=True,
                 config=MambaPrefillConfig(algorithm=algorithm, chunk_size=CPU_CHUNK[kind]))
    assert torch.equal(got, want) and torch.equal(a.arena, arena2)


@pytest.mark.parametrize("kind,algorithm", CASES, ids=CASE_IDS)
def test_allocator_cache_matches_hand_built(kind, algorithm):
    """PagedCache.of(alloc) (what MambaStateOps(alloc) bound) == a cache built by hand over the
    allocator's tensors, the spec's layout and dtypes."""
    env = Env(SPEC_OF[kind], F32)
    handles, cu, init, T = env.batch()
    inputs = INPUTS_OF[kind](env.spec, T, F32)
    a = env.alloc
    arena2 = a.arena.clone()
    want = run_op(kind, inputs, env.view(arena2), handles, cu, init, algorithm=algorithm)
    cache = PagedCache.of(a)
    assert cache.arena is a.arena and cache.handle_table is a.handle_table and cache.handle_kinds is a.handle_kind
    assert cache.ssm_layout == env.layout and cache.spec is env.spec and cache.num_mamba_layers == 2
    meta = (handles, cu, init, cache)
    if kind == "conv":
        got = causal_conv1d_prefill(inputs["x"], inputs["weight"], *meta, layer=LAYER, bias=inputs["bias"],
                                    activation="silu")
    else:
        fn = mamba1_scan_prefill if kind == "m1" else mamba2_scan_prefill
        got = fn(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], *meta, layer=LAYER,
                 D=inputs["D"], z=inputs["z"], dt_bias=inputs["dt_bias"], dt_softplus=True,
                 config=MambaPrefillConfig(algorithm=algorithm, chunk_size=CPU_CHUNK[kind]))
    assert torch.equal(got, want) and torch.equal(a.arena, arena2)


@pytest.mark.parametrize("kind,launch", [("conv", dict(block_t=4, block=8, num_warps=1)),
                                         ("conv", dict(block_t=4, block=8, num_warps=1, stages=1)),
                                         ("conv", dict(block_t=32, block=16, num_warps=2)),
                                         ("m2", dict(block=16, num_warps=2)),
                                         ("m1", dict(block=4, num_warps=1))])
def test_launch_overrides(kind, launch):
    """Other launch shapes give the reference result (tiles smaller than the request / channels)."""
    env = Env(SPEC_OF[kind], F32)
    handles, cu, init, T = env.batch()
    inputs = INPUTS_OF[kind](env.spec, T, F32)
    a = env.alloc
    before, ref_arena = a.arena.clone(), a.arena.clone()
    want = run_ref(kind, inputs, ref_arena, a.handle_table, handles, cu, init, env.spec)
    meta = (handles, cu, init, env.cache)
    if kind == "conv":
        got = causal_conv1d_prefill(inputs["x"], inputs["weight"], *meta, layer=LAYER, bias=inputs["bias"],
                                    activation="silu", config=MambaPrefillConfig(**launch))
    else:
        fn = mamba1_scan_prefill if kind == "m1" else mamba2_scan_prefill
        got = fn(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], *meta, layer=LAYER,
                 D=inputs["D"], z=inputs["z"], dt_bias=inputs["dt_bias"], dt_softplus=True,
                 config=MambaPrefillConfig(algorithm="chunked", chunk_size=CPU_CHUNK[kind], **launch))
    tol = _tol(F32, F32)
    torch.testing.assert_close(got, want, **tol)
    check_arena(env, before, a.arena, ref_arena, handles, STATE_KIND[kind], F32, tol)


@pytest.mark.parametrize("algorithm", ["chunked", "serial"])
@pytest.mark.parametrize("chunk_size", [1, 2, 8, 32])
def test_mamba1_chunk_sizes(chunk_size, algorithm):
    """Every chunk size (serial: tokens unrolled per step) gives the reference result (17 tokens:
    full, partial and single chunks)."""
    env = Env(M1_SPEC, F32)
    handles, cu, init, T = env.batch()
    inputs = m1_inputs(env.spec, T, F32)
    a = env.alloc
    before, ref_arena = a.arena.clone(), a.arena.clone()
    want = run_ref("m1", inputs, ref_arena, a.handle_table, handles, cu, init, env.spec)
    got = run_op("m1", inputs, env.cache, handles, cu, init, algorithm=algorithm, chunk_size=chunk_size)
    tol = _tol(F32, F32)
    torch.testing.assert_close(got, want, **tol)
    check_arena(env, before, a.arena, ref_arena, handles, "ssm", F32, tol)


SEG_LENS = [40, 1, 3, 70, 2]   # with chunk 16: several chunks per segment, several segments per request


def _m2_segmented(inputs, cache, handles, cu, init, segment, out=None):
    return mamba2_scan_prefill(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], handles, cu, init,
                               cache, layer=LAYER, D=inputs["D"], z=inputs["z"], dt_bias=inputs["dt_bias"],
                               dt_softplus=True, out=out,
                               config=MambaPrefillConfig(algorithm="chunked", chunk_size=16, segment=segment))


@pytest.mark.parametrize("segment", [16, 32])
@pytest.mark.parametrize("in_dtype,state_dtype", [DTYPES[0], DTYPES[2]], ids=[DT_IDS[0], DT_IDS[2]])
def test_mamba2_segments_match_reference(segment, in_dtype, state_dtype):
    """The segmented chunked scan (segments in parallel, states passed between them): a skipped
    row (-1), a handle repeated in two rows (both skipped), a padded tail, mixed initial states."""
    env = Env(M2_SPEC, state_dtype)
    handles, cu, init, T = env.batch(lens=SEG_LENS, init=[1, 0, 1, 1, 0])
    handles[4] = handles[0]
    inputs = m2_inputs(env.spec, T, in_dtype)
    a = env.alloc
    before, ref_arena = a.arena.clone(), a.arena.clone()
    valid = handles.clone()
    valid[[0, 4]] = -1
    want = run_ref("m2", inputs, ref_arena, a.handle_table, valid, cu, init, env.spec)
    got = torch.full_like(want, float("nan"))
    i = inputs   # the custom op itself: the launcher refuses repeated handles on CPU-resident metadata
    torch.ops.avmp.mamba2_scan_prefill(i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], i["z"], i["dt_bias"],
                                       handles, cu, init, a.arena, a.handle_table, a.handle_kind, got,
                                       env.layout.ssm_offset(LAYER), state_dtype, True, True, 16, 16, 2, segment)
    tol = _tol(in_dtype, state_dtype, chunked=True)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    for b in (0, 2, 4):
        assert torch.all(got[int(cu[b]):int(cu[b + 1])] == 0), f"skipped row {b}: output not zero"
    assert torch.all(got[T - PAD:] == 0), "padding tokens not zero"
    check_arena(env, before, a.arena, ref_arena, valid, "ssm", state_dtype, tol)


def test_mamba2_segments_bad_cu_seqlens_stay_inside():
    """Overlapping and decreasing ranges (more segments than slots): outputs and states may be
    anything, but nothing outside x, out and the requests' own states is touched."""
    env = Env(M2_SPEC, F32)
    handles, cu, init, T = env.batch(lens=SEG_LENS, skip=None)
    cu = torch.tensor([0, T, 5, T, 0, T], dtype=torch.int32, device=DEVICE)
    inputs = m2_inputs(env.spec, T, F32)
    a = env.alloc
    before = a.arena.clone()
    out = torch.zeros_like(inputs["x"])
    i = inputs
    torch.ops.avmp.mamba2_scan_prefill(i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], i["z"], i["dt_bias"],
                                       handles, cu, init, a.arena, a.handle_table, a.handle_kind, out,
                                       env.layout.ssm_offset(LAYER), F32, True, True, 16, 16, 2, 16)
    mask = env.state_bytes(handles, "ssm")
    assert torch.equal(a.arena[~mask], before[~mask])


def test_mamba2_segments_two_chunks_equal_one():
    """Segmented, each request split in two packed chunks; the second continues from the blocks."""
    env = Env(M2_SPEC, F32)
    first = [20, 1, 0, 33, 0]
    second = [n - f for n, f in zip(SEG_LENS, first)]
    handles, cu, init, T = env.batch(lens=SEG_LENS, pad=0)
    inputs = m2_inputs(env.spec, T, F32)
    a = env.alloc
    one_arena = a.arena.clone()
    want = _m2_segmented(inputs, env.view(one_arena), handles, cu, init, 32)
    starts = cu.tolist()
    idx1 = torch.cat([torch.arange(starts[b], starts[b] + first[b]) for b in range(len(SEG_LENS))]).to(DEVICE)
    idx2 = torch.cat([torch.arange(starts[b] + first[b], starts[b + 1]) for b in range(len(SEG_LENS))]).to(DEVICE)
    _, cu1, _, _ = env.batch(lens=first, handles=handles, pad=0)
    _, cu2, init2, _ = env.batch(lens=second, init=[1] * len(SEG_LENS), handles=handles, pad=0)
    got = torch.empty_like(want)
    got[idx1] = _m2_segmented(_take(inputs, idx1), env.cache, handles, cu1, init, 16)
    got[idx2] = _m2_segmented(_take(inputs, idx2), env.cache, handles, cu2, init2, 32)
    tol = dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(got, want, **tol)
    mask = env.state_bytes(handles, "ssm")
    assert torch.equal(a.arena[~mask], one_arena[~mask])
    torch.testing.assert_close(a.arena[mask].view(F32), one_arena[mask].view(F32), **tol)


def test_mamba2_segment_rule():
    """The shape rule (the H100 sweep's Nemotron-H cells): segments of 1024 tokens only while the
    whole-request grid has fewer programs than the GPU has SMs."""
    from avmp_triton.ops.mamba_prefill import mamba2_segment

    assert mamba2_segment(4096, 1, 128, 1, 64, 132) == 1024      # 1 x 4096: 128 programs
    assert mamba2_segment(4096, 4, 128, 1, 64, 132) == 0         # 4 x 1024: 512 programs fill it
    assert mamba2_segment(8192, 16, 128, 1, 64, 132) == 0
    assert mamba2_segment(2048, 4, 128, 1, 64, 132) == 0         # 4 x 512 after a prefix
    assert mamba2_segment(16384, 1, 64, 2, 64, 132) == 1024      # 128 programs of two head_dim blocks
    assert mamba2_segment(1024, 1, 128, 1, 64, 132) == 0         # one segment would hold it all
    assert mamba2_segment(4096, 1, 128, 1, 64, 0) == 0           # the interpreter


def test_mamba1_and_conv_shape_rules():
    """Mamba1 "auto" and the serial tile, the conv tile: the picks that won every H100 sweep cell
    (Jamba d_inner 8192, d_state 16; conv over 10240 channels)."""
    from avmp_triton.ops.mamba_prefill import (
        conv1d_prefill_launch_config,
        mamba1_auto_chunked,
        mamba1_prefill_launch_config,
    )

    cells = [(1, 4096), (4, 4096), (16, 8192), (4, 2048)]     # (B, packed T): 1x4096, 4x1024, 16x512, 4x512
    assert [mamba1_auto_chunked(T, B) for B, T in cells] == [True, False, False, False]

    def serial(B):
        c = mamba1_prefill_launch_config(8192, 16, False, batch=B, sms=132)
        return c.algorithm, c.chunk_size, c.block, c.num_warps

    assert serial(1) == serial(4) == ("serial", 8, 16, 1)
    assert serial(16) == ("serial", 4, 32, 1)

    def conv(B, T):
        c = conv1d_prefill_launch_config(10240, 4, batch=B, tokens=T)
        return c.block_t, c.block, c.num_warps

    assert [conv(B, T) for B, T in cells] == [(8, 1024, 4), (8, 1024, 4), (8, 512, 2), (8, 512, 2)]


def test_custom_ops_registered_and_fake():
    """The ops are torch.ops.avmp.*, mutate out and arena, and trace under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name in ("causal_conv1d_prefill", "mamba1_scan_prefill", "mamba2_scan_prefill"):
        schema = getattr(torch.ops.avmp, name).default._schema
        mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert mutated == {"out", "arena"}, (name, mutated)
    env = Env(M2_SPEC, F32)
    handles, cu, init, T = env.batch()
    inputs = m2_inputs(env.spec, T, F32)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {k: (mode.from_tensor(v) if v is not None else None) for k, v in inputs.items()}
        arena = mode.from_tensor(env.alloc.arena)
        cache = env.view(arena, mode.from_tensor(env.alloc.handle_table), mode.from_tensor(env.alloc.handle_kind))
        y = run_op("m2", fake, cache, mode.from_tensor(handles), mode.from_tensor(cu), mode.from_tensor(init),
                   algorithm="chunked")
        assert y.shape == inputs["x"].shape and y.dtype == inputs["x"].dtype


@pytest.mark.parametrize("kind,algorithm", [("conv", None), ("m1", "chunked"), ("m2", "chunked")],
                         ids=["conv", "mamba1-chunked", "mamba2-chunked"])
def test_custom_op_opcheck(kind, algorithm):
    """torch.library.opcheck: schema (declared mutations), fake impl, autograd registration, AOT."""
    env = Env(SPEC_OF[kind], F32)
    handles, cu, init, T = env.batch()
    i = INPUTS_OF[kind](env.spec, T, F32)
    a = env.alloc
    out = torch.empty_like(i["x"])
    # metadata, then the arena, handle table, kinds and out, then the static arguments
    common = (handles, cu, init, a.arena, a.handle_table, a.handle_kind, out)
    if kind == "conv":
        op = torch.ops.avmp.causal_conv1d_prefill.default
        args = (i["x"], i["weight"], i["bias"], *common, env.layout.conv_offset(LAYER), F32, True, 32, 16, 4)
    else:
        op = (torch.ops.avmp.mamba1_scan_prefill if kind == "m1" else torch.ops.avmp.mamba2_scan_prefill).default
        args = (i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], i["z"], i["dt_bias"], *common,
                env.layout.ssm_offset(LAYER), F32, True) + ((True, 16, 16, 4) if kind == "m2" else (True, 4, 16, 4))
    torch.library.opcheck(op, args)


def _bad_calls():
    """(description, callable builder, expected error, match) for the launchers' validation."""
    env1, env2, envc = Env(M1_SPEC, F32), Env(M2_SPEC, F32), Env(CONV_SPEC, F32)
    cases = []

    def add(name, kind, env, mutate, err, match):
        cases.append((name, kind, env, mutate, err, match))

    add("layer out of range", "m1", env1, lambda c: c.update(layer=2), ValueError,
        r"layer must be an int in \[0, 2\) \(the cache's Mamba layers\), got 2")
    add("cu_seqlens length", "m1", env1, lambda c: c.update(cu=c["cu"][:-1]), ValueError, r"cu_seqlens .*got 5")
    add("cu_seqlens dtype", "conv", envc, lambda c: c.update(cu=c["cu"].long()), TypeError, r"cu_seqlens .*int64")
    add("handles dtype", "m2", env2, lambda c: c.update(handles=c["handles"].long()), TypeError,
        "ssm_handles must be torch.int32, got torch.int64")
    add("init length", "m2", env2, lambda c: c.update(init=c["init"][:-1]), ValueError, "has_initial_state")
    # a bad tensor or layout of the cache: PagedCache(...) raises (CACHE_ERRORS)
    add("arena dtype", "m1", env1, lambda c: c["cache"].update(arena=c["cache"]["arena"].view(torch.int32)), TypeError,
        "arena must be torch.uint8, got torch.int32")
    add("table dtype", "m1", env1, lambda c: c["cache"].update(handle_table=c["cache"]["handle_table"].int()),
        TypeError, "handle_table must be torch.int64, got torch.int32")
    add("x channels", "conv", envc, lambda c: c["inputs"].update(x=c["inputs"]["x"][:, :7].contiguous()), ValueError,
        r"x must have shape \(30, 20\), got \(30, 7\)")
    add("weight width", "conv", envc, lambda c: c["inputs"].update(weight=c["inputs"]["weight"][:, :3].contiguous()),
        ValueError, "weight")
    add("x non-contiguous", "m1", env1, lambda c: c["inputs"].update(x=c["inputs"]["x"].t().contiguous().t()),
        ValueError, "x must be contiguous")
    add("A shape", "m1", env1, lambda c: c["inputs"].update(A=c["inputs"]["A"][:, :3].contiguous()),
        ValueError, r"A must have shape \(24, 8\)")
    add("B tokens", "m1", env1, lambda c: c["inputs"].update(B=c["inputs"]["B"][1:]), ValueError, "B must")
    add("dt dtype", "m1", env1, lambda c: c["inputs"].update(dt=c["inputs"]["dt"].double()), TypeError, "dt")
    add("groups", "m2", env2,
        lambda c: c["inputs"].update(B=rand(30, 3, 16), C=rand(30, 3, 16)), ValueError, r"n_groups \(B.shape\[1\] = 3\)")
    add("head dim", "m2", env2, lambda c: c["inputs"].update(x=rand(30, 4, 7)), ValueError,
        r"4 \* 7 must equal the layout's d_inner \(32\)")
    add("out dtype", "m2", env2, lambda c: c.update(out=torch.empty(30, 4, 8, dtype=BF16, device=DEVICE)),
        TypeError, "out")
    add("out aliases x", "m2", env2, lambda c: c.update(out=c["inputs"]["x"]), ValueError, "share memory with x")
    add("algorithm", "m2", env2, lambda c: c.update(algorithm="fast"), ValueError, "algorithm .*got 'fast'")
    add("chunk size", "m2", env2, lambda c: c.update(chunk_size=24), ValueError, "chunk_size .*got 24")
    add("mamba2 chunk below 16", "m2", env2, lambda c: c.update(chunk_size=8), ValueError, r"chunk_size .*got 8")
    add("mamba1 algorithm", "m1", env1, lambda c: c.update(algorithm="parallel"), ValueError, "'parallel'")
    add("mamba1 chunk size", "m1", env1, lambda c: c.update(chunk_size=512), ValueError, r"chunk_size .*got 512")
    add("dt_softplus not bool", "m1", env1, lambda c: c.update(dt_softplus=1), TypeError, "dt_softplus")
    # an SSMBlockLayout without its state dtype (and no spec)
    add("layout without dtype", "m2", env2, lambda c: c["cache"].update(ssm_dtype=None, spec=None), TypeError,
        "ssm_dtype must be one of .* with an ssm_layout, got None")
    add("mamba1 op, mamba2 spec", "m1", env2, lambda c: None, ValueError, "this op is Mamba1")
    add("activation", "conv", envc, lambda c: c.update(activation="relu"), ValueError, "activation")
    env5 = Env(dataclasses.replace(CONV_SPEC, d_conv=5), F32)
    add("conv d_conv 5", "conv", env5, lambda c: None, ValueError, "d_conv must be at most 4.*got 5")
    add("conv block_t", "conv", envc, lambda c: c.update(launch=dict(block_t=2)), ValueError,
        r"block_t must be >= d_conv - 1 = 3, got 2")
    add("conv block_c", "conv", envc, lambda c: c.update(launch=dict(block=48)), ValueError,
        r"block must be a power of two >= 1, got 48")
    add("mamba2 block_p", "m2", env2, lambda c: c.update(algorithm="chunked", launch=dict(block=8)), ValueError,
        r"block must be >= 16 for the chunked scan \(tl.dot\), got 8")
    add("mamba1 num_warps", "m1", env1, lambda c: c.update(launch=dict(num_warps=3)), ValueError, r"num_warps .*got 3")
    add("mamba2 segment", "m2", env2, lambda c: c.update(algorithm="chunked", launch=dict(segment=24)), ValueError,
        r"segment must be 0 or a power of two >= chunk_size \(16\), got 24")
    add("mamba2 serial segment", "m2", env2, lambda c: c.update(launch=dict(segment=32)), ValueError,
        "segment is the chunked scan's")
    add("mamba1 segment", "m1", env1, lambda c: c.update(launch=dict(segment=32)), ValueError,
        "segment and stages are the Mamba2 scan's")
    add("mamba1 stages", "m1", env1, lambda c: c.update(launch=dict(stages=2)), ValueError,
        "segment and stages are the Mamba2 scan's")
    add("mamba2 serial stages", "m2", env2, lambda c: c.update(launch=dict(stages=2)), ValueError,
        "stages is the chunked scan's")
    add("mamba2 stages", "m2", env2, lambda c: c.update(algorithm="chunked", launch=dict(stages=5)), ValueError,
        r"stages must be an int in \[1, 4\], got 5")
    add("conv stages", "conv", envc, lambda c: c.update(launch=dict(stages=3)), ValueError,
        r"stages must be an int in \[1, 2\], got 3")
    return cases


CACHE_ERRORS = {"arena dtype", "table dtype", "layout without dtype"}


def test_launchers_validate():
    for name, kind, env, mutate, err, match in _bad_calls():
        handles, cu, init, T = env.batch()
        assert T == 30
        make = conv_inputs if kind == "conv" else (m1_inputs if env.spec.mamba_version == 1 else m2_inputs)
        inputs = make(env.spec, T, F32)
        a = env.alloc
        # the PagedCache keywords of a cache built by hand over the allocator's tensors
        cache_kw = dict(arena=a.arena, handle_table=a.handle_table, handle_kinds=a.handle_kind, ssm_layout=env.layout,
                        ssm_dtype=env.spec.ssm_dtype, conv_dtype=env.spec.conv_dtype, spec=env.spec)
        c = dict(inputs=inputs, cache=cache_kw, handles=handles, cu=cu,
                 init=init, layer=LAYER, out=None, algorithm="serial", chunk_size=16, activation="silu",
                 dt_softplus=True, launch={})
        mutate(c)
        before = a.arena.clone()
        i = c["inputs"]
        if name in CACHE_ERRORS:
            with pytest.raises(err, match=match):
                PagedCache(**c["cache"])
            assert torch.equal(a.arena, before), name
            continue
        cache = PagedCache(**c["cache"])
        with pytest.raises(err, match=match):
            meta = (c["handles"], c["cu"], c["init"], cache)
            if kind == "conv":
                causal_conv1d_prefill(i["x"], i["weight"], *meta, layer=c["layer"], bias=i["bias"],
                                      activation=c["activation"], out=c["out"],
                                      config=MambaPrefillConfig(**c["launch"]))
            else:
                fn = mamba1_scan_prefill if kind == "m1" else mamba2_scan_prefill
                fn(i["x"], i["dt"], i["A"], i["B"], i["C"], *meta, layer=c["layer"], D=i["D"], z=i["z"],
                   dt_bias=i["dt_bias"], dt_softplus=c["dt_softplus"], out=c["out"],
                   config=MambaPrefillConfig(algorithm=c["algorithm"], chunk_size=c["chunk_size"], **c["launch"]))
        assert torch.equal(a.arena, before), name


# ------------------------------------------------------------------------------- GPU, real sizes
GPU_LENS = [1000, 517, 3, 528]          # T = 2048
JAMBA = HybridModelSpec(name="jamba-like", num_attn_layers=1, num_kv_heads=8, head_dim=128, num_mamba_layers=2,
                        mamba_version=1, d_inner=8192, d_state=16, d_conv=4)
NEMOTRON = HybridModelSpec(name="nemotron-h-like", num_attn_layers=1, num_kv_heads=8, head_dim=128,
                           num_mamba_layers=2, mamba_version=2, d_inner=8192, mamba_num_heads=128,
                           mamba_head_dim=64, d_state=128, n_groups=8, d_conv=4)


def _gpu_env(spec, capacity, kv_fraction, device="cuda", lens=GPU_LENS, **kw):
    a = AVMPAllocator(spec, capacity, device=device, kv_fraction=kv_fraction, **kw)
    hs = a.alloc_ssm(16)
    handles = hs[torch.randperm(16, device=device)[:len(lens)]].clone()
    lay = ssm_block_layout(spec)
    for h in hs.tolist():
        off = int(a.handle_table[h])
        for layer in range(spec.num_mamba_layers):
            for start, nbytes, dt in ((lay.ssm_offset(layer), lay.ssm_layer_bytes, spec.ssm_dtype),
                                      (lay.conv_offset(layer), lay.conv_layer_bytes, spec.conv_dtype)):
                r = a.arena[off + start:off + start + nbytes].view(dt)
                r.copy_(torch.randn(r.numel(), device=device).to(dt))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    init = torch.tensor([1, 0, 1, 1], dtype=torch.int32, device=device)
    return a, handles, cu, init


def _close_rel(got, want, rel):
    """bf16 at real sizes: relative error of the whole tensor (elementwise bounds are meaningless
    where long sums cancel), plus a loose elementwise bound for gross local errors."""
    g, w = got.float(), want.float()
    err = ((g - w).norm() / w.norm().clamp_min(1e-6)).item()
    assert err < rel, f"relative error {err:.3g} >= {rel}"
    torch.testing.assert_close(g, w, atol=0.5, rtol=0.1)


def _gpu_check(kind, spec, a, handles, cu, init, inputs, algorithm, tol):
    T = int(cu[-1])
    before = a.arena.clone()
    ref_arena = a.arena.clone()
    want = run_ref(kind, inputs, ref_arena, a.handle_table, handles, cu, init, spec)
    out = torch.full_like(want, float("nan"))
    got = run_op(kind, inputs, PagedCache.of(a), handles, cu, init, out=out, algorithm=algorithm,
                 chunk_size=64 if kind == "m2" else None)
    assert got.shape[0] == T and not got.isnan().any()
    _close_rel(got, want, tol)
    lay = ssm_block_layout(spec)
    start, nbytes = ((lay.conv_offset(LAYER), lay.conv_layer_bytes) if kind == "conv"
                     else (lay.ssm_offset(LAYER), lay.ssm_layer_bytes))
    dt = spec.conv_dtype if kind == "conv" else spec.ssm_dtype
    mask = torch.zeros(a.arena.numel(), dtype=torch.bool, device=a.arena.device)
    for h in handles.tolist():
        off = int(a.handle_table[h])
        mask[off + start:off + start + nbytes] = True
        _close_rel(a.arena[off + start:off + start + nbytes].view(dt), ref_arena[off + start:off + start + nbytes].view(dt),
                   tol)
    assert torch.equal(a.arena[~mask], before[~mask])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("algorithm", ["serial", "chunked"])
def test_gpu_jamba_conv_and_scan(algorithm):
    a, handles, cu, init = _gpu_env(JAMBA, 256 << 20, 0.5)
    T = int(cu[-1])
    tol = 1e-2
    if algorithm == "serial":
        _gpu_check("conv", JAMBA, a, handles, cu, init, conv_inputs(JAMBA, T, BF16), None, tol)
    _gpu_check("m1", JAMBA, a, handles, cu, init, m1_inputs(JAMBA, T, BF16), algorithm, tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("algorithm", ["serial", "chunked"])
def test_gpu_nemotron_conv_and_scan_over_4gib(algorithm):
    """Blocks past 4 GiB in the arena (int64 addressing): the SSM pool is the top 5 % of 4.5 GiB."""
    a, handles, cu, init = _gpu_env(NEMOTRON, (9 << 30) // 2, 0.95)
    assert int(a.handle_table[handles.long()].min()) >= 1 << 32
    T = int(cu[-1])
    tol = 2e-2
    if algorithm == "serial":
        _gpu_check("conv", NEMOTRON, a, handles, cu, init, conv_inputs(NEMOTRON, T, BF16), None, tol)
    _gpu_check("m2", NEMOTRON, a, handles, cu, init, m2_inputs(NEMOTRON, T, BF16), algorithm, tol)
