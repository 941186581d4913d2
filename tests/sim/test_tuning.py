"""static_tuned's split: a local optimum at the finest grid (one slab), on seeds the sweep never
evaluates, and the fraction builds exactly that many SSM slabs."""
import math

from avmp_triton.memory.allocator import StaticDualAllocator
from avmp_triton.sim import sweep as sw
from avmp_triton.sim.tuning import TUNING_SEEDS, tune_static_split
from avmp_triton.spec import get_preset


def test_tuned_split_is_a_one_slab_local_optimum_on_held_out_seeds():
    spec = get_preset("jamba-1.5-mini")
    budget = sw.make_budget(spec, "sharegpt", 48)
    t = tune_static_split(spec, "sharegpt", budget.capacity_bytes, max_running=sw.MAX_RUNNING, num_requests=24)
    assert not set(TUNING_SEEDS) & set(sw.SEEDS) and t.seeds == TUNING_SEEDS
    assert t.num_slabs == StaticDualAllocator(spec, budget.capacity_bytes, device="cpu").num_slabs > 16
    best = t.makespans[t.ssm_slabs]
    assert math.isfinite(best) and best == min(t.makespans.values())
    for s in (t.ssm_slabs - 1, t.ssm_slabs + 1):
        if 1 <= s < t.num_slabs:
            assert s in t.makespans and t.makespans[s] >= best
    alloc = sw.make_allocator("static_tuned", spec, budget.capacity_bytes, "cpu", ssm_fraction=t.ssm_fraction)
    assert alloc.stats().pools["ssm"].slabs == t.ssm_slabs


def test_static_tuned_needs_its_split():
    spec = get_preset("jamba-1.5-mini")
    try:
        sw.make_allocator("static_tuned", spec, sw.make_budget(spec, "sharegpt", 8).capacity_bytes, "cpu")
    except ValueError as e:
        assert "needs its tuned split" in str(e)
    else:
        raise AssertionError("static_tuned built without a split")
