"""The device-side handle helpers (avmp_triton/kernels/handles.py) against plain torch, through a
small kernel that writes each row's verdict: fresh random handles, batches that fit one block of
the repeat scan and batches that need the walk past it (more than REPEAT_BLOCK_MAX rows)."""
import pytest
import torch
import triton
import triton.language as tl

from avmp_triton.kernels.handles import KIND_SSM, REPEAT_BLOCK_MAX, first_rows, repeated, unit_offset
from avmp_triton.ops._args import repeat_block

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _verdicts(handles_ptr, table_ptr, kinds_ptr, out_ptr, num_rows, num_handles, BLOCK: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    first = first_rows(handles_ptr, num_rows, BLOCK)
    h = tl.load(handles_ptr + i_b).to(tl.int64)
    live, off = unit_offset(h, h >= 0, table_ptr, kinds_ptr, num_handles, KIND_SSM)
    valid = tl.where(repeated(handles_ptr, first, i_b, h, num_rows, BLOCK), False, live)
    tl.store(out_ptr + i_b, tl.where(valid, off, -1))


def _reference(handles, table, kinds):
    h = handles.long()
    n = table.numel()
    inside = (h >= 0) & (h < n)
    hs = torch.where(inside, h, 0)
    live = inside & (kinds[hs] == KIND_SSM.value) & (table[hs] >= 0)
    counts = torch.bincount(hs[inside], minlength=n)
    sole = ~inside | (counts[hs] == 1)
    return torch.where(live & sole, table[hs], -1)


@pytest.mark.parametrize("rows", [1, 2, 7, 300, REPEAT_BLOCK_MAX.value + 77])
def test_unit_offset_and_repeats_match_torch(rows):
    g = torch.Generator().manual_seed(rows)
    num_handles = 64
    table = torch.randint(0, 1 << 20, (num_handles,), generator=g) * 16
    table[torch.randperm(num_handles, generator=g)[:8]] = -1                        # free
    kinds = torch.randint(1, 3, (num_handles,), generator=g, dtype=torch.int32)    # KV or SSM
    # distinct handles (some out of range) at random rows, -1 elsewhere; then two repeats: rows 1
    # and 2, and the first and last row (in different blocks of the scan past REPEAT_BLOCK_MAX)
    handles = torch.full((rows,), -1, dtype=torch.int32)
    values = torch.randperm(num_handles + 8, generator=g)[:min(rows, num_handles)].to(torch.int32) - 2
    handles[torch.randperm(rows, generator=g)[:values.numel()]] = values
    if rows > 3:
        handles[(handles == values[0]) | (handles == values[1])] = -1
        handles[2] = handles[1] = values[0]
        handles[rows - 1] = handles[0] = values[1]
    want = _reference(handles, table, kinds)
    t, k, hd = (x.to(DEVICE) for x in (table, kinds, handles))
    out = torch.empty(rows, dtype=torch.int64, device=DEVICE)
    _verdicts[(rows,)](hd, t, k, out, rows, num_handles, BLOCK=repeat_block(rows))
    torch.testing.assert_close(out.cpu(), want, rtol=0, atol=0)
    if rows > REPEAT_BLOCK_MAX.value:
        assert repeat_block(rows) == REPEAT_BLOCK_MAX.value     # the walk past the first block ran
