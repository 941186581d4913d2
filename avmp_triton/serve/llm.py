"""``LLM``: generation with continuous batching over one arena, driven the way vLLM's ``LLM`` is.

    llm = LLM("path/to/checkpoint" | "nemotron-h-tiny" | hf_model, allocator="avmp", memory_gib=2)
    outs = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_tokens=8))

The model's runner (``avmp_triton.models``) computes every step; the scheduler
(``avmp_triton.engine.scheduler``, the one the simulator drives) decides each step's rows: chunked
prefill under ``max_num_batched_tokens`` beside the decode rows, admission when a request's pages
and SSM block fit, growth of the pages, preemption with recompute when growth fails (after AVMP
moves capacity), and release of finished requests in one batched call. The allocator is chosen by
name among the simulator's variants (``avmp``, ``sglang_static``, ``static_tuned``), each sized the
way its engine sizes its pools (``avmp_triton/sim/sweep.py``).

Decode-only steps run through CUDA graphs captured per batch-size bucket (``serve/graphs.py``)
unless ``enforce_eager``; steps with a prefill chunk run eagerly.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
import warnings
from typing import Sequence

import torch

from avmp_triton._checks import is_int
from avmp_triton.engine.sampling import SamplingParams
from avmp_triton.engine.backends import DeviceTables
from avmp_triton.engine.scheduler import Scheduler
from avmp_triton.models.loading import MODEL_PRESETS, RUNNERS, as_dtype, load_checkpoint, random_model
from avmp_triton.serve.executor import EngineRequest, ModelExecutor
from avmp_triton.serve.graphs import DecodeGraphs
from avmp_triton.sim.sweep import VARIANTS, make_allocator

# vLLM 0.34.0 keeps NemotronH's SSM state in fp32 (models/config.py forces it); other hybrids
# follow the model's dtype ("auto")
FP32_SSM_MODELS = ("nemotron_h",)
SERVABLE = tuple(v for v in VARIANTS if v != "vllm_hybrid")
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


@dataclasses.dataclass(frozen=True)
class CompletionOutput:
    index: int
    token_ids: list[int]
    finish_reason: str          # "stop" (EOS or a stop token), "length" (max_tokens), "abort" (never fits the arena)
    text: str | None = None


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    ttft_s: float | None        # first token's wall time since the request arrived (None: no token)
    tpot_s: float | None        # mean time per output token after the first (None for one token)
    finished: bool = True


class LLM:
    """A hybrid model served from one arena.

    ``model``: a checkpoint directory, a name in ``MODEL_PRESETS`` (random weights at that size) or a
    transformers model object. ``allocator``: one of ``SERVABLE`` (``static_tuned`` takes its split
    as ``ssm_fraction``); ``memory_gib``: the arena (default on a GPU: 90% of the free memory);
    ``max_num_seqs`` / ``max_num_batched_tokens``: vLLM's limits (None: whole prefills);
    ``allocator_kwargs``: more constructor keywords of the allocator (``slab_bytes``, ...).
    ``preemption_mode``: "recompute" (a preempted request prefills again) or "swap" (its pages and
    SSM block go to host memory and come back; see ``Scheduler``).
    ``dtype`` and ``device`` apply to a model the LLM loads (default device: the GPU if there is one);
    a model object is served in its own dtype, moved to ``device`` only if one is given.
    ``max_model_len``: the most tokens (prompt + max_tokens) of one request (default: the config's
    ``max_position_embeddings``, else 8192); it sets the width of the captured block tables.
    ``enforce_eager``: False (vLLM's default) captures the decode step as CUDA graphs, one per
    batch bucket (1, 2, 4, the multiples of 8, ``max_num_seqs``); off the GPU the same fixed-shape step runs
    uncaptured. A family whose decode reads the device on the host (MoE routing: Jamba,
    Granite-4.0-H with experts) runs eagerly, with a warning (``cuda_graphs`` says which).
    ``kv_cache_dtype``: "auto" (the model's dtype) or "fp8" / "fp8_e4m3" (vLLM's names): K/V pages
    in float8_e4m3fn, half the bytes of bf16, with scales of 1.0 per layer and kv head (vLLM's
    default for a checkpoint without scales); the SSM and conv states keep their dtypes."""

    def __init__(self, model, *, allocator: str = "avmp", memory_gib: float | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = 8192, max_model_len: int | None = None, dtype="bfloat16",
                 device=None, tokenizer=None, enforce_eager: bool = False, ssm_fraction: float | None = None,
                 seed: int = 0, allocator_kwargs: dict | None = None, preemption_mode: str = "recompute",
                 kv_cache_dtype: str = "auto"):
        if preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {preemption_mode!r}")
        if not isinstance(enforce_eager, bool):
            raise ValueError(f"enforce_eager must be a bool, got {enforce_eager!r}")
        if not is_int(max_num_seqs) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be a positive int, got {max_num_seqs!r}")
        if max_model_len is not None and (not is_int(max_model_len) or max_model_len < 2):
            raise ValueError(f"max_model_len must be an int >= 2 (a prompt token and an output token), "
                             f"got {max_model_len!r}")
        if not isinstance(kv_cache_dtype, str) or kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
        if allocator not in SERVABLE:
            reason = (" (its SSM state spans several units, and the Mamba ops read a request's state from one)"
                      if allocator == "vllm_hybrid" else "")
            raise ValueError(f"allocator {allocator!r} cannot serve{reason}; choose one of {SERVABLE}")
        self.model = _load(model, as_dtype(dtype), device, seed)
        self.max_model_len = _max_model_len(max_model_len, self.model.config)
        device = next(self.model.parameters()).device
        self.tokenizer = tokenizer
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.preemption_mode = preemption_mode
        cls = RUNNERS.get(self.model.config.model_type)
        if cls is None:
            raise ValueError(f"no runner for model_type {self.model.config.model_type!r}; supported: {sorted(RUNNERS)}")
        weights = cls.embedding_weight(self.model)
        ssm_dtype = torch.float32 if self.model.config.model_type in FP32_SSM_MODELS else weights.dtype
        spec = cls.spec_of(self.model, ssm_dtype=ssm_dtype, kv_dtype=KV_CACHE_DTYPES[kv_cache_dtype])
        capacity = _capacity_bytes(memory_gib, device)
        self.allocator = make_allocator(allocator, spec, capacity, device, ssm_fraction=ssm_fraction,
                                        **(allocator_kwargs or {}))
        self.runner = cls.from_transformers(self.model, allocator=self.allocator, max_requests=1, max_context=16)
        self.eos = _eos_ids(self.model.config)
        a = self.allocator
        pages = -(-(self.max_model_len - 1) // a.page_tokens) if a.spec.num_attn_layers else 0
        # the scheduler's device state for every run: fixed buffers the decode graphs capture
        self.tables = DeviceTables(a, max_num_seqs, max(1, pages + a.ssm_units - 1))
        self.graphs = None if enforce_eager else self._decode_graphs()
        self.last_metrics = None
        self.last_graph_steps = self.last_steps = 0
        self.last_step_seconds = dict(graph=0.0, eager=0.0)   # host wall time of the last run's steps, by kind

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps replay captured CUDA graphs."""
        return self.graphs is not None and bool(self.graphs.graphs)

    def _decode_graphs(self) -> DecodeGraphs | None:
        if not self.runner.graph_safe:
            warnings.warn(f"{self.model.config.model_type}: the MoE routing reads the chosen experts on the host, "
                          f"so its decode step cannot be captured; it runs eagerly", stacklevel=3)
            return None
        return DecodeGraphs(self.runner, self.tables)

    def generate(self, prompts: Sequence, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 arrivals: Sequence[int] | None = None, arrival_s: Sequence[float] | None = None,
                 on_token=None, progress=None) -> list[RequestOutput]:
        """Generate for every prompt (token-id lists, or strings with a tokenizer); one
        ``SamplingParams`` for all or one per prompt. Outputs in prompt order.

        Arrivals (default: all at once): ``arrivals`` in scheduler steps, or ``arrival_s`` in
        seconds of wall time since the call (a serving benchmark's trace: the engine sleeps when it
        has nothing to run, and ``last_metrics`` then has throughput, TTFT, TPOT and goodput in
        seconds). ``on_token(i, token_id)`` is called for every token of prompt i as it is sampled;
        ``progress(finished, total)`` as requests finish."""
        ids = [self._token_ids(p, i) for i, p in enumerate(prompts)]
        params = _params_list(sampling_params, len(ids))
        if arrivals is not None and arrival_s is not None:
            raise ValueError("give arrivals (steps) or arrival_s (seconds), not both")
        times = arrivals if arrival_s is None else arrival_s
        times = [0] * len(ids) if times is None else list(times)
        if len(times) != len(ids):
            raise ValueError(f"arrivals must have one entry per prompt ({len(ids)}), got {len(times)}")
        for i, (p, sp) in enumerate(zip(ids, params)):
            if len(p) + sp.max_tokens > self.max_model_len:
                raise ValueError(f"prompts[{i}]: {len(p)} prompt tokens + max_tokens {sp.max_tokens} exceed "
                                 f"max_model_len={self.max_model_len}")
        start = time.perf_counter()
        reqs = [EngineRequest(rid=str(i), prompt=p, params=sp, arrival=a, start_s=start + (a if arrival_s else 0.0),
                              stop_ids=frozenset(sp.stop_token_ids) | (frozenset() if sp.ignore_eos else self.eos),
                              generator=_generator(sp, self.allocator.device),
                              on_token=None if on_token is None else functools.partial(on_token, i))
                for i, (p, sp, a) in enumerate(zip(ids, params, times))]
        ex = ModelExecutor(self.runner, reqs, self.graphs)
        sched = Scheduler(self.allocator, max_running=self.max_num_seqs, backend="device",
                          max_num_batched_tokens=self.max_num_batched_tokens,
                          step_time="wall" if arrival_s is not None else None, preemption=self.preemption_mode,
                          model_runner=ex, max_pages_per_request=self.tables.W, tables=self.tables)
        self.last_metrics = sched.run(reqs, progress=progress)
        ex.finish()
        self.last_steps, self.last_graph_steps = ex.steps, ex.graph_steps
        self.last_step_seconds = dict(graph=ex.graph_s, eager=ex.eager_s)
        return [_output(r, self.tokenizer) for r in reqs]

    def _token_ids(self, prompt, i: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompts[{i}] is a string but the LLM has no tokenizer: pass token ids")
            prompt = self.tokenizer(prompt)["input_ids"]
        ids = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if not ids or bad:
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids in [0, {vocab}), got "
                             f"{bad[0] if bad else 'an empty prompt'}")
        return ids


def _load(model, dtype: torch.dtype, device, seed: int):
    """The model on ``device`` (default: a model object stays where it is, a loaded one goes to
    the GPU if there is one). ``dtype`` applies to what is loaded here, not to a given object."""
    if isinstance(model, (str, os.PathLike)):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if os.path.isdir(model):
            return load_checkpoint(model, dtype=dtype, device=device).eval()
        if model in MODEL_PRESETS:
            return random_model(model, dtype=dtype, device=device, seed=seed).eval()
        raise ValueError(f"model {model!r} is neither a checkpoint directory nor a preset ({sorted(MODEL_PRESETS)})")
    if not hasattr(model, "config"):
        raise TypeError(f"model must be a path, a preset name or a transformers model, got {type(model).__name__}")
    return (model if device is None else model.to(device)).eval()


def _max_model_len(given, config) -> int:
    """The given length (checked by the caller), or the config's; as vLLM does, no longer than the
    config's ``max_position_embeddings`` where it has one (models without one take 8192)."""
    limit = getattr(config, "max_position_embeddings", None)
    if given is None:
        return int(limit or 8192)
    if limit and given > limit:
        raise ValueError(f"max_model_len={given} exceeds the model's max_position_embeddings={limit}")
    return int(given)


def _capacity_bytes(memory_gib, device: torch.device) -> int:
    if memory_gib is None:
        if device.type != "cuda":
            raise ValueError("memory_gib is required off the GPU (the arena's size in GiB)")
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    if isinstance(memory_gib, bool) or not isinstance(memory_gib, (int, float)) or not memory_gib > 0:
        raise ValueError(f"memory_gib must be a positive number, got {memory_gib!r}")
    return int(memory_gib * (1 << 30))


def _eos_ids(config) -> frozenset:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset(eos if isinstance(eos, (list, tuple)) else [eos])


def _params_list(sp, n: int) -> list[SamplingParams]:
    if sp is None:
        sp = SamplingParams()
    if isinstance(sp, SamplingParams):
        return [sp] * n
    sp = list(sp)
    if len(sp) != n or not all(isinstance(p, SamplingParams) for p in sp):
        raise ValueError(f"sampling_params must be one SamplingParams or one per prompt ({n})")
    return sp


def _generator(sp: SamplingParams, device) -> torch.Generator | None:
    if sp.seed is None or sp.greedy:
        return None
    return torch.Generator(device=device).manual_seed(sp.seed)


def _output(r: EngineRequest, tokenizer) -> RequestOutput:
    t = r.token_times
    text = tokenizer.decode(r.output) if tokenizer is not None else None
    return RequestOutput(request_id=r.rid, prompt_token_ids=r.prompt,
                         outputs=[CompletionOutput(0, list(r.output), r.finish_reason or "abort", text)],
                         ttft_s=t[0] - r.start_s if t else None, tpot_s=(t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None)
