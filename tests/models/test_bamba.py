"""BambaRunner (avmp_triton/models/) against transformers' own BambaForCausalLM forward.

A tiny random fp32 model (layers: Mamba, attention, Mamba; every parameter drawn at
random, A_log, dt_bias, D, the norms' weights, the conv bias and the projections' biases included)
runs once through transformers over whole sequences (no cache) and once through the runner, whose
RoPE-rotated K, V and conv / SSM states live only in its arena: single and packed prefills, chunked
prefill then decode, a compaction of live KV pages and SSM blocks in the middle of generation, a
finite time_step_limit, and configs the runner refuses. On the CPU the ops run in Triton's interpreter.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
BambaConfig = getattr(transformers, "BambaConfig", None)
if BambaConfig is None or int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the runner reads transformers 5.x's Bamba modules", allow_module_level=True)

from avmp_triton.models import BambaRunner  # noqa: E402
from tests.models import parity as P  # noqa: E402

DEV, TOL = P.DEV, P.TOL
VOCAB = 97
SLAB = 32 << 10     # a slab holds 4 KV pages (8 KiB) or 2 SSM blocks (11.75 KiB): compaction is easy to force
# attention head_dim 64 (hidden / heads, GQA 2:1), of which RoPE rotates the first 32 (BambaConfig's
# partial_rotary_factor 0.5); rope_theta 100 so that positions up to 27 turn every rotated pair visibly
GEOMETRY = dict(vocab_size=VOCAB, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=96,
                num_hidden_layers=3, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_expand=1,
                mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=8, mamba_conv_bias=True,
                mamba_proj_bias=True, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 100.0})


def _config(**overrides) -> "BambaConfig":
    return BambaConfig(**{**GEOMETRY, **overrides})


@pytest.fixture(scope="module")
def hf_model():
    gen = torch.Generator().manual_seed(0)
    model = transformers.BambaForCausalLM(_config()).eval()
    P.randomize(model, gen)
    assert model.config.layers_block_type == ["linear_attention", "full_attention", "linear_attention"]
    assert model.model.rotary_emb.inv_freq.numel() == 16   # 32 of head_dim 64 rotated
    return model.to(DEV)


def _runner(hf_model) -> BambaRunner:
    # 8 slabs: 4 for KV pages (16 pages), 4 for SSM blocks (8 blocks)
    return BambaRunner.from_transformers(hf_model, capacity_bytes=8 * SLAB, slab_bytes=SLAB, max_requests=4,
                                         max_context=64)


def test_geometry_matches_the_slab_plan(hf_model):
    spec = _runner(hf_model).spec
    assert (spec.kv_page_bytes, spec.ssm_block_bytes) == (8192, 12032)


@pytest.mark.parametrize("check", [P.check_prefill_one_request, P.check_two_requests_packed,
                                   P.check_chunked_prefill_then_decode,
                                   P.check_compaction_mid_generation_changes_nothing, P.check_fixed_shape_decode])
def test_parity_with_transformers(hf_model, check):
    check(hf_model, _runner, VOCAB)



def test_time_step_limit_clamps_as_the_full_forward():
    """A finite time_step_limit: the runner clamps softplus(dt + dt_bias) on every path (prefill
    chunks and decode), as transformers' whole-sequence forward does."""
    model = transformers.BambaForCausalLM(_config(time_step_limit=(0.05, 0.4))).eval()
    P.randomize(model, torch.Generator().manual_seed(1))
    model = model.to(DEV)
    ids = P.tokens(20, 8, VOCAB)
    runner = _runner(model)
    got = [runner.step([0], [ids[:11]], all_logits=True)[0], runner.step([0], [ids[11:17]], all_logits=True)[0]]
    got += [runner.step([0], [ids[i:i + 1]])[0][None] for i in range(17, 20)]
    err = P.max_err(torch.cat(got), P.reference(model, ids))
    print(f"time_step_limit (0.05, 0.4), chunked prefill then decode: max abs logit error {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0}),
     "rope_type 'linear' is not supported"),
    (dict(attn_layer_indices=None), "at least one Mamba .* and one attention"),
])
def test_unsupported_config_is_named(overrides, message):
    model = transformers.BambaForCausalLM(_config(**overrides)).eval()
    with pytest.raises(ValueError, match=message):
        BambaRunner.from_transformers(model, capacity_bytes=8 * SLAB, slab_bytes=SLAB)
