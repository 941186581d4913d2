"""A Zamba2 runner whose caches live in one AVMP arena.

``Zamba2Runner.from_transformers(hf_model, capacity_bytes=...)`` takes the weights of a transformers
``Zamba2ForCausalLM`` (references, no copy); ``step`` and ``release`` are ``HybridRunner``'s.

Every Zamba2 layer has a Mamba2 mixer. A "hybrid" layer first runs one of the ``num_mem_blocks``
shared transformer blocks on the concatenation of the hidden state and the token embeddings, and
adds its output, through the layer's own linear, to the Mamba input::

    t = mlp(pre_ff_norm(attn(input_norm(cat(h, embeddings)))))        (no residual inside)
    h = h + mamba(mamba_norm(h + linear(t)))

The shared blocks' weights are shared, not their caches: each hybrid layer is its own attention layer
of the arena (its own slot in a KV page), numbered in order. Hybrid layer i adds adapter i of its
block to q, k, v (``use_shared_attention_adapter``) and to the MLP's gate_up projection (always).
Attention head_dim is 2 * hidden / heads (160 for Zamba2-2.7B), the softmax scale
(head_dim / 2) ** -0.5 (the module's ``scaling``); RoPE only with ``use_mem_rope``.

Layer types (``config.layers_block_type``): 'linear_attention' (Mamba2), 'hybrid'. Unsupported (a
ValueError names them): a hidden_act outside ``ACTIVATIONS`` (the MLP's; the conv is always silu),
rope types other than 'default'.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from avmp_triton.models.batch import StepBatch
from avmp_triton.models.layers import (ACTIVATIONS, GatedMLP, LowRank, Mamba2Mixer, PagedAttention, Rotary,
                                       cast_rms_norm)
from avmp_triton.models.runner import HybridRunner, Residual

LAYER_TYPES = ("linear_attention", "hybrid")


def check_zamba2_config(config) -> None:
    """ValueError naming the first config feature the Zamba2 runner does not implement."""
    kinds = list(config.layers_block_type)
    for i, kind in enumerate(kinds):
        if kind not in LAYER_TYPES:
            raise ValueError(f"layer {i} has type {kind!r}; the Zamba2 runner supports {LAYER_TYPES}")
    if "hybrid" not in kinds:
        raise ValueError(f"layer types {kinds}: the arena needs at least one 'hybrid' (attention) layer")
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    if config.use_mem_rope:
        Rotary.check_config(config)


class SharedTransformer:
    """One invocation of a shared block: attention over cat(h, embeddings), then the gated MLP,
    each after its RMSNorm and neither with a residual; then the hybrid layer's linear."""

    def __init__(self, block: torch.nn.Module, linear: torch.nn.Linear, *, config, index: int, cache, layer: int,
                 rope: Rotary | None):
        a = block.self_attn
        adapters = (None, None, None)
        if config.use_shared_attention_adapter:
            adapters = tuple(LowRank(lst[index]) for lst in
                             (a.linear_q_adapter_list, a.linear_k_adapter_list, a.linear_v_adapter_list))
        self.in_norm = cast_rms_norm(block.input_layernorm)
        self.attn = PagedAttention.of(a, config, cache=cache, layer=layer, rope=rope, adapters=adapters)
        self.ff_norm = cast_rms_norm(block.pre_ff_layernorm)
        ff = block.feed_forward
        self.mlp = GatedMLP(ff.gate_up_proj, ff.down_proj, config.hidden_act,
                            adapter=LowRank(ff.gate_up_proj_adapter_list[index]))
        self.linear_w = linear.weight.detach()

    def __call__(self, h: torch.Tensor, embeddings: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        t = self.attn(self.in_norm(torch.cat([h, embeddings], dim=-1)), batch)
        return F.linear(self.mlp(self.ff_norm(t)), self.linear_w)


class Zamba2Layer:
    """A Mamba layer, with the shared transformer's output added to its input in a hybrid layer."""

    def __init__(self, mamba: Residual, shared: SharedTransformer | None):
        self.mamba, self.shared = mamba, shared

    def __call__(self, h: torch.Tensor, embeddings: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        if self.shared is None:
            return self.mamba(h, batch)
        t = self.shared(h, embeddings, batch)
        return h + self.mamba.mixer(self.mamba.norm(h + t), batch)


class Zamba2Stack:
    """All layers as one block: every hybrid layer reads the step's token embeddings, which are the
    stack's input."""

    def __init__(self, layers: list[Zamba2Layer]):
        self.layers = layers

    def __call__(self, h: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        embeddings = h
        for layer in self.layers:
            h = layer(h, embeddings, batch)
        return h


class Zamba2Runner(HybridRunner):
    """Zamba2 forward over a paged cache in one AVMP arena. Build with ``from_transformers``
    (a ``Zamba2ForCausalLM``)."""

    @classmethod
    def check_config(cls, config) -> None:
        check_zamba2_config(config)

    def build_blocks(self, hf_model: torch.nn.Module) -> list[Zamba2Stack]:
        """Layer i is Mamba layer i of the arena; the k-th hybrid layer is attention layer k."""
        config, base = hf_model.config, hf_model.model
        rope = Rotary.of(base.rotary_emb, config) if config.use_mem_rope else None
        layers, n_hybrid = [], 0
        for i, (layer, kind) in enumerate(zip(base.layers, config.layers_block_type)):
            dec = layer.mamba_decoder if kind == "hybrid" else layer
            mamba = Residual(cast_rms_norm(dec.input_layernorm), Mamba2Mixer(dec.mamba, cache=self.cache, layer=i))
            shared = None
            if kind == "hybrid":
                shared = SharedTransformer(layer.shared_transformer, layer.linear, config=config, index=n_hybrid,
                                           cache=self.cache, layer=n_hybrid, rope=rope)
                n_hybrid += 1
            layers.append(Zamba2Layer(mamba, shared))
        return [Zamba2Stack(layers)]
