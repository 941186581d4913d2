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

DEV = "cuda" if torch.cuda.is_available() else "cpu"   # the ops run where the arena is
TOL = 1e-4          # max abs logit error, fp32
VOCAB = 97
SLAB = 32 << 10     # a slab holds 4 KV pages or 2 SSM blocks of this model: compaction is easy to force
GEOMETRY = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                intermediate_size=96, ssm_state_size=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=2,
                conv_kernel=4, chunk_size=8, use_conv_bias=True, layer_norm_epsilon=1e-5)


def _randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter random, at a scale that keeps activations O(1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("A_log"):
                p.copy_(noise * 0.5)                    # A = -exp(A_log) in about [-2.7, -0.4]
            elif name.endswith("dt_bias"):
                p.copy_(noise * 0.5 - 1.0)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 1:                          # D, conv bias, any other bias
                p.copy_(noise * 0.5)
            elif "embeddings" in name:
                p.copy_(noise)
            else:                                       # linears and the conv: fan-in scaling
                p.copy_(noise * p[0].numel() ** -0.5)


@pytest.fixture(scope="module")
def hf_model():
    gen = torch.Generator().manual_seed(0)
    model = transformers.NemotronHForCausalLM(NemotronHConfig(hybrid_override_pattern="M*M-", **GEOMETRY)).eval()
    _randomize(model, gen)
    return model.to(DEV)


def _runner(hf_model) -> NemotronHRunner:
    # 8 slabs: 4 for KV pages (16 pages), 4 for SSM blocks (8 blocks)
    return NemotronHRunner.from_transformers(hf_model, capacity_bytes=8 * SLAB, slab_bytes=SLAB, max_requests=4,
                                             max_context=64)


def _reference(hf_model, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits ``[len, vocab]`` of a whole sequence, without a cache."""
    with torch.no_grad():
        return hf_model(ids[None], use_cache=False).logits[0].float()


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want).abs().max().item()


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).to(DEV)


def test_prefill_one_request(hf_model):
    ids = _tokens(21, 1)
    runner = _runner(hf_model)
    logits = runner.step(["a"], [ids], all_logits=True)[0]
    err = _err(logits, _reference(hf_model, ids))
    print(f"prefill, one request: max abs logit error {err:.2e}")
    assert err < TOL
    last = runner.step(["b"], [ids])[0]       # the default: the last token's logits only
    assert last.shape == (VOCAB,) and _err(last, logits[-1]) < TOL


def test_two_requests_packed(hf_model):
    seqs = [_tokens(19, 2), _tokens(7, 3)]
    runner = _runner(hf_model)
    got = runner.step(["x", "y"], seqs, all_logits=True)
    errs = [_err(g, _reference(hf_model, s)) for g, s in zip(got, seqs)]
    print(f"packed prefill of 19 + 7 tokens: max abs logit errors {errs[0]:.2e}, {errs[1]:.2e}")
    assert max(errs) < TOL


def test_chunked_prefill_then_decode(hf_model):
    ids = _tokens(26, 4)                       # 13 + 9 prompt tokens in two chunks, then 4 decoded
    want = _reference(hf_model, ids)
    runner = _runner(hf_model)
    got = [runner.step([0], [ids[:13]], all_logits=True)[0],
           runner.step([0], [ids[13:22]], positions=[13], all_logits=True)[0]]
    for i in range(22, 26):
        got.append(runner.step([0], [ids[i:i + 1]], positions=[i])[0][None])
    err = _err(torch.cat(got), want)
    print(f"chunked prefill (13 + 9) then 4 decode steps: max abs logit error {err:.2e}")
    assert err < TOL
    assert runner.num_pages[runner.rows[0]].item() == 2   # 26 tokens: two pages of 16


def _offsets(runner, rid) -> list:
    row = runner.rows[rid]
    pages = runner.block_table[row, :runner.num_pages[row]]
    return runner.allocator.resolve(torch.cat([pages, runner.ssm_handles[row:row + 1]])).tolist()


def test_compaction_mid_generation_changes_nothing(hf_model):
    seqs = {"a": _tokens(24, 5), "b": _tokens(20, 6), "c": _tokens(27, 7)}
    want = {r: _reference(hf_model, s) for r, s in seqs.items()}
    runner = _runner(hf_model)
    alloc = runner.allocator
    # a and b share the first SSM slab and KV slab, c takes the next ones; b leaves, so neither
    # pool has a free slab beyond two spare ones and moving 3 slabs must compact live units
    got = {r: [g] for r, g in zip("abc", runner.step(list("abc"), [seqs["a"][:20], seqs["b"], seqs["c"][:20]],
                                                      all_logits=True))}
    runner.release(["b"])
    before = {r: _offsets(runner, r) for r in "ac"}
    alloc.rebalance("kv", 3)                   # compacts an SSM slab with a live block
    moved_ssm = alloc.stats().bytes_copied
    alloc.rebalance("ssm", 6)                  # then a KV slab with live pages
    stats = alloc.stats()
    after = {r: _offsets(runner, r) for r in "ac"}
    print(f"compaction: {stats.units_moved} units moved, {stats.bytes_copied} bytes copied; "
          f"offsets {before} -> {after}")
    assert moved_ssm > 0 and stats.bytes_copied > moved_ssm and before != after
    # one mixed step (a decodes, c prefills a continuation chunk), then decode both
    for r, g in zip("ac", runner.step(["a", "c"], [seqs["a"][20:21], seqs["c"][20:24]], all_logits=True)):
        got[r].append(g)
    for i in range(21, 24):
        for r, g in zip("ac", runner.step(["a", "c"], [seqs["a"][i:i + 1], seqs["c"][i + 3:i + 4]])):
            got[r].append(g[None])
    errs = {r: _err(torch.cat(got[r]), want[r]) for r in "ac"}
    print(f"compaction mid-generation: max abs logit errors {errs}")
    assert max(errs.values()) < TOL
    assert len(got["b"]) == 1 and _err(got["b"][0], want["b"]) < TOL


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
