"""Replicated allocators under tensor parallelism: every rank runs its own allocator on the same call
sequence, and since the allocator is deterministic the ranks' tables stay identical without any
broadcast. This module checks that claim cheaply, for a debug mode: a digest of each rank's
decision state, computed on the device, compared across ranks with two tiny all-reduces.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# odd 64-bit multipliers (Knuth's MMIX LCG and the golden ratio): weights that differ per position,
# so a moved entry changes the digest even where the multiset of values does not
_MUL = (6364136223846793005, -7046029254386353131)


class ReplicaDivergenceError(RuntimeError):
    """Ranks whose allocators should hold identical state do not."""


def state_digest(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``[2]`` int64 on the tensors' device: two position-weighted sums of every entry of
    ``tensors`` (each flattened to int64, in order), wrapping modulo 2**64. Equal inputs give
    equal digests on any device; one changed entry changes them (up to hash collisions)."""
    if not tensors:
        raise ValueError("state_digest needs at least one tensor")
    x = torch.cat([t.reshape(-1).to(torch.int64) for t in tensors])
    pos = torch.arange(1, x.numel() + 1, dtype=torch.int64, device=x.device)
    return torch.stack([((x + 1) * (pos * _MUL[0] + 1)).sum(), ((x ^ pos) * (pos * _MUL[1] + 3)).sum()])


def assert_replicas_agree(allocator, *extra: torch.Tensor, group=None, what: str = "") -> None:
    """Raise ``ReplicaDivergenceError`` on every rank of ``group`` unless all ranks hold the same
    allocator decision state (``allocator.decision_state()``) and the same ``extra`` tensors (block
    tables, SSM handles). Two all-reduces of two int64 each and one host read: a debug check."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("assert_replicas_agree needs an initialised torch.distributed process group")
    mine = state_digest(allocator.decision_state() + list(extra))
    if dist.get_backend(group) == "nccl" and mine.device.type != "cuda":
        mine = mine.cuda()
    lo, hi = mine.clone(), mine.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(lo, hi):
        where = f" {what}" if what else ""
        raise ReplicaDivergenceError(
            f"rank {dist.get_rank(group)}: allocator state{where} differs across ranks (digest {mine.tolist()}, "
            f"min {lo.tolist()}, max {hi.tolist()}); a rank made a call the others did not")
