"""Value checks of per-call metadata that the launchers run only where they cost nothing.

The ops never read device data on the host (a sync would break CUDA-graph capture and stall
every layer), so on a GPU bad handles and bad ``cu_seqlens`` get the kernels' defined device
behaviour: the row is skipped (zero output, no unit byte read or written) and ranges are clamped
to the tensors. When the metadata already lives on the host (CPU tensors, e.g. under Triton's
interpreter), reading it is free, and the launchers call these checks to raise an error that
names the bad value instead. ``check_handles`` can also be called by hand on device tensors
(it syncs) to debug a schedule.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from avmp_triton.memory.allocator import KIND_KV, KIND_SSM, InvalidHandleError
_KIND_NAMES = {KIND_KV: "KV page", KIND_SSM: "SSM block"}


def on_host(*tensors) -> bool:
    """True when every given tensor (None ignored) is on the CPU: reading them costs no sync.
    Never for traced tensors (torch.compile, FakeTensorMode, opcheck): they have no values."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or (t.device.type == "cpu" and not is_fake(t)) for t in tensors)


def check_cu_seqlens(cu: torch.Tensor, num_tokens: int, name: str = "cu_seqlens") -> None:
    """``cu`` starts at 0, never decreases and ends at or below ``num_tokens``."""
    v = cu.tolist()
    if v[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {v[0]}")
    for i in range(1, len(v)):
        if v[i] < v[i - 1]:
            raise ValueError(f"{name} must not decrease: {name}[{i}]={v[i]} < {name}[{i - 1}]={v[i - 1]}")
    if v[-1] > num_tokens:
        raise ValueError(f"{name}[-1]={v[-1]} is past the end of the {num_tokens} packed tokens")


def check_handles(handles: torch.Tensor, handle_table: torch.Tensor, handle_kinds: torch.Tensor,
                  kind: int, name: str, *, unique: bool) -> None:
    """Every entry of ``handles`` is -1 or a live handle of ``kind``; with ``unique``, no live
    handle appears twice. Raises ``InvalidHandleError`` naming the first bad position and handle."""
    hs = handles.reshape(-1).to(device=handle_table.device, dtype=torch.int64)
    H = handle_table.numel()
    used = hs != -1
    in_range = (hs >= 0) & (hs < H)
    safe = torch.where(in_range, hs, 0)
    off, kd = handle_table[safe], handle_kinds[safe].to(torch.int64)
    bad = used & (~in_range | (off < 0) | (kd != kind))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        h = int(hs[i])
        if not in_range[i]:
            why = f"is out of range [0, {H})"
        elif off[i] < 0:
            why = "is not allocated (free or already freed)"
        else:
            why = f"is a {_KIND_NAMES.get(int(kd[i]), 'free')} handle, not a {_KIND_NAMES[kind]} handle"
        raise InvalidHandleError(f"{name}{_position(handles, i)} = {h} {why}")
    if unique:
        seen: dict[int, int] = {}
        for i in used.nonzero().reshape(-1).tolist():
            h = int(hs[i])
            if h in seen:
                raise InvalidHandleError(f"{name}{_position(handles, i)} = {h} repeats {name}"
                                         f"{_position(handles, seen[h])}: two rows would update one state")
            seen[h] = i


def check_block_table(block_table: torch.Tensor, seq_lens: torch.Tensor, page_tokens: int) -> None:
    """Every request's ``seq_lens[b]`` is in ``[0, W * page_tokens]`` (the pages its table can hold)."""
    W = block_table.shape[1]
    for b, n in enumerate(seq_lens.tolist()):
        if not 0 <= n <= W * page_tokens:
            raise ValueError(f"seq_lens[{b}]={n} is outside [0, {W * page_tokens}] (block_table width "
                             f"{W} x page_tokens {page_tokens})")


def live_pages(block_table: torch.Tensor, seq_lens: torch.Tensor, page_tokens: int) -> torch.Tensor:
    """The block table with every entry past a request's live pages set to -1 (kernels never read
    those: vLLM-style tables keep stale handles there)."""
    pages = (seq_lens.to(torch.int64).clamp(min=0) + page_tokens - 1) // page_tokens
    live = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < pages[:, None]
    return torch.where(live, block_table, -1)


def _position(t: torch.Tensor, flat_index: int) -> str:
    if t.dim() == 0:
        return ""
    if t.dim() == 1:
        return f"[{flat_index}]"
    return str(list(divmod(flat_index, t.shape[-1]))) if t.dim() == 2 else f"[flat {flat_index}]"
