"""The engine's model runner: what the scheduler calls each tick, turned into one packed model step
and one batched sampling call.

The scheduler owns the rows (block tables, page counts, SSM handles) and decides each row's tokens;
``ModelExecutor`` owns the requests' token ids and sampling state. Row r runs its request's tokens
``[context - query, context)`` (prompt first, then the generated tokens, so a recomputed request
simply prefills both again), the rows that finish a prefill or decode sample one token each, and
requests that sample a stop token are handed back to the scheduler to finish early.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from avmp_triton.engine.sampling import SamplingParams, sample


@dataclasses.dataclass
class EngineRequest:
    """One request's tokens and timings as the engine runs it."""
    rid: object
    prompt: list[int]
    params: SamplingParams
    arrival: float                     # tick (scheduler time) the request arrives at
    stop_ids: frozenset                # token ids that end it (EOS unless ignore_eos, stop_token_ids)
    generator: torch.Generator | None
    start_s: float = 0.0               # wall time the request arrived (steps: the engine started), for TTFT
    on_token: object = None            # called with each sampled token id
    output: list[int] = dataclasses.field(default_factory=list)
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None

    # the scheduler's request protocol
    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def output_tokens(self) -> int:
        return self.params.max_tokens

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end) of prompt + output."""
        p = len(self.prompt)
        return self.prompt[start:min(end, p)] + self.output[max(start - p, 0):max(end - p, 0)]

    def append(self, token: int, now: float) -> bool:
        """Records a sampled token; True when it ends the request."""
        self.output.append(token)
        self.token_times.append(now)
        if self.on_token is not None:
            self.on_token(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.output) >= self.params.max_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None


class ModelExecutor:
    """The scheduler's ``ModelRunner`` over a ``HybridRunner`` and the run's requests (the list
    the scheduler replays, in the same order: the scheduler names requests by their index).
    With ``graphs`` (a ``DecodeGraphs``), decode-only steps run through it; steps with a prefill
    chunk run eagerly."""

    def __init__(self, runner, requests: list[EngineRequest], graphs=None):
        self.runner, self.requests, self.graphs = runner, requests, graphs
        self.steps = self.graph_steps = 0
        # host wall time of the graph and eager steps, sampling's sync included (so a step's device
        # work is inside; a prefill chunk that samples nothing is not waited for, and its device
        # time lands in the next step's); the scheduler's share is the run's wall time minus these
        self.graph_s = self.eager_s = 0.0

    def step(self, block_table, num_pages, ssm_handles, running_mask, batch) -> list[int]:
        rows = np.flatnonzero(batch.query_lens_host > 0)
        if not rows.size:
            return []
        ids = batch.request_ids[rows]
        q, ctx = batch.query_lens_host[rows], batch.context_lens_host[rows]
        reqs = [self.requests[i] for i in ids]
        idx = torch.as_tensor(rows, device=block_table.device)
        t0 = time.perf_counter()
        graphed = False
        if self.graphs is not None and bool(np.all((q == 1) & (ctx > 1))):
            # a decode-only step: every row adds one token to a non-empty cache
            last = [r.tokens(int(c) - 1, int(c))[0] for r, c in zip(reqs, ctx)]
            logits = self.graphs.run(idx, last, ctx, block_table, ssm_handles)
            self.graph_steps += 1
            graphed = True
        else:
            toks = [torch.tensor(r.tokens(int(c - n), int(c)), dtype=torch.long) for r, c, n in zip(reqs, ctx, q)]
            logits = self.runner.forward(toks, block_table[idx], ssm_handles[idx], (ctx - q).tolist())
        self.steps += 1
        pick = np.flatnonzero(batch.sample_mask[rows])
        new = []
        if pick.size:
            chosen = [reqs[i] for i in pick]
            new = sample(logits[torch.as_tensor(pick, device=logits.device)], [r.params for r in chosen],
                         [r.generator for r in chosen]).tolist()   # the step's one host sync
        now = time.perf_counter()
        if graphed:
            self.graph_s += now - t0
        else:
            self.eager_s += now - t0
        if not pick.size:
            return []
        return [int(ids[i]) for i, r, t in zip(pick, chosen, new) if r.append(t, now)]
