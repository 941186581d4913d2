"""FalconH1Runner (avmp_triton/models/) against transformers' own FalconH1ForCausalLM forward.

A tiny random fp32 model (2 parallel-hybrid layers, each with a Mamba2 mixer and a RoPE attention;
every parameter drawn at random, the mixers' mup_vector buffers too, and every muP multiplier away
from 1) runs once through transformers over whole sequences (no cache) and once through the runner,
whose K, V and conv / SSM states live only in its arena: the shared parity checks, the gated-RMSNorm
variants of the mixer (mamba_rms_norm, norm before / after the gate), and configs the runner refuses.
On the CPU the ops run in Triton's interpreter.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
FalconH1Config = getattr(transformers, "FalconH1Config", None)
if FalconH1Config is None or int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the runner reads transformers 5.x's Falcon-H1 modules", allow_module_level=True)

from avmp_triton.models.falcon_h1 import FalconH1Runner  # noqa: E402
from tests.models import parity as P  # noqa: E402

DEV, TOL = P.DEV, P.TOL
VOCAB = 97
SLAB = 64 << 10     # a slab holds 4 KV pages (16 KiB) or 2 SSM blocks (22.75 KiB): compaction is easy to force
# attention head_dim 64 (hidden / heads, GQA 2:1); Mamba d_inner 256 from mamba_d_ssm (not
# mamba_expand * hidden = 128); rope_theta 100 so that positions up to 27 turn every pair visibly
GEOMETRY = dict(vocab_size=VOCAB, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=96,
                num_hidden_layers=2, mamba_n_heads=8, mamba_d_head=32, mamba_d_ssm=256, mamba_expand=1,
                mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=8, mamba_conv_bias=True,
                mamba_proj_bias=True, projectors_bias=True, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5,
                tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 100.0},
                embedding_multiplier=1.7, lm_head_multiplier=0.6, key_multiplier=1.3, attention_in_multiplier=0.8,
                attention_out_multiplier=1.2, ssm_in_multiplier=1.1, ssm_out_multiplier=0.9,
                mlp_multipliers=[1.4, 0.7], ssm_multipliers=[0.9, 1.2, 0.8, 1.1, 1.3])


def _config(**overrides) -> "FalconH1Config":
    return FalconH1Config(**{**GEOMETRY, **overrides})


def _model(seed: int = 0, **overrides):
    gen = torch.Generator().manual_seed(seed)
    model = transformers.FalconH1ForCausalLM(_config(**overrides)).eval()
    P.randomize(model, gen)
    with torch.no_grad():   # the muP vector is a buffer: randomize() leaves it at the ssm_multipliers
        for layer in model.model.layers:
            mup = layer.mamba.mup_vector
            mup.mul_(torch.exp(0.3 * torch.randn(mup.shape, generator=gen)))
    return model.to(DEV)


@pytest.fixture(scope="module")
def hf_model():
    model = _model()
    assert model.config.layer_types == ["hybrid", "hybrid"]
    assert model.model.layers[0].mamba.intermediate_size == 256
    assert model.model.rotary_emb.inv_freq.numel() == 32   # all of head_dim 64 rotated
    return model


def _runner(hf_model) -> FalconH1Runner:
    # 8 slabs: 4 for KV pages (16 pages), 4 for SSM blocks (8 blocks)
    return FalconH1Runner.from_transformers(hf_model, capacity_bytes=8 * SLAB, slab_bytes=SLAB, max_requests=4,
                                            max_context=64)


def test_geometry_matches_the_slab_plan(hf_model):
    spec = _runner(hf_model).spec
    assert (spec.num_attn_layers, spec.num_mamba_layers) == (2, 2)
    assert (spec.kv_page_bytes, spec.ssm_block_bytes) == (16384, 23296)


@pytest.mark.parametrize("check", [P.check_prefill_one_request, P.check_two_requests_packed,
                                   P.check_chunked_prefill_then_decode,
                                   P.check_compaction_mid_generation_changes_nothing, P.check_fixed_shape_decode])
def test_parity_with_transformers(hf_model, check):
    check(hf_model, _runner, VOCAB)


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_rms_norm_variant(norm_before_gate):
    """mamba_rms_norm: the grouped gated RMSNorm after the scan, with the gate before or after the norm."""
    model = _model(1, mamba_rms_norm=True, mamba_norm_before_gate=norm_before_gate)
    P.check_chunked_prefill_then_decode(model, _runner, VOCAB)


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0}),
     "rope_type 'linear' is not supported"),
    (dict(head_dim=36), "the falcon_h1 model's attention has head_dim 36; the attention kernels take a multiple of 8"),
])
def test_unsupported_config_is_named(overrides, message):
    model = transformers.FalconH1ForCausalLM(_config(**overrides)).eval()
    with pytest.raises(ValueError, match=message):
        FalconH1Runner.from_transformers(model, capacity_bytes=8 * SLAB, slab_bytes=SLAB)
