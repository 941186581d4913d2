"""Tensor parallelism (avmp_triton/models/tensor_parallel.py) on the CPU: two processes over gloo,
each serving its shard of a tiny random Nemotron-H, Bamba or Jamba (fp32, ops in Triton's interpreter) through the
LLM engine, generate the tokens of the single-process engine; under memory pressure too (preemption
and AVMP's moves), with the replicated allocators checked equal before every step; each rank's
units are its shard's (the SSM block halves). Also: one rank's shard is a true slice (the two
shards' projections add up to the full one), and the refusals."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_RANK_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from avmp_triton import LLM, SamplingParams
from avmp_triton.models.tensor_parallel import shard_model
from tests.models.test_tensor_parallel import build_model

rank, world = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=world)
full = build_model({family!r})
prompts = [list(range(5, 24)), [30, 31, 32], list(range(40, 47)), [50 + i for i in range(12)]]
greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
kw = dict(memory_gib={memory!r}, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, dtype="float32",
          allocator_kwargs=dict(slab_bytes=65536))
out = {{}}
llm = LLM(shard_model(full, check_replicas=True), **kw)
out["tp"] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
m = llm.last_metrics
out["metrics"] = [m.preemptions, m.migrations, m.completed, bool(m.units_returned_at_drain)]
out["ssm_block"] = llm.allocator.spec.ssm_block_bytes
if rank == 0:
    single = LLM(full, **kw)
    out["single"] = [o.outputs[0].token_ids for o in single.generate(prompts, greedy)]
    out["single_ssm_block"] = single.allocator.spec.ssm_block_bytes
print("RESULT " + json.dumps(out))
dist.destroy_process_group()
"""


def build_model(family: str) -> torch.nn.Module:
    """The same tiny random fp32 model on every rank: Nemotron-H's preset, a Bamba with biases on
    every projection, or a Jamba (Mamba1, a MoE layer) from tests/models' geometries."""
    from avmp_triton.models.loading import random_model
    if family == "nemotron_h":
        return random_model("nemotron-h-tiny", dtype=torch.float32, seed=0, device="cpu").eval()
    import transformers
    from tests.models import parity as P
    torch.manual_seed(0)
    if family == "bamba":
        from tests.models.test_bamba import GEOMETRY
        model = transformers.BambaForCausalLM(transformers.BambaConfig(**GEOMETRY))
    else:   # Jamba with a MoE layer; expand 2, so that d_inner splits with transformers' int expand
        from tests.models.test_jamba import GEOMETRY
        model = transformers.JambaForCausalLM(transformers.JambaConfig(**{**GEOMETRY, "mamba_expand": 2}))
    P.randomize(model.eval(), torch.Generator().manual_seed(0))
    return model


def _ranks(tmp_path, memory: float, family: str, world: int = 2) -> list[dict]:
    script = _RANK_SCRIPT.format(store=str(tmp_path / "store"), memory=memory, family=family)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(world)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for r in range(world)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:]))
    return results


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo ranks on the CPU; the GPU run is NCCL's")
@pytest.mark.parametrize("family, slabs", [("nemotron_h", 3), ("bamba", 2), ("jamba", 2)])
def test_two_ranks_generate_the_single_process_tokens_under_pressure(tmp_path, family, slabs):
    """Slabs of 64 KiB, one of them for SSM blocks: 4 requests of up to 49 tokens need 13 pages, more
    than the rest holds (Nemotron-H's 16 KiB pages, Bamba's and Jamba's 8 KiB), so growth preempts."""
    r0, r1 = _ranks(tmp_path, slabs * 65536 / (1 << 30), family)
    print("preemptions, migrations, completed, drained:", r0["metrics"])
    assert r0["tp"] == r1["tp"] == r0["single"]
    assert r0["metrics"] == r1["metrics"] and r0["metrics"][2] == 4 and r0["metrics"][3]
    assert r0["metrics"][0] > 0, "no preemption under pressure"
    # the Mamba heads split over the ranks, so does the state (the conv channels with them)
    assert r0["ssm_block"] == r1["ssm_block"] < r0["single_ssm_block"]


def test_shards_are_slices_of_the_full_model():
    """With world 2, rank r's in_proj rows and out_proj columns are the full model's: the two ranks'
    out_proj partial products add up to the full product, for the same per-rank inputs."""
    from avmp_triton.models.loading import random_model
    from avmp_triton.models.tensor_parallel import _Cut
    full = random_model("nemotron-h-tiny", dtype=torch.float32, seed=0, device="cpu")
    sd = full.state_dict()
    cuts = [_Cut(full.config, r, 2) for r in range(2)]
    w = sd["model.layers.0.mixer.out_proj.weight"]
    y = torch.randn(3, w.shape[1])
    parts = [c.param("model.layers.0.mixer.out_proj.weight", w) for c in cuts]
    halves = y.split(w.shape[1] // 2, dim=1)
    torch.testing.assert_close(sum(h @ p.T for h, p in zip(halves, parts)), y @ w.T)
    inp = sd["model.layers.0.mixer.in_proj.weight"]
    rows = sorted(tuple(r.tolist()) for c in cuts for r in c.param("model.layers.0.mixer.in_proj.weight", inp))
    assert rows == sorted(tuple(r.tolist()) for r in inp)   # every row on exactly one rank
    emb = [c.param("model.embeddings.weight", sd["model.embeddings.weight"]) for c in cuts]
    assert emb[0].shape == emb[1].shape and torch.equal(torch.cat(emb)[:full.config.vocab_size],
                                                        sd["model.embeddings.weight"])


def test_refusals():
    from avmp_triton.models.loading import random_model
    from avmp_triton.models.tensor_parallel import _Cut, shard_model
    full = random_model("nemotron-h-tiny", dtype=torch.float32, seed=0, device="cpu")
    with pytest.raises(RuntimeError, match="process group"):
        shard_model(full)
    with pytest.raises(ValueError, match="num_attention_heads=2 does not split over 4 ranks"):
        _Cut(full.config, 0, 4)
