"""The scheduler's clock in seconds (with a step-time model): what each step costs, when each request
got its first token and finished, and the latency metrics users read from a serving benchmark."""
from __future__ import annotations

import time

import numpy as np

from avmp_triton.engine.metrics import percentile

__all__ = ["Clock", "StepShape", "WallClock"]


class StepShape:
    """What one step runs: decode rows and the cached tokens they read, and prefill chunks."""
    __slots__ = ("n_dec", "dec_ctx", "chunk_tokens", "chunk_prefix", "alloc_rows", "bytes_moved")

    def __init__(self, n_dec: int, dec_ctx: int, chunk_tokens: np.ndarray, chunk_prefix: np.ndarray,
                 alloc_rows: int, bytes_moved: int):
        self.n_dec, self.dec_ctx = n_dec, dec_ctx
        self.chunk_tokens, self.chunk_prefix = chunk_tokens, chunk_prefix
        self.alloc_rows, self.bytes_moved = alloc_rows, bytes_moved


class Clock:
    """Seconds since the run began; every step advances it by the step-time model's cost."""

    def __init__(self, step_time, n: int):
        self.st = step_time
        self.now = 0.0
        self.first_token = np.full(n, -1.0)
        self.finish = np.full(n, -1.0)
        self.compute_s = self.alloc_s = self.migrate_s = 0.0

    @property
    def source(self):
        return self.st.source.get("run")

    def idle_until(self, t: float) -> None:
        """Nothing to run: the engine waits for the next arrival."""
        self.now = max(self.now, float(t))

    def advance(self, s: StepShape) -> None:
        step = self.st.step_s(s.n_dec, s.dec_ctx, s.chunk_tokens, s.chunk_prefix)
        alloc = self.st.alloc_s(s.alloc_rows) if s.alloc_rows else 0.0
        move = self.st.migrate_s(s.bytes_moved)
        self.compute_s += step
        self.alloc_s += alloc
        self.migrate_s += move
        self.now += step + alloc + move

    def sampled(self, reqs: np.ndarray) -> None:
        """Requests that got a token at the end of this step (the first one sets TTFT)."""
        first = reqs[self.first_token[reqs] < 0]
        self.first_token[first] = self.now

    def finished(self, reqs: np.ndarray) -> None:
        self.finish[reqs] = self.now

    def metrics(self, arrival: np.ndarray, output: np.ndarray, generated: int, slo: tuple[float, float]) -> dict:
        """Throughput over the run (first arrival to last finish, as ``vllm bench serve`` times its
        duration), per-request TTFT and TPOT, and goodput: requests meeting both SLOs per second."""
        done = self.finish >= 0
        span = self.now if self.now > 0 else float("nan")
        ttft = (self.first_token - arrival)[done]
        multi = done & (output > 1)
        tpot = ((self.finish - self.first_token) / np.maximum(output - 1, 1))[multi]
        tpot_all = np.zeros(len(output))
        tpot_all[multi] = (self.finish - self.first_token)[multi] / (output[multi] - 1)
        good = done & (self.first_token - arrival <= slo[0]) & (tpot_all <= slo[1])
        return dict(
            makespan_s=self.now, output_tokens_per_s=generated / span, requests_per_s=int(done.sum()) / span,
            ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
            tpot_p50_s=percentile(tpot, 50), tpot_p99_s=percentile(tpot, 99),
            goodput_requests_per_s=int(good.sum()) / span, slo_ttft_s=slo[0], slo_tpot_s=slo[1],
            compute_s=self.compute_s, alloc_s=self.alloc_s, migrate_s=self.migrate_s)


class WallClock(Clock):
    """The clock of a real engine: seconds of wall time since the run began. A step costs what it
    took (model, sampling, scheduling and allocator calls together, all in ``compute_s``), and an
    idle engine sleeps until the next arrival, as a serving benchmark's client makes it wait."""

    def __init__(self, n: int):
        super().__init__(None, n)
        self.t0 = time.perf_counter()

    @property
    def source(self):
        return "wall clock"

    def _elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def idle_until(self, t: float) -> None:
        wait = float(t) - self._elapsed()
        if wait > 0:
            time.sleep(wait)
        self.now = max(self.now, self._elapsed())

    def advance(self, s: StepShape) -> None:
        now = self._elapsed()
        self.compute_s += now - self.now
        self.now = now
