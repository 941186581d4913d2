"""Request workloads for the scheduler experiments: the AVMP paper's three synthetic workloads, with
its parameters, plus a real trace (ShareGPT V3).

Every generator is seeded (``numpy.random.Generator(PCG64(seed))``) and deterministic: the same
(name, seed, num_requests) always gives the same list. Time is counted in decode ticks; a request's
``arrival`` is the tick at which it enters the admission queue. Ranges written U[a, b] are
inclusive integer uniforms.

* ``uniform_short``: 512 requests, prompt U[128, 1024], output U[64, 256], one arrival per tick
  (request i arrives at tick i).
* ``mixed_long``: 256 requests; each prompt is long with probability 0.2, U[16384, 65536], else
  U[512, 4096]; output U[128, 512]. The paper names no arrival process for it; here it is one
  arrival per tick, as for uniform_short.
* ``agentic_burst``: 256 requests; prompt lognormal(mu=8.5, sigma=1.0) rounded to the nearest
  integer and clipped to [64, 65536]; output U[64, 256]; Poisson arrivals with mean inter-arrival
  gap 0.1 tick: arrival ticks are floor(cumulative sum of Exponential(0.1) gaps), so about ten
  requests land on each tick.
* ``sharegpt``: ``num_requests`` (default 512) conversations drawn without replacement, with the
  seeded RNG, from ``avmp_triton/sim/data/sharegpt_lengths.csv``; that table holds the token lengths of
  real ShareGPT V3 conversations (prompt = first human turn, output = the reply to it; counted with
  the SentencePiece tokenizer of ``mistral-common``; filtered as vLLM's benchmark_serving does:
  prompt and output >= 4 tokens, prompt <= 1024, prompt + output <= 2048). It is derived by
  ``scripts/derive_sharegpt_lengths.py``; its provenance is in ``sharegpt_lengths.json`` beside it.
  One arrival per tick, as for uniform_short, so that the trace's lengths, not its arrival process,
  are what differs from the synthetic workloads.

Nothing here needs the dataset or tokenizer packages at run time.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import numbers
from importlib import resources

import numpy as np

__all__ = ["Request", "WORKLOADS", "make_workload", "sharegpt_table", "sharegpt_metadata",
           "sharegpt_multiturn_table"]


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    rid: int             # 0..n-1 in arrival order
    arrival: int         # decode tick at which it arrives (non-decreasing in rid)
    prompt_tokens: int   # >= 1
    output_tokens: int   # >= 1


WORKLOADS: tuple[str, ...] = ("uniform_short", "mixed_long", "agentic_burst", "sharegpt")

DEFAULT_COUNTS = {"uniform_short": 512, "mixed_long": 256, "agentic_burst": 256, "sharegpt": 512}

# the paper's parameters
MIXED_LONG_FRACTION = 0.2
LONG_PROMPT = (16384, 65536)
SHORT_PROMPT = (512, 4096)
AGENTIC_MU, AGENTIC_SIGMA = 8.5, 1.0
AGENTIC_CLIP = (64, 65536)
AGENTIC_MEAN_GAP = 0.1

_DATA_CSV = "sharegpt_lengths.csv"
_DATA_JSON = "sharegpt_lengths.json"
_MULTITURN_CSV = "sharegpt_multiturn.csv"
_MULTITURN_HEADER = "conversation,turn,prompt_tokens,output_tokens"


def _uniform(rng: np.random.Generator, lo: int, hi: int, n: int) -> np.ndarray:
    return rng.integers(lo, hi, size=n, endpoint=True)


@functools.lru_cache(maxsize=1)
def sharegpt_table() -> tuple[np.ndarray, np.ndarray]:
    """(prompt_tokens, output_tokens) of every row of the committed ShareGPT table, int64, read-only."""
    text = resources.files("avmp_triton.sim").joinpath("data", _DATA_CSV).read_text()
    lines = text.splitlines()
    if not lines or lines[0].strip() != "prompt_tokens,output_tokens":
        raise RuntimeError(f"{_DATA_CSV}: unexpected header {lines[:1]!r}")
    arr = np.array([[int(v) for v in ln.split(",")] for ln in lines[1:] if ln.strip()], dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) == 0:
        raise RuntimeError(f"{_DATA_CSV}: expected rows of two integers")
    prompt, output = arr[:, 0].copy(), arr[:, 1].copy()
    prompt.flags.writeable = False
    output.flags.writeable = False
    return prompt, output


@functools.lru_cache(maxsize=1)
def sharegpt_multiturn_table() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(conversation, turn, prompt_tokens, output_tokens) of every row of the committed multi-turn
    ShareGPT table, int64, read-only.

    One row per turn, in conversation then turn order; a turn's prompt is the whole conversation
    before it plus its human message (see ``sharegpt_metadata()["multiturn"]``).
    """
    text = resources.files("avmp_triton.sim").joinpath("data", _MULTITURN_CSV).read_text()
    lines = text.splitlines()
    if not lines or lines[0].strip() != _MULTITURN_HEADER:
        raise RuntimeError(f"{_MULTITURN_CSV}: unexpected header {lines[:1]!r}")
    arr = np.array([[int(v) for v in ln.split(",")] for ln in lines[1:] if ln.strip()], dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 4 or len(arr) == 0:
        raise RuntimeError(f"{_MULTITURN_CSV}: expected rows of four integers")
    cols = tuple(arr[:, j].copy() for j in range(4))
    for c in cols:
        c.flags.writeable = False
    return cols


def sharegpt_metadata() -> dict:
    """Provenance of the ShareGPT table (package versions, tokenizer, filter rules, counts)."""
    return json.loads(resources.files("avmp_triton.sim").joinpath("data", _DATA_JSON).read_text())


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def make_workload(name: str, seed: int, *, num_requests: int | None = None) -> list[Request]:
    """The requests of workload ``name`` for ``seed``, in arrival order.

    ``num_requests`` overrides the workload's default count (512, 256, 256, 512 for the names in
    ``WORKLOADS`` order); for ``sharegpt`` it may not exceed the table's rows (rows are drawn
    without replacement).
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; valid names: {', '.join(WORKLOADS)}")
    seed = _check_int("seed", seed, 0)
    n = DEFAULT_COUNTS[name] if num_requests is None else _check_int("num_requests", num_requests, 1)
    rng = np.random.Generator(np.random.PCG64(seed))

    if name == "uniform_short":
        prompt = _uniform(rng, 128, 1024, n)
        output = _uniform(rng, 64, 256, n)
        arrival = np.arange(n, dtype=np.int64)
    elif name == "mixed_long":
        is_long = rng.random(n) < MIXED_LONG_FRACTION
        long_p = _uniform(rng, *LONG_PROMPT, n)
        short_p = _uniform(rng, *SHORT_PROMPT, n)
        prompt = np.where(is_long, long_p, short_p)
        output = _uniform(rng, 128, 512, n)
        arrival = np.arange(n, dtype=np.int64)
    elif name == "agentic_burst":
        raw = rng.lognormal(AGENTIC_MU, AGENTIC_SIGMA, n)
        prompt = np.clip(np.rint(raw), *AGENTIC_CLIP).astype(np.int64)
        output = _uniform(rng, 64, 256, n)
        gaps = rng.exponential(AGENTIC_MEAN_GAP, n)
        arrival = np.floor(np.cumsum(gaps)).astype(np.int64)
    else:  # sharegpt
        table_p, table_o = sharegpt_table()
        if n > len(table_p):
            raise ValueError(f"num_requests={n} exceeds the {len(table_p)} rows of the ShareGPT table "
                             "(rows are drawn without replacement)")
        idx = rng.choice(len(table_p), size=n, replace=False)
        prompt, output = table_p[idx], table_o[idx]
        arrival = np.arange(n, dtype=np.int64)

    return [Request(rid=i, arrival=int(a), prompt_tokens=int(p), output_tokens=int(o))
            for i, (a, p, o) in enumerate(zip(arrival.tolist(), prompt.tolist(), output.tolist()))]
