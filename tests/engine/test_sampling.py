"""SamplingParams' checks and the sampler (avmp_triton/engine/sampling.py) against their definitions:
greedy is argmax; the top-k / top-p filters keep exactly the tokens a sort says they should; the
sampled frequencies follow softmax(logits / T) over the kept tokens; a seeded request draws the
same tokens whatever else shares its batch."""
import math

import pytest
import torch

from avmp_triton.engine.sampling import SamplingParams, filter_logits, sample


def _logits(B: int, V: int, seed: int) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax_whatever_the_filters():
    logits = _logits(5, 50, 0)
    params = [SamplingParams(temperature=0.0, top_k=3, top_p=0.1)] * 5
    assert torch.equal(sample(logits, params, [None] * 5), logits.argmax(dim=1))


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (-1, 1.0), (5, 1.0), (1, 1.0), (0, 0.5), (0, 1e-6), (7, 0.8)])
def test_filter_keeps_the_defined_set(top_k, top_p):
    logits = _logits(6, 40, 1)
    T = 0.7
    got = filter_logits(logits, torch.full((6,), T), torch.full((6,), top_k), torch.full((6,), top_p))
    for b in range(6):
        order = (logits[b] / T).argsort(descending=True)
        keep = order[:top_k] if top_k > 0 else order
        probs = torch.softmax(logits[b, keep] / T, 0)
        # the nucleus: the most likely tokens until their mass reaches top_p (at least one)
        n = int((torch.cumsum(probs, 0) - probs < top_p).sum()) if top_p < 1 else len(keep)
        want = set(keep[:max(1, n)].tolist())
        kept = set(torch.nonzero(torch.isfinite(got[b])).flatten().tolist())
        assert kept == want, (b, sorted(kept), sorted(want))
        assert torch.allclose(got[b, list(kept)], logits[b, list(kept)] / T)


def test_frequencies_follow_the_filtered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    params = SamplingParams(temperature=0.8, top_k=4, seed=3)
    gen = torch.Generator().manual_seed(3)
    n = 20000
    draws = torch.stack([sample(logits, [params], [gen]) for _ in range(n)]).flatten()
    want = torch.softmax(logits[0, :4] / 0.8, 0)
    freq = torch.bincount(draws, minlength=6).double() / n
    assert freq[4:].sum() == 0                                   # outside the top 4: never
    assert torch.allclose(freq[:4], want.double(), atol=4 * math.sqrt(0.25 / n))


def test_seeded_request_is_independent_of_its_batch():
    """20 draws of a seeded request alone, and beside an unseeded and a greedy request (whose
    draws would shift a shared generator): the same 20 tokens."""
    logits = _logits(3, 30, 2)
    p = SamplingParams(temperature=1.0, seed=11)
    g_alone, g_mixed = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    alone = [sample(logits[1:2], [p], [g_alone]).item() for _ in range(20)]
    mixed = [sample(logits, [SamplingParams(), p, SamplingParams(temperature=0.0)], [None, g_mixed, None])
             for _ in range(20)]
    assert [m[1].item() for m in mixed] == alone
    assert len(set(alone)) > 1                                   # really sampled, not argmax
    assert all(m[2].item() == logits[2].argmax().item() for m in mixed)


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-0.1), "temperature must be a finite float >= 0, got -0.1"),
    (dict(temperature=float("nan")), "temperature must be a finite float"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_k=-2), "top_k must be an int >= -1"),
    (dict(top_k=2.5), "top_k must be an int >= -1"),
    (dict(max_tokens=0), "max_tokens must be an int >= 1, got 0"),
    (dict(seed="x"), "seed must be None or an int, got 'x'"),
    (dict(ignore_eos=1), "ignore_eos must be a bool, got 1"),
    (dict(stop_token_ids=[3, -1]), "stop_token_ids must be non-negative ints, got -1"),
])
def test_bad_params_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


def test_sample_checks_its_lists():
    with pytest.raises(ValueError, match="logits has 2 rows, params 1, generators 2"):
        sample(_logits(2, 5, 0), [SamplingParams()], [None, None])
