"""Sampling parameters and the batched sampler of the engine, with vLLM's meaning for each field.

``SamplingParams`` carries what a vLLM user passes (``temperature``, ``top_p``, ``top_k``, ``seed``,
``max_tokens``, ``ignore_eos``, ``stop_token_ids``); ``sample`` turns a step's fp32 logits into one
token per request. As in vLLM, ``temperature == 0`` is greedy (argmax, top-k/top-p ignored),
``top_k`` of 0 or -1 and ``top_p == 1`` switch those filters off, and a request with a ``seed``
draws from its own generator, so its tokens do not depend on which other requests share its steps.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from avmp_triton._checks import is_int


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request's tokens are drawn and when it stops (vLLM's names and defaults)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite float >= 0, got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if not is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= -1 (0 or -1: off), got {self.top_k!r}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be None or an int, got {self.seed!r}")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        stop = tuple(self.stop_token_ids)
        bad = [s for s in stop if not is_int(s) or s < 0]
        if bad:
            raise ValueError(f"stop_token_ids must be non-negative ints, got {bad[0]!r}")
        object.__setattr__(self, "stop_token_ids", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, V]`` divided by each row's temperature, with the tokens outside its top-k and
    outside its top-p nucleus set to -inf. ``top_k`` <= 0 keeps every token; the nucleus is the
    smallest set of most likely tokens whose probability reaches ``top_p`` (the most likely token
    always stays)."""
    scaled = logits / temperature[:, None]
    V = scaled.shape[1]
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    ordered, order = scaled.sort(dim=1, descending=True)
    rank = torch.arange(V, device=logits.device)[None, :]
    drop = rank >= k[:, None]
    probs = ordered.masked_fill(drop, -math.inf).softmax(dim=1)
    before = probs.cumsum(dim=1) - probs          # probability of the more likely tokens
    drop |= (before >= top_p[:, None]) & (rank > 0)
    ordered = ordered.masked_fill(drop, -math.inf)
    return torch.empty_like(scaled).scatter_(1, order, ordered)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``logits`` ``[B, V]`` (fp32) under ``params[b]``; rows with a generator
    draw from it (seeded requests), the others from torch's default generator. Returns ``[B]`` int64."""
    B = logits.shape[0]
    if len(params) != B or len(generators) != B:
        raise ValueError(f"logits has {B} rows, params {len(params)}, generators {len(generators)}")
    out = logits.argmax(dim=1)
    rows = [b for b, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    dev = logits.device
    # one transfer for the rows and their parameters (top-k and row ids are exact in float64)
    meta = torch.tensor([rows, [params[b].temperature for b in rows], [params[b].top_k for b in rows],
                         [params[b].top_p for b in rows]], dtype=torch.float64).to(dev)
    idx, dt = meta[0].long(), logits.dtype
    probs = filter_logits(logits[idx], meta[1].to(dt), meta[2].long(), meta[3].to(dt)).softmax(dim=1)
    # every row draws from torch's generator in one call; a seeded request then draws again from
    # its own, alone, so its tokens do not depend on its batch
    out[idx] = torch.multinomial(probs, 1).squeeze(1)
    for i, b in enumerate(rows):
        if generators[b] is not None:
            out[b] = torch.multinomial(probs[i], 1, generator=generators[b])[0]
    return out
