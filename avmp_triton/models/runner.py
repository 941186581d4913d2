"""The family-independent half of a hybrid (Mamba + attention) runner whose caches live in one AVMP arena.

``HybridRunner`` owns the arena (an ``AVMPAllocator`` and its ``PagedCache``), the per-request rows
(block tables, page counts, SSM handles), admission, KV growth, release and the packed step loop:
embed -> blocks -> final norm -> lm_head. A model family subclasses it and supplies what differs:

- ``check_config(config)``: a ValueError naming any config feature the family's layers do not run;
- ``embedding_weight(hf_model)``, ``final_norm(hf_model)``, ``lm_head_weight(hf_model)``: the ends of
  the model, where they differ from the defaults (``model.embed_tokens``, ``model.final_layernorm``, ``lm_head``);
- ``build_blocks(hf_model)``: the model as a list of ``Residual`` blocks over ``self.cache``;
- ``embed_tokens`` / ``output_logits``: override to scale the embeddings or the logits (the defaults do not).

The arena's geometry comes from ``HybridModelSpec.from_hf_config``, which dispatches on the model type.
"""
from __future__ import annotations

import abc
import dataclasses

import torch
import torch.nn.functional as F

from avmp_triton.memory.allocator import AVMPAllocator, PoolExhaustedError
from avmp_triton.memory.cache import PagedCache
from avmp_triton.memory.replica import assert_replicas_agree
from avmp_triton.models.batch import StepBatch, build_step_batch, decode_step_batch
from avmp_triton.models.layers import RMSNorm, cast_rms_norm
from avmp_triton.models.tensor_parallel import AllReduced
from avmp_triton.ops import check_attn_head_dim
from avmp_triton.spec import HybridModelSpec


class Residual:
    """``h + scale * mixer(norm(h), batch)``: one pre-norm residual branch (a mixer, an attention or
    an MLP). ``scale`` is for families with a residual multiplier; 1.0 skips the multiply.
    ``fp32_residual`` (Mamba's and Mamba2's ``residual_in_fp32``): the residual stream is kept in
    fp32 and cast to ``dtype`` (the weights') before the norm."""

    def __init__(self, norm, mixer, scale: float = 1.0, *, fp32_residual: bool = False,
                 dtype: torch.dtype | None = None):
        if fp32_residual and (dtype is None or scale != 1.0):
            raise ValueError(f"fp32_residual needs the weights' dtype and no scale, got {dtype} and {scale}")
        self.norm, self.mixer, self.scale = norm, mixer, scale
        self.fp32_residual, self.dtype = fp32_residual, dtype

    def __call__(self, h: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        if self.fp32_residual:
            return h.float() + self.mixer(self.norm(h.to(self.dtype)), batch)
        out = self.mixer(self.norm(h), batch)
        return h + (out if self.scale == 1.0 else out * self.scale)


class HybridRunner(abc.ABC):
    """A hybrid model's forward over a paged cache in one AVMP arena. Build a family's subclass
    with ``from_transformers``; subclasses implement the hooks named in the module docstring."""

    has_moe = False   # set by families whose blocks include a MoE (Jamba, Granite-4.0-H)

    def __init__(self, hf_model: torch.nn.Module, spec: HybridModelSpec, *, capacity_bytes: int | None = None,
                 allocator=None, max_requests: int, max_context: int, **alloc_kwargs):
        config = hf_model.config
        self.check_config(config)
        embed = self.embedding_weight(hf_model)
        self.device, self.dtype = embed.device, embed.dtype
        self.spec = spec
        if allocator is None:
            allocator = AVMPAllocator(spec, capacity_bytes, device=self.device, **alloc_kwargs)
        elif capacity_bytes is not None or alloc_kwargs:
            raise ValueError("pass either an allocator or capacity_bytes (and allocator keywords), not both")
        self.allocator = allocator
        self.cache = PagedCache.of(self.allocator)  # the allocator never replaces its tensors
        self.vocab_size = config.vocab_size
        self.embed = embed.detach()
        self.lm_head = self.lm_head_weight(hf_model).detach()
        self.norm_f = self.final_norm(hf_model)
        self.blocks = self.build_blocks(hf_model)
        # a tensor-parallel shard (models/tensor_parallel.py): one all-reduce per mixer output
        self.tp = getattr(hf_model, "tp_shard", None)
        if self.tp is not None:
            for block in self.blocks:
                if hasattr(block.mixer, "tp_reduce"):
                    block.mixer.tp_reduce = self.tp.reduce
                block.mixer = AllReduced(block.mixer, self.tp)
        self._init_tables(max_requests, max_context)

    @classmethod
    def spec_of(cls, hf_model: torch.nn.Module, *, ssm_dtype: torch.dtype = torch.float32,
                page_tokens: int = 16, kv_dtype: torch.dtype | None = None) -> HybridModelSpec:
        """The cache geometry of ``hf_model``: conv state in the model's dtype, K/V in ``kv_dtype``
        (default: the model's; float8_e4m3fn: fp8 pages, each attention layer with its scales), the
        SSM state in ``ssm_dtype``; checked against what the family's layers and the kernels run."""
        cls.check_config(hf_model.config)  # a clear error before the spec reader sees an unsupported model
        dtype = cls.embedding_weight(hf_model).dtype
        spec = HybridModelSpec.from_hf_config(hf_model.config, kv_dtype=kv_dtype or dtype, conv_dtype=dtype,
                                              ssm_dtype=ssm_dtype, page_tokens=page_tokens)
        if spec.num_attn_layers:
            check_attn_head_dim(spec.head_dim, f"the {hf_model.config.model_type} model's attention")
            if spec.kv_dtype == torch.float8_e4m3fn and spec.head_dim % 16:
                raise ValueError(f"fp8 KV pages need a head_dim that is a multiple of 16 (rows of whole 16-byte "
                                 f"words); the {hf_model.config.model_type} model's attention has {spec.head_dim}")
        return spec

    @classmethod
    def from_transformers(cls, hf_model: torch.nn.Module, *, capacity_bytes: int | None = None, allocator=None,
                          max_requests: int = 8, max_context: int = 4096, ssm_dtype: torch.dtype = torch.float32,
                          **alloc_kwargs) -> HybridRunner:
        """A runner over ``hf_model``'s weights (references, no copy) and a new AVMP arena of
        ``capacity_bytes``, or the arena of ``allocator`` (any allocator ``PagedCache.of`` takes,
        built for this model's ``spec_of``). KV and conv state in the model's dtype; the SSM state in
        ``ssm_dtype`` (fp32 by default, as serving engines keep it). ``alloc_kwargs`` go to
        ``AVMPAllocator`` (``kv_fraction``, ``slab_bytes``, ``page_tokens``, ...)."""
        if allocator is None:
            spec = cls.spec_of(hf_model, ssm_dtype=ssm_dtype, page_tokens=alloc_kwargs.get("page_tokens", 16))
        else:
            spec = allocator.spec
            want = cls.spec_of(hf_model, ssm_dtype=spec.ssm_dtype, page_tokens=allocator.page_tokens,
                               kv_dtype=spec.kv_dtype)
            if dataclasses.replace(want, name=spec.name) != spec:
                raise ValueError(f"the allocator's spec {spec} is not this model's cache geometry {want}")
        return cls(hf_model, spec, capacity_bytes=capacity_bytes, allocator=allocator, max_requests=max_requests,
                   max_context=max_context, **alloc_kwargs)

    # --- the family's hooks --------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def check_config(cls, config) -> None:
        """Raise ValueError naming any config feature the family's layers would get wrong."""

    @classmethod
    def embedding_weight(cls, hf_model: torch.nn.Module) -> torch.Tensor:
        """The token embedding weight ``[vocab, hidden]``; transformers' ``model.embed_tokens`` by default."""
        return hf_model.model.embed_tokens.weight

    @classmethod
    def lm_head_weight(cls, hf_model: torch.nn.Module) -> torch.Tensor:
        """The output projection weight ``[vocab, hidden]``; transformers' ``lm_head`` by default."""
        return hf_model.lm_head.weight

    @classmethod
    def final_norm(cls, hf_model: torch.nn.Module) -> RMSNorm:
        """The final norm, applied before lm_head; by default ``model.final_layernorm``, an RMSNorm
        that casts back before its weight (Bamba, Jamba, Falcon-H1)."""
        return cast_rms_norm(hf_model.model.final_layernorm)

    @abc.abstractmethod
    def build_blocks(self, hf_model: torch.nn.Module) -> list:
        """The model's layers as ``Residual`` blocks (or any ``block(h, batch) -> h``), in order."""

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp is not None:
            return self.tp.embed(ids, self.embed)
        return F.embedding(ids, self.embed)

    def output_logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final hidden states (before the final norm)."""
        if self.tp is not None:
            return self.tp.logits(self.norm_f(h), self.lm_head)
        return F.linear(self.norm_f(h), self.lm_head).float()

    # --- request rows --------------------------------------------------------------------------
    def _init_tables(self, max_requests: int, max_context: int) -> None:
        """Per-row cache metadata: a request holds one row while it lives."""
        dev, pt = self.device, self.allocator.page_tokens
        self.max_context = max_context
        self.block_table = torch.full((max_requests, -(-max_context // pt)), -1, dtype=torch.int32, device=dev)
        self.num_pages = torch.zeros(max_requests, dtype=torch.int32, device=dev)
        self.ssm_handles = torch.full((max_requests,), -1, dtype=torch.int32, device=dev)
        self.rows: dict = {}                 # request id -> row
        self.cached: dict = {}               # request id -> tokens in its cache
        self.free_rows = list(range(max_requests - 1, -1, -1))

    # --- one packed step -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, request_ids: list, tokens: list, *, positions: list | None = None,
             all_logits: bool = False) -> list[torch.Tensor]:
        """One packed step: request ``request_ids[b]`` adds ``tokens[b]`` (a 1-D int tensor or list:
        a prefill chunk of any length, or one decode token). A new id starts a request.

        ``positions[b]``, when given, is the position of ``tokens[b][0]``: it must equal the tokens
        request b already has in its cache (checked). Returns per request the fp32 logits of its
        last token ``[vocab]``, or of all its new tokens ``[n, vocab]`` with ``all_logits``.
        """
        toks = self._check_step(request_ids, tokens, positions)
        self._admit([r for r in request_ids if r not in self.rows])
        new = [t.numel() for t in toks]
        cached = [self.cached[r] for r in request_ids]
        self._grow([self.rows[r] for r in request_ids], [c + n for c, n in zip(cached, new)])
        rows = torch.tensor([self.rows[r] for r in request_ids], dtype=torch.long, device=self.device)
        out = self.forward(toks, self.block_table[rows], self.ssm_handles[rows], cached, all_logits=all_logits)
        for r, n in zip(request_ids, new):
            self.cached[r] += n
        return out if all_logits else list(out)

    @torch.no_grad()
    def forward(self, tokens: list[torch.Tensor], block_table: torch.Tensor, ssm_handles: torch.Tensor,
                cached: list[int], *, all_logits: bool = False):
        """The model over one packed step whose cache metadata someone else keeps (an engine's
        scheduler): request b adds ``tokens[b]`` after its ``cached[b]`` cached tokens, its pages in
        ``block_table[b]`` (already grown to hold them) and its state in block ``ssm_handles[b]``.
        Returns fp32 logits of each request's last token ``[B, vocab]``, or with ``all_logits`` a
        list of ``[n_b, vocab]``."""
        new = [t.numel() for t in tokens]
        if self.tp is not None and self.tp.check_replicas:
            assert_replicas_agree(self.allocator, block_table, ssm_handles, group=self.tp.group,
                                  what="before a step")
        # the pages' offsets resolved once here for every attention layer's prefill
        batch = build_step_batch(block_table, ssm_handles, cached, new,
                                 kv_cache=self.cache if self.spec.num_attn_layers else None)
        h = self.embed_tokens(torch.cat(tokens).to(self.device))
        for block in self.blocks:
            h = block(h, batch)
        if all_logits:
            return [self.output_logits(o) for o in h.split(new)]
        last = torch.tensor(new, device=h.device).cumsum(0) - 1
        return self.output_logits(h[last])

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, block_table: torch.Tensor, ssm_handles: torch.Tensor,
               seq_lens: torch.Tensor) -> torch.Tensor:
        """One decode token per row, from fixed-shape device tensors and without any host read, so
        that a CUDA graph can capture it (``graph_safe`` families): row b adds ``tokens[b]`` (int64)
        at position ``seq_lens[b] - 1`` of its request, pages in ``block_table[b]`` (grown to hold
        it), state in block ``ssm_handles[b]``. Rows with ``seq_lens[b] == 0`` and
        ``ssm_handles[b] == -1`` are padding (nothing of theirs is read or written). Returns fp32
        logits ``[B, vocab]`` (padding rows' are garbage)."""
        batch = decode_step_batch(block_table, ssm_handles, seq_lens)
        h = self.embed_tokens(tokens)
        for block in self.blocks:
            h = block(h, batch)
        return self.output_logits(h)

    @property
    def graph_safe(self) -> bool:
        """Whether ``decode`` reads nothing on the host (a CUDA graph can capture it): not when a
        layer is a MoE, whose routing reads the chosen experts on the host; nor when a tensor-parallel
        shard checks its replicas every step (a host read)."""
        return not self.has_moe and not (self.tp is not None and self.tp.check_replicas)

    def _check_step(self, request_ids, tokens, positions) -> list[torch.Tensor]:
        """Every input checked before anything is allocated; errors name the bad value."""
        if len(request_ids) != len(tokens) or not request_ids:
            raise ValueError(f"request_ids and tokens must be non-empty lists of one length, got "
                             f"{len(request_ids)} and {len(tokens)}")
        if len(set(request_ids)) != len(request_ids):
            raise ValueError(f"a request appears twice in one step: {list(request_ids)}")
        if positions is not None and len(positions) != len(request_ids):
            raise ValueError(f"positions must have one entry per request, got {len(positions)}")
        toks = []
        for b, (r, t) in enumerate(zip(request_ids, tokens)):
            t = torch.as_tensor(t)
            if t.dim() != 1 or t.numel() == 0 or t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ValueError(f"tokens of request {r!r} must be a non-empty 1-D integer tensor, got "
                                 f"{t.dtype} of shape {tuple(t.shape)}")
            bad = (t < 0) | (t >= self.vocab_size)
            if bool(bad.any()):
                raise ValueError(f"request {r!r}: token id {int(t[bad][0])} is out of range [0, {self.vocab_size})")
            have = self.cached.get(r, 0)
            if positions is not None and positions[b] != have:
                raise ValueError(f"request {r!r}: position {positions[b]!r} given, but its cache holds {have} tokens")
            if have + t.numel() > self.max_context:
                raise ValueError(f"request {r!r}: {have} + {t.numel()} tokens exceed max_context={self.max_context}")
            toks.append(t.long())
        if sum(r not in self.rows for r in request_ids) > len(self.free_rows):
            raise ValueError(f"{len(self.free_rows)} free request rows, fewer than the step's new requests")
        return toks

    def _admit(self, new_ids: list) -> None:
        """A row and one SSM block per new request (alloc_ssm moves capacity from the KV pool if needed)."""
        if not new_ids:
            return
        handles = self.allocator.alloc_ssm(len(new_ids))
        for r, h in zip(new_ids, handles):
            row = self.free_rows.pop()
            self.rows[r], self.cached[r] = row, 0
            self.ssm_handles[row] = h

    def _grow(self, rows: list[int], lengths: list[int]) -> None:
        """Pages for ``lengths[i]`` tokens in row ``rows[i]``; make room once if the KV pool is short.
        An attention-free model has no KV pool: nothing to grow."""
        if self.spec.num_attn_layers == 0:
            return
        for attempt in range(2):
            need = torch.zeros_like(self.num_pages)
            for row, n in zip(rows, lengths):
                need[row] = -(-n // self.allocator.page_tokens)
            need = (need - self.num_pages).clamp_min(0).to(torch.int32)
            failed = self.allocator.grow_kv(self.block_table, self.num_pages, need)
            if not bool((failed != 0).any()):  # one sync per step, on the host anyway
                return
            short = int(need[failed != 0].sum())
            if attempt == 0:
                self.allocator.make_room("kv", short)  # raises PoolExhaustedError if it cannot
        raise PoolExhaustedError(f"no room for {short} more KV pages")

    def release(self, request_ids: list) -> None:
        """Free every KV page and the SSM block of the given requests (their rows become free)."""
        unknown = [r for r in request_ids if r not in self.rows]
        if unknown:
            raise KeyError(f"unknown request ids: {unknown}")
        rows = torch.tensor([self.rows[r] for r in request_ids], dtype=torch.int32, device=self.device)
        status = self.allocator.release_rows(rows, self.block_table, self.num_pages, self.ssm_handles)
        self.allocator.check_status(status)
        self.ssm_handles[rows.long()] = -1
        for r in request_ids:
            self.free_rows.append(self.rows.pop(r))
            del self.cached[r]
