"""Peer kernels our decode kernels are benchmarked against, fed from OUR data conventions.

Each ``prepare_*`` builds the peer's own input format once (outside the timed region) and returns
a zero-argument callable that runs only the peer's kernel(s): time that callable.

Our conventions (one layer; page ids are physical page indices, i.e. handles already resolved):
  q            [B, Hq, D]
  k/v_cache    [num_pages, Hkv, page_tokens, D]   (our page layout, avmp_triton/layout.py; strided
                                                   views into the arena are fine)
  block_table  int32 [B, max_blocks], -1 padded;  seq_lens int32 [B]
  Mamba1: state [N, d_inner, d_state]; x, dt, z [B, d_inner]; A [d_inner, d_state];
          B, C [B, d_state]; D, dt_bias [d_inner]
  Mamba2: state [N, nheads, head_dim, d_state]; x, z [B, nheads * head_dim]; dt [B, nheads];
          A, D, dt_bias [nheads]; B, C [B, ngroups, d_state]
  state_batch_indices int32 [B]: rows of the state pool, updated in place.

Prefill (packed chunk of B requests, T tokens; cu_seqlens int32 [B+1]):
  q            [T, Hq, D];  cu_seqlens_q [B+1];  seq_lens [B] = cached prefix + new tokens
  Mamba2 scan: x [T, nheads, head_dim]; dt [T, nheads]; B, C [T, ngroups, d_state]; A, D, dt_bias
               [nheads]; ssm state pool [N, nheads, head_dim, d_state]
  conv1d:      x [T, channels] (Mamba2: x|B|C); weight [channels, d_conv]; conv state pool
               [N, d_conv - 1, channels] (vLLM's default "SD" layout, ours too)
  num_computed_tokens [B] (host ints): tokens of each request already in its state (> 0: the
               request continues from its state, as vLLM's has_initial_states_p).

vLLM's kernels come from ``.vendor/vllm_kernels`` (``python perf/vendor_vllm.py``), override
with AVMP_VLLM_VENDOR=DIR.
"""
from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENDOR = os.environ.get("AVMP_VLLM_VENDOR", os.path.join(REPO, ".vendor", "vllm_kernels"))

# vLLM's TritonAttentionMetadataBuilder constants (vllm/v1/attention/backends/triton_attn.py):
# batches with at most 128 // Hkv sequences run the split-K ("3D") kernel with 16 segments.
MIN_LAUNCH_GRID_SIZE_2D = 128
NUM_PAR_SOFTMAX_SEGMENTS = 16


def _vllm(module: str):
    if not os.path.isdir(os.path.join(VENDOR, "vllm")):
        raise ImportError(f"no vendored vLLM kernels in {VENDOR}: run python perf/vendor_vllm.py")
    if VENDOR not in sys.path:
        sys.path.insert(0, VENDOR)
    mod = __import__(module, fromlist=["_"])
    if not os.path.abspath(mod.__file__).startswith(os.path.abspath(VENDOR)):
        raise ImportError(f"{module} came from {mod.__file__}, not the vendored copy")
    return mod


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def vllm_version() -> str:
    return _vllm("vllm").__version__


# ------------------------------------------------------------------------------------------------
# vLLM unified attention (Triton), pure decode


def prepare_vllm_unified_attention(q, k_cache, v_cache, block_table, seq_lens, scale, *,
                                   seq_threshold_3D: int | None = None, cu_seqlens_q=None,
                                   max_seqlen_q: int | None = None):
    """vLLM's ``unified_attention`` as its Triton backend calls it.

    Decode (default): q ``[B, Hq, D]``, one query token per sequence. Prefill / append: pass
    ``cu_seqlens_q`` ``[B+1]`` int32 (packed q ``[T, Hq, D]``, request b's new tokens are the last
    ``q_len_b`` of its ``seq_lens[b]`` positions, causal) and ``max_seqlen_q`` (host int, as the
    backend's metadata holds it).

    ``seq_threshold_3D`` defaults to vLLM's 128 // Hkv (with CUDA graphs vLLM rounds it to the
    nearest capture size, the same value for Hkv in 1, 2, 4, 8); pass 0 to force the 2D kernel.
    A batch with ``max_seqlen_q`` > 8 always takes the 2D kernel (vLLM's MAX_3D_QUERY_LEN).
    """
    ua = _vllm("vllm.v1.attention.ops.triton_unified_attention")
    T, Hq, D = q.shape
    B = seq_lens.shape[0]
    _, Hkv, _, _ = k_cache.shape
    dev = q.device
    # vLLM allocates K and V as [num_blocks, block_size, Hkv, D] (last two dims contiguous).
    k = k_cache.permute(0, 2, 1, 3).contiguous()
    v = v_cache.permute(0, 2, 1, 3).contiguous()
    out = torch.empty_like(q)
    if cu_seqlens_q is None:
        if T != B:
            raise ValueError(f"decode q has {T} rows for {B} sequences: pass cu_seqlens_q for prefill")
        cu_seqlens_q = torch.arange(B + 1, dtype=torch.int32, device=dev)  # one query token each
        max_seqlen_q = 1
    elif max_seqlen_q is None:
        raise ValueError("with cu_seqlens_q, pass max_seqlen_q (host int) as vLLM's metadata does")
    threshold = MIN_LAUNCH_GRID_SIZE_2D // Hkv if seq_threshold_3D is None else seq_threshold_3D
    rows = max(threshold, 1)  # vLLM sizes split-K scratch for min(threshold, max_num_seqs) tokens
    segs = NUM_PAR_SOFTMAX_SEGMENTS
    one = torch.ones((), dtype=torch.float32, device=dev)  # layer._k_scale: unread without fp8 KV
    args = dict(
        q=q, k=k, v=v, out=out,
        cu_seqlens_q=cu_seqlens_q.to(torch.int32),
        max_seqlen_q=int(max_seqlen_q),
        seqused_k=seq_lens.to(torch.int32),
        max_seqlen_k=int(seq_lens.max()),
        softmax_scale=scale, causal=True, window_size=(-1, -1),
        block_table=block_table.to(torch.int32), softcap=0,
        q_descale=None, k_descale=one.expand(B, Hkv), v_descale=one.expand(B, Hkv),
        seq_threshold_3D=threshold, num_par_softmax_segments=segs,
        softmax_segm_output=torch.empty(rows, Hq, segs, _next_pow2(D), dtype=torch.float32, device=dev),
        softmax_segm_max=torch.empty(rows, Hq, segs, dtype=torch.float32, device=dev),
        softmax_segm_expsum=torch.empty(rows, Hq, segs, dtype=torch.float32, device=dev),
    )

    def run():
        ua.unified_attention(**args)
        return out

    # which vLLM kernel path this batch takes (unified_attention's own test; BLOCK_Q = 16 // GQA
    # query tokens per program for GQA <= 16)
    block_q = max(1, 16 // (Hq // Hkv)) if Hq // Hkv <= 16 else 1
    run.uses_3d = (int(max_seqlen_q) <= 8 and B * -(-int(max_seqlen_q) // block_q) <= threshold
                   and rows >= T)
    return run


# ------------------------------------------------------------------------------------------------
# vLLM selective_state_update (Triton), Mamba1 and Mamba2 decode


def prepare_vllm_selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices,
                                        mamba_version: int, *, dt_softplus: bool = True,
                                        null_block_id: int = -1):
    """vLLM's ``selective_state_update`` with the argument shapes its mixers build.

    Updates ``state`` rows in place; the callable returns y in our layout ([B, d_inner]).
    ``null_block_id``: vLLM reserves state row 0 (NULL_BLOCK_ID) as padding and skips it; our
    pools may hand out row 0, so the default -1 matches no row (the kernel does the same compare).
    """
    ssm = _vllm("vllm.model_executor.layers.mamba.ops.mamba_ssm")
    Bt = x.shape[0]
    if mamba_version == 1:
        # mamba_mixer.py passes these as they are; the kernel views them as one head.
        st, x_, dt_, A_, B_, C_, D_, dtb, z_ = state, x, dt, A, B, C, D, dt_bias, z
        out = torch.empty_like(x)
    elif mamba_version == 2:
        N, nheads, head_dim, d_state = state.shape
        ngroups = B.shape[1]
        # As mamba_mixer2.py: per-head scalars expanded (stride 0) over head_dim / d_state, which
        # the kernel detects (TIE_HDIM) and loads once per head.
        st = state
        A_ = A[:, None, None].expand(-1, head_dim, d_state).to(torch.float32)
        dt_ = dt[:, :, None].expand(-1, -1, head_dim)
        dtb = dt_bias[:, None].expand(-1, head_dim)
        D_ = D[:, None].expand(-1, head_dim)
        B_, C_ = B.view(Bt, ngroups, -1), C.view(Bt, ngroups, -1)
        x_ = x.view(Bt, nheads, head_dim)
        z_ = None if z is None else z.view(Bt, nheads, head_dim)
        out = torch.empty_like(x_)
    else:
        raise ValueError(f"mamba_version must be 1 or 2, got {mamba_version!r}")
    idx = state_batch_indices.to(torch.int32)
    is_blackwell = torch.cuda.is_available() and torch.cuda.get_device_capability(x.device)[0] == 10

    def run():
        ssm.selective_state_update(st, x_, dt_, A_, B_, C_, D_, dtb, z=z_, dt_softplus=dt_softplus,
                                   state_batch_indices=idx, dst_state_batch_indices=idx,
                                   null_block_id=null_block_id, out=out, is_blackwell=is_blackwell)
        return out.view(Bt, -1)

    return run


# ------------------------------------------------------------------------------------------------
# vLLM Mamba prefill (Triton): the Mamba2 chunked scan and the causal conv1d, as MambaMixer2 calls
# them with the metadata its builders (Mamba2AttentionMetadataBuilder, mamba_attn.py) make


def _prefill_host_meta(cu_seqlens, num_computed_tokens):
    """(query_start_loc_p_cpu int32 [B+1], num_computed_tokens_p_cpu int64 [B]) on the host, as the
    metadata builder keeps them (it never reads them back from the GPU)."""
    cu = torch.as_tensor([int(v) for v in cu_seqlens.tolist()] if isinstance(cu_seqlens, torch.Tensor)
                         else list(cu_seqlens), dtype=torch.int32)
    comp = torch.as_tensor(list(num_computed_tokens), dtype=torch.int64)
    if comp.numel() != cu.numel() - 1:
        raise ValueError(f"{comp.numel()} num_computed_tokens for {cu.numel() - 1} requests")
    return cu, comp


def vllm_mamba2_chunk_metadata(cu_seqlens, num_computed_tokens, chunk_size: int, device):
    """vLLM's Mamba2 prefill chunk metadata, from its own builder code (cut from the wheel by
    vendor_vllm.py): chunks never cross a request and end on multiples of ``chunk_size`` of each
    request's ABSOLUTE positions (a continued request first finishes its partial chunk).

    Returns dict(cu_chunk_seqlens [nchunks+1], seq_idx [nchunks], last_chunk_indices [B]) int32 on
    ``device``, and the host lists under ``host``."""
    ma = _vllm("vllm.v1.attention.backends.mamba_attn")
    cu, comp = _prefill_host_meta(cu_seqlens, num_computed_tokens)
    cu_chunk, seq_idx, last, _ckpt = ma.BaseMambaAttentionMetadataBuilder._compute_chunk_metadata(
        chunk_size, cu.numel() - 1, comp, cu)
    t = (lambda v: torch.tensor(v, dtype=torch.int32, device=device))
    return dict(cu_chunk_seqlens=t(cu_chunk), seq_idx=t(seq_idx), last_chunk_indices=t(last),
                host=dict(cu_chunk_seqlens=cu_chunk, seq_idx=seq_idx, last_chunk_indices=last))


def prepare_vllm_mamba2_prefill(x, dt, A, B, C, D, dt_bias, ssm_state, state_indices, cu_seqlens,
                                num_computed_tokens, chunk_size: int, *, z=None, dt_softplus: bool = True):
    """vLLM's ``mamba_chunk_scan_combined_varlen`` as MambaMixer2.conv_ssm_forward calls it for the
    prefill rows of a batch (vLLM 0.33, no prefix-caching checkpoints).

    - initial states: ``torch.where(has_initial_states_p[:, None, None, None],
      ssm_state[state_indices], 0)``, only when some request continues (``prep_initial_states``);
      this gather runs inside the callable, as in the mixer;
    - final states: written by the scan's state-passing kernel straight into
      ``ssm_state[state_indices[b]]`` (``final_states_out`` / ``final_state_indices``);
    - state_dtype = ssm_state.dtype (chunk-boundary states are kept in it), dt_limit (0, inf).

    ``ssm_state`` ``[N, nheads, head_dim, d_state]`` is updated in place; the callable returns y
    ``[T, nheads, head_dim]``. vLLM reserves state row 0 (NULL_BLOCK_ID) for padding; the scan
    itself does not test for it. ``chunk_size`` is the model's (``model_config.get_mamba_chunk_size()``).
    """
    ssd = _vllm("vllm.model_executor.layers.mamba.ops.ssd_combined")
    dev = x.device
    T, nheads, head_dim = x.shape
    meta = vllm_mamba2_chunk_metadata(cu_seqlens, num_computed_tokens, chunk_size, dev)
    has_init = torch.tensor([int(c) > 0 for c in num_computed_tokens], dtype=torch.bool, device=dev)
    prep_initial_states = bool(has_init.any())                       # computed on the host in vLLM
    idx = state_indices.to(torch.int32)
    query_start_loc = cu_seqlens.to(device=dev, dtype=torch.int32)
    out = torch.empty(T, nheads, head_dim, dtype=x.dtype, device=dev)

    def run():
        initial_states = None
        if prep_initial_states:
            initial_states = torch.where(has_init[:, None, None, None], ssm_state[idx], 0)
        ssd.mamba_chunk_scan_combined_varlen(
            x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
            seq_idx=meta["seq_idx"], cu_seqlens=query_start_loc, cu_chunk_seqlens=meta["cu_chunk_seqlens"],
            last_chunk_indices=meta["last_chunk_indices"], initial_states=initial_states,
            return_intermediate_states=False, dt_softplus=dt_softplus, dt_limit=(0.0, float("inf")),
            out=out, state_dtype=ssm_state.dtype, final_states_out=ssm_state, final_state_indices=idx)
        return out

    run.meta = dict(chunk_size=chunk_size, prep_initial_states=prep_initial_states,
                    nchunks=len(meta["host"]["seq_idx"]))
    return run


def prepare_vllm_causal_conv1d(x, weight, bias, conv_state, state_indices, cu_seqlens, num_computed_tokens, *,
                               activation: str | None = "silu"):
    """vLLM's Triton ``causal_conv1d_fn`` as MambaMixer2 (and MambaMixer) call it for prefill rows.

    ``x`` is our ``[T, channels]`` (token-major; may be a column slice of the in_proj output, as in
    the mixer); vLLM's kernel sees its transpose ``[channels, T]`` (channel-last in memory) and
    writes a new ``[channels, T]`` output of the same memory order, returned here transposed back to
    ``[T, channels]``. ``conv_state`` ``[N, d_conv - 1, channels]`` (vLLM's default "SD" conv-state
    layout) is passed as its ``(..., dim, width - 1)`` transpose and updated in place. The grid
    metadata (``nums_dict``, ``batch_ptr``, ``token_chunk_offset_ptr``) comes from vLLM's
    ``compute_causal_conv1d_metadata`` on the host, as the metadata builder makes it, so the call
    does not synchronise. vLLM skips a request whose state index is NULL_BLOCK_ID (0): keep row 0
    out of ``state_indices``, as vLLM's block pool does.
    """
    cc = _vllm("vllm.model_executor.layers.mamba.ops.causal_conv1d")
    bu = _vllm("vllm.v1.attention.backends.utils")
    from types import SimpleNamespace

    dev = x.device
    cu, comp = _prefill_host_meta(cu_seqlens, num_computed_tokens)
    nums_dict, batch_ptr, token_chunk_offset_ptr = bu.compute_causal_conv1d_metadata(cu, device=dev)
    metadata = SimpleNamespace(nums_dict=nums_dict, batch_ptr=batch_ptr, token_chunk_offset_ptr=token_chunk_offset_ptr)
    has_init = (comp > 0).to(dev)
    idx = state_indices.to(torch.int32)
    query_start_loc = cu_seqlens.to(device=dev, dtype=torch.int32)
    xt = x.transpose(0, 1)                                 # hidden_states_B_C_p.transpose(0, 1)
    states = conv_state.transpose(-1, -2)                  # kv_cache[0].transpose(-1, -2) (SD layout)
    T = x.shape[0]

    def run():
        return cc.causal_conv1d_fn(xt, weight, bias, activation=activation, conv_states=states,
                                   has_initial_state=has_init, cache_indices=idx, metadata=metadata,
                                   query_start_loc=query_start_loc).transpose(0, 1)[:T]

    return run


# ------------------------------------------------------------------------------------------------
# torch SDPA prefill on contiguous per-request K/V (the unpaged ceiling)


def prepare_sdpa_prefill(q, k, v, scale, *, backend=None):
    """Causal SDPA of ``q`` ``[B, Hq, Lq, D]`` (the LAST Lq positions) over ``k, v`` ``[B, Hkv, Lk, D]``.

    Lq == Lk: ``is_causal=True``. Lq < Lk (new tokens after a cached prefix): the bottom-right
    aligned causal mask ``torch.nn.attention.bias.causal_lower_right``, which torch runs on its
    flash kernel when it can (else memory-efficient, else math); ``run.path`` records what
    ``can_use_flash_attention`` said. GQA as in ``prepare_sdpa_contiguous`` (``run.gqa``).
    Returns ``[B, Hq, Lq, D]``.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    backend = SDPBackend.FLASH_ATTENTION if backend is None else backend
    Bq, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Lq > Lk:
        raise ValueError(f"more queries ({Lq}) than keys ({Lk})")
    mask = None if Lq == Lk else causal_lower_right(Lq, Lk)

    def call(kk, vv, gqa):
        with sdpa_kernel(backend):
            if mask is None:
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale, enable_gqa=gqa)
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale, enable_gqa=gqa)

    k, v, gqa_mode = _gqa_or_repeat(call, k, v, Hq, Hkv)
    gqa = gqa_mode == "enable_gqa"

    def run():
        return call(k, v, gqa)

    run.gqa = gqa_mode
    run.mask = "is_causal" if mask is None else "causal_lower_right"
    run.path = "flash (is_causal)" if mask is None else _lower_right_path(q, k, v, gqa)
    return run


def _lower_right_path(q, k, v, gqa) -> str:
    try:
        from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

        try:
            p = SDPAParams(q, k, v, None, 0.0, False, gqa)
        except TypeError:                                  # torch without the enable_gqa field
            p = SDPAParams(q, k, v, None, 0.0, False)
        if can_use_flash_attention(p):
            return "flash (causal_lower_right)"
        if can_use_efficient_attention(p):
            return "memory-efficient (causal_lower_right)"
        return "math (causal_lower_right, mask materialised)"
    except Exception as e:  # noqa: BLE001 - a label only
        return f"unknown ({type(e).__name__})"


# ------------------------------------------------------------------------------------------------
# PyTorch FlexAttention over the paged cache


def prepare_flex_paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale, *, compile: bool = True):
    """FlexAttention decode through torch's PagedAttention helper
    (torch.nn.attention.experimental._paged_attention, present since torch 2.6).

    The helper's cache is one [1, Hkv, num_pages * page_tokens, D] tensor (physical token
    p * T + t); its page tables are filled from our block_table rather than from its own
    reserve() allocator, so both read the same pages. The logical mask (kv < seq_len) is
    converted to physical pages by the helper. Heads of the block mask are broadcast (H=None) and
    Hq/Hkv must be a power of two: only then does inductor pick its flex-decoding kernel with GQA.
    """
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    Bq, Hq, D = q.shape
    P, Hkv, T, _ = k_cache.shape
    W = block_table.shape[1]
    if W > P:
        raise ValueError(f"block_table width {W} > num_pages {P}: PagedAttention's table is [B, n_pages]")
    dev = q.device
    k = k_cache.permute(1, 0, 2, 3).reshape(1, Hkv, P * T, D)  # copies (permuted)
    v = v_cache.permute(1, 0, 2, 3).reshape(1, Hkv, P * T, D)

    pa = PagedAttention(n_pages=P, page_size=T, max_batch_size=Bq, device=dev)
    bt = block_table.to(torch.int64)
    seq = seq_lens.to(torch.int64)
    pa.page_table[:, :W] = bt
    live = (torch.arange(W, device=dev)[None, :] < (seq[:, None] + T - 1) // T) & (bt >= 0)
    rows, cols = live.nonzero(as_tuple=True)
    pa.physical_to_logical[rows, bt[rows, cols]] = cols
    pa.capacity = live.sum(1) * T

    def logical_mask(b, h, q_idx, kv_idx):
        return kv_idx < seq[b]

    logical = create_block_mask(logical_mask, Bq, None, 1, W * T, device=dev, BLOCK_SIZE=(128, T))
    block_mask = pa.convert_logical_block_mask(logical, kv_len=seq)
    fa = torch.compile(flex_attention, dynamic=False) if compile else flex_attention
    q4 = q.unsqueeze(2)
    gqa = Hq != Hkv

    def run():
        return fa(q4, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa).squeeze(2)

    return run


# ------------------------------------------------------------------------------------------------
# torch SDPA on contiguous K/V (no paging: the floor a paged kernel is compared with)


def _gqa_or_repeat(call, k, v, Hq: int, Hkv: int):
    """(k, v, mode): SDPA's own GQA ("enable_gqa") when the backend takes it, else K/V repeated to
    Hq heads ("repeat_interleave"; the kernel then reads Hq / Hkv times the bytes)."""
    if Hq == Hkv:
        return k, v, "none"
    try:
        call(k, v, True)
        return k, v, "enable_gqa"
    except RuntimeError:
        return k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1), "repeat_interleave"


def prepare_sdpa_contiguous(q, k, v, scale, *, backend=None):
    """SDPA decode, one query per sequence, K/V [B, Hkv, S, D] with every S equal.

    The flash backend is forced (override with ``backend``). GQA is passed as enable_gqa=True;
    if the forced backend rejects it on this torch, K/V are repeat_interleave'd once here instead
    (``run.gqa`` says which).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if backend is None else backend
    q4 = q.unsqueeze(2)
    Hq, Hkv = q.shape[1], k.shape[1]

    def call(kk, vv, gqa):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q4, kk, vv, scale=scale, enable_gqa=gqa).squeeze(2)

    k, v, gqa_mode = _gqa_or_repeat(call, k, v, Hq, Hkv)
    gqa = gqa_mode == "enable_gqa"

    def run():
        return call(k, v, gqa)

    run.gqa = gqa_mode
    return run


# ------------------------------------------------------------------------------------------------
# References (fp32, plain torch)


def gather_paged_kv(k_cache, v_cache, block_table, seq_lens):
    """Per-request contiguous K/V ([Hkv, S_b, D] each) from our paged cache."""
    T = k_cache.shape[2]
    ks, vs = [], []
    for b, s in enumerate(seq_lens.tolist()):
        pages = block_table[b, : (s + T - 1) // T].long()
        ks.append(k_cache[pages].permute(1, 0, 2, 3).flatten(1, 2)[:, :s])
        vs.append(v_cache[pages].permute(1, 0, 2, 3).flatten(1, 2)[:, :s])
    return ks, vs


def decode_attention_ref(q, k_list, v_list, scale=None):
    """out[b] = softmax(q[b] K_b^T * scale) V_b in fp32; k_list[b], v_list[b]: [Hkv, S_b, D]."""
    Bq, Hq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty(Bq, Hq, D, dtype=torch.float32, device=q.device)
    for b in range(Bq):
        g = Hq // k_list[b].shape[0]
        kb = k_list[b].float().repeat_interleave(g, dim=0)             # [Hq, S, D]
        vb = v_list[b].float().repeat_interleave(g, dim=0)
        p = torch.softmax((kb @ q[b].float()[:, :, None]).squeeze(-1) * scale, dim=-1)  # [Hq, S]
        out[b] = (p[:, None, :] @ vb).squeeze(1)
    return out


def selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices,
                               mamba_version: int, dt_softplus: bool = True):
    """One decode step in fp32; returns (y [B, d_inner], new state rows [B, *state.shape[1:]]),
    leaving ``state`` untouched."""
    Bt = x.shape[0]
    s = state[state_batch_indices.long()].float()
    if mamba_version == 1:                     # as one head of width d_inner, one group
        s = s[:, None]
        x_, dt_, A_, D_ = x.float()[:, None], dt.float()[:, None], A.float()[None], D.float()[None]
        dtb = dt_bias.float()[None]
        B_, C_ = B.float()[:, None], C.float()[:, None]
    else:
        nheads, head_dim = s.shape[1], s.shape[2]
        x_ = x.float().view(Bt, nheads, head_dim)
        dt_ = dt.float()[:, :, None].expand(-1, -1, head_dim)
        A_ = A.float()[:, None, None].expand(-1, head_dim, s.shape[3])
        D_, dtb = D.float()[:, None], dt_bias.float()[:, None]
        rep = nheads // B.shape[1]
        B_, C_ = B.float().repeat_interleave(rep, 1), C.float().repeat_interleave(rep, 1)
    dt_ = dt_ + dtb
    if dt_softplus:
        dt_ = F.softplus(dt_)                   # threshold 20, as the kernel
    s = s * torch.exp(A_ * dt_[..., None]) + (B_[:, :, None, :] * dt_[..., None]) * x_[..., None]
    y = (s * C_[:, :, None, :]).sum(-1) + x_ * D_
    if z is not None:
        zz = z.float().view_as(y)
        y = y * zz * torch.sigmoid(zz)
    return y.reshape(Bt, -1), s.reshape(Bt, *state.shape[1:])
