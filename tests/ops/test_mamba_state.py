"""Decode-time Mamba ops (avmp_triton/ops/mamba_state.py) against the pure-torch references.

Every state lives in an SSM block of a real AVMPAllocator: handles are scattered over a larger
pool with torch.randperm, one row of the batch is -1, the layer is never 0, the arena is random
everywhere (blocks hold random states, the rest random bytes). Each test checks the output
(NaN-poisoned beforehand), the state mutated in the arena, and that every other byte of the
arena (other requests, other layers, skipped rows, the KV pool) is bit-for-bit unchanged.
On CPU the kernels run in Triton's interpreter, whose fp32 -> bf16 cast truncates where a GPU
rounds to nearest: bf16 tolerances cover one ulp.
"""
import dataclasses
import random

import pytest
import torch

from avmp_triton import AVMPAllocator, HybridModelSpec, InvalidHandleError, PagedCache, get_preset
from avmp_triton.layout import ssm_block_layout
from avmp_triton.ops.mamba_state import (
    MambaStateConfig,
    causal_conv1d_update,
    mamba1_state_update,
    mamba2_state_update,
)
from avmp_triton.reference import mamba_state as R

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) by the lower-precision dtype involved. Outputs get more room in bf16: a one-ulp
# difference in a bf16 state of the previous step moves an output by up to ulp * |C| * silu(z).
TOL = {torch.float32: (2e-4, 2e-4), torch.bfloat16: (6e-2, 2e-2)}
OUT_TOL = {torch.float32: (2e-4, 2e-4), torch.bfloat16: (1e-1, 2e-2)}


@pytest.fixture
def seed():
    """Fresh random inputs every run; the seed is printed so a failure can be replayed."""
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    torch.manual_seed(seed)
    return seed


def mamba1_spec(ssm_dtype=torch.float32, conv_dtype=torch.bfloat16, d_inner=48, d_conv=4):
    return HybridModelSpec(name="m1-tiny", num_attn_layers=1, num_kv_heads=1, head_dim=16,
                           num_mamba_layers=3, mamba_version=1, d_inner=d_inner, d_state=16,
                           d_conv=d_conv, ssm_dtype=ssm_dtype, conv_dtype=conv_dtype)


def mamba2_spec(ssm_dtype=torch.float32, conv_dtype=torch.bfloat16):
    # 6 heads x 16, d_state 32, 2 groups of 3 heads; conv channels 96 + 2 * 2 * 32 = 224
    return HybridModelSpec(name="m2-tiny", num_attn_layers=1, num_kv_heads=1, head_dim=16,
                           num_mamba_layers=3, mamba_version=2, d_inner=96, mamba_num_heads=6,
                           mamba_head_dim=16, d_state=32, n_groups=2, ssm_dtype=ssm_dtype,
                           conv_dtype=conv_dtype)


def make_pool(spec, *, per_slab=4, slabs=8, live=12, kv_fraction=0.5):
    """An allocator whose SSM pool holds ``live`` blocks, every byte of the arena random."""
    slab = -(-spec.ssm_block_bytes * per_slab // 128) * 128
    alloc = AVMPAllocator(spec, slabs * slab + 77, device=DEVICE, slab_bytes=slab, kv_fraction=kv_fraction)
    alloc.arena.copy_(torch.randint(0, 256, alloc.arena.shape, dtype=torch.uint8, device=DEVICE))
    handles = alloc.alloc_ssm(live)
    fill_states(alloc, handles)
    return alloc, handles


def fill_states(alloc, handles):
    spec, lay = alloc.spec, ssm_block_layout(alloc.spec)
    n = handles.numel()
    for layer in range(spec.num_mamba_layers):
        R.scatter_ssm_state(alloc.arena, alloc.handle_table, handles, lay, layer,
                            torch.randn(n, spec.d_inner, spec.d_state, device=DEVICE).to(spec.ssm_dtype))
        R.scatter_conv_state(alloc.arena, alloc.handle_table, handles, lay, layer,
                             torch.randn(n, spec.d_conv - 1, spec.conv_channels, device=DEVICE).to(spec.conv_dtype))


def batch_handles(live, batch):
    """``batch`` handles drawn at random from ``live``; the middle row is -1 when batch >= 3."""
    h = live[torch.randperm(live.numel(), device=live.device)[:batch]].clone()
    if batch >= 3:
        h[batch // 2] = -1
    return h


def touched_ranges(alloc, handles, byte_off, nbytes):
    offs = R._offsets(alloc.handle_table, handles)
    return [(o + byte_off, o + byte_off + nbytes) for o in offs if o >= 0]


def assert_untouched(before, after, ranges):
    """Every byte outside ``ranges`` is unchanged. Patches ``before`` (a clone) in place rather than
    building masks, so a multi-GiB arena needs no extra copies."""
    for s, e in ranges:
        before[s:e] = after[s:e]
    assert torch.equal(before, after), "bytes outside the updated states changed"


def close(got, want, dtype, what):
    atol, rtol = (OUT_TOL if what == "out" else TOL)[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def nan_like(t):
    return torch.full_like(t, float("nan"))


# --------------------------------------------------------------------------------------- inputs

def mamba1_inputs(spec, batch, dtype, *, D=True, z=True, bias=True):
    d, n = spec.d_inner, spec.d_state
    kw = dict(
        x=torch.randn(batch, d, device=DEVICE, dtype=dtype),
        dt=torch.randn(batch, d, device=DEVICE, dtype=dtype),
        A=-torch.rand(d, n, device=DEVICE) - 0.5,
        B=torch.randn(batch, n, device=DEVICE, dtype=dtype),
        C=torch.randn(batch, n, device=DEVICE, dtype=dtype),
        D=torch.randn(d, device=DEVICE) if D else None,
        z=torch.randn(batch, d, device=DEVICE, dtype=dtype) if z else None,
        dt_bias=torch.rand(d, device=DEVICE) - 2.0 if bias else None,
    )
    return kw


def mamba2_inputs(spec, batch, dtype, *, strided=False, D=True, z=True, bias=True):
    h, p, n, g = spec.mamba_num_heads, spec.mamba_head_dim, spec.d_state, spec.n_groups
    if strided:
        # x, B and C as views into one xBC row, as a model splits its projection
        xbc = torch.randn(batch, h * p + 2 * g * n + 8, device=DEVICE, dtype=dtype)
        x = xbc[:, :h * p].view(batch, h, p)
        B = xbc[:, h * p:h * p + g * n].view(batch, g, n)
        C = xbc[:, h * p + g * n:h * p + 2 * g * n].view(batch, g, n)
        assert not x.is_contiguous()
    else:
        x = torch.randn(batch, h, p, device=DEVICE, dtype=dtype)
        B = torch.randn(batch, g, n, device=DEVICE, dtype=dtype)
        C = torch.randn(batch, g, n, device=DEVICE, dtype=dtype)
    return dict(
        x=x, dt=torch.randn(batch, h, device=DEVICE, dtype=dtype), A=-torch.rand(h, device=DEVICE) - 0.5,
        B=B, C=C, D=torch.randn(h, device=DEVICE) if D else None,
        z=torch.randn(batch, h, p, device=DEVICE, dtype=dtype) if z else None,
        dt_bias=torch.rand(h, device=DEVICE) - 2.0 if bias else None,
    )


def conv_inputs(spec, batch, dtype, *, bias=True):
    c = spec.conv_channels
    return dict(x=torch.randn(batch, c, device=DEVICE, dtype=dtype),
                weight=torch.randn(spec.conv_channels, spec.d_conv, device=DEVICE, dtype=dtype),
                bias=torch.randn(c, device=DEVICE, dtype=dtype) if bias else None)


def ssm_shape(spec):
    if spec.mamba_version == 1:
        return (spec.d_inner, spec.d_state)
    return (spec.mamba_num_heads, spec.mamba_head_dim, spec.d_state)


# --------------------------------------------------------------------------------------- one step

INPUT_KEYS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def gather_ssm(alloc, handles, layer):
    return R.gather_ssm_state(alloc.arena, alloc.handle_table, handles, ssm_block_layout(alloc.spec), layer,
                              alloc.spec.ssm_dtype, ssm_shape(alloc.spec))


def valid_of(alloc, handles):
    return R.valid_rows(alloc.handle_table, handles)


def run_ssm_step(alloc, handles, layer, inp, *, softplus=True, use_out=True, config=None, cache=None):
    """Run the kernel and the reference for one step; check out, state and untouched bytes.
    The reference starts from the state the kernel left in the arena (gathered), so each step's
    tolerance covers one step of rounding. ``cache`` defaults to ``PagedCache.of(alloc)``.
    Returns (the reference's new state, the kernel's output)."""
    spec, lay = alloc.spec, ssm_block_layout(alloc.spec)
    cache = PagedCache.of(alloc) if cache is None else cache
    op = mamba1_state_update if spec.mamba_version == 1 else mamba2_state_update
    ref = R.mamba1_state_update_ref if spec.mamba_version == 1 else R.mamba2_state_update_ref
    valid = R.valid_rows(alloc.handle_table, handles)
    before = alloc.arena.clone()
    prev = gather_ssm(alloc, handles, layer)
    out = nan_like(inp["x"]) if use_out else None
    got = op(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], handles, cache, layer=layer, D=inp["D"],
             z=inp["z"], dt_bias=inp["dt_bias"], dt_softplus=softplus, out=out, config=config)
    if use_out:
        assert got is out
    assert got.shape == inp["x"].shape and got.dtype == inp["x"].dtype
    want_out, want_state = ref(prev, inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"],
                               inp["z"], inp["dt_bias"], softplus, valid=valid)
    low = torch.bfloat16 if torch.bfloat16 in (spec.ssm_dtype, inp["x"].dtype) else torch.float32
    assert not got.isnan().any(), "an output element was not written"
    close(got, want_out, low, "out")
    assert torch.equal(got[~valid], torch.zeros_like(got[~valid])), "skipped rows must be zeros"
    state = gather_ssm(alloc, handles, layer)
    close(state[valid], want_state[valid], spec.ssm_dtype, "state")
    assert_untouched(before, alloc.arena,
                     touched_ranges(alloc, handles, lay.ssm_offset(layer), lay.ssm_layer_bytes))
    return want_state, got


def run_conv_step(alloc, handles, layer, inp, activation="silu", use_out=True, config=None, cache=None):
    spec, lay = alloc.spec, ssm_block_layout(alloc.spec)
    cache = PagedCache.of(alloc) if cache is None else cache
    valid = R.valid_rows(alloc.handle_table, handles)
    before = alloc.arena.clone()
    prev = R.gather_conv_state(alloc.arena, alloc.handle_table, handles, lay, layer, spec.conv_dtype)
    out = nan_like(inp["x"]) if use_out else None
    got = causal_conv1d_update(inp["x"], inp["weight"], handles, cache, layer=layer, bias=inp["bias"],
                               activation=activation, out=out, config=config)
    if use_out:
        assert got is out
    want_out, want_state = R.causal_conv1d_update_ref(prev, inp["x"], inp["weight"], inp["bias"],
                                                      activation, valid=valid)
    low = torch.bfloat16 if torch.bfloat16 in (spec.conv_dtype, inp["x"].dtype) else torch.float32
    assert not got.isnan().any(), "an output element was not written"
    close(got, want_out, low, "out")
    assert torch.equal(got[~valid], torch.zeros_like(got[~valid])), "skipped rows must be zeros"
    state = R.gather_conv_state(alloc.arena, alloc.handle_table, handles, lay, layer, spec.conv_dtype)
    # the kept rows move up bit for bit; the appended row is x in the conv dtype
    assert torch.equal(state[valid][:, :-1], prev[valid][:, 1:]), "shifted conv rows changed"
    close(state[valid], want_state[valid], spec.conv_dtype, "conv state")
    assert_untouched(before, alloc.arena,
                     touched_ranges(alloc, handles, lay.conv_offset(layer), lay.conv_layer_bytes))
    return want_state, got


# --------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("ssm_dtype,in_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.float32, torch.bfloat16)])
def test_mamba1_two_steps(seed, batch, ssm_dtype, in_dtype):
    alloc, live = make_pool(mamba1_spec(ssm_dtype))
    handles = batch_handles(live, batch)
    layer = 1
    chained = gather_ssm(alloc, handles, layer)
    for _ in range(2):
        inp = mamba1_inputs(alloc.spec, batch, in_dtype)
        run_ssm_step(alloc, handles, layer, inp)
        _, chained = R.mamba1_state_update_ref(chained, *[inp[k] for k in INPUT_KEYS], True)
    if ssm_dtype == torch.float32:  # two kernel steps = two reference steps (bf16 re-rounds each step)
        close(gather_ssm(alloc, handles, layer)[valid_of(alloc, handles)], chained[valid_of(alloc, handles)],
              torch.float32, "state after two steps")


@pytest.mark.parametrize("opts", [dict(D=False, z=False, bias=False, softplus=False),
                                  dict(D=True, z=False, bias=True, softplus=True, use_out=False),
                                  dict(config=MambaStateConfig(block=16, num_warps=2))])
def test_mamba1_options(seed, opts):
    opts = dict(opts)
    flags = {k: opts.pop(k) for k in ("D", "z", "bias") if k in opts}
    alloc, live = make_pool(mamba1_spec())
    handles = batch_handles(live, 4)
    layer = 2
    run_ssm_step(alloc, handles, layer, mamba1_inputs(alloc.spec, 4, torch.float32, **flags), **opts)


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("ssm_dtype,in_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.float32, torch.bfloat16)])
def test_mamba2_two_steps(seed, batch, ssm_dtype, in_dtype):
    alloc, live = make_pool(mamba2_spec(ssm_dtype))
    handles = batch_handles(live, batch)
    layer = 2
    chained = gather_ssm(alloc, handles, layer)
    for _ in range(2):
        inp = mamba2_inputs(alloc.spec, batch, in_dtype)
        run_ssm_step(alloc, handles, layer, inp)
        _, chained = R.mamba2_state_update_ref(chained, *[inp[k] for k in INPUT_KEYS], True)
    if ssm_dtype == torch.float32:  # two kernel steps = two reference steps (bf16 re-rounds each step)
        close(gather_ssm(alloc, handles, layer)[valid_of(alloc, handles)], chained[valid_of(alloc, handles)],
              torch.float32, "state after two steps")


@pytest.mark.parametrize("opts", [dict(strided=True),
                                  dict(D=False, z=False, bias=False, softplus=False, use_out=False),
                                  dict(config=MambaStateConfig(block=4, num_warps=1))])
def test_mamba2_options(seed, opts):
    opts = dict(opts)
    flags = {k: opts.pop(k) for k in ("D", "z", "bias", "strided") if k in opts}
    alloc, live = make_pool(mamba2_spec())
    handles = batch_handles(live, 5)
    layer = 1
    run_ssm_step(alloc, handles, layer, mamba2_inputs(alloc.spec, 5, torch.float32, **flags), **opts)


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("conv_dtype,in_dtype,d_conv", [(torch.bfloat16, torch.bfloat16, 4), (torch.float32, torch.float32, 4),
                                                        (torch.bfloat16, torch.float32, 3)])
def test_conv1d_two_steps(seed, batch, conv_dtype, in_dtype, d_conv):
    alloc, live = make_pool(mamba1_spec(conv_dtype=conv_dtype, d_inner=40, d_conv=d_conv))
    handles = batch_handles(live, batch)
    layer = 1
    for _ in range(2):
        run_conv_step(alloc, handles, layer, conv_inputs(alloc.spec, batch, in_dtype))


@pytest.mark.parametrize("opts", [dict(activation=None, bias=False),
                                  dict(config=MambaStateConfig(block=16, num_warps=1), use_out=False)])
def test_conv1d_options_mamba2_channels(seed, opts):
    opts = dict(opts)
    bias = opts.pop("bias", True)
    alloc, live = make_pool(mamba2_spec())
    handles = batch_handles(live, 4)
    layer = 2
    run_conv_step(alloc, handles, layer, conv_inputs(alloc.spec, 4, torch.bfloat16, bias=bias), **opts)


def test_skips_freed_and_out_of_range_handles(seed, device_checks_only):
    """A handle freed since the batch was built (table entry -1) or past the table is skipped like -1."""
    alloc, live = make_pool(mamba2_spec())
    handles = batch_handles(live, 5)
    gone = int(handles[0])
    alloc.free(handles[:1])
    handles[-1] = alloc.handle_table.numel() + 3
    assert int(alloc.handle_table[gone]) == -1
    valid = R.valid_rows(alloc.handle_table, handles)
    assert valid.tolist() == [False, True, False, True, False]
    run_ssm_step(alloc, handles, 1, mamba2_inputs(alloc.spec, 5, torch.float32))
    run_conv_step(alloc, handles, 1, conv_inputs(alloc.spec, 5, torch.bfloat16))


@pytest.mark.skipif(DEVICE != "cpu", reason="host checks run on CPU-resident metadata only")
def test_host_check_names_freed_and_out_of_range_handles(seed):
    alloc, live = make_pool(mamba2_spec())
    handles = batch_handles(live, 5)
    inp = conv_inputs(alloc.spec, 5, torch.bfloat16)
    alloc.free(handles[:1])
    cache = PagedCache.of(alloc)
    before = alloc.arena.clone()
    with pytest.raises(InvalidHandleError, match=rf"ssm_handles\[0\] = {int(handles[0])} is not allocated"):
        causal_conv1d_update(inp["x"], inp["weight"], handles, cache, layer=1)
    handles[0] = -1
    handles[-1] = alloc.handle_table.numel() + 3
    with pytest.raises(InvalidHandleError, match=rf"ssm_handles\[4\] = {int(handles[-1])} is out of range"):
        causal_conv1d_update(inp["x"], inp["weight"], handles, cache, layer=1)
    assert torch.equal(before, alloc.arena)


def test_empty_batch():
    alloc, _ = make_pool(mamba1_spec(), live=1)
    empty = torch.empty(0, dtype=torch.int32, device=DEVICE)
    inp = mamba1_inputs(alloc.spec, 0, torch.float32)
    before = alloc.arena.clone()
    out = mamba1_state_update(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], empty, PagedCache.of(alloc), layer=1)
    assert out.shape == (0, 48) and torch.equal(before, alloc.arena)


def test_migration_between_steps(seed):
    """Compact the SSM pool between two steps: live blocks are copied to new places, handles stay.
    Step 2 on the migrated arena, through a cache view built before the rebalance, gives
    bit-identical results to step 2 on an unmigrated copy."""
    spec = mamba2_spec(torch.bfloat16)
    alloc, live = make_pool(spec, per_slab=4, slabs=8, live=16)    # the SSM pool is full: 4 slabs x 4
    assert alloc.stats().pools["ssm"].free_units == 0
    # free 2 blocks of every slab so no slab is empty: moving capacity must compact
    offs = alloc.handle_table[live.long()]
    slab = offs // alloc.slab_bytes
    drop = torch.cat([torch.nonzero(slab == s).flatten()[torch.randperm(4, device=DEVICE)[:2]] for s in slab.unique()])
    keep = torch.tensor([i for i in range(16) if i not in set(drop.tolist())], device=DEVICE)
    alloc.free(live[drop])
    live = live[keep]
    handles = live[torch.randperm(live.numel(), device=DEVICE)]
    handles = torch.cat([handles[:4], torch.tensor([-1], dtype=torch.int32, device=DEVICE), handles[4:]])
    lay = ssm_block_layout(spec)
    layer = 1
    batch = handles.numel()
    cache = PagedCache.of(alloc)    # one view for both steps: the rebalance must not invalidate it

    # step 1
    run_conv_step(alloc, handles, layer, conv_inputs(spec, batch, torch.bfloat16), cache=cache)
    run_ssm_step(alloc, handles, layer, mamba2_inputs(spec, batch, torch.bfloat16), cache=cache)

    # migrate: two SSM slabs go to the KV pool; their live blocks are copied
    twin_arena, twin_table = alloc.arena.clone(), alloc.handle_table.clone()
    old = alloc.handle_table[live.long()].clone()
    alloc.rebalance("kv", 2)
    new = alloc.handle_table[live.long()]
    assert alloc.stats().units_moved > 0 and bool((old != new).any()), "no live block moved"
    assert alloc.stats().pools["ssm"].slabs == 2
    for o, n in zip(old.tolist(), new.tolist()):
        assert torch.equal(alloc.arena[n:n + spec.ssm_block_bytes], twin_arena[o:o + spec.ssm_block_bytes])

    # step 2 on both, identical inputs: bit-identical outputs and states
    xc = conv_inputs(spec, batch, torch.bfloat16)
    x2 = mamba2_inputs(spec, batch, torch.bfloat16)
    assert cache.arena is alloc.arena and cache.handle_table is alloc.handle_table
    _, got_c = run_conv_step(alloc, handles, layer, xc, cache=cache)
    _, got_s = run_ssm_step(alloc, handles, layer, x2, cache=cache)
    twin = dataclasses.replace(cache, arena=twin_arena, handle_table=twin_table)
    twin_c = causal_conv1d_update(xc["x"], xc["weight"], handles, twin, layer=layer, bias=xc["bias"],
                                  activation="silu")
    twin_s = mamba2_state_update(x2["x"], x2["dt"], x2["A"], x2["B"], x2["C"], handles, twin, layer=layer,
                                 D=x2["D"], z=x2["z"], dt_bias=x2["dt_bias"], dt_softplus=True)
    assert torch.equal(got_c, twin_c) and torch.equal(got_s, twin_s)
    for gather, dtype, shape in ((R.gather_ssm_state, spec.ssm_dtype, (ssm_shape(spec),)),
                                 (R.gather_conv_state, spec.conv_dtype, ())):
        mine = gather(alloc.arena, alloc.handle_table, handles, lay, layer, dtype, *shape)
        twins = gather(twin_arena, twin_table, handles, lay, layer, dtype, *shape)
        assert torch.equal(mine, twins)


# --------------------------------------------------------------------------------------- validation

def cache_fields(cache):
    """The keyword arguments that rebuild ``cache`` by hand."""
    return {f.name: getattr(cache, f.name) for f in dataclasses.fields(PagedCache)}


def _m1_args():
    spec = mamba1_spec()
    alloc, live = make_pool(spec, live=4)
    inp = mamba1_inputs(spec, 3, torch.float32)
    h = live[:3].clone()
    args = dict(ssm_handles=h, cache=PagedCache.of(alloc), layer=1, **inp)
    return alloc, args


def _call_m1(args, **kw):
    a = dict(args)
    a.update(kw)
    pos = [a.pop(n) for n in ("x", "dt", "A", "B", "C", "ssm_handles", "cache")]
    return mamba1_state_update(*pos, **a)


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: dict(ssm_handles=a["ssm_handles"].long()), TypeError, "ssm_handles must be torch.int32, got torch.int64"),
    (lambda a: dict(ssm_handles=a["ssm_handles"][:2]), ValueError, r"x must have shape \(2, 48\), got \(3, 48\)"),
    (lambda a: dict(layer=3), ValueError, r"layer must be an int in \[0, 3\) \(the cache's Mamba layers\), got 3"),
    (lambda a: dict(layer=-1), ValueError, r"got -1"),
    (lambda a: dict(layer=True), ValueError, r"got True"),
    (lambda a: dict(x=a["x"].int()), TypeError, "x must be float32, bfloat16 or float16, got torch.int32"),
    (lambda a: dict(x=a["x"].t().contiguous().t()), ValueError, "x must be contiguous in its last dimension"),
    (lambda a: dict(A=a["A"][:, :8]), ValueError, r"A must have shape \(48, 16\), got \(48, 8\)"),
    (lambda a: dict(D=a["D"][:5]), ValueError, r"D must have shape \(48,\), got \(5,\)"),
    (lambda a: dict(x=a["x"].to("meta")), ValueError, "x is on meta, the arena on"),
    (lambda a: dict(out=torch.empty(3, 48, dtype=torch.bfloat16, device=DEVICE)), TypeError, "out must have x's dtype"),
    (lambda a: dict(out=torch.empty(3, 47, device=DEVICE)), ValueError, r"out must have shape \(3, 48\)"),
    (lambda a: dict(config=MambaStateConfig(block=24)), ValueError, "block must be a power of two >= 1, got 24"),
    (lambda a: dict(config=MambaStateConfig(num_warps=3)), ValueError, "num_warps must be one of .*, got 3"),
    (lambda a: dict(dt_softplus=1), TypeError, "dt_softplus must be a bool, got 1"),
    (lambda a: dict(cache=PagedCache.of(make_pool(mamba2_spec())[0])), ValueError,
     "is a Mamba2 model; this op is Mamba1"),
    (lambda a: dict(cache=dataclasses.replace(a["cache"], spec=mamba2_spec())), ValueError,
     "is not spec 'm2-tiny''s"),
])
def test_mamba1_validation(change, exc, match):
    alloc, args = _m1_args()
    before = alloc.arena.clone()
    with pytest.raises(exc, match=match):
        _call_m1(args, **change(args))
    assert torch.equal(before, alloc.arena)


# A bad tensor, layout or dtype in the cache now fails where the PagedCache is built, before any op.
@pytest.mark.parametrize("change,exc,match", [
    (lambda c: dict(arena=c["arena"].view(torch.int32)), TypeError, "arena must be torch.uint8, got torch.int32"),
    (lambda c: dict(handle_table=c["handle_table"].int()), TypeError,
     "handle_table must be torch.int64, got torch.int32"),
    (lambda c: dict(handle_kinds=c["handle_kinds"].long()), TypeError,
     "handle_kinds must be torch.int32, got torch.int64"),
    (lambda c: dict(handle_kinds=c["handle_kinds"][1:]), ValueError,
     r"handle_kinds has \d+ entries, handle_table \d+"),
    (lambda c: dict(handle_kinds=c["handle_kinds"].to("meta")), ValueError, "handle_kinds is on meta, the arena on"),
    (lambda c: dict(handle_kinds=None), TypeError, "handle_kinds must be a torch.Tensor, got NoneType"),
    (lambda c: dict(spec=None, ssm_dtype=None), TypeError, r"ssm_dtype must be one of .* with an ssm_layout, got None"),
    (lambda c: dict(spec=None, ssm_dtype=torch.bfloat16), ValueError,
     r"ssm_dtype=torch.bfloat16 does not match the ssm_layout"),
    (lambda c: dict(ssm_dtype=torch.bfloat16), ValueError,
     r"ssm_dtype=torch.bfloat16 does not match the ssm_layout \(\d+ bytes per layer, expected \d+\)"),
    (lambda c: dict(ssm_layout="jamba"), TypeError, "ssm_layout must be an SSMBlockLayout, got str"),
])
def test_mamba1_cache_validation(change, exc, match):
    alloc, _ = _m1_args()
    fields = cache_fields(PagedCache.of(alloc))
    before = alloc.arena.clone()
    with pytest.raises(exc, match=match):
        PagedCache(**{**fields, **change(fields)})
    assert torch.equal(before, alloc.arena)


def test_mamba1_accepts_layout_with_dtype(seed):
    """A cache built by hand from a bare SSMBlockLayout and its dtypes (no spec) serves the op."""
    alloc, args = _m1_args()
    cache = PagedCache(arena=alloc.arena, handle_table=alloc.handle_table, handle_kinds=alloc.handle_kind,
                       ssm_layout=ssm_block_layout(alloc.spec), ssm_dtype=torch.float32, conv_dtype=torch.bfloat16)
    out = _call_m1(args, cache=cache)
    assert not out.isnan().any()


def test_mamba2_validation():
    spec = mamba2_spec()
    alloc, live = make_pool(spec, live=4)
    inp = mamba2_inputs(spec, 3, torch.float32)
    h = live[:3].clone()
    cache = PagedCache.of(alloc)

    def call(**kw):
        a = dict(inp)
        a.update(kw)
        return mamba2_state_update(a["x"], a["dt"], a["A"], a["B"], a["C"], h, cache, layer=1, D=a["D"], z=a["z"],
                                   dt_bias=a["dt_bias"])

    bad_groups = torch.randn(3, 4, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"n_groups \(B.shape\[1\] = 4\) must divide nheads \(6\)"):
        call(B=bad_groups, C=bad_groups)
    three = torch.randn(3, 3, 32, device=DEVICE)
    with pytest.raises(ValueError, match="B has n_groups=3; spec 'm2-tiny' has 2"):
        call(B=three, C=three)
    with pytest.raises(ValueError, match=r"C must have shape \(3, 2, 32\)"):
        call(C=torch.randn(3, 2, 16, device=DEVICE))
    with pytest.raises(ValueError, match=r"nheads \* head_dim = 4 \* 16 must equal the layout's d_inner \(96\)"):
        call(x=torch.randn(3, 4, 16, device=DEVICE))
    with pytest.raises(ValueError, match="x has 3 heads x 32; spec 'm2-tiny' has 6 x 16"):
        call(x=torch.randn(3, 3, 32, device=DEVICE))
    with pytest.raises(ValueError, match=r"dt must have shape \(3, 6\), got \(3, 6, 16\)"):
        call(dt=torch.randn(3, 6, 16, device=DEVICE))
    with pytest.raises(ValueError, match=r"A must have shape \(6,\)"):
        call(A=torch.randn(6, 32, device=DEVICE))
    with pytest.raises(ValueError, match="is a Mamba1 model; this op is Mamba2"):
        mamba2_state_update(*[inp[k] for k in ("x", "dt", "A", "B", "C")], h,
                            PagedCache.of(make_pool(mamba1_spec())[0]), layer=1)
    # with a bare layout (no spec) the group count is free, but it must still divide the heads
    bare = PagedCache(arena=alloc.arena, handle_table=alloc.handle_table, handle_kinds=alloc.handle_kind,
                      ssm_layout=ssm_block_layout(spec), ssm_dtype=torch.float32, conv_dtype=spec.conv_dtype)
    with pytest.raises(ValueError, match="must divide nheads"):
        mamba2_state_update(inp["x"], inp["dt"], inp["A"], bad_groups, bad_groups, h, bare, layer=1)


def test_conv1d_validation():
    spec = mamba1_spec(d_inner=40)
    alloc, live = make_pool(spec, live=4)
    inp = conv_inputs(spec, 3, torch.bfloat16)
    h = live[:3].clone()
    cache = PagedCache.of(alloc)
    bare = {**cache_fields(cache), "spec": None}    # a hand-built cache over a bare SSMBlockLayout

    def call(cache=cache, layer=1, **kw):
        a = dict(inp)
        a.update(kw)
        act = a.pop("activation", "silu")
        return causal_conv1d_update(a.pop("x"), a.pop("weight"), h, cache, layer=layer, bias=a.pop("bias"),
                                    activation=act, **a)

    with pytest.raises(ValueError, match=r"weight has d_conv=3; the layout stores 3 past inputs \(d_conv=4\)"):
        call(weight=torch.randn(40, 3, device=DEVICE))
    with pytest.raises(ValueError, match=r"weight must have shape \(40, 4\), got \(48, 4\)"):
        call(weight=torch.randn(48, 4, device=DEVICE))
    with pytest.raises(ValueError, match="weight must be contiguous in its last dimension"):
        call(weight=torch.randn(4, 40, device=DEVICE).t())
    with pytest.raises(ValueError, match=r"x must have shape \(3, 40\), got \(3, 41\)"):
        call(x=torch.randn(3, 41, device=DEVICE))
    with pytest.raises(ValueError, match="activation must be None or 'silu', got 'relu'"):
        call(activation="relu")
    with pytest.raises(ValueError, match="block must be a power of two >= 1, got 0"):
        call(config=MambaStateConfig(block=0))
    with pytest.raises(TypeError, match=r"conv_dtype must be one of .* with an ssm_layout, got None"):
        PagedCache(**{**bare, "conv_dtype": None})
    with pytest.raises(ValueError, match=r"conv_dtype=torch.float32 does not match the ssm_layout"):
        PagedCache(**{**bare, "conv_dtype": torch.float32})
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 3\) \(the cache's Mamba layers\), got 7"):
        call(layer=7)
    with pytest.raises(TypeError, match="allocator must be an arena allocator"):
        PagedCache.of(object())
    with pytest.raises(TypeError, match=r"cache must be a PagedCache \(PagedCache.of\(allocator\)\), got AVMPAllocator"):
        call(cache=alloc)


def test_torch_compile_fullgraph(seed):
    """The ops trace as opaque custom ops (no graph break) and mutate the arena under compile."""
    torch._dynamo.reset()
    spec = mamba2_spec()
    alloc, live = make_pool(spec)
    handles = batch_handles(live, 3)
    xc = conv_inputs(spec, 3, torch.bfloat16)
    x2 = mamba2_inputs(spec, 3, torch.float32)
    out_c = torch.empty_like(xc["x"])

    def step(cache, handles):
        y = causal_conv1d_update(xc["x"], xc["weight"], handles, cache, layer=1, bias=xc["bias"], activation="silu",
                                 out=out_c)
        s = mamba2_state_update(x2["x"], x2["dt"], x2["A"], x2["B"], x2["C"], handles, cache, layer=1, D=x2["D"],
                                z=x2["z"], dt_bias=x2["dt_bias"], dt_softplus=True)
        return y * 2, s + 1

    cache = PagedCache.of(alloc)
    twin = alloc.arena.clone()
    want = step(dataclasses.replace(cache, arena=twin), handles)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(cache, handles)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(alloc.arena, twin), "the compiled step must mutate the arena like the eager one"


def test_custom_ops_registered():
    for name in ("mamba1_state_update", "mamba2_state_update", "causal_conv1d_update"):
        op = getattr(torch.ops.avmp, name).default
        mutated = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert sorted(mutated) == ["arena", "out"], name


def test_cache_of_matches_hand_built_cache(seed):
    """PagedCache.of(allocator) is the same call as a cache built by hand from the allocator's arena,
    table, kinds, SSM layout and dtypes."""
    alloc, live = make_pool(mamba2_spec())
    handles = batch_handles(live, 3)
    twin = alloc.arena.clone()
    inp = mamba2_inputs(alloc.spec, 3, torch.float32)
    xc = conv_inputs(alloc.spec, 3, torch.bfloat16)
    view = PagedCache.of(alloc)
    got_c = causal_conv1d_update(xc["x"], xc["weight"], handles, view, layer=2, bias=xc["bias"], activation="silu")
    got_s = mamba2_state_update(*[inp[k] for k in ("x", "dt", "A", "B", "C")], handles, view, layer=2, D=inp["D"],
                                z=inp["z"], dt_bias=inp["dt_bias"], dt_softplus=True)
    spec = alloc.spec
    by_hand = PagedCache(arena=twin, handle_table=alloc.handle_table, handle_kinds=alloc.handle_kind,
                         ssm_layout=ssm_block_layout(spec), ssm_dtype=spec.ssm_dtype, conv_dtype=spec.conv_dtype)
    want_c = causal_conv1d_update(xc["x"], xc["weight"], handles, by_hand, layer=2, bias=xc["bias"], activation="silu")
    want_s = mamba2_state_update(*[inp[k] for k in ("x", "dt", "A", "B", "C")], handles, by_hand, layer=2,
                                 D=inp["D"], z=inp["z"], dt_bias=inp["dt_bias"], dt_softplus=True)
    assert torch.equal(got_c, want_c) and torch.equal(got_s, want_s) and torch.equal(alloc.arena, twin)


# --------------------------------------------------------------------------------------- GPU (real shapes)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_pool(spec, batch, extra=32):
    """SSM pool placed past 4 GiB (KV slabs come first), ``batch + extra`` blocks allocated."""
    n = batch + extra
    slab = -(-spec.ssm_block_bytes * 4 // 128) * 128
    ssm_slabs = -(-n // 4) + 1
    kv_slabs = -(-(9 << 29) // slab)  # 4.5 GiB of KV slabs below the SSM pool
    alloc = AVMPAllocator(spec, (kv_slabs + ssm_slabs) * slab, device="cuda", slab_bytes=slab,
                          kv_fraction=kv_slabs / (kv_slabs + ssm_slabs))
    alloc.arena.view(torch.int32).random_()
    live = alloc.alloc_ssm(n)
    assert int(alloc.handle_table[live.long()].min()) > 2**32, "blocks must sit past 4 GiB"
    fill_states(alloc, live)
    return alloc, live


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("ssm_dtype", [torch.bfloat16, torch.float32])
def test_gpu_jamba_mamba1(seed, ssm_dtype):
    spec = dataclasses.replace(get_preset("jamba-1.5-mini"), num_mamba_layers=4, ssm_dtype=ssm_dtype)
    alloc, live = _gpu_pool(spec, 64)
    handles = batch_handles(live, 64)
    for _ in range(2):
        run_ssm_step(alloc, handles, 3, mamba1_inputs(spec, 64, torch.bfloat16))
        run_conv_step(alloc, handles, 3, conv_inputs(spec, 64, torch.bfloat16))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("ssm_dtype", [torch.bfloat16, torch.float32])
def test_gpu_nemotron_mamba2(seed, ssm_dtype):
    spec = dataclasses.replace(get_preset("nemotron-h-8b"), num_mamba_layers=4, ssm_dtype=ssm_dtype)
    alloc, live = _gpu_pool(spec, 64)
    handles = batch_handles(live, 64)
    for step in range(2):
        run_ssm_step(alloc, handles, 3, mamba2_inputs(spec, 64, torch.bfloat16, strided=step == 1))
        run_conv_step(alloc, handles, 3, conv_inputs(spec, 64, torch.bfloat16))


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph_and_compile(seed):
    """A captured decode step (conv + Mamba2) replays like eager launches, bit for bit; so does
    torch.compile with inductor."""
    spec = dataclasses.replace(get_preset("nemotron-h-8b"), num_mamba_layers=2, ssm_dtype=torch.float32)
    slab = -(-spec.ssm_block_bytes * 4 // 128) * 128
    alloc = AVMPAllocator(spec, 40 * slab, device="cuda", slab_bytes=slab, kv_fraction=0.25)
    alloc.arena.view(torch.int32).random_()
    live = alloc.alloc_ssm(80)
    fill_states(alloc, live)
    handles = batch_handles(live, 64)
    xc = conv_inputs(spec, 64, torch.bfloat16)
    x2 = mamba2_inputs(spec, 64, torch.bfloat16)
    out_c, out_s = torch.empty_like(xc["x"]), torch.empty_like(x2["x"])

    def step(cache):
        causal_conv1d_update(xc["x"], xc["weight"], handles, cache, layer=1, bias=xc["bias"], activation="silu",
                             out=out_c)
        mamba2_state_update(x2["x"], x2["dt"], x2["A"], x2["B"], x2["C"], handles, cache, layer=1, D=x2["D"],
                            z=x2["z"], dt_bias=x2["dt_bias"], dt_softplus=True, out=out_s)

    cache = PagedCache.of(alloc)
    twin = alloc.arena.clone()
    twin_cache = dataclasses.replace(cache, arena=twin)
    step(cache)  # warm-up (compiles) before capture
    step(twin_cache)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step(cache)
    for _ in range(2):
        g.replay()
        got_c, got_s = out_c.clone(), out_s.clone()
        step(twin_cache)
        assert torch.equal(got_c, out_c) and torch.equal(got_s, out_s)
    assert torch.equal(alloc.arena, twin)

    compiled = torch.compile(step, fullgraph=True)
    compiled(cache)
    got_c, got_s = out_c.clone(), out_s.clone()
    step(twin_cache)
    assert torch.equal(alloc.arena, twin) and torch.equal(got_c, out_c) and torch.equal(got_s, out_s)

