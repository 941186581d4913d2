"""Paged decode attention and KV append against the pure-torch reference (avmp_triton/reference/paged_attention.py).

CPU (Triton interpreter): fp32 KV, small odd shapes, tolerance 1e-4 relative. Pages come from an
``AVMPAllocator`` and are scattered over its arena with ``torch.randperm``; the arena holds random
values, and every element that no live token owns (dead slots of the last page, unused pages, the
SSM pool) is NaN, so any read outside the live tokens shows up in the output. Outputs are
NaN-poisoned before each call. GPU cases (marked ``gpu``) use real sizes in bf16 / fp16.
"""

import dataclasses

import pytest
import torch

from avmp_triton import AVMPAllocator, HybridModelSpec, PaddedUnifiedAllocator, PagedCache
from avmp_triton.layout import KVPageLayout, kv_page_layout
from avmp_triton.ops import (
    DecodeConfig,
    decode_config,
    decode_workspace,
    decode_workspace_numel,
    kv_append,
    paged_decode_attention,
)
from avmp_triton.reference.paged_attention import (
    decode_attention_dense,
    gather_kv,
    kv_append_ref,
    paged_decode_attention_ref,
)

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


# ----------------------------------------------------------------------------------------- setup
def make_spec(hkv: int, head_dim: int = 64, layers: int = 3, dtype=torch.float32) -> HybridModelSpec:
    return HybridModelSpec(name=f"attn-{hkv}x{head_dim}", num_attn_layers=layers, num_kv_heads=hkv,
                           head_dim=head_dim, kv_dtype=dtype, num_mamba_layers=1, mamba_version=1,
                           d_inner=16, d_state=4, conv_dtype=dtype, ssm_dtype=dtype)


def make_alloc(spec, page_tokens: int, kv_pages: int, *, pages_per_slab: int = 4, cls=AVMPAllocator, device=DEVICE):
    """An allocator whose KV pool holds at least ``kv_pages`` pages (slabs of ``pages_per_slab`` pages)."""
    page = -(-spec.kv_bytes_per_token * page_tokens // 16) * 16
    slab = -(-page * pages_per_slab // 128) * 128
    kv_slabs = -(-kv_pages // pages_per_slab)
    kw = {} if cls is PaddedUnifiedAllocator else {"kv_fraction": kv_slabs / (kv_slabs + 2)}
    return cls(spec, (kv_slabs + 2) * slab + 77, device=device, slab_bytes=slab, page_tokens=page_tokens, **kw)


def layout_of(alloc) -> KVPageLayout:
    return kv_page_layout(alloc.spec, alloc.page_tokens)


def scattered_table(alloc, seq_lens: list[int], width: int, extra: int = 5) -> torch.Tensor:
    """``[B, width]`` int32 block table, -1 padded, of pages taken at random from a larger allocation."""
    P = alloc.page_tokens
    need = [-(-n // P) for n in seq_lens]
    handles = alloc.alloc_kv(sum(need) + extra)
    handles = handles[torch.randperm(handles.numel(), device=handles.device)]
    bt = torch.full((len(seq_lens), width), -1, dtype=torch.int32, device=alloc.device)
    i = 0
    for b, n in enumerate(need):
        bt[b, :n] = handles[i:i + n]
        i += n
    return bt


def live_elements(alloc, bt: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """Element indices (of the arena viewed as the KV dtype) of every live token's K and V rows."""
    lay = layout_of(alloc)
    table = alloc.handle_table.cpu()
    btc = bt.cpu().long()
    L = alloc.spec.num_attn_layers
    per_token = (torch.arange(L)[:, None, None, None] * lay.stride_layer
                 + torch.arange(2)[None, :, None, None] * lay.stride_kv
                 + torch.arange(lay.num_kv_heads)[None, None, :, None] * lay.stride_head
                 + torch.arange(lay.head_dim)[None, None, None, :]).flatten()
    idx = []
    for b, n in enumerate(seq_lens):
        pos = torch.arange(n)
        h = btc[b, pos // lay.page_tokens]
        pos, h = pos[h >= 0], h[h >= 0]
        off = table[h]
        pos, off = pos[off >= 0], off[off >= 0]
        base = off // lay.elem_bytes + (pos % lay.page_tokens) * lay.stride_token
        idx.append((base[:, None] + per_token[None, :]).flatten())
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)


def fill_arena(alloc, bt=None, seq_lens=None) -> None:
    """Random values in the live tokens' rows (everywhere if no table is given), NaN elsewhere."""
    dt = alloc.spec.kv_dtype
    elems = alloc.arena.view(dt)
    rnd = torch.randn(elems.numel(), device=alloc.device).to(dt)
    if bt is None:
        elems.copy_(rnd)
        return
    elems.fill_(float("nan"))
    idx = live_elements(alloc, bt, seq_lens).to(alloc.device)
    elems[idx] = rnd[idx]


def nan_like(shape, dtype, device=DEVICE) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def i32(xs, device=DEVICE) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int32, device=device)


def lanes_padded(t: torch.Tensor, fill: float, pad: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` copied into rows ``pad`` lanes wider whose extra lanes hold ``fill``: (the view shaped
    like ``t``, the whole buffer). A kernel that reads past a row's D sees ``fill``; one that writes
    there changes it."""
    buf = torch.full((*t.shape[:-1], t.shape[-1] + pad), fill, dtype=t.dtype, device=t.device)
    buf[..., :t.shape[-1]] = t
    return buf[..., :t.shape[-1]], buf


def check_decode(alloc, bt, seq_lens, hq, *, layer, padded=False, **kw):
    """Run the op on NaN-poisoned outputs and compare with the reference; return the output.
    ``padded``: q's rows sit in wider rows of NaN and out's in wider rows of 7s, which must stay.
    ``kw``: the op's keywords (``scale``, ``config``, ...)."""
    B = bt.shape[0]
    D = alloc.spec.head_dim
    dt = alloc.spec.kv_dtype
    q = torch.randn(B, hq, D, device=alloc.device).to(dt)
    out = nan_like((B, hq, D), dt, alloc.device)
    if padded:
        q, _ = lanes_padded(q, float("nan"))
        out, out_rows = lanes_padded(out, 7.0)
    sl = i32(seq_lens, alloc.device)
    out = paged_decode_attention(q, bt, sl, PagedCache.of(alloc), layer=layer, out=out, **kw)
    ref = paged_decode_attention_ref(q, alloc.arena, alloc.handle_table, layout_of(alloc), bt, sl, layer=layer,
                                     scale=kw.get("scale"))
    torch.testing.assert_close(out.double(), ref, **TOL[dt])
    if padded:
        assert (out_rows[..., D:] == 7).all(), "written past D"
    return q, out


# --------------------------------------------------------------------------------- decode (CPU)
DECODE_CASES = [
    # (Hq, Hkv, D, page_tokens, seq_lens, layer)
    pytest.param(4, 2, 64, 16, [1, 15, 17], 1, id="gqa2-p16"),
    pytest.param(2, 2, 64, 16, [63], 2, id="mha-p16"),
    pytest.param(8, 1, 64, 16, [17, 0, 63], 0, id="gqa8-p16-zero"),
    pytest.param(4, 2, 64, 8, [15, 63], 2, id="gqa2-p8"),
    pytest.param(8, 1, 64, 8, [1, 17, 40], 1, id="gqa8-p8"),
    pytest.param(4, 2, 128, 16, [33, 7], 1, id="gqa2-d128"),
    # pages larger than a step's tile: walked in parts (broadcast path, then tl.dot path)
    pytest.param(4, 2, 64, 128, [130, 5], 1, id="gqa2-p128"),
    pytest.param(8, 2, 64, 256, [300], 0, id="gqa4-p256"),
]


@pytest.mark.parametrize("num_splits", [1, 2, 3])
@pytest.mark.parametrize("hq,hkv,d,page_tokens,seq_lens,layer", DECODE_CASES)
def test_decode_matches_reference(hq, hkv, d, page_tokens, seq_lens, layer, num_splits):
    alloc = make_alloc(make_spec(hkv, d), page_tokens, kv_pages=24)
    bt = scattered_table(alloc, seq_lens, width=-(-max(seq_lens) // page_tokens) + 2)
    fill_arena(alloc, bt, seq_lens)
    _, out = check_decode(alloc, bt, seq_lens, hq, layer=layer, config=DecodeConfig(num_splits=num_splits))
    for b, n in enumerate(seq_lens):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))


@pytest.mark.parametrize("use_dot,pages_per_iter", [(True, 1), (True, 4), (False, 1), (False, 2)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_dot_and_broadcast_paths(use_dot, pages_per_iter, num_splits):
    seq_lens = [63, 1, 40]
    alloc = make_alloc(make_spec(2), 16, kv_pages=16)
    bt = scattered_table(alloc, seq_lens, width=5)
    fill_arena(alloc, bt, seq_lens)
    check_decode(alloc, bt, seq_lens, 4, layer=1, scale=0.3,
                 config=DecodeConfig(num_splits=num_splits, use_dot=use_dot, pages_per_iter=pages_per_iter))


def test_decode_default_config_and_arena_path_agree():
    """Default launch choice, the allocator's cache and a cache built by hand over its tensors (the
    low-level path), given out= and workspace=."""
    seq_lens = [63, 17, 0]
    alloc = make_alloc(make_spec(1), 16, kv_pages=12)
    bt = scattered_table(alloc, seq_lens, width=6)
    fill_arena(alloc, bt, seq_lens)
    q, out = check_decode(alloc, bt, seq_lens, 8, layer=2)
    sl = i32(seq_lens)
    cache = PagedCache(arena=alloc.arena, handle_table=alloc.handle_table, handle_kinds=alloc.handle_kind,
                       kv_layout=layout_of(alloc), num_attn_layers=3, kv_dtype=torch.float32)
    for ns in (1, 4):
        ws = nan_like((decode_workspace_numel(3, 8, 64, ns) + 7,), torch.float32)
        o2 = paged_decode_attention(q, bt, sl, cache, layer=2, out=nan_like(q.shape, q.dtype), workspace=ws,
                                    config=DecodeConfig(num_splits=ns))
        torch.testing.assert_close(o2, out, **TOL[torch.float32])
    assert decode_workspace(3, 8, 64, 4, DEVICE).numel() >= decode_workspace_numel(3, 8, 64, 4)


def test_decode_padded_allocator():
    """The op reads through any allocator: padded units of PaddedUnifiedAllocator work the same."""
    seq_lens = [20, 47]
    alloc = make_alloc(make_spec(2), 16, kv_pages=12, cls=PaddedUnifiedAllocator)
    bt = scattered_table(alloc, seq_lens, width=4)
    fill_arena(alloc, bt, seq_lens)
    check_decode(alloc, bt, seq_lens, 4, layer=0, config=DecodeConfig(num_splits=2))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_skips_invalid_handles(num_splits, device_checks_only):
    """-1 inside the live length, a freed handle and a handle past the table are skipped (masked);
    a row with nothing readable, and a seq_len past the table, are defined."""
    seq_lens = [63, 40, 33, 200]
    alloc = make_alloc(make_spec(2), 16, kv_pages=24)
    bt = scattered_table(alloc, seq_lens[:3] + [64], width=4)
    fill_arena(alloc, bt, seq_lens[:3] + [64])
    freed = bt[1, 2:3].clone()
    bt[0, 1] = -1                                  # hole in row 0
    alloc.free(freed)                              # row 1's third page is now a free handle
    bt[2, :] = -1                                  # row 2: nothing readable -> zeros
    bt[3, 0] = alloc.num_handles + 5               # row 3: a handle outside the table; seq_len clamped to 64
    _, out = check_decode(alloc, bt, seq_lens, 4, layer=1, config=DecodeConfig(num_splits=num_splits))
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_ignores_entries_past_the_live_length(num_splits, device_checks_only):
    """Block-table entries past a request's live length are never read as units, whatever they
    hold (an unsplit launch looks their table entries up before seq_len arrives, then masks
    them): live KV pages whose rows are all NaN, a freed handle, a handle outside the table."""
    seq_lens = [40, 17]
    alloc = make_alloc(make_spec(2), 16, kv_pages=16)
    bt = scattered_table(alloc, seq_lens, width=5)
    spare = alloc.alloc_kv(3)
    fill_arena(alloc, bt, seq_lens)                # everything but the live rows is NaN
    alloc.free(spare[2:].clone())
    bt[0, 3:] = spare[:2]                          # NaN pages after row 0's three live ones
    bt[1, 2] = spare[2]                            # a freed handle after row 1's two
    bt[1, 3] = alloc.num_handles + 7               # a handle outside the table
    bt[1, 4] = bt[0, 0]                            # another request's live page
    _, out = check_decode(alloc, bt, seq_lens, 4, layer=1, config=DecodeConfig(num_splits=num_splits))
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_all_empty_rows(num_splits):
    alloc = make_alloc(make_spec(2), 16, kv_pages=4)
    bt = scattered_table(alloc, [0, 0], width=3, extra=3)
    fill_arena(alloc)
    q = torch.randn(2, 4, 64, device=DEVICE)
    cache = PagedCache.of(alloc)
    out = paged_decode_attention(q, bt, i32([0, 0]), cache, layer=0, out=nan_like((2, 4, 64), torch.float32),
                                 config=DecodeConfig(num_splits=num_splits))
    assert torch.equal(out, torch.zeros_like(out))
    empty = paged_decode_attention(q[:0], bt[:0], i32([]), cache, layer=0)
    assert empty.shape == (0, 4, 64)


def test_decode_survives_compaction():
    """Live pages move (rebalance compacts the KV pool) between two decode steps: same outputs."""
    spec = make_spec(2)
    alloc = make_alloc(spec, 16, kv_pages=32, pages_per_slab=4)
    handles = alloc.alloc_kv(alloc.stats().pools["kv"].free_units)
    slab = (alloc.handle_table[handles.long()] // alloc.slab_bytes).cpu()
    # one live page in every KV slab (no slab is free, so the move has to copy), plus a few more
    live = [int(handles[torch.nonzero(slab == s).flatten()[torch.randint(4, ())]]) for s in slab.unique().tolist()]
    rest = [int(h) for h in handles.tolist() if int(h) not in live]
    live += [rest[i] for i in torch.randperm(len(rest))[:4].tolist()]
    live = [live[i] for i in torch.randperm(len(live)).tolist()]
    alloc.free(i32([h for h in handles.tolist() if h not in live]))
    seq_lens = [63, 17, 49, 17]
    pages = [-(-n // 16) for n in seq_lens]
    assert sum(pages) == len(live)
    bt = torch.full((4, 5), -1, dtype=torch.int32, device=DEVICE)
    i = 0
    for b, n in enumerate(pages):
        bt[b, :n] = i32(live[i:i + n])
        i += n
    fill_arena(alloc, bt, seq_lens)
    q = torch.randn(4, 4, 64, device=DEVICE)
    sl = i32(seq_lens)
    cache = PagedCache.of(alloc)      # taken once: the view stays valid across the rebalance
    before = {ns: paged_decode_attention(q, bt, sl, cache, layer=2, config=DecodeConfig(num_splits=ns))
              for ns in (1, 3)}
    offsets = alloc.handle_table[bt[bt >= 0].long()].clone()
    moved = alloc.units_moved
    alloc.rebalance("ssm", 2)
    assert alloc.units_moved > moved
    assert not torch.equal(alloc.handle_table[bt[bt >= 0].long()], offsets)
    for ns, want in before.items():
        got = paged_decode_attention(q, bt, sl, cache, layer=2, out=nan_like(q.shape, q.dtype),
                                     config=DecodeConfig(num_splits=ns))
        assert torch.equal(got, want)
    ref = paged_decode_attention_ref(q, alloc.arena, alloc.handle_table, layout_of(alloc), bt, sl, layer=2)
    torch.testing.assert_close(before[1].double(), ref, **TOL[torch.float32])


def test_decode_fp16_and_bf16_interpreter():
    for dt in (torch.float16, torch.bfloat16):
        seq_lens = [33, 20]
        alloc = make_alloc(make_spec(1, dtype=dt), 16, kv_pages=8)
        bt = scattered_table(alloc, seq_lens, width=4)
        fill_arena(alloc, bt, seq_lens)
        check_decode(alloc, bt, seq_lens, 8, layer=1, config=DecodeConfig(num_splits=2))
        check_decode(alloc, bt, seq_lens, 2, layer=1, config=DecodeConfig(use_dot=False))


# ------------------------------------------------------------------- head dims not powers of two
ODD_HEAD_DIMS = [
    # (Hq, Hkv, D, dtype): a GQA group of >= 4 takes the tl.dot path, a smaller one the broadcast path
    pytest.param(8, 2, 160, torch.float32, id="d160-gqa4-fp32"),
    pytest.param(8, 2, 160, torch.bfloat16, id="d160-gqa4-bf16"),
    pytest.param(2, 2, 160, torch.bfloat16, id="d160-mha-bf16"),     # Zamba2-2.7B: 32 q / 32 kv heads
    pytest.param(4, 2, 160, torch.float32, id="d160-gqa2-fp32"),
    pytest.param(8, 2, 80, torch.bfloat16, id="d80-gqa4-bf16"),
    pytest.param(4, 2, 80, torch.float32, id="d80-gqa2-fp32"),
]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("hq,hkv,d,dtype", ODD_HEAD_DIMS)
def test_decode_head_dims_not_powers_of_two(hq, hkv, d, dtype, num_splits):
    """Tiles padded to a power of two of lanes (160 -> 256, 80 -> 128): nothing past D is read (q's
    extra lanes are NaN, and so are the arena's dead slots) or written."""
    seq_lens = [33, 1, 20]
    alloc = make_alloc(make_spec(hkv, d, dtype=dtype), 16, kv_pages=8)
    bt = scattered_table(alloc, seq_lens, width=4)
    fill_arena(alloc, bt, seq_lens)
    check_decode(alloc, bt, seq_lens, hq, layer=1, padded=True, config=DecodeConfig(num_splits=num_splits))


@pytest.mark.parametrize("d", [160, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_append_head_dims_not_powers_of_two(d, dtype):
    """3 kv heads (padded to 4) of D lanes (padded to a power of two): exactly the tokens' slots change."""
    alloc = make_alloc(make_spec(3, d, dtype=dtype), 8, kv_pages=8)
    bt = scattered_table(alloc, [20, 9], width=4)
    fill_arena(alloc)
    req, pos = i32([1, 0, -1, 0]), i32([8, 19, 0, 3])
    k, _ = lanes_padded(torch.randn(4, 3, d, device=DEVICE).to(dtype), float("nan"))
    v, _ = lanes_padded(torch.randn(4, 3, d, device=DEVICE).to(dtype), float("nan"))
    want = kv_append_ref(k, v, alloc.arena, alloc.handle_table, layout_of(alloc), bt, req, pos, layer=1)
    kv_append(k, v, bt, req, pos, PagedCache.of(alloc), layer=1)
    assert torch.equal(alloc.arena, want)


# ----------------------------------------------------------------------------------- KV append
@pytest.mark.parametrize("page_tokens", [16, 8])
def test_kv_append_then_attention(page_tokens):
    """Append 1-3 new tokens per request (shuffled, with padding tokens), then decode over them."""
    hq, hkv, D, layer = 4, 2, 64, 1
    old = [16, 5, 30]
    new = [1, 3, 2]
    total = [o + n for o, n in zip(old, new)]
    alloc = make_alloc(make_spec(hkv), page_tokens, kv_pages=24)
    bt = scattered_table(alloc, total, width=-(-max(total) // page_tokens) + 1)
    fill_arena(alloc, bt, old)            # the new tokens' slots are NaN until appended
    lay = layout_of(alloc)
    req = [b for b, n in enumerate(new) for _ in range(n)]
    pos = [old[b] + j for b, n in enumerate(new) for j in range(n)]
    perm = torch.randperm(len(req)).tolist()
    req, pos = [req[i] for i in perm] + [-1, -1], [pos[i] for i in perm] + [0, 3]
    T = len(req)
    k = torch.randn(T, hkv, D, device=DEVICE)
    v = torch.randn(T, hkv, D, device=DEVICE)
    tr, tp = i32(req), i32(pos)
    olds = [gather_kv(alloc.arena, alloc.handle_table, lay, bt[b], old[b], layer, torch.float32) for b in range(3)]
    want = kv_append_ref(k, v, alloc.arena, alloc.handle_table, lay, bt, tr, tp, layer=layer)
    cache = PagedCache.of(alloc)
    assert kv_append(k, v, bt, tr, tp, cache, layer=layer) is alloc.arena
    assert torch.equal(alloc.arena, want)
    q = torch.randn(3, hq, D, device=DEVICE)
    for ns in (1, 2):
        out = paged_decode_attention(q, bt, i32(total), cache, layer=layer, out=nan_like(q.shape, q.dtype),
                                     config=DecodeConfig(num_splits=ns))
        for b in range(3):
            mine = [t for t in range(T) if req[t] == b]
            mine.sort(key=lambda t: pos[t])
            kb = torch.cat([olds[b][0], k[mine]])
            vb = torch.cat([olds[b][1], v[mine]])
            dense = decode_attention_dense(q[b], kb, vb, torch.ones(total[b], dtype=torch.bool, device=DEVICE),
                                           D ** -0.5)
            torch.testing.assert_close(out[b].double(), dense, **TOL[torch.float32])


def test_kv_append_skips_invalid_tokens(device_checks_only):
    alloc = make_alloc(make_spec(2), 16, kv_pages=8)
    bt = scattered_table(alloc, [20, 16], width=3)
    bt[1, 1] = -1
    h_freed = bt[0, 1:2].clone()
    alloc.free(h_freed)
    fill_arena(alloc)
    before = alloc.arena.clone()
    # bad row, row -1 (padding), negative position, past the table, -1 handle, freed handle
    req = i32([2, -1, 0, 0, 1, 0])
    pos = i32([3, 0, -1, 48, 17, 16])
    k = torch.randn(6, 2, 64, device=DEVICE)
    cache = PagedCache.of(alloc)
    kv_append(k, k + 1, bt, req, pos, cache, layer=2)
    assert torch.equal(alloc.arena, before)
    kv_append(k[:0], k[:0], bt, req[:0], pos[:0], cache, layer=0)   # no tokens: a no-op
    assert torch.equal(alloc.arena, before)


def test_kv_append_arena_path_layer_and_heads():
    """Low-level path (a cache built by hand over the allocator's tensors); writes land only in the
    addressed layer's K and V slices."""
    alloc = make_alloc(make_spec(2, layers=2), 8, kv_pages=6)
    bt = scattered_table(alloc, [24], width=3)
    fill_arena(alloc)
    lay = layout_of(alloc)
    k, v = torch.randn(3, 2, 64, device=DEVICE), torch.randn(3, 2, 64, device=DEVICE)
    req, pos = i32([0, 0, 0]), i32([23, 0, 9])
    want = kv_append_ref(k, v, alloc.arena, alloc.handle_table, lay, bt, req, pos, layer=1)
    cache = PagedCache(arena=alloc.arena, handle_table=alloc.handle_table, handle_kinds=alloc.handle_kind,
                       kv_layout=lay, num_attn_layers=2, kv_dtype=torch.float32)
    kv_append(k, v, bt, req, pos, cache, layer=1)
    assert torch.equal(alloc.arena, want)
    kk, vv, ok = gather_kv(alloc.arena, alloc.handle_table, lay, bt[0], 24, 1, torch.float32)
    assert ok.all()
    assert torch.equal(kk[[23, 0, 9]], k) and torch.equal(vv[[23, 0, 9]], v)


# ----------------------------------------------------------------------------------- validation
def _decode_args():
    alloc = make_alloc(make_spec(2), 16, kv_pages=4)
    bt = scattered_table(alloc, [20, 5], width=3, extra=0)
    fill_arena(alloc)
    q = torch.randn(2, 4, 64, device=DEVICE)
    return alloc, dict(q=q, arena=alloc.arena, handle_table=alloc.handle_table, layout=layout_of(alloc),
                       block_table=bt, seq_lens=i32([20, 5]), handle_kinds=alloc.handle_kind, num_layers=3,
                       kv_dtype=torch.float32, layer=1)


# the argument names of a hand-built cache, and of the launch config, in the cases' dicts
_CACHE_ARGS = dict(arena="arena", handle_table="handle_table", handle_kinds="handle_kinds", layout="kv_layout",
                   num_layers="num_attn_layers", kv_dtype="kv_dtype")
_CONFIG_ARGS = ("num_splits", "pages_per_iter", "block_tokens", "num_warps", "num_stages", "use_dot", "max_registers")


def _split_args(args: dict) -> tuple[dict, DecodeConfig]:
    """Pop the ``PagedCache(...)`` keywords and the launch config out of ``args``."""
    cache_kw = {new: args.pop(old) for old, new in _CACHE_ARGS.items()}
    config = DecodeConfig(**{k: args.pop(k) for k in _CONFIG_ARGS if k in args})
    return cache_kw, config


# bad tensors / layouts of the cache: they now fail when the PagedCache is built, before any op
CACHE_ERRORS = {"arena dtype", "arena 2-D", "arena strided", "table int32", "layout type", "page_tokens",
                "num_layers", "page too big", "table device"}


DECODE_ERRORS = [
    ("q int", lambda a: a.update(q=a["q"].int()), TypeError, "q must be"),
    ("q 2-D", lambda a: a.update(q=a["q"][0]), ValueError, "q must be 3-D"),
    ("q strided D", lambda a: a.update(q=a["q"].repeat(1, 1, 2)[:, :, ::2]), ValueError, "q must have contiguous rows"),
    ("q heads", lambda a: a.update(q=torch.randn(2, 3, 64, device=DEVICE)), ValueError, "q has 3 heads"),
    ("head dim layout", lambda a: a.update(q=torch.randn(2, 4, 32, device=DEVICE)), ValueError,
     "q has head_dim 32, the layout 64"),
    ("head dim rule", lambda a: a.update(q=torch.randn(2, 4, 100, device=DEVICE)), ValueError,
     "q has head_dim 100; the attention kernels take a multiple of 8 in [16, 256]"),
    ("q fp16 vs layout", lambda a: a.update(q=a["q"].half()), TypeError,
     "q must have the KV dtype torch.float32, got torch.float16"),
    ("kv dtype", lambda a: a.update(kv_dtype=torch.float16,
                                    layout=kv_page_layout(make_spec(2, dtype=torch.float16), 16)), TypeError,
     "q must have the KV dtype torch.float16, got torch.float32"),
    ("arena dtype", lambda a: a.update(arena=a["arena"].view(torch.int32)), TypeError, "arena must be torch.uint8"),
    ("arena 2-D", lambda a: a.update(arena=a["arena"].view(16, -1)), ValueError, "arena must be 1-D"),
    ("arena strided", lambda a: a.update(arena=a["arena"][::2]), ValueError, "arena must be contiguous"),
    ("table int32", lambda a: a.update(handle_table=a["handle_table"].int()), TypeError, "handle_table must be torch.int64"),
    ("layout type", lambda a: a.update(layout=dict(page_tokens=16)), TypeError,
     "kv_layout must be a KVPageLayout, got dict"),
    ("page_tokens", lambda a: a.update(layout=kv_page_layout(make_spec(2), 12)), ValueError, "page_tokens must be a power of two, got 12"),
    ("layout heads", lambda a: a.update(layout=kv_page_layout(make_spec(3))), ValueError, "num_kv_heads=3"),
    ("layer high", lambda a: a.update(layer=3), ValueError,
     "layer must be an int in [0, 3) (the cache's attention layers), got 3"),
    ("layer neg", lambda a: a.update(layer=-1), ValueError, "got -1"),
    ("num_layers", lambda a: a.update(num_layers=0), ValueError,
     "num_attn_layers must be a positive int with a kv_layout, got 0"),
    ("page too big", lambda a: a.update(num_layers=10 ** 6), ValueError, "more than the arena"),
    ("bt dtype", lambda a: a.update(block_table=a["block_table"].long()), TypeError, "block_table must be torch.int32"),
    ("bt rows", lambda a: a.update(block_table=a["block_table"][:1]), ValueError, "block_table must be [B=2"),
    ("bt cols", lambda a: a.update(block_table=a["block_table"].t().contiguous().t()), ValueError, "strides"),
    ("seq dtype", lambda a: a.update(seq_lens=a["seq_lens"].long()), TypeError, "seq_lens must be torch.int32"),
    ("seq len", lambda a: a.update(seq_lens=i32([1, 2, 3])), ValueError, "seq_lens must have B=2 entries, got 3"),
    ("scale", lambda a: a.update(scale=float("nan")), ValueError, "scale must be a finite float, got nan"),
    ("max_seq_len", lambda a: a.update(max_seq_len=-4), ValueError, "max_seq_len must be a non-negative int, got -4"),
    ("num_splits", lambda a: a.update(num_splits=0), ValueError, "num_splits must be an int in [1, 128], got 0"),
    ("pages_per_iter", lambda a: a.update(pages_per_iter=3), ValueError, "pages_per_iter must be a power of two, got 3"),
    ("num_warps", lambda a: a.update(num_warps=3), ValueError, "num_warps must be 1, 2, 4, 8 or 16, got 3"),
    ("num_stages", lambda a: a.update(num_stages=0), ValueError, "num_stages must be an int in [1, 8], got 0"),
    ("use_dot", lambda a: a.update(use_dot=1), TypeError, "use_dot must be a bool, got 1"),
    ("max_registers", lambda a: a.update(max_registers=300), ValueError,
     "max_registers must be None or an int in [24, 255], got 300"),
    ("out shape", lambda a: a.update(out=torch.empty(2, 4, 63, device=DEVICE)), ValueError, "out must be [B, Hq, D]"),
    ("out dtype", lambda a: a.update(out=torch.empty(2, 4, 64, device=DEVICE, dtype=torch.float64)), TypeError, "out must be torch.float32"),
    ("workspace small", lambda a: a.update(num_splits=2, workspace=torch.empty(10, device=DEVICE)), ValueError, "workspace has 10 elements"),
    ("workspace dtype", lambda a: a.update(workspace=torch.empty(10, device=DEVICE, dtype=torch.float16)), TypeError, "workspace must be torch.float32"),
]


@pytest.mark.parametrize("name,mutate,exc,match", DECODE_ERRORS, ids=[e[0] for e in DECODE_ERRORS])
def test_decode_validation(name, mutate, exc, match):
    alloc, args = _decode_args()
    before = alloc.arena.clone()
    mutate(args)
    cache_kw, config = _split_args(args)
    q, bt, sl = (args.pop(k) for k in ("q", "block_table", "seq_lens"))
    _raises_where_it_belongs(name, exc, match, cache_kw,
                             lambda cache: paged_decode_attention(q, bt, sl, cache, config=config, **args))
    assert torch.equal(alloc.arena, before)


def test_decode_validation_allocator_path():
    alloc, args = _decode_args()
    q, bt, sl = args["q"], args["block_table"], args["seq_lens"]
    cache = PagedCache.of(alloc)
    with pytest.raises(TypeError, match="allocator must be an arena allocator .*got Tensor"):
        PagedCache.of(alloc.arena)
    for not_a_cache in (alloc, alloc.arena):
        with pytest.raises(TypeError, match=_re("cache must be a PagedCache (PagedCache.of(allocator)), got "
                                                f"{type(not_a_cache).__name__}")):
            paged_decode_attention(q, bt, sl, not_a_cache, layer=0)
    with pytest.raises(TypeError, match="required keyword-only argument: 'layer'"):
        paged_decode_attention(q, bt, sl, cache)        # layer has no default
    with pytest.raises(ValueError, match=_re("layer must be an int in [0, 3) (the cache's attention layers), got 7")):
        paged_decode_attention(q, bt, sl, cache, layer=7)
    with pytest.raises(TypeError, match="q must have the KV dtype torch.float32, got torch.float16"):
        paged_decode_attention(q.half(), bt, sl, cache, layer=0)
    with pytest.raises(TypeError, match="config must be a DecodeConfig or None, got dict"):
        paged_decode_attention(q, bt, sl, cache, layer=0, config=dict(num_splits=2))
    with pytest.raises(ValueError, match=_re("block_tokens=48 disagrees with pages_per_iter=2 (which gives 32)")):
        paged_decode_attention(q, bt, sl, cache, layer=0, config=DecodeConfig(pages_per_iter=2, block_tokens=48))
    with pytest.raises(ValueError, match="use_dot needs >= 16 tokens per step"):
        alloc8 = make_alloc(make_spec(2), 8, kv_pages=4)
        paged_decode_attention(q, bt, sl, PagedCache.of(alloc8), layer=0,
                               config=DecodeConfig(use_dot=True, pages_per_iter=1))
    # a hand-built cache is checked when it is built: table and kinds of different lengths, a
    # layout stride off the 16-byte grid, a KV dtype the layout's elements disagree with
    kw = dict(arena=alloc.arena, handle_table=alloc.handle_table, handle_kinds=alloc.handle_kind,
              kv_layout=layout_of(alloc), num_attn_layers=3, kv_dtype=torch.float32)
    n = alloc.handle_table.numel()
    with pytest.raises(ValueError, match=_re(f"handle_kinds has {n - 1} entries, handle_table {n}")):
        PagedCache(**{**kw, "handle_kinds": alloc.handle_kind[:-1]})
    bad = dataclasses.replace(layout_of(alloc), stride_token=66)
    with pytest.raises(ValueError, match=_re("kv_layout.stride_token must be an int >= head_dim and a multiple of "
                                             "4 elements (16 bytes), got 66")):
        PagedCache(**{**kw, "kv_layout": bad})
    with pytest.raises(TypeError, match=_re("kv_dtype torch.float16 is 2 bytes, the kv_layout's elements 4")):
        PagedCache(**{**kw, "kv_dtype": torch.float16})


APPEND_ERRORS = [
    ("k dtype", lambda a: a.update(k=a["k"].half(), v=a["v"].half()), TypeError,
     "k must have the KV dtype torch.float32, got torch.float16"),
    ("v dtype", lambda a: a.update(v=a["v"].double()), TypeError, "v must be torch.float32"),
    ("v shape", lambda a: a.update(v=a["v"][:2]), ValueError, "v must have k's shape"),
    ("k heads", lambda a: a.update(k=a["k"].repeat(1, 2, 1), v=a["v"].repeat(1, 2, 1)), ValueError, "k has 4 kv heads"),
    ("k head dim", lambda a: a.update(k=a["k"][..., :12].contiguous(), v=a["v"][..., :12].contiguous()), ValueError,
     "k has head_dim 12; the attention kernels take a multiple of 8 in [16, 256]"),
    ("k strided", lambda a: a.update(k=a["k"].repeat(1, 1, 2)[:, :, ::2]), ValueError, "contiguous rows"),
    ("req dtype", lambda a: a.update(token_req=a["token_req"].long()), TypeError, "token_req must be torch.int32"),
    ("pos len", lambda a: a.update(token_pos=i32([1])), ValueError, "token_pos must have T=3 entries"),
    ("bt 1-D", lambda a: a.update(block_table=a["block_table"][0]), ValueError, "block_table must be 2-D"),
    ("layer", lambda a: a.update(layer=5), ValueError,
     "layer must be an int in [0, 3) (the cache's attention layers), got 5"),
    ("table device", lambda a: a.update(handle_table=a["handle_table"].to("meta")), ValueError, "handle_table is on meta"),
]


@pytest.mark.parametrize("name,mutate,exc,match", APPEND_ERRORS, ids=[e[0] for e in APPEND_ERRORS])
def test_kv_append_validation(name, mutate, exc, match):
    alloc, d = _decode_args()
    args = dict(k=torch.randn(3, 2, 64, device=DEVICE), v=torch.randn(3, 2, 64, device=DEVICE), arena=alloc.arena,
                handle_table=alloc.handle_table, layout=d["layout"], block_table=d["block_table"],
                token_req=i32([0, 1, 0]), token_pos=i32([1, 2, 3]), handle_kinds=alloc.handle_kind,
                num_layers=3, kv_dtype=torch.float32, layer=0)
    before = alloc.arena.clone()
    mutate(args)
    cache_kw, _ = _split_args(args)
    pos = [args.pop(k) for k in ("k", "v", "block_table", "token_req", "token_pos")]
    _raises_where_it_belongs(name, exc, match, cache_kw, lambda cache: kv_append(*pos, cache, **args))
    if name not in CACHE_ERRORS:
        cache = PagedCache(**cache_kw)
        with pytest.raises(TypeError, match="required keyword-only argument: 'layer'"):
            kv_append(*pos, cache)                      # layer has no default
    assert torch.equal(alloc.arena, before)


def _re(s: str) -> str:
    import re
    return re.escape(s)


def _raises_where_it_belongs(name: str, exc, match: str, cache_kw: dict, op) -> None:
    """A bad cache fails where the PagedCache is built; any other bad input fails in ``op(cache)``."""
    if name in CACHE_ERRORS:
        with pytest.raises(exc, match=_re(match)):
            PagedCache(**cache_kw)
    else:
        cache = PagedCache(**cache_kw)
        with pytest.raises(exc, match=_re(match)):
            op(cache)


# --------------------------------------------------------------------------- config, custom ops
def test_decode_config_table():
    c = decode_config(batch=4, num_q_heads=32, num_kv_heads=8, head_dim=128, page_tokens=16, max_seq_len=4096)
    assert c.use_dot and c.block_tokens == 64 and c.num_splits == 9      # 32 CTAs -> 2 waves of 132 SMs
    c = decode_config(batch=64, num_q_heads=32, num_kv_heads=8, head_dim=128, page_tokens=16, max_seq_len=4096)
    assert c.num_splits == 1                                              # 512 CTAs already fill the GPU
    c = decode_config(batch=1, num_q_heads=32, num_kv_heads=8, head_dim=128, page_tokens=16, max_seq_len=128)
    assert c.num_splits == 1                                              # 2 blocks: too short to split
    c = decode_config(batch=1, num_q_heads=32, num_kv_heads=8, head_dim=128, page_tokens=16, max_seq_len=256)
    assert c.num_splits == 2                                              # 4 blocks: 2 splits of 2
    c = decode_config(batch=1, num_q_heads=4, num_kv_heads=2, head_dim=256, page_tokens=16, max_seq_len=10 ** 6)
    assert not c.use_dot and c.num_splits == 32 and c.block_tokens == 16 and c.num_warps == 8
    # a head dim that is not a power of two takes the rows of its tile width (160 -> 256)
    for hq in (4, 8, 16):
        kw = dict(batch=1, num_q_heads=hq, num_kv_heads=4, page_tokens=16, max_seq_len=10 ** 6)
        assert decode_config(head_dim=160, **kw) == decode_config(head_dim=256, **kw)
        assert decode_config(head_dim=80, **kw) == decode_config(head_dim=128, **kw)
    c = decode_config(batch=1, num_q_heads=8, num_kv_heads=8, head_dim=64, page_tokens=16, max_seq_len=64,
                      num_splits=5, pages_per_iter=2, num_warps=2, num_stages=1, use_dot=True)
    assert (c.num_splits, c.pages_per_iter, c.num_warps, c.num_stages, c.use_dot) == (5, 2, 2, 1, True)


def test_decode_config_stages_prefetch_and_register_cap():
    """The H100 table (perf/results/sweep_decode_variants_H100_32e7231.json): 3 stages, 4 for fp8
    splits; unsplit launches over bf16 pages walk 32 tokens a step, fp8 ones 64; split launches
    prefetch pages over fp8 only, and not with 16 splits or more; an unsplit 4-warp launch caps
    registers at 128 so 4 programs share an SM."""
    kw = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, page_tokens=16)
    split = decode_config(batch=16, max_seq_len=32768, **kw)
    assert (split.num_splits, split.block_tokens, split.num_stages, split.max_registers, split.prefetch_rows) == \
        (3, 64, 3, None, False)
    fp8 = decode_config(batch=16, max_seq_len=32768, kv_fp8=True, **kw)
    assert (fp8.num_splits, fp8.block_tokens, fp8.num_stages, fp8.prefetch_rows) == (3, 64, 4, True)
    many = decode_config(batch=1, max_seq_len=32768, kv_fp8=True, **kw)
    assert (many.num_splits, many.num_stages, many.prefetch_rows) == (32, 4, False)
    whole = decode_config(batch=64, max_seq_len=512, **kw)
    assert (whole.num_splits, whole.pages_per_iter, whole.block_tokens, whole.num_stages, whole.max_registers,
            whole.prefetch_rows) == (1, 2, 32, 3, 128, True)
    whole8 = decode_config(batch=64, max_seq_len=4096, kv_fp8=True, **kw)
    assert (whole8.num_splits, whole8.block_tokens, whole8.num_stages, whole8.max_registers) == (1, 64, 3, 128)
    wide = decode_config(batch=64, max_seq_len=4096, num_q_heads=32, num_kv_heads=8, head_dim=256, page_tokens=16)
    assert wide.num_warps == 8 and wide.max_registers is None and wide.block_tokens == 32
    mine = decode_config(batch=64, max_seq_len=4096, num_stages=4, max_registers=168, pages_per_iter=4,
                         prefetch_rows=False, **kw)
    assert (mine.num_stages, mine.max_registers, mine.block_tokens, mine.prefetch_rows) == (4, 168, 64, False)


def _compile_case():
    seq_lens = [40, 9]
    alloc = make_alloc(make_spec(1), 16, kv_pages=8)
    bt = scattered_table(alloc, [48, 16], width=4)
    fill_arena(alloc, bt, [48, 16])
    return alloc, bt, i32(seq_lens)


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) of append + decode (the ops stay opaque, mutate in place)."""
    alloc, bt, sl = _compile_case()
    q = torch.randn(2, 8, 64, device=DEVICE)
    k, v = torch.randn(2, 1, 64, device=DEVICE), torch.randn(2, 1, 64, device=DEVICE)
    req, pos = i32([0, 1]), sl.clone()
    cache = PagedCache.of(alloc)

    def step(q, k, v, req, pos, sl):
        kv_append(k, v, bt, req, pos, cache, layer=1)
        return paged_decode_attention(q, bt, sl + 1, cache, layer=1, config=DecodeConfig(num_splits=2))

    arena0 = alloc.arena.clone()
    want = step(q, k, v, req, pos, sl)
    arena1 = alloc.arena.clone()
    alloc.arena.copy_(arena0)
    got = torch.compile(step, fullgraph=True)(q, k, v, req, pos, sl)
    assert torch.equal(alloc.arena, arena1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_opcheck():
    alloc, bt, sl = _compile_case()
    lay = layout_of(alloc)
    layout = [lay.page_tokens, lay.num_kv_heads, lay.head_dim, lay.elem_bytes, lay.stride_layer, lay.stride_kv,
              lay.stride_head, lay.stride_token]
    q = torch.randn(2, 8, 64, device=DEVICE)
    out = torch.empty_like(q)
    ws = torch.empty(decode_workspace_numel(2, 8, 64, 2), device=DEVICE)
    torch.library.opcheck(torch.ops.avmp.paged_decode_attention.default,
                          (q, bt, sl, alloc.arena, alloc.handle_table, alloc.handle_kind, out, ws, layout, 0, 0.125,
                           2, 32, 4, 1, True, 128))
    k = torch.randn(2, 1, 64, device=DEVICE)
    torch.library.opcheck(torch.ops.avmp.kv_append.default,
                          (k, k, bt, i32([1, 0]), i32([9, 40]), alloc.arena.clone(), alloc.handle_table,
                           alloc.handle_kind, layout, 2))


# ----------------------------------------------------------------------------------------- GPU
def _gpu_case(dtype, hq, hkv, D, seq_lens, page_tokens=16, layers=2):
    spec = make_spec(hkv, D, layers=layers, dtype=dtype)
    pages = sum(-(-n // page_tokens) for n in seq_lens)
    alloc = make_alloc(spec, page_tokens, kv_pages=pages + 64, pages_per_slab=16)
    bt = scattered_table(alloc, seq_lens, width=-(-max(seq_lens) // page_tokens) + 3, extra=60)
    fill_arena(alloc, bt, seq_lens)
    return alloc, bt


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_gpu_decode_real_sizes(dtype, num_splits):
    seq_lens = [1, 1000, 4096, 2049]
    alloc, bt = _gpu_case(dtype, 32, 8, 128, seq_lens)
    check_decode(alloc, bt, seq_lens, 32, layer=1, config=DecodeConfig(num_splits=num_splits))


@gpu
@needs_cuda
@pytest.mark.parametrize("hq,hkv,D", [(32, 8, 64), (16, 4, 256), (64, 4, 128), (8, 8, 128), (16, 8, 128),
                                     (32, 32, 160), (16, 4, 160), (8, 4, 80)])
@pytest.mark.parametrize("use_dot", [None, True, False])
def test_gpu_decode_shapes(hq, hkv, D, use_dot):
    seq_lens = [17, 777, 2048 + 16, 0, 63]
    alloc, bt = _gpu_case(torch.bfloat16, hq, hkv, D, seq_lens)
    check_decode(alloc, bt, seq_lens, hq, layer=0, config=DecodeConfig(use_dot=use_dot))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,hq,hkv,D,page_tokens", [(torch.bfloat16, 16, 4, 256, 1024), (torch.float32, 16, 4, 128, 512),
                                                        (torch.bfloat16, 32, 8, 64, 1024), (torch.bfloat16, 8, 8, 128, 256),
                                                        (torch.bfloat16, 16, 4, 160, 1024)])
def test_gpu_decode_large_pages(dtype, hq, hkv, D, page_tokens):
    """Pages up to the spec's limit (1024 tokens) are walked in steps; a whole page per step ran out
    of shared memory on the H200 from 256 tokens (GQA >= 4, D 256)."""
    seq_lens = [1, 3000, page_tokens + 5]
    alloc, bt = _gpu_case(dtype, hq, hkv, D, seq_lens, page_tokens=page_tokens)
    check_decode(alloc, bt, seq_lens, hq, layer=1)


@gpu
@needs_cuda
def test_gpu_append_and_cuda_graph():
    """Append + decode captured in a CUDA graph; replay after the inputs change in place."""
    dtype, hq, hkv, D = torch.bfloat16, 32, 8, 128
    seq_lens = [100, 3000, 4000, 17]
    alloc, bt = _gpu_case(dtype, hq, hkv, D, [n + 1 for n in seq_lens])
    B = len(seq_lens)
    q = torch.randn(B, hq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, hkv, D, device="cuda", dtype=dtype)
    v = torch.randn(B, hkv, D, device="cuda", dtype=dtype)
    req, pos, sl = i32(list(range(B))), i32(seq_lens), i32([n + 1 for n in seq_lens])
    out = torch.empty(B, hq, D, device="cuda", dtype=dtype)
    ws = decode_workspace(B, hq, D, 8, "cuda")
    cache = PagedCache.of(alloc)

    def step():
        kv_append(k, v, bt, req, pos, cache, layer=1)
        paged_decode_attention(q, bt, sl, cache, layer=1, out=out, workspace=ws, max_seq_len=4096,
                               config=DecodeConfig(num_splits=8))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for _ in range(2):
        q.normal_()
        k.normal_()
        v.normal_()
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ref = paged_decode_attention_ref(q, alloc.arena, alloc.handle_table, layout_of(alloc), bt, sl, layer=1)
        torch.testing.assert_close(out.double(), ref, **TOL[dtype])
        kk, vv, _ = gather_kv(alloc.arena, alloc.handle_table, layout_of(alloc), bt[1], seq_lens[1] + 1, 1, dtype)
        assert torch.equal(kk[-1], k[1]) and torch.equal(vv[-1], v[1])


@gpu
@needs_cuda
def test_gpu_torch_compile():
    seq_lens = [513, 4096]
    alloc, bt = _gpu_case(torch.bfloat16, 32, 8, 128, seq_lens)
    q = torch.randn(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    sl = i32(seq_lens)
    cache = PagedCache.of(alloc)
    f = torch.compile(lambda q: paged_decode_attention(q, bt, sl, cache, layer=1) * 2, fullgraph=True)
    torch.testing.assert_close(f(q), paged_decode_attention(q, bt, sl, cache, layer=1) * 2, rtol=0, atol=0)


@gpu
@needs_cuda
def test_gpu_arena_over_4gib():
    """Pages past byte 2**32 of the arena (int64 offsets from the table all the way)."""
    dtype, hkv, D, P = torch.bfloat16, 8, 128, 16
    spec = make_spec(hkv, D, layers=2, dtype=dtype)
    lay = kv_page_layout(spec, P)
    page = spec.kv_bytes_per_token * P
    try:
        arena = torch.empty((1 << 32) + 64 * page, dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 4 GiB+ arena")
    arena.view(dtype)[-(64 * page // 2):].normal_()
    handles = torch.randperm(64)[:40]
    table = torch.full((100,), -1, dtype=torch.int64)
    table[handles + 30] = (1 << 32) + torch.randperm(64)[:40].long() * page
    kinds = (table >= 0).int().cuda()  # every bound handle a KV page
    table = table.cuda()
    seq_lens = [300, 17, 280]
    bt = torch.full((3, 21), -1, dtype=torch.int32)
    bt[0, :19], bt[1, :2], bt[2, :18] = (handles[:19] + 30), (handles[19:21] + 30), (handles[21:39] + 30)
    bt, sl = bt.cuda(), i32(seq_lens)
    q = torch.randn(3, 32, D, device="cuda", dtype=dtype)
    cache = PagedCache(arena=arena, handle_table=table, handle_kinds=kinds, kv_layout=lay, num_attn_layers=2,
                       kv_dtype=dtype)
    out = paged_decode_attention(q, bt, sl, cache, layer=1, config=DecodeConfig(num_splits=3))
    ref = paged_decode_attention_ref(q, arena, table, lay, bt, sl, layer=1)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    k = torch.randn(1, hkv, D, device="cuda", dtype=dtype)
    kv_append(k, k, bt, i32([2]), i32([279]), cache, layer=0)
    kk, vv, _ = gather_kv(arena, table, lay, bt[2], 280, 0, dtype)
    assert torch.equal(kk[-1], k[0]) and torch.equal(vv[-1], k[0])
