"""fp8 (float8_e4m3fn) KV pages in ``kv_append``, ``paged_decode_attention`` and
``paged_prefill_attention`` against the pure-torch references, with scales per layer and kv head
(``kv_scale`` ``[2, Hkv]``: K row, V row).

Pages come scattered from an ``AVMPAllocator`` whose spec stores K/V in fp8 while q, k, v and the
output stay in fp32 / bf16; every element no live token owns is NaN, so a read outside the live
tokens shows up. The decode reference dequantises the same stored bytes, so it must agree to fp32
rounding; the append reference quantises with torch, whose rounding the kernel must match to one
fp8 step (the interpreter's conversion rounds some ties the other way). Last, the error that fp8
pages add against unquantised K/V, with per-head scales from the data's absolute maximum.
"""
import dataclasses

import pytest
import torch

from avmp_triton import HybridModelSpec, PagedCache
from avmp_triton.ops import DecodeConfig, PrefillConfig, kv_append, paged_decode_attention, paged_prefill_attention
from avmp_triton.reference.paged_attention import kv_append_ref, paged_decode_attention_ref
from avmp_triton.reference.paged_prefill import paged_prefill_attention_ref
from tests.ops.test_paged_attention import DEVICE, TOL, i32, layout_of, live_elements, make_alloc, scattered_table

FP8 = torch.float8_e4m3fn


def fp8_spec(hkv: int, head_dim: int, layers: int = 2) -> HybridModelSpec:
    return HybridModelSpec(name=f"fp8-{hkv}x{head_dim}", num_attn_layers=layers, num_kv_heads=hkv,
                           head_dim=head_dim, kv_dtype=FP8, num_mamba_layers=1, mamba_version=1, d_inner=16,
                           d_state=4, conv_dtype=torch.float32, ssm_dtype=torch.float32)


def scales(hkv: int, gen: torch.Generator) -> torch.Tensor:
    return (0.5 + torch.rand(2, hkv, generator=gen)).to(DEVICE)


def fp8_arena(alloc, bt, seq_lens, gen) -> None:
    """Random fp8 values in the live tokens' K/V rows, NaN everywhere else."""
    elems = alloc.arena.view(FP8)
    elems.fill_(float("nan"))
    idx = live_elements(alloc, bt, seq_lens).to(alloc.device)
    elems[idx] = (torch.randn(idx.numel(), generator=gen) * 4).to(FP8).to(alloc.device)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("hq,hkv,d,qdtype", [(4, 2, 64, torch.float32), (3, 1, 32, torch.float32),
                                             (8, 2, 160, torch.float32), (4, 4, 64, torch.bfloat16)])
def test_decode_reads_fp8_pages(hq, hkv, d, qdtype, num_splits):
    gen = torch.Generator().manual_seed(hq * 100 + d + num_splits)
    seq_lens = [37, 1, 16, 70]
    alloc = make_alloc(fp8_spec(hkv, d), 16, 20)
    bt = scattered_table(alloc, seq_lens, width=6)
    fp8_arena(alloc, bt, seq_lens, gen)
    s = scales(hkv, gen)
    q = torch.randn(len(seq_lens), hq, d, generator=gen).to(DEVICE, qdtype)
    out = paged_decode_attention(q, bt, i32(seq_lens), PagedCache.of(alloc), layer=1, kv_scale=s,
                                 config=DecodeConfig(num_splits=num_splits))
    want = paged_decode_attention_ref(q, alloc.arena, alloc.handle_table, layout_of(alloc), bt, i32(seq_lens),
                                      layer=1, kv_dtype=FP8, kv_scale=s)
    assert out.dtype == qdtype and not out.isnan().any()
    torch.testing.assert_close(out.double(), want, **{k: v * 4 for k, v in TOL[qdtype].items()})


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("qdtype,d,q_scale", [(torch.bfloat16, 64, 1.0), (torch.bfloat16, 160, 1.0),
                                               (torch.bfloat16, 64, 3e5), (torch.bfloat16, 64, 1e-6),
                                               (torch.float16, 64, 1.0)])
def test_decode_fp8_pages_fp16_dots(qdtype, d, q_scale, num_splits):
    """GQA groups of 4 over fp8 pages take the tl.dot path in fp16, with bf16 q moved into fp16's
    range by a power of two: q far beyond fp16's largest value (3e5 x randn) and far below its
    smallest normal (1e-6 x randn) must still match the reference, as must fp16 q."""
    gen = torch.Generator().manual_seed(int(d + num_splits + (q_scale > 1) * 2 + (q_scale < 1) * 3))
    hq, hkv = 8, 2
    seq_lens = [70, 1, 33, 129]
    alloc = make_alloc(fp8_spec(hkv, d), 16, 30)
    bt = scattered_table(alloc, seq_lens, width=9)
    fp8_arena(alloc, bt, seq_lens, gen)
    s = scales(hkv, gen)
    q = (torch.randn(len(seq_lens), hq, d, generator=gen) * q_scale).to(DEVICE, qdtype)
    out = paged_decode_attention(q, bt, i32(seq_lens), PagedCache.of(alloc), layer=1, kv_scale=s,
                                 scale=1.0 / q_scale, config=DecodeConfig(num_splits=num_splits, use_dot=True))
    want = paged_decode_attention_ref(q, alloc.arena, alloc.handle_table, layout_of(alloc), bt, i32(seq_lens),
                                      layer=1, kv_dtype=FP8, kv_scale=s, scale=1.0 / q_scale)
    assert out.dtype == qdtype and not out.isnan().any()
    torch.testing.assert_close(out.double(), want, **{k: v * 4 for k, v in TOL[qdtype].items()})


@pytest.mark.parametrize("block_n", [16, 32])
@pytest.mark.parametrize("hq,hkv,d,qdtype", [(4, 2, 64, torch.float32), (2, 2, 160, torch.float32),
                                             (4, 1, 64, torch.bfloat16)])
def test_prefill_reads_fp8_pages(hq, hkv, d, qdtype, block_n):
    """Chunks of 20, 1 and 9 new tokens at the end of contexts of 37, 16 and 9 (a continuation,
    a decode-like row and a first chunk)."""
    gen = torch.Generator().manual_seed(hq + d + block_n)
    seq_lens, q_lens = [37, 16, 9], [20, 1, 9]
    alloc = make_alloc(fp8_spec(hkv, d), 16, 12)
    bt = scattered_table(alloc, seq_lens, width=4)
    fp8_arena(alloc, bt, seq_lens, gen)
    s = scales(hkv, gen)
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(DEVICE, qdtype)
    cu = i32([0, 20, 21, 30])
    out = paged_prefill_attention(q, bt, i32(seq_lens), cu, PagedCache.of(alloc), layer=1, kv_scale=s,
                                  config=PrefillConfig(block_n=block_n))
    want = paged_prefill_attention_ref(q, cu, i32(seq_lens), bt, alloc.arena, alloc.handle_table, layout_of(alloc),
                                       layer=1, kv_scale=s)
    assert out.dtype == qdtype and not out.isnan().any()
    torch.testing.assert_close(out.float(), want, **{k: v * 4 for k, v in TOL[qdtype].items()})


@pytest.mark.parametrize("kdtype", [torch.float32, torch.bfloat16])
def test_append_quantises_into_fp8_pages(kdtype):
    gen = torch.Generator().manual_seed(7)
    hkv, d = 2, 64
    alloc = make_alloc(fp8_spec(hkv, d), 16, 8)
    bt = scattered_table(alloc, [20, 9], width=3)
    alloc.arena.view(FP8).fill_(float("nan"))
    T = 6
    k = (torch.randn(T, hkv, d, generator=gen) * 300).to(DEVICE, kdtype)   # some beyond 448 * scale: saturate
    v = (torch.randn(T, hkv, d, generator=gen) * 3).to(DEVICE, kdtype)
    req, pos = i32([0, 1, 0, -1, 1, 0]), i32([0, 8, 17, 3, 0, 19])           # token 3 is padding
    s = scales(hkv, gen)
    cache = PagedCache.of(alloc)
    want = kv_append_ref(k, v, alloc.arena, alloc.handle_table, layout_of(alloc), bt, req, pos, layer=1, kv_scale=s)
    kv_append(k, v, bt, req, pos, cache, layer=1, kv_scale=s)
    got, ref = alloc.arena.view(FP8).float(), want.view(FP8).float()
    written = ~ref.isnan()
    assert torch.equal(got.isnan(), ref.isnan())                            # nothing else was written
    assert (ref[written].abs() == 448).any()                                # saturation was exercised
    assert torch.equal(got[written], ref[written])                          # round to nearest even, as torch


def test_append_keeps_nan_and_saturates():
    """NaN in K/V is stored as e4m3's NaN (not a bound); values past +-448 after the scale become
    +-448."""
    alloc = make_alloc(fp8_spec(1, 16), 16, 2)
    alloc.arena.zero_()
    bt = scattered_table(alloc, [1], width=1)
    k = torch.zeros(1, 1, 16, device=DEVICE)
    k[0, 0, :4] = torch.tensor([float("nan"), 1e6, -1e6, 3.0])
    kv_append(k, k, bt, i32([0]), i32([0]), PagedCache.of(alloc), layer=0,
              kv_scale=torch.full((2, 1), 2.0, device=DEVICE))
    want = kv_append_ref(k, k, torch.zeros_like(alloc.arena), alloc.handle_table, layout_of(alloc), bt, i32([0]),
                         i32([0]), layer=0, kv_scale=torch.full((2, 1), 2.0))
    got, ref = alloc.arena.view(FP8).float(), want.view(FP8).float()
    assert torch.equal(got.isnan(), ref.isnan()) and int(got.isnan().sum()) == 2
    assert torch.equal(got.nan_to_num(), ref.nan_to_num())
    assert sorted(got[got.abs() > 100].tolist()) == [-448.0, -448.0, 448.0, 448.0] and (got == 1.5).sum() == 2


def test_fp8_pages_against_unquantised_kv():
    """Append bf16-range K/V to fp8 pages with scales amax / 448 per kv head, then decode: the
    error against attention over the unquantised K/V, next to what bf16 pages give."""
    gen = torch.Generator().manual_seed(3)
    hkv, hq, d, n = 2, 8, 128, 200
    kv = torch.randn(2, n, hkv, d, generator=gen).to(DEVICE)
    s = (kv.abs().amax(dim=(1, 3)) / 448).float().contiguous()                 # [2, Hkv]
    q = torch.randn(1, hq, d, generator=gen).to(DEVICE)
    alloc = make_alloc(fp8_spec(hkv, d), 16, 14)
    bt = scattered_table(alloc, [n], width=13)
    cache = PagedCache.of(alloc)
    kv_append(kv[0], kv[1], bt, i32([0] * n), i32(list(range(n))), cache, layer=0, kv_scale=s)
    out = paged_decode_attention(q, bt, i32([n]), cache, layer=0, kv_scale=s).double()
    exact = _dense(q[0].double(), kv[0].double(), kv[1].double())
    bf16 = _dense(q[0].double(), kv[0].bfloat16().double(), kv[1].bfloat16().double())
    err, err_bf16 = (out[0] - exact).abs(), (bf16 - exact).abs()
    print(f"fp8 pages: max {err.max():.2e} mean {err.mean():.2e}; bf16 pages: max {err_bf16.max():.2e} "
          f"mean {err_bf16.mean():.2e} (outputs of std {exact.std():.2e})")
    assert err.max() < 0.04 and err.mean() < 0.006


def _dense(q, k, v):
    g = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    p = torch.softmax(torch.einsum("hd,lhd->hl", q, k) * q.shape[1] ** -0.5, dim=-1)
    return torch.einsum("hl,lhd->hd", p, v)


def test_fp8_scales_are_checked():
    alloc = make_alloc(fp8_spec(2, 64), 16, 4)
    cache = PagedCache.of(alloc)
    bt = scattered_table(alloc, [5], width=2)
    q = torch.randn(1, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"a float8_e4m3fn cache needs kv_scale: \[2, num_kv_heads\] fp32"):
        paged_decode_attention(q, bt, i32([5]), cache, layer=0)
    with pytest.raises(ValueError, match=r"kv_scale must be \[2, 2\] .* got \(2, 3\)"):
        paged_decode_attention(q, bt, i32([5]), cache, layer=0, kv_scale=torch.ones(2, 3, device=DEVICE))
    if DEVICE == "cpu":   # scales on a GPU are not read on the host (no sync in a launch)
        bad = torch.ones(2, 2)
        bad[1, 0] = 0.0
        with pytest.raises(ValueError, match=r"kv_scale\[1, 0\] = 0.0 must be finite and positive"):
            kv_append(q[:, :2], q[:, :2], bt, i32([0]), i32([0]), cache, layer=0, kv_scale=bad)
    half = make_alloc(dataclasses.replace(fp8_spec(2, 64), kv_dtype=torch.float32), 16, 4)
    with pytest.raises(ValueError, match="kv_scale is for float8_e4m3fn caches; this cache holds torch.float32"):
        paged_decode_attention(q, scattered_table(half, [5], width=2), i32([5]), PagedCache.of(half), layer=0,
                               kv_scale=torch.ones(2, 2, device=DEVICE))
