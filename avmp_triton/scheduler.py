"""One continuous-batching scheduler for every allocator, run allocator-only (a tick is one decode
step) or with a model runner.

The tick ``t`` (ticks count from 0):

1. Requests whose ``arrival == t`` join the tail of the FIFO queue, except those that no state of
   the allocator could hold even alone (their longest length in pages plus one SSM block: beyond
   the fixed pools of a baseline, beyond all slabs for AVMP): those are counted ``unservable``
   and never admitted (the only way a request leaves without completing).
2. ``allocator.proactive_step()`` if the allocator has a proactive policy (one device launch).
3. One host read of the allocator's counts (free units per pool, free handles, slabs per pool;
   plus the error flags of the previous tick's grow and release calls, which must be clear).
4. Growth planning. A running request holds ``c`` tokens in its KV cache (``prompt + generated - 1``:
   the newest token's K/V is written by the next step) and ``ceil(c / page_tokens)`` pages; this
   tick writes one more token, so it needs a page when ``c % page_tokens == 0``. If the pool cannot
   give the ``G`` pages needed: AVMP calls ``make_room("kv", G)`` (host-side rebalance); if that
   cannot make room (or the allocator never migrates), the most recently admitted running request is
   preempted (recompute, as vLLM does): all its units are freed, it goes back to the FRONT of the
   queue, and it will redo ``prompt + generated`` tokens (counted as recomputed tokens); repeat
   until the growth fits. AVMP tries ``make_room`` again after each preemption, since a freed SSM
   block can free a whole slab.
5. Admission, from the head of the queue only (no request overtakes another; none is dropped),
   skipped in a tick that preempted (as vLLM does): the head is admitted when a batch slot is free
   and its ``ceil((prompt + generated) / page_tokens)`` pages and one SSM block fit next to this
   tick's growth. If only one of the two pools is short, AVMP moves capacity into it (``make_room``,
   or an exact ``rebalance`` when an eager move could take what the admission needs from the
   other pool; never when the other pool could not spare it) and checks again. (Should nothing at
   all be running and the head still not fit, it never will: it is counted ``unservable`` too.)
6. ONE ``grow_kv`` call on the fixed ``[max_running, max_pages]`` block table: ``need`` is 0/1 for
   decoding rows and the prompt pages for rows admitted in this tick; then ONE ``alloc_ssm(k)`` for
   the ``k`` admitted requests, written into the ``ssm_handles`` column on the device.
7. ``model_runner.step(...)`` if one was given.
8. Every running request generates one token (an admitted request's prefill generates its first).
9. ONE ``release_rows`` call for the requests that have generated all their output tokens.

Steps 4 and 5 are decided on the host from the counts of step 3 (the scheduler knows exactly what
its calls take and give back), so the grow and SSM calls of step 6 always succeed and their
``failed`` / status outputs are only checked, at the next tick's read: one host sync per tick, two
in ticks that admit (``alloc_ssm``), more only on the failure path (``make_room`` and preemption).

Backends: ``backend="device"`` drives the allocator's Triton kernels on its device;
``backend="model"`` drives ``AllocatorModel.like(allocator)``, the pure-Python reference with the
same semantics (tested equal to the device state after every call), which is much faster than the
Triton interpreter on CPU. Both give identical metrics. The default is "device" on CUDA, "model"
on CPU.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from avmp_triton.allocator import KIND_KV, KIND_SSM, UNIT_ALIGN, ArenaAllocator, PoolExhaustedError
from avmp_triton.metrics import RunMetrics, downsample, mean, percentile

__all__ = ["ModelRunner", "Scheduler", "StepBatch"]

BACKENDS = ("device", "model")


@dataclasses.dataclass(frozen=True, slots=True)
class StepBatch:
    """Per-tick metadata for a model runner (all ``[R]`` device tensors are fixed-size buffers)."""
    tick: int
    query_lens: torch.Tensor    # [R] int32 tokens whose K/V this step writes: prefill length / 1 / 0
    context_lens: torch.Tensor  # [R] int32 tokens in the KV cache after this step
    prefill_mask: torch.Tensor  # [R] bool rows admitted in this tick (their prefill runs now)
    request_ids: np.ndarray     # [R] int64 rid of each row, -1 for an idle row (host)


class ModelRunner(Protocol):
    """What the scheduler calls once per tick, after the tick's allocations and before its frees.

    ``block_table`` [R, W] int32 KV handles (-1 padded), ``num_pages`` [R] int32,
    ``ssm_handles`` [R] int32 (-1 for an idle row), ``running_mask`` [R] bool: the rows that
    generate a token in this tick. The runner must not change them.
    """

    def step(self, block_table: torch.Tensor, num_pages: torch.Tensor, ssm_handles: torch.Tensor,
             running_mask: torch.Tensor, batch: StepBatch) -> None: ...


# ---------------------------------------------------------------------------------------- backends
class _Counts:
    __slots__ = ("free", "free_handles", "slabs")

    def __init__(self, free: list[int], free_handles: int, slabs: list[int]):
        self.free, self.free_handles, self.slabs = free, free_handles, slabs


class _DeviceBackend:
    """The allocator's own kernels on fixed-size device buffers."""

    name = "device"

    def __init__(self, alloc: ArenaAllocator, R: int, W: int):
        dev = alloc.device
        self.a = alloc
        self.block_table = torch.full((R, W), -1, dtype=torch.int32, device=dev)
        self.num_pages = torch.zeros(R, dtype=torch.int32, device=dev)
        self.ssm_handles = torch.full((R,), -1, dtype=torch.int32, device=dev)
        self._need = torch.zeros(R, dtype=torch.int32, device=dev)
        self._failed = torch.zeros(R, dtype=torch.int32, device=dev)
        self._rows = torch.full((R,), -1, dtype=torch.int32, device=dev)
        self._status = torch.zeros(3, dtype=torch.int64, device=dev)
        self._release_err = torch.zeros(1, dtype=torch.int64, device=dev)
        self._host_rows = np.full(R, -1, dtype=np.int32)
        self.syncs = 0

    def probe(self) -> _Counts:
        """The one host read of a tick: tops, slabs per pool, and the last calls' error flags."""
        a = self.a
        slabs = torch.bincount(a.slab_owner.long(), minlength=2)[:2]
        grow_err = (self._failed != 0).sum().view(1).long()
        v = torch.cat([a._tops, slabs, grow_err, self._release_err]).tolist()
        self.syncs += 1
        if v[5] or v[6]:
            raise AssertionError(f"allocator refused a planned call (grow failures {v[5]}, release code {v[6]})")
        return _Counts([v[0], v[1]], v[2], [v[3], v[4]])

    def grow(self, need: np.ndarray) -> None:
        self._need.copy_(torch.from_numpy(need))
        self.a.grow_kv(self.block_table, self.num_pages, self._need, self._failed)

    def alloc_ssm(self, rows: list[int]) -> None:
        h = self.a.alloc_ssm(len(rows))  # syncs once (its status)
        self.syncs += 1
        self.ssm_handles[torch.tensor(rows, dtype=torch.long, device=self.a.device)] = h

    def release(self, rows: list[int]) -> None:
        self._host_rows.fill(-1)
        self._host_rows[:len(rows)] = rows
        self._rows.copy_(torch.from_numpy(self._host_rows))
        self.a.release_rows(self._rows, self.block_table, self.num_pages, self.ssm_handles, self._status)
        torch.maximum(self._release_err, self._status[:1], out=self._release_err)

    def make_room(self, kind: str, n: int, free_now: int) -> None:
        self.syncs += 1 if n <= free_now else 3  # tops; then slab owners and live counts to plan
        self.a.make_room(kind, n)

    def rebalance(self, kind: str, num_slabs: int) -> None:
        self.syncs += 2  # slab owners and live counts to plan
        self.a.rebalance(kind, num_slabs)

    def proactive_step(self) -> None:
        self.a.proactive_step()

    def stats(self):
        return self.a.stats()


class _ModelBackend:
    """``AllocatorModel.like(allocator)``: the same decisions in pure Python, no kernel launch."""

    name = "model"

    def __init__(self, alloc: ArenaAllocator, R: int, W: int):
        from avmp_triton.reference.allocator_model import AllocatorModel
        self.m = AllocatorModel.like(alloc)
        self.block_table = [[-1] * W for _ in range(R)]
        self.num_pages = [0] * R
        self.ssm_handles = [-1] * R
        self.syncs = 0

    def probe(self) -> _Counts:
        m = self.m
        npools = len(m.pool_names)
        free = [len(m.unit_stacks[p]) for p in range(npools)] + [0] * (2 - npools)
        slabs = [m.slab_owner.count(0), m.slab_owner.count(1)]
        return _Counts(free, len(m.handle_stack), slabs)

    def grow(self, need: np.ndarray) -> None:
        # rows with need 0 take nothing, so serving only the others (in row order) is the same call
        rows = np.flatnonzero(need).tolist()
        sub_np = [self.num_pages[r] for r in rows]
        failed = self.m.grow([self.block_table[r] for r in rows], sub_np, need[rows].tolist())
        if any(failed):
            raise AssertionError(f"allocator refused a planned growth: {failed}")
        for r, n in zip(rows, sub_np):
            self.num_pages[r] = n

    def alloc_ssm(self, rows: list[int]) -> None:
        for r, h in zip(rows, self.m.alloc("ssm", len(rows))):
            self.ssm_handles[r] = h

    def release(self, rows: list[int]) -> None:
        code = self.m.release(rows, self.block_table, self.num_pages, self.ssm_handles)
        if code[0]:
            raise AssertionError(f"allocator refused a planned release: {code}")

    def make_room(self, kind: str, n: int, free_now: int) -> None:
        self.m.make_room(kind, n)

    def rebalance(self, kind: str, num_slabs: int) -> None:
        self.m.rebalance(kind, num_slabs)

    def proactive_step(self) -> None:
        self.m.proactive_step()

    def stats(self):
        return self.m.stats()


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


# --------------------------------------------------------------------------------------- scheduler
class Scheduler:
    """Continuous batching over one allocator (see the module docstring for the tick).

    Args:
        allocator: an ``AVMPAllocator``, ``StaticDualAllocator`` or ``PaddedUnifiedAllocator``.
            The model backend needs it fresh (nothing allocated) and leaves it untouched.
        max_running: batch slots (rows of the block table).
        max_pages_per_request: block-table width; by default the most pages any request of the
            run can hold, ``ceil((prompt + output - 1) / page_tokens)``.
        model_runner: optional ``ModelRunner``, called once per tick (device backend only).
        time_allocator: measure the time of the allocator calls per tick.
        backend: "device" or "model" (default: "device" when the allocator is on CUDA, else "model").
    """

    def __init__(self, allocator: ArenaAllocator, *, max_running: int = 256, max_pages_per_request: int | None = None,
                 model_runner: ModelRunner | None = None, time_allocator: bool = False, backend: str | None = None):
        if not isinstance(allocator, ArenaAllocator):
            raise TypeError(f"allocator must be an AVMPAllocator, StaticDualAllocator or PaddedUnifiedAllocator, "
                            f"got {type(allocator).__name__}")
        if not _is_int(max_running) or max_running < 1:
            raise ValueError(f"max_running must be a positive int, got {max_running!r}")
        if max_pages_per_request is not None and (not _is_int(max_pages_per_request) or max_pages_per_request < 1):
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
        self.allocator = allocator
        self.max_running = max_running
        self.max_pages_per_request = max_pages_per_request
        self.model_runner = model_runner
        self.time_allocator = bool(time_allocator)
        self.backend = backend
        self.state = None  # the last run's backend (block table, and the model for backend="model")
        # set to a list to record (tick, event, rid) with event in
        # "arrive", "admit", "preempt", "finish", "unservable" (for tests and debugging)
        self.events: list | None = None

    # ------------------------------------------------------------------------------------- run
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
        if max_ticks is not None and (not _is_int(max_ticks) or max_ticks < 0):
            raise ValueError(f"max_ticks must be None or a non-negative int, got {max_ticks!r}")
        a = self.allocator
        pt = a.page_tokens
        N = len(requests)
        arrival = np.empty(N, dtype=np.int64)
        prompt = np.empty(N, dtype=np.int64)
        output = np.empty(N, dtype=np.int64)
        for i, r in enumerate(requests):
            for f in ("arrival", "prompt_tokens", "output_tokens"):
                v = getattr(r, f, None)
                if not _is_int(v) and not isinstance(v, np.integer):
                    raise TypeError(f"requests[{i}].{f} must be an int, got {v!r}")
            if r.arrival < 0 or r.prompt_tokens < 1 or r.output_tokens < 1:
                raise ValueError(f"requests[{i}] needs arrival >= 0, prompt_tokens >= 1 and output_tokens >= 1, "
                                 f"got {r!r}")
            arrival[i], prompt[i], output[i] = r.arrival, r.prompt_tokens, r.output_tokens
        max_pages = -(-(prompt + output - 1) // pt) if N else np.zeros(0, dtype=np.int64)
        W = self.max_pages_per_request
        if W is None:
            W = max(1, int(max_pages.max()) if N else 1)
        elif N and int(max_pages.max()) > W:
            i = int(np.argmax(max_pages))
            raise ValueError(f"requests[{i}] needs {int(max_pages[i])} pages, more than max_pages_per_request={W}")
        R = self.max_running

        be = (_DeviceBackend if self.backend == "device" else _ModelBackend)(a, R, W)
        self.state = be
        timer = _Timer(self.time_allocator, self.backend == "device" and a.device.type == "cuda")
        migrates = bool(a._migrates)
        pk, ps = a._pool_of[KIND_KV], a._pool_of[KIND_SSM]
        dual = pk != ps
        ups = a.units_per_slab
        unit = a.unit_bytes
        proactive = getattr(a, "proactive", None) is not None
        start_stats = be.stats()
        never = self._never_fits(be.probe(), max_pages)

        # per request
        generated = np.zeros(N, dtype=np.int64)
        first_admit = np.full(N, -1, dtype=np.int64)
        # per row (host mirrors)
        row_req = np.full(R, -1, dtype=np.int64)
        row_ctx = np.zeros(R, dtype=np.int64)    # tokens in the KV cache
        row_pages = np.zeros(R, dtype=np.int64)  # == num_pages on the device
        row_seq = np.full(R, -1, dtype=np.int64)  # admission order (preemption takes the largest)
        need = np.zeros(R, dtype=np.int32)

        order = np.argsort(arrival, kind="stable")
        ev = self.events
        rid = [getattr(r, "rid", i) for i, r in enumerate(requests)]
        queue: collections.deque[int] = collections.deque()
        nxt = 0
        seq = 0
        finished_or_dropped = 0
        done = 0
        unservable = 0
        preemptions = 0
        recomputed = 0
        growth_failures = 0
        admission_failures = 0
        series = collections.defaultdict(list)
        runner = self.model_runner
        if runner is not None:
            dev = a.device
            running_mask_d = torch.zeros(R, dtype=torch.bool, device=dev)
            prefill_d = torch.zeros(R, dtype=torch.bool, device=dev)
            qlen_d = torch.zeros(R, dtype=torch.int32, device=dev)
            ctx_d = torch.zeros(R, dtype=torch.int32, device=dev)
        page_raw = a.kv_page_raw
        token_bytes = a.spec.kv_bytes_per_token
        block_raw = a.ssm_block_raw
        page_aligned = -(-page_raw // UNIT_ALIGN) * UNIT_ALIGN
        block_aligned = a.spec.ssm_block_bytes
        slab_bytes = a.slab_bytes
        usable = a.num_slabs * slab_bytes
        tails = [slab_bytes - ups[p] * unit[p] for p in range(len(a.pool_names))] + [0]

        t = 0
        reported = 0
        while finished_or_dropped < N:
            if max_ticks is not None and t >= max_ticks:
                break
            while nxt < N and arrival[order[nxt]] <= t:
                i = int(order[nxt])
                nxt += 1
                if ev is not None:
                    ev.append((t, "arrive", rid[i]))
                if never[i]:
                    unservable += 1
                    finished_or_dropped += 1
                    if ev is not None:
                        ev.append((t, "unservable", rid[i]))
                else:
                    queue.append(i)
            timer.new_tick()
            with timer:
                if proactive:
                    be.proactive_step()
                c = be.probe()
            free = c.free       # free units per pool, kept exact on the host through the tick
            fh = c.free_handles

            active = row_req >= 0
            need[:] = 0
            need[active] = (row_ctx[active] % pt) == 0
            G = int(need.sum())

            def fits(kv: int, ssm: int) -> bool:
                if dual:
                    return kv <= free[pk] and ssm <= free[ps] and kv + ssm <= fh
                return kv + ssm <= free[pk] and kv + ssm <= fh

            # ---- growth: rebalance (AVMP), then preempt the most recently admitted
            preempted = False
            if not fits(G, 0):
                growth_failures += G - min(free[pk], fh)
                pending: list[int] = []
                while True:
                    if migrates:
                        with timer:
                            if pending:
                                be.release(pending)
                                pending = []
                            try:
                                be.make_room("kv", G, free[pk])
                            except PoolExhaustedError:
                                pass
                            c = be.probe()
                        free, fh = c.free, c.free_handles
                    if fits(G, 0):
                        break
                    v = int(np.argmax(np.where(row_req >= 0, row_seq, -1)))
                    i = int(row_req[v])
                    preemptions += 1
                    recomputed += int(prompt[i] + generated[i])
                    free[pk] += int(row_pages[v])
                    free[ps] += 1
                    fh += int(row_pages[v]) + 1
                    G -= int(need[v])
                    need[v] = 0
                    row_req[v] = -1
                    row_pages[v] = 0
                    row_ctx[v] = 0
                    row_seq[v] = -1
                    queue.appendleft(i)
                    if ev is not None:
                        ev.append((t, "preempt", rid[i]))
                    pending.append(v)
                    preempted = True
                if pending:
                    with timer:
                        be.release(pending)

            # ---- admission: strict FIFO from the head
            admitted: list[int] = []
            kv_adm = 0
            if not preempted and queue:
                free_rows = np.flatnonzero(row_req < 0)
                while queue and len(admitted) < len(free_rows):
                    i = queue[0]
                    c0 = int(prompt[i] + generated[i])
                    P = -(-c0 // pt)
                    kv_need, ssm_need = G + kv_adm + P, len(admitted) + 1
                    ok = fits(kv_need, ssm_need)
                    if not ok:
                        admission_failures += 1
                        new = self._rebalance_for(be, timer, free, kv_need, ssm_need) if migrates and dual else None
                        if new is not None:
                            c = new
                            free, fh = c.free, c.free_handles
                            ok = fits(kv_need, ssm_need)
                    if not ok:
                        if not admitted and not active.any():
                            # nothing live at all and it does not fit: it never will
                            queue.popleft()
                            if ev is not None:
                                ev.append((t, "unservable", rid[i]))
                            unservable += 1
                            finished_or_dropped += 1
                            continue
                        break
                    queue.popleft()
                    r = int(free_rows[len(admitted)])
                    admitted.append(r)
                    kv_adm += P
                    row_req[r] = i
                    row_ctx[r] = c0
                    row_seq[r] = seq
                    seq += 1
                    need[r] = P
                    if first_admit[i] < 0:
                        first_admit[i] = t
                    if ev is not None:
                        ev.append((t, "admit", rid[i]))

            # ---- the tick's allocations: one grow call, one SSM alloc
            with timer:
                if G or kv_adm:
                    be.grow(need)
                if admitted:
                    be.alloc_ssm(admitted)
            decoding = active & (row_req >= 0)  # running before this tick and not preempted
            row_pages += need
            row_ctx[decoding] += 1
            running = row_req >= 0
            rows_running = np.flatnonzero(running)
            req_running = row_req[rows_running]

            if runner is not None:
                prefill = np.zeros(R, dtype=bool)
                prefill[admitted] = True
                qlen = np.where(prefill, row_ctx, running.astype(np.int64)).astype(np.int32)
                running_mask_d.copy_(torch.from_numpy(running))
                prefill_d.copy_(torch.from_numpy(prefill))
                qlen_d.copy_(torch.from_numpy(qlen))
                ctx_d.copy_(torch.from_numpy(np.where(running, row_ctx, 0).astype(np.int32)))
                runner.step(be.block_table, be.num_pages, be.ssm_handles, running_mask_d,
                            StepBatch(tick=t, query_lens=qlen_d, context_lens=ctx_d, prefill_mask=prefill_d,
                                      request_ids=np.where(running, row_req, -1)))

            # ---- every running request generates one token
            generated[req_running] += 1
            n_run = len(rows_running)
            live_kv = int(row_pages.sum())
            units = [c.slabs[p] * ups[p] for p in range(len(a.pool_names))]
            if dual:
                kv_util = live_kv / units[pk] if units[pk] else 0.0
                ssm_util = n_run / units[ps] if units[ps] else 0.0
                tail = c.slabs[0] * tails[0] + c.slabs[1] * tails[1]
            else:
                kv_util = live_kv / units[0] if units[0] else 0.0
                ssm_util = n_run / units[0] if units[0] else 0.0
                tail = c.slabs[0] * tails[0]
            series["batch"].append(n_run)
            series["kv"].append(kv_util)
            series["ssm"].append(ssm_util)
            series["mem"].append((int(row_ctx[rows_running].sum()) * token_bytes + n_run * block_raw) / usable)
            series["pad"].append(live_kv * (unit[pk] - page_raw) + n_run * (unit[ps] - block_raw))
            series["align"].append(live_kv * (page_aligned - page_raw) + n_run * (block_aligned - block_raw))
            series["tail"].append(tail)

            # ---- finished requests free everything, in one call
            fin = rows_running[generated[req_running] >= output[req_running]]
            if fin.size:
                with timer:
                    be.release(fin.tolist())
                fin_req = row_req[fin]
                if ev is not None:
                    ev.extend((t, "finish", rid[i]) for i in fin_req.tolist())
                row_req[fin] = -1
                row_pages[fin] = 0
                row_ctx[fin] = 0
                row_seq[fin] = -1
                done += fin.size
                finished_or_dropped += fin.size
            t += 1
            if progress is not None and finished_or_dropped != reported:
                reported = finished_or_dropped
                progress(finished_or_dropped, N)

        # ---- drain (only when max_ticks stopped the run early)
        left = np.flatnonzero(row_req >= 0)
        if left.size:
            be.release(left.tolist())
            row_req[left] = -1
        if be.name == "device":
            be.probe()  # checks the last calls' error flags
        end = be.stats()
        drained = end.handles_live == 0 and all(p.free_units == p.units for p in end.pools.values())
        if progress is not None:
            progress(finished_or_dropped, N)

        waits = (first_admit - arrival)[first_admit >= 0]
        alloc_mean_us, alloc_p50_us = timer.summary_us()
        fails = growth_failures + admission_failures
        return RunMetrics(
            allocator=type(a).__name__, backend=be.name, num_requests=N,
            completed=done, unservable=unservable, makespan_ticks=t, tokens_generated=int(generated.sum()),
            batch_mean=mean(series["batch"]), batch_p50=percentile(series["batch"], 50),
            batch_peak=int(max(series["batch"], default=0)),
            admission_wait_mean=mean(waits), admission_wait_p50=percentile(waits, 50),
            admission_wait_p99=percentile(waits, 99),
            preemptions=preemptions, recomputed_tokens=recomputed,
            alloc_failures=fails, alloc_failures_per_request=fails / N if N else 0.0,
            growth_failures=growth_failures, admission_failures=admission_failures,
            kv_util_mean=mean(series["kv"]), ssm_util_mean=mean(series["ssm"]), mem_util_mean=mean(series["mem"]),
            kv_util_series=downsample(series["kv"]), ssm_util_series=downsample(series["ssm"]),
            padding_waste_bytes_mean=mean(series["pad"]), alignment_waste_bytes=mean(series["align"]),
            slab_tail_bytes=int(round(mean(series["tail"]))),
            migrations=end.migrations - start_stats.migrations,
            slabs_moved=end.slabs_moved - start_stats.slabs_moved,
            proactive_slabs_moved=end.proactive_slabs_moved - start_stats.proactive_slabs_moved,
            bytes_moved=end.bytes_copied - start_stats.bytes_copied,
            alloc_time_us_per_step_mean=alloc_mean_us,
            alloc_time_us_per_step_p50=alloc_p50_us,
            alloc_time_kind=timer.kind,
            host_syncs_per_step=be.syncs / t if t else 0.0,
            units_returned_at_drain=bool(drained),
        )

    def _never_fits(self, c: _Counts, max_pages: np.ndarray) -> np.ndarray:
        """Requests that no state of the allocator could hold even alone (all of their pages at
        their longest, and one SSM block): fixed pools for the baselines, any split of the slabs
        for AVMP."""
        a = self.allocator
        pk, ps = a._pool_of[KIND_KV], a._pool_of[KIND_SSM]
        ups = a.units_per_slab
        if pk == ps:
            return max_pages + 1 > c.slabs[pk] * ups[pk]
        if a._migrates:
            return -(-max_pages // ups[pk]) + 1 > a.num_slabs
        return (max_pages > c.slabs[pk] * ups[pk]) | (c.slabs[ps] * ups[ps] < 1)

    def _rebalance_for(self, be, timer, free, kv_need: int, ssm_need: int) -> _Counts | None:
        """AVMP, admission short in exactly one pool: move capacity from the other pool if that one
        keeps what this tick needs from it. ``make_room`` (eager: it may hand over up to
        ``migration_batch`` free slabs) when even its largest move leaves the donor enough, else
        ``rebalance`` of exactly the slabs missing, so that an eager move can never take what the
        same admission needs from the donor (which could bounce capacity back and forth for ever).
        Returns the new counts, or None when nothing was tried."""
        a = self.allocator
        pk, ps = a._pool_of[KIND_KV], a._pool_of[KIND_SSM]
        ups = a.units_per_slab
        short_kv, short_ssm = kv_need > free[pk], ssm_need > free[ps]
        if short_kv == short_ssm:
            return None  # both short: moving capacity from one pool to the other cannot help
        if short_kv:
            kind, n, p, d, keep = "kv", kv_need, pk, ps, ssm_need
        else:
            kind, n, p, d, keep = "ssm", ssm_need, ps, pk, kv_need
        slabs = -(-(n - free[p]) // ups[p])
        if free[d] - slabs * ups[d] < keep:
            return None
        with timer:
            try:
                if free[d] - max(slabs, a.migration_batch) * ups[d] >= keep:
                    be.make_room(kind, n, free[p])
                else:
                    be.rebalance(kind, slabs)
            except PoolExhaustedError:
                pass
            return be.probe()


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
