"""Hybrid models' layers over the paged cache: every cache byte is read and written by the project's ops.

Each layer takes the packed hidden states ``[T, hidden]`` of a step and its ``StepBatch``; weights
are references to a transformers module's parameters (no copy). Attention and Mamba layers know
their index among the model's layers of their kind (``layer=`` of the ops: the slot of the layer in
a KV page or an SSM block). Nemotron-H uses RMSNorm, ReLU2MLP, PagedAttention without RoPE and
Mamba2Mixer; Bamba the same mixer and norms, SwiGLUMLP and PagedAttention with a ``Rotary``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from avmp_triton.memory.cache import PagedCache
from avmp_triton.models.batch import StepBatch
from avmp_triton.ops import (
    causal_conv1d_prefill,
    causal_conv1d_update,
    kv_append,
    mamba1_scan_prefill,
    mamba1_state_update,
    mamba2_scan_prefill,
    mamba2_state_update,
    paged_decode_attention,
    paged_prefill_attention,
)


def _w(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
             weight_after_cast: bool = False) -> torch.Tensor:
    """RMSNorm normalised in fp32. NemotronHRMSNorm applies the weight in fp32, then casts back to
    x's dtype; with ``weight_after_cast`` (BambaRMSNorm, LlamaRMSNorm) it casts back first and then
    applies the weight: the same in fp32, different roundings in bf16."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight_after_cast:
        return weight * h.to(x.dtype)
    return (weight.float() * h).to(x.dtype)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                   eps: float) -> torch.Tensor:
    """NemotronHRMSNormGated (norm_before_gate=False): y * silu(z) first, then an RMSNorm over
    each group of ``group_size`` channels (d_inner / n_groups), the weight applied after the cast back."""
    h = y.float() * F.silu(z.float())
    g = h.view(*h.shape[:-1], -1, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return weight * g.view(h.shape).to(y.dtype)


class RMSNorm:
    def __init__(self, weight: torch.Tensor, eps: float, *, weight_after_cast: bool = False):
        self.weight, self.eps, self.weight_after_cast = _w(weight), eps, weight_after_cast

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, weight_after_cast=self.weight_after_cast)


def cast_rms_norm(module: torch.nn.Module) -> RMSNorm:
    """The RMSNorm of Bamba, Granite-4.0-H, Jamba and Falcon-H1: the normalised activations are cast
    back to their dtype before the weight is applied."""
    return RMSNorm(module.weight, module.variance_epsilon, weight_after_cast=True)


class ReLU2MLP:
    """Nemotron-H's MLP: down(relu(up(x))^2), no gate."""

    def __init__(self, up: torch.nn.Linear, down: torch.nn.Linear):
        self.up_w, self.up_b = _w(up.weight), _w(up.bias)
        self.down_w, self.down_b = _w(down.weight), _w(down.bias)

    def __call__(self, x: torch.Tensor, batch: StepBatch | None = None) -> torch.Tensor:
        return F.linear(torch.relu(F.linear(x, self.up_w, self.up_b)).square(), self.down_w, self.down_b)


class SwiGLUMLP:
    """A gated MLP, down(silu(gate(x)) * up(x)) (Bamba's, Llama's)."""

    def __init__(self, gate: torch.nn.Linear, up: torch.nn.Linear, down: torch.nn.Linear):
        self.gate_w, self.gate_b = _w(gate.weight), _w(gate.bias)
        self.up_w, self.up_b = _w(up.weight), _w(up.bias)
        self.down_w, self.down_b = _w(down.weight), _w(down.bias)

    def __call__(self, x: torch.Tensor, batch: StepBatch | None = None) -> torch.Tensor:
        h = F.silu(F.linear(x, self.gate_w, self.gate_b)) * F.linear(x, self.up_w, self.up_b)
        return F.linear(h, self.down_w, self.down_b)


class LowRank:
    """A low-rank adapter ``up(down(x))`` (Zamba2's per-invocation adapters of its shared blocks:
    two bias-free linears, kept apart rather than folded into the shared weight, which would copy
    that weight once per invocation)."""

    def __init__(self, adapter: torch.nn.Sequential):
        down, up = adapter
        self.down_w, self.up_w = _w(down.weight), _w(up.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down_w), self.up_w)


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class GatedMLP:
    """``down(act(gate) * up)`` with gate | up from one fused projection (Zamba2's gate_up_proj),
    plus an optional low-rank adapter on that projection."""

    def __init__(self, gate_up: torch.nn.Linear, down: torch.nn.Linear, act: str, adapter: LowRank | None = None):
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        self.gate_up_w, self.gate_up_b = _w(gate_up.weight), _w(gate_up.bias)
        self.down_w, self.down_b = _w(down.weight), _w(down.bias)
        self.act, self.adapter = ACTIVATIONS[act], adapter

    def __call__(self, x: torch.Tensor, batch: StepBatch | None = None) -> torch.Tensor:
        h = F.linear(x, self.gate_up_w, self.gate_up_b)
        if self.adapter is not None:
            h = h + self.adapter(x)
        gate, up = h.chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, self.down_w, self.down_b)


class Rotary:
    """Rotary position embedding as transformers' default rope type: angles pos * inv_freq, cos/sin
    of the angles repeated twice (``cat(freqs, freqs)``) and cast to the activations' dtype, the
    rotate_half convention (pairs (i, i + rot_dim/2), not interleaved), and with a partial rotary
    factor only the first ``rot_dim = 2 * len(inv_freq)`` channels of each head rotated."""

    def __init__(self, inv_freq: torch.Tensor, head_dim: int, attention_scaling: float = 1.0):
        self.inv_freq = inv_freq.detach().float()
        self.rot_dim = 2 * self.inv_freq.numel()
        if self.rot_dim > head_dim:
            raise ValueError(f"rotary dim {self.rot_dim} exceeds head_dim {head_dim}")
        self.scaling = attention_scaling

    @staticmethod
    def check_config(config) -> None:
        """ValueError unless the config's rope type is the default one (the others' angles change
        with the sequence, which this class does not model)."""
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default')")

    @classmethod
    def of(cls, rotary_emb: torch.nn.Module, config) -> "Rotary":
        """From a transformers model's own rotary embedding: its inverse frequencies (rope_theta and
        any partial rotary factor already applied), so the angles are transformers' to the bit."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(rotary_emb.inv_freq, head_dim, float(rotary_emb.attention_scaling))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[T, rot_dim]`` of the given token positions."""
        freqs = positions.float()[:, None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` ``[T, heads, head_dim]`` rotated by the cos/sin of its tokens."""
        rot, rest = x[..., :self.rot_dim], x[..., self.rot_dim:]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = rot * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]
        return torch.cat((rotated, rest), dim=-1)


class PagedAttention:
    """Causal multi-head (GQA) attention, with RoPE when given a ``Rotary`` (Nemotron-H has none);
    K/V of new tokens appended to the request's pages (K already rotated, so the cache holds what
    transformers' cache would), then attention over the pages."""

    def __init__(self, q: torch.nn.Linear, k: torch.nn.Linear, v: torch.nn.Linear, o: torch.nn.Linear, *,
                 num_heads: int, num_kv_heads: int, head_dim: int, cache: PagedCache, layer: int,
                 rope: Rotary | None = None, scale: float | None = None, key_multiplier: float = 1.0,
                 adapters: tuple[LowRank | None, LowRank | None, LowRank | None] = (None, None, None)):
        self.wq, self.bq = _w(q.weight), _w(q.bias)
        self.wk, self.bk = _w(k.weight), _w(k.bias)
        self.wv, self.bv = _w(v.weight), _w(v.bias)
        self.wo, self.bo = _w(o.weight), _w(o.bias)
        self.hq, self.hkv, self.d = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.key_mult = key_multiplier   # Falcon-H1 scales K before the rotation
        self.cache, self.layer, self.rope = cache, layer, rope
        self.adapters = adapters         # added to q, k, v projections (Zamba2's shared blocks)
        # fp8 pages: the layer's K and V scales per kv head, 1.0 as vLLM takes them when a
        # checkpoint has none
        self.kv_scale = (torch.ones(2, num_kv_heads, device=cache.device)
                         if cache.kv_dtype == torch.float8_e4m3fn else None)

    @classmethod
    def of(cls, a: torch.nn.Module, config, *, cache: PagedCache, layer: int, rope: Rotary | None = None,
           key_multiplier: float = 1.0, adapters=(None, None, None)) -> "PagedAttention":
        """From a transformers attention module (q/k/v/o_proj, head_dim; its ``scaling``, which is
        Granite's attention_multiplier, Zamba2's (head_dim / 2) ** -0.5 and head_dim ** -0.5 elsewhere)."""
        return cls(a.q_proj, a.k_proj, a.v_proj, a.o_proj, num_heads=config.num_attention_heads,
                   num_kv_heads=config.num_key_value_heads, head_dim=a.head_dim, cache=cache, layer=layer,
                   rope=rope, scale=float(getattr(a, "scaling", a.head_dim ** -0.5)), key_multiplier=key_multiplier,
                   adapters=adapters)

    def __call__(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = (self._project(x, w, b, a) for w, b, a in
                   zip((self.wq, self.wk, self.wv), (self.bq, self.bk, self.bv), self.adapters))
        q, k, v = q.view(T, self.hq, self.d), k.view(T, self.hkv, self.d), v.view(T, self.hkv, self.d)
        if self.key_mult != 1.0:
            k = k * self.key_mult
        if self.rope is not None:  # positions are each token's position in its own request
            cos, sin = self.rope.cos_sin(batch.token_pos, q.dtype)
            q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        # the step's own tokens go into the pages first: both attention ops read them from there
        kw = dict(layer=self.layer, kv_scale=self.kv_scale)
        kv_append(k, v, batch.block_table, batch.token_req, batch.token_pos, self.cache, **kw)
        o = torch.empty_like(q)
        if batch.prefill is not None:
            g = batch.prefill
            o[g.tokens] = paged_prefill_attention(q[g.tokens], g.block_table, g.seq_lens, g.cu_seqlens, self.cache,
                                                  scale=self.scale, page_offsets=g.page_offsets, **kw)
        if batch.decode is not None:
            g = batch.decode
            o[g.tokens] = paged_decode_attention(q[g.tokens], g.block_table, g.seq_lens, self.cache,
                                                 scale=self.scale, **kw)
        return F.linear(o.view(T, self.hq * self.d), self.wo, self.bo)

    @staticmethod
    def _project(x, w, b, adapter):
        y = F.linear(x, w, b)
        return y if adapter is None else y + adapter(x)


def causal_conv_silu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, batch: StepBatch,
                     cache: PagedCache, layer: int) -> torch.Tensor:
    """A Mamba mixer's depthwise causal conv + silu over ``x`` ``[T, C]``, its state in each request's
    SSM block: prefill chunks through the varlen kernel, decode tokens through the update."""
    out = torch.empty_like(x)
    kw = dict(layer=layer, bias=b, activation="silu")
    if batch.prefill is not None:
        g = batch.prefill
        out[g.tokens] = causal_conv1d_prefill(x[g.tokens], w, g.ssm_handles, g.cu_seqlens, g.has_initial_state,
                                              cache, **kw)
    if batch.decode is not None:
        g = batch.decode
        out[g.tokens] = causal_conv1d_update(x[g.tokens], w, g.ssm_handles, cache, **kw)
    return out


class Mamba1Mixer:
    """The Mamba1 mixer of Mamba and Jamba over the paged cache: in_proj -> x | z; causal conv + silu
    over x (conv state in the SSM block); x_proj -> dt | B | C, with RMSNorms on each where the
    module has them (Jamba's dt_layernorm, b_layernorm, c_layernorm); dt_proj's weight on the host,
    its bias and the softplus in the scan ops; the selective scan (state ``[d_inner, d_state]`` in
    the block) with D and the silu(z) gate; out_proj."""

    def __init__(self, m: torch.nn.Module, *, cache, layer: int):
        self.in_w, self.in_b = _w(m.in_proj.weight), _w(m.in_proj.bias)
        self.out_w, self.out_b = _w(m.out_proj.weight), _w(m.out_proj.bias)
        self.conv_w, self.conv_b = _w(m.conv1d.weight).squeeze(1), _w(m.conv1d.bias)  # [C, 1, K] -> [C, K]
        self.x_w = _w(m.x_proj.weight)
        self.dt_w, self.dt_bias = _w(m.dt_proj.weight), _w(m.dt_proj.bias)
        self.A = -torch.exp(m.A_log.detach().float())
        if self.A.dim() != 2:
            raise ValueError(f"A_log of a Mamba1 mixer must be [d_inner, d_state], got {tuple(self.A.shape)}")
        self.D = _w(m.D)
        self.dt_norm, self.b_norm, self.c_norm = (_optional_norm(m, n) for n in
                                                  ("dt_layernorm", "b_layernorm", "c_layernorm"))
        self.d_inner, self.N, self.rank = m.intermediate_size, m.ssm_state_size, m.time_step_rank
        self.cache, self.layer = cache, layer
        # a tensor-parallel shard's x_proj reads only its channels: the runner sets this to the
        # all-reduce that sums the ranks' partial dt | B | C
        self.tp_reduce = None

    def __call__(self, h: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        xs, z = F.linear(h, self.in_w, self.in_b).chunk(2, dim=-1)
        xs = self._conv(xs.contiguous(), batch)
        dbc = F.linear(xs, self.x_w)
        if self.tp_reduce is not None:
            dbc = self.tp_reduce(dbc.contiguous())
        dt, B, C = dbc.split([self.rank, self.N, self.N], dim=-1)
        dt = F.linear(self.dt_norm(dt), self.dt_w)                   # dt_proj without its bias
        B, C = self.b_norm(B).contiguous(), self.c_norm(C).contiguous()
        y = self._scan(xs, dt.contiguous(), B, C, z.contiguous(), batch)
        return F.linear(y, self.out_w, self.out_b)

    def _conv(self, xs: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        return causal_conv_silu(xs, self.conv_w, self.conv_b, batch, self.cache, self.layer)

    def _scan(self, xs, dt, B, C, z, batch: StepBatch) -> torch.Tensor:
        out = torch.empty_like(xs)
        kw = dict(layer=self.layer, D=self.D, dt_bias=self.dt_bias, dt_softplus=True)
        if batch.prefill is not None:
            g, t = batch.prefill, batch.prefill.tokens
            out[t] = mamba1_scan_prefill(xs[t], dt[t], self.A, B[t], C[t], g.ssm_handles, g.cu_seqlens,
                                         g.has_initial_state, self.cache, z=z[t], **kw)
        if batch.decode is not None:
            g, t = batch.decode, batch.decode.tokens
            out[t] = mamba1_state_update(xs[t], dt[t], self.A, B[t], C[t], g.ssm_handles, self.cache, z=z[t], **kw)
        return out


def _optional_norm(m: torch.nn.Module, name: str):
    norm = getattr(m, name, None)
    return (lambda x: x) if norm is None else cast_rms_norm(norm)


class Mamba2Mixer:
    """The Mamba2 mixer of Nemotron-H and Bamba (the same modules, attribute names and arithmetic):
    in_proj -> z | xBC | dt; depthwise causal conv + silu over xBC (conv state in the SSM block);
    the SSD scan (state in the block) with D and dt_bias; gated RMSNorm with z; out_proj."""

    def __init__(self, m: torch.nn.Module, *, cache: PagedCache, layer: int):
        self.in_w, self.in_b = _w(m.in_proj.weight), _w(m.in_proj.bias)
        self.out_w, self.out_b = _w(m.out_proj.weight), _w(m.out_proj.bias)
        self.conv_w, self.conv_b = _w(m.conv1d.weight).squeeze(1), _w(m.conv1d.bias)  # [C, 1, K] -> [C, K]
        self.A = -torch.exp(m.A_log.detach().float())
        self.D, self.dt_bias = _w(m.D), _w(m.dt_bias)
        # transformers releases whose gated norm has no group_size (Bamba before the grouped norm)
        # normalise over all d_inner channels at once
        self.norm_group = getattr(m.norm, "group_size", m.intermediate_size)
        self.norm_w, self.norm_eps = _w(m.norm.weight), m.norm.variance_epsilon
        self.H, self.P, self.G, self.N = m.num_heads, m.head_dim, m.n_groups, m.ssm_state_size
        self.d_inner, self.conv_dim = m.intermediate_size, m.conv_dim
        lo, hi = m.time_step_limit
        # transformers clamps softplus(dt + dt_bias) to time_step_limit; (0, inf) clamps nothing,
        # so the kernels can apply dt_bias and softplus themselves (in fp32)
        self.dt_limit = None if (lo, hi) == (0.0, math.inf) else (float(lo), float(hi))
        self.cache, self.layer = cache, layer

    def __call__(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        T = x.shape[0]
        z, xbc, dt = F.linear(x, self.in_w, self.in_b).split([self.d_inner, self.conv_dim, self.H], dim=-1)
        xbc = self._conv(xbc.contiguous(), batch)
        xs, B, C = xbc.split([self.d_inner, self.G * self.N, self.G * self.N], dim=-1)
        xs = xs.reshape(T, self.H, self.P)
        B, C = B.reshape(T, self.G, self.N), C.reshape(T, self.G, self.N)
        y = self._scan(xs, dt.contiguous(), B, C, batch).view(T, self.d_inner)
        y = gated_rms_norm(y, z, self.norm_w, self.norm_group, self.norm_eps)
        return F.linear(y, self.out_w, self.out_b)

    def _conv(self, xbc: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        return causal_conv_silu(xbc, self.conv_w, self.conv_b, batch, self.cache, self.layer)

    def _scan(self, xs, dt, B, C, batch: StepBatch) -> torch.Tensor:
        if self.dt_limit is None:
            dt_kw = dict(dt_bias=self.dt_bias, dt_softplus=True)
        else:  # clamp on the host side: the kernels take the final dt
            dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit).to(dt.dtype)
            dt_kw = dict(dt_bias=None, dt_softplus=False)
        out = torch.empty_like(xs)
        kw = dict(layer=self.layer, D=self.D, **dt_kw)
        if batch.prefill is not None:
            g, t = batch.prefill, batch.prefill.tokens
            out[t] = mamba2_scan_prefill(xs[t], dt[t], self.A, B[t], C[t], g.ssm_handles, g.cu_seqlens,
                                         g.has_initial_state, self.cache, **kw)
        if batch.decode is not None:
            g, t = batch.decode, batch.decode.tokens
            out[t] = mamba2_state_update(xs[t], dt[t], self.A, B[t], C[t], g.ssm_handles, self.cache, **kw)
        return out
