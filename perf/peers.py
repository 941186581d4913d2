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
                                   seq_threshold_3D: int | None = None):
    """vLLM's ``unified_attention`` as its Triton backend calls it for a decode-only batch.

    ``seq_threshold_3D`` defaults to vLLM's 128 // Hkv (with CUDA graphs vLLM rounds it to the
    nearest capture size, the same value for Hkv in 1, 2, 4, 8); pass 0 to force the 2D kernel.
    """
    ua = _vllm("vllm.v1.attention.ops.triton_unified_attention")
    B, Hq, D = q.shape
    _, Hkv, T, _ = k_cache.shape
    dev = q.device
    # vLLM allocates K and V as [num_blocks, block_size, Hkv, D] (last two dims contiguous).
    k = k_cache.permute(0, 2, 1, 3).contiguous()
    v = v_cache.permute(0, 2, 1, 3).contiguous()
    out = torch.empty_like(q)
    threshold = MIN_LAUNCH_GRID_SIZE_2D // Hkv if seq_threshold_3D is None else seq_threshold_3D
    rows = max(threshold, 1)  # vLLM sizes split-K scratch for min(threshold, max_num_seqs) tokens
    segs = NUM_PAR_SOFTMAX_SEGMENTS
    one = torch.ones((), dtype=torch.float32, device=dev)  # layer._k_scale: unread without fp8 KV
    args = dict(
        q=q, k=k, v=v, out=out,
        cu_seqlens_q=torch.arange(B + 1, dtype=torch.int32, device=dev),  # one query token each
        max_seqlen_q=1,
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

    run.uses_3d = B <= threshold  # which vLLM kernel path this batch takes (B * cdiv(1, BLOCK_Q) = B)
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

    gqa_mode = "enable_gqa" if Hq != Hkv else "none"
    try:
        call(k, v, Hq != Hkv)
    except RuntimeError:
        if Hq == Hkv:
            raise
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        gqa_mode = "repeat_interleave"
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
