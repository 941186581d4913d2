"""What one scheduler run measured (``RunMetrics``), and how the per-tick samples are reduced.

Every field is a plain number, string, bool, None or list of numbers, so that
``json.dumps(dataclasses.asdict(m))`` works. Time is counted in decode ticks (tick 0 first).

Definitions (the README's "Scheduler" section gives the tick itself):

- batch size of a tick: requests that generate a token in it (decoding ones and those admitted in
  it); mean / p50 / peak over the ticks ``[0, makespan_ticks)``.
- admission wait of a request: tick of its first admission minus its arrival tick.
- utilization of a tick, sampled after admission and growth (before finished requests free):
  ``kv_util`` = live KV pages / units of the KV pool, ``ssm_util`` = live SSM blocks / units of the
  SSM pool; with one padded pool both divide by that pool's units (their sum is the pool's use).
  ``mem_util`` = bytes of live data (K/V of the tokens in the caches, SSM blocks at their exact
  size) / bytes of the whole slabs: the one number comparable across allocators, which also
  shows the empty tail of each request's last page (large for large pages).
- padding waste of a tick: bytes of live units beyond their exact size (padding of the smaller
  unit to the unified one, plus 16-byte alignment); alignment waste is its alignment part alone.
- slab tail: bytes at the end of slabs that hold no unit (depends on the pool sizes, so it is a
  per-tick quantity too).
- allocation failures: ``growth_failures`` counts decode pages the KV pool could not give at first
  try (before any rebalance or preemption); ``admission_failures`` counts ticks in which the request
  at the head of the queue did not fit at first try (not counting ticks where all batch slots were
  taken). ``alloc_failures`` is their sum.
- migrations, slabs_moved, bytes_moved: the allocator's counters over the run (rebalances and
  proactive moves; bytes_moved = bytes of live units copied by compaction).
"""
from __future__ import annotations

import dataclasses

import numpy as np

MAX_SERIES_POINTS = 512


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunMetrics:
    # what ran
    allocator: str                  # class name, e.g. "AVMPAllocator"
    backend: str                    # "device" (Triton kernels on allocator.device) or "model" (reference model)
    num_requests: int
    # completion and time
    completed: int
    unservable: int                 # requests no state of the allocator can hold even alone (never admitted)
    makespan_ticks: int             # ticks until the last request finished (or until max_ticks)
    tokens_generated: int           # output tokens generated, each once (a recomputed prefill adds none)
    # running batch
    batch_mean: float
    batch_p50: float
    batch_peak: int
    # admission
    admission_wait_mean: float
    admission_wait_p50: float
    admission_wait_p99: float
    # pressure
    preemptions: int
    recomputed_tokens: int          # prefill tokens run beyond each prompt once: what preemption made redo
    alloc_failures: int
    alloc_failures_per_request: float
    growth_failures: int
    admission_failures: int
    # memory
    kv_util_mean: float
    ssm_util_mean: float
    mem_util_mean: float
    kv_util_series: list            # <= 512 points: means of consecutive equal chunks of ticks
    ssm_util_series: list
    padding_waste_bytes_mean: float
    alignment_waste_bytes: float    # mean over ticks; part of padding_waste_bytes_mean
    slab_tail_bytes: int            # mean over ticks, rounded
    # capacity moves
    migrations: int
    slabs_moved: int
    proactive_slabs_moved: int
    bytes_moved: int
    # allocator time (only when the scheduler was built with time_allocator=True)
    alloc_time_us_per_step_mean: float | None
    alloc_time_us_per_step_p50: float | None
    alloc_time_kind: str | None     # "cuda_profiler_mean" (device time of the run's GPU work) or "host_wall"
    host_syncs_per_step: float      # device backend: host reads of device state per tick
    # end state
    units_returned_at_drain: bool   # every unit and handle free again after the run
    # step budget and time (time: only with a step-time model, else None)
    max_num_batched_tokens: int | None = None   # None: whole prefills, one per admission
    step_time_model: str | None = None          # the recorded GPU run the model was fitted to
    makespan_s: float | None = None             # first arrival to the last finish
    output_tokens_per_s: float | None = None
    requests_per_s: float | None = None
    ttft_p50_s: float | None = None             # arrival to first token, over finished requests
    ttft_p99_s: float | None = None
    tpot_p50_s: float | None = None             # (finish - first token) / (output - 1), outputs > 1
    tpot_p99_s: float | None = None
    goodput_requests_per_s: float | None = None  # requests meeting both SLOs, per second
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    compute_s: float | None = None              # model steps (prefill chunks and recompute included)
    alloc_s: float | None = None                # allocator calls
    migrate_s: float | None = None              # capacity moves, by bytes copied
    # preemption by swapping (Scheduler(preemption="swap")): requests swapped out, bytes copied out and back
    swapped_out: int = 0
    swap_bytes: int = 0


def downsample(series, max_points: int = MAX_SERIES_POINTS) -> list[float]:
    """Means of ``min(len, max_points)`` consecutive chunks (numpy.array_split sizes)."""
    x = np.asarray(series, dtype=np.float64)
    if x.size <= max_points:
        return [float(v) for v in x]
    return [float(c.mean()) for c in np.array_split(x, max_points)]


def mean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(x.mean()) if x.size else 0.0


def percentile(x, q: float) -> float:
    """Linear-interpolation percentile (numpy's default); 0.0 for no samples."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.percentile(x, q)) if x.size else 0.0
