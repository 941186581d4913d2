"""Zamba2Runner (avmp_triton/models/) against transformers' own Zamba2ForCausalLM forward.

A tiny random fp32 model (layers: Mamba, hybrid, Mamba, hybrid, hybrid; two shared transformer
blocks used 2 + 1 times, with attention adapters and RoPE; every parameter drawn at random) runs
once through transformers over whole sequences (no cache) and once through the runner, whose K, V
and conv / SSM states live only in its arena: the shared parity checks, and configs the runner
refuses. The attention head_dim is 40 (2 * hidden / heads), not a power of two, as Zamba2-2.7B's 160
is not. On the CPU the ops run in Triton's interpreter.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
Zamba2Config = getattr(transformers, "Zamba2Config", None)
if Zamba2Config is None or int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the runner reads transformers 5.x's Zamba2 modules", allow_module_level=True)

from avmp_triton.models import Zamba2Runner  # noqa: E402
from tests.models import parity as P  # noqa: E402

DEV, TOL = P.DEV, P.TOL
VOCAB = 97
SLAB = 240 << 10    # a slab holds 4 KV pages (60 KiB) or 2 SSM blocks (113 KiB): compaction is easy to force
LAYERS = ["linear_attention", "hybrid", "linear_attention", "hybrid", "hybrid"]
# attention head_dim 2 * 80 / 4 = 40, as many KV heads as q heads (transformers adds the k and v
# adapters' full-width outputs to k_proj's, so adapters need MHA); Mamba d_inner 160 = 10 heads x 16;
# rope_theta 100 so that positions up to 27 turn every rotated pair visibly; lm_head untied and drawn at
# fan-in scale like the other families' (tied to the unit-variance embeddings, the logits and their fp32
# rounding grow by sqrt(hidden))
GEOMETRY = dict(vocab_size=VOCAB, hidden_size=80, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=96, num_hidden_layers=len(LAYERS), layers_block_type=LAYERS, num_mem_blocks=2,
                use_shared_attention_adapter=True, adapter_rank=8, use_mem_rope=True, mamba_expand=2,
                n_mamba_heads=10, mamba_d_state=32, mamba_ngroups=1, mamba_d_conv=4, chunk_size=8,
                add_bias_linear=True, hidden_act="gelu", rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 100.0})


def _config(**overrides) -> "Zamba2Config":
    return Zamba2Config(**{**GEOMETRY, **overrides})


@pytest.fixture(scope="module")
def hf_model():
    model = transformers.Zamba2ForCausalLM(_config()).eval()
    P.randomize(model, torch.Generator().manual_seed(0))
    assert model.config.attention_head_dim == 40 and model.config.mamba_headdim == 16
    assert model.config.hybrid_layer_ids == [1, 3, 4]
    return model.to(DEV)


def _runner(hf_model) -> Zamba2Runner:
    # 8 slabs: 4 for KV pages (16 pages), 4 for SSM blocks (8 blocks)
    return Zamba2Runner.from_transformers(hf_model, capacity_bytes=8 * SLAB, slab_bytes=SLAB, max_requests=4,
                                          max_context=64)


def test_geometry_matches_the_slab_plan(hf_model):
    spec = _runner(hf_model).spec
    assert (spec.num_attn_layers, spec.num_mamba_layers, spec.head_dim) == (3, 5, 40)
    assert (spec.kv_page_bytes, spec.ssm_block_bytes) == (61440, 115840)


@pytest.mark.parametrize("check", [P.check_prefill_one_request, P.check_two_requests_packed,
                                   P.check_chunked_prefill_then_decode,
                                   P.check_compaction_mid_generation_changes_nothing, P.check_fixed_shape_decode])
def test_parity_with_transformers(hf_model, check):
    check(hf_model, _runner, VOCAB)


def test_without_adapters_or_rope():
    """The configs of the published 2.7B model: no attention adapters, no RoPE (the MLP adapters
    are always there)."""
    model = transformers.Zamba2ForCausalLM(_config(use_shared_attention_adapter=False, use_mem_rope=False)).eval()
    P.randomize(model, torch.Generator().manual_seed(1))
    P.check_chunked_prefill_then_decode(model.to(DEV), _runner, VOCAB)


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_act="relu"), "hidden_act 'relu' is not supported"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0}),
     "rope_type 'linear' is not supported"),
    (dict(layers_block_type=["linear_attention"] * 5), "at least one 'hybrid'"),
])
def test_unsupported_config_is_named(overrides, message):
    model = transformers.Zamba2ForCausalLM(_config(**overrides)).eval()
    with pytest.raises(ValueError, match=message):
        Zamba2Runner.from_transformers(model, capacity_bytes=8 * SLAB, slab_bytes=SLAB)
