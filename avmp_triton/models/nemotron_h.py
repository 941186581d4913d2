"""A Nemotron-H runner whose caches live in one AVMP arena.

``NemotronHRunner.from_transformers(hf_model, capacity_bytes=...)`` takes the weights of a
transformers ``NemotronHForCausalLM`` (references, no copy) and runs its own forward: every K/V
byte and every conv / SSM state byte is in the allocator's arena, written and read by the
project's ops through block tables and SSM handles. ``step`` runs one packed step of any mix of
prefill chunks and decode tokens; the runner grows each request's KV pages (``grow_kv``), gives a
new request its SSM block (``alloc_ssm``) and frees both on ``release`` (all in ``HybridRunner``;
this module supplies Nemotron-H's layers).

Supported layer types: 'M' (Mamba2), '*' (attention), '-' (MLP); 'E' (MoE) is not.
"""
from __future__ import annotations

import torch

from avmp_triton.models.layers import Mamba2Mixer, PagedAttention, ReLU2MLP, RMSNorm
from avmp_triton.models.runner import HybridRunner, Residual

# transformers' layer-type names (5.x, then 4.x's) and their hybrid_override_pattern characters
_PATTERN_CHAR = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E",
                 "mamba": "M", "attention": "*"}
SUPPORTED_LAYERS = {"M": "Mamba2", "*": "attention", "-": "MLP"}


def layer_pattern(config) -> str:
    """The config's layers as pattern characters; ValueError naming any type the runner cannot run."""
    kinds = list(getattr(config, "layers_block_type", None) or [])
    chars = [_PATTERN_CHAR.get(k, k) for k in kinds]
    for i, c in enumerate(chars):
        if c not in SUPPORTED_LAYERS:
            raise ValueError(f"layer {i} has type {kinds[i]!r} (pattern {c!r}); the Nemotron-H runner supports "
                             f"{', '.join(f'{k!r} ({v})' for k, v in SUPPORTED_LAYERS.items())}")
    if "M" not in chars or "*" not in chars:
        raise ValueError(f"pattern {''.join(chars)!r}: the arena needs at least one Mamba ('M') and one "
                         f"attention ('*') layer")
    return "".join(chars)


def _check_config(config) -> None:
    """The activations the runner implements; anything else would give wrong logits silently."""
    if config.mamba_hidden_act != "silu":
        raise ValueError(f"mamba_hidden_act {config.mamba_hidden_act!r} is not supported (only 'silu')")
    if config.mlp_hidden_act != "relu2":
        raise ValueError(f"mlp_hidden_act {config.mlp_hidden_act!r} is not supported (only 'relu2')")


class NemotronHRunner(HybridRunner):
    """Nemotron-H forward over a paged cache in one AVMP arena. Build with ``from_transformers``
    (a ``NemotronHForCausalLM``); ``step`` and ``release`` are ``HybridRunner``'s."""

    @classmethod
    def check_config(cls, config) -> None:
        layer_pattern(config)
        _check_config(config)

    @classmethod
    def embedding_weight(cls, hf_model: torch.nn.Module) -> torch.Tensor:
        return hf_model.model.embeddings.weight

    @classmethod
    def final_norm(cls, hf_model: torch.nn.Module) -> RMSNorm:
        norm_f = hf_model.model.norm_f
        return RMSNorm(norm_f.weight, norm_f.variance_epsilon)

    def build_blocks(self, hf_model: torch.nn.Module) -> list[Residual]:
        """residual + mixer(norm(x)) per layer, as NemotronHBlock; attention and Mamba layers
        numbered within their kind (their slot in a KV page or an SSM block)."""
        config = hf_model.config
        self.pattern = layer_pattern(config)
        blocks, n_attn, n_mamba = [], 0, 0
        for layer, c in zip(hf_model.model.layers, self.pattern):
            m = layer.mixer
            if c == "M":
                mixer = Mamba2Mixer(m, cache=self.cache, layer=n_mamba)
                n_mamba += 1
            elif c == "*":
                mixer = PagedAttention.of(m, config, cache=self.cache, layer=n_attn)
                n_attn += 1
            else:
                mixer = ReLU2MLP(m.up_proj, m.down_proj)
            blocks.append(Residual(RMSNorm(layer.norm.weight, layer.norm.variance_epsilon), mixer))
        return blocks
