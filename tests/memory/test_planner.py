"""The array planner the device allocator uses (plan_victims_array) picks the reference planner's
victims, in the same order, on random slab snapshots."""
import numpy as np
import pytest

from avmp_triton.memory.planner import plan_victims, plan_victims_array


@pytest.mark.parametrize("seed", range(40))
def test_array_planner_matches_the_reference(seed):
    rng = np.random.default_rng(seed)
    S = int(rng.integers(1, 300))
    ups = int(rng.integers(1, 40))
    owner = rng.integers(0, 2, S).astype(np.int32)
    # few distinct counts, so that ties (broken on the slab index) are common; many free slabs or few
    live = np.where(rng.random(S) < rng.random(), 0, rng.integers(1, min(ups, 4) + 1, S)).astype(np.int32)
    for donor in (0, 1):
        for need in sorted({0, 1, 2, S // 3, S // 2, S, int(rng.integers(0, S + 1))}):
            for eager in (False, True):
                kw = dict(eager=eager, migration_batch=int(rng.integers(1, 20)))
                want = plan_victims(owner.tolist(), live.tolist(), donor, need, ups, **kw)
                got = plan_victims_array(owner, live, donor, need, ups, **kw)
                assert (got is None) == (want is None), (donor, need, kw)
                if want is not None:
                    assert got.tolist() == want, (donor, need, kw)
