"""A Jamba runner whose caches live in one AVMP arena.

``JambaRunner.from_transformers(hf_model, capacity_bytes=...)`` takes the weights of a transformers
``JambaForCausalLM`` (references, no copy); ``step`` and ``release`` are ``HybridRunner``'s. A Jamba
decoder layer is two pre-norm residual branches: input_layernorm -> mixer (the Mamba1 mixer ``mamba``
or the attention ``self_attn``, no RoPE: Jamba's attention has no position embedding) -> residual,
then pre_ff_layernorm -> feed_forward -> residual. The feed-forward is a SwiGLU MLP (``JambaMLP``) on
layers with one expert and a sparse MoE (``JambaSparseMoeBlock``) on the others.

Layer order (``config.layers_block_type``): layer i is attention when
``i % attn_layer_period == attn_layer_offset``, else Mamba1; layer i is MoE when
``i % expert_layer_period == expert_layer_offset`` and ``num_experts > 1``.

The Mamba1 mixer (``JambaMambaMixer``): in_proj -> x | z; depthwise causal conv over x (+ conv bias
when mamba_conv_bias) then silu, conv state in the SSM block; x_proj -> dt_low | B | C, RMSNorms
dt_layernorm, b_layernorm, c_layernorm; dt = dt_proj.weight @ dt_low, dt_proj.bias added with the
softplus by the scan ops (as transformers' ``mamba_scan_forward`` passes it as ``delta_bias``);
A = -exp(A_log) ``[d_inner, d_state]``; y = scan + D * x, y * silu(z); out_proj.

The MoE: router softmax over all experts in fp32, top-k of the probabilities left unnormalised (cast to
the activations' dtype), each chosen expert a SwiGLU over ``gate_up_proj`` (gate | up halves) and
``down_proj``, weighted and summed; experts run in torch.

Unsupported (a ValueError names them): a hidden_act other than 'silu' (the conv's, the MLP's and the
experts' activation), a quantized model (``_is_quantized``), a config without a Mamba or without an
attention layer (the arena holds both kinds).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from avmp_triton.models.batch import StepBatch
from avmp_triton.models.layers import Mamba1Mixer, PagedAttention, SwiGLUMLP, cast_rms_norm
from avmp_triton.models.runner import HybridRunner, Residual

LAYER_TYPES = ("mamba", "attention")


def check_jamba_config(config) -> None:
    """ValueError naming the first config feature the Jamba runner does not implement."""
    kinds = list(config.layers_block_type)
    for i, kind in enumerate(kinds):
        if kind not in LAYER_TYPES:
            raise ValueError(f"layer {i} has type {kind!r}; the Jamba runner supports {LAYER_TYPES}")
    if not set(LAYER_TYPES) <= set(kinds):
        raise ValueError(f"layer types {kinds} (attn_layer_period={config.attn_layer_period}, attn_layer_offset="
                         f"{config.attn_layer_offset}): the arena needs at least one Mamba ('mamba') and one "
                         f"attention ('attention') layer")
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu': the conv, the MLP and "
                         f"the experts all use it)")
    if hasattr(config, "_is_quantized"):
        raise ValueError("quantized Jamba models are not supported (the runner reads dt_proj.weight and the "
                         "experts' weights as plain tensors)")
    if config.num_experts > 1 and not 1 <= config.num_experts_per_tok <= config.num_experts:
        raise ValueError(f"num_experts_per_tok {config.num_experts_per_tok} is not in [1, num_experts="
                         f"{config.num_experts}]")


class SparseMoE:
    """Jamba's sparse MoE (``JambaSparseMoeBlock``): fp32 softmax over the router logits, the top-k
    probabilities unnormalised, each token's experts SwiGLUs over gate_up_proj / down_proj."""

    def __init__(self, moe: torch.nn.Module, top_k: int):
        self.router_w = moe.router.weight.detach()
        self.gate_up = moe.experts.gate_up_proj.detach()   # [E, 2 * intermediate, hidden]
        self.down = moe.experts.down_proj.detach()         # [E, hidden, intermediate]
        self.top_k, self.num_experts = top_k, self.router_w.shape[0]

    def __call__(self, x: torch.Tensor, batch: StepBatch | None = None) -> torch.Tensor:
        probs = torch.softmax(F.linear(x, self.router_w), dim=-1, dtype=torch.float)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():
            tok, slot = torch.where(experts == e)
            gate, up = F.linear(x[tok], self.gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down[e]) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


class JambaRunner(HybridRunner):
    """Jamba forward over a paged cache in one AVMP arena. Build with ``from_transformers``
    (a ``JambaForCausalLM``)."""

    @classmethod
    def check_config(cls, config) -> None:
        check_jamba_config(config)

    def build_blocks(self, hf_model: torch.nn.Module) -> list[Residual]:
        """Two residual blocks per decoder layer (mixer, then MLP or MoE); attention and Mamba layers
        numbered within their kind (their slot in a KV page or an SSM block)."""
        config, base = hf_model.config, hf_model.model
        blocks, n_attn, n_mamba = [], 0, 0
        for layer, kind, n_exp in zip(base.layers, config.layers_block_type, config.layers_num_experts):
            if kind == "mamba":
                mixer = Mamba1Mixer(layer.mamba, cache=self.cache, layer=n_mamba)
                n_mamba += 1
            else:
                a = layer.self_attn
                mixer = PagedAttention.of(a, config, cache=self.cache, layer=n_attn)
                n_attn += 1
            ff = layer.feed_forward
            ffn = SparseMoE(ff, config.num_experts_per_tok) if n_exp > 1 else SwiGLUMLP(ff.gate_proj, ff.up_proj,
                                                                                        ff.down_proj)
            blocks.append(Residual(cast_rms_norm(layer.input_layernorm), mixer))
            blocks.append(Residual(cast_rms_norm(layer.pre_ff_layernorm), ffn))
            self.has_moe |= n_exp > 1
        return blocks


