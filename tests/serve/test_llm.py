"""The LLM engine (avmp_triton/serve/) on a tiny random Nemotron-H in fp32 on the CPU (the ops in
Triton's interpreter): greedy generation token-equal to transformers' own greedy generate() for
requests of different lengths arriving at different steps with chunked prefill; the same tokens
when memory pressure preempts requests (recompute), under every allocator that can serve; early
stop on a stop token; and the refusals."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from avmp_triton.engine.sampling import SamplingParams  # noqa: E402
from avmp_triton.models.loading import random_model  # noqa: E402
from avmp_triton.serve import LLM  # noqa: E402
from tests.models.parity import randomize  # noqa: E402

PROMPTS = [list(range(5, 24)), [30, 31, 32], list(range(40, 47))]   # 19, 3 and 7 tokens
ARRIVALS = [0, 2, 3]                                                  # scheduler steps
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"    # the ops run where the arena is


@pytest.fixture(scope="module")
def model():
    return random_model("nemotron-h-tiny", dtype=torch.float32, seed=0, device=DEV).eval()


@pytest.fixture(scope="module")
def reference(model):
    """transformers' greedy continuation of each prompt (min_new_tokens: no early EOS)."""
    out = []
    for p in PROMPTS:
        g = model.generate(torch.tensor([p], device=DEV), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        out.append(g[0, len(p):].tolist())
    return out


def _llm(model, **kw):
    kw = {"memory_gib": 0.01, "max_num_seqs": 4, "max_num_batched_tokens": 16, "max_model_len": 64, "dtype": "float32",
          **kw}
    return LLM(model, **kw)


@pytest.mark.parametrize("eager", [True, False])
def test_greedy_equals_transformers_generate(model, reference, eager):
    """Budget 16 tokens a step: the 19-token prompt prefills in two chunks, beside the others'.
    Not eager: the decode-only steps run the fixed-shape step that CUDA graphs capture."""
    llm = _llm(model, enforce_eager=eager)
    outs = llm.generate(PROMPTS, GREEDY, arrivals=ARRIVALS)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert (llm.last_graph_steps == 0) if eager else (0 < llm.last_graph_steps < llm.last_steps)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert all(o.ttft_s > 0 and o.tpot_s > 0 for o in outs)
    m = llm.last_metrics
    assert m.completed == 3 and m.units_returned_at_drain


# 4 slabs of 4 KV pages (16 tokens each, fp32) or 3 SSM blocks: 4 requests of up to 49 tokens need
# 16 pages and 4 blocks, so no split holds them all and growth must preempt
PRESSURE = dict(memory_gib=4 * 65536 / (1 << 30), allocator_kwargs={"slab_bytes": 65536})
LONG = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)


@pytest.fixture(scope="module")
def unpressured(model):
    prompts = [PROMPTS[0], PROMPTS[2], [50 + i for i in range(12)], PROMPTS[1]]
    return prompts, [o.outputs[0].token_ids for o in _llm(model).generate(prompts, LONG)]


@pytest.mark.parametrize("allocator, extra", [("avmp", {}), ("sglang_static", {}),
                                              ("static_tuned", {"ssm_fraction": 0.5})])
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_requests_generate_the_same_tokens(model, unpressured, allocator, extra, mode):
    prompts, want = unpressured
    llm = _llm(model, allocator=allocator, preemption_mode=mode, **PRESSURE, **extra)
    outs = llm.generate(prompts, LONG)
    m = llm.last_metrics
    print(f"{allocator}, {mode}: {m.preemptions} preemptions, {m.recomputed_tokens} tokens recomputed, "
          f"{m.swapped_out} swapped out ({m.swap_bytes} bytes), {m.migrations} migrations")
    assert m.preemptions > 0 and m.completed == 4 and m.units_returned_at_drain
    if mode == "swap":    # nothing is prefilled twice: every preempted request resumes from its copy
        assert m.swapped_out == m.preemptions and m.recomputed_tokens == 0 and m.swap_bytes > 0
    else:
        assert m.swapped_out == 0 and m.recomputed_tokens > 0
    assert [o.outputs[0].token_ids for o in outs] == want


def test_fp8_kv_cache(model, reference):
    """kv_cache_dtype="fp8": pages a quarter of the fp32 model's, the SSM state still fp32, and the
    greedy tokens those of transformers' fp32 generate() until fp8's error first flips a near-tie."""
    llm = _llm(model, kv_cache_dtype="fp8")
    spec = llm.allocator.spec
    assert spec.kv_dtype == torch.float8_e4m3fn and spec.ssm_dtype == torch.float32
    outs = llm.generate(PROMPTS, GREEDY, arrivals=ARRIVALS)
    same = [next((i for i, (a, b) in enumerate(zip(o.outputs[0].token_ids, r)) if a != b), len(r))
            for o, r in zip(outs, reference)]
    print(f"fp8 KV: leading greedy tokens equal to transformers' fp32: {same} of {len(reference[0])}")
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs) and sum(same) >= len(same) * 2
    assert llm.last_metrics.units_returned_at_drain


def test_fp8_kv_cache_refusals_and_attention_free_models():
    """fp8 pages need rows of whole 16-byte words (a head_dim that is a multiple of 16); an
    attention-free model has no pages, so the option changes nothing there."""
    odd = random_model(dict(model_type="nemotron_h", hybrid_override_pattern="M*", vocab_size=97, hidden_size=64,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=40, intermediate_size=96,
                            ssm_state_size=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, conv_kernel=4,
                            chunk_size=8), dtype=torch.float32, device=DEV)
    with pytest.raises(ValueError, match="fp8 KV pages need a head_dim that is a multiple of 16.* has 40"):
        _llm(odd, kv_cache_dtype="fp8")
    mamba = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8, num_heads=4, head_dim=16, n_groups=2,
        chunk_size=8)).eval().to(DEV)
    outs = _llm(mamba, kv_cache_dtype="fp8").generate([[1, 2, 3]], GREEDY)
    assert len(outs[0].outputs[0].token_ids) == 6


def test_stop_token_ends_a_request_early(model, reference):
    stop = reference[0][3]
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, stop_token_ids=[stop])
    out = _llm(model).generate([PROMPTS[0]], sp)[0].outputs[0]
    first = reference[0].index(stop)
    assert out.token_ids == reference[0][:first + 1] and out.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(model):
    sp = SamplingParams(temperature=1.0, top_k=20, seed=7, max_tokens=5, ignore_eos=True)
    a = _llm(model).generate(PROMPTS[:2], sp)
    b = _llm(model).generate(PROMPTS[:2], sp)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


@pytest.mark.parametrize("kw, error, message", [
    (dict(allocator="vllm_hybrid"), ValueError, "allocator 'vllm_hybrid' cannot serve .its SSM state spans"),
    (dict(allocator="lru"), ValueError, "allocator 'lru' cannot serve; choose one of"),
    (dict(enforce_eager="no"), ValueError, "enforce_eager must be a bool, got 'no'"),
    (dict(max_model_len=1), ValueError, "max_model_len must be an int >= 2 .* got 1"),
    (dict(max_model_len=1 << 20), ValueError, "max_model_len=1048576 exceeds the model's max_position_embeddings"),
    (dict(max_num_seqs=0), ValueError, "max_num_seqs must be a positive int, got 0"),
    (dict(kv_cache_dtype="int8"), ValueError, r"kv_cache_dtype must be one of \['auto', 'fp8', 'fp8_e4m3'\], got 'int8'"),
    (dict(memory_gib=-1), ValueError, "memory_gib must be a positive number, got -1"),
    (dict(preemption_mode="evict"), ValueError, "preemption_mode must be 'recompute' or 'swap', got 'evict'"),
])
def test_bad_engine_arguments_are_named(model, kw, error, message):
    with pytest.raises(error, match=message):
        _llm(model, **kw)


def test_bad_prompts_are_named(model):
    llm = _llm(model)
    with pytest.raises(ValueError, match="prompts.1. is a string but the LLM has no tokenizer"):
        llm.generate([[1, 2], "hello"], GREEDY)
    with pytest.raises(ValueError, match=r"prompts\[0\] must be a non-empty list of token ids in \[0, 97\), got 97"):
        llm.generate([[1, 97]], GREEDY)
    with pytest.raises(ValueError, match="arrivals must have one entry per prompt"):
        llm.generate([[1, 2]], GREEDY, arrivals=[0, 1])
    with pytest.raises(ValueError, match=r"prompts\[1\]: 60 prompt tokens \+ max_tokens 6 exceed max_model_len=64"):
        llm.generate([[1, 2], [3] * 60], GREEDY)


def test_the_package_exports_the_engine():
    import avmp_triton
    assert avmp_triton.LLM is LLM and avmp_triton.SamplingParams is SamplingParams


def _forward_greedy(model, prompt: list, n: int) -> list:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq], device=DEV)).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_attention_free_models_are_served(family, seed):
    """An attention-free model's requests hold one SSM block and no page: with room for 2 blocks,
    the third request waits for a block, and every request's greedy tokens equal transformers'
    greedy continuation by its own forward of the whole sequence. Not its generate(): for Mamba2
    with n_groups 2, transformers 5.25's cached decode disagrees with its own forward (at
    transformers' init, seed 0, prompt 40..46: generate gives 88 69 87 41, the forward's argmax
    after 88 69 87 is token 2 by 0.46); with n_groups 1 the two agree."""
    cfg = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8, conv_kernel=4, expand=2,
               use_conv_bias=True, residual_in_fp32=True)
    if family == "mamba":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(**cfg, intermediate_size=64,
                                                                        time_step_rank=4))
    else:
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**cfg, num_heads=4, head_dim=16, n_groups=2,
                                                                          chunk_size=8))
    randomize(model, torch.Generator().manual_seed(seed))
    model = model.eval().to(DEV)
    block = LLM(model, memory_gib=0.01, max_num_seqs=4).allocator.spec.ssm_block_bytes
    slab = -(-block // 128) * 128
    llm = LLM(model, memory_gib=2 * slab / (1 << 30), max_num_seqs=4, max_num_batched_tokens=16,
              allocator_kwargs={"slab_bytes": slab})
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [_forward_greedy(model, p, 6) for p in PROMPTS]
    m = llm.last_metrics
    assert m.completed == 3 and m.batch_peak == 2 and m.units_returned_at_drain
