"""A Granite-4.0-H (GraniteMoeHybrid) runner whose caches live in one AVMP arena.

``GraniteMoeHybridRunner.from_transformers(hf_model, capacity_bytes=...)`` takes the weights of a
transformers ``GraniteMoeHybridForCausalLM`` (references, no copy); ``step`` and ``release`` are
``HybridRunner``'s. The model differs from Bamba in its multipliers and its feed-forward:

- the token embeddings are multiplied by ``embedding_multiplier``; the logits divided by ``logits_scaling``;
- a decoder layer is two pre-norm residual branches, each added as ``h + residual_multiplier * branch``:
  input_layernorm -> mixer (the Mamba2 mixer ``mamba`` or the attention ``self_attn``), then
  post_attention_layernorm -> the MoE block ``block_sparse_moe`` plus the shared MLP ``shared_mlp``
  (only the shared MLP when ``num_local_experts`` is 0);
- attention scores are scaled by ``attention_multiplier`` (in place of 1/sqrt(head_dim)), with RoPE on
  q and k when ``position_embedding_type`` is 'rope' and none otherwise ('nope' or None);
- the MoE router: fp32 logits of a bias-free linear, top-k of the logits, softmax over the k chosen
  logits (so the k weights sum to one), cast back to the activations' dtype; each expert a SwiGLU
  whose weights are 3-D parameters (``gate_up_proj`` ``[E, 2I, H]``, gate first; ``down_proj`` ``[E, H, I]``).

The Mamba2 mixer (GraniteMoeHybridMambaLayer) has Bamba's modules and arithmetic: in_proj -> gate |
xBC | dt, conv + silu, A = -exp(A_log), D, dt_bias, time_step_limit, gated RMSNorm (y * silu(gate)
first, then groups of mamba_expand * hidden / n_groups channels), so ``Mamba2Mixer`` runs it as is.

Layer types (``config.layer_types``): 'linear_attention' / 'mamba' (Mamba2), 'full_attention' /
'attention'. Unsupported (a ValueError names them): a hidden_act other than 'silu' (the conv's, the
experts' and the shared MLP's activation), rope types other than 'default', a position_embedding_type
other than 'rope', 'nope' or None, a time_step_limit of None.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from avmp_triton.models.batch import StepBatch
from avmp_triton.models.layers import Mamba2Mixer, PagedAttention, RMSNorm, Rotary, cast_rms_norm
from avmp_triton.models.runner import HybridRunner, Residual

MAMBA_TYPES = ("linear_attention", "mamba")
ATTN_TYPES = ("full_attention", "attention")
POSITION_TYPES = ("rope", "nope", None)


def check_granitemoehybrid_config(config) -> None:
    """ValueError naming the first config feature the GraniteMoeHybrid runner does not implement."""
    kinds = list(config.layer_types)
    for i, kind in enumerate(kinds):
        if kind not in MAMBA_TYPES + ATTN_TYPES:
            raise ValueError(f"layer {i} has type {kind!r}; the GraniteMoeHybrid runner supports "
                             f"{MAMBA_TYPES + ATTN_TYPES}")
    if not (set(kinds) & set(MAMBA_TYPES) and set(kinds) & set(ATTN_TYPES)):
        raise ValueError(f"layer types {kinds}: the arena needs at least one Mamba ('linear_attention') and "
                         f"one attention ('full_attention') layer")
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu': the conv, the experts "
                         f"and the shared MLP all use it)")
    if config.position_embedding_type not in POSITION_TYPES:
        raise ValueError(f"position_embedding_type {config.position_embedding_type!r} is not supported "
                         f"(only {POSITION_TYPES})")
    if config.position_embedding_type == "rope":
        Rotary.check_config(config)
    if config.time_step_limit is None:
        raise ValueError("time_step_limit None is not supported (give (0.0, inf) for no clamp)")


class SharedMLP:
    """GraniteMoeHybridMLP: ``input_linear`` -> (gate | up) halves, down(silu(gate) * up) by
    ``output_linear``; no biases."""

    def __init__(self, m: torch.nn.Module):
        self.in_w, self.out_w = m.input_linear.weight.detach(), m.output_linear.weight.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.in_w).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.out_w)


class TopKMoE:
    """GraniteMoeHybridMoE: the top-k router (softmax over the chosen logits) and SwiGLU experts,
    run as a loop over the experts that some token chose (index_add of the weighted outputs)."""

    def __init__(self, m: torch.nn.Module):
        self.router_w = m.router.weight.detach()
        self.top_k = m.router.top_k
        self.gate_up = m.experts.gate_up_proj.detach()   # [E, 2I, H]
        self.down = m.experts.down_proj.detach()         # [E, H, I]
        self.num_experts = self.gate_up.shape[0]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token the top-k weights ``[T, k]`` (x's dtype) and expert indices ``[T, k]``."""
        logits = F.linear(x, self.router_w).float()
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)
        return torch.softmax(top_logits, dim=-1).type_as(x), top_idx

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weights, idx = self.route(x)
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            token, slot = torch.where(idx == e)
            gate, up = F.linear(x[token], self.gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down[e]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


class MoEFeedForward:
    """The feed-forward branch of a layer: MoE output plus the shared MLP's (the shared MLP alone
    when the model has no experts)."""

    def __init__(self, layer: torch.nn.Module):
        self.moe = TopKMoE(layer.block_sparse_moe) if layer.block_sparse_moe is not None else None
        self.shared = SharedMLP(layer.shared_mlp)

    def __call__(self, x: torch.Tensor, batch: StepBatch | None = None) -> torch.Tensor:
        if self.moe is None:
            return self.shared(x)
        return self.moe(x) + self.shared(x)


class GraniteMoeHybridRunner(HybridRunner):
    """GraniteMoeHybrid (Granite-4.0-H) forward over a paged cache in one AVMP arena. Build with
    ``from_transformers`` (a ``GraniteMoeHybridForCausalLM``)."""

    @classmethod
    def check_config(cls, config) -> None:
        check_granitemoehybrid_config(config)

    @classmethod
    def final_norm(cls, hf_model: torch.nn.Module) -> RMSNorm:
        return cast_rms_norm(hf_model.model.norm)

    def build_blocks(self, hf_model: torch.nn.Module) -> list[Residual]:
        """Two residual blocks per decoder layer (mixer, then MoE + shared MLP), both scaled by
        residual_multiplier; attention and Mamba layers numbered within their kind."""
        config, base = hf_model.config, hf_model.model
        self.embedding_multiplier = float(config.embedding_multiplier)
        self.logits_scaling = float(config.logits_scaling)
        rope = Rotary.of(base.rotary_emb, config) if base.rotary_emb is not None else None
        scale = float(config.residual_multiplier)
        blocks, n_attn, n_mamba = [], 0, 0
        for layer, kind in zip(base.layers, config.layer_types):
            if kind in MAMBA_TYPES:
                mixer = Mamba2Mixer(layer.mamba, cache=self.cache, layer=n_mamba)
                n_mamba += 1
            else:
                mixer = PagedAttention.of(layer.self_attn, config, cache=self.cache, layer=n_attn, rope=rope)
                n_attn += 1
            blocks.append(Residual(cast_rms_norm(layer.input_layernorm), mixer, scale))
            blocks.append(Residual(cast_rms_norm(layer.post_attention_layernorm), MoEFeedForward(layer), scale))
            self.has_moe |= layer.block_sparse_moe is not None
        return blocks

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed) * self.embedding_multiplier

    def output_logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits, divided by logits_scaling in the model's dtype (as transformers does)."""
        return (F.linear(self.norm_f(h), self.lm_head) / self.logits_scaling).float()


