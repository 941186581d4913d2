"""The scheduler in time: chunked prefill under a token budget, the clock a step-time model drives
(prefill chunks, recompute, allocator calls and migrated bytes charged), idle waits for arrivals,
and the latency metrics (TTFT, TPOT, goodput) checked by hand on traces a fake step-time model
makes easy to follow."""
import numpy as np
import pytest
import torch

from avmp_triton import AVMPAllocator, HybridModelSpec, StaticDualAllocator
from avmp_triton.engine.scheduler import Scheduler
from avmp_triton.sim.workloads import Request

SLAB, PT = 512, 4
SPEC = HybridModelSpec(
    name="tiny", num_attn_layers=1, num_kv_heads=1, head_dim=4, kv_dtype=torch.float32,
    num_mamba_layers=1, mamba_version=1, d_inner=8, d_state=4, conv_dtype=torch.float32,
    ssm_dtype=torch.float32)


class FakeStepTime:
    """One second per step plus 1 ms per prefill token; records every step's shape and every
    charge, so a test can rebuild the clock by hand."""
    source = {"run": "fake"}

    def __init__(self, alloc_s: float = 0.0, per_byte: float = 0.0):
        self.steps, self.moves, self.allocs = [], [], []
        self._alloc, self._byte = alloc_s, per_byte

    def step_s(self, n_dec, dec_ctx, chunk_tokens, chunk_prefix):
        self.steps.append((n_dec, dec_ctx, list(map(int, chunk_tokens)), list(map(int, chunk_prefix))))
        return 1.0 + 1e-3 * int(np.sum(chunk_tokens))

    def alloc_s(self, rows):
        self.allocs.append(rows)
        return self._alloc

    def migrate_s(self, nbytes):
        if nbytes > 0:
            self.moves.append(nbytes)
        return self._byte * nbytes


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # a CPU allocator needs Triton's interpreter


def make(cls, slabs: int, **kw):
    return cls(SPEC, slabs * SLAB + 77, device=DEVICE, slab_bytes=SLAB, page_tokens=PT, **kw)


def run(alloc, requests, st, **kw):
    s = Scheduler(alloc, backend="model", step_time=st, **kw)
    s.events = []
    return s.run(requests), s


def test_chunked_prefill_and_latencies_by_hand():
    """A 10-token prompt under a budget of 4 prefills in chunks 4, 4, 2 (its first token after the
    third step), then decodes 2 more tokens; TTFT and TPOT follow from the fake's costs."""
    st = FakeStepTime()
    m, _ = run(make(AVMPAllocator, 8), [Request(0, 0.0, 10, 3)], st, max_running=2, max_num_batched_tokens=4)
    assert [s[2:] for s in st.steps[:3]] == [([4], [0]), ([4], [4]), ([2], [8])]
    assert st.steps[3:] == [(1, 11, [], []), (1, 12, [], [])]    # decode reads the cache and its new token
    ttft = 3 * 1.0 + 1e-3 * 10
    assert m.ttft_p50_s == pytest.approx(ttft)
    assert m.tpot_p50_s == pytest.approx(1.0)                    # two decode steps for two more tokens
    assert m.makespan_s == pytest.approx(ttft + 2)
    assert m.tokens_generated == 3 and m.output_tokens_per_s == pytest.approx(3 / m.makespan_s)
    assert m.units_returned_at_drain and m.max_num_batched_tokens == 4


def test_decode_rows_first_then_chunks_share_the_budget():
    """Two requests: once the first decodes, the second's prefill gets the budget minus one token."""
    st = FakeStepTime()
    trace = [Request(0, 0.0, 3, 4), Request(1, 0.5, 9, 1)]
    m, s = run(make(AVMPAllocator, 8), trace, st, max_running=2, max_num_batched_tokens=5)
    assert st.steps[0] == (0, 0, [3], [0])
    # the second arrives during step 0; step 1 runs the first one's decode and 4 of its 9 tokens
    assert st.steps[1] == (1, 4, [4], [0])
    assert st.steps[2] == (1, 5, [4], [4])
    assert st.steps[3] == (1, 6, [1], [8])
    assert m.completed == 2 and m.tokens_generated == 5


def test_idle_clock_jumps_to_the_next_arrival():
    st = FakeStepTime()
    m, _ = run(make(AVMPAllocator, 8), [Request(0, 100.0, 2, 1)], st, max_running=2, max_num_batched_tokens=8)
    assert len(st.steps) == 1
    assert m.makespan_s == pytest.approx(100.0 + 1.002)
    assert m.ttft_p50_s == pytest.approx(1.002)        # from its arrival, not from 0


def test_goodput_counts_only_requests_meeting_both_slos():
    """Request 0 alone meets TTFT <= 1.5 s; the other waits for its turn in a one-row batch."""
    st = FakeStepTime()
    trace = [Request(0, 0.0, 1, 2), Request(1, 0.0, 1, 2)]
    m, _ = run(make(AVMPAllocator, 8), trace, st, max_running=1, max_num_batched_tokens=4, slo=(1.5, 1.0))
    assert m.completed == 2 and m.makespan_s == pytest.approx(4 * 1.0 + 2e-3)
    assert m.goodput_requests_per_s == pytest.approx(1 / m.makespan_s)


def test_recompute_and_migrations_are_charged():
    """Under pressure every prefilled token is charged: the prompts once and each preempted
    request's prompt + generated tokens again; AVMP's moves are charged by the bytes copied."""
    rng = np.random.default_rng(3)
    trace = [Request(i, float(i // 4), int(rng.integers(1, 10)), int(rng.integers(1, 20))) for i in range(40)]
    st = FakeStepTime()
    m, _ = run(make(StaticDualAllocator, 8, ssm_fraction=0.75), trace, st, max_running=12, max_num_batched_tokens=12)
    assert m.preemptions > 0 and m.completed == 40
    prefilled = sum(sum(s[2]) for s in st.steps)
    assert prefilled == sum(r.prompt_tokens for r in trace) + m.recomputed_tokens
    st = FakeStepTime(per_byte=1e-3)
    ma, _ = run(make(AVMPAllocator, 8, kv_fraction=0.25), trace, st, max_running=12, max_num_batched_tokens=12)
    assert ma.migrations > 0 and sum(st.moves) == ma.bytes_moved > 0
    assert ma.migrate_s == pytest.approx(1e-3 * ma.bytes_moved)


def test_allocator_calls_charged_per_row():
    st = FakeStepTime(alloc_s=0.25)
    m, _ = run(make(AVMPAllocator, 8), [Request(0, 0.0, 5, 5)], st, max_running=2, max_num_batched_tokens=8)
    # grows at admission (2 pages) and at token 8 (a new page), one release at the end
    assert st.allocs and m.alloc_s == pytest.approx(0.25 * len(st.allocs))


def test_whole_prefills_without_a_budget_match_ticks():
    """No token budget: the schedule is the tick scheduler's, step for step."""
    rng = np.random.default_rng(0)
    trace = [Request(i, 0, int(rng.integers(1, 12)), int(rng.integers(1, 9))) for i in range(30)]
    ticks = Scheduler(make(AVMPAllocator, 6), backend="model", max_running=8).run(trace)
    st = FakeStepTime()
    timed = Scheduler(make(AVMPAllocator, 6), backend="model", max_running=8, step_time=st).run(trace)
    assert timed.makespan_ticks == ticks.makespan_ticks == len(st.steps)
    assert (timed.preemptions, timed.migrations, timed.tokens_generated) == \
        (ticks.preemptions, ticks.migrations, ticks.tokens_generated)


@pytest.mark.parametrize("kw, match", [
    (dict(max_num_batched_tokens=3), "max_num_batched_tokens .* >= max_running"),
    (dict(max_num_batched_tokens=2.5), "2.5"),
    (dict(step_time=object()), "step_time must be a StepTime"),
    (dict(slo=(0.0, 1.0)), "slo"),
    (dict(slo=(1.0, float("nan"))), "slo"),
])
def test_bad_time_arguments(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Scheduler(make(AVMPAllocator, 4), backend="model", max_running=4, **kw)


def test_bad_arrival_named():
    with pytest.raises(TypeError, match="arrival"):
        Scheduler(make(AVMPAllocator, 4), backend="model").run([Request(0, float("inf"), 1, 1)])
