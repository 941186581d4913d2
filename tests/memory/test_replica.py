"""Replicated allocators (avmp_triton/memory/replica.py): the decision-state digest is equal for equal
histories, also between tensor-parallel shards whose units differ only in bytes, and differs after
one extra call; two processes over gloo, each running the scheduler with its own allocator through
preemptions and migrations with compaction, agree after every tick, and a rank that made one call
the others did not is named on every rank."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from avmp_triton import AVMPAllocator, HybridModelSpec, PaddedUnifiedAllocator
from avmp_triton.memory.replica import state_digest

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PT = 4


def spec(tp: int) -> HybridModelSpec:
    """One rank's shard of a tiny hybrid model at tensor-parallel degree ``tp`` (heads and channels
    split, as vLLM shards them)."""
    return HybridModelSpec(name=f"tiny-tp{tp}", num_attn_layers=1, num_kv_heads=4 // tp, head_dim=4,
                           kv_dtype=torch.float32, num_mamba_layers=1, mamba_version=1, d_inner=32 // tp,
                           d_state=4, conv_dtype=torch.float32, ssm_dtype=torch.float32)


def make(tp: int, cls=AVMPAllocator, slabs: int = 8):
    slab = 2048 // tp
    return cls(spec(tp), slabs * slab, device=DEVICE, slab_bytes=slab, page_tokens=PT)


def history(alloc, extra: bool = False) -> list:
    """Allocations and frees of both kinds leaving one live SSM block in every SSM slab, then a KV
    demand that takes an SSM slab (AVMP compacts a live block out of it first)."""
    kv = [alloc.alloc_kv(3), alloc.alloc_kv(5)]
    ssm = alloc.alloc_ssm(int(alloc.free_counts[1]) if len(alloc.pool_names) == 2 else 4)
    alloc.free(kv[0])
    alloc.free(ssm[::2])
    if extra:
        alloc.alloc_kv(1)
    if len(alloc.pool_names) == 2:
        kv.append(alloc.alloc_kv(int(alloc.free_counts[0]) + alloc.units_per_slab[0]))
    return kv + [ssm]


@pytest.mark.parametrize("cls", [AVMPAllocator, PaddedUnifiedAllocator])
def test_equal_histories_equal_digests_across_shard_sizes(cls):
    a, b = make(1, cls), make(2, cls)
    assert a.units_per_slab == b.units_per_slab and a.unit_bytes != b.unit_bytes   # the shard premise
    ha, hb = history(a), history(b)
    assert all(torch.equal(x, y) for x, y in zip(ha, hb))
    if cls is AVMPAllocator:
        assert a.migrations == b.migrations > 0 and a.bytes_copied == 2 * b.bytes_copied > 0
    assert torch.equal(state_digest(a.decision_state()), state_digest(b.decision_state()))


def test_one_extra_call_changes_the_digest():
    a, b = make(1), make(1)
    history(a)
    history(b, extra=True)
    assert not torch.equal(state_digest(a.decision_state()), state_digest(b.decision_state()))
    c = make(1)
    history(c)
    two = c.alloc_kv(2)
    c.free(two[:1])
    c.free(two[1:])   # the same free counts as a, but two handles back in the other order
    assert not torch.equal(state_digest(a.decision_state()), state_digest(c.decision_state()))


def test_digest_is_positional_and_checks_input():
    t = torch.tensor([1, 2, 3])
    assert not torch.equal(state_digest([t]), state_digest([t.flip(0)]))
    assert torch.equal(state_digest([t, t]), state_digest([torch.cat([t, t])]))
    with pytest.raises(ValueError, match="at least one tensor"):
        state_digest([])


def test_check_needs_a_process_group():
    from avmp_triton.memory.replica import assert_replicas_agree
    with pytest.raises(RuntimeError, match="process group"):
        assert_replicas_agree(make(1))


_RANK_SCRIPT = """
import sys
import numpy as np
import torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_replica import make
from avmp_triton.engine.scheduler import Scheduler
from avmp_triton.memory.replica import ReplicaDivergenceError, assert_replicas_agree
from avmp_triton.sim.workloads import Request

rank, diverge = int(sys.argv[1]), sys.argv[2] == "1"
dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=2)
alloc = make(rank + 1, slabs=4)        # rank 0 holds units twice the bytes of rank 1's

class Check:
    ticks = 0
    def step(self, block_table, num_pages, ssm_handles, running_mask, batch):
        assert_replicas_agree(alloc, block_table, num_pages, ssm_handles, what=f"at tick {{self.ticks}}")
        self.ticks += 1

if diverge and rank == 1:
    alloc.alloc_kv(1)   # a call rank 0 does not make
rng = np.random.default_rng(3)
trace = [Request(i, float(i // 4), int(rng.integers(1, 10)), int(rng.integers(1, 20))) for i in range(40)]
check = Check()
try:
    m = Scheduler(alloc, backend="device", max_running=12, max_num_batched_tokens=12, model_runner=check).run(trace)
    assert_replicas_agree(alloc, what="after the run")
    print("agreed", check.ticks, m.completed, m.preemptions, m.migrations, m.bytes_moved)
except ReplicaDivergenceError as e:
    print("diverged", e)
dist.destroy_process_group()
"""


def _two_ranks(tmp_path, diverge: bool) -> list[str]:
    script = _RANK_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), store=str(tmp_path / "store"))
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1" if DEVICE == "cpu" else "0"),
               CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(int(diverge))], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(out.strip().splitlines()[-1])
    return outs


def test_two_ranks_agree_through_preemption_and_compaction(tmp_path):
    outs = _two_ranks(tmp_path, diverge=False)
    fields = [o.split() for o in outs]
    assert all(f[0] == "agreed" for f in fields), outs
    ticks, completed, preemptions, migrations, moved = (int(x) for x in fields[0][1:])
    assert ticks > 20 and completed == 40 and preemptions > 0 and migrations > 0
    # the same decisions on both ranks; rank 1's units are half the bytes
    assert fields[1][1:5] == fields[0][1:5] and int(fields[1][5]) * 2 == moved > 0


def test_a_diverged_rank_is_reported_on_every_rank(tmp_path):
    outs = _two_ranks(tmp_path, diverge=True)
    assert all(o.startswith("diverged rank ") and "at tick 0" in o for o in outs), outs
    assert {o.split()[2] for o in outs} == {"0:", "1:"}
