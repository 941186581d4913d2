"""The engine rules against numbers the engines themselves printed."""
import dataclasses

import pytest
import torch

from avmp_triton.spec import HybridModelSpec, get_preset
from avmp_triton.sim.engines import vllm_hybrid_geometry


# vLLM's rule for nemotron-h-8b (bf16), worked by hand in test_nemotron_h_8b_geometry_by_hand; the
# CLI's tests check that ``compare --json`` prints these
NEMOTRON_H_8B_VLLM = {"block_size": 528, "group_size": 4, "attn_groups": 1, "mamba_groups": 6,
                      "block_bytes": 4 * 528 * 4096}
# as vLLM 0.34.0 serves it: NemotronHForCausalLMConfig forces mamba_ssm_cache_dtype float32
# (vllm/model_executor/models/config.py), so one Mamba layer holds 128 x 64 x 128 x 4 B of SSM state
# + 3 x (8192 + 2 x 8 x 128) x 2 B of conv state = 4,255,744 B; one attention layer's token is
# 2 x 8 x 128 x 2 = 4,096 B; the smallest multiple of 16 tokens holding it: 16 x ceil(4255744 / 65536)
# = 1040 tokens (Platform._align_hybrid_block_size, vllm/platforms/interface.py)
NEMOTRON_H_8B_VLLM_SERVED = {"block_size": 1040, "group_size": 4, "attn_groups": 1, "mamba_groups": 6,
                             "block_bytes": 4 * 1040 * 4096, "mamba_page_bytes": 4255744}


def nemotron_nano_9b_v2() -> HybridModelSpec:
    """The cache geometry of nvidia/NVIDIA-Nemotron-Nano-9B-v2 (its config.json: 8 KV heads of 128,
    128 Mamba heads of 80, d_state 128, 8 groups, conv kernel 4, bf16). The layer counts do not
    enter the block size."""
    return HybridModelSpec(name="nemotron-nano-9b-v2", num_attn_layers=4, num_kv_heads=8, head_dim=128,
                           kv_dtype=torch.bfloat16, num_mamba_layers=27, mamba_version=2, d_inner=128 * 80,
                           mamba_num_heads=128, mamba_head_dim=80, d_state=128, n_groups=8, d_conv=4,
                           conv_dtype=torch.bfloat16, ssm_dtype=torch.bfloat16)


@pytest.mark.parametrize("spec,block,source", [
    # "large attention page sizes (672 tokens for nvidia/NVIDIA-Nemotron-Nano-9B-v2)"
    (nemotron_nano_9b_v2(), 672, "vllm-project/vllm#24280"),
    # "the platform inflates cache_config.block_size to 528 (no prefix caching)" for granite-4.0-h-small
    (get_preset("granite-4.0-h-small"), 528, "vllm-project/vllm-gaudi#1564"),
])
def test_block_size_is_the_one_vllm_logged(spec, block, source):
    assert vllm_hybrid_geometry(spec).block_size == block, source


def test_nemotron_h_8b_geometry_by_hand():
    """vLLM's rule worked by hand for nemotron-h-8b (bf16): one attention layer holds 2 x 8 x 128 x 2 =
    4096 bytes per token; one Mamba layer's state is 128 x 64 x 128 x 2 (SSM) + 3 x 10240 x 2
    (conv) = 2158592 bytes, so 16 * ceil(2158592 / 65536) = 528 tokens; 4 attention and 24 Mamba
    layers make groups of 4: 1 attention group and 6 Mamba groups, blocks of 4 x 528 x 4096 bytes."""
    g = vllm_hybrid_geometry(get_preset("nemotron-h-8b"))
    assert (g.block_size, g.mamba_page_bytes, g.attn_page_bytes) == (528, 2158592, 528 * 4096)
    assert (g.group_size, g.attn_groups, g.mamba_groups) == (4, 1, 6)
    assert g.block_bytes == 4 * 528 * 4096
    assert {k: getattr(g, k) for k in NEMOTRON_H_8B_VLLM} == NEMOTRON_H_8B_VLLM
    assert g.request_blocks(451) == 1 + 6 and g.request_blocks(529) == 2 + 6
    assert g.request_bytes(451) == 7 * 4 * 528 * 4096
    assert 0 < g.mamba_padding < 0.01


def test_groups_follow_the_layer_counts():
    falcon = vllm_hybrid_geometry(get_preset("falcon-h1-7b"))   # 44 + 44: one group of each
    assert (falcon.group_size, falcon.attn_groups, falcon.mamba_groups) == (44, 1, 1)
    bamba = vllm_hybrid_geometry(get_preset("bamba-9b"))        # 3 + 29: groups of 3, the last padded
    assert (bamba.group_size, bamba.attn_groups, bamba.mamba_groups) == (3, 1, 10)
    close = dataclasses.replace(get_preset("bamba-9b"), num_attn_layers=12, num_mamba_layers=13)
    assert vllm_hybrid_geometry(close).group_size == 13       # max < 1.5 min: the larger count


def test_sglang_split_is_ratio_over_one_plus_ratio():
    """SGLang (sgl-project/sglang 001ccef0, model_runner_kv_cache_mixin.py handle_max_mamba_cache)
    solves mamba + kv = budget with mamba / kv = mamba_full_memory_ratio (server_args.py default 0.9)."""
    from avmp_triton.sim.engines import SGLANG_MAMBA_FULL_MEMORY_RATIO, sglang_mamba_fraction
    assert SGLANG_MAMBA_FULL_MEMORY_RATIO == 0.9
    f = sglang_mamba_fraction()
    assert f == pytest.approx(0.9 / 1.9) and f / (1 - f) == pytest.approx(0.9)
    assert sglang_mamba_fraction(3.0) == pytest.approx(0.75)


def test_nemotron_h_8b_as_vllm_serves_it():
    from avmp_triton.sim.sweep import serving_spec
    spec = serving_spec("nemotron-h-8b")
    assert spec.ssm_dtype == torch.float32 and spec.conv_dtype == torch.bfloat16
    g = vllm_hybrid_geometry(spec)
    assert {k: getattr(g, k) for k in NEMOTRON_H_8B_VLLM_SERVED} == NEMOTRON_H_8B_VLLM_SERVED
