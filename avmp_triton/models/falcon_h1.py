"""A Falcon-H1 runner whose caches live in one AVMP arena.

``FalconH1Runner.from_transformers(hf_model, capacity_bytes=...)`` takes the weights of a transformers
``FalconH1ForCausalLM`` (references, no copy); ``step`` and ``release`` are ``HybridRunner``'s.

Every Falcon-H1 decoder layer is parallel-hybrid: one input_layernorm, then the Mamba2 mixer and the
RoPE attention both read the same normed input ``x``::

    h = h + ssm_out_multiplier * mamba(x) + attention_out_multiplier * attn(attention_in_multiplier * x)
    h = h + feed_forward(pre_ff_layernorm(h))

so every layer has both an attention layer (its own slot in a KV page) and a Mamba layer (its own
slot in an SSM block); layer i is attention layer i and Mamba layer i. The muP multipliers:

- embeddings times ``embedding_multiplier``; logits times ``lm_head_multiplier``;
- Mamba: input times ``ssm_in_multiplier``, the in_proj output times the mixer's ``mup_vector``
  buffer (z | x | B | C | dt parts scaled by ``ssm_multipliers``); after the scan ``y * silu(z)``
  (``mamba_rms_norm`` False, the default) or a grouped gated RMSNorm (True; norm before or after
  the gate as ``mamba_norm_before_gate``);
- attention: K times ``key_multiplier`` (before RoPE, so the cache holds transformers' K);
- MLP: ``down(up(x) * silu(gate(x) * gate_multiplier)) * down_multiplier`` (``mlp_multipliers``).

Unsupported (a ValueError names them): a hidden_act other than 'silu' (the conv's and the MLP's
activation), rope types other than 'default' (and, for every family, an attention head_dim outside
the kernels' rule: ``HybridRunner``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from avmp_triton.models.batch import StepBatch
from avmp_triton.models.layers import Mamba2Mixer, PagedAttention, Rotary, cast_rms_norm
from avmp_triton.models.runner import HybridRunner, Residual

def check_falcon_h1_config(config) -> None:
    """ValueError naming the first config feature the Falcon-H1 runner does not implement."""
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu': the conv and the "
                         f"MLP both use it)")
    Rotary.check_config(config)
    if config.num_hidden_layers < 1:
        raise ValueError("num_hidden_layers must be at least 1")


def falcon_gated_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, n_groups: int, eps: float,
                      norm_before_gate: bool) -> torch.Tensor:
    """FalconH1RMSNormGated: an RMSNorm over each of ``n_groups`` channel groups, in fp32, the weight
    applied in fp32, with ``* silu(z)`` after the norm (``norm_before_gate``) or before it."""
    h = y.float()
    if not norm_before_gate:
        h = h * F.silu(z.float())
    g = h.view(*h.shape[:-1], n_groups, -1)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    h = (weight.float().view(n_groups, -1) * g).view(h.shape)
    if norm_before_gate:
        h = h * F.silu(z.float())
    return h.to(y.dtype)


class FalconH1Mamba(Mamba2Mixer):
    """``Mamba2Mixer``'s conv and scan over the arena with Falcon-H1's mixer around them: the input
    times ``ssm_in_multiplier``, the in_proj output times ``mup_vector``, and the optional norm."""

    def __init__(self, m: torch.nn.Module, *, config, cache, layer: int):
        # not Mamba2Mixer.__init__: with mamba_rms_norm False the mixer's norm is an nn.Identity
        self.in_w, self.in_b = m.in_proj.weight.detach(), _opt(m.in_proj.bias)
        self.out_w, self.out_b = m.out_proj.weight.detach(), _opt(m.out_proj.bias)
        self.conv_w, self.conv_b = m.conv1d.weight.detach().squeeze(1), _opt(m.conv1d.bias)  # [C, 1, K] -> [C, K]
        self.A = -torch.exp(m.A_log.detach().float())
        self.D, self.dt_bias = m.D.detach(), m.dt_bias.detach()
        self.H, self.P, self.G, self.N = m.num_heads, m.head_dim, m.n_groups, m.ssm_state_size
        self.d_inner, self.conv_dim = m.intermediate_size, m.conv_dim
        lo, hi = m.time_step_limit if m.time_step_limit is not None else (0.0, math.inf)
        self.dt_limit = None if (lo, hi) == (0.0, math.inf) else (float(lo), float(hi))
        self.in_mult = float(m.ssm_in_multiplier)
        self.mup = m.mup_vector.detach().reshape(-1)
        self.rms_norm = bool(m.mamba_rms_norm)
        if self.rms_norm:
            self.norm_w, self.norm_eps = m.norm.weight.detach(), m.norm.variance_epsilon
            self.norm_before_gate = bool(config.mamba_norm_before_gate)
        self.cache, self.layer = cache, layer

    def __call__(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        T = x.shape[0]
        proj = F.linear(x * self.in_mult, self.in_w, self.in_b) * self.mup.to(x.dtype)
        z, xbc, dt = proj.split([self.d_inner, self.conv_dim, self.H], dim=-1)
        xbc = self._conv(xbc.contiguous(), batch)
        xs, B, C = xbc.split([self.d_inner, self.G * self.N, self.G * self.N], dim=-1)
        xs = xs.reshape(T, self.H, self.P)
        B, C = B.reshape(T, self.G, self.N), C.reshape(T, self.G, self.N)
        y = self._scan(xs, dt.contiguous(), B, C, batch).view(T, self.d_inner)
        if self.rms_norm:
            y = falcon_gated_norm(y, z, self.norm_w, self.G, self.norm_eps, self.norm_before_gate)
        else:
            y = y * F.silu(z)
        return F.linear(y.to(x.dtype), self.out_w, self.out_b)


class ParallelHybrid:
    """The mixer half of a Falcon-H1 layer: Mamba and attention on the same normed input, summed
    with their output multipliers (in transformers' order: mamba first)."""

    def __init__(self, mamba: FalconH1Mamba, attn: PagedAttention, *, ssm_out: float, attn_in: float,
                 attn_out: float):
        self.mamba, self.attn = mamba, attn
        self.ssm_out, self.attn_in, self.attn_out = ssm_out, attn_in, attn_out

    def __call__(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        m = self.mamba(x, batch) * self.ssm_out
        a = self.attn(x * self.attn_in, batch) * self.attn_out
        return m + a


class FalconH1MLP:
    """``down(up(x) * silu(gate(x) * gate_multiplier)) * down_multiplier``."""

    def __init__(self, ff: torch.nn.Module):
        self.gate_w, self.gate_b = ff.gate_proj.weight.detach(), _opt(ff.gate_proj.bias)
        self.up_w, self.up_b = ff.up_proj.weight.detach(), _opt(ff.up_proj.bias)
        self.down_w, self.down_b = ff.down_proj.weight.detach(), _opt(ff.down_proj.bias)
        self.gate_mult, self.down_mult = float(ff.gate_multiplier), float(ff.down_multiplier)

    def __call__(self, x: torch.Tensor, batch: StepBatch | None = None) -> torch.Tensor:
        h = F.linear(x, self.up_w, self.up_b) * F.silu(F.linear(x, self.gate_w, self.gate_b) * self.gate_mult)
        return F.linear(h, self.down_w, self.down_b) * self.down_mult


class FalconH1Runner(HybridRunner):
    """Falcon-H1 forward over a paged cache in one AVMP arena. Build with ``from_transformers``
    (a ``FalconH1ForCausalLM``)."""

    @classmethod
    def check_config(cls, config) -> None:
        check_falcon_h1_config(config)

    def __init__(self, hf_model: torch.nn.Module, spec, **kwargs):
        self.embedding_multiplier = float(hf_model.model.embedding_multiplier)
        self.lm_head_multiplier = float(hf_model.model.lm_head_multiplier)
        super().__init__(hf_model, spec, **kwargs)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed) * self.embedding_multiplier

    def output_logits(self, h: torch.Tensor) -> torch.Tensor:
        return (F.linear(self.norm_f(h), self.lm_head) * self.lm_head_multiplier).float()

    def build_blocks(self, hf_model: torch.nn.Module) -> list[Residual]:
        """Two residual blocks per decoder layer (Mamba + attention in parallel, then the MLP);
        layer i is attention layer i and Mamba layer i of the arena."""
        config, base = hf_model.config, hf_model.model
        rope = Rotary.of(base.rotary_emb, config)
        blocks = []
        for i, layer in enumerate(base.layers):
            mixer = ParallelHybrid(FalconH1Mamba(layer.mamba, config=config, cache=self.cache, layer=i),
                                   PagedAttention.of(layer.self_attn, config, cache=self.cache, layer=i, rope=rope,
                                                     key_multiplier=float(layer.self_attn.key_multiplier)),
                                   ssm_out=float(layer.ssm_out_multiplier),
                                   attn_in=float(layer.attention_in_multiplier),
                                   attn_out=float(layer.attn_out_multiplier))
            blocks.append(Residual(cast_rms_norm(layer.input_layernorm), mixer))
            blocks.append(Residual(cast_rms_norm(layer.pre_ff_layernorm), FalconH1MLP(layer.feed_forward)))
        return blocks


def _opt(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


