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
    # filled by ``ModelExecutor.finish`` at the end of a run (the executor keeps them in arrays)
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


class ModelExecutor:
    """The scheduler's ``ModelRunner`` over a ``HybridRunner`` and the run's requests (the list
    the scheduler replays, in the same order: the scheduler names requests by their index).
    With ``graphs`` (a ``DecodeGraphs`` over the scheduler's ``DeviceTables``), decode-only steps
    run through it, the tick's deferred allocator calls inside; steps with a prefill chunk run
    eagerly, after those calls."""

    takes_device_calls = True   # the scheduler defers its allocator calls to the step (see ModelRunner)

    def __init__(self, runner, requests: list[EngineRequest], graphs=None):
        self.runner, self.requests, self.graphs = runner, requests, graphs
        self.steps = self.graph_steps = 0
        # host wall time of the graph and eager steps, sampling's sync included (so a step's device
        # work is inside; a prefill chunk that samples nothing is not waited for, and its device
        # time lands in the next step's); the scheduler's share is the run's wall time minus these
        self.graph_s = self.eager_s = 0.0
        # per request: what it generated and when (row i, in order; a step writes its rows' tokens
        # at once instead of appending to every request's lists), its length so far (prompt +
        # output) and its last token, so that a decode step gathers its rows' input tokens at once
        n, most = len(requests), max((r.params.max_tokens for r in requests), default=0)
        self._gen = np.zeros((n, most), dtype=np.int64)
        self._gen_s = np.zeros((n, most), dtype=np.float64)
        self._prompt = np.array([len(r.prompt) for r in requests], dtype=np.int64)
        self._length = self._prompt.copy()
        self._last = np.array([r.prompt[-1] for r in requests], dtype=np.int64)
        self._streamed = np.array([r.on_token is not None for r in requests], dtype=bool)
        # and what ends it: its length at max_tokens, its stop ids (-1 padded: no token is -1)
        self._end = np.array([len(r.prompt) + r.params.max_tokens for r in requests], dtype=np.int64)
        self._stops = np.full((len(requests), max((len(r.stop_ids) for r in requests), default=0) or 1), -1,
                              dtype=np.int64)
        for i, r in enumerate(requests):
            self._stops[i, :len(r.stop_ids)] = sorted(r.stop_ids)
        self._rows = _RowsCache()

    def step(self, block_table, num_pages, ssm_handles, running_mask, batch) -> list[int]:
        rows = np.flatnonzero(batch.query_lens_host > 0)
        if not rows.size:
            return []
        ids = batch.request_ids[rows]
        q, ctx = batch.query_lens_host[rows], batch.context_lens_host[rows]
        rc = self._rows.get(rows, ids, self.requests)
        t0 = time.perf_counter()
        graphed = False
        calls = batch.device_calls
        if self.graphs is not None and calls is not None and bool(np.all((q == 1) & (ctx > 1))):
            # a decode-only step (every row adds one token to a non-empty cache): the graph makes
            # the tick's allocator calls too
            release, need = calls.take()
            logits = self.graphs.run(rows, self._input_tokens(ids, ctx), ctx, need, release)
            calls.replayed()
            self.graph_steps += 1
            graphed = True
        else:
            if calls is not None:
                calls.flush()
            toks = [torch.tensor(self._tokens(i, int(c - n), int(c)), dtype=torch.long)
                    for i, c, n in zip(ids.tolist(), ctx, q)]
            idx = torch.as_tensor(rows, device=block_table.device)
            logits = self.runner.forward(toks, block_table[idx], ssm_handles[idx], (ctx - q).tolist())
        self.steps += 1
        pick = np.flatnonzero(batch.sample_mask[rows])
        new = []
        if pick.size == rows.size:   # every row samples (a decode step): no gather of the logits
            chosen = rc.reqs
            new = sample(logits, rc.params, rc.generators).tolist()   # the step's one host sync
        elif pick.size:
            chosen = [rc.reqs[i] for i in pick]
            new = sample(logits[torch.as_tensor(pick, device=logits.device)], [r.params for r in chosen],
                         [r.generator for r in chosen]).tolist()
        now = time.perf_counter()
        if graphed:
            self.graph_s += now - t0
        else:
            self.eager_s += now - t0
        if not pick.size:
            return []
        return self._record(ids[pick], chosen, new, now)

    def finish(self) -> None:
        """Each request's output tokens and their times into its lists (at the end of a run)."""
        for i, r in enumerate(self.requests):
            k = int(self._length[i] - self._prompt[i])
            r.output = self._gen[i, :k].tolist()
            r.token_times = self._gen_s[i, :k].tolist()

    def _tokens(self, i: int, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end) of request i's prompt + output so far."""
        prompt = self.requests[i].prompt
        p = len(prompt)
        return prompt[start:min(end, p)] + self._gen[i, max(start - p, 0):max(end - p, 0)].tolist()

    def _record(self, ids: np.ndarray, reqs: list[EngineRequest], tokens: list[int], now: float) -> list[int]:
        """Records each request's sampled token (in row order, with its ``on_token`` call); returns
        the requests that end with it: a stop token ("stop"), else max_tokens reached ("length")."""
        k = self._length[ids] - self._prompt[ids]
        self._gen[ids, k] = tokens
        self._gen_s[ids, k] = now
        for j in np.flatnonzero(self._streamed[ids]).tolist():
            reqs[j].on_token(tokens[j])
        self._length[ids] += 1
        self._last[ids] = tokens
        stop = (self._stops[ids] == self._last[ids][:, None]).any(1)
        ended = stop | (self._length[ids] >= self._end[ids])
        for j in np.flatnonzero(ended).tolist():
            reqs[j].finish_reason = "stop" if stop[j] else "length"
        return ids[ended].tolist()

    def _input_tokens(self, ids: np.ndarray, ctx: np.ndarray) -> np.ndarray:
        """The token at position ``ctx - 1`` of each row's request: its last token, except in a
        one-token prefill chunk that is not the prompt's last."""
        tokens = self._last[ids]
        for j in np.flatnonzero(self._length[ids] != ctx).tolist():
            tokens[j] = self._tokens(int(ids[j]), int(ctx[j]) - 1, int(ctx[j]))[0]
        return tokens


class _RowsCache:
    """What a step derives from its rows and their requests (the requests and their sampling
    arguments), kept while the rows hold the same requests: steady decode steps then build no
    per-request list for it. (A decode graph gathers its rows on the device itself.)"""

    def __init__(self):
        self.rows = self.ids = self.reqs = self.params = self.generators = None

    def get(self, rows: np.ndarray, ids: np.ndarray, requests: list[EngineRequest]) -> "_RowsCache":
        if not (np.array_equal(rows, self.rows) and np.array_equal(ids, self.ids)):
            self.rows, self.ids = rows, ids
            self.reqs = [requests[i] for i in ids.tolist()]
            self.params = [r.params for r in self.reqs]
            self.generators = [r.generator for r in self.reqs]
        return self
