"""JambaRunner (avmp_triton/models/jamba.py) against transformers' own JambaForCausalLM forward.

A tiny random fp32 model (layers: Mamba1 + MoE, attention + dense MLP, Mamba1 + MoE; 4 experts,
top-2; every parameter drawn at random: A_log [d_inner, d_state], dt_proj's bias, D, the norms'
weights (dt/B/C norms too), the conv bias, the router and the experts) runs once through transformers
over whole sequences (no cache) and once through the runner, whose K/V and conv / SSM states live
only in its arena: single and packed prefills, chunked prefill then decode, a compaction of live KV
pages and SSM blocks in the middle of generation, and configs the runner refuses. On the CPU the ops
run in Triton's interpreter.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
JambaConfig = getattr(transformers, "JambaConfig", None)
if JambaConfig is None or int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the runner reads transformers 5.x's Jamba modules", allow_module_level=True)

from avmp_triton.models.jamba import JambaRunner  # noqa: E402
from tests.models import parity as P  # noqa: E402

DEV, TOL = P.DEV, P.TOL
VOCAB = 97
SLAB = 32 << 10     # a slab holds 4 KV pages (8 KiB) or 2 SSM blocks of this model: compaction is easy to force
# attention head_dim 64 (hidden / heads, GQA 2:1); Mamba1 d_inner 128 (expand 1), d_state 8, dt rank 8
GEOMETRY = dict(vocab_size=VOCAB, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=96,
                num_hidden_layers=3, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                expert_layer_offset=0, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4,
                mamba_expand=1, mamba_dt_rank=8, mamba_conv_bias=True, mamba_proj_bias=True, rms_norm_eps=1e-5)


def _config(**overrides) -> "JambaConfig":
    return JambaConfig(**{**GEOMETRY, **overrides})


@pytest.fixture(scope="module")
def hf_model():
    model = transformers.JambaForCausalLM(_config()).eval()
    P.randomize(model, torch.Generator().manual_seed(0))
    cfg = model.config
    assert cfg.layers_block_type == ["mamba", "attention", "mamba"]
    assert cfg.layers_num_experts == [4, 1, 4]
    mixer = model.model.layers[0].mamba
    assert mixer.A_log.shape == (128, 8) and mixer.dt_proj.bias.std() > 0.2   # softplus sees a spread of dt
    return model.to(DEV)


def _runner(hf_model) -> JambaRunner:
    # 8 slabs: 4 for KV pages (16 pages), 4 for SSM blocks (8 blocks)
    return JambaRunner.from_transformers(hf_model, capacity_bytes=8 * SLAB, slab_bytes=SLAB, max_requests=4,
                                         max_context=64)


def test_geometry_matches_the_slab_plan(hf_model):
    spec = _runner(hf_model).spec
    assert spec.mamba_version == 1 and (spec.d_inner, spec.d_state) == (128, 8)
    assert spec.kv_page_bytes == 8192 and SLAB // 3 < spec.ssm_block_bytes <= SLAB // 2


def test_moe_routes_tokens_to_several_experts(hf_model):
    """The MoE branch matters: the tokens of a prompt reach more than top_k distinct experts."""
    moe = hf_model.model.layers[0].feed_forward
    x = hf_model.model.embed_tokens(P.tokens(21, 1, VOCAB))
    # top-k of the router's logits (softmax keeps their order), from its weight: transformers 5.x
    # releases differ in what the router module returns
    k = hf_model.config.num_experts_per_tok
    idx = torch.nn.functional.linear(x, moe.router.weight).topk(k, dim=-1).indices
    assert idx.unique().numel() > k


@pytest.mark.parametrize("check", [P.check_prefill_one_request, P.check_two_requests_packed,
                                   P.check_chunked_prefill_then_decode,
                                   P.check_compaction_mid_generation_changes_nothing, P.check_fixed_shape_decode])
def test_parity_with_transformers(hf_model, check):
    check(hf_model, _runner, VOCAB)


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(num_hidden_layers=1, attn_layer_period=2, attn_layer_offset=1),
     "at least one Mamba .* and one attention"),
])
def test_unsupported_config_is_named(overrides, message):
    model = transformers.JambaForCausalLM(_config(**overrides)).eval()
    with pytest.raises(ValueError, match=message):
        JambaRunner.from_transformers(model, capacity_bytes=8 * SLAB, slab_bytes=SLAB)
