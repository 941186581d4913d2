"""The engine's executor (avmp_triton/serve/executor.py) against stand-in model steps: which token
each row feeds a decode step, and how sampled tokens end requests."""
import numpy as np
import torch

from avmp_triton.engine.sampling import SamplingParams
from avmp_triton.engine.scheduler import StepBatch
from avmp_triton.serve.executor import EngineRequest, ModelExecutor

V = 16


class Scripted:
    """Stands in for the model (``forward``) and the decode graphs (``run``): records the tokens it
    is fed and returns logits whose argmax is the next scripted token of each row."""

    def __init__(self, picks):
        self.picks = list(picks)   # per step, the token each row samples
        self.fed = []

    def _logits(self, n):
        logits = torch.zeros(n, V)
        logits[torch.arange(n), torch.tensor(self.picks.pop(0)[:n])] = 1.0
        return logits

    def run(self, rows, tokens, seq_lens, need, release=None):
        self.fed.append(("graph", [int(t) for t in tokens]))
        return self._logits(len(tokens))

    def forward(self, tokens, block_table, ssm_handles, starts):
        self.fed.append(("eager", [t.tolist() for t in tokens]))
        return self._logits(len(tokens))


def request(rid, prompt, max_tokens, stop=(), seen=None):
    return EngineRequest(rid=rid, prompt=prompt, params=SamplingParams(temperature=0.0, max_tokens=max_tokens),
                         arrival=0, stop_ids=frozenset(stop), generator=None,
                         on_token=None if seen is None else (lambda t, rid=rid: seen.append((rid, t))))


class Calls:
    """Stands in for the scheduler's deferred allocator calls: counts how the step ran them."""

    def __init__(self):
        self.taken = self.replayed_ = self.flushed = 0

    def take(self):
        self.taken += 1
        return None, None

    def replayed(self):
        self.replayed_ += 1

    def flush(self):
        self.flushed += 1


def step(ex, ids, q, ctx, sample, calls=None):
    R = len(ids)
    i32 = torch.zeros(R, dtype=torch.int32)
    batch = StepBatch(tick=0, query_lens=i32, context_lens=i32, prefill_mask=torch.zeros(R, dtype=torch.bool),
                      request_ids=np.array(ids), query_lens_host=np.array(q), context_lens_host=np.array(ctx),
                      sample_mask=np.array(sample), device_calls=Calls() if calls is None else calls)
    table = torch.full((R, 4), -1, dtype=torch.int32)
    return ex.step(table, i32, torch.full((R,), -1, dtype=torch.int32), torch.ones(R, dtype=torch.bool), batch)


def test_decode_rows_feed_their_last_token_and_one_token_chunks_their_prompt_token():
    model = Scripted([[7, 0], [8, 0], [9, 0]])
    reqs = [request(0, [1, 2, 3], 8), request(1, [4, 5, 6, 10, 11], 8)]
    ex = ModelExecutor(model, reqs, graphs=model)
    # request 0 prefills whole and samples 7; request 1 runs its first two prompt tokens
    assert step(ex, [0, 1], [3, 2], [3, 2], [True, False]) == []
    # one token each: request 0 decodes its 7, request 1 a one-token chunk of its prompt (6)
    step(ex, [0, 1], [1, 1], [4, 3], [True, False])
    # request 1 again mid-prompt (10), then request 0 alone decodes its 8
    step(ex, [0, 1], [1, 1], [5, 4], [True, False])
    assert model.fed == [("eager", [[1, 2, 3], [4, 5]]), ("graph", [7, 6]), ("graph", [8, 10])]
    ex.finish()
    assert reqs[0].output == [7, 8, 9] and reqs[1].output == []


def test_a_graph_step_takes_the_allocator_calls_and_an_eager_step_flushes_them():
    model = Scripted([[7, 0], [8, 0]])
    ex = ModelExecutor(model, [request(0, [1, 2, 3], 8), request(1, [4, 5], 8)], graphs=model)
    eager, graph = Calls(), Calls()
    step(ex, [0, 1], [3, 2], [3, 2], [True, True], eager)
    step(ex, [0, 1], [1, 1], [4, 3], [True, True], graph)
    assert (eager.flushed, eager.taken) == (1, 0)
    assert (graph.flushed, graph.taken, graph.replayed_) == (0, 1, 1)


def test_sampled_tokens_end_requests_by_stop_token_or_length_in_row_order():
    seen = []
    model = Scripted([[3, 5, 2], [4, 4, 4]])
    reqs = [request("a", [1], 2, seen=seen), request("b", [1], 9, stop=(5, 12), seen=seen),
            request("c", [1, 2], 9, stop=(4,), seen=seen)]
    ex = ModelExecutor(model, reqs, graphs=model)
    assert step(ex, [0, 1, 2], [1, 1, 2], [1, 1, 2], [True, True, True]) == [1]
    assert step(ex, [0, -1, 2], [1, 0, 1], [2, 0, 3], [True, False, True]) == [0, 2]
    assert [r.finish_reason for r in reqs] == ["length", "stop", "stop"]
    ex.finish()
    assert [r.output for r in reqs] == [[3, 4], [5], [2, 4]]
    assert seen == [("a", 3), ("b", 5), ("c", 2), ("a", 4), ("c", 4)]
    assert all(len(r.token_times) == len(r.output) for r in reqs)
