"""Bad inputs to the attention ops (KV append, decode, prefill): the process survives, nothing outside
the legitimately addressed pages changes, and on CPU-resident metadata the error names the value.

Two paths per case: the launcher on CPU tensors (host checks raise), and the kernels' own device
behaviour (``device_checks_only``: what a GPU run gets, where the launcher never reads device data):
a handle that is not a live KV page is skipped exactly like a -1 entry.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from avmp_triton import InvalidHandleError, PagedCache
from avmp_triton.ops import DecodeConfig, kv_append, paged_decode_attention, paged_prefill_attention
from avmp_triton.reference.paged_attention import kv_append_ref, paged_decode_attention_ref
from avmp_triton.reference.paged_prefill import paged_prefill_attention_ref

from test_paged_attention import DEVICE, TOL, fill_arena, i32, layout_of, make_alloc, make_spec, nan_like, scattered_table

SEQ_LENS = [40, 23]
# the launchers read metadata values only where that is free: on CPU tensors
host_checks = pytest.mark.skipif(DEVICE != "cpu", reason="host value checks run on CPU-resident metadata only")


def _case():
    """Two requests' scattered pages, two live SSM blocks, random bytes everywhere; row 1's second
    page replaced by an SSM handle. Returns the table with the SSM handle and the one a correct
    kernel behaves as (that entry -1)."""
    alloc = make_alloc(make_spec(2), 16, kv_pages=12)
    bt = scattered_table(alloc, SEQ_LENS, width=4)
    ssm = alloc.alloc_ssm(2)
    fill_arena(alloc)
    bad = bt.clone()
    bad[1, 1] = ssm[1]
    skipped = bt.clone()
    skipped[1, 1] = -1
    return alloc, bad, skipped, int(ssm[1]), bt


def _ssm_bytes(alloc, h: int) -> torch.Tensor:
    off = int(alloc.handle_table[h])
    return alloc.arena[off:off + alloc.spec.ssm_block_bytes].clone()


def _msg(h: int, where: str) -> str:
    return re.escape(f"{where} = {h} is a SSM block handle, not a KV page handle")


def _append_inputs():
    k, v = torch.randn(3, 2, 64, device=DEVICE), torch.randn(3, 2, 64, device=DEVICE)
    return k, v, i32([0, 1, 1]), i32([5, 20, 3])   # token 1 lands on row 1's second page


def test_kv_append_ssm_handle_device_path(device_checks_only):
    alloc, bad, skipped, h, _ = _case()
    k, v, req, pos = _append_inputs()
    want = kv_append_ref(k, v, alloc.arena, alloc.handle_table, layout_of(alloc), skipped, req, pos, layer=1)
    block = _ssm_bytes(alloc, h)
    kv_append(k, v, bad, req, pos, PagedCache.of(alloc), layer=1)
    assert torch.equal(alloc.arena, want), "only the two valid tokens' slots may change"
    assert torch.equal(_ssm_bytes(alloc, h), block)


@host_checks
def test_kv_append_ssm_handle_host_check():
    alloc, bad, _, h, _ = _case()
    before = alloc.arena.clone()
    with pytest.raises(InvalidHandleError, match=_msg(h, "block_table[1, 1] (token 1)")):
        kv_append(*_append_inputs()[:2], bad, *_append_inputs()[2:], PagedCache.of(alloc), layer=1)
    assert torch.equal(alloc.arena, before)


@host_checks
def test_kv_append_position_past_table_host_check():
    alloc, _, skipped, _, _ = _case()
    k, v, req, _ = _append_inputs()
    before = alloc.arena.clone()
    cache = PagedCache.of(alloc)
    with pytest.raises(ValueError, match=re.escape("token_pos[2]=64 is outside [0, 64)")):
        kv_append(k, v, skipped, req, i32([5, 20, 64]), cache, layer=0)
    with pytest.raises(ValueError, match=re.escape("token_req[0]=2 is not a block_table row")):
        kv_append(k, v, skipped, i32([2, 0, 0]), i32([5, 20, 3]), cache, layer=0)
    assert torch.equal(alloc.arena, before)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_ssm_handle_device_path(num_splits, device_checks_only):
    alloc, bad, skipped, _, _ = _case()
    before = alloc.arena.clone()
    q = torch.randn(2, 4, 64, device=DEVICE)
    out = paged_decode_attention(q, bad, i32(SEQ_LENS), PagedCache.of(alloc), layer=2,
                                 out=nan_like((2, 4, 64), torch.float32), config=DecodeConfig(num_splits=num_splits))
    ref = paged_decode_attention_ref(q, alloc.arena, alloc.handle_table, layout_of(alloc), skipped, i32(SEQ_LENS),
                                     layer=2)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    assert torch.equal(alloc.arena, before)


@host_checks
def test_decode_ssm_handle_host_check():
    alloc, bad, _, h, _ = _case()
    cache = PagedCache.of(alloc)
    with pytest.raises(InvalidHandleError, match=_msg(h, "block_table[1, 1]")):
        paged_decode_attention(torch.randn(2, 4, 64, device=DEVICE), bad, i32(SEQ_LENS), cache, layer=0)
    with pytest.raises(ValueError, match=re.escape("seq_lens[0]=65 is outside [0, 64]")):
        paged_decode_attention(torch.randn(2, 4, 64, device=DEVICE), bad, i32([65, 1]), cache, layer=0)


def _prefill_inputs(q_lens=(7, 5)):
    cu = i32([0, q_lens[0], q_lens[0] + q_lens[1]])
    q = torch.randn(q_lens[0] + q_lens[1], 4, 64, device=DEVICE)
    return q, cu


def test_prefill_ssm_handle_device_path(device_checks_only):
    """The SSM entry reads as a -1 entry (whose skipping test_paged_prefill checks against the reference)."""
    alloc, bad, skipped, _, _ = _case()
    before = alloc.arena.clone()
    q, cu = _prefill_inputs()
    cache = PagedCache.of(alloc)
    out = paged_prefill_attention(q, bad, i32(SEQ_LENS), cu, cache, layer=1, out=torch.full_like(q, float("nan")))
    want = paged_prefill_attention(q, skipped, i32(SEQ_LENS), cu, cache, layer=1)
    assert not out.isnan().any()
    assert torch.equal(out, want)
    assert torch.equal(alloc.arena, before)


@host_checks
def test_prefill_bad_metadata_host_checks():
    alloc, bad, skipped, h, _ = _case()
    q, cu = _prefill_inputs()
    cache = PagedCache.of(alloc)
    cases = [
        (bad, cu, SEQ_LENS, InvalidHandleError, _msg(h, "block_table[1, 1]")),
        (skipped, i32([0, 7, 13]), SEQ_LENS, ValueError, re.escape("cu_seqlens_q[-1]=13 is past the end of the 12")),
        (skipped, i32([1, 7, 12]), SEQ_LENS, ValueError, re.escape("cu_seqlens_q[0] must be 0, got 1")),
        (skipped, i32([0, 9, 8]), SEQ_LENS, ValueError, re.escape("cu_seqlens_q[2]=8 < cu_seqlens_q[1]=9")),
        (skipped, cu, [6, 23], ValueError, re.escape("seq_lens[0]=6 is shorter than the request's 7 new tokens")),
    ]
    for bt, c, sl, exc, match in cases:
        out = torch.full_like(q, float("nan"))
        with pytest.raises(exc, match=match):
            paged_prefill_attention(q, bt, i32(sl), c, cache, layer=0, out=out)
        assert out.isnan().all(), "nothing may be written before the error"


def test_prefill_propagates_nan():
    """A NaN query row gives a NaN output row (as decode does); every other row stays exact."""
    alloc, _, _, _, bt = _case()
    q, cu = _prefill_inputs()
    q[3, 1] = float("nan")
    out = paged_prefill_attention(q, bt, i32(SEQ_LENS), cu, PagedCache.of(alloc), layer=0)
    assert out[3, 1].isnan().all()
    ref = paged_prefill_attention_ref(q, cu, i32(SEQ_LENS), bt, alloc.arena, alloc.handle_table,
                                      layout_of(alloc), 0)
    keep = torch.ones(out.shape[:2], dtype=torch.bool)
    keep[3, 1] = False
    torch.testing.assert_close(out[keep].double(), ref[keep].double(), **TOL[torch.float32])


@pytest.mark.parametrize("d", [12, 100, 264])
def test_head_dims_off_the_rule(d):
    """A cache whose head dim is not a multiple of 8 in [16, 256] (a K/V row of whole 16-byte words,
    at most 256 lanes) is refused by every attention op, the value named; nothing is written."""
    alloc = make_alloc(make_spec(2, d), 16, kv_pages=4)
    bt = scattered_table(alloc, SEQ_LENS, width=4, extra=0)
    fill_arena(alloc)
    before = alloc.arena.clone()
    cache = PagedCache.of(alloc)
    rule = re.escape(f"has head_dim {d}; the attention kernels take a multiple of 8 in [16, 256]")
    q, cu = torch.randn(12, 4, d, device=DEVICE), i32([0, 7, 12])
    k = torch.randn(2, 2, d, device=DEVICE)
    with pytest.raises(ValueError, match="q " + rule):
        paged_decode_attention(q[:2], bt, i32(SEQ_LENS), cache, layer=0)
    with pytest.raises(ValueError, match="k " + rule):
        kv_append(k, k, bt, i32([0, 1]), i32([40, 23]), cache, layer=0)
    with pytest.raises(ValueError, match="q " + rule):
        paged_prefill_attention(q, bt, i32(SEQ_LENS), cu, cache, layer=0)
    assert torch.equal(alloc.arena, before)


_PAST_END_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import avmp_triton.ops.paged_prefill as launcher
    launcher.on_host = lambda *tensors: False      # what a GPU run gets: no host read of cu_seqlens_q
    from test_paged_attention import DEVICE, fill_arena, i32, make_alloc, make_spec, scattered_table
    from avmp_triton.ops import PagedCache, paged_prefill_attention
    alloc = make_alloc(make_spec(2), 16, kv_pages=12)
    bt = scattered_table(alloc, [40, 23], width=4)
    fill_arena(alloc)
    before = alloc.arena.clone()
    T, guard = 12, 64
    qbuf = torch.randn(T + 2 * guard, 4, 64, device=DEVICE)
    obuf = torch.full_like(qbuf, 7.0)
    q, out = qbuf[guard:guard + T], obuf[guard:guard + T]
    cache = PagedCache.of(alloc)
    for cu in ([0, 7, {past}], [0, 9, 8], [-5, 3, 12]):
        paged_prefill_attention(q, bt, i32([40, 23]), i32(cu), cache, layer=0, out=out)
        assert torch.equal(alloc.arena, before), "arena changed"
        assert (obuf[:guard] == 7.0).all() and (obuf[guard + T:] == 7.0).all(), "wrote outside out"
    print("survived")
""")


def test_prefill_cu_seqlens_past_end_device_path():
    """Once a segfault (free(): invalid pointer): the rows past q are now skipped on the device."""
    tests = os.path.dirname(os.path.abspath(__file__))
    script = _PAST_END_SCRIPT.format(tests=tests, past=12 + 200)
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "0"))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "survived" in run.stdout
