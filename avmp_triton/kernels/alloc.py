"""Allocator kernels: batched alloc, free, per-row growth/release and slab migration.

All allocator state lives in device tensors (see ``avmp_triton/memory/allocator.py`` for the layout):

    table      [H] int64   handle -> byte offset in the arena, -1 when free
    kinds      [H] int32   handle -> 0 free, 1 KV page, 2 SSM block
    hstack     [H] int32   stack of free handle ids (top in tops[2])
    stacks     [..] int64  per-pool stacks of free unit offsets; pool 1 starts at ``base1``
    tops       [3] int64   top of pool 0, top of pool 1, top of the handle stack
    slot_handle[S, U] int32  reverse map: unit slot of a slab -> handle, -1 when free
    slab_owner [S] int32   pool of each slab

The mutating kernels run as ONE program: a single CTA walks its input in blocks, so the order in
which stack entries are taken and given back is fixed by the input order, and the same call
sequence always yields the same table (the only atomics are commutative counter updates). The
exceptions keep that order by construction: ``alloc_kernel`` pops fixed positions below one top,
and a large free validates in one launch and pushes in a second, each program at the offset the
counts of the programs before it give. They must never be autotuned (autotuning re-runs a kernel).
Counts that change from call to call (n, k, n_moves) are not specialised on, so a new size
never compiles another variant in the middle of serving.

Pops take ``stack[top - 1 - i]`` for the i-th unit; pushes write ``stack[top + i]``.
"""
import triton
import triton.language as tl

KIND_KV = tl.constexpr(1)
KIND_SSM = tl.constexpr(2)

# error codes written to status[0]; the launcher turns them into exceptions
ERR_NONE = tl.constexpr(0)
ERR_RANGE = tl.constexpr(1)       # handle outside [0, num_handles)
ERR_NOT_LIVE = tl.constexpr(2)    # handle is free
ERR_WRONG_KIND = tl.constexpr(3)  # live handle of the other kind
ERR_DUPLICATE = tl.constexpr(4)   # handle given twice in one call
ERR_BAD_ROW = tl.constexpr(5)     # row index outside the block table
ERR_BAD_COUNT = tl.constexpr(6)   # num_pages of a row outside [0, width]
ERR_NO_SPACE = tl.constexpr(7)    # not enough free units or handles

_BIG = tl.constexpr(2**62)


@triton.jit
def _slot_of(off, slab_bytes, unit):
    slab = off // slab_bytes
    return slab, (off - slab * slab_bytes) // unit


@triton.jit
def _pop_units(pos, m, kind, top, htop, stack_ptr, hstack_ptr, table_ptr, kinds_ptr,
               slot_handle_ptr, slab_bytes, unit, max_ups):
    """Take unit ``top-1-pos`` and handle ``htop-1-pos`` for every lane in ``m``; bind them."""
    off = tl.load(stack_ptr + (top - 1 - pos), mask=m, other=0)
    h = tl.load(hstack_ptr + (htop - 1 - pos), mask=m, other=0)
    tl.store(table_ptr + h, off, mask=m)
    tl.store(kinds_ptr + h, (h * 0 + kind).to(tl.int32), mask=m)
    slab, idx = _slot_of(off, slab_bytes, unit)
    tl.store(slot_handle_ptr + slab * max_ups + idx, h, mask=m)
    return h


@triton.jit
def _push_units(h, m, top0, top1, htop, stacks_ptr, base1, hstack_ptr, table_ptr, kinds_ptr,
                slot_handle_ptr, slab_bytes, unit0, unit1, max_ups,
                POOL_KV: tl.constexpr, POOL_SSM: tl.constexpr):
    """Give back the (validated, distinct) handles ``h`` of lanes ``m`` and their units."""
    hs = tl.where(m, h, 0)
    kind = tl.load(kinds_ptr + hs, mask=m, other=0)
    off = tl.load(table_ptr + hs, mask=m, other=0)
    pool = tl.where(kind == KIND_KV, POOL_KV, POOL_SSM)
    in0 = m & (pool == 0)
    in1 = m & (pool == 1)
    c0 = tl.cumsum(in0.to(tl.int64), 0)
    c1 = tl.cumsum(in1.to(tl.int64), 0)
    ch = tl.cumsum(m.to(tl.int64), 0)
    tl.store(stacks_ptr + (top0 + c0 - 1), off, mask=in0)
    tl.store(stacks_ptr + (base1 + top1 + c1 - 1), off, mask=in1)
    tl.store(hstack_ptr + (htop + ch - 1), hs.to(tl.int32), mask=m)
    tl.store(table_ptr + hs, (off * 0 - 1), mask=m)
    tl.store(kinds_ptr + hs, (kind * 0).to(tl.int32), mask=m)
    unit = tl.where(pool == 0, unit0, unit1)
    slab, idx = _slot_of(off, slab_bytes, unit)
    tl.store(slot_handle_ptr + slab * max_ups + idx, (hs * 0 - 1).to(tl.int32), mask=m)
    n0 = tl.sum(in0.to(tl.int64), 0)
    n1 = tl.sum(in1.to(tl.int64), 0)
    nh = tl.sum(m.to(tl.int64), 0)
    return top0 + n0, top1 + n1, htop + nh


@triton.jit
def _check_handles(h, m, req_kind, epoch, mark_ptr, kinds_ptr, num_handles):
    """Per-lane error code for freeing ``h``. Each call stamps its live handles with a fresh epoch:
    a handle that already carries this call's epoch is a duplicate, and no clearing pass is needed."""
    inr = (h >= 0) & (h < num_handles)
    hs = tl.where(inr, h, 0)
    kind = tl.load(kinds_ptr + hs, mask=m & inr, other=0)
    live = kind != 0
    wrong = (req_kind != 0) & (kind != req_kind)
    chk = m & inr & live & (~wrong)
    old = tl.atomic_xchg(mark_ptr + hs, hs.to(tl.int64) * 0 + epoch, mask=chk)
    dup = chk & (old == epoch)
    code = tl.where(~inr, ERR_RANGE,
                    tl.where(~live, ERR_NOT_LIVE,
                             tl.where(wrong, ERR_WRONG_KIND, tl.where(dup, ERR_DUPLICATE, ERR_NONE))))
    return tl.where(m, code, ERR_NONE)


@triton.jit
def _first_error(code, pos, val, err_pos, err_code, err_val):
    """Keep the error at the lowest input position seen so far."""
    bad = code != ERR_NONE
    first = tl.min(tl.where(bad, pos, _BIG), 0)
    sel = bad & (pos == first)
    b_code = tl.sum(tl.where(sel, code, 0).to(tl.int64), 0)
    b_val = tl.sum(tl.where(sel, val, 0).to(tl.int64), 0)
    better = first < err_pos
    return (tl.where(better, first, err_pos), tl.where(better, b_code, err_code),
            tl.where(better, b_val, err_val))


@triton.jit(do_not_specialize=["n"])
def alloc_kernel(
    out_ptr,          # [n] int32 handles (output)
    n,
    status_ptr,       # [3] int64 (code, requested, available)
    ticket_ptr,       # [1] int32 programs finished, 0 between calls
    table_ptr, kinds_ptr, hstack_ptr, stacks_ptr, tops_ptr, slot_handle_ptr,
    base, slab_bytes, unit, max_ups,
    POOL: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pop n units and n handles; program p binds positions [p*BLOCK, (p+1)*BLOCK).

    Every program reads the same tops; the last program to finish (by an acq_rel ticket) is the
    only writer of tops and status, so no program can see a half-updated stack.
    """
    top = tl.load(tops_ptr + POOL)
    htop = tl.load(tops_ptr + 2)
    avail = tl.minimum(top, htop)
    ok = avail >= n
    pos = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = tl.where(ok, pos < n, False)  # not `& ok`: Triton 3.9's interpreter rejects that mask
    h = _pop_units(pos, m, KIND, top, htop, stacks_ptr + base, hstack_ptr, table_ptr,
                   kinds_ptr, slot_handle_ptr, slab_bytes, unit, max_ups)
    tl.store(out_ptr + pos, h, mask=m)
    ticket = tl.atomic_add(ticket_ptr, 1)
    if ticket == tl.num_programs(0) - 1:
        if ok:
            tl.store(tops_ptr + POOL, top - n)
            tl.store(tops_ptr + 2, htop - n)
        tl.store(status_ptr, tl.where(ok, ERR_NONE, ERR_NO_SPACE).to(tl.int64))
        tl.store(status_ptr + 1, n + avail * 0)
        tl.store(status_ptr + 2, avail)
        tl.store(ticket_ptr, 0)


@triton.jit(do_not_specialize=["n"])
def free_kernel(
    handles_ptr,      # [n] int32
    n,
    status_ptr,       # [3] int64 (code, position, value); [8] with REPORT_TOPS
    mark_ptr,         # [H] int64 duplicate marks: the epoch of the last call that saw each handle
    epoch_ptr,        # [1] int64 call counter
    table_ptr, kinds_ptr, hstack_ptr, stacks_ptr, tops_ptr, slot_handle_ptr,
    base1, slab_bytes, unit0, unit1, max_ups, num_handles,
    REQ_KIND: tl.constexpr, POOL_KV: tl.constexpr, POOL_SSM: tl.constexpr, BLOCK: tl.constexpr,
    REPORT_TOPS: tl.constexpr,
):
    """``REPORT_TOPS``: the status buffer is the host's report (pinned host memory that the GPU
    writes through, so the host reads it after a stream sync with no copy), and the tops after the
    call go to its slots 4..6, as the allocator's one-buffer read brings them."""
    err_pos = tl.full((), _BIG, tl.int64)
    err_code = tl.full((), 0, tl.int64)
    err_val = tl.full((), 0, tl.int64)
    epoch = tl.load(epoch_ptr) + 1
    start = 0
    while start < n:
        pos = start + tl.arange(0, BLOCK).to(tl.int64)
        m = pos < n
        h = tl.load(handles_ptr + pos, mask=m, other=0)
        code = _check_handles(h, m, REQ_KIND, epoch, mark_ptr, kinds_ptr, num_handles)
        err_pos, err_code, err_val = _first_error(code, pos, h, err_pos, err_code, err_val)
        start += BLOCK
    tl.store(epoch_ptr, epoch)
    tl.debug_barrier()
    top0 = tl.load(tops_ptr)
    top1 = tl.load(tops_ptr + 1)
    htop = tl.load(tops_ptr + 2)
    if err_pos == _BIG:
        start = 0
        while start < n:
            pos = start + tl.arange(0, BLOCK).to(tl.int64)
            m = pos < n
            h = tl.load(handles_ptr + pos, mask=m, other=0)
            top0, top1, htop = _push_units(h, m, top0, top1, htop, stacks_ptr, base1, hstack_ptr,
                                           table_ptr, kinds_ptr, slot_handle_ptr,
                                           slab_bytes, unit0, unit1, max_ups, POOL_KV, POOL_SSM)
            start += BLOCK
        tl.store(tops_ptr, top0)
        tl.store(tops_ptr + 1, top1)
        tl.store(tops_ptr + 2, htop)
    tl.store(status_ptr, err_code)
    tl.store(status_ptr + 1, tl.where(err_code == ERR_NONE, -1, err_pos))
    tl.store(status_ptr + 2, err_val)
    if REPORT_TOPS:
        tl.store(status_ptr + 4, top0)
        tl.store(status_ptr + 5, top1)
        tl.store(status_ptr + 6, htop)


@triton.jit(do_not_specialize=["n"])
def free_check_kernel(
    handles_ptr,      # [n] int32
    n,
    ws_ptr,           # [P, 6] int64 per program: first error (position, code, value), pool counts (0, 1, handles)
    mark_ptr, epoch_ptr, kinds_ptr, table_ptr, num_handles,
    REQ_KIND: tl.constexpr, POOL_KV: tl.constexpr, POOL_SSM: tl.constexpr, BLOCK: tl.constexpr,
):
    """First launch of a large free: program p validates positions [p*BLOCK, (p+1)*BLOCK) (marks
    stamped with the coming epoch, as ``free_kernel`` does) and counts its handles per pool, for
    ``free_commit_kernel`` to place them. Changes nothing but the marks."""
    pid = tl.program_id(0).to(tl.int64)
    pos = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = pos < n
    h = tl.load(handles_ptr + pos, mask=m, other=0)
    code = _check_handles(h, m, REQ_KIND, tl.load(epoch_ptr) + 1, mark_ptr, kinds_ptr, num_handles)
    none = tl.full((), 0, tl.int64)
    e_pos, e_code, e_val = _first_error(code, pos, h, none + _BIG, none, none)
    ok = m & (code == ERR_NONE)
    kind = tl.load(kinds_ptr + tl.where(ok, h, 0), mask=ok, other=0)
    in0 = ok & (tl.where(kind == KIND_KV, POOL_KV, POOL_SSM) == 0)
    row = ws_ptr + pid * 6
    tl.store(row, e_pos)
    tl.store(row + 1, e_code)
    tl.store(row + 2, e_val)
    tl.store(row + 3, tl.sum(in0.to(tl.int64), 0))
    tl.store(row + 4, tl.sum((ok & ~in0).to(tl.int64), 0))
    tl.store(row + 5, tl.sum(ok.to(tl.int64), 0))


@triton.jit(do_not_specialize=["n", "num_progs"])
def free_commit_kernel(
    handles_ptr, n, status_ptr, ws_ptr, num_progs, ticket_ptr, epoch_ptr,
    table_ptr, kinds_ptr, hstack_ptr, stacks_ptr, tops_ptr, slot_handle_ptr,
    base1, slab_bytes, unit0, unit1, max_ups,
    POOL_KV: tl.constexpr, POOL_SSM: tl.constexpr, BLOCK: tl.constexpr, PROGS_PAD: tl.constexpr,
):
    """Second launch: unless a program of the first found an error (then nothing is freed),
    program p pushes its handles at the stack tops plus the counts of programs before it, which
    is the order one program walking the input would push them in; the last program to finish
    (by an acq_rel ticket) moves the tops and writes the status, as ``alloc_kernel`` does."""
    pid = tl.program_id(0).to(tl.int64)
    o_p = tl.arange(0, PROGS_PAD).to(tl.int64)
    m_p = o_p < num_progs
    e_pos = tl.load(ws_ptr + o_p * 6, mask=m_p, other=_BIG)
    first = tl.min(e_pos, 0)
    ok = first == _BIG
    before = m_p & (o_p < pid)
    c0 = tl.load(ws_ptr + o_p * 6 + 3, mask=m_p, other=0)
    c1 = tl.load(ws_ptr + o_p * 6 + 4, mask=m_p, other=0)
    ch = tl.load(ws_ptr + o_p * 6 + 5, mask=m_p, other=0)
    top0 = tl.load(tops_ptr)
    top1 = tl.load(tops_ptr + 1)
    htop = tl.load(tops_ptr + 2)
    if ok:
        pos = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        m = pos < n
        h = tl.load(handles_ptr + pos, mask=m, other=0)
        _push_units(h, m, top0 + tl.sum(tl.where(before, c0, 0), 0), top1 + tl.sum(tl.where(before, c1, 0), 0),
                    htop + tl.sum(tl.where(before, ch, 0), 0), stacks_ptr, base1, hstack_ptr, table_ptr, kinds_ptr,
                    slot_handle_ptr, slab_bytes, unit0, unit1, max_ups, POOL_KV, POOL_SSM)
    ticket = tl.atomic_add(ticket_ptr, 1)
    if ticket == num_progs - 1:
        if ok:
            tl.store(tops_ptr, top0 + tl.sum(c0, 0))
            tl.store(tops_ptr + 1, top1 + tl.sum(c1, 0))
            tl.store(tops_ptr + 2, htop + tl.sum(ch, 0))
        sel = m_p & (e_pos == first)
        code = tl.sum(tl.where(sel, tl.load(ws_ptr + o_p * 6 + 1, mask=m_p, other=0), 0), 0)
        tl.store(status_ptr, code)
        tl.store(status_ptr + 1, tl.where(ok, -1, first))
        tl.store(status_ptr + 2, tl.sum(tl.where(sel, tl.load(ws_ptr + o_p * 6 + 2, mask=m_p, other=0), 0), 0))
        tl.store(epoch_ptr, tl.load(epoch_ptr) + 1)
        tl.store(ticket_ptr, 0)


@triton.jit(do_not_specialize=["n"])
def resolve_kernel(
    handles_ptr,      # [n] int32
    n,
    out_ptr,          # [n] int64 byte offsets (output)
    status_ptr,       # [3] int64 (code, position, value)
    table_ptr, kinds_ptr, num_handles,
    REQ_KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    err_pos = tl.full((), _BIG, tl.int64)
    err_code = tl.full((), 0, tl.int64)
    err_val = tl.full((), 0, tl.int64)
    start = 0
    while start < n:
        pos = start + tl.arange(0, BLOCK).to(tl.int64)
        m = pos < n
        h = tl.load(handles_ptr + pos, mask=m, other=0)
        inr = (h >= 0) & (h < num_handles)
        hs = tl.where(inr, h, 0)
        kind = tl.load(kinds_ptr + hs, mask=m & inr, other=0)
        off = tl.load(table_ptr + hs, mask=m & inr, other=-1)
        wrong = (REQ_KIND != 0) & (kind != REQ_KIND)
        code = tl.where(~inr, ERR_RANGE, tl.where(kind == 0, ERR_NOT_LIVE,
                                                  tl.where(wrong, ERR_WRONG_KIND, ERR_NONE)))
        code = tl.where(m, code, ERR_NONE)
        tl.store(out_ptr + pos, tl.where(code == ERR_NONE, off, -1), mask=m)
        err_pos, err_code, err_val = _first_error(code, pos, h, err_pos, err_code, err_val)
        start += BLOCK
    tl.store(status_ptr, err_code)
    tl.store(status_ptr + 1, tl.where(err_code == ERR_NONE, -1, err_pos))
    tl.store(status_ptr + 2, err_val)


@triton.jit
def _find_row(g, m, start_ptr, LOG_R: tl.constexpr):
    """Largest i with start[i] <= g (start non-decreasing, start[0] == 0): vector binary search."""
    lo = g * 0
    hi = lo + (1 << LOG_R) - 1
    for _ in tl.static_range(LOG_R):
        mid = (lo + hi + 1) // 2
        s = tl.load(start_ptr + mid, mask=m, other=_BIG)
        go = s <= g
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    return lo


@triton.jit
def grow_kernel(
    block_table_ptr,  # [R, W] int32 KV handles, -1 padded (updated in place)
    num_pages_ptr,    # [R] int32 pages held per row (updated in place)
    need_ptr,         # [R] int32 pages to add per row
    failed_ptr,       # [R] int32 out: 0 granted, ERR_NO_SPACE, ERR_BAD_COUNT (overflow or need < 0)
    work_ptr,         # [2, RP] int64 scratch: start and count of each row's new pages
    R, W, stride_bt, RP,
    table_ptr, kinds_ptr, hstack_ptr, stacks_ptr, tops_ptr, slot_handle_ptr,
    base, slab_bytes, unit, max_ups,
    POOL: tl.constexpr, LOG_R: tl.constexpr, BLOCK: tl.constexpr,
):
    """Append ``need[r]`` fresh KV pages to every row r, granting rows in order while units last.

    A row is granted all its pages or none; once a row does not fit, no later row with a
    non-zero need is granted (first come, first served). No host synchronisation.
    """
    top = tl.load(tops_ptr + POOL)
    htop = tl.load(tops_ptr + 2)
    avail = tl.minimum(top, htop)
    asked = tl.full((), 0, tl.int64)    # pages asked so far (granted or not): keeps order strict
    granted = tl.full((), 0, tl.int64)  # pages granted so far
    start = 0
    while start < RP:
        r = start + tl.arange(0, BLOCK).to(tl.int64)
        m = r < R
        need = tl.load(need_ptr + r, mask=m, other=0).to(tl.int64)
        held = tl.load(num_pages_ptr + r, mask=m, other=0).to(tl.int64)
        bad = m & ((need < 0) | (held + need > W) | (held < 0))
        eff = tl.where(m & ~bad, need, 0)
        cum = asked + tl.cumsum(eff, 0)
        ok = m & ~bad & ((eff == 0) | (cum <= avail))
        give = tl.where(ok, eff, 0)
        tl.store(work_ptr + r, granted + tl.cumsum(give, 0) - give, mask=r < RP)
        tl.store(work_ptr + RP + r, give, mask=r < RP)
        tl.store(failed_ptr + r, tl.where(bad, ERR_BAD_COUNT, tl.where(ok, 0, ERR_NO_SPACE)).to(tl.int32), mask=m)
        tl.store(num_pages_ptr + r, (held + give).to(tl.int32), mask=m)
        asked += tl.sum(eff, 0)
        granted += tl.sum(give, 0)
        start += BLOCK
    tl.debug_barrier()
    # scatter the granted pages: flat page g belongs to the last row whose start <= g
    g0 = 0
    while g0 < granted:
        g = g0 + tl.arange(0, BLOCK).to(tl.int64)
        m = g < granted
        row = _find_row(g, m, work_ptr, LOG_R)
        row_start = tl.load(work_ptr + row, mask=m, other=0)
        row_give = tl.load(work_ptr + RP + row, mask=m, other=0)
        held = tl.load(num_pages_ptr + row, mask=m, other=0).to(tl.int64)
        col = held - row_give + (g - row_start)
        h = _pop_units(g, m, KIND_KV, top, htop, stacks_ptr + base, hstack_ptr, table_ptr, kinds_ptr,
                       slot_handle_ptr, slab_bytes, unit, max_ups)
        tl.store(block_table_ptr + row * stride_bt + col, h, mask=m)
        g0 += BLOCK
    tl.store(tops_ptr + POOL, top - granted)
    tl.store(tops_ptr + 2, htop - granted)


@triton.jit
def _row_entry(g, m, rows_ptr, work_ptr, RP, block_table_ptr, stride_bt, num_pages_ptr, ssm_ptr,
               LOG_R: tl.constexpr, HAS_SSM: tl.constexpr):
    """Flat index g of a release -> (address kind, pointer offset, handle, required kind)."""
    i = _find_row(g, m, work_ptr, LOG_R)
    j = g - tl.load(work_ptr + i, mask=m, other=0)
    r = tl.load(rows_ptr + i, mask=m, other=0).to(tl.int64)
    held = tl.load(num_pages_ptr + r, mask=m, other=0).to(tl.int64)
    is_kv = j < held
    h_kv = tl.load(block_table_ptr + r * stride_bt + j, mask=m & is_kv, other=-1)
    if HAS_SSM:
        h_ssm = tl.load(ssm_ptr + r, mask=m & ~is_kv, other=-1)
        h = tl.where(is_kv, h_kv, h_ssm)
    else:
        h = h_kv
    req = tl.where(is_kv, KIND_KV, KIND_SSM)
    return r, j, is_kv, h.to(tl.int64), req


@triton.jit
def release_kernel(
    rows_ptr,         # [M] int32 rows to release, -1 = skip
    M,
    block_table_ptr,  # [R, W] int32 (released rows are reset to -1)
    num_pages_ptr,    # [R] int32 (released rows are reset to 0)
    ssm_ptr,          # [R] int32 SSM handle per row, -1 = none (reset to -1); unused if not HAS_SSM
    status_ptr,       # [3] int64 (code, flat position, value)
    work_ptr,         # [2, RP] int64 scratch
    mark_ptr,         # [H] int64 duplicate marks (see free_kernel)
    epoch_ptr,
    R, W, stride_bt, RP,
    table_ptr, kinds_ptr, hstack_ptr, stacks_ptr, tops_ptr, slot_handle_ptr,
    base1, slab_bytes, unit0, unit1, max_ups, num_handles,
    POOL_KV: tl.constexpr, POOL_SSM: tl.constexpr, HAS_SSM: tl.constexpr,
    LOG_R: tl.constexpr, BLOCK: tl.constexpr,
):
    """Free every handle of the listed rows (KV pages, then the row's SSM block); all or nothing."""
    err_pos, err_code, err_val, total = _release_count(rows_ptr, M, num_pages_ptr, ssm_ptr, work_ptr, R, W, RP,
                                                       HAS_SSM, BLOCK)
    tl.debug_barrier()
    if err_pos == _BIG:
        err_pos, err_code, err_val = _release_check(
            total, err_pos, err_code, err_val, rows_ptr, work_ptr, RP, block_table_ptr, stride_bt, num_pages_ptr,
            ssm_ptr, mark_ptr, epoch_ptr, kinds_ptr, num_handles, LOG_R, HAS_SSM, BLOCK)
    if err_pos == _BIG:
        _release_push(total, rows_ptr, M, work_ptr, RP, block_table_ptr, stride_bt, num_pages_ptr, ssm_ptr,
                      table_ptr, kinds_ptr, hstack_ptr, stacks_ptr, tops_ptr, slot_handle_ptr,
                      base1, slab_bytes, unit0, unit1, max_ups, POOL_KV, POOL_SSM, HAS_SSM, LOG_R, BLOCK)
    tl.store(status_ptr, err_code)
    tl.store(status_ptr + 1, tl.where(err_code == ERR_NONE, -1, err_pos))
    tl.store(status_ptr + 2, err_val)


@triton.jit
def _release_count(rows_ptr, M, num_pages_ptr, ssm_ptr, work_ptr, R, W, RP,
                   HAS_SSM: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1: check the rows and their page counts; ``work`` gets each row's first entry and its
    count of handles. Returns (first error position, code, value; total handles)."""
    err_pos = tl.full((), _BIG, tl.int64)
    err_code = tl.full((), 0, tl.int64)
    err_val = tl.full((), 0, tl.int64)
    total = tl.full((), 0, tl.int64)
    start = 0
    while start < RP:
        i = start + tl.arange(0, BLOCK).to(tl.int64)
        m = i < M
        r = tl.load(rows_ptr + i, mask=m, other=-1).to(tl.int64)
        use = m & (r != -1)
        bad_row = use & ((r < 0) | (r >= R))
        rs = tl.where(use & ~bad_row, r, 0)
        held = tl.load(num_pages_ptr + rs, mask=use & ~bad_row, other=0).to(tl.int64)
        bad_cnt = use & ~bad_row & ((held < 0) | (held > W))
        cnt = tl.where(use & ~bad_row & ~bad_cnt, held, 0)
        if HAS_SSM:
            cnt += (tl.load(ssm_ptr + rs, mask=use & ~bad_row & ~bad_cnt, other=-1) >= 0).to(tl.int64)
        code = tl.where(bad_row, ERR_BAD_ROW, tl.where(bad_cnt, ERR_BAD_COUNT, ERR_NONE))
        err_pos, err_code, err_val = _first_error(code, i, r, err_pos, err_code, err_val)
        tl.store(work_ptr + i, total + tl.cumsum(cnt, 0) - cnt, mask=i < RP)
        tl.store(work_ptr + RP + i, cnt, mask=i < RP)
        total += tl.sum(cnt, 0)
        start += BLOCK
    return err_pos, err_code, err_val, total


@triton.jit
def _release_check(total, err_pos, err_code, err_val, rows_ptr, work_ptr, RP, block_table_ptr, stride_bt,
                   num_pages_ptr, ssm_ptr, mark_ptr, epoch_ptr, kinds_ptr, num_handles,
                   LOG_R: tl.constexpr, HAS_SSM: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: every handle of the rows is live, of its kind, and held once."""
    epoch = tl.load(epoch_ptr) + 1
    g0 = 0
    while g0 < total:
        g = g0 + tl.arange(0, BLOCK).to(tl.int64)
        m = g < total
        r, j, is_kv, h, req = _row_entry(g, m, rows_ptr, work_ptr, RP, block_table_ptr, stride_bt,
                                         num_pages_ptr, ssm_ptr, LOG_R, HAS_SSM)
        code = _check_handles(h, m, req, epoch, mark_ptr, kinds_ptr, num_handles)
        err_pos, err_code, err_val = _first_error(code, g, h, err_pos, err_code, err_val)
        g0 += BLOCK
    tl.store(epoch_ptr, epoch)
    tl.debug_barrier()
    return err_pos, err_code, err_val


@triton.jit
def _release_push(total, rows_ptr, M, work_ptr, RP, block_table_ptr, stride_bt, num_pages_ptr, ssm_ptr,
                  table_ptr, kinds_ptr, hstack_ptr, stacks_ptr, tops_ptr, slot_handle_ptr,
                  base1, slab_bytes, unit0, unit1, max_ups,
                  POOL_KV: tl.constexpr, POOL_SSM: tl.constexpr, HAS_SSM: tl.constexpr,
                  LOG_R: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 3 (all checks passed): push every unit and handle back, then reset the rows."""
    top0 = tl.load(tops_ptr)
    top1 = tl.load(tops_ptr + 1)
    htop = tl.load(tops_ptr + 2)
    g0 = 0
    while g0 < total:
        g = g0 + tl.arange(0, BLOCK).to(tl.int64)
        m = g < total
        r, j, is_kv, h, req = _row_entry(g, m, rows_ptr, work_ptr, RP, block_table_ptr, stride_bt,
                                         num_pages_ptr, ssm_ptr, LOG_R, HAS_SSM)
        top0, top1, htop = _push_units(h, m, top0, top1, htop, stacks_ptr, base1, hstack_ptr,
                                       table_ptr, kinds_ptr, slot_handle_ptr,
                                       slab_bytes, unit0, unit1, max_ups, POOL_KV, POOL_SSM)
        g0 += BLOCK
    tl.debug_barrier()
    g0 = 0
    while g0 < total:
        g = g0 + tl.arange(0, BLOCK).to(tl.int64)
        m = g < total
        r, j, is_kv, h, req = _row_entry(g, m, rows_ptr, work_ptr, RP, block_table_ptr, stride_bt,
                                         num_pages_ptr, ssm_ptr, LOG_R, HAS_SSM)
        tl.store(block_table_ptr + r * stride_bt + j, (h * 0 - 1).to(tl.int32), mask=m & is_kv)
        if HAS_SSM:
            tl.store(ssm_ptr + r, (h * 0 - 1).to(tl.int32), mask=m & ~is_kv)
        g0 += BLOCK
    tl.debug_barrier()
    start = 0
    while start < RP:
        i = start + tl.arange(0, BLOCK).to(tl.int64)
        m = i < M
        r = tl.load(rows_ptr + i, mask=m, other=-1).to(tl.int64)
        tl.store(num_pages_ptr + r, (r * 0).to(tl.int32), mask=m & (r != -1))
        start += BLOCK
    tl.store(tops_ptr, top0)
    tl.store(tops_ptr + 1, top1)
    tl.store(tops_ptr + 2, htop)


@triton.jit
def drop_slabs_kernel(
    stack_ptr,        # the donor pool's stack
    tops_ptr,
    victim_ptr,       # [S] int32: 1 for slabs leaving the pool
    slab_bytes,
    POOL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Remove the free units of leaving slabs from a pool's stack, keeping the others' order."""
    top = tl.load(tops_ptr + POOL)
    tl.store(tops_ptr + POOL, _drop_flagged_units(stack_ptr, 0, top, victim_ptr, slab_bytes, BLOCK))


@triton.jit(do_not_specialize=["k", "n_moves"])
def collect_moves_kernel(
    victims_ptr,      # [k] int32 slabs to empty
    k,
    moves_ptr,        # [3, n_moves] int64 out: handle, src offset, dst offset
    n_moves,
    stack_ptr, tops_ptr, slot_handle_ptr,
    slab_bytes, unit, ups, max_ups,
    POOL: tl.constexpr, BLOCK: tl.constexpr,
):
    """List the live units of the victim slabs and pop a destination unit for each."""
    top = tl.load(tops_ptr + POOL)
    j = tl.full((), 0, tl.int64)
    i = 0
    while i < k:
        s = tl.load(victims_ptr + i).to(tl.int64)
        c0 = 0
        while c0 < ups:
            idx = c0 + tl.arange(0, BLOCK).to(tl.int64)
            h = tl.load(slot_handle_ptr + s * max_ups + idx, mask=idx < ups, other=-1)
            live = h >= 0
            pos = j + tl.cumsum(live.to(tl.int64), 0) - 1
            dst = tl.load(stack_ptr + (top - 1 - pos), mask=live, other=0)
            tl.store(moves_ptr + pos, h.to(tl.int64), mask=live)
            tl.store(moves_ptr + n_moves + pos, s * slab_bytes + idx * unit, mask=live)
            tl.store(moves_ptr + 2 * n_moves + pos, dst, mask=live)
            j += tl.sum(live.to(tl.int64), 0)
            c0 += BLOCK
        i += 1
    tl.store(tops_ptr + POOL, top - j)


@triton.jit(do_not_specialize=["n_moves"])
def move_units_kernel(
    arena_ptr,        # [capacity / 4] int32 view of the arena
    moves_ptr,        # [3, n_moves] int64: handle, src offset, dst offset
    n_moves,
    table_ptr, slot_handle_ptr,
    slab_bytes, unit, max_ups,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Copy unit ``pid0`` (chunk ``pid1``) to its new place; chunk 0 also rebinds its handle."""
    j = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    h = tl.load(moves_ptr + j)
    src = tl.load(moves_ptr + n_moves + j)
    dst = tl.load(moves_ptr + 2 * n_moves + j)
    words = unit // 4
    src_w = tl.multiple_of(src // 4, 4)  # units are 16-byte aligned: 16-byte vector copies
    dst_w = tl.multiple_of(dst // 4, 4)
    for b in tl.static_range(CHUNK // BLOCK):
        o = c * CHUNK + b * BLOCK + tl.arange(0, BLOCK)
        m = o < words
        x = tl.load(arena_ptr + src_w + o, mask=m)
        tl.store(arena_ptr + dst_w + o, x, mask=m)
    if c == 0:
        tl.store(table_ptr + h, dst)
        s_slab, s_idx = _slot_of(src, slab_bytes, unit)
        d_slab, d_idx = _slot_of(dst, slab_bytes, unit)
        tl.store(slot_handle_ptr + s_slab * max_ups + s_idx, -1)
        tl.store(slot_handle_ptr + d_slab * max_ups + d_idx, h.to(tl.int32))


@triton.jit(do_not_specialize=["k"])
def adopt_slabs_kernel(
    victims_ptr,      # [k] int32 slabs joining the pool (empty)
    k,
    stack_ptr, tops_ptr, slab_owner_ptr, slot_handle_ptr,
    slab_bytes, unit, ups, max_ups,
    POOL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Hand empty slabs to pool POOL and push their units so the first victim's unit 0 pops first."""
    top = _adopt_slabs(k, POOL, victims_ptr, slab_owner_ptr, slab_owner_ptr, slot_handle_ptr, stack_ptr, 0,
                       tl.load(tops_ptr + POOL), ups, unit, slab_bytes, max_ups, BLOCK, False)
    tl.store(tops_ptr + POOL, top)


@triton.jit
def _proactive_below(top, units, low_fp, SCALE: tl.constexpr):
    """Free fraction top / units < low (exact integer test; a pool with no units counts as empty)."""
    return tl.where(units > 0, top * SCALE < low_fp * units, low_fp > 0)


@triton.jit
def proactive_kernel(
    stacks_ptr,       # [..] int64 both pools' free-unit stacks; pool 1 starts at base1
    tops_ptr,         # [3] int64 top of pool 0, pool 1, handle stack
    slab_owner_ptr,   # [S] int32 pool of each slab
    slot_handle_ptr,  # [S, max_ups] int32 reverse map (handle or -1)
    flag_ptr,         # [S] int32 scratch: 1 for a slab leaving its pool; all 0 between calls
    victims_ptr,      # [>= batch] int32 scratch: the slabs moved, lowest index first
    counters_ptr,     # [2] int64 (events that moved >= 1 slab, slabs moved), accumulated
    S, base1, slab_bytes, unit0, unit1, ups0, ups1, max_ups,
    low_fp, high_fp,  # watermarks on the free fraction, as integers over SCALE
    batch,            # most slabs moved per call
    SCALE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_U: tl.constexpr,
):
    """Watermark policy, decided on the device: if one pool's free fraction is below ``low`` while
    the other's is above ``high``, move up to ``batch`` completely free slabs (no live unit) of the
    other pool, lowest-numbered first, to it. No unit is copied. The move never takes the donor's
    free fraction below ``low`` (k free slabs are taken only while
    (top_d - k ups_d) * SCALE >= low_fp * (units_d - k ups_d)), so a move cannot trip the opposite
    move by itself, and the donor keeps at least one slab. The cheap check reads the tops and the
    slab owners only; the per-slab live count (from the reverse map) runs only when the watermarks
    trip.
    """
    top0 = tl.load(tops_ptr)
    top1 = tl.load(tops_ptr + 1)
    n0, n1 = _owned_slabs(slab_owner_ptr, S, BLOCK)
    units0 = n0 * ups0
    units1 = n1 * ups1
    to0 = _proactive_below(top0, units0, low_fp, SCALE) & (top1 * SCALE > high_fp * units1)
    to1 = _proactive_below(top1, units1, low_fp, SCALE) & (top0 * SCALE > high_fp * units0)
    if to0 | to1:
        # p receives, d gives (to0 and to1 never hold together: low <= high)
        p = tl.where(to0, 0, 1).to(tl.int64)
        d = 1 - p
        top_d = tl.where(to0, top1, top0)
        units_d = tl.where(to0, units1, units0)
        ups_d = tl.where(to0, ups1, ups0).to(tl.int64)
        ups_p = tl.where(to0, ups0, ups1).to(tl.int64)
        unit_p = tl.where(to0, unit0, unit1).to(tl.int64)
        base_d = tl.where(to0, base1, 0).to(tl.int64)
        base_p = tl.where(to0, 0, base1).to(tl.int64)
        top_p = tl.where(to0, top0, top1)
        # donor stays at or above the low watermark (denominator > 0: the donor is above high <= 1)
        cap = (top_d * SCALE - low_fp * units_d) // (ups_d * (SCALE - low_fp))
        cap = tl.minimum(tl.minimum(cap, batch), tl.where(to0, n1, n0) - 1)  # the donor keeps a slab
        found = _free_slabs_of(d, cap, ups_d, slab_owner_ptr, slot_handle_ptr, flag_ptr, victims_ptr, S, max_ups,
                               BLOCK, BLOCK_U)
        tl.debug_barrier()
        if found > 0:
            w = _drop_flagged_units(stacks_ptr, base_d, top_d, flag_ptr, slab_bytes, BLOCK)
            top_p = _adopt_slabs(found, p.to(tl.int32), victims_ptr, slab_owner_ptr, flag_ptr, slot_handle_ptr,
                                 stacks_ptr, base_p, top_p, ups_p, unit_p, slab_bytes, max_ups, BLOCK, True)
            tl.store(tops_ptr + d, w)
            tl.store(tops_ptr + p, top_p)
            tl.store(counters_ptr, tl.load(counters_ptr) + 1)
            tl.store(counters_ptr + 1, tl.load(counters_ptr + 1) + found)


@triton.jit
def _owned_slabs(slab_owner_ptr, S, BLOCK: tl.constexpr):
    """(slabs of pool 0, slabs of pool 1)."""
    n0 = tl.full((), 0, tl.int64)
    n1 = tl.full((), 0, tl.int64)
    start = 0
    while start < S:
        s = start + tl.arange(0, BLOCK).to(tl.int64)
        o = tl.load(slab_owner_ptr + s, mask=s < S, other=-1)
        n0 += tl.sum((o == 0).to(tl.int64), 0)
        n1 += tl.sum((o == 1).to(tl.int64), 0)
        start += BLOCK
    return n0, n1


@triton.jit
def _free_slabs_of(d, cap, ups_d, slab_owner_ptr, slot_handle_ptr, flag_ptr, victims_ptr, S, max_ups,
                   BLOCK: tl.constexpr, BLOCK_U: tl.constexpr):
    """The first ``cap`` completely free slabs of pool ``d``, by index: flagged, and listed in
    ``victims``. Returns how many were found."""
    found = tl.full((), 0, tl.int64)
    start = 0
    while (start < S) & (found < cap):
        s = start + tl.arange(0, BLOCK).to(tl.int64)
        ms = s < S
        o = tl.load(slab_owner_ptr + s, mask=ms, other=-1)
        cand = ms & (o == d)
        live = tl.zeros((BLOCK,), dtype=tl.int64)
        u0 = 0
        while u0 < ups_d:
            u = u0 + tl.arange(0, BLOCK_U).to(tl.int64)
            h = tl.load(slot_handle_ptr + s[:, None] * max_ups + u[None, :],
                        mask=cand[:, None] & (u[None, :] < ups_d), other=-1)
            live += tl.sum((h >= 0).to(tl.int64), 1)
            u0 += BLOCK_U
        free = cand & (live == 0)
        rank = found + tl.cumsum(free.to(tl.int64), 0)
        take = free & (rank <= cap)
        tl.store(flag_ptr + s, (s * 0 + 1).to(tl.int32), mask=take)
        tl.store(victims_ptr + (rank - 1), s.to(tl.int32), mask=take)
        found += tl.sum(take.to(tl.int64), 0)
        start += BLOCK
    return found


@triton.jit
def _drop_flagged_units(stacks_ptr, base_d, top_d, flag_ptr, slab_bytes, BLOCK: tl.constexpr):
    """Drop the units of flagged slabs from the donor's stack, keeping the others' order; returns
    the new top."""
    w = tl.full((), 0, tl.int64)
    start = 0
    while start < top_d:
        pos = start + tl.arange(0, BLOCK).to(tl.int64)
        m = pos < top_d
        off = tl.load(stacks_ptr + base_d + pos, mask=m, other=0)
        leaving = tl.load(flag_ptr + off // slab_bytes, mask=m, other=1)
        keep = m & (leaving == 0)
        c = tl.cumsum(keep.to(tl.int64), 0)
        tl.debug_barrier()  # every lane has read its entry before any lane overwrites one
        tl.store(stacks_ptr + base_d + (w + c - 1), off, mask=keep)
        w += tl.sum(keep.to(tl.int64), 0)
        tl.debug_barrier()
        start += BLOCK
    return w


@triton.jit
def _adopt_slabs(found, owner, victims_ptr, slab_owner_ptr, flag_ptr, slot_handle_ptr, stacks_ptr, base_p, top_p,
                 ups_p, unit_p, slab_bytes, max_ups, BLOCK: tl.constexpr, CLEAR_FLAGS: tl.constexpr):
    """Pool ``owner`` (int32) adopts the victims: last victim pushed first, its units high to low, so
    victims[0] unit 0 pops first; with CLEAR_FLAGS their ``flag`` entries are reset. Returns the
    receiver's new top."""
    i = 0
    while i < found:
        s1 = tl.load(victims_ptr + (found - 1 - i)).to(tl.int64)
        tl.store(slab_owner_ptr + s1, owner)
        if CLEAR_FLAGS:
            tl.store(flag_ptr + s1, 0)
        c0 = 0
        while c0 < max_ups:
            q = c0 + tl.arange(0, BLOCK)
            tl.store(slot_handle_ptr + s1 * max_ups + q, -1, mask=q < max_ups)
            c0 += BLOCK
        c0 = 0
        while c0 < ups_p:
            q = c0 + tl.arange(0, BLOCK).to(tl.int64)
            tl.store(stacks_ptr + base_p + (top_p + q), s1 * slab_bytes + (ups_p - 1 - q) * unit_p,
                     mask=q < ups_p)
            c0 += BLOCK
        top_p += ups_p
        i += 1
    return top_p
