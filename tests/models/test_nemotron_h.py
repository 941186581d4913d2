"""NemotronHRunner (avmp_triton/models/) against transformers' own NemotronHForCausalLM forward.

A tiny random fp32 model (layers M * M -; every parameter drawn at random, A_log, dt_bias, D, the
norms' weights and the conv bias included) runs once through transformers over whole sequences
(no cache) and once through the runner, whose K/V and conv / SSM states live only in its arena:
single and packed prefills, chunked prefill then decode, a compaction of live KV pages and SSM
blocks in the middle of generation, and bad inputs. On the CPU the ops run in Triton's interpreter.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
NemotronHConfig = getattr(transformers, "NemotronHConfig", None)
if NemotronHConfig is None or int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the runner reads transformers 5.x's Nemotron-H modules", allow_module_level=True)

from avmp_triton.models import NemotronHRunner  # noqa: E402
from tests.models import parity as P  # noqa: E402

DEV, TOL = P.DEV, P.TOL
VOCAB = 97
SLAB = 32 << 10     # a slab holds 4 KV pages or 2 SSM blocks of this model: compaction is easy to force
GEOMETRY = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                intermediate_size=96, ssm_state_size=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=2,
                conv_kernel=4, chunk_size=8, use_conv_bias=True, layer_norm_epsilon=1e-5)


@pytest.fixture(scope="module")
def hf_model():
    gen = torch.Generator().manual_seed(0)
    model = transformers.NemotronHForCausalLM(NemotronHConfig(hybrid_override_pattern="M*M-", **GEOMETRY)).eval()
    P.randomize(model, gen)
    return model.to(DEV)


def _runner(hf_model) -> NemotronHRunner:
    # 8 slabs: 4 for KV pages (16 pages), 4 for SSM blocks (8 blocks)
    return NemotronHRunner.from_transformers(hf_model, capacity_bytes=8 * SLAB, slab_bytes=SLAB, max_requests=4,
                                             max_context=64)


@pytest.mark.parametrize("check", [P.check_prefill_one_request, P.check_two_requests_packed,
                                   P.check_chunked_prefill_then_decode,
                                   P.check_compaction_mid_generation_changes_nothing, P.check_fixed_shape_decode])
def test_parity_with_transformers(hf_model, check):
    check(hf_model, _runner, VOCAB)



def test_bad_token_raises_and_allocates_nothing(hf_model):
    runner = _runner(hf_model)
    with pytest.raises(ValueError, match=f"token id {VOCAB} is out of range"):
        runner.step(["a"], [torch.tensor([1, VOCAB, 2], device=DEV)])
    with pytest.raises(ValueError, match="token id -3 is out of range"):
        runner.step(["a"], [torch.tensor([-3])])
    with pytest.raises(ValueError, match="position 5 given, but its cache holds 0"):
        runner.step(["a"], [torch.tensor([1])], positions=[5])
    st = runner.allocator.stats()
    assert (st.live_kv, st.live_ssm) == (0, 0) and not runner.rows


def test_unknown_layer_type_is_named():
    config = NemotronHConfig(hybrid_override_pattern="M*E", n_routed_experts=2, num_experts_per_tok=1,
                             moe_intermediate_size=16, moe_shared_expert_intermediate_size=16, **GEOMETRY)
    model = transformers.NemotronHForCausalLM(config).eval().to(DEV)
    with pytest.raises(ValueError, match=r"layer 2 has type 'moe' \(pattern 'E'\)"):
        NemotronHRunner.from_transformers(model, capacity_bytes=8 * SLAB, slab_bytes=SLAB)


def test_fp8_kv_pages_stay_close_to_transformers(hf_model):
    """K/V in float8_e4m3fn pages (scales 1.0), everything else as before: a quarter of the fp32
    page, the SSM block unchanged, and logits of a chunked prefill then decode within fp8's error of
    transformers' fp32 forward (one fp8 step is 1/8 of a value's power of two)."""
    from avmp_triton import AVMPAllocator
    spec = NemotronHRunner.spec_of(hf_model, kv_dtype=torch.float8_e4m3fn)
    full = NemotronHRunner.spec_of(hf_model)
    assert spec.kv_page_bytes * 4 == full.kv_page_bytes and spec.ssm_block_bytes == full.ssm_block_bytes
    runner = NemotronHRunner.from_transformers(hf_model, allocator=AVMPAllocator(spec, 8 * SLAB, slab_bytes=SLAB,
                                                                                 device=DEV),
                                               max_requests=2, max_context=64)
    ids = P.tokens(26, 4, VOCAB)
    want = P.reference(hf_model, ids)
    got = [runner.step([0], [ids[:13]], all_logits=True)[0], runner.step([0], [ids[13:22]], all_logits=True)[0]]
    got += [runner.step([0], [ids[i:i + 1]])[0][None] for i in range(22, 26)]
    err = (torch.cat(got) - want).abs()
    print(f"fp8 KV pages: max abs logit error {err.max():.2e}, mean {err.mean():.2e} (logits std {want.std():.2e})")
    assert err.max() < 0.5 * want.std() and err.mean() < 0.05 * want.std()
