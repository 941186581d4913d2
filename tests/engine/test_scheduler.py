"""Scheduler (avmp_triton/engine/scheduler.py), its metrics, and the proactive watermark policy.

Hand-checked traces on a tiny spec (page_tokens 4: a 128-byte page, 4 per 512-byte slab; a
224-byte SSM block, 2 per slab), invariants from the event log on random workloads under pressure,
the device backend (Triton kernels) against the model backend (reference model), and the
proactive kernel against the reference model.
"""
import dataclasses
import json

import numpy as np
import pytest
import torch

from avmp_triton import (
    AVMPAllocator,
    HybridModelSpec,
    PaddedUnifiedAllocator,
    StaticDualAllocator,
    VllmHybridAllocator,
    get_preset,
)
from avmp_triton.engine.metrics import MAX_SERIES_POINTS, RunMetrics
from avmp_triton.memory.model import AllocatorModel, assert_matches
from avmp_triton.engine.scheduler import Scheduler
from avmp_triton.sim.steptime import load_step_time
from avmp_triton.sim.workloads import Request, make_workload

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLAB = 512
PT = 4
# 32 B of K+V per token: page 4 x 32 = 128 B (4 per slab); block 96 + 128 = 224 B (2 per slab, 64-B tail)
SPEC = HybridModelSpec(
    name="tiny", num_attn_layers=1, num_kv_heads=1, head_dim=4, kv_dtype=torch.float32,
    num_mamba_layers=1, mamba_version=1, d_inner=8, d_state=4, conv_dtype=torch.float32,
    ssm_dtype=torch.float32)
# fields that may differ between the backends (everything else must be identical)
BACKEND_FIELDS = {"backend", "host_syncs_per_step", "alloc_time_us_per_step_mean", "alloc_time_us_per_step_p50",
                  "alloc_time_kind"}


def make(cls, slabs: int, **kw):
    return cls(SPEC, slabs * SLAB + 77, device=DEVICE, slab_bytes=SLAB, page_tokens=PT, **kw)


def reqs(*rows) -> list[Request]:
    return [Request(i, a, p, o) for i, (a, p, o) in enumerate(rows)]


def random_requests(seed: int, n: int, max_prompt: int = 13, max_output: int = 11) -> list[Request]:
    rng = np.random.default_rng(seed)
    arrival = np.sort(rng.integers(0, max(1, n // 2), n))
    return [Request(i, int(arrival[i]), int(rng.integers(1, max_prompt + 1)), int(rng.integers(1, max_output + 1)))
            for i in range(n)]


def run(alloc, requests, backend="model", events=False, max_ticks=None, **kw):
    s = Scheduler(alloc, backend=backend, **kw)
    if events:
        s.events = []
    return s.run(requests, max_ticks=max_ticks), s


def same_metrics(a: RunMetrics, b: RunMetrics) -> dict:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return {k: (da[k], db[k]) for k in da if k not in BACKEND_FIELDS and da[k] != db[k]}


# ------------------------------------------------------------------------------ hand-checked traces
def test_hand_trace_admission_waits():
    """Static split, 2 slabs: 4 KV pages, 2 SSM blocks.

    tick 0: r0 (1 page) and r1 (1 page) admitted; 2 pages live.
    tick 1: r0 crosses a page (ctx 4 -> 5): 3 pages live. Head r2 needs 2 pages, 1 free after the
            growth: waits (admission failure 1). r1 generates its 2nd token and finishes.
    tick 2: r2 admitted (2 pages), r3 needs 1 page, none left: waits (failure 2). r0 (3rd token)
            and r2 (1 token) finish. 4 pages live.
    tick 3: r3 admitted (1 page); it finishes at tick 6 after 4 tokens.
    """
    trace = reqs((0, 4, 3), (0, 2, 2), (1, 5, 1), (1, 1, 4))
    m, s = run(make(StaticDualAllocator, 2), trace, events=True)
    assert m.completed == 4 and m.unservable == 0
    assert m.makespan_ticks == 7
    assert m.tokens_generated == 10
    assert m.batch_peak == 2 and m.batch_mean == pytest.approx(10 / 7) and m.batch_p50 == 1.0
    # waits 0, 0, 1, 2
    assert m.admission_wait_mean == pytest.approx(0.75)
    assert m.admission_wait_p50 == pytest.approx(0.5)
    assert m.admission_wait_p99 == pytest.approx(1.97)
    assert (m.preemptions, m.recomputed_tokens) == (0, 0)
    assert (m.growth_failures, m.admission_failures, m.alloc_failures) == (0, 2, 2)
    assert m.alloc_failures_per_request == pytest.approx(0.5)
    assert m.kv_util_series == pytest.approx([2 / 4, 3 / 4, 4 / 4, 1 / 4, 1 / 4, 1 / 4, 1 / 4])
    assert m.ssm_util_series == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.5])
    assert m.kv_util_mean == pytest.approx(np.mean(m.kv_util_series))
    # useful bytes / 2 slabs: (tokens in cache x 32 + blocks x 224) / 1024
    tokens = [4 + 2, 5 + 3, 6 + 5, 1, 2, 3, 4]
    mem = [(k * 32 + b * 224) / 1024 for k, b in zip(tokens, [2, 2, 2, 1, 1, 1, 1])]
    assert m.mem_util_mean == pytest.approx(np.mean(mem))
    assert m.padding_waste_bytes_mean == 0 and m.alignment_waste_bytes == 0
    assert m.slab_tail_bytes == 64  # the SSM slab: 512 - 2 x 224
    assert (m.migrations, m.slabs_moved, m.bytes_moved) == (0, 0, 0)
    assert m.units_returned_at_drain
    assert m.backend == "model" and m.allocator == "StaticDualAllocator"
    assert [e for e in s.events if e[1] != "arrive"] == [
        (0, "admit", 0), (0, "admit", 1), (1, "finish", 1), (2, "admit", 2), (2, "finish", 0),
        (2, "finish", 2), (3, "admit", 3), (6, "finish", 3)]


def test_hand_trace_preemption_recompute():
    """Static split, 4 KV pages: two requests of prompt 4, output 6.

    ticks 0-4: both hold 2 pages from tick 1 on (ctx 5..8). tick 5: both cross a page (ctx 8 -> 9)
    with no page free: 2 growth failures; r1 (admitted last) is preempted after 5 tokens, so it
    will recompute 4 + 5 = 9 tokens; r0 grows into r1's page and finishes (6th token). No admission
    in a tick that preempted. tick 6: r1 comes back with ceil(9 / 4) = 3 pages and generates its 6th
    token.
    """
    m, s = run(make(StaticDualAllocator, 2), reqs((0, 4, 6), (0, 4, 6)), events=True)
    assert m.completed == 2 and m.makespan_ticks == 7 and m.tokens_generated == 12
    assert (m.preemptions, m.recomputed_tokens) == (1, 9)
    assert (m.growth_failures, m.admission_failures) == (2, 0)
    assert m.admission_wait_mean == 0  # waits count to the first admission
    assert m.kv_util_series == pytest.approx([0.5, 1, 1, 1, 1, 0.75, 0.75])
    assert m.batch_mean == pytest.approx(12 / 7)
    assert [e for e in s.events if e[1] != "arrive"] == [
        (0, "admit", 0), (0, "admit", 1), (5, "preempt", 1), (5, "finish", 0), (6, "admit", 1), (6, "finish", 1)]
    assert m.units_returned_at_drain


def test_hand_trace_avmp_moves_capacity_where_static_waits():
    """5 slabs: 3 KV (12 pages), 2 SSM (4 blocks); six requests of 1 page + 1 block, output 2.

    Static: 4 run, the other 2 wait for the SSM blocks (failures at ticks 0 and 1), makespan 4.
    AVMP: the 5th admission finds the SSM pool short, the KV pool can spare a slab (it keeps 8 pages
    for 5 requests), so one free KV slab moves over (exact rebalance: an eager batch of 16 could
    take pages this admission needs); all 6 run at once, makespan 2.
    """
    trace = reqs(*[(0, 1, 2)] * 6)
    ms, _ = run(make(StaticDualAllocator, 5), trace)
    ma, _ = run(make(AVMPAllocator, 5), trace)
    assert (ms.makespan_ticks, ms.batch_peak, ms.admission_failures, ms.migrations) == (4, 4, 2, 0)
    assert ms.admission_wait_mean == pytest.approx(4 / 6)
    assert (ma.makespan_ticks, ma.batch_peak, ma.admission_failures) == (2, 6, 1)
    assert (ma.migrations, ma.slabs_moved, ma.bytes_moved) == (1, 1, 0)
    assert ma.admission_wait_mean == 0
    assert ma.ssm_util_series == pytest.approx([1.0, 1.0])  # 6 blocks in 3 slabs
    assert ma.kv_util_series == pytest.approx([6 / 8, 6 / 8])
    assert ma.slab_tail_bytes == 3 * 64


def test_hand_trace_padded_unified():
    """One pool of 224-byte units (10 in 5 slabs): a page pads 128 -> 224 bytes. Five requests of
    1 page + 1 block fill it; the sixth waits two ticks."""
    m, _ = run(make(PaddedUnifiedAllocator, 5), reqs(*[(0, 1, 2)] * 6))
    assert (m.makespan_ticks, m.batch_peak, m.admission_failures) == (4, 5, 2)
    assert m.padding_waste_bytes_mean == pytest.approx((2 * 5 * 96 + 2 * 96) / 4)
    assert m.alignment_waste_bytes == 0
    assert m.kv_util_series == pytest.approx([0.5, 0.5, 0.1, 0.1])  # live pages / pool units
    assert m.ssm_util_series == pytest.approx([0.5, 0.5, 0.1, 0.1])
    assert m.slab_tail_bytes == 5 * 64


def test_hand_trace_vllm_hybrid():
    """vLLM's pool: 128-byte units (16 in 4 slabs), a request's 224-byte state in 2 of them (one per
    Mamba group), its KV in one per 4 tokens: 3 units each, so 5 requests of one page fit and the
    sixth waits until the first ones finish."""
    m, _ = run(make(VllmHybridAllocator, 4, ssm_units=2), reqs(*[(0, 1, 2)] * 6))
    assert (m.batch_peak, m.completed, m.preemptions) == (5, 6, 0)
    assert m.admission_failures > 0
    assert m.kv_util_series[0] == pytest.approx(5 / 16)   # one KV page each
    assert m.ssm_util_series[0] == pytest.approx(10 / 16)  # two state units each
    # padding: each running request's 2 x 128 state bytes hold 224 (its page is a whole unit)
    assert m.padding_waste_bytes_mean == pytest.approx(32 * m.batch_mean)


# ------------------------------------------------------------------------------------- invariants
def check_event_log(trace, m: RunMetrics, events, max_running: int):
    """Every request arrives once, is admitted no earlier; every admission ends in exactly one
    preemption (then a later re-admission) or its finish; generated tokens add up to the output;
    recomputed tokens are prompt + generated at each preemption; first admissions keep FIFO order."""
    by = {r.rid: r for r in trace}
    state = {}
    recomputed = 0
    first = []
    running = 0
    peak = 0
    last_tick = -1
    for t, kind, rid in events:
        assert t >= last_tick, "events out of tick order"
        last_tick = t
        st = state.setdefault(rid, {"arrived": None, "admitted": None, "gen": 0, "done": False})
        if kind == "arrive":
            assert st["arrived"] is None and t == by[rid].arrival
            st["arrived"] = t
        elif kind == "admit":
            assert st["arrived"] is not None and st["admitted"] is None and not st["done"]
            if not first or rid not in first:
                first.append(rid)
            st["admitted"] = t
            running += 1
            peak = max(peak, running)
        elif kind == "preempt":
            assert st["admitted"] is not None and st["admitted"] < t
            st["gen"] += t - st["admitted"]
            assert st["gen"] < by[rid].output_tokens
            recomputed += by[rid].prompt_tokens + st["gen"]
            st["admitted"] = None
            running -= 1
        elif kind == "finish":
            assert st["admitted"] is not None
            st["gen"] += t - st["admitted"] + 1
            assert st["gen"] == by[rid].output_tokens, f"request {rid} generated {st['gen']} tokens"
            st["admitted"], st["done"] = None, True
            running -= 1
        else:
            assert kind == "unservable"
            st["done"] = True
    assert all(st["done"] for st in state.values()) and len(state) == len(trace), "a request was lost"
    assert recomputed == m.recomputed_tokens
    assert sum(k == "preempt" for _, k, _ in events) == m.preemptions
    assert first == sorted(first, key=lambda r: (by[r].arrival, r)), "admission overtook the queue"
    assert m.batch_peak <= max_running
    assert m.makespan_ticks == last_tick + 1


ALLOCS = {
    "avmp-b1": lambda s: make(AVMPAllocator, s, migration_batch=1),
    "avmp-b16": lambda s: make(AVMPAllocator, s, migration_batch=16),
    "avmp-proactive": lambda s: make(AVMPAllocator, s, migration_batch=2, proactive=(0.3, 0.5)),
    "static-0.5": lambda s: make(StaticDualAllocator, s, ssm_fraction=0.5),
    "static-0.9": lambda s: make(StaticDualAllocator, s, ssm_fraction=0.9),
    "padded": lambda s: make(PaddedUnifiedAllocator, s),
    "vllm-hybrid": lambda s: make(VllmHybridAllocator, s, ssm_units=2),
}


@pytest.mark.parametrize("name", list(ALLOCS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invariants_under_pressure(name, seed):
    trace = random_requests(seed, 40)
    a = ALLOCS[name](7)
    m, s = run(a, trace, events=True, max_running=12)
    assert m.completed + m.unservable == len(trace)
    if name == "static-0.9":  # 1 KV slab: 16 tokens at most
        assert m.unservable == sum(-(-(r.prompt_tokens + r.output_tokens - 1) // PT) > 4 for r in trace) > 0
    else:
        assert m.unservable == 0 and m.completed == len(trace)
    check_event_log(trace, m, s.events, 12)
    assert m.tokens_generated == sum(r.output_tokens for r in trace if (r.arrival, "unservable", r.rid) not in s.events)
    assert m.units_returned_at_drain
    model = s.state.m
    model.check_invariants()
    st = model.stats()
    assert st.handles_live == 0 and all(p.free_units == p.units for p in st.pools.values())
    assert json.loads(json.dumps(dataclasses.asdict(m)))["completed"] == m.completed


def test_preemption_under_pressure_counts_recompute():
    """A KV-starved split preempts (recompute) and the recomputed tokens are counted; AVMP, on the
    same arena, moves capacity instead and preempts less."""
    trace = random_requests(5, 40, max_prompt=9, max_output=20)
    ms, s = run(make(StaticDualAllocator, 8, ssm_fraction=0.75), trace, events=True)
    assert ms.preemptions > 0 and ms.growth_failures > 0
    assert ms.recomputed_tokens >= sum(trace[e[2]].prompt_tokens for e in s.events if e[1] == "preempt")
    assert ms.completed == len(trace)
    ma, _ = run(make(AVMPAllocator, 8, kv_fraction=0.25), trace)
    assert ma.completed == len(trace)
    assert ma.migrations > 0 and ma.preemptions < ms.preemptions
    assert ma.makespan_ticks <= ms.makespan_ticks


def test_determinism():
    trace = random_requests(3, 40)
    m1, s1 = run(ALLOCS["avmp-proactive"](7), trace, events=True, max_running=12)
    m2, s2 = run(ALLOCS["avmp-proactive"](7), trace, events=True, max_running=12)
    assert m1 == m2 and s1.events == s2.events
    assert s1.state.m.state() == s2.state.m.state()


def test_unservable_and_max_ticks():
    # 1 KV slab (4 pages): 20 tokens (5 pages) never fit; AVMP could give it 3 of its 4 slabs
    trace = reqs((0, 3, 2), (0, 20, 1), (1, 2, 2), (1, 8, 10))
    m, s = run(make(StaticDualAllocator, 2), trace, events=True)
    assert (m.completed, m.unservable) == (2, 2)
    assert (0, "unservable", 1) in s.events and (1, "unservable", 3) in s.events
    assert m.units_returned_at_drain
    assert m.tokens_generated == 2 + 2
    m = run(make(AVMPAllocator, 4), trace)[0]
    assert (m.completed, m.unservable) == (4, 0)
    # 45 + 8 - 1 = 52 tokens: 13 pages (4 slabs) + 1 block > 4 slabs
    m = run(make(AVMPAllocator, 4), trace + [Request(4, 2, 45, 8)])[0]
    assert (m.completed, m.unservable) == (4, 1)
    # stopped early: running requests are released anyway
    m, _ = run(make(AVMPAllocator, 6), random_requests(1, 20), max_ticks=3)
    assert m.makespan_ticks == 3 and m.completed < 20 and m.units_returned_at_drain


def test_series_downsampled_and_json():
    trace = [Request(i, i, 3, 40) for i in range(700)]
    m, _ = run(make(AVMPAllocator, 12), trace, max_running=8, time_allocator=True)
    assert m.makespan_ticks > MAX_SERIES_POINTS
    assert len(m.kv_util_series) == len(m.ssm_util_series) == MAX_SERIES_POINTS
    assert np.mean(m.kv_util_series) == pytest.approx(m.kv_util_mean, rel=1e-2)
    assert m.alloc_time_kind == "host_wall" and m.alloc_time_us_per_step_mean > 0
    assert m.alloc_time_us_per_step_p50 > 0
    back = json.loads(json.dumps(dataclasses.asdict(m)))
    assert back == dataclasses.asdict(m)


def test_arguments_validated():
    a = make(AVMPAllocator, 4)
    with pytest.raises(TypeError, match="allocator"):
        Scheduler(object())
    with pytest.raises(ValueError, match="max_running"):
        Scheduler(a, max_running=0)
    with pytest.raises(ValueError, match="backend"):
        Scheduler(a, backend="gpu")
    with pytest.raises(ValueError, match="model_runner needs backend='device'"):
        Scheduler(a, backend="model", model_runner=FakeRunner())
    with pytest.raises(TypeError, match="step"):
        Scheduler(a, backend="device", model_runner=object())
    with pytest.raises(ValueError, match="max_pages_per_request"):
        Scheduler(a, backend="model", max_pages_per_request=2).run(reqs((0, 9, 4)))
    with pytest.raises(ValueError, match="prompt_tokens >= 1"):
        Scheduler(a, backend="model").run(reqs((0, 0, 4)))
    with pytest.raises(ValueError, match="max_ticks"):
        Scheduler(a, backend="model").run(reqs((0, 1, 1)), max_ticks=-1)
    with pytest.raises(ValueError, match="low <= high"):
        make(AVMPAllocator, 4, proactive=(0.6, 0.5))
    with pytest.raises(ValueError, match="watermark"):
        make(AVMPAllocator, 4, proactive=(0.1, 1.5))


def test_real_workload_small_budget():
    """jamba-1.5-mini, 64 ShareGPT requests, a budget that forces waits: AVMP beats the 0.9 split."""
    spec = get_preset("jamba-1.5-mini")
    trace = make_workload("sharegpt", 0, num_requests=64)
    budget = 40 * 8716288  # 40 slabs of one SSM block / 33 pages
    out = {}
    for name, alloc in (("avmp", AVMPAllocator(spec, budget, device=DEVICE)),
                        ("static", StaticDualAllocator(spec, budget, device=DEVICE, ssm_fraction=0.9))):
        m, _ = run(alloc, trace)
        assert m.completed == 64 and m.units_returned_at_drain
        out[name] = m
    assert out["avmp"].makespan_ticks < out["static"].makespan_ticks


# ----------------------------------------------------------------------------- device vs model
@pytest.mark.parametrize("name", ["avmp-b1", "avmp-proactive", "static-0.5", "padded", "vllm-hybrid"])
def test_device_backend_matches_model(name):
    """The Triton kernels behind the scheduler give the model backend's metrics exactly, and end in
    the same allocator state (block tables of both backends end all -1)."""
    trace = random_requests(1, 24)
    a = ALLOCS[name](6)
    mm, sm = run(a, trace, backend="model", max_running=8, events=True)  # leaves `a` untouched
    md, sd = run(a, trace, backend="device", max_running=8, events=True)
    assert md.backend == "device" and mm.backend == "model"
    assert same_metrics(mm, md) == {}
    assert sm.events == sd.events
    assert_matches(sm.state.m, a)
    assert bool((sd.state.block_table == -1).all()) and int(sd.state.num_pages.abs().sum()) == 0
    assert bool((sd.state.ssm_handles == -1).all())
    if name in ("static-0.5", "padded", "vllm-hybrid"):
        assert md.host_syncs_per_step <= 2.0  # one read per tick, one more when admitting
    if name == "avmp-b1":
        assert mm.migrations > 0 and mm.bytes_moved > 0  # compaction on this trace


def test_device_backend_proactive_moves():
    """A KV-heavy trace trips the watermarks: proactive moves on the device equal the model's."""
    trace = reqs((0, 4, 40), (0, 4, 40), (1, 4, 40), (30, 3, 3), (31, 3, 3))
    a = make(AVMPAllocator, 8, migration_batch=2, proactive=(0.4, 0.6))
    mm, sm = run(a, trace, backend="model")
    md, _ = run(a, trace, backend="device")
    assert mm.proactive_slabs_moved > 0
    assert same_metrics(mm, md) == {}
    assert_matches(sm.state.m, a)


class FakeRunner:
    """Records what the scheduler hands a model runner each tick."""

    def __init__(self, alloc=None):
        self.alloc = alloc
        self.calls = []

    def step(self, block_table, num_pages, ssm_handles, running_mask, batch):
        np_, mask = num_pages.cpu().numpy(), running_mask.cpu().numpy()
        bt, ssm = block_table.cpu().numpy(), ssm_handles.cpu().numpy()
        cols = np.arange(bt.shape[1])[None, :]
        assert ((bt >= 0) == (cols < np_[:, None])).all(), "block table rows must hold num_pages handles"
        assert ((ssm >= 0) == mask).all() and ((np_ > 0) == mask).all()
        ctx = batch.context_lens.cpu().numpy()
        assert (np_[mask] == -(-ctx[mask] // PT)).all(), "pages must cover the context"
        q = batch.query_lens.cpu().numpy()
        pre = batch.prefill_mask.cpu().numpy()
        assert (q[pre] == ctx[pre]).all() and (q[mask & ~pre] == 1).all() and (q[~mask] == 0).all()
        if self.alloc is not None and mask.any():
            self.alloc.resolve(torch.from_numpy(bt[bt >= 0]).to(block_table.device), kind="kv")
            self.alloc.resolve(torch.from_numpy(ssm[mask]).to(block_table.device), kind="ssm")
        self.calls.append((batch.tick, int(mask.sum()), block_table.data_ptr(), tuple(batch.request_ids[mask])))


def test_model_runner_protocol():
    trace = random_requests(4, 10)
    a = make(AVMPAllocator, 6, migration_batch=1)
    plain, _ = run(a, trace, backend="model", max_running=6, events=True)
    runner = FakeRunner(a)
    m, s = run(a, trace, backend="device", max_running=6, model_runner=runner, events=True)
    assert same_metrics(plain, m) == {}
    assert [c[0] for c in runner.calls] == list(range(m.makespan_ticks))
    assert len({c[2] for c in runner.calls}) == 1, "the block table must be one fixed buffer"
    assert sum(c[1] for c in runner.calls) == m.tokens_generated
    assert max(c[1] for c in runner.calls) == m.batch_peak


# ------------------------------------------------------------------------------ proactive kernel
def both_stats(a, m):
    st = a.stats()
    assert st == m.stats()
    assert_matches(m, a)
    return st


def test_proactive_hand_checked():
    """8 slabs: KV 0-3 (16 pages), SSM 4-7 (8 blocks); watermarks (0.25, 0.5), batch 2."""
    a = make(AVMPAllocator, 8, migration_batch=2, proactive=(0.25, 0.5))
    m = AllocatorModel.like(a)
    kv = a.alloc_kv(13)
    m.alloc("kv", 13)
    a.proactive_step()
    assert m.proactive_step() == 2  # KV 3/16 free < 0.25, SSM 8/8 > 0.5: cap min(2, 4, 3) = 2
    st = both_stats(a, m)
    assert a.slab_owner.tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert (st.proactive_migrations, st.proactive_slabs_moved, st.migrations, st.slabs_moved) == (1, 2, 1, 2)
    assert st.pools["kv"].free_units == 11 and st.pools["ssm"].free_units == 4
    nxt = a.alloc_kv(1)
    m.alloc("kv", 1)
    assert a.resolve(nxt).tolist() == [4 * SLAB]  # the first moved slab's unit 0 pops first
    a.proactive_step()
    assert m.proactive_step() == 0  # KV 10/24 free: no trip
    kv2 = a.alloc_kv(10)
    m.alloc("kv", 10)
    a.proactive_step()
    assert m.proactive_step() == 1  # KV empty; SSM 4/4 free, cap 2 but it keeps its last slab
    st = both_stats(a, m)
    assert a.slab_owner.tolist() == [0, 0, 0, 0, 0, 0, 0, 1]
    # the other way: SSM runs dry while KV is all free; lowest free KV slabs move
    for h in (kv, nxt, kv2):
        a.free(h)
        m.free(h.tolist())
    a.alloc_ssm(2)
    m.alloc("ssm", 2)
    a.proactive_step()
    assert m.proactive_step() == 2
    st = both_stats(a, m)
    assert a.slab_owner.tolist() == [1, 1, 0, 0, 0, 0, 0, 1]
    assert (st.proactive_migrations, st.proactive_slabs_moved) == (3, 5)


def test_proactive_random_matches_model():
    """Random alloc / free with a proactive step after every call: device == model after each,
    in both directions, and the same sequence twice gives the same state (deterministic)."""
    def play(seed):
        a = make(AVMPAllocator, 9, migration_batch=2, proactive=(0.4, 0.6))
        m = AllocatorModel.like(a)
        rng = np.random.default_rng(seed)
        live = {"kv": [], "ssm": []}
        moved = [0, 0]
        for _ in range(50):
            k = "kv" if rng.random() < 0.5 else "ssm"
            if rng.random() < 0.6:
                n = int(rng.integers(1, 10))
                free = a.stats().pools[k].free_units
                if n <= free:
                    h = (a.alloc_kv if k == "kv" else a.alloc_ssm)(n).tolist()
                    assert h == m.alloc(k, n)
                    live[k] += h
            elif live[k]:
                rng.shuffle(live[k])
                n = int(rng.integers(1, len(live[k]) + 1))
                fr, live[k] = live[k][:n], live[k][n:]
                a.free(torch.tensor(fr, dtype=torch.int32, device=DEVICE))
                m.free(fr)
            before = m.slab_owner.count(0)
            a.proactive_step()
            m.proactive_step()
            after = m.slab_owner.count(0)
            moved[0] += after > before
            moved[1] += after < before
            assert_matches(m, a)
        assert a.stats() == m.stats()
        return moved, m.state()

    moved, state = play(7)
    assert moved[0] > 0 and moved[1] > 0, f"the policy should move both ways on this sequence: {moved}"
    assert play(7)[1] == state


def test_progress_callback():
    seen = []
    Scheduler(make(AVMPAllocator, 6), backend="model").run(random_requests(2, 15),
                                                           progress=lambda d, n: seen.append((d, n)))
    assert seen[-1] == (15, 15) and all(n == 15 for _, n in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_proactive_step_cuda_graph_replay():
    """proactive_step has no host sync: captured once, replayed between host-side allocations."""
    a = make(AVMPAllocator, 8, migration_batch=2, proactive=(0.25, 0.5))
    m = AllocatorModel.like(a)
    a.proactive_step()  # warm-up (compiles); nothing allocated, so nothing trips
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        a.proactive_step()
    for kind, n in (("kv", 13), ("kv", 11), ("ssm", 1)):
        (a.alloc_kv if kind == "kv" else a.alloc_ssm)(n)
        m.alloc(kind, n)
        g.replay()
        m.proactive_step()
        torch.cuda.synchronize()
        assert_matches(m, a)
    assert a.stats() == m.stats() and m.proactive_slabs_moved == 3


@pytest.mark.gpu
def test_device_backend_on_gpu_times_device_work():
    trace = random_requests(1, 24)
    a = ALLOCS["avmp-proactive"](6)
    mm, sm = run(a, trace, backend="model", max_running=8)
    md, _ = run(a, trace, backend="device", max_running=8, time_allocator=True)
    assert same_metrics(mm, md) == {}
    assert md.alloc_time_kind == "cuda_profiler_mean" and md.alloc_time_us_per_step_mean > 0
    assert md.alloc_time_us_per_step_p50 is None  # the profiler gives totals only
    assert_matches(sm.state.m, a)


def test_swap_preemption_needs_real_bytes_and_wall_time():
    a = make(AVMPAllocator, 6)
    with pytest.raises(ValueError, match="preemption must be 'recompute' or 'swap', got 'drop'"):
        Scheduler(a, preemption="drop")
    with pytest.raises(ValueError, match="preemption='swap' copies bytes: it needs backend='device'"):
        Scheduler(a, backend="model", preemption="swap")
    with pytest.raises(ValueError, match="preemption='swap' has no cost in the step-time model"):
        Scheduler(a, backend="device", preemption="swap", step_time=load_step_time(get_preset("jamba-1.5-mini")))
