"""One continuous-batching scheduler for every allocator, run allocator-only (a tick is one decode
step) or with a model runner. Each tick plans on the host from one read of the allocator's counts
and then makes one grow, one SSM alloc and one release call; the README's "Scheduler" section
gives the steps of a tick, and ``_Run`` has one method per step.

Backends: "device" drives the allocator's Triton kernels; "model" drives
``AllocatorModel.like(allocator)``, the pure-Python model of the same state machine (tested equal
after every call), much faster than Triton's interpreter on a CPU. Both give identical metrics.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import numbers
import time
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from avmp_triton._checks import is_int
from avmp_triton.engine.backends import Counts, DeviceBackend, DeviceTables, ModelBackend, PendingCalls, Staged
from avmp_triton.memory.allocator import UNIT_ALIGN, ArenaAllocator, PoolExhaustedError
from avmp_triton.engine.clock import Clock, StepShape, WallClock
from avmp_triton.engine.metrics import RunMetrics, downsample, mean, percentile

__all__ = ["ModelRunner", "Scheduler", "StepBatch"]

BACKENDS = ("device", "model")
# goodput's default SLO: first token within 3 s, then at most 100 ms per output token (a stated
# choice for interactive serving; engines' benchmarks take it as an argument, e.g. vLLM's --goodput)
DEFAULT_SLO = (3.0, 0.1)


def _check_time_args(max_running, max_num_batched_tokens, step_time, slo) -> None:
    if max_num_batched_tokens is not None:
        if not is_int(max_num_batched_tokens, numpy=True) or max_num_batched_tokens < max_running:
            # as vLLM requires: every running request must be able to decode in one step
            raise ValueError(f"max_num_batched_tokens must be None or an int >= max_running ({max_running}), "
                             f"got {max_num_batched_tokens!r}")
    if step_time is not None and step_time != "wall" and not callable(getattr(step_time, "step_s", None)):
        raise TypeError(f"step_time must be a StepTime (with step_s) or 'wall', got {type(step_time).__name__}")
    ok = (isinstance(slo, tuple) and len(slo) == 2
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in slo))
    if not ok:
        raise ValueError(f"slo must be (ttft_s, tpot_s), two positive finite numbers, got {slo!r}")


def _page_tokens(allocator) -> int | None:
    """Tokens per KV page, or None when the model has no attention layers (nothing to page)."""
    return allocator.page_tokens if allocator.spec.num_attn_layers else None


def _kv_pages(tokens, page_tokens: int | None):
    """KV pages holding ``tokens`` (an int or an array), 0 without a KV pool."""
    if page_tokens is None:
        return tokens * 0
    return -(-tokens // page_tokens)


def _check_preemption(preemption, backend, step_time, allocator) -> None:
    if preemption not in ("recompute", "swap"):
        raise ValueError(f"preemption must be 'recompute' or 'swap', got {preemption!r}")
    if preemption == "swap":
        if backend != "device" or allocator.arena.device.type == "meta":
            raise ValueError("preemption='swap' copies bytes: it needs backend='device' and an arena with bytes")
        if step_time not in (None, "wall"):
            raise ValueError("preemption='swap' has no cost in the step-time model: use step_time None or 'wall'")


@dataclasses.dataclass(frozen=True, slots=True)
class StepBatch:
    """Per-tick metadata for a model runner (all ``[R]`` device tensors are fixed-size buffers; the
    ``*_host`` arrays are the same values on the host, where the scheduler computed them)."""
    tick: int
    query_lens: torch.Tensor    # [R] int32 tokens whose K/V this step writes: a prefill chunk / 1 / 0
    context_lens: torch.Tensor  # [R] int32 tokens in the KV cache after this step
    prefill_mask: torch.Tensor  # [R] bool rows admitted in this tick (their first chunk runs now)
    request_ids: np.ndarray     # [R] int64 index of each row's request in the run's list, -1 for an idle row (host)
    query_lens_host: np.ndarray    # [R] int64
    context_lens_host: np.ndarray  # [R] int64
    sample_mask: np.ndarray        # [R] bool rows that produce a token this step (decode, or prefill done)
    # the tick's deferred allocator calls (growth, proactive step, counts' snapshot): the runner
    # replays them in its decode graph or flushes them before an eager step (None: already run)
    device_calls: PendingCalls | None = None


class ModelRunner(Protocol):
    """What the scheduler calls once per tick, after the tick's allocations and before its frees.

    ``block_table`` [R, W] int32 KV handles (-1 padded), ``num_pages`` [R] int32,
    ``ssm_handles`` [R] int32 (-1 for an idle row), ``running_mask`` [R] bool: the rows that hold a
    request in this tick. The runner must not change them. Row r runs the tokens
    ``[context_lens[r] - query_lens[r], context_lens[r])`` of its request (its prompt, then what it
    generated: a recomputed request prefills both again). It may return the indices of requests
    that stop early (a stop token): the scheduler finishes them with the tokens they have.

    A runner whose ``takes_device_calls`` is True gets the last tick's release and this tick's
    growth, proactive step and counts' snapshot deferred in ``batch.device_calls`` (the tables
    are not updated yet): it must run them, in its own captured step or by ``flush()`` before
    reading the tables.
    """

    def step(self, block_table: torch.Tensor, num_pages: torch.Tensor, ssm_handles: torch.Tensor,
             running_mask: torch.Tensor, batch: StepBatch) -> Sequence[int] | None: ...


class _Timer:
    """Allocator time per tick.

    GPU device backend: the device time of every kernel, copy and memset the run issues, from the
    CUDA profiler (CUPTI), divided by the ticks. With no model compute every device operation is
    the allocator's, and host launch gaps are not counted. The profiler gives totals, not per-tick
    samples, so there is a mean and no median. Elsewhere: host wall time around the allocator calls.
    """

    def __init__(self, enabled: bool, cuda: bool):
        self.enabled = enabled
        self.kind = None if not enabled else ("cuda_profiler_mean" if cuda else "host_wall")
        self._cuda = cuda
        self._ticks: list[float] = []
        self._t0 = 0.0
        self._prof = None
        if enabled and cuda:
            torch.cuda.synchronize()
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self._prof.__enter__()

    def new_tick(self) -> None:
        if self.enabled:
            self._ticks.append(0.0)

    def __enter__(self):
        if self.enabled and not self._cuda:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.enabled and not self._cuda:
            self._ticks[-1] += time.perf_counter() - self._t0
        return False

    def summary_us(self) -> tuple[float | None, float | None]:
        """(mean, median) allocator time per tick in microseconds; median None on the GPU."""
        if not self.enabled or not self._ticks:
            return None, None
        if self._cuda:
            torch.cuda.synchronize()
            self._prof.__exit__(None, None, None)
            total_us = sum(e.self_device_time_total for e in self._prof.key_averages())
            return total_us / len(self._ticks), None
        us = [x * 1e6 for x in self._ticks]
        return mean(us), percentile(us, 50)


class Scheduler:
    """Continuous batching over one allocator (the README's "Scheduler" section gives the tick).

    Args:
        allocator: an ``AVMPAllocator``, ``StaticDualAllocator`` or ``PaddedUnifiedAllocator``.
            The model backend needs it fresh (nothing allocated) and leaves it untouched.
        max_running: batch slots (rows of the block table).
        max_pages_per_request: block-table width; by default the most pages any request of the
            run can hold, ``ceil((prompt + output - 1) / page_tokens)``.
        model_runner: optional ``ModelRunner``, called once per tick (device backend only).
        time_allocator: measure the time of the allocator calls per tick.
        backend: "device" or "model" (default: "device" when the allocator is on CUDA, else "model").
        max_num_batched_tokens: the token budget of one step (chunked prefill, as vLLM's and
            SGLang's schedulers run it): decode rows first, then prefill chunks of the running and
            then of newly admitted requests until the budget is spent. None: a request's whole
            prefill runs in its admission tick.
        step_time: a ``avmp_triton.sim.steptime.StepTime``: the run keeps a clock in seconds, each
            step costing what the model says (prefill chunks, recompute, allocator calls and
            migrated bytes included), request arrivals are read in seconds, and the metrics give
            throughput, TTFT, TPOT and goodput. "wall": the same in wall-clock seconds, for a real
            engine (each step costs what it took; an idle engine sleeps until the next arrival).
            None: time is counted in ticks.
        slo: (TTFT seconds, TPOT seconds) a request must meet to count towards goodput.
        preemption: what a preempted request keeps. "recompute" (vLLM's default): nothing, it
            prefills its prompt and generated tokens again when readmitted. "swap": its KV pages and
            SSM block are copied to host memory and back when it is readmitted, where it left off
            (device backend with a real arena; its cost is only known in wall time, so not with a
            step-time model).
    """

    def __init__(self, allocator: ArenaAllocator, *, max_running: int = 256, max_pages_per_request: int | None = None,
                 model_runner: ModelRunner | None = None, time_allocator: bool = False, backend: str | None = None,
                 max_num_batched_tokens: int | None = None, step_time=None, slo: tuple[float, float] = DEFAULT_SLO,
                 preemption: str = "recompute", tables: DeviceTables | None = None):
        if not isinstance(allocator, ArenaAllocator):
            raise TypeError(f"allocator must be an AVMPAllocator, StaticDualAllocator or PaddedUnifiedAllocator, "
                            f"got {type(allocator).__name__}")
        if not is_int(max_running, numpy=True) or max_running < 1:
            raise ValueError(f"max_running must be a positive int, got {max_running!r}")
        if max_pages_per_request is not None and (not is_int(max_pages_per_request, numpy=True) or max_pages_per_request < 1):
            raise ValueError(f"max_pages_per_request must be None or a positive int, got {max_pages_per_request!r}")
        if backend is None:
            backend = "device" if allocator.device.type == "cuda" else "model"
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if model_runner is not None:
            if not callable(getattr(model_runner, "step", None)):
                raise TypeError(f"model_runner must have a step(...) method, got {type(model_runner).__name__}")
            if backend != "device":
                raise ValueError("a model_runner needs backend='device' (the model backend has no arena)")
        _check_time_args(max_running, max_num_batched_tokens, step_time, slo)
        _check_preemption(preemption, backend, step_time, allocator)
        self.allocator = allocator
        self.max_running = max_running
        self.max_num_batched_tokens = max_num_batched_tokens
        self.step_time = step_time
        self.slo = (float(slo[0]), float(slo[1]))
        self.max_pages_per_request = max_pages_per_request
        self.preemption = preemption
        self.model_runner = model_runner
        if tables is not None and (backend != "device" or tables.a is not allocator or tables.R != max_running):
            raise ValueError(f"tables must be DeviceTables of this allocator with max_running={max_running} rows, "
                             f"for the device backend (got {tables.R} rows, backend {backend!r})")
        self.tables = tables
        self.time_allocator = bool(time_allocator)
        self.backend = backend
        self.state = None  # the last run's backend (block table, and the model for backend="model")
        # set to a list to record (tick, event, rid) with event in
        # "arrive", "admit", "preempt", "finish", "unservable" (for tests and debugging)
        self.events: list | None = None

    def run(self, requests: Sequence, *, max_ticks: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> RunMetrics:
        """Replay ``requests`` (objects with rid, arrival, prompt_tokens, output_tokens) to the end.

        Args:
            max_ticks: stop after this many ticks (running requests are then released, so the
                allocator is drained either way); ``completed`` tells how far it got.
            progress: called as ``progress(finished, total)`` after every tick in which requests
                finished (or were found unservable).
        Returns:
            ``RunMetrics``.
        """
        if max_ticks is not None and (not is_int(max_ticks, numpy=True) or max_ticks < 0):
            raise ValueError(f"max_ticks must be None or a non-negative int, got {max_ticks!r}")
        reqs = _Requests.of(requests, _page_tokens(self.allocator), self.allocator.ssm_units - 1)
        W = self.max_pages_per_request
        if W is None:
            W = max(1, int(reqs.max_pages.max()) if reqs.n else 1)
        elif reqs.n and int(reqs.max_pages.max()) > W:
            i = int(np.argmax(reqs.max_pages))
            raise ValueError(f"requests[{i}] needs {int(reqs.max_pages[i])} pages, more than max_pages_per_request={W}")
        if self.tables is not None and W != self.tables.W:
            raise ValueError(f"max_pages_per_request={W} differs from the tables' width {self.tables.W}")
        if self.backend == "device":
            be = DeviceBackend(self.allocator, self.max_running, W, tables=self.tables,
                               defer=getattr(self.model_runner, "takes_device_calls", False))
        else:
            be = ModelBackend(self.allocator, self.max_running, W)
        self.state = be
        run = _Run(self, reqs, be)
        reported = 0
        while run.left_to_settle() and (max_ticks is None or run.t < max_ticks):
            run.tick()
            if progress is not None and run.settled != reported:
                reported = run.settled
                progress(run.settled, reqs.n)
        run.drain()
        if progress is not None:
            progress(run.settled, reqs.n)
        return run.metrics()


@dataclasses.dataclass
class _Requests:
    """The run's requests as arrays, in input order, and what each has generated so far."""
    n: int
    rid: list
    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    max_pages: np.ndarray     # pages at the longest: ceil((prompt + output - 1) / page_tokens) + extra
    generated: np.ndarray
    first_admit: np.ndarray   # tick of the first admission, -1 before
    fresh: np.ndarray         # prompt tokens not yet prefilled even once

    @classmethod
    def of(cls, requests: Sequence, page_tokens: int | None, extra: int = 0) -> "_Requests":
        """``extra``: pages every request holds besides its KV pages (the allocator's ``ssm_units - 1``:
        the rest of its SSM state, in units of the same pool); ``page_tokens`` None: no KV pages at all
        (an attention-free model)."""
        n = len(requests)
        cols = {f: np.empty(n, dtype=np.int64) for f in ("prompt_tokens", "output_tokens")}
        arrival = np.empty(n, dtype=np.float64)
        for i, r in enumerate(requests):
            for f, col in cols.items():
                v = getattr(r, f, None)
                if not is_int(v, numpy=True):
                    raise TypeError(f"requests[{i}].{f} must be an int, got {v!r}")
                col[i] = v
            a = getattr(r, "arrival", None)
            if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a):
                raise TypeError(f"requests[{i}].arrival must be a finite number (ticks, or seconds with a "
                                f"step_time), got {a!r}")
            arrival[i] = a
            if r.arrival < 0 or r.prompt_tokens < 1 or r.output_tokens < 1:
                raise ValueError(f"requests[{i}] needs arrival >= 0, prompt_tokens >= 1 and output_tokens >= 1, "
                                 f"got {r!r}")
        prompt, output = cols["prompt_tokens"], cols["output_tokens"]
        max_pages = _kv_pages(prompt + output - 1, page_tokens) + extra if n else np.zeros(0, dtype=np.int64)
        return cls(n=n, rid=[getattr(r, "rid", i) for i, r in enumerate(requests)], arrival=arrival,
                   prompt=prompt, output=output, max_pages=max_pages, generated=np.zeros(n, dtype=np.int64),
                   first_admit=np.full(n, -1, dtype=np.int64), fresh=prompt.copy())


class _Rows:
    """Host mirrors of the batch rows (the device block table's rows)."""

    def __init__(self, R: int):
        self.req = np.full(R, -1, dtype=np.int64)    # request index of the row, -1 idle
        self.ctx = np.zeros(R, dtype=np.int64)       # tokens in the row's KV cache
        self.pages = np.zeros(R, dtype=np.int64)     # == num_pages on the device
        self.seq = np.full(R, -1, dtype=np.int64)    # admission order (preemption takes the largest)
        self.need = np.zeros(R, dtype=np.int32)      # pages the tick's grow call gives each row
        self.todo = np.zeros(R, dtype=np.int64)      # tokens still to prefill (prompt, or all on recompute)
        self.q = np.zeros(R, dtype=np.int64)         # tokens this step runs for the row

    def clear(self, rows) -> None:
        self.req[rows] = -1
        self.pages[rows] = 0
        self.ctx[rows] = 0
        self.seq[rows] = -1
        self.todo[rows] = 0
        self.q[rows] = 0


class _Geometry:
    """What the scheduler plans with: pool of each kind, units per slab, sizes (from the allocator)."""

    def __init__(self, a: ArenaAllocator):
        self.migrates = a.migrates
        self.pk, self.ps = a.pool_index("kv"), a.pool_index("ssm")
        self.dual = self.pk != self.ps
        self.npools = len(a.pool_names)
        self.ups = a.units_per_slab
        self.unit = a.unit_bytes
        self.migration_batch = a.migration_batch
        self.num_slabs = a.num_slabs
        self.page_raw = a.kv_page_raw
        self.block_raw = a.ssm_block_raw
        self.page_aligned = -(-a.kv_page_raw // UNIT_ALIGN) * UNIT_ALIGN
        self.block_aligned = a.spec.ssm_block_bytes
        self.token_bytes = a.spec.kv_bytes_per_token
        self.extra = a.ssm_units - 1  # pages of each request that hold SSM state, not KV
        self.usable = a.num_slabs * a.slab_bytes
        self.tails = [a.slab_bytes - self.ups[p] * self.unit[p] for p in range(self.npools)] + [0]

    def never_fits(self, c: Counts, max_pages: np.ndarray) -> np.ndarray:
        """Requests that no state of the allocator could hold even alone (all of their pages at
        their longest, and one SSM block): fixed pools for the baselines, any split of the slabs
        for AVMP."""
        pk, ps, ups = self.pk, self.ps, self.ups
        if ups[pk] == 0:   # no KV pool (attention-free): one SSM block is all a request needs
            return np.full(len(max_pages), c.slabs[ps] * ups[ps] < 1)
        if not self.dual:
            return max_pages + 1 > c.slabs[pk] * ups[pk]
        if self.migrates:
            return -(-max_pages // ups[pk]) + 1 > self.num_slabs
        return (max_pages > c.slabs[pk] * ups[pk]) | (c.slabs[ps] * ups[ps] < 1)


class _Series:
    """Per-tick samples of the run (see ``avmp_triton.engine.metrics`` for their definitions)."""

    def __init__(self):
        self.batch, self.kv, self.ssm, self.mem, self.pad, self.align, self.tail = ([] for _ in range(7))

    def sample(self, g: _Geometry, c: Counts, rows: _Rows, running: np.ndarray) -> None:
        n_run = len(running)
        live_kv = int(rows.pages.sum()) - g.extra * n_run  # KV pages; the extras count as SSM units
        ssm_held = (g.extra + 1) * n_run
        units = [c.slabs[p] * g.ups[p] for p in range(g.npools)]
        kv_units, ssm_units = units[g.pk], units[g.ps]
        self.batch.append(n_run)
        self.kv.append(live_kv / kv_units if kv_units else 0.0)
        self.ssm.append(ssm_held / ssm_units if ssm_units else 0.0)
        self.tail.append(sum(c.slabs[p] * g.tails[p] for p in range(g.npools)))
        self.mem.append((int(rows.ctx[running].sum()) * g.token_bytes + n_run * g.block_raw) / g.usable)
        self.pad.append(live_kv * (g.unit[g.pk] - g.page_raw) + ssm_held * g.unit[g.ps] - n_run * g.block_raw)
        self.align.append(live_kv * (g.page_aligned - g.page_raw) + n_run * (g.block_aligned - g.block_raw))


class _Run:
    """One ``Scheduler.run``: the per-run state, and one method per step of the tick (see the module
    docstring for the steps)."""

    def __init__(self, sched: Scheduler, reqs: _Requests, be):
        a = sched.allocator
        self.a, self.be, self.reqs, self.events = a, be, reqs, sched.events
        self.g = _Geometry(a)
        self.pt = _page_tokens(a)   # None: an attention-free model, no KV pages
        self.R = sched.max_running
        self.timer = _Timer(sched.time_allocator, sched.backend == "device" and a.device.type == "cuda")
        self.proactive = getattr(a, "proactive", None) is not None
        self.runner = _RunnerFeed(sched.model_runner, self.R, a.device) if sched.model_runner is not None else None
        self.start_stats = be.stats()
        self.bytes_seen = self.start_stats.bytes_copied
        self.never = self.g.never_fits(be.probe(), reqs.max_pages)
        self.rows = _Rows(self.R)
        self.series = _Series()
        self.order = np.argsort(reqs.arrival, kind="stable")
        self.queue: collections.deque[int] = collections.deque()
        self.t = self.nxt = self.seq = 0
        self.settled = 0          # finished or found unservable
        self.done = self.unservable = self.preemptions = self.recomputed = 0
        self.growth_failures = self.admission_failures = 0
        self.c: Counts | None = None
        self.free: list[int] = []  # free units per pool, kept exact on the host through the tick
        self.fh = 0                # free handles, likewise
        self.credit = [0, 0]       # KV and SSM units released since the last snapshot
        self.budget = sched.max_num_batched_tokens
        self.clock = None
        if sched.step_time == "wall":
            self.clock = WallClock(reqs.n)
        elif sched.step_time is not None:
            self.clock = Clock(sched.step_time, reqs.n)
        self.slo = sched.slo
        self.swap = sched.preemption == "swap"
        self.swapped: dict[int, tuple] = {}   # request -> (ctx, todo, pages, host copies) while swapped out
        self.swaps = self.swap_bytes = 0
        self.alloc_rows = 0        # rows the tick's allocator calls touched (charged by the clock)
        self.moved = False         # a capacity move was tried this tick (its bytes are charged)

    def left_to_settle(self) -> bool:
        return self.settled < self.reqs.n

    def _event(self, kind: str, i: int) -> None:
        if self.events is not None:
            self.events.append((self.t, kind, self.reqs.rid[i]))

    def _read_counts(self) -> None:
        """The counts: the first read of a tick takes the last tick's snapshot (queued after its
        allocator calls) plus what its release gave back since, which the host knows exactly."""
        self.c = self.be.probe()
        self.free, self.fh = self.c.free, self.c.free_handles
        kv, ssm = self.credit
        self.free[self.g.pk] += kv
        self.free[self.g.ps] += ssm
        self.fh += kv + ssm
        self.credit = [0, 0]

    def _give_back(self, rows) -> None:
        """Host accounting of a release of ``rows`` (before they are cleared): their pages and
        their SSM block are free again."""
        kv = int(self.rows.pages[rows].sum())
        ssm = int(np.size(rows))
        g = self.g
        self.free[g.pk] += kv
        self.free[g.ps] += ssm
        self.fh += kv + ssm

    def fits(self, kv: int, ssm: int) -> bool:
        g, free = self.g, self.free
        if g.dual:
            return kv <= free[g.pk] and ssm <= free[g.ps] and kv + ssm <= self.fh
        return kv + ssm <= free[g.pk] and kv + ssm <= self.fh

    def tick(self) -> None:
        self._idle_wait()
        self._arrivals()
        self.timer.new_tick()
        with self.timer:
            self._read_counts()
        rows = self.rows
        active = rows.req >= 0
        left = self._plan_tokens(active)
        rows.need[:] = 0
        rows.need[active] = _kv_pages(rows.ctx[active] + rows.q[active], self.pt) + self.g.extra - rows.pages[active]
        growth = int(rows.need.sum())
        growth, preempted = self._grow_or_preempt(growth)
        admitted, kv_adm = ([], 0) if preempted else self._admit(growth, active.any(), left)
        with self.timer:
            grow = rows.need if growth or kv_adm else None
            self.alloc_rows += int(np.count_nonzero(rows.need))
            if admitted:   # their pages first: a swapped-out request's bytes go into them
                if grow is not None:
                    self.be.grow(grow)
                    grow = None
                self.be.alloc_ssm(admitted)
                self._swap_in(admitted)
            # growth, the proactive policy and the counts' snapshot (maybe run in the decode graph)
            self.be.tick_calls(grow)
            self.moved |= self.proactive
        rows.pages += rows.need
        sampled, shape = self._run_tokens()
        running = np.flatnonzero(rows.req >= 0)
        stopped = None
        if self.runner is not None:
            stopped = self.runner.step(self.be, self.t, rows, admitted, sampled)
            self.be.flush()   # the calls a runner left
        self.reqs.generated[rows.req[sampled]] += 1
        if stopped:
            self._stop_early(stopped, sampled)
        self.series.sample(self.g, self.c, rows, running)
        self._advance_clock(shape, sampled)
        self._finish(sampled)
        self.t += 1

    def _idle_wait(self) -> None:
        """With a clock: nothing running or queued, so the engine idles until the next arrival."""
        if self.clock is None or self.nxt >= self.reqs.n or self.queue or (self.rows.req >= 0).any():
            return
        self.clock.idle_until(self.reqs.arrival[self.order[self.nxt]])

    def _plan_tokens(self, active: np.ndarray) -> int | None:
        """This step's tokens of each running row under the token budget: decode rows one each,
        then the rows still prefilling, oldest first, a chunk each. Returns the budget left
        (None: no budget, whole prefills)."""
        rows = self.rows
        rows.q[:] = 0
        dec = active & (rows.todo == 0)
        rows.q[dec] = 1
        pre = np.flatnonzero(active & (rows.todo > 0))
        if self.budget is None:
            rows.q[pre] = rows.todo[pre]
            return None
        left = self.budget - int(dec.sum())
        for r in pre[np.argsort(rows.seq[pre], kind="stable")]:
            rows.q[r] = min(int(rows.todo[r]), left)
            left -= int(rows.q[r])
        return left

    def _run_tokens(self) -> tuple[np.ndarray, "StepShape | None"]:
        """Writes this step's tokens into the rows; returns the rows that sample a token (decode
        rows, and rows whose prefill this step completes) and, with a clock, the step's shape."""
        rows = self.rows
        sched = np.flatnonzero(rows.q > 0)
        pre = sched[rows.todo[sched] > 0]
        self._count_recompute(rows.req[pre], rows.q[pre])
        shape = None
        if self.clock is not None:
            dec = sched[rows.todo[sched] == 0]
            shape = StepShape(len(dec), int(rows.ctx[dec].sum()) + len(dec), rows.q[pre].copy(), rows.ctx[pre].copy(),
                              self.alloc_rows, 0)
        rows.ctx[sched] += rows.q[sched]
        rows.todo[sched] = np.maximum(rows.todo[sched] - rows.q[sched], 0)   # a decode row has none left
        return sched[rows.todo[sched] == 0], shape

    def _count_recompute(self, reqs: np.ndarray, q: np.ndarray) -> None:
        """Prefill tokens beyond each request's prompt run once: what preemption made it redo (the
        tokens it had generated, and any part of a prefill it had done before)."""
        first = np.minimum(q, self.reqs.fresh[reqs])
        self.reqs.fresh[reqs] -= first
        self.recomputed += int((q - first).sum())

    def _advance_clock(self, shape, sampled: np.ndarray) -> None:
        if self.clock is not None:
            if self.moved:
                now = self.be.stats().bytes_copied
                shape.bytes_moved = now - self.bytes_seen
                self.bytes_seen = now
            self.clock.advance(shape)
            self.clock.sampled(self.rows.req[sampled])
        self.alloc_rows, self.moved = 0, False

    def _arrivals(self) -> None:
        reqs = self.reqs
        now = self.t if self.clock is None else self.clock.now
        while self.nxt < reqs.n and reqs.arrival[self.order[self.nxt]] <= now:
            i = int(self.order[self.nxt])
            self.nxt += 1
            self._event("arrive", i)
            if self.never[i]:
                self.unservable += 1
                self.settled += 1
                self._event("unservable", i)
            else:
                self.queue.append(i)

    def _grow_or_preempt(self, growth: int) -> tuple[int, bool]:
        """Room for this tick's ``growth`` pages: AVMP rebalances, then the most recently admitted
        request is preempted (recompute) until it fits. Returns (growth left, preempted any)."""
        if self.fits(growth, 0):
            return growth, False
        g, rows = self.g, self.rows
        self.growth_failures += growth - min(self.free[g.pk], self.fh)
        pending: list[int] = []
        preempted = False
        while True:
            if g.migrates:
                with self.timer:
                    if pending:
                        self.be.release(pending)
                        pending = []
                    try:
                        self.be.make_room("kv", growth, self.free[g.pk])
                    except PoolExhaustedError:
                        pass
                    self.moved = True
                    self._read_counts()
            if self.fits(growth, 0):
                break
            v = int(np.argmax(np.where(rows.req >= 0, rows.seq, -1)))
            i = int(rows.req[v])
            self.preemptions += 1
            self._give_back([v])
            growth -= int(rows.need[v])
            rows.need[v] = 0
            if self.swap:
                self._swap_out(v, i)
            rows.clear(v)
            self.queue.appendleft(i)
            self._event("preempt", i)
            pending.append(v)
            self.alloc_rows += 1
            preempted = True
        if pending:
            with self.timer:
                self.be.release(pending)
        return growth, preempted

    def _admit(self, growth: int, any_active: bool, left: int | None) -> tuple[list[int], int]:
        """Strict FIFO from the head of the queue, while the step's token budget (``left``; None:
        none) lasts: each admitted request runs its first chunk now. Returns (rows admitted, their
        pages)."""
        admitted: list[int] = []
        kv_adm = 0
        free_rows = np.flatnonzero(self.rows.req < 0)
        reqs, rows, queue = self.reqs, self.rows, self.queue
        while queue and len(admitted) < len(free_rows) and (left is None or left > 0):
            i = queue[0]
            ctx0, todo0, q = self._first_step(i, left)
            pages = int(_kv_pages(ctx0 + q, self.pt)) + self.g.extra
            kv_need, ssm_need = growth + kv_adm + pages, len(admitted) + 1
            if not self._fits_after_rebalance(kv_need, ssm_need):
                if admitted or any_active:
                    break
                queue.popleft()  # nothing live at all and it does not fit: it never will
                self._event("unservable", i)
                self.unservable += 1
                self.settled += 1
                continue
            queue.popleft()
            r = int(free_rows[len(admitted)])
            admitted.append(r)
            kv_adm += pages
            if left is not None:
                left -= q
            rows.req[r], rows.ctx[r], rows.seq[r], rows.need[r] = i, ctx0, self.seq, pages
            rows.todo[r], rows.q[r] = todo0, q
            self.seq += 1
            if reqs.first_admit[i] < 0:
                reqs.first_admit[i] = self.t
            self._event("admit", i)
        return admitted, kv_adm

    def _first_step(self, i: int, left: int | None) -> tuple[int, int, int]:
        """(tokens in cache, tokens left to prefill, tokens this step) of request i on admission:
        a new or recomputed request prefills its prompt and what it generated from nothing; a
        swapped-out one resumes where it was (a decode token, or the rest of its prefill)."""
        if i in self.swapped:
            ctx0, todo0 = self.swapped[i][:2]
        else:
            ctx0, todo0 = 0, int(self.reqs.prompt[i] + self.reqs.generated[i])
        if todo0 == 0:
            return ctx0, 0, 1
        return ctx0, todo0, todo0 if left is None else min(todo0, left)

    def _swap_out(self, v: int, i: int) -> None:
        rows = self.rows
        pages = int(rows.pages[v])
        host = self.be.swap_out(v, pages)
        self.swapped[i] = (int(rows.ctx[v]), int(rows.todo[v]), pages, host)
        self.swaps += 1
        self.swap_bytes += sum(h.numel() for h in host)

    def _swap_in(self, admitted: list[int]) -> None:
        """Readmitted swapped-out requests get their bytes back, in their new units."""
        for r in admitted:
            saved = self.swapped.pop(int(self.rows.req[r]), None)
            if saved is not None:
                self.be.swap_in(r, saved[2], saved[3])
                self.swap_bytes += sum(h.numel() for h in saved[3])

    def _fits_after_rebalance(self, kv_need: int, ssm_need: int) -> bool:
        if self.fits(kv_need, ssm_need):
            return True
        self.admission_failures += 1
        if self.g.migrates and self.g.dual and self._rebalance_for(kv_need, ssm_need):
            return self.fits(kv_need, ssm_need)
        return False

    def _rebalance_for(self, kv_need: int, ssm_need: int) -> bool:
        """AVMP, admission short in exactly one pool: move capacity from the other pool if that one
        keeps what this tick needs from it. ``make_room`` (eager: it may hand over up to
        ``migration_batch`` free slabs) when even its largest move leaves the donor enough, else
        ``rebalance`` of exactly the slabs missing, so that an eager move can never take what the
        same admission needs from the donor (which could bounce capacity back and forth for ever).
        Returns whether it tried (and re-read the counts)."""
        g, free = self.g, self.free
        short_kv, short_ssm = kv_need > free[g.pk], ssm_need > free[g.ps]
        if short_kv == short_ssm:
            return False  # both short: moving capacity from one pool to the other cannot help
        if short_kv:
            kind, n, p, d, keep = "kv", kv_need, g.pk, g.ps, ssm_need
        else:
            kind, n, p, d, keep = "ssm", ssm_need, g.ps, g.pk, kv_need
        slabs = -(-(n - free[p]) // g.ups[p])
        if free[d] - slabs * g.ups[d] < keep:
            return False
        with self.timer:
            try:
                if free[d] - max(slabs, g.migration_batch) * g.ups[d] >= keep:
                    self.be.make_room(kind, n, free[p])
                else:
                    self.be.rebalance(kind, slabs)
            except PoolExhaustedError:
                pass
            self.moved = True
            self._read_counts()
        return True

    def _stop_early(self, stopped, sampled: np.ndarray) -> None:
        """Requests the runner stopped (a stop token) finish with what they generated."""
        stopped = np.asarray(stopped, dtype=np.int64)
        bad = np.setdiff1d(stopped, self.rows.req[sampled])
        if bad.size:
            raise ValueError(f"the model runner stopped request {int(bad[0])}, which sampled no token this tick")
        self.reqs.output[stopped] = self.reqs.generated[stopped]

    def _finish(self, sampled: np.ndarray) -> None:
        """Requests that have generated all their tokens free everything, in one call."""
        reqs, rows = self.reqs, self.rows
        req_sampled = rows.req[sampled]
        fin = sampled[reqs.generated[req_sampled] >= reqs.output[req_sampled]]
        if not fin.size:
            return
        with self.timer:
            self.be.release(fin.tolist())
        # after this tick's snapshot: the next tick's counts add it
        pages = int(rows.pages[fin].sum())
        self.credit = [self.credit[0] + pages, self.credit[1] + fin.size]
        self.alloc_rows += fin.size   # the release call is charged to the next step
        if self.clock is not None:
            self.clock.finished(rows.req[fin])
        for i in rows.req[fin].tolist():
            self._event("finish", i)
        rows.clear(fin)
        self.done += fin.size
        self.settled += fin.size

    def drain(self) -> None:
        """Release what is still running (only when max_ticks stopped the run early)."""
        left = np.flatnonzero(self.rows.req >= 0)
        if left.size:
            self.be.release(left.tolist())
            self.rows.req[left] = -1
        if self.be.name == "device":
            self.be.probe(fresh=True)  # checks the last calls' error flags

    def metrics(self) -> RunMetrics:
        end, start, reqs, s = self.be.stats(), self.start_stats, self.reqs, self.series
        drained = end.handles_live == 0 and all(p.free_units == p.units for p in end.pools.values())
        waits = (reqs.first_admit - reqs.arrival)[reqs.first_admit >= 0]
        alloc_mean_us, alloc_p50_us = self.timer.summary_us()
        fails = self.growth_failures + self.admission_failures
        N, t = reqs.n, self.t
        return RunMetrics(
            allocator=type(self.a).__name__, backend=self.be.name, num_requests=N,
            completed=self.done, unservable=self.unservable, makespan_ticks=t,
            tokens_generated=int(reqs.generated.sum()),
            batch_mean=mean(s.batch), batch_p50=percentile(s.batch, 50), batch_peak=int(max(s.batch, default=0)),
            admission_wait_mean=mean(waits), admission_wait_p50=percentile(waits, 50),
            admission_wait_p99=percentile(waits, 99),
            preemptions=self.preemptions, recomputed_tokens=self.recomputed,
            alloc_failures=fails, alloc_failures_per_request=fails / N if N else 0.0,
            growth_failures=self.growth_failures, admission_failures=self.admission_failures,
            kv_util_mean=mean(s.kv), ssm_util_mean=mean(s.ssm), mem_util_mean=mean(s.mem),
            kv_util_series=downsample(s.kv), ssm_util_series=downsample(s.ssm),
            padding_waste_bytes_mean=mean(s.pad), alignment_waste_bytes=mean(s.align),
            slab_tail_bytes=int(round(mean(s.tail))),
            migrations=end.migrations - start.migrations, slabs_moved=end.slabs_moved - start.slabs_moved,
            proactive_slabs_moved=end.proactive_slabs_moved - start.proactive_slabs_moved,
            bytes_moved=end.bytes_copied - start.bytes_copied,
            alloc_time_us_per_step_mean=alloc_mean_us, alloc_time_us_per_step_p50=alloc_p50_us,
            alloc_time_kind=self.timer.kind, host_syncs_per_step=self.be.syncs / t if t else 0.0,
            units_returned_at_drain=bool(drained),
            max_num_batched_tokens=self.budget, swapped_out=self.swaps, swap_bytes=self.swap_bytes,
            **self._time_metrics(),
        )

    def _time_metrics(self) -> dict:
        if self.clock is None:
            return {}
        r = self.reqs
        return dict(step_time_model=self.clock.source,
                    **self.clock.metrics(r.arrival, r.output, int(r.generated.sum()), self.slo))


class _RunnerFeed:
    """The model runner's per-tick metadata, in fixed device buffers: views of one byte buffer
    (int32 first, aligned), filled on the host and copied in one transfer a tick."""

    def __init__(self, runner: ModelRunner, R: int, dev):
        self.runner, self.R = runner, R
        self._buf = Staged(10 * R, torch.uint8, dev)
        d = self._buf.dev
        self.qlen, self.ctx = d[:4 * R].view(torch.int32), d[4 * R:8 * R].view(torch.int32)
        self.running, self.prefill = d[8 * R:9 * R].view(torch.bool), d[9 * R:].view(torch.bool)

    def step(self, be, t: int, rows: _Rows, admitted: list[int], sampled: np.ndarray):
        running = rows.req >= 0
        qlen = np.where(running, rows.q, 0)
        ctx = np.where(running, rows.ctx, 0)
        sample = np.zeros(len(running), dtype=bool)
        sample[sampled] = True
        R, host = self.R, self._buf.host()
        host[8 * R:9 * R] = running
        host[9 * R:] = False
        host[9 * R:][admitted] = True
        host[:4 * R].view(np.int32)[:] = qlen
        host[4 * R:8 * R].view(np.int32)[:] = ctx
        self._buf.send()
        return self.runner.step(be.block_table, be.num_pages, be.ssm_handles, self.running,
                                StepBatch(tick=t, query_lens=self.qlen, context_lens=self.ctx, prefill_mask=self.prefill,
                                          request_ids=np.where(running, rows.req, -1), query_lens_host=qlen,
                                          context_lens_host=ctx, sample_mask=sample,
                                          device_calls=be.calls if be.pending is not None else None))
