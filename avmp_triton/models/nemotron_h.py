"""A Nemotron-H runner whose caches live in one AVMP arena.

``NemotronHRunner.from_transformers(hf_model, capacity_bytes=...)`` takes the weights of a
transformers ``NemotronHForCausalLM`` (references, no copy) and runs its own forward: every K/V
byte and every conv / SSM state byte is in the allocator's arena, written and read by the
project's ops through block tables and SSM handles. ``step`` runs one packed step of any mix of
prefill chunks and decode tokens; the runner grows each request's KV pages (``grow_kv``), gives a
new request its SSM block (``alloc_ssm``) and frees both on ``release``.

Supported layer types: 'M' (Mamba2), '*' (attention), '-' (MLP); 'E' (MoE) is not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from avmp_triton.memory.allocator import AVMPAllocator, PoolExhaustedError
from avmp_triton.memory.cache import PagedCache
from avmp_triton.models.batch import build_step_batch
from avmp_triton.models.layers import Mamba2Mixer, PagedAttention, ReLU2MLP, RMSNorm
from avmp_triton.spec import HybridModelSpec

# transformers' layer-type names (5.x, then 4.x's) and their hybrid_override_pattern characters
_PATTERN_CHAR = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E",
                 "mamba": "M", "attention": "*"}
SUPPORTED_LAYERS = {"M": "Mamba2", "*": "attention", "-": "MLP"}


def layer_pattern(config) -> str:
    """The config's layers as pattern characters; ValueError naming any type the runner cannot run."""
    kinds = list(getattr(config, "layers_block_type", None) or [])
    chars = [_PATTERN_CHAR.get(k, k) for k in kinds]
    for i, c in enumerate(chars):
        if c not in SUPPORTED_LAYERS:
            raise ValueError(f"layer {i} has type {kinds[i]!r} (pattern {c!r}); the Nemotron-H runner supports "
                             f"{', '.join(f'{k!r} ({v})' for k, v in SUPPORTED_LAYERS.items())}")
    if "M" not in chars or "*" not in chars:
        raise ValueError(f"pattern {''.join(chars)!r}: the arena needs at least one Mamba ('M') and one "
                         f"attention ('*') layer")
    return "".join(chars)


def _check_config(config) -> None:
    """The activations the runner implements; anything else would give wrong logits silently."""
    if config.mamba_hidden_act != "silu":
        raise ValueError(f"mamba_hidden_act {config.mamba_hidden_act!r} is not supported (only 'silu')")
    if config.mlp_hidden_act != "relu2":
        raise ValueError(f"mlp_hidden_act {config.mlp_hidden_act!r} is not supported (only 'relu2')")


class NemotronHRunner:
    """Nemotron-H forward over a paged cache in one AVMP arena. Build with ``from_transformers``."""

    def __init__(self, hf_model: torch.nn.Module, spec: HybridModelSpec, *, capacity_bytes: int,
                 max_requests: int, max_context: int, **alloc_kwargs):
        config = hf_model.config
        self.pattern = layer_pattern(config)
        _check_config(config)
        base = hf_model.model
        self.device = base.embeddings.weight.device
        self.dtype = base.embeddings.weight.dtype
        self.spec = spec
        self.allocator = AVMPAllocator(spec, capacity_bytes, device=self.device, **alloc_kwargs)
        self.cache = PagedCache.of(self.allocator)  # the allocator never replaces its tensors
        self.vocab_size = config.vocab_size
        self.embed = base.embeddings.weight.detach()
        self.lm_head = hf_model.lm_head.weight.detach()
        self.norm_f = RMSNorm(base.norm_f.weight, base.norm_f.variance_epsilon)
        self.blocks = self._build_blocks(base.layers, config)
        self._init_tables(max_requests, max_context)

    @classmethod
    def from_transformers(cls, hf_model: torch.nn.Module, *, capacity_bytes: int, max_requests: int = 8,
                          max_context: int = 4096, ssm_dtype: torch.dtype = torch.float32,
                          **alloc_kwargs) -> NemotronHRunner:
        """A runner over ``hf_model``'s weights (a ``NemotronHForCausalLM``) and a new arena of
        ``capacity_bytes``. KV and conv state in the model's dtype; the SSM state in ``ssm_dtype``
        (fp32 by default, as serving engines keep Nemotron-H's). ``alloc_kwargs`` go to
        ``AVMPAllocator`` (``kv_fraction``, ``slab_bytes``, ``page_tokens``, ...)."""
        config = hf_model.config
        layer_pattern(config)  # a clear error before the spec reader sees an unsupported model
        dtype = hf_model.model.embeddings.weight.dtype
        page_tokens = alloc_kwargs.get("page_tokens", 16)
        spec = HybridModelSpec.from_hf_config(config, kv_dtype=dtype, conv_dtype=dtype, ssm_dtype=ssm_dtype,
                                              page_tokens=page_tokens)
        return cls(hf_model, spec, capacity_bytes=capacity_bytes, max_requests=max_requests,
                   max_context=max_context, **alloc_kwargs)

    def _build_blocks(self, layers, config) -> list:
        """(norm, mixer) per layer; attention and Mamba layers numbered within their kind."""
        blocks, n_attn, n_mamba = [], 0, 0
        for layer, c in zip(layers, self.pattern):
            m = layer.mixer
            if c == "M":
                mixer = Mamba2Mixer(m, cache=self.cache, layer=n_mamba)
                n_mamba += 1
            elif c == "*":
                mixer = PagedAttention(m.q_proj, m.k_proj, m.v_proj, m.o_proj, num_heads=config.num_attention_heads,
                                       num_kv_heads=config.num_key_value_heads, head_dim=m.head_dim,
                                       cache=self.cache, layer=n_attn)
                n_attn += 1
            else:
                mixer = ReLU2MLP(m.up_proj, m.down_proj)
            blocks.append((RMSNorm(layer.norm.weight, layer.norm.variance_epsilon), mixer))
        return blocks

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

    # --- one packed step ---------------------------------------------------------------------
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
        batch = build_step_batch(self.block_table[rows], self.ssm_handles[rows], cached, new)
        h = F.embedding(torch.cat(toks).to(self.device), self.embed)
        for norm, mixer in self.blocks:
            h = h + mixer(norm(h), batch)  # residual + mixer(norm(x)), as NemotronHBlock
        for r, n in zip(request_ids, new):
            self.cached[r] += n
        out = list(h.split(new))
        if not all_logits:
            out = [o[-1] for o in out]
        return [F.linear(self.norm_f(o), self.lm_head).float() for o in out]

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
        """Pages for ``lengths[i]`` tokens in row ``rows[i]``; make room once if the KV pool is short."""
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
