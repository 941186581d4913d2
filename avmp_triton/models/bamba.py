"""A Bamba runner whose caches live in one AVMP arena.

``BambaRunner.from_transformers(hf_model, capacity_bytes=...)`` takes the weights of a transformers
``BambaForCausalLM`` (references, no copy); ``step`` and ``release`` are ``HybridRunner``'s. A Bamba
decoder layer is two pre-norm residual branches: input_layernorm -> mixer (the Mamba2 mixer
``mamba`` or the attention ``self_attn``, RoPE on q and k) -> residual, then pre_ff_layernorm ->
feed_forward (SwiGLU: gate_proj, up_proj, down_proj) -> residual. The Mamba2 mixer has Nemotron-H's
modules and arithmetic (gated RMSNorm over groups of mamba_expand * hidden / n_groups channels).

Layer types (``config.layers_block_type``): 'linear_attention' (Mamba2), 'full_attention'.
Unsupported (a ValueError names them): a hidden_act other than 'silu' (it is both the conv's and the
MLP's activation), rope types other than 'default' (their angles change with the sequence).
"""
from __future__ import annotations

import torch

from avmp_triton.models.layers import Mamba2Mixer, PagedAttention, Rotary, SwiGLUMLP, cast_rms_norm
from avmp_triton.models.runner import HybridRunner, Residual

LAYER_TYPES = ("linear_attention", "full_attention")


def check_bamba_config(config) -> None:
    """ValueError naming the first config feature the Bamba runner does not implement."""
    kinds = list(config.layers_block_type)
    for i, kind in enumerate(kinds):
        if kind not in LAYER_TYPES:
            raise ValueError(f"layer {i} has type {kind!r}; the Bamba runner supports {LAYER_TYPES}")
    if not set(LAYER_TYPES) <= set(kinds):
        raise ValueError(f"layer types {kinds}: the arena needs at least one Mamba ('linear_attention') and "
                         f"one attention ('full_attention') layer")
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu': the conv and the "
                         f"MLP both use it)")
    Rotary.check_config(config)


class BambaRunner(HybridRunner):
    """Bamba forward over a paged cache in one AVMP arena. Build with ``from_transformers``
    (a ``BambaForCausalLM``)."""

    @classmethod
    def check_config(cls, config) -> None:
        check_bamba_config(config)

    def build_blocks(self, hf_model: torch.nn.Module) -> list[Residual]:
        """Two residual blocks per decoder layer (mixer, then MLP); attention and Mamba layers
        numbered within their kind (their slot in a KV page or an SSM block)."""
        config, base = hf_model.config, hf_model.model
        rope = Rotary.of(base.rotary_emb, config)
        blocks, n_attn, n_mamba = [], 0, 0
        for layer, kind in zip(base.layers, config.layers_block_type):
            if kind == "linear_attention":
                mixer = Mamba2Mixer(layer.mamba, cache=self.cache, layer=n_mamba)
                n_mamba += 1
            else:
                a = layer.self_attn
                mixer = PagedAttention.of(a, config, cache=self.cache, layer=n_attn, rope=rope)
                n_attn += 1
            ff = layer.feed_forward
            blocks.append(Residual(cast_rms_norm(layer.input_layernorm), mixer))
            blocks.append(Residual(cast_rms_norm(layer.pre_ff_layernorm), SwiGLUMLP(ff.gate_proj, ff.up_proj, ff.down_proj)))
        return blocks


