"""KV page handles -> element offsets in the arena, once a step for every attention layer.

The prefill kernel then loads one offset per page instead of the handle, its kind and its table
entry one after the other. One program per ``BLOCK`` entries of the block table; a handle that is
-1, out of range, free or not a KV page gives -1 (``handles.unit_offset``'s rule).
"""
import triton
import triton.language as tl

from avmp_triton.kernels.handles import KIND_KV, unit_offset


# sizes and strides change with every step's batch: specialised, each class would compile again
@triton.jit(do_not_specialize=["num_handles", "width", "num_entries", "stride_bt_b", "stride_bt_w"])
def resolve_pages_kernel(
    block_table_ptr,  # [B, W] int32 KV page handles, -1 padded
    out_ptr,          # [B, W] int64 contiguous (output): element offsets, -1 for no page
    table_ptr,        # [H] int64 handle -> byte offset in the arena, -1 when free
    kinds_ptr,        # [H] int32 handle -> kind (1 = KV page)
    num_handles, width, num_entries, stride_bt_b, stride_bt_w,
    ELEM_BYTES: tl.constexpr, BLOCK: tl.constexpr,
):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < num_entries
    h = tl.load(block_table_ptr + (o // width) * stride_bt_b + (o % width) * stride_bt_w, mask=m, other=-1)
    ok, off = unit_offset(h.to(tl.int64), m, table_ptr, kinds_ptr, num_handles, KIND_KV)
    tl.store(out_ptr + o, tl.where(ok, off // ELEM_BYTES, -1), mask=m)
