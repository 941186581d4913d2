"""Paged prefill / append attention against the pure-torch reference.

Pages come from a real AVMPAllocator and are scattered into the block tables with randperm; the
whole arena holds random values (other layers, other pages, SSM blocks), each request's K/V are
written into its pages through the layout by a helper of this file (no dependency on kv_append).
Outputs are NaN-poisoned; the arena, the tables and the inputs must come back unchanged.
"""
import math
import re

import pytest
import torch

from avmp_triton import AVMPAllocator, HybridModelSpec, PagedCache
from avmp_triton.layout import kv_page_layout
from avmp_triton.ops.paged_prefill import PrefillConfig, paged_prefill_attention, prefill_launch_config, resolve_pages
from avmp_triton.reference.paged_prefill import causal_attention_ref, paged_prefill_attention_ref, resolve_pages_ref

from test_paged_attention import lanes_padded, live_elements

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
SLAB_PAGES = 4


def make_spec(num_kv_heads, head_dim, dtype, num_layers, page_tokens):
    return HybridModelSpec(
        name="prefill-test", num_attn_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
        kv_dtype=dtype, num_mamba_layers=1, mamba_version=1, d_inner=8, d_state=4,
        conv_dtype=torch.float32, ssm_dtype=torch.float32, page_tokens=page_tokens)


def write_kv(arena, handle_table, handles, k, v, layout, layer):
    """Write one request's K/V ``[L, Hkv, D]`` into its pages, through ``layout.elem_offset``."""
    L, Hkv, D = k.shape
    elems = arena.view(k.dtype)
    dev = k.device
    t = torch.arange(L, device=dev)
    page_off = handle_table[handles.long()[t // layout.page_tokens]] // layout.elem_bytes
    head = torch.arange(Hkv, device=dev)[None, :, None]
    tok = (t % layout.page_tokens)[:, None, None]
    dim = torch.arange(D, device=dev)[None, None, :]
    for kv, src in ((0, k), (1, v)):
        elems[page_off[:, None, None] + layout.elem_offset(layer, kv, head, tok, dim)] = src


class Case:
    """A batch of requests over scattered pages of a real allocator, K/V written in place."""

    def __init__(self, q_lens, prefixes, hq, hkv, d, page_tokens, layer, dtype=torch.float32,
                 extra_pages=7, pad_cols=2, num_layers=None, spread=False, device=DEVICE, gen=None):
        self.gen = gen
        self.num_layers = num_layers or layer + 2
        self.spec = make_spec(hkv, d, dtype, self.num_layers, page_tokens)
        self.layout = kv_page_layout(self.spec)
        self.layer, self.dtype, self.device = layer, dtype, device
        P = page_tokens
        self.ctx = [p + q for p, q in zip(prefixes, q_lens)]
        n_pages = [-(-c // P) for c in self.ctx]
        n_total = sum(n_pages) + extra_pages
        page = self.spec.kv_bytes_per_token * P
        kv_slabs = -(-n_total // SLAB_PAGES)
        slabs = kv_slabs + 2
        self.alloc = AVMPAllocator(self.spec, slabs * SLAB_PAGES * page, device=device,
                                   slab_bytes=SLAB_PAGES * page, page_tokens=P, kv_fraction=kv_slabs / slabs)
        # every element random (other layers, unused pages, SSM blocks), never zeros
        self.alloc.arena.view(dtype).normal_(generator=gen if device == "cpu" else None)
        self.handles = self.alloc.alloc_kv(n_total)
        perm = self.handles[torch.randperm(n_total, generator=gen).to(device)]
        if spread:  # round robin over the slabs: the k-th page of every slab before any (k+1)-th
            slab = (self.alloc.handle_table[perm.long()] // self.alloc.slab_bytes).tolist()
            count, rank = {}, []
            for s_ in slab:
                rank.append(count.get(s_, 0))
                count[s_] = rank[-1] + 1
            perm = perm[torch.tensor(rank).argsort(stable=True).to(device)]
        B = len(q_lens)
        self.block_table = torch.full((B, max(n_pages) + pad_cols), -1, dtype=torch.int32, device=device)
        self.k, self.v = [], []
        i = 0
        for b, c in enumerate(self.ctx):
            self.block_table[b, :n_pages[b]] = perm[i:i + n_pages[b]]
            i += n_pages[b]
            k = self.randn(c, hkv, d)
            v = self.randn(c, hkv, d)
            write_kv(self.alloc.arena, self.alloc.handle_table, self.block_table[b], k, v, self.layout, layer)
            self.k.append(k)
            self.v.append(v)
        self.spare = perm[i:]  # live pages no request uses
        cu = [0]
        for ql in q_lens:
            cu.append(cu[-1] + ql)
        self.cu = torch.tensor(cu, dtype=torch.int32, device=device)
        self.seq_lens = torch.tensor(self.ctx, dtype=torch.int32, device=device)
        self.q_lens = list(q_lens)
        self.q = self.randn(cu[-1], hq, d)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen, device="cpu").to(self.device, self.dtype)

    def args(self, **over):
        """The op's arguments and, under ``CACHE_KEYS``, those of a ``PagedCache`` built by hand
        over the allocator's tensors (the low-level path); ``call`` runs them."""
        a = dict(q=self.q, cu_seqlens_q=self.cu, seq_lens=self.seq_lens, block_table=self.block_table,
                 arena=self.alloc.arena, handle_table=self.alloc.handle_table, kv_layout=self.layout,
                 handle_kinds=self.alloc.handle_kind, num_attn_layers=self.num_layers, kv_dtype=self.dtype,
                 layer=self.layer)
        a.update(over)
        return a

    def run(self, **kw):
        """The op on NaN-poisoned ``out``; ``kw``: its keywords (``config``, ``max_seqlen_q``, ...)."""
        out = torch.full_like(self.q, float("nan"))
        got = call(self.args(), out=out, **kw)
        assert got is out
        return out

    def cache(self):
        return PagedCache(**split_args(self.args())[0])

    def offsets(self):
        """``resolve_pages`` of the block table as it is now."""
        return resolve_pages(self.block_table, self.cache())

    def reference(self):
        return paged_prefill_attention_ref(self.q, self.cu, self.seq_lens, self.block_table, self.alloc.arena,
                                           self.alloc.handle_table, self.layout, self.layer)

    def direct(self):
        """Causal attention on the K/V as written, without pages: checks the reference's gather too."""
        scale = self.q.shape[-1] ** -0.5
        cu = self.cu.tolist()
        return torch.cat([causal_attention_ref(self.q[cu[b]:cu[b + 1]], self.k[b], self.v[b], scale).float()
                          for b in range(len(self.ctx))])


# the keywords of a hand-built PagedCache among ``Case.args``
CACHE_KEYS = ("arena", "handle_table", "handle_kinds", "kv_layout", "num_attn_layers", "kv_dtype")


def split_args(args: dict) -> tuple[dict, dict]:
    """(the ``PagedCache(...)`` keywords, the op's own arguments) of ``Case.args``."""
    op_args = dict(args)
    return {k: op_args.pop(k) for k in CACHE_KEYS}, op_args


def call(args: dict, **kw):
    """``paged_prefill_attention`` on ``Case.args``, over a PagedCache built by hand from them."""
    cache_kw, a = split_args(args)
    q, bt, sl, cu = (a.pop(k) for k in ("q", "block_table", "seq_lens", "cu_seqlens_q"))
    return paged_prefill_attention(q, bt, sl, cu, PagedCache(**cache_kw), **a, **kw)


def _fresh_gen():
    seed = torch.seed() % 2**31
    print(f"seed {seed}")  # fresh inputs each run; pytest shows the seed of a failing test
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def gen():
    return _fresh_gen()


def check_case(case, **kw):
    before = (case.alloc.arena.clone(), case.alloc.handle_table.clone(), case.block_table.clone(), case.q.clone())
    out = case.run(**kw)
    assert torch.isfinite(out).all(), "an output element was left unwritten (NaN poison) or overflowed"
    ref = case.reference()
    torch.testing.assert_close(out.float(), ref, **TOL[case.dtype])
    torch.testing.assert_close(ref, case.direct(), atol=1e-5, rtol=1e-5)
    after = (case.alloc.arena, case.alloc.handle_table, case.block_table, case.q)
    for x, y, name in zip(before, after, ("arena", "handle_table", "block_table", "q")):
        assert torch.equal(x, y), f"{name} was modified"
    return out


# q_lens, prefixes, (Hq, Hkv), D, page_tokens, layer
CASES = {
    "one-request": ([5], [0], (2, 2), 64, 16, 0),
    "gqa-two": ([1, 17], [33, 15], (4, 2), 64, 16, 1),
    "three-p8": ([17, 5, 1], [0, 33, 15], (4, 2), 64, 8, 2),
    "d128": ([5, 17], [15, 0], (2, 2), 128, 8, 1),
    "gqa3-empty-request": ([17, 0, 1], [33, 20, 0], (3, 1), 64, 16, 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, gen):
    q_lens, prefixes, (hq, hkv), d, p, layer = CASES[name]
    check_case(Case(q_lens, prefixes, hq, hkv, d, p, layer, gen=gen))


@pytest.mark.parametrize("d,dtype,hq,hkv", [
    pytest.param(160, torch.float32, 8, 2, id="d160-fp32-gqa4"),
    pytest.param(160, torch.bfloat16, 2, 2, id="d160-bf16-mha"),   # Zamba2-2.7B: 32 q / 32 kv heads
    pytest.param(80, torch.bfloat16, 8, 2, id="d80-bf16-gqa4"),
    pytest.param(80, torch.float32, 3, 1, id="d80-fp32-gqa3"),
])
def test_head_dims_not_powers_of_two(d, dtype, hq, hkv, gen):
    """Tiles padded to a power of two of lanes (160 -> 256, 80 -> 128): nothing past D is read (q's
    rows sit in wider rows of NaN, and every arena element outside the live K/V rows is NaN) or
    written (out's rows sit in wider rows of 7s)."""
    case = Case([5, 17], [15, 0], hq, hkv, d, 8, 1, dtype=dtype, gen=gen)
    case.q, _ = lanes_padded(case.q, float("nan"))
    dead = torch.ones(case.alloc.arena.numel() // dtype.itemsize, dtype=torch.bool, device=DEVICE)
    dead[live_elements(case.alloc, case.block_table, case.ctx).to(DEVICE)] = False
    case.alloc.arena.view(dtype)[dead] = float("nan")
    want = check_case(case)
    out, out_rows = lanes_padded(torch.full_like(want, float("nan")), 7.0)
    assert call(case.args(), out=out) is out
    assert torch.equal(out, want)
    assert (out_rows[..., d:] == 7).all(), "written past D"


@pytest.mark.parametrize("blocks", [dict(config=PrefillConfig(block_m=16, block_n=16)),
                                    dict(config=PrefillConfig(block_n=64, num_warps=8)),
                                    dict(config=PrefillConfig(block_n=32)),
                                    dict(max_seqlen_q=17)])
def test_block_overrides(blocks, gen):
    # block_m=16 with 2 heads per group: 8-token tiles, several diagonal tiles per request;
    # block_n=64 spans 8 pages of 8 tokens, more than any request holds; block_n=32 spans 4
    check_case(Case([17, 5], [33, 0], 4, 2, 64, 8, 1, gen=gen), **blocks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, gen):
    check_case(Case([5, 17], [15, 33], 4, 2, 64, 16, 1, dtype=dtype, gen=gen))


def test_entries_past_live_pages_are_never_read(gen):
    """-1 padding and live handles of other requests past the live pages give the same output."""
    case = Case([17, 5], [15, 33], 4, 2, 64, 8, 1, pad_cols=4, gen=gen)
    first = check_case(case)
    for b, c in enumerate(case.ctx):
        n = -(-c // case.layout.page_tokens)
        w = case.block_table.shape[1] - n
        case.block_table[b, n:] = case.spare[torch.randint(0, case.spare.numel(), (w,), generator=gen)]
    assert torch.equal(case.run(), first)


def test_missing_pages_are_skipped(gen, device_checks_only):
    """Needed entries that are -1, freed or out of range hide their positions; nothing sees garbage."""
    case = Case([17, 5, 1], [33, 15, 0], 4, 2, 64, 8, 1, extra_pages=3, gen=gen)
    a = case.alloc
    freed = case.spare[:1]
    a.free(freed)
    case.block_table[0, 1] = -1                 # request 0: positions 8..15
    case.block_table[0, 3] = freed[0]           # request 0: positions 24..31 (free handle)
    case.block_table[1, 0] = a.num_handles + 5  # request 1: positions 0..7 (no such handle)
    case.block_table[2, 0] = -1                 # request 2: its only token sees nothing -> zeros
    out = case.run()
    assert torch.isfinite(out).all()
    assert_hidden(case, out, {0: [(8, 16), (24, 32)], 1: [(0, 8)], 2: [(0, 1)]})
    cu2 = int(case.cu[2])
    assert torch.equal(out[cu2:], torch.zeros_like(out[cu2:]))
    assert torch.equal(case.run(page_offsets=case.offsets()), out)


def assert_hidden(case, out, hidden):
    """Each request b's rows of ``out`` attend to its K/V except the position ranges ``hidden[b]``."""
    cu = case.cu.tolist()
    scale = case.q.shape[-1] ** -0.5
    for b in range(len(case.ctx)):
        valid = torch.ones(case.ctx[b], dtype=torch.bool)
        for lo, hi in hidden.get(b, []):
            valid[lo:hi] = False
        want = causal_attention_ref(case.q[cu[b]:cu[b + 1]], case.k[b], case.v[b], scale, key_valid=valid)
        torch.testing.assert_close(out[cu[b]:cu[b + 1]], want.float(), **TOL[case.dtype])


def _scattered_handles(case, gen, shape):
    """Handles of every kind in a random layout: live KV pages, -1, out of range (both sides),
    freed KV pages and SSM blocks."""
    a = case.alloc
    freed = case.spare[:1]
    a.free(freed)
    pool = torch.cat([case.handles.cpu(), torch.tensor([-1, -2, a.num_handles, a.num_handles + 5, 2**31 - 1]),
                      freed.cpu(), a.alloc_ssm(2).cpu()]).int()
    return pool[torch.randint(pool.numel(), shape, generator=gen)].to(DEVICE)


def test_resolve_pages(gen, device_checks_only):
    """The kernel against ``resolve_pages_ref``: a usable KV page's element offset, -1 for padding,
    handles out of range, freed ones and SSM blocks; over several programs and a strided table. The
    op over the offsets reads what it reads when it resolves them itself, bit for bit."""
    case = Case([17, 5], [33, 0], 4, 2, 64, 8, 1, extra_pages=3, gen=gen)
    a = case.alloc
    for bt in (_scattered_handles(case, gen, (3, 700)), _scattered_handles(case, gen, (4, 10))[:, ::2]):
        buf = torch.full(bt.shape, 123, dtype=torch.int64, device=DEVICE)
        got = resolve_pages(bt, case.cache(), out=buf)
        assert got is buf
        want = resolve_pages_ref(bt, a.handle_table, a.handle_kind, case.layout.elem_bytes)
        assert torch.equal(buf, want)
        assert (want == -1).any() and (want >= 0).any()
    case.block_table[0, 1] = -1
    case.block_table[0, 3] = case.spare[0]          # freed
    case.block_table[1, 0] = a.num_handles + 5      # no such handle
    case.block_table[0, 4] = a.alloc_ssm(1)[0]      # an SSM block
    po = resolve_pages(case.block_table, case.cache())
    assert (po[0, [1, 3, 4]] == -1).all() and int(po[1, 0]) == -1
    assert torch.equal(case.run(page_offsets=po), case.run())


def test_resolve_pages_empty(small_case):
    bt = small_case.block_table[:0]
    assert resolve_pages(bt, small_case.cache()).shape == (0, 3)


def test_bad_page_offsets_are_skipped(gen, device_checks_only):
    """On a GPU page_offsets are never read on the host: an entry the kernel cannot take (negative,
    off the 16-byte grid, or leaving no whole page before the arena's end) hides its page."""
    case = Case([17, 5], [33, 0], 4, 2, 64, 8, 1, gen=gen)
    po = case.offsets()
    align = 16 // case.layout.elem_bytes
    last = case.alloc.arena.numel() // case.layout.elem_bytes - case.num_layers * case.layout.stride_layer
    po[0, 1] = -7
    po[0, 3] += 1
    po[1, 0] = last + align
    out = case.run(page_offsets=po)
    assert_hidden(case, out, {0: [(8, 16), (24, 32)], 1: [(0, 8)]})
    po[1, 0] = case.offsets()[1, 0]
    assert_hidden(case, case.run(page_offsets=po), {0: [(8, 16), (24, 32)]})


@pytest.mark.parametrize("page_tokens,block_n", [
    pytest.param(1, 64, id="p1-n64-64-pages-a-block"),   # too many pages for the mask's bits
    pytest.param(2, 64, id="p2-n64-32-pages"),           # the mask's sign bit
    pytest.param(4, 64, id="p4-n64-16-pages"),           # a page tile, its bits reduced
    pytest.param(32, 16, id="p32-n16-part-of-a-page"),
    pytest.param(8, 32, id="p8-n32-4-pages-unrolled"),
    pytest.param(8, 64, id="p8-n64-8-pages-unrolled"),
    pytest.param(16, 16, id="p16-n16-1-page-unrolled"),
])
def test_page_masks(page_tokens, block_n, gen, device_checks_only):
    """Missing pages in every form the kernel masks them (bits of one int32, the row mask itself,
    a block inside one page, pages unrolled as scalars), the first and the last page of a block
    among them."""
    P = page_tokens
    case = Case([17, 5], [60, 3], 4, 2, 32, P, 1, gen=gen)
    last = block_n // P - 1 if block_n >= P else 0
    hidden = {0: sorted({1, last, 40 // P}), 1: [0]}
    for b, pages in hidden.items():
        for j in pages:
            case.block_table[b, j] = -1
    out = case.run(config=PrefillConfig(block_n=block_n))
    assert_hidden(case, out, {b: [(j * P, (j + 1) * P) for j in pages] for b, pages in hidden.items()})


@pytest.mark.parametrize("draw", range(4))
def test_random_batches(draw, gen):
    """Random mixes of the odd sizes: B 1-3, q lens {1, 5, 17}, prefixes {0, 15, 33}, pages 8 / 16."""
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]  # noqa: E731
    B = pick([1, 2, 3])
    hq, hkv = pick([(4, 2), (2, 2), (4, 1)])
    case = Case([pick([1, 5, 17]) for _ in range(B)], [pick([0, 15, 33]) for _ in range(B)], hq, hkv, 64,
                pick([8, 16]), pick([0, 1]), gen=gen)
    check_case(case)


def test_compaction_between_calls(gen):
    """Live pages move (handles rebound) between two calls; the output stays bit-identical."""
    # 9 pages spread one per slab over 9 of 12 KV slabs; the spare pages are freed: 3 free slabs
    case = Case([17, 5, 1], [15, 33, 60], 4, 2, 64, 16, 1, extra_pages=39, spread=True, gen=gen)
    a = case.alloc
    a.free(case.spare)
    first = check_case(case)
    offsets = a.handle_table.clone()
    free_slabs = a.stats().pools["kv"].free_slabs
    assert free_slabs == 3
    a.rebalance("ssm", free_slabs + 2)  # the free slabs, then two slabs emptied by compaction
    assert a.stats().units_moved == 2
    live = case.block_table[case.block_table >= 0].long()
    assert int((a.handle_table[live] != offsets[live]).sum()) == 2, "the compacted pages are the batch's"
    second = case.run()
    assert torch.equal(second, first)
    torch.testing.assert_close(second, case.reference(), **TOL[case.dtype])


def test_rows_past_cu_end_are_left_alone(gen, device_checks_only):
    """q may be padded (a fixed-size buffer): rows past cu_seqlens_q[B] are not written."""
    case = Case([5, 17], [15, 0], 4, 2, 64, 16, 1, gen=gen)
    q = torch.cat([case.q, case.randn(3, *case.q.shape[1:])])
    out = torch.full_like(q, float("nan"))
    assert call(case.args(q=q), out=out) is out
    assert torch.isnan(out[-3:]).all()
    torch.testing.assert_close(out[:-3], case.reference(), **TOL[case.dtype])


def test_allocator_form_matches_arena_form(gen):
    """PagedCache.of(alloc) reads the allocator's arena, table, layout and layer count: the same
    output as a cache built by hand over those tensors."""
    case = Case([5, 17], [15, 0], 4, 2, 64, 16, 1, gen=gen)
    want = call(case.args())
    cache = PagedCache.of(case.alloc)
    q, bt, sl, cu = case.q, case.block_table, case.seq_lens, case.cu
    got = paged_prefill_attention(q, bt, sl, cu, cache, layer=case.layer)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=re.escape(f"layer must be an int in [0, {case.num_layers}) (the cache's "
                                                   f"attention layers), got {case.num_layers}")):
        paged_prefill_attention(q, bt, sl, cu, cache, layer=case.num_layers)
    with pytest.raises(TypeError, match="required keyword-only argument: 'layer'"):
        paged_prefill_attention(q, bt, sl, cu, cache)        # layer has no default
    for not_a_cache in (case.alloc, case.alloc.arena):
        with pytest.raises(TypeError, match=re.escape("cache must be a PagedCache (PagedCache.of(allocator)), got "
                                                      f"{type(not_a_cache).__name__}")):
            paged_prefill_attention(q, bt, sl, cu, not_a_cache, layer=case.layer)
    with pytest.raises(TypeError, match="allocator must be an arena allocator .*got Tensor"):
        PagedCache.of(case.alloc.arena)
    with pytest.raises(TypeError, match="q must have the KV dtype torch.float32, got torch.float16"):
        paged_prefill_attention(q.half(), bt, sl, cu, cache, layer=case.layer)
    with pytest.raises(TypeError, match="kv_dtype torch.float16 is 2 bytes, the kv_layout's elements 4"):
        PagedCache(**split_args(case.args(kv_dtype=torch.float16))[0])   # a layout of another dtype
    with pytest.raises(TypeError, match="config must be a PrefillConfig or None, got dict"):
        paged_prefill_attention(q, bt, sl, cu, cache, layer=case.layer, config=dict(block_m=16))


def _i32(*shape):
    return torch.zeros(*shape, dtype=torch.int32, device=DEVICE)


def test_empty_batch():
    case = Case([3], [0], 2, 2, 64, 16, 0)
    q = case.q[:0]
    out = call(case.args(q=q, cu_seqlens_q=_i32(2), seq_lens=_i32(1)))
    assert out.shape == (0, 2, 64)
    out = call(case.args(q=q, cu_seqlens_q=_i32(1), seq_lens=_i32(0), block_table=case.block_table[:0]))
    assert out.shape == (0, 2, 64)


# name -> (overrides built from a valid case, exception, message pattern)
BAD = {
    "q-not-tensor": (lambda c: dict(q=c.q.tolist()), TypeError, "q must be a torch.Tensor, got list"),
    "q-2d": (lambda c: dict(q=c.q[:, 0]), ValueError, r"q must be 3-D, got shape \(8, 64\)"),
    "q-int": (lambda c: dict(q=c.q.to(torch.int32)), TypeError,
              "q must be torch.float16 or torch.bfloat16 or torch.float32, got torch.int32"),
    "q-strided": (lambda c: dict(q=c.q.transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
                  "q must have a contiguous last dim"),
    "cu-int64": (lambda c: dict(cu_seqlens_q=c.cu.long()), TypeError, "cu_seqlens_q must be torch.int32, got torch.int64"),
    "cu-length": (lambda c: dict(cu_seqlens_q=c.cu[:-1]), ValueError, r"cu_seqlens_q must have B\+1 = 3 .*got 2"),
    "seq-lens-2d": (lambda c: dict(seq_lens=c.seq_lens[None]), ValueError, r"seq_lens must be 1-D, got shape \(1, 2\)"),
    "seq-lens-strided": (lambda c: dict(seq_lens=_i32(4)[::2]), ValueError, r"seq_lens must be contiguous, got strides \(2,\)"),
    "block-table-rows": (lambda c: dict(block_table=c.block_table[:1]), ValueError, r"block_table must have B = 2 rows, got shape \(1, "),
    "block-table-int64": (lambda c: dict(block_table=c.block_table.long()), TypeError,
                          "block_table must be torch.int32, got torch.int64"),
    "block-table-cols": (lambda c: dict(block_table=c.block_table.t().contiguous().t()), ValueError,
                         "block_table rows must be contiguous"),
    # a bad tensor or layout of the cache: PagedCache(...) raises, before any op (CACHE_ERRORS)
    "handle-table-int32": (lambda c: dict(handle_table=c.alloc.handle_table.int()), TypeError,
                           "handle_table must be torch.int64, got torch.int32"),
    "arena-dtype": (lambda c: dict(arena=c.alloc.arena.view(torch.int32)), TypeError,
                    "arena must be torch.uint8, got torch.int32"),
    "arena-2d": (lambda c: dict(arena=c.alloc.arena.view(2, -1)), ValueError, r"arena must be 1-D, got shape \(2, "),
    "layout-type": (lambda c: dict(kv_layout=dict(page_tokens=16)), TypeError, "kv_layout must be a KVPageLayout, got dict"),
    # q in another dtype than the cache's K/V (the layout's elements)
    "layout-dtype": (lambda c: dict(q=c.q.half()), TypeError, "q must have the KV dtype torch.float32, got torch.float16"),
    "head-dim-layout": (lambda c: dict(q=c.q[..., :32].contiguous()), ValueError,
                        "q's head dim D=32 differs from layout.head_dim=64"),
    "head-dim-rule": (lambda c: dict(q=c.q[..., :12].contiguous()), ValueError,
                      re.escape("q has head_dim 12; the attention kernels take a multiple of 8 in [16, 256]")),
    "gqa": (lambda c: dict(q=c.q[:, :3].contiguous()), ValueError, "Hq=3 must be a positive multiple"),
    "layer-negative": (lambda c: dict(layer=-1), ValueError,
                       r"layer must be an int in \[0, 3\) \(the cache's attention layers\), got -1"),
    "layer-range": (lambda c: dict(layer=c.num_layers), ValueError,
                    r"layer must be an int in \[0, 3\) \(the cache's attention layers\), got 3"),
    # layers past the arena's end: the cache's pages of that many layers do not fit in it
    "layer-arena": (lambda c: dict(num_attn_layers=10**9, layer=10**9 - 1), ValueError,
                    "a page of num_attn_layers=1000000000 layers is .* bytes, more than the arena's"),
    "scale": (lambda c: dict(scale=float("nan")), ValueError, "scale must be a positive finite float, got nan"),
    "out-shape": (lambda c: dict(out=torch.empty(8, 4, 65, device=DEVICE)), ValueError,
                  r"out must have q's shape \(8, 4, 64\), got \(8, 4, 65\)"),
    "out-device": (lambda c: dict(out=torch.empty(8, 4, 64, device="meta")), ValueError, "out is on meta"),
    "out-dtype": (lambda c: dict(out=torch.empty(8, 4, 64, dtype=torch.float64, device=DEVICE)), TypeError,
                  "out must be torch.float32, got torch.float64"),
    "block-m": (lambda c: dict(config=PrefillConfig(block_m=24)), ValueError, "block_m must be a power of two >= 16, got 24"),
    "block-n": (lambda c: dict(config=PrefillConfig(block_n=8)), ValueError, "block_n must be a power of two >= 16, got 8"),
    "num-warps": (lambda c: dict(config=PrefillConfig(num_warps=3)), ValueError, "num_warps .*got 3"),
    "num-stages": (lambda c: dict(config=PrefillConfig(num_stages=0)), ValueError, "num_stages .*got 0"),
    "page-offsets-int32": (lambda c: dict(page_offsets=c.offsets().int()), TypeError,
                           "page_offsets must be torch.int64, got torch.int32"),
    "page-offsets-shape": (lambda c: dict(page_offsets=c.offsets()[:, :-1]), ValueError,
                           r"page_offsets must have block_table's shape \(2, 3\), got \(2, 2\)"),
    "page-offsets-stale": (lambda c: dict(page_offsets=c.offsets() + 16), ValueError,
                           r"page_offsets\[0, 0\]=\d+ differs from resolve_pages' \d+ for handle \d+ \(stale"),
    "max-seqlen-q": (lambda c: dict(max_seqlen_q=0), ValueError, "max_seqlen_q must be a positive int, got 0"),
    "no-requests": (lambda c: dict(cu_seqlens_q=_i32(1), seq_lens=_i32(0), block_table=c.block_table[:0]),
                    ValueError, "q has T=8 tokens but there are no requests"),
}
CACHE_ERRORS = {"handle-table-int32", "arena-dtype", "arena-2d", "layout-type", "layer-arena"}


@pytest.fixture(scope="module")
def small_case():
    return Case([5, 3], [4, 0], 4, 2, 64, 16, 1)


@pytest.mark.parametrize("bad", list(BAD))
def test_validation_names_the_bad_value(bad, small_case):
    make, exc, match = BAD[bad]
    before = small_case.alloc.arena.clone()
    args = small_case.args(**make(small_case))
    if bad in CACHE_ERRORS:
        with pytest.raises(exc, match=match):
            PagedCache(**split_args(args)[0])
    else:
        with pytest.raises(exc, match=match):
            call(args)
    assert torch.equal(small_case.alloc.arena, before)


def test_resolve_pages_validation(small_case):
    bt, cache = small_case.block_table, small_case.cache()
    with pytest.raises(TypeError, match="block_table must be torch.int32, got torch.int64"):
        resolve_pages(bt.long(), cache)
    with pytest.raises(ValueError, match=r"out must have block_table's shape \(2, 3\), got \(2, 4\)"):
        resolve_pages(bt, cache, out=torch.empty(2, 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(TypeError, match="out must be torch.int64, got torch.int32"):
        resolve_pages(bt, cache, out=torch.empty(2, 3, dtype=torch.int32, device=DEVICE))


def test_block_m_smaller_than_group():
    # Hq // Hkv = 32 query heads per KV head do not fit 16 rows
    c = Case([2], [0], 32, 1, 64, 16, 0)
    with pytest.raises(ValueError, match="block_m=16 must be >= Hq // Hkv = 32"):
        call(c.args(), config=PrefillConfig(block_m=16))


@pytest.mark.parametrize("d", [64, 80, 128, 160, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gqa", [1, 4, 7, 64])
def test_default_configs_are_launchable(d, dtype, gqa):
    lanes = 1 << (d - 1).bit_length()  # the kernel's tile width: shared memory goes by it, not by d
    for on_gpu in (True, False):
        for max_q in (None, 1, 5, 4096):
            cfg = prefill_launch_config(d, dtype, gqa, on_gpu=on_gpu, max_seqlen_q=max_q)
            assert isinstance(cfg, PrefillConfig)
            bm, bn, warps, stages = cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages
            assert bm >= 16 and bm & (bm - 1) == 0 and bm >= gqa
            assert bn >= 16 and bn & (bn - 1) == 0
            assert warps in (4, 8) and stages >= 1
            if on_gpu:  # K and V tiles of every stage within an H100's 227 KiB of shared memory
                assert 2 * bn * lanes * dtype.itemsize * stages <= 227 << 10


def test_custom_op_opcheck(gen):
    c = Case([5, 2], [3, 0], 2, 1, 16, 8, 1, gen=gen)
    L = c.layout
    kv = c.alloc.arena.view(c.dtype)
    po = torch.empty(c.block_table.shape, dtype=torch.int64, device=DEVICE)
    resolve = (c.block_table, c.alloc.handle_table, c.alloc.handle_kind, po, L.elem_bytes)
    torch.library.opcheck(torch.ops.avmp.resolve_pages.default, resolve)
    torch.ops.avmp.resolve_pages(*resolve)
    # q, offsets, metadata, the arena (as q's dtype), out, static ints, a page's elements
    args = (c.q, po, c.seq_lens, c.cu, kv, torch.empty_like(c.q), L.page_tokens, L.num_kv_heads,
            c.layer * L.stride_layer, L.stride_kv, L.stride_head, L.stride_token, 0.25, 16, 16, 4, 1,
            c.num_layers * L.stride_layer)
    torch.library.opcheck(torch.ops.avmp.paged_prefill_attention.default, args)
    out = torch.full_like(c.q, float("nan"))
    torch.ops.avmp.paged_prefill_attention(*args[:5], out, *args[6:])
    ref = paged_prefill_attention_ref(c.q, c.cu, c.seq_lens, c.block_table, c.alloc.arena,
                                      c.alloc.handle_table, L, c.layer, scale=0.25)
    torch.testing.assert_close(out, ref, **TOL[c.dtype])
    with pytest.raises(ValueError, match="page_elems, a KV page's elements, must be >= 1, got 0"):
        torch.ops.avmp.paged_prefill_attention(*args[:-1], 0)


# ------------------------------------------------------------------ GPU, real sizes
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("resolved", [False, True])
def test_gpu_real_sizes(dtype, resolved):
    # 32 query / 8 KV heads, D=128, prefixes up to 4096, 512-token chunks, a decode-like request
    case = Case([512, 512, 300, 1], [0, 1024, 4096, 4095], 32, 8, 128, 16, 1, dtype=dtype,
                extra_pages=64, device="cuda", gen=_fresh_gen())
    out = case.run(page_offsets=case.offsets() if resolved else None)
    assert torch.isfinite(out).all()
    ref = case.reference()
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("d,hq,hkv,page_tokens", [(64, 16, 2, 16), (256, 8, 8, 32), (128, 28, 4, 64),
                                                  (160, 32, 32, 16), (160, 16, 4, 16), (80, 8, 2, 32)])
def test_gpu_head_dims(d, hq, hkv, page_tokens):
    case = Case([333, 64, 7], [1500, 0, 2049], hq, hkv, d, page_tokens, 2, dtype=torch.bfloat16,
                device="cuda", gen=_fresh_gen())
    out = case.run()
    torch.testing.assert_close(out.float(), case.reference(), **TOL[torch.bfloat16])


@pytest.mark.gpu
@requires_cuda
def test_gpu_fp32_and_overrides():
    case = Case([129, 17], [700, 31], 8, 2, 128, 16, 0, device="cuda", gen=_fresh_gen())
    ref = case.reference()
    for kw in ({}, dict(config=PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)),
               dict(max_seqlen_q=129)):
        torch.testing.assert_close(case.run(**kw), ref, **TOL[torch.float32])


@pytest.mark.gpu
@requires_cuda
def test_gpu_arena_over_4gib():
    """int64 addressing: every page of the batch sits past 4 GiB."""
    spec = make_spec(8, 128, torch.bfloat16, 2, 16)
    layout = kv_page_layout(spec)
    alloc = AVMPAllocator(spec, (4 << 30) + (256 << 20), device="cuda", kv_fraction=0.95)
    page = alloc.unit_bytes[0]
    skip = alloc.alloc_kv((4 << 30) // page + 8)
    assert int(alloc.resolve(skip[-1:])[0]) >= 4 << 30
    q_lens, prefixes = [256, 31], [1000, 3000]
    n_pages = [-(-(p + q) // 16) for p, q in zip(prefixes, q_lens)]
    handles = alloc.alloc_kv(sum(n_pages))
    assert int(alloc.resolve(handles).min()) > 4 << 30
    handles = handles[torch.randperm(handles.numel(), device="cuda")]
    bt = torch.full((2, max(n_pages) + 3), -1, dtype=torch.int32, device="cuda")
    g = _fresh_gen()
    i = 0
    for b, (p, ql) in enumerate(zip(prefixes, q_lens)):
        bt[b, :n_pages[b]] = handles[i:i + n_pages[b]]
        i += n_pages[b]
        kv = torch.randn(2, p + ql, 8, 128, generator=g).to("cuda", torch.bfloat16)
        write_kv(alloc.arena, alloc.handle_table, bt[b], kv[0], kv[1], layout, 1)
    cu = torch.tensor([0, 256, 287], dtype=torch.int32, device="cuda")
    sl = torch.tensor([p + q for p, q in zip(prefixes, q_lens)], dtype=torch.int32, device="cuda")
    q = torch.randn(287, 32, 128, generator=g).to("cuda", torch.bfloat16)
    out = paged_prefill_attention(q, bt, sl, cu, PagedCache.of(alloc), layer=1)
    ref = paged_prefill_attention_ref(q, cu, sl, bt, alloc.arena, alloc.handle_table, layout, 1)
    torch.testing.assert_close(out.float(), ref, **TOL[torch.bfloat16])


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph_replay():
    """Fixed shapes, no host sync: a captured call replays over new contents and lengths."""
    case = Case([64, 64], [100, 300], 8, 2, 128, 16, 0, dtype=torch.bfloat16, device="cuda", gen=_fresh_gen())
    out = torch.empty_like(case.q)
    kw = dict(out=out, max_seqlen_q=64)
    call(case.args(), **kw)  # compile before capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call(case.args(), **kw)
    case.q.copy_(torch.randn_like(case.q))
    case.seq_lens.copy_(torch.tensor([150, 330], dtype=torch.int32))  # fewer live tokens, same pages
    case.cu.copy_(torch.tensor([0, 50, 100], dtype=torch.int32))
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    ref = case.reference()
    torch.testing.assert_close(out[:100].float(), ref[:100], **TOL[torch.bfloat16])
    assert math.isnan(float(out[100:].float().sum()))  # rows past cu[B] are left alone
