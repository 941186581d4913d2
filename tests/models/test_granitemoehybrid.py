"""GraniteMoeHybridRunner (avmp_triton/models/) against transformers' own GraniteMoeHybridForCausalLM forward.

A tiny random fp32 model (layers: Mamba, attention, Mamba; each with a 4-expert top-2 MoE plus a
shared MLP; every parameter drawn at random, the router and the 3-D expert weights included, and
every multiplier away from 1) runs once through transformers over whole sequences (no cache) and
once through the runner, whose RoPE-rotated K, V and conv / SSM states live only in its arena:
single and packed prefills, chunked prefill then decode, a compaction of live KV pages and SSM blocks
in the middle of generation, a model without RoPE ('nope'), and configs the runner refuses. On the
CPU the ops run in Triton's interpreter.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
GraniteMoeHybridConfig = getattr(transformers, "GraniteMoeHybridConfig", None)
if GraniteMoeHybridConfig is None or int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the runner reads transformers 5.x's GraniteMoeHybrid modules", allow_module_level=True)

from avmp_triton.models.granitemoehybrid import GraniteMoeHybridRunner  # noqa: E402
from tests.models import parity as P  # noqa: E402

DEV, TOL = P.DEV, P.TOL
VOCAB = 97
SLAB = 32 << 10     # a slab holds 4 KV pages (8 KiB) or 2 SSM blocks (11.75 KiB): compaction is easy to force
# attention head_dim 64 (hidden / heads, GQA 2:1); rope_theta 100 so that positions up to 27 turn
# every rotated pair visibly; attention_multiplier 0.1 (not 1/sqrt(64)) and the other multipliers
# away from 1 so that a missing or misplaced one shows
GEOMETRY = dict(vocab_size=VOCAB, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=48,
                shared_intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=3,
                layer_types=["mamba", "attention", "mamba"], mamba_n_heads=8, mamba_d_head=16, mamba_expand=1,
                mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=8, mamba_conv_bias=True,
                mamba_proj_bias=True, attention_bias=True, rms_norm_eps=1e-5, position_embedding_type="rope",
                rope_parameters={"rope_type": "default", "rope_theta": 100.0}, embedding_multiplier=1.7,
                residual_multiplier=0.6, attention_multiplier=0.1, logits_scaling=2.5)


def _config(**overrides) -> "GraniteMoeHybridConfig":
    return GraniteMoeHybridConfig(**{**GEOMETRY, **overrides})


def _model(seed: int, **overrides):
    model = transformers.GraniteMoeHybridForCausalLM(_config(**overrides)).eval()
    gen = torch.Generator().manual_seed(seed)
    P.randomize(model, gen)
    return model.to(DEV)


@pytest.fixture(scope="module")
def hf_model():
    model = _model(0)
    assert model.config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    assert model.model.rotary_emb.inv_freq.numel() == 32   # all of head_dim 64 rotated
    return model


def _runner(hf_model) -> GraniteMoeHybridRunner:
    # 8 slabs: 4 for KV pages (16 pages), 4 for SSM blocks (8 blocks)
    return GraniteMoeHybridRunner.from_transformers(hf_model, capacity_bytes=8 * SLAB, slab_bytes=SLAB,
                                                    max_requests=4, max_context=64)


def test_geometry_and_routing(hf_model):
    spec = _runner(hf_model).spec
    assert (spec.kv_page_bytes, spec.ssm_block_bytes) == (8192, 12032)
    # the random router spreads the tokens: every expert is chosen by some token of a 21-token prompt
    layer = hf_model.model.layers[0]
    with torch.no_grad():
        h = hf_model.model.embed_tokens(P.tokens(21, 1, VOCAB)) * hf_model.config.embedding_multiplier
        idx = P.routed_experts(layer.block_sparse_moe.router, layer.post_attention_layernorm(h))
    assert torch.unique(idx).numel() == 4


@pytest.mark.parametrize("check", [P.check_prefill_one_request, P.check_two_requests_packed,
                                   P.check_chunked_prefill_then_decode,
                                   P.check_compaction_mid_generation_changes_nothing, P.check_fixed_shape_decode])
def test_parity_with_transformers(hf_model, check):
    check(hf_model, _runner, VOCAB)


def test_nope_dense_time_step_limit_chunked_prefill_then_decode():
    """No RoPE ('nope'), no experts (the shared MLP alone) and a finite time_step_limit, in one model."""
    overrides = dict(position_embedding_type="nope", num_local_experts=0, time_step_limit=(0.05, 0.4))
    model = _model(1, **overrides)
    ids = P.tokens(20, 8, VOCAB)
    runner = _runner(model)
    got = [runner.step([0], [ids[:11]], all_logits=True)[0], runner.step([0], [ids[11:17]], all_logits=True)[0]]
    got += [runner.step([0], [ids[i:i + 1]])[0][None] for i in range(17, 20)]
    err = P.max_err(torch.cat(got), P.reference(model, ids))
    print(f"{overrides}, chunked prefill then decode: max abs logit error {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0}),
     "rope_type 'linear' is not supported"),
    (dict(position_embedding_type="alibi"), "position_embedding_type 'alibi' is not supported"),
    (dict(layer_types=["mamba"] * 3), "at least one Mamba .* and one attention"),
])
def test_unsupported_config_is_named(overrides, message):
    model = transformers.GraniteMoeHybridForCausalLM(_config(**overrides)).eval()
    with pytest.raises(ValueError, match=message):
        GraniteMoeHybridRunner.from_transformers(model, capacity_bytes=8 * SLAB, slab_bytes=SLAB)
