"""Device-side handle checks shared by every kernel that reads or writes units through the table.

A handle is usable by a kernel only if it is in ``[0, num_handles)``, bound (``table[h] >= 0``)
and of the kind the kernel serves (``kinds[h]``: 1 KV page, 2 SSM block; the values of
``kernels/alloc.py``). Anything else (-1 padding, out of range, free, the other kind) is treated
as "no handle", so a wrong-kind handle never makes a kernel touch a byte of another unit.
"""
import triton
import triton.language as tl

from avmp_triton.kernels.alloc import KIND_KV, KIND_SSM  # noqa: F401  (re-exported for the kernels)


@triton.jit
def both(m, pred):
    """``m & pred`` for a block mask ``m`` and a scalar ``pred``, as an explicit boolean block.

    Triton 3.9's interpreter splats a scalar int1 into int32 data, which its loads and stores
    then reject as a mask; ``where`` keeps the block's booleans on every version."""
    return tl.where(pred, m, False)


@triton.jit
def unit_offset(h, m, table_ptr, kinds_ptr, num_handles, KIND: tl.constexpr):
    """(usable, byte offset) of handles ``h`` (scalar or block, int64) where ``m``.

    ``usable`` is ``m`` and the handle checks above; the offset is 0 where not usable, so it can
    be added to a pointer unmasked. ``h`` and ``m`` must both be scalars or both blocks."""
    ok = m & (h >= 0) & (h < num_handles)
    hs = tl.where(ok, h, 0)
    kind = tl.load(kinds_ptr + hs, mask=ok, other=0)
    off = tl.load(table_ptr + hs, mask=ok, other=-1)
    ok = ok & (kind == KIND) & (off >= 0)
    return ok, tl.where(ok, off, 0)


@triton.jit
def first_rows(handles_ptr, num_rows, BLOCK: tl.constexpr):
    """The call's first ``BLOCK`` handles (int64, -1 past ``num_rows``), for ``repeated``.

    Load them beside the row's own handle, before its table lookups: they depend on nothing, so
    their latency hides under those loads. Loaded inside ``repeated``, after the lookups, they
    added a round trip before every state load (Mamba1 bf16 state update 5-7 % slower on the
    H200, perf/results/mamba_variants_H200/)."""
    o_j = tl.arange(0, BLOCK)
    return tl.load(handles_ptr + o_j, mask=o_j < num_rows, other=-1).to(tl.int64)


REPEAT_BLOCK_MAX = tl.constexpr(1024)  # launchers pass BLOCK = min(this, next power of two >= the batch)


@triton.jit
def repeated(handles_ptr, first, i_b, h, num_rows, BLOCK: tl.constexpr):
    """Whether handle ``h`` of row ``i_b`` (scalar) also sits in another of ``num_rows`` rows.

    Two rows on one state would race; both are skipped. Padding (-1) rows count as repeats of each
    other: callers combine the verdict with ``unit_offset``'s, which rejects them anyway.
    ``first`` is ``first_rows``. A ``BLOCK`` below ``REPEAT_BLOCK_MAX`` holds the whole batch, so
    only the largest block compiles the walk over further rows (a few KiB at most, from L2: every
    program of the call reads the same vector). Compiled in for every block, the walk cost Mamba1
    bf16 at B=64 4 % on the H200 (19.7 us without it, perf/results/mamba_variants_H200/; 20.5 us
    with it, bench_mamba_H200_d8dc9cb_head.json; two runs), and bounded by a batch of 1, which the
    JIT makes constant, it crashed Triton 3.6's TritonGPUCoalesce pass (tests/kernels/test_sm90_compile.py)."""
    o_j = tl.arange(0, BLOCK)
    count = ((first == h) & (o_j != i_b)).to(tl.int32)
    if BLOCK >= REPEAT_BLOCK_MAX:
        j0 = num_rows * 0 + BLOCK
        while j0 < num_rows:  # not range(): Triton 3.6's interpreter cannot loop to a runtime bound
            o_k = j0 + o_j
            b_h = tl.load(handles_ptr + o_k, mask=o_k < num_rows, other=-1).to(tl.int64)
            count += ((b_h == h) & (o_k != i_b)).to(tl.int32)
            j0 += BLOCK
    return tl.sum(count, 0) > 0
