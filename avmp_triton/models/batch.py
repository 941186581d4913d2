"""The metadata of one packed model step: which tokens belong to which request, where each request's
KV pages and SSM block are, and which requests prefill and which decode.

A step packs the new tokens of B requests request after request (``[T]`` tokens in all). Requests
that add exactly one token to a non-empty context DECODE (the single-token ops: decode attention,
conv and state update); all others PREFILL (a first chunk, or a continuation chunk that starts
from the state already in the block: ``has_initial_state``). Layers run each group through its
own ops and scatter the outputs back to the packed token order.
"""
from __future__ import annotations

import dataclasses

import torch

from avmp_triton.memory.cache import PagedCache
from avmp_triton.ops.paged_prefill import resolve_pages


@dataclasses.dataclass(frozen=True)
class TokenGroup:
    """The requests of one kind (prefill or decode) in a step, and their tokens."""
    tokens: torch.Tensor             # [t] int64 indices of the group's tokens in the packed step
    block_table: torch.Tensor        # [b, W] int32 KV page handles of the group's requests
    seq_lens: torch.Tensor           # [b] int32 context after this step (cached + new tokens)
    ssm_handles: torch.Tensor        # [b] int32 SSM block handle of each request
    cu_seqlens: torch.Tensor         # [b + 1] int32 ranges of the group's requests in its tokens
    has_initial_state: torch.Tensor  # [b] int32: 1 when the request continues (state in the block)
    # [b, W] int64 ``resolve_pages(block_table, cache)``: the pages' offsets, resolved once for every
    # attention layer of the step (prefill only); None: each layer's call resolves them itself
    page_offsets: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """Everything a layer needs about a packed step (all on the cache's device)."""
    block_table: torch.Tensor        # [B, W] int32 rows of the step's requests, in step order
    token_req: torch.Tensor          # [T] int32 request (row of block_table) of each token
    token_pos: torch.Tensor          # [T] int32 position of each token in its request
    prefill: TokenGroup | None
    decode: TokenGroup | None

    @property
    def groups(self) -> list[TokenGroup]:
        return [g for g in (self.prefill, self.decode) if g is not None]


def build_step_batch(block_table: torch.Tensor, ssm_handles: torch.Tensor, cached: list[int],
                     new: list[int], kv_cache: PagedCache | None = None) -> StepBatch:
    """Metadata of a step whose request b has ``cached[b]`` tokens in its cache and ``new[b]`` new ones.

    ``block_table`` ``[B, W]`` and ``ssm_handles`` ``[B]`` are the step's requests' rows, in step order.
    ``kv_cache``: the cache whose pages the prefill group's ``page_offsets`` are resolved in (after
    the step's allocator calls: the offsets hold until it next moves, frees or binds a page).
    """
    dev = block_table.device
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    token_req = torch.cat([torch.full((n,), b, dtype=torch.int32) for b, n in enumerate(new)])
    token_pos = torch.cat([torch.arange(c, c + n, dtype=torch.int32) for c, n in zip(cached, new)])
    is_decode = [n == 1 and c > 0 for c, n in zip(cached, new)]
    groups = []
    for want in (False, True):
        reqs = [b for b, d in enumerate(is_decode) if d == want]
        groups.append(_group(reqs, block_table, ssm_handles, cached, new, starts) if reqs else None)
    if groups[0] is not None and kv_cache is not None:
        groups[0] = dataclasses.replace(groups[0], page_offsets=resolve_pages(groups[0].block_table, kv_cache))
    return StepBatch(block_table=block_table, token_req=token_req.to(dev), token_pos=token_pos.to(dev),
                     prefill=groups[0], decode=groups[1])


def _group(reqs: list[int], block_table, ssm_handles, cached, new, starts) -> TokenGroup:
    dev = block_table.device
    tokens = torch.cat([torch.arange(starts[b], starts[b + 1]) for b in reqs])
    cu = [0]
    for b in reqs:
        cu.append(cu[-1] + new[b])
    idx = torch.tensor(reqs, dtype=torch.long, device=dev)
    i32 = dict(dtype=torch.int32, device=dev)
    return TokenGroup(
        tokens=tokens.to(dev), block_table=block_table[idx].contiguous(),
        seq_lens=torch.tensor([cached[b] + new[b] for b in reqs], **i32),
        ssm_handles=ssm_handles[idx].contiguous(), cu_seqlens=torch.tensor(cu, **i32),
        has_initial_state=torch.tensor([int(cached[b] > 0) for b in reqs], **i32))


def decode_step_batch(block_table: torch.Tensor, ssm_handles: torch.Tensor, seq_lens: torch.Tensor) -> StepBatch:
    """Metadata of a decode-only step built on the device from fixed-shape tensors (no host read,
    no host-built tensor), so a CUDA graph can capture it: row b adds one token at position
    ``seq_lens[b] - 1``. A row with ``seq_lens[b] == 0`` is padding: its token has request -1 (no
    K/V written), it reads no page, and its ``ssm_handles[b]`` must be -1 (its state is skipped);
    its output is garbage that the caller drops."""
    B = block_table.shape[0]
    dev = block_table.device
    rows = torch.arange(B, dtype=torch.int32, device=dev)
    real = seq_lens > 0
    group = TokenGroup(tokens=rows.long(), block_table=block_table, seq_lens=seq_lens, ssm_handles=ssm_handles,
                       cu_seqlens=torch.arange(B + 1, dtype=torch.int32, device=dev),
                       has_initial_state=real.to(torch.int32))
    return StepBatch(block_table=block_table, token_req=torch.where(real, rows, -1),
                     token_pos=(seq_lens - 1).clamp_min(0), prefill=None, decode=group)
