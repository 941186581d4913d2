"""What one serving step costs on the GPU, from the step-time model fitted to a recorded run of the
project's kernels (``perf/bench_step.py`` on the GPU, fitted by ``perf/fit_steptime.py`` into
``data/steptime_h200.json``; the JSON names its run, GPU and versions, and holds the fit's error
against whole measured steps).

A step is any mix of decode rows and prefill chunks, as a chunked-prefill engine runs it: every
linear of the model over all the step's tokens, attention and Mamba per layer for what each row
reads and writes, the logits of the rows that sample, plus the allocator's calls and the bytes a
migration copies. The model's dense work comes from measured matmuls at the preset's real shapes,
so a spec the JSON has no curves for is refused, not guessed.
"""
from __future__ import annotations

import functools
import json
from importlib import resources

import numpy as np

__all__ = ["StepTime", "load_step_time", "step_time_model"]

DEFAULT_MODEL = "steptime_h200.json"


@functools.lru_cache(maxsize=4)
def step_time_model(name: str = DEFAULT_MODEL) -> dict:
    """The step-time model JSON shipped in ``avmp_triton/sim/data``."""
    return json.loads(resources.files("avmp_triton.sim").joinpath("data", name).read_text())


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


class _Curve:
    """Piecewise-linear cost in x, continued linearly past the last point."""

    def __init__(self, c: dict):
        self.x = np.asarray(c["x"], dtype=np.float64)
        self.y = np.asarray(c["ms"], dtype=np.float64)
        self.slope = (self.y[-1] - self.y[-2]) / (self.x[-1] - self.x[-2])

    def __call__(self, x: float) -> float:
        if x >= self.x[-1]:
            return float(self.y[-1] + self.slope * (x - self.x[-1]))
        return float(np.interp(x, self.x, self.y))


class StepTime:
    """Seconds per step for one spec (its layer counts, KV bytes per token and SSM state dtype)."""

    def __init__(self, model: dict, spec):
        specs = model["specs"]
        if spec.name not in specs:
            raise ValueError(f"the step-time model has no curves for {spec.name!r}; it covers {sorted(specs)}")
        s = specs[spec.name]
        dtype = _dtype_name(spec.ssm_dtype)
        if dtype not in s["mamba_decode"]:
            raise ValueError(f"the step-time model has no {dtype} SSM state for {spec.name!r}")
        self.source = model["source"]
        self.n_attn, self.n_mamba = spec.num_attn_layers, spec.num_mamba_layers
        self.kv_layer_bytes = spec.kv_bytes_per_token / max(1, spec.num_attn_layers)
        self.dec, self.pre = model["attn_decode"], model["attn_prefill"]
        self.mig, self.alloc = model["migrate"], model["alloc"]
        self.dense, self.lm_head = _Curve(s["dense"]), _Curve(s["lm_head"])
        self.m_dec, self.m_pre = _Curve(s["mamba_decode"][dtype]), s["mamba_prefill"][dtype]

    def step_s(self, n_dec: int, dec_ctx_tokens: int, chunk_tokens: np.ndarray, chunk_prefix: np.ndarray) -> float:
        """One step: ``n_dec`` decode rows reading ``dec_ctx_tokens`` cached tokens in all, and
        prefill chunks of ``chunk_tokens`` new tokens after ``chunk_prefix`` cached ones."""
        n_chunks = len(chunk_tokens)
        new = int(np.sum(chunk_tokens)) if n_chunks else 0
        T = n_dec + new
        if T == 0:
            return 0.0
        ms = self.dense(T) + self.lm_head(n_dec + n_chunks)
        if n_dec:
            d = self.dec
            ms += self.n_attn * (d["a_ms"] + d["ms_per_kv_byte"] * dec_ctx_tokens * self.kv_layer_bytes
                                 + d["ms_per_row"] * n_dec)
            ms += self.n_mamba * self.m_dec(n_dec)
        if n_chunks:
            L = np.asarray(chunk_tokens, dtype=np.float64)
            pairs = float(np.sum(L * np.asarray(chunk_prefix, dtype=np.float64) + L * (L + 1) / 2))
            p, m = self.pre, self.m_pre
            ms += self.n_attn * (p["a_ms"] + p["ms_per_token"] * new + p["ms_per_pair"] * pairs)
            ms += self.n_mamba * (m["a_ms"] + m["ms_per_token"] * new + m["ms_per_chunk"] * n_chunks)
        return ms * 1e-3

    def alloc_s(self, rows: int) -> float:
        """One grow and one release call for ``rows`` rows."""
        return (self.alloc["a_ms"] + self.alloc["ms_per_row"] * rows) * 1e-3

    def migrate_s(self, bytes_moved: int) -> float:
        """A capacity move that copied ``bytes_moved`` bytes of live data (0: nothing to charge)."""
        if bytes_moved <= 0:
            return 0.0
        return (self.mig["a_ms"] + self.mig["ms_per_byte"] * bytes_moved) * 1e-3


def load_step_time(spec, name: str = DEFAULT_MODEL) -> StepTime:
    return StepTime(step_time_model(name), spec)
