"""PagedCache: the frozen view every op takes, checked where it is built."""
import dataclasses

import pytest
import torch

from avmp_triton import AVMPAllocator, PaddedUnifiedAllocator, PagedCache, StaticDualAllocator, get_preset
from avmp_triton.layout import kv_page_layout, ssm_block_layout

SPEC = get_preset("nemotron-h-8b")
CAP = 256 << 20


@pytest.mark.parametrize("cls", [AVMPAllocator, StaticDualAllocator, PaddedUnifiedAllocator])
def test_of_an_allocator_holds_its_tensors_and_geometry(cls):
    alloc = cls(SPEC, CAP)
    c = PagedCache.of(alloc)
    assert c.arena is alloc.arena and c.handle_table is alloc.handle_table and c.handle_kinds is alloc.handle_kind
    assert c.kv_layout == kv_page_layout(SPEC, alloc.page_tokens) and c.ssm_layout == ssm_block_layout(SPEC)
    assert (c.num_attn_layers, c.num_mamba_layers) == (SPEC.num_attn_layers, SPEC.num_mamba_layers)
    assert (c.kv_dtype, c.ssm_dtype, c.conv_dtype) == (SPEC.kv_dtype, SPEC.ssm_dtype, SPEC.conv_dtype)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.arena = torch.empty(0, dtype=torch.uint8)


@pytest.mark.parametrize("cls", [AVMPAllocator, StaticDualAllocator])
def test_of_an_attention_free_allocator_has_only_the_ssm_side(cls):
    spec = dataclasses.replace(SPEC, name="nemotron-h-no-attn", num_attn_layers=0, num_kv_heads=0, head_dim=0)
    c = PagedCache.of(cls(spec, CAP))
    assert (c.kv_layout, c.kv_dtype, c.num_attn_layers) == (None, None, 0)
    assert c.ssm_layout == ssm_block_layout(spec) and c.num_mamba_layers == spec.num_mamba_layers
    assert (c.ssm_dtype, c.conv_dtype, c.spec) == (spec.ssm_dtype, spec.conv_dtype, spec)


def test_rebalance_keeps_the_view_valid():
    alloc = AVMPAllocator(SPEC, CAP)
    c = PagedCache.of(alloc)
    alloc.rebalance("ssm", 1)
    assert c.arena is alloc.arena and c.handle_table is alloc.handle_table


def _fields(alloc) -> dict:
    c = PagedCache.of(alloc)
    return {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}


@pytest.mark.parametrize("change,exc,match", [
    (lambda f: dict(arena=f["arena"][:1 << 20], kv_layout=None), ValueError, r"an SSM block of \d+ Mamba layers is \d+ bytes, more than"),
    (lambda f: dict(kv_layout=None, ssm_layout=None), ValueError, "needs a kv_layout, an ssm_layout or both"),
    (lambda f: dict(spec=get_preset("jamba-1.5-mini")), ValueError, "is not spec 'jamba-1.5-mini''s"),
    (lambda f: dict(num_attn_layers=3), ValueError, "is not spec 'nemotron-h-8b''s"),
    (lambda f: dict(spec="nemotron-h-8b"), TypeError, "spec must be a HybridModelSpec or None, got str"),
    (lambda f: dict(conv_dtype=torch.float32, spec=None), ValueError,
     "conv_dtype=torch.float32 does not match the ssm_layout"),
    (lambda f: dict(arena=f["arena"][:-1], kv_layout=None), ValueError, "not a whole number of ssm_dtype elements"),
])
def test_bad_geometry_fails_at_construction(change, exc, match):
    f = _fields(AVMPAllocator(SPEC, CAP))
    f.update(change(f))
    with pytest.raises(exc, match=match):
        PagedCache(**f)


def test_an_ssm_state_over_several_units_is_refused():
    """vLLM's pool spreads a request's Mamba states over one block per layer group: the Mamba ops,
    which read a state from one unit, must not get such a cache."""
    from avmp_triton import VllmHybridAllocator
    alloc = VllmHybridAllocator(SPEC, CAP, page_tokens=528, ssm_units=6)
    assert alloc.unit_bytes[0] == SPEC.kv_bytes_per_token * 528 >= -(-SPEC.ssm_block_bytes // 6)
    with pytest.raises(TypeError, match="spreads a request's SSM state over 6 units"):
        PagedCache.of(alloc)
    with pytest.raises(ValueError, match="ssm_units=5 blocks of .* cannot hold the SSM state"):
        VllmHybridAllocator(SPEC, CAP, page_tokens=528, ssm_units=5)
    with pytest.raises(ValueError, match="ssm_units must be a positive int, got 0"):
        VllmHybridAllocator(SPEC, CAP, page_tokens=528, ssm_units=0)
