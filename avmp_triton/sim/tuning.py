"""The fixed split a user would tune: how many of a budget's slabs a ``StaticDualAllocator`` gives
the SSM pool so that held-out seeds of a workload, all requests arriving at once, drain soonest (in
seconds with a step-time model, else in ticks)."""
from __future__ import annotations

import dataclasses
import math

from avmp_triton.memory.allocator import StaticDualAllocator
from avmp_triton.sim.workloads import make_workload

__all__ = ["TUNING_SEEDS", "TunedSplit", "tune_static_split"]

# held out: the sweep evaluates seeds 0-2
TUNING_SEEDS = (100, 101)
COARSE_POINTS = 8


@dataclasses.dataclass(frozen=True)
class TunedSplit:
    ssm_slabs: int
    num_slabs: int
    seeds: tuple
    makespans: dict          # SSM slabs -> mean makespan over the seeds (inf: a request went unserved)
    unit: str = "ticks"      # of the makespans: "s" with a step-time model

    @property
    def ssm_fraction(self) -> float:
        """The ``ssm_fraction`` that gives exactly ``ssm_slabs`` slabs (the allocator rounds half up)."""
        return self.ssm_slabs / self.num_slabs


def _mean_makespan(spec, capacity_bytes: int, s: int, S: int, reqs_by_seed: list, max_running: int,
                   scheduler_kw: dict) -> float:
    from avmp_triton.engine.scheduler import Scheduler
    total = 0
    for reqs in reqs_by_seed:
        alloc = StaticDualAllocator(spec, capacity_bytes, ssm_fraction=s / S, device="cpu", materialize=False)
        m = Scheduler(alloc, max_running=max_running, backend="model", **scheduler_kw).run(reqs)
        if m.completed != len(reqs):
            return math.inf
        total += m.makespan_s if m.makespan_s is not None else m.makespan_ticks
    return total / len(reqs_by_seed)


def tune_static_split(spec, workload: str, capacity_bytes: int, *, max_running: int, seeds=TUNING_SEEDS,
                      num_requests: int | None = None, **scheduler_kw) -> TunedSplit:
    """Search the SSM slab count (1 to all but one) on ``seeds``: ``COARSE_POINTS`` evenly spaced
    counts, then halving steps around the best down to a single slab, the finest grid a split has,
    and single-slab steps until neither neighbour of the best is better. Ties go to the fewer SSM
    slabs. ``scheduler_kw`` go to the ``Scheduler`` (the step-time model
    and token budget of the runs it is tuned for)."""
    S = StaticDualAllocator(spec, capacity_bytes, device="cpu", materialize=False).num_slabs
    reqs_by_seed = [make_workload(workload, seed, num_requests=num_requests) for seed in seeds]
    seen: dict[int, float] = {}

    def score(s: int) -> float:
        if s not in seen:
            seen[s] = _mean_makespan(spec, capacity_bytes, s, S, reqs_by_seed, max_running, scheduler_kw)
        return seen[s]

    step = max(1, (S - 2) // (COARSE_POINTS - 1))
    for s in range(1, S, step):
        score(s)
    best = min(seen, key=lambda s: (seen[s], s))
    while True:
        step = max(1, step // 2)
        for s in (best - step, best + step):
            if 1 <= s <= S - 1:
                score(s)
        prev, best = best, min(seen, key=lambda s: (seen[s], s))
        if step == 1 and best == prev:      # both one-slab neighbours scored and no better
            break
    return TunedSplit(ssm_slabs=best, num_slabs=S, seeds=tuple(seeds), makespans=dict(sorted(seen.items())),
                      unit="s" if scheduler_kw.get("step_time") is not None else "ticks")
