"""Runners for the attention-free Mamba (``MambaForCausalLM``) and Mamba2 (``Mamba2ForCausalLM``)
models, the degenerate case of a hybrid: the arena is all SSM blocks (the KV pool holds no slab and
never receives one) and a request holds one block, whatever its length.

Both are ``backbone.embeddings`` -> blocks -> ``backbone.norm_f`` -> ``lm_head``, every block one
pre-norm residual branch around the mixer, with the residual stream in fp32 when the config says
``residual_in_fp32`` (the default). Mamba's mixer is ``Mamba1Mixer`` (no dt/B/C norms, unlike
Jamba's); Mamba2's is ``Mamba2Mixer`` (the gated RMSNorm over n_groups groups).

Unsupported (a ValueError names them): a hidden_act other than 'silu' (the conv's activation; the
scan kernels gate with silu).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from avmp_triton.models.layers import Mamba1Mixer, Mamba2Mixer, RMSNorm, cast_rms_norm
from avmp_triton.models.runner import HybridRunner, Residual


def check_mamba_config(config) -> None:
    """ValueError naming the first config feature the Mamba / Mamba2 runners do not implement."""
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu', the conv's activation)")
    if config.num_hidden_layers < 1:
        raise ValueError(f"num_hidden_layers must be at least 1, got {config.num_hidden_layers}")


class _AttentionFreeRunner(HybridRunner):
    """What Mamba and Mamba2 share: the backbone's ends, fp32 residuals, logits from the norm's
    output cast to lm_head's dtype (transformers' order)."""

    mixer_class: type

    @classmethod
    def check_config(cls, config) -> None:
        check_mamba_config(config)

    @classmethod
    def embedding_weight(cls, hf_model: torch.nn.Module) -> torch.Tensor:
        return hf_model.backbone.embeddings.weight

    @classmethod
    def final_norm(cls, hf_model: torch.nn.Module) -> RMSNorm:
        return cast_rms_norm(hf_model.backbone.norm_f)

    def output_logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm_f(h).to(self.lm_head.dtype), self.lm_head).float()

    def build_blocks(self, hf_model: torch.nn.Module) -> list[Residual]:
        """Layer i is Mamba layer i of the arena."""
        fp32 = bool(hf_model.config.residual_in_fp32)
        return [Residual(cast_rms_norm(layer.norm), self.mixer_class(layer.mixer, cache=self.cache, layer=i),
                         fp32_residual=fp32, dtype=self.dtype if fp32 else None)
                for i, layer in enumerate(hf_model.backbone.layers)]


class MambaRunner(_AttentionFreeRunner):
    """Mamba (Mamba1) forward with its states in an AVMP arena; build with ``from_transformers``."""
    mixer_class = Mamba1Mixer


class Mamba2Runner(_AttentionFreeRunner):
    """Mamba2 forward with its states in an AVMP arena; build with ``from_transformers``."""
    mixer_class = Mamba2Mixer
