"""MambaRunner and Mamba2Runner (avmp_triton/models/mamba.py) against transformers' own
MambaForCausalLM and Mamba2ForCausalLM forwards: the attention-free models, whose arena holds only
SSM blocks. Tiny random fp32 models (3 layers, every parameter drawn at random) run once through
transformers over whole sequences (no cache) and once through the runner: single and packed
prefills, chunked prefill then decode, a request in a just-released block, and a config the
runners refuse. On the CPU the ops run in Triton's interpreter.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the runners read transformers 5.x's Mamba modules", allow_module_level=True)

from avmp_triton.models import Mamba2Runner, MambaRunner  # noqa: E402
from tests.models import parity as P  # noqa: E402

DEV, TOL = P.DEV, P.TOL
VOCAB = 97
# d_inner 64 = Mamba2's 4 heads x 16; d_state 8; conv kernel 4
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, state_size=8, conv_kernel=4, expand=2,
              use_conv_bias=True, layer_norm_epsilon=1e-5, residual_in_fp32=True, tie_word_embeddings=False)
FAMILIES = {
    "mamba": (MambaRunner, lambda **o: transformers.MambaForCausalLM(transformers.MambaConfig(
        **{**COMMON, "intermediate_size": 64, "time_step_rank": 4, "use_bias": True, **o}))),
    "mamba2": (Mamba2Runner, lambda **o: transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        **{**COMMON, "num_heads": 4, "head_dim": 16, "n_groups": 2, "chunk_size": 8, "use_bias": True, **o}))),
}


def _model(family: str, seed: int = 0, **overrides):
    model = FAMILIES[family][1](**overrides).eval()
    P.randomize(model, torch.Generator().manual_seed(seed))
    return model.to(DEV)


def _make_runner(family: str, slab: int):
    def make(hf_model):
        # 6 slabs of SSM blocks, 2 blocks a slab (the KV pool gets none: there is no attention)
        return FAMILIES[family][0].from_transformers(hf_model, capacity_bytes=6 * slab, slab_bytes=slab,
                                                     max_requests=4, max_context=64)
    return make


def _slab(family: str) -> int:
    block = _make_runner(family, 1 << 20)(_model(family)).spec.ssm_block_bytes
    return -(-2 * block // 128) * 128


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("check", [P.check_prefill_one_request, P.check_two_requests_packed,
                                   P.check_fixed_shape_decode])
def test_prefill_parity(family, check):
    check(_model(family), _make_runner(family, _slab(family)), VOCAB)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chunked_prefill_then_decode(family):
    ids = P.tokens(26, 4, VOCAB)
    model = _model(family)
    runner = _make_runner(family, _slab(family))(model)
    got = [runner.step([0], [ids[:13]], all_logits=True)[0], runner.step([0], [ids[13:22]], all_logits=True)[0]]
    got += [runner.step([0], [ids[i:i + 1]])[0][None] for i in range(22, 26)]
    err = P.max_err(torch.cat(got), P.reference(model, ids))
    print(f"{family}: chunked prefill (13 + 9) then 4 decode steps: max abs logit error {err:.2e}")
    assert err < TOL
    assert runner.num_pages[runner.rows[0]].item() == 0     # no KV page: nothing to page


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_recycled_block_starts_clean(family):
    """A request admitted into the block another one just released (its state still there) starts
    from zero state, while a neighbour keeps decoding. (Nothing is ever compacted here: with no KV
    pool, no capacity can move and no SSM block is ever relocated.)"""
    model = _model(family)
    runner = _make_runner(family, _slab(family))(model)
    seqs = {r: P.tokens(18, 10 + i, VOCAB) for i, r in enumerate("abd")}
    got = {r: [g] for r, g in zip("ab", runner.step(["a", "b"], [seqs["a"][:15], seqs["b"][:15]], all_logits=True))}
    freed = runner.ssm_handles[runner.rows["b"]].item()
    runner.release(["b"])
    got["d"] = [runner.step(["d"], [seqs["d"][:15]], all_logits=True)[0]]
    assert runner.ssm_handles[runner.rows["d"]].item() == freed   # the freed block, reused at once
    for i in range(15, 18):
        for r, g in zip("ad", runner.step(["a", "d"], [seqs["a"][i:i + 1], seqs["d"][i:i + 1]])):
            got[r].append(g[None])
    errs = {r: P.max_err(torch.cat(got[r]), P.reference(model, seqs[r])) for r in "ad"}
    print(f"{family}: recycled block: max abs logit errors {errs}")
    assert max(errs.values()) < TOL


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unsupported_activation_is_named(family):
    model = FAMILIES[family][1](hidden_act="gelu").eval()
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        FAMILIES[family][0].from_transformers(model, capacity_bytes=6 << 20)
