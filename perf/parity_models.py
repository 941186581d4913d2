"""Model runners in bf16 at real layer sizes against transformers (GPU).

    python perf/parity_models.py [--out FILE] [--tiny]

For each family (Nemotron-H, Bamba, Granite-4.0-H, Jamba, Falcon-H1, Zamba2, and the attention-free
Mamba and Mamba2): a transformers model built from the real model's config numbers with fewer layers
(every layer type of the family present), random weights at transformers' init scale (A_log,
dt_bias, D, norms and conv bias randomised too), kept in fp32 as the reference. Its bf16 copy is
run twice: through transformers (the bf16 error any bf16 user of transformers gets) and through
the project's runner (arena caches, the project's ops). Both errors are max |logit - fp32 logit|
over every position of two requests: one prefilled in two chunks packed beside the other's whole
prefill, then decode steps of both in one packed step each. The issue's bar: ours within about
1.5x transformers-bf16's own error.

``--tiny``: CPU dry run (Triton interpreter, toy sizes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import triton
import transformers

from avmp_triton.models import runner_for

# nvidia/Nemotron-H-8B-Base-8K config.json numbers (hidden 4096, 32/8 heads of 128, 128 Mamba
# heads of 64, 8 groups, d_state 128, MLP 21504 relu2, vocab 131072), 5 of its 52 layers
NEMOTRON_H_8B = dict(vocab_size=131072, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=21504, ssm_state_size=128, mamba_num_heads=128,
                     mamba_head_dim=64, n_groups=8, conv_kernel=4, chunk_size=128, use_conv_bias=True,
                     hybrid_override_pattern="M-M*-")
NEMOTRON_H_TINY = dict(vocab_size=97, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                       intermediate_size=96, ssm_state_size=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=2,
                       conv_kernel=4, chunk_size=8, use_conv_bias=True, hybrid_override_pattern="M*M-")
# ibm-ai-platform/Bamba-9B's sizes (hidden 4096, 32/8 heads of 128, MLP 14336 SwiGLU, vocab 128256;
# Mamba2 128 heads of 64, 1 group, d_state 128, expand 2: the cache geometry of the bamba-9b
# preset in avmp_triton/spec.py), 4 of its 32 layers with the attention layer third
BAMBA_9B = dict(vocab_size=128256, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, num_hidden_layers=4, attn_layer_indices=[2], mamba_n_heads=128,
                mamba_d_head=64, mamba_expand=2, mamba_n_groups=1, mamba_d_state=128, mamba_d_conv=4,
                mamba_chunk_size=256)
BAMBA_TINY = dict(vocab_size=97, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=96,
                  num_hidden_layers=3, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_expand=1,
                  mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=8)
# ibm-granite/granite-4.0-h-small's sizes (hidden 4096, 32/8 heads of 128, vocab 100352, 72 experts
# of 768 top-10, shared MLP 1536; Mamba2 128 heads of 64, 1 group, d_state 128), 4 of its 40
# layers with the attention layer second; attention_multiplier 128^-0.5 (transformers' default 1.0
# is no model's value), the other multipliers at transformers' defaults
GRANITE_4_H_SMALL = dict(vocab_size=100352, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=768, shared_intermediate_size=1536, num_local_experts=72,
                         num_experts_per_tok=10, num_hidden_layers=4,
                         layer_types=["mamba", "attention", "mamba", "mamba"], mamba_n_heads=128, mamba_d_head=64,
                         mamba_expand=2, mamba_n_groups=1, mamba_d_state=128, mamba_d_conv=4, mamba_chunk_size=256,
                         position_embedding_type="nope", tie_word_embeddings=True, attention_multiplier=128 ** -0.5)
GRANITE_TINY = dict(vocab_size=97, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=48,
                    shared_intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=3,
                    layer_types=["mamba", "attention", "mamba"], mamba_n_heads=8, mamba_d_head=16, mamba_expand=1,
                    mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=8,
                    position_embedding_type="nope", attention_multiplier=64 ** -0.5)
# ai21labs/AI21-Jamba-1.5-Mini's sizes (hidden 4096, 32/8 heads of 128, MLP 14336, 16 experts top-2,
# vocab 65536; Mamba1 d_inner 8192, d_state 16, dt rank 256), 4 of its 32 layers: attention third
# (period 4, offset 2 here; 8 and 4 in the model), experts on odd layers as in the model
JAMBA_1_5_MINI = dict(vocab_size=65536, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, num_experts=16, num_experts_per_tok=2, num_hidden_layers=4,
                      attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1,
                      mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=256)
JAMBA_TINY = dict(vocab_size=97, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=96,
                  num_hidden_layers=3, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=0, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4,
                  mamba_expand=1, mamba_dt_rank=8)
# tiiuae/Falcon-H1-7B's attention and Mamba sizes (hidden 3072, 12/2 heads of 128; mamba_d_ssm 3072,
# 24 heads of 128, 1 group, d_state 256: the falcon-h1-7b preset), 3 layers; its MLP width, vocab
# and multipliers at transformers' FalconH1Config defaults (not read from the model)
FALCON_H1_7B = dict(hidden_size=3072, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                    num_hidden_layers=3, mamba_d_ssm=3072, mamba_n_heads=24, mamba_d_head=128, mamba_n_groups=1,
                    mamba_d_state=256, mamba_d_conv=4, mamba_chunk_size=256)
FALCON_TINY = dict(vocab_size=97, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                   intermediate_size=96, num_hidden_layers=2, mamba_d_ssm=256, mamba_n_heads=8, mamba_d_head=32,
                   mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=8)
# Zyphra/Zamba2-2.7B's sizes (hidden 2560, 32 heads = 32 KV heads of 2 * 2560 / 32 = 160, MLP 10240
# gelu, vocab 32000, two shared blocks; Mamba2 80 heads of 64, 1 group, d_state 64: the zamba2-2.7b
# preset), 4 of its 54 layers, two of them hybrid; RoPE and attention adapters switched on (rank
# 128) so that every branch of the runner runs, whatever the released checkpoint sets
ZAMBA2_2_7B = dict(vocab_size=32000, hidden_size=2560, num_attention_heads=32, num_key_value_heads=32,
                   intermediate_size=10240, num_hidden_layers=4,
                   layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"], num_mem_blocks=2,
                   use_shared_attention_adapter=True, adapter_rank=128, use_mem_rope=True, mamba_expand=2,
                   n_mamba_heads=80, mamba_d_state=64, mamba_ngroups=1, mamba_d_conv=4, chunk_size=256,
                   hidden_act="gelu")
ZAMBA2_TINY = dict(vocab_size=97, hidden_size=80, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                   num_hidden_layers=3, layers_block_type=["linear_attention", "hybrid", "hybrid"], num_mem_blocks=2,
                   use_shared_attention_adapter=True, adapter_rank=8, use_mem_rope=True, mamba_expand=2,
                   n_mamba_heads=10, mamba_d_state=16, mamba_ngroups=1, mamba_d_conv=4, chunk_size=8)
# state-spaces/mamba-2.8b-hf's sizes (hidden 2560, d_inner 5120, d_state 16, dt rank 160, vocab
# 50280), 3 of its 64 layers
MAMBA_2_8B = dict(vocab_size=50280, hidden_size=2560, intermediate_size=5120, state_size=16, conv_kernel=4,
                  time_step_rank=160, num_hidden_layers=3, residual_in_fp32=True)
MAMBA_TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, state_size=8, conv_kernel=4, time_step_rank=4,
                  num_hidden_layers=2, residual_in_fp32=True)
# mistralai/Mamba-Codestral-7B-v0.1's sizes (hidden 4096, 128 heads of 64, 8 groups, d_state 128,
# vocab 32768), 3 of its 64 layers
MAMBA2_CODESTRAL_7B = dict(vocab_size=32768, hidden_size=4096, num_heads=128, head_dim=64, n_groups=8, state_size=128,
                           expand=2, conv_kernel=4, chunk_size=256, num_hidden_layers=3, residual_in_fp32=True)
MAMBA2_TINY = dict(vocab_size=97, hidden_size=32, num_heads=4, head_dim=16, n_groups=2, state_size=8, expand=2,
                   conv_kernel=4, chunk_size=8, num_hidden_layers=2, residual_in_fp32=True)
# family -> (config class, model class, real sizes, dry-run sizes)
FAMILIES = {"nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", NEMOTRON_H_8B, NEMOTRON_H_TINY),
            "bamba": ("BambaConfig", "BambaForCausalLM", BAMBA_9B, BAMBA_TINY),
            "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", GRANITE_4_H_SMALL,
                                 GRANITE_TINY),
            "jamba": ("JambaConfig", "JambaForCausalLM", JAMBA_1_5_MINI, JAMBA_TINY),
            "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", FALCON_H1_7B, FALCON_TINY),
            "zamba2": ("Zamba2Config", "Zamba2ForCausalLM", ZAMBA2_2_7B, ZAMBA2_TINY),
            "mamba": ("MambaConfig", "MambaForCausalLM", MAMBA_2_8B, MAMBA_TINY),
            "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", MAMBA2_CODESTRAL_7B, MAMBA2_TINY)}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """transformers' init leaves A_log, dt_bias, D and the norms at fixed values: draw them."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=p.device)
            if name.endswith("A_log"):
                p.copy_(noise * 0.5)
            elif name.endswith("dt_bias"):
                p.copy_(noise * 0.5 - 1.0)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(noise * 0.1)
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(noise * p.shape[-1] ** -0.5)   # per-expert fan-in: the MoE branch not silent
            else:
                p.copy_(noise * 0.02)          # transformers' initializer_range


def run_ours(model, lens: tuple[int, int], chunk: int, decode: int, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of every position of both requests through the runner: request a in two chunks
    (the first packed with b's whole prefill), then ``decode`` packed decode steps."""
    r = runner_for(model, capacity_bytes=4 << 30, max_requests=2, max_context=max(lens) + decode + 16)
    a, b = ids
    la, lb = lens
    out_a, out_b = r.step(["a", "b"], [a[:chunk], b[:lb]], all_logits=True)
    out_a = [out_a, r.step(["a"], [a[chunk:la]], all_logits=True)[0]]
    out_b = [out_b]
    for t in range(decode):
        x, y = r.step(["a", "b"], [a[la + t:la + t + 1], b[lb + t:lb + t + 1]], all_logits=True)
        out_a.append(x)
        out_b.append(y)
    r.release(["a", "b"])
    return [torch.cat(out_a), torch.cat(out_b)]


@torch.no_grad()
def family(name: str, geometry: dict, dev: str, lens=(300, 129), chunk=160, decode=8) -> dict:
    config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[name][:2])
    cfg = config_cls(**geometry)
    torch.manual_seed(0)
    with torch.device(dev):
        ref = model_cls(cfg).float().eval()
    randomize(ref, 0)
    gen = torch.Generator(device=dev).manual_seed(1)
    ids = [torch.randint(0, cfg.vocab_size, (n + decode,), generator=gen, device=dev) for n in lens]
    want = [ref(x[None], use_cache=False).logits[0].float() for x in ids]
    bf16 = ref.to(torch.bfloat16)              # in place: the fp32 reference is computed already
    hf = [bf16(x[None], use_cache=False).logits[0].float() for x in ids]
    t0 = time.time()
    ours = run_ours(bf16, lens, chunk, decode, ids)
    wall = time.time() - t0
    err = lambda got: max((g - w).abs().max().item() for g, w in zip(got, want))  # noqa: E731
    scale = max(w.abs().max().item() for w in want)
    e_ours, e_hf = err(ours), err(hf)
    return dict(family=name, config=geometry, lens=list(lens), chunk=chunk, decode_steps=decode,
                max_abs_logit=scale, err_ours_bf16=e_ours, err_transformers_bf16=e_hf,
                ratio=e_ours / e_hf if e_hf else None, ours_wall_s=wall)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES))
    args = ap.parse_args(argv)
    names = args.families.split(",")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; known: {list(FAMILIES)}")
    dev = "cpu" if args.tiny else "cuda"
    small = dict(lens=(21, 9), chunk=12, decode=2) if args.tiny else {}
    rows = [family(name, FAMILIES[name][3] if args.tiny else FAMILIES[name][2], dev, **small) for name in names]
    env = dict(torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
               python=platform.python_version(),
               gpu=torch.cuda.get_device_name() if dev == "cuda" else "none (CPU dry run)")
    res = dict(bench="parity_models", env=env, rows=rows)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print(f"{'family':12s} {'|logit| max':>12s} {'ours bf16':>10s} {'hf bf16':>10s} {'ratio':>6s}")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        print(f"{r['family']:12s} {r['max_abs_logit']:12.3f} {r['err_ours_bf16']:10.4f} "
              f"{r['err_transformers_bf16']:10.4f} {ratio:>6s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
