"""CUDA-graph decode (avmp_triton/serve/graphs.py): the buckets, the refusals, and on the GPU the
captured engine against the eager one (identical tokens, no host sync in a replay) and a long run
of thousands of requests through a small arena that drains with every unit back. Off the GPU the
same fixed-shape step runs uncaptured; tests/serve/test_llm.py checks its tokens against
transformers' and tests/models/ its logits and arena writes, family by family."""
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from avmp_triton.engine.sampling import SamplingParams  # noqa: E402
from avmp_triton.models.jamba import JambaRunner  # noqa: E402
from avmp_triton.models.loading import random_model  # noqa: E402
from avmp_triton.serve import LLM  # noqa: E402
from avmp_triton.serve.graphs import DecodeGraphs, buckets  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture(scope="module")
def model():
    return random_model("nemotron-h-tiny", dtype=torch.float32, seed=0, device=DEV).eval()


def test_buckets_are_vllms_capture_sizes():
    assert buckets(1) == [1]
    assert buckets(6) == [1, 2, 4, 6]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(30) == [1, 2, 4, 8, 16, 24, 30]
    assert buckets(256)[-3:] == [240, 248, 256] and len(buckets(256)) == 35


def test_shapes_past_the_captured_ones_are_refused(model):
    llm = LLM(model, memory_gib=0.01, max_num_seqs=4, max_model_len=64, dtype="float32")
    g = llm.graphs
    assert g.buckets == [1, 2, 4] and g.width == 4
    with pytest.raises(ValueError, match="5 rows exceed the largest captured batch 4"):
        g.bucket(5)
    assert g.tables is llm.tables and llm.tables.W == 4   # ceil(63 / 16) pages: the longest request


def test_a_moe_family_runs_eagerly_with_a_warning():
    """Jamba's MoE routing reads the chosen experts on the host: no graph, and the LLM says so."""
    from tests.models.test_jamba import GEOMETRY
    hf = transformers.JambaForCausalLM(transformers.JambaConfig(**GEOMETRY)).eval().to(DEV)
    with pytest.warns(UserWarning, match="jamba: the MoE routing reads the chosen experts on the host"):
        llm = LLM(hf, memory_gib=0.01, max_num_seqs=2, max_model_len=64)
    assert llm.graphs is None and not llm.cuda_graphs
    runner = JambaRunner.from_transformers(hf, allocator=llm.allocator, max_requests=2, max_context=64)
    with pytest.raises(ValueError, match="JambaRunner's decode step reads the device on the host"):
        DecodeGraphs(runner, llm.tables)


PROMPTS = [list(range(3, 3 + n)) for n in (5, 17, 9, 30, 2, 12, 21)]


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphs_and_eager_generate_identical_tokens(dtype):
    model = random_model("nemotron-h-tiny", dtype=getattr(torch, dtype), seed=0, device="cuda").eval()
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    kw = dict(memory_gib=0.05, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128)
    eager = LLM(model, enforce_eager=True, **kw)
    graphs = LLM(model, **kw)
    assert graphs.cuda_graphs and not eager.cuda_graphs
    want = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, sp, arrivals=list(range(7)))]
    got = [o.outputs[0].token_ids for o in graphs.generate(PROMPTS, sp, arrivals=list(range(7)))]
    assert got == want
    assert graphs.last_graph_steps > 0 and eager.last_graph_steps == 0


@gpu
def test_a_replay_makes_no_host_sync():
    """A replay grows a row's pages on the device (its allocator call is inside the graph), gathers
    the rows and runs the model without a host sync."""
    model = random_model("nemotron-h-tiny", dtype=torch.bfloat16, seed=0, device="cuda").eval()
    llm = LLM(model, memory_gib=0.05, max_num_seqs=4, max_model_len=64)
    g, a, t = llm.graphs, llm.allocator, llm.tables
    t.ssm_handles[:3] = a.alloc_ssm(3)
    t.block_table[:3, 0] = a.alloc_kv(3)
    t.num_pages[:3] = 1
    torch.cuda.synchronize()
    need = np.array([0, 1, 0, 0])
    torch.cuda.set_sync_debug_mode("error")
    try:
        g.run(np.array([0, 1, 2]), np.array([5, 6, 7]), np.array([3, 17, 3]), need)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert g.replays == 1
    assert t.num_pages.tolist() == [1, 2, 1, 0] and int(t.block_table[1, 1]) >= 0


@gpu
def test_a_decode_tick_waits_on_the_device_once():
    """All requests admitted in the first tick, then decode ticks only: the allocator's counts ride
    on each step's sampled-token read, so the only syncs the scheduler counts are its two first
    reads (the run's setup, the first tick), the admission's SSM alloc and the drain's final check."""
    model = random_model("nemotron-h-tiny", dtype=torch.bfloat16, seed=0, device="cuda").eval()
    llm = LLM(model, memory_gib=0.05, max_num_seqs=4, max_model_len=128)
    llm.generate([[1, 2, 3]] * 4, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    m = llm.last_metrics
    assert m.makespan_ticks == 40 and llm.last_graph_steps == 39
    assert round(m.host_syncs_per_step * m.makespan_ticks) == 4


@gpu
def test_a_decode_tick_syncs_only_for_its_sampled_tokens():
    """torch's sync debug mode warns at every call that waits for the stream (a copy from pageable
    memory does): 40 more decode ticks may add at most one such wait each, the sampled tokens'."""
    model = random_model("nemotron-h-tiny", dtype=torch.bfloat16, seed=0, device="cuda").eval()
    llm = LLM(model, memory_gib=0.05, max_num_seqs=4, max_model_len=128)

    def waits(n: int) -> int:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                llm.generate([[1, 2, 3]] * 4, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(w.message) for w in caught)

    short, long = waits(20), waits(60)
    assert long - short == 40, (short, long)


@gpu
def test_a_long_run_through_a_small_arena_drains():
    """3000 requests through room for a few dozen at once: preemptions and AVMP moves along the
    way, and at the end every page and block is back in its pool."""
    model = random_model("nemotron-h-tiny", dtype=torch.bfloat16, seed=0, device="cuda").eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, int(n)).tolist() for n in rng.integers(1, 60, 3000)]
    params = [SamplingParams(temperature=0.0, max_tokens=int(n), ignore_eos=True) for n in rng.integers(1, 40, 3000)]
    llm = LLM(model, memory_gib=24 * 65536 / (1 << 30), max_num_seqs=64, max_model_len=128,
              allocator_kwargs={"slab_bytes": 65536})
    outs = llm.generate(prompts, params)
    m = llm.last_metrics
    print(f"{m.completed} completed, {m.preemptions} preemptions, {m.migrations} migrations, "
          f"{llm.last_graph_steps}/{llm.last_steps} steps through graphs")
    assert m.completed == 3000 and m.unservable == 0 and m.units_returned_at_drain
    assert m.preemptions > 0 and llm.last_graph_steps > 0
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
