"""One decode step of a hybrid model, captured in a CUDA graph over one AVMPAllocator arena, replayed
with new inputs and checked against the pure-torch references after every replay.

The captured step is what one attention layer and one Mamba layer do for a batch of requests:

    kv_append (layer 1) -> paged_decode_attention (layer 1) -> causal_conv1d_update (Mamba layer 1)
    -> Mamba2 / Mamba1 state update (Mamba layer 1) on the conv output

Nemotron-H (Mamba2: the conv runs over the xBC channels, which are then split into x, B and C as
strided views of the conv output), Jamba (Mamba1: the conv output is x) and Zamba2-2.7B (Mamba2,
attention head dim 160, which the attention kernels pad to 256 lanes), each with fp32 and bf16 ssm
state. The batch has a padding row (block-table row of -1, seq_len 0, token_req -1, ssm
handle -1), as a graph captured for a larger batch size would; the real rows have odd context
lengths, their KV pages and SSM blocks scattered with ``torch.randperm`` over larger allocations.

Between replays only the contents of the static buffers change: fresh random q, k, v, conv input,
dt, z (and B, C for Mamba1), and positions / seq_lens advance by one token. After each replay:
the attention output (which must see the token appended in the same step), the conv output, the
ssm output, the new conv and ssm states, and every other byte of the arena (bit for bit, with the
appended K/V from ``kv_append_ref``) are checked; outputs are NaN-poisoned before each replay.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from avmp_triton import AVMPAllocator, PagedCache, get_preset
from avmp_triton.layout import kv_page_layout, ssm_block_layout
from avmp_triton.ops import decode_config, decode_workspace, kv_append, paged_decode_attention
from avmp_triton.ops.mamba_state import causal_conv1d_update, mamba1_state_update, mamba2_state_update
from avmp_triton.reference import mamba_state as R
from avmp_triton.reference.paged_attention import gather_kv, kv_append_ref, paged_decode_attention_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ATTN_TOL = dict(rtol=1.6e-2, atol=1.6e-2)                       # bf16 attention vs fp64 reference
OUT_TOL = dict(atol=1e-1, rtol=2e-2)                            # bf16 conv / ssm outputs
STATE_TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=6e-2, rtol=2e-2)}
SEQ_LENS = [1, 100, 777, 2048 + 16, 63]                         # context before the first replay
REPLAYS = 3
HQ = 32
ATTN_LAYER = MAMBA_LAYER = 1


@pytest.fixture
def seed():
    """Fresh random inputs every run; the seed is printed so a failure can be replayed."""
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    torch.manual_seed(seed)
    return seed


def make_case(preset: str, ssm_dtype: torch.dtype):
    spec = dataclasses.replace(get_preset(preset), num_attn_layers=2, num_mamba_layers=2, ssm_dtype=ssm_dtype)
    T = spec.page_tokens
    pages = [-(-(n + REPLAYS) // T) for n in SEQ_LENS]
    W = max(pages) + 2
    # room for the pages and blocks (and the randperm slack); the AVMP allocator moves slabs
    # between its pools by itself if the initial split is off
    kv_bytes = (sum(pages) + 64) * spec.kv_page_bytes
    ssm_bytes = (len(SEQ_LENS) + 12) * spec.ssm_block_bytes
    capacity = int(1.5 * (kv_bytes + ssm_bytes)) + (64 << 20)
    alloc = AVMPAllocator(spec, capacity, device="cuda", kv_fraction=kv_bytes / (kv_bytes + ssm_bytes))
    alloc.arena.view(torch.bfloat16).normal_()                   # finite values everywhere

    B = len(SEQ_LENS) + 1                                        # last row: padding
    kv = alloc.alloc_kv(sum(pages) + 40)
    kv = kv[torch.randperm(kv.numel(), device="cuda")]
    bt = torch.full((B, W), -1, dtype=torch.int32, device="cuda")
    i = 0
    for b, n in enumerate(pages):
        bt[b, :n] = kv[i:i + n]
        i += n
    blocks = alloc.alloc_ssm(len(SEQ_LENS) + 11)
    ssm_handles = torch.full((B,), -1, dtype=torch.int32, device="cuda")
    ssm_handles[:len(SEQ_LENS)] = blocks[torch.randperm(blocks.numel(), device="cuda")[:len(SEQ_LENS)]]
    lay = ssm_block_layout(spec)
    live = blocks
    for layer in range(spec.num_mamba_layers):
        shape = (live.numel(), spec.d_inner, spec.d_state)
        R.scatter_ssm_state(alloc.arena, alloc.handle_table, live, lay, layer,
                            torch.randn(shape, device="cuda").to(spec.ssm_dtype))
        R.scatter_conv_state(alloc.arena, alloc.handle_table, live, lay, layer,
                             torch.randn(live.numel(), spec.d_conv - 1, spec.conv_channels, device="cuda")
                             .to(spec.conv_dtype))
    return spec, alloc, bt, ssm_handles


def static_buffers(spec, B: int) -> dict:
    """Every tensor the captured step reads or writes, allocated once (contents change per replay)."""
    bf, dev = torch.bfloat16, "cuda"
    Hkv, D, ch = spec.num_kv_heads, spec.head_dim, spec.conv_channels
    real = len(SEQ_LENS)
    buf = dict(
        q=torch.empty(B, HQ, D, dtype=bf, device=dev),
        k=torch.empty(B, Hkv, D, dtype=bf, device=dev),
        v=torch.empty(B, Hkv, D, dtype=bf, device=dev),
        token_req=torch.tensor(list(range(real)) + [-1], dtype=torch.int32, device=dev),
        token_pos=torch.tensor(SEQ_LENS + [0], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([n + 1 for n in SEQ_LENS] + [0], dtype=torch.int32, device=dev),
        attn_out=torch.empty(B, HQ, D, dtype=bf, device=dev),
        conv_x=torch.empty(B, ch, dtype=bf, device=dev),
        conv_w=torch.randn(ch, spec.d_conv, dtype=bf, device=dev) * 0.5,
        conv_b=torch.randn(ch, dtype=bf, device=dev) * 0.1,
        conv_out=torch.empty(B, ch, dtype=bf, device=dev),
    )
    d, n = spec.d_inner, spec.d_state
    if spec.mamba_version == 2:
        h, p, g = spec.mamba_num_heads, spec.mamba_head_dim, spec.n_groups
        co = buf["conv_out"]
        buf.update(
            # x, B, C: strided views of the conv output, as the model splits xBC
            x=co[:, :d].view(B, h, p), B=co[:, d:d + g * n].view(B, g, n), C=co[:, d + g * n:d + 2 * g * n].view(B, g, n),
            dt=torch.empty(B, h, dtype=bf, device=dev), z=torch.empty(B, h, p, dtype=bf, device=dev),
            A=-torch.rand(h, device=dev) - 0.5, D=torch.randn(h, device=dev), dt_bias=torch.rand(h, device=dev) - 2.0,
            ssm_out=torch.empty(B, h, p, dtype=bf, device=dev))
    else:
        buf.update(
            x=buf["conv_out"], B=torch.empty(B, n, dtype=bf, device=dev), C=torch.empty(B, n, dtype=bf, device=dev),
            dt=torch.empty(B, d, dtype=bf, device=dev), z=torch.empty(B, d, dtype=bf, device=dev),
            A=-torch.rand(d, n, device=dev) - 0.5, D=torch.randn(d, device=dev), dt_bias=torch.rand(d, device=dev) - 2.0,
            ssm_out=torch.empty(B, d, dtype=bf, device=dev))
    return buf


def new_inputs(spec, buf) -> None:
    """Fresh values in the static inputs (copied in, as a serving loop would)."""
    names = ["q", "k", "v", "conv_x", "dt", "z"] + (["B", "C"] if spec.mamba_version == 1 else [])
    for name in names:
        buf[name].copy_(torch.randn(buf[name].shape, device="cuda").to(buf[name].dtype))
    for name in ("attn_out", "conv_out", "ssm_out"):
        buf[name].fill_(float("nan"))


def ssm_shape(spec) -> tuple:
    if spec.mamba_version == 1:
        return (spec.d_inner, spec.d_state)
    return (spec.mamba_num_heads, spec.mamba_head_dim, spec.d_state)


@pytest.mark.parametrize("ssm_dtype", [torch.float32, torch.bfloat16], ids=["ssm_fp32", "ssm_bf16"])
@pytest.mark.parametrize("preset", ["nemotron-h-8b", "jamba-1.5-mini", "zamba2-2.7b"])
def test_decode_step_cuda_graph(seed, preset, ssm_dtype):
    spec, alloc, bt, ssm_handles = make_case(preset, ssm_dtype)
    B, W = bt.shape
    T = spec.page_tokens
    buf = static_buffers(spec, B)
    kv_layout = kv_page_layout(spec, alloc.page_tokens)
    lay = ssm_block_layout(spec)
    cfg = decode_config(batch=B, num_q_heads=HQ, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                        page_tokens=T, max_seq_len=W * T,
                        sm_count=torch.cuda.get_device_properties(0).multi_processor_count)
    ws = decode_workspace(B, HQ, spec.head_dim, cfg.num_splits, "cuda")
    ssm_op = mamba2_state_update if spec.mamba_version == 2 else mamba1_state_update
    arena, table = alloc.arena, alloc.handle_table
    cache = PagedCache.of(alloc)

    def step():
        kv_append(buf["k"], buf["v"], bt, buf["token_req"], buf["token_pos"], cache, layer=ATTN_LAYER)
        paged_decode_attention(buf["q"], bt, buf["seq_lens"], cache, layer=ATTN_LAYER, out=buf["attn_out"],
                               workspace=ws, max_seq_len=W * T)
        causal_conv1d_update(buf["conv_x"], buf["conv_w"], ssm_handles, cache, layer=MAMBA_LAYER, bias=buf["conv_b"],
                             activation="silu", out=buf["conv_out"])
        ssm_op(buf["x"], buf["dt"], buf["A"], buf["B"], buf["C"], ssm_handles, cache, layer=MAMBA_LAYER, D=buf["D"],
               z=buf["z"], dt_bias=buf["dt_bias"], dt_softplus=True, out=buf["ssm_out"])

    # compile every kernel outside the capture, then undo what that eager step wrote
    snapshot = arena.clone()
    new_inputs(spec, buf)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    arena.copy_(snapshot)
    del snapshot
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    torch.cuda.synchronize()

    valid = R.valid_rows(table, ssm_handles)
    assert valid.tolist() == [True] * len(SEQ_LENS) + [False]
    real = len(SEQ_LENS)
    for replay in range(REPLAYS):
        new_inputs(spec, buf)
        before = arena.clone()
        conv_before = R.gather_conv_state(arena, table, ssm_handles, lay, MAMBA_LAYER, spec.conv_dtype)
        ssm_before = R.gather_ssm_state(arena, table, ssm_handles, lay, MAMBA_LAYER, spec.ssm_dtype, ssm_shape(spec))
        g.replay()
        torch.cuda.synchronize()
        msg = f"replay {replay}"

        # KV append: the new token sits at its position, bit for bit
        expected = kv_append_ref(buf["k"], buf["v"], before, table, kv_layout, bt, buf["token_req"],
                                 buf["token_pos"], layer=ATTN_LAYER)
        for b in range(real):
            n = int(buf["seq_lens"][b])
            kk, vv, ok = gather_kv(arena, table, kv_layout, bt[b], n, ATTN_LAYER, spec.kv_dtype)
            assert bool(ok.all()), f"{msg}: request {b} has unreadable pages"
            assert torch.equal(kk[-1], buf["k"][b]) and torch.equal(vv[-1], buf["v"][b]), f"{msg}: KV append, row {b}"

        # attention over the context including the token appended in the same step
        att = buf["attn_out"]
        assert not att.isnan().any(), f"{msg}: attention output not fully written"
        ref = paged_decode_attention_ref(buf["q"], arena, table, kv_layout, bt, buf["seq_lens"], layer=ATTN_LAYER)
        torch.testing.assert_close(att.double(), ref, **ATTN_TOL, msg=lambda m: f"{msg}: attention: {m}")
        assert torch.equal(att[real:], torch.zeros_like(att[real:])), f"{msg}: padding row must be zeros"

        # conv update: output, shifted state (bit for bit), padding row untouched / zero
        want_out, want_conv = R.causal_conv1d_update_ref(conv_before, buf["conv_x"], buf["conv_w"], buf["conv_b"],
                                                         "silu", valid=valid)
        co = buf["conv_out"]
        assert not co.isnan().any(), f"{msg}: conv output not fully written"
        torch.testing.assert_close(co.float(), want_out.float(), **OUT_TOL, msg=lambda m: f"{msg}: conv out: {m}")
        assert torch.equal(co[real:], torch.zeros_like(co[real:]))
        conv_after = R.gather_conv_state(arena, table, ssm_handles, lay, MAMBA_LAYER, spec.conv_dtype)
        assert torch.equal(conv_after[valid], want_conv[valid]), f"{msg}: conv state"

        # ssm update, from the conv output the graph produced (x, and B, C for Mamba2, are views of it)
        ref_fn = R.mamba2_state_update_ref if spec.mamba_version == 2 else R.mamba1_state_update_ref
        want_y, want_state = ref_fn(ssm_before, buf["x"], buf["dt"], buf["A"], buf["B"], buf["C"], buf["D"],
                                    buf["z"], buf["dt_bias"], True, valid=valid)
        y = buf["ssm_out"]
        assert not y.isnan().any(), f"{msg}: ssm output not fully written"
        torch.testing.assert_close(y.float(), want_y.float(), **OUT_TOL, msg=lambda m: f"{msg}: ssm out: {m}")
        assert torch.equal(y[real:], torch.zeros_like(y[real:]))
        ssm_after = R.gather_ssm_state(arena, table, ssm_handles, lay, MAMBA_LAYER, spec.ssm_dtype, ssm_shape(spec))
        torch.testing.assert_close(ssm_after[valid].float(), want_state[valid].float(), **STATE_TOL[spec.ssm_dtype],
                                   msg=lambda m: f"{msg}: ssm state: {m}")

        # every other byte of the arena: unchanged (the KV bytes as kv_append_ref wrote them)
        R.scatter_ssm_state(expected, table, ssm_handles, lay, MAMBA_LAYER, ssm_after)
        R.scatter_conv_state(expected, table, ssm_handles, lay, MAMBA_LAYER, conv_after)
        assert torch.equal(expected, arena), f"{msg}: bytes outside the step's writes changed"

        # next token: positions and lengths advance in the static buffers (pages are already there)
        buf["token_pos"][:real] += 1
        buf["seq_lens"][:real] += 1
