"""static_tuned's split: a local optimum at the finest grid (one slab), on seeds the sweep never
evaluates, scored in the sweep's engine (makespan in seconds of the step-time model), and the
fraction builds exactly that many SSM slabs."""
import math
import os
import subprocess
import sys

from avmp_triton.memory.allocator import StaticDualAllocator
from avmp_triton.sim import sweep as sw
from avmp_triton.sim.tuning import TUNING_SEEDS, tune_static_split
from avmp_triton.spec import get_preset


def test_tuned_split_is_a_one_slab_local_optimum_on_held_out_seeds():
    spec = get_preset("jamba-1.5-mini")
    budget = sw.make_budget(spec, "sharegpt", "k48")
    t = tune_static_split(spec, "sharegpt", budget.capacity_bytes, num_requests=24, **sw.engine_kw(spec))
    assert not set(TUNING_SEEDS) & set(sw.SEEDS) and t.seeds == TUNING_SEEDS
    assert t.unit == "s"
    assert t.num_slabs == StaticDualAllocator(spec, budget.capacity_bytes, device="cpu").num_slabs > 16
    best = t.makespans[t.ssm_slabs]
    assert math.isfinite(best) and best == min(t.makespans.values())
    for s in (t.ssm_slabs - 1, t.ssm_slabs + 1):
        if 1 <= s < t.num_slabs:
            assert s in t.makespans and t.makespans[s] >= best
    alloc = sw.make_allocator("static_tuned", spec, budget.capacity_bytes, "cpu", ssm_fraction=t.ssm_fraction)
    assert alloc.stats().pools["ssm"].slabs == t.ssm_slabs
    # the sweep's tuned_split is this search with the engine's settings
    assert sw.tuned_split(spec, "sharegpt", budget, 24) == t


def test_without_a_step_time_the_split_is_scored_in_ticks():
    spec = get_preset("jamba-1.5-mini")
    cap = sw.make_budget(spec, "sharegpt", "k16").capacity_bytes
    t = tune_static_split(spec, "sharegpt", cap, max_running=sw.MAX_NUM_SEQS, num_requests=12)
    assert t.unit == "ticks"
    # a mean of whole ticks over the seeds
    assert all(x * len(t.seeds) == int(x * len(t.seeds)) for x in t.makespans.values() if math.isfinite(x))


def test_static_tuned_needs_its_split():
    spec = get_preset("jamba-1.5-mini")
    try:
        sw.make_allocator("static_tuned", spec, sw.make_budget(spec, "sharegpt", 8).capacity_bytes, "cpu")
    except ValueError as e:
        assert "needs its tuned split" in str(e)
    else:
        raise AssertionError("static_tuned built without a split")


_PLAN_WITHOUT_INTERPRETER = """
import torch
from avmp_triton.memory.allocator import StaticDualAllocator
from avmp_triton.sim import sweep as sw
from avmp_triton.spec import get_preset
spec = get_preset("jamba-1.5-mini")
setup = sw.setup_group("jamba-1.5-mini", "sharegpt", "k16", 8, tune=False)
print("capacity_rps", setup.capacity_rps)
cap = sw.make_budget(spec, "sharegpt", "k16").capacity_bytes
try:
    StaticDualAllocator(spec, cap, device="cpu")
except ValueError as e:
    print("materialized:", e)
"""


def test_planning_needs_no_interpreter():
    """A GPU host runs without TRITON_INTERPRET; the sweep's planners (meta arenas on CPU, model
    backend) must still run there, and only an arena with bytes on CPU asks for the interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-c", _PLAN_WITHOUT_INTERPRETER], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rps = float(run.stdout.split("capacity_rps ")[1].split()[0])
    assert math.isfinite(rps) and rps > 0
    assert "materialized: device 'cpu' needs Triton's interpreter" in run.stdout
