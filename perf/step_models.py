"""What a serving step of each preset model computes besides its caches: its linear layers (shapes
from the model's config.json), its layer order, and the torch glue between the ops; and a layer
stack that runs one whole step with the project's ops and random bf16 weights at real size.
Used by perf/bench_step.py (timing) and perf/fit_steptime.py (the fit); the numbers also go into
avmp_triton/sim/data/steptime_h200.json, so the step-time model names what it assumed.

Sublayer letters: "M" a Mamba mixer, "*" an attention mixer, "-" a dense MLP, "E" an MoE block
(router + top-k experts, plus a shared MLP where the model has one). Each sublayer starts with an
RMSNorm and ends with a residual add.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    vocab: int
    pattern: str                      # sublayers in order
    linears: dict                     # sublayer letter -> [(K, N), ...] per token, per sublayer
    mlp_act: str                      # "relu2" (up, down) or "swiglu" (gate|up fused, down)
    experts: int = 0                  # routed experts of an "E" sublayer
    top_k: int = 0
    expert_linears: tuple = ()        # [(K, N), ...] of one expert
    norm_group: int = 0               # Mamba2 gated RMSNorm group width (d_inner / n_groups); 0: none
    source: str = ""

    def count(self, letter: str) -> int:
        return self.pattern.count(letter)


def _jamba_pattern() -> str:
    # 32 layers; attention at layer % 8 == 4 (attn_layer_period 8, offset 4), MoE at odd layers
    # (expert_layer_period 2, offset 1); every layer is a mixer then a feed-forward
    return "".join(("*" if i % 8 == 4 else "M") + ("E" if i % 2 == 1 else "-") for i in range(32))


def _granite_pattern() -> str:
    # 40 layers, attention at 4 of them (layer_types), every layer's feed-forward an MoE with a shared MLP
    attn = {5, 15, 25, 35}
    return "".join(("*" if i in attn else "M") + "E" for i in range(40))


MODELS = {
    # nvidia/Nemotron-H-8B-Base-8K config.json: hidden 4096, vocab 131072, hybrid_override_pattern
    # below, intermediate_size 21504 (relu2, no gate), 32 heads / 8 KV of 128; Mamba2 128 heads x 64,
    # n_groups 8, d_state 128 -> in_proj 4096 -> 2*8192 + 2*8*128 + 128 = 18560
    "nemotron-h-8b": Model(
        name="nemotron-h-8b", hidden=4096, vocab=131072,
        pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        linears={"M": [(4096, 18560), (8192, 4096)], "*": [(4096, 6144), (4096, 4096)],
                 "-": [(4096, 21504), (21504, 4096)]},
        mlp_act="relu2", norm_group=1024, source="huggingface.co/nvidia/Nemotron-H-8B-Base-8K config.json"),
    # ai21labs/AI21-Jamba-1.5-Mini config.json: hidden 4096, vocab 65536, 32 layers, intermediate
    # 14336 (SwiGLU), 16 experts top-2; Mamba1 d_inner 8192, d_state 16, dt_rank 256 -> in_proj
    # 4096 -> 16384, x_proj 8192 -> 256 + 2*16, dt_proj 256 -> 8192, out_proj 8192 -> 4096
    "jamba-1.5-mini": Model(
        name="jamba-1.5-mini", hidden=4096, vocab=65536, pattern=_jamba_pattern(),
        linears={"M": [(4096, 16384), (8192, 288), (256, 8192), (8192, 4096)],
                 "*": [(4096, 6144), (4096, 4096)], "-": [(4096, 28672), (14336, 4096)], "E": [(4096, 16)]},
        mlp_act="swiglu", experts=16, top_k=2, expert_linears=((4096, 28672), (14336, 4096)),
        source="huggingface.co/ai21labs/AI21-Jamba-1.5-Mini config.json"),
    # ibm-granite/granite-4.0-h-small config.json: hidden 4096, vocab 100352, 40 layers (4
    # attention), 72 experts top-10 of intermediate 768 (SwiGLU) + shared MLP of 1536
    # (shared_intermediate_size); Mamba2 128
    # heads x 64, n_groups 1, d_state 128 -> in_proj 4096 -> 2*8192 + 2*128 + 128 = 16768
    "granite-4.0-h-small": Model(
        name="granite-4.0-h-small", hidden=4096, vocab=100352, pattern=_granite_pattern(),
        linears={"M": [(4096, 16768), (8192, 4096)], "*": [(4096, 6144), (4096, 4096)],
                 "E": [(4096, 72), (4096, 3072), (1536, 4096)]},
        mlp_act="swiglu", experts=72, top_k=10, expert_linears=((4096, 1536), (768, 4096)), norm_group=8192,
        source="huggingface.co/ibm-granite/granite-4.0-h-small config.json"),
}


# the dry run's model (perf/bench_step.py --tiny): the layer stack's code at toy size
MODELS["tiny"] = Model(name="tiny", hidden=64, vocab=128, pattern="M-*-M-",
                       linears={"M": [(64, 64 + 64 + 4), (64, 64)], "*": [(64, 64 + 32), (64, 64)],
                                "-": [(64, 128), (128, 64)]},
                       mlp_act="relu2", norm_group=32, source="toy")


def q_heads(spec) -> int:
    return 4 * spec.num_kv_heads  # the presets: 32 query heads over 8 KV heads of 128 (hidden 4096)


def distinct_shapes(name: str) -> list[tuple[int, int]]:
    m = MODELS[name]
    shapes = {s for ls in m.linears.values() for s in ls} | set(m.expert_linears) | {(m.hidden, m.vocab)}
    return sorted(shapes)


def glue_kinds(m: Model) -> list[str]:
    return sorted(set(m.pattern))


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w


def glue_fn(m: Model, kind: str, T: int, dev):
    """The torch work of one ``kind`` sublayer at T tokens besides its ops and matmuls."""
    h = torch.randn(T, m.hidden, device=dev, dtype=torch.bfloat16)
    w = torch.ones(m.hidden, device=dev, dtype=torch.bfloat16)
    mid = _mid_width(m, kind)
    u = torch.randn(T, mid, device=dev, dtype=torch.bfloat16) if mid else None

    def fn():
        x = _rms(h, w)
        if kind == "M" and u is not None:    # Mamba2: y * silu(z), then the grouped RMSNorm
            g = u * torch.nn.functional.silu(u)
            _rms(g.view(T, -1, m.norm_group), torch.ones(m.norm_group, device=dev, dtype=g.dtype))
        elif kind in "-E" and u is not None:
            half = u.shape[1] // 2
            if m.mlp_act == "relu2":
                torch.relu(u).square()
            else:
                torch.nn.functional.silu(u[:, :half]) * u[:, half:]
        if kind == "E":
            logits = torch.randn(T, m.experts, device=dev)
            torch.topk(torch.softmax(logits, -1), m.top_k, dim=-1)
            h.index_select(0, torch.arange(T, device=dev).repeat_interleave(m.top_k))
        h.add_(x)
    return fn


def _mid_width(m: Model, kind: str) -> int:
    if kind == "M" and m.norm_group:
        return m.linears["M"][1][0]                  # d_inner: the gated norm's width
    if kind == "-":
        return m.linears["-"][0][1]
    if kind == "E":
        return m.linears["E"][1][1] if len(m.linears["E"]) > 1 else m.expert_linears[0][1]
    return 0


def make_weights(m: Model, dev) -> dict:
    """One random bf16 weight per linear of every sublayer, and the lm_head: the model at real size."""
    w = {}
    for i, letter in enumerate(m.pattern):
        w[i] = [torch.randn(K, N, device=dev, dtype=torch.bfloat16) * 0.02 for K, N in m.linears.get(letter, [])]
    w["lm_head"] = torch.randn(m.hidden, m.vocab, device=dev, dtype=torch.bfloat16) * 0.02
    return w


class LayerStack:
    """One serving step of a dense model (no "E" sublayers): decode rows first, then the prefill
    chunks, packed; every sublayer's matmuls at real size, the ops on the arena, the glue; logits
    for every decode row and the last token of every chunk."""

    def __init__(self, m: Model, spec, weights: dict, arena, n_dec: int, ctx: int, chunks: list, dev, parts: dict):
        if "E" in m.pattern:
            raise ValueError(f"{m.name}: the layer stack runs dense models only")
        self.m, self.w = m, weights
        self.T = n_dec + sum(L for L, _ in chunks)
        self.h = torch.randn(self.T, m.hidden, device=dev, dtype=torch.bfloat16)
        self.bufs = {}
        for i, letter in enumerate(m.pattern):
            for j, (K, N) in enumerate(m.linears.get(letter, [])):
                self.bufs.setdefault((K, N), (torch.randn(self.T, K, device=dev, dtype=torch.bfloat16),
                                              torch.empty(self.T, N, device=dev, dtype=torch.bfloat16)))
        self.glue = {k: glue_fn(m, k, self.T, dev) for k in glue_kinds(m)}
        self.ops = {"*": [], "M": []}
        if n_dec:
            self.ops["*"].append(parts["attn_decode"](spec, arena, n_dec, ctx))
            self.ops["M"].append(parts["mamba_decode"](spec, arena, n_dec))
        if chunks:
            self.ops["*"].append(parts["attn_prefill"](spec, arena, chunks, row0=n_dec))
            self.ops["M"].append(parts["mamba_prefill"](spec, arena, chunks, row0=n_dec))
        self.sampled = n_dec + len(chunks)
        self.logits = torch.empty(self.sampled, m.vocab, device=dev, dtype=torch.bfloat16)

    def forward(self) -> None:
        layer = {"*": 0, "M": 0}
        for i, letter in enumerate(self.m.pattern):
            for w in self.w[i]:
                x, y = self.bufs[tuple(w.shape)]
                torch.mm(x, w, out=y)
            if letter in self.ops:
                for op in self.ops[letter]:
                    op(layer[letter])
                layer[letter] += 1
            self.glue[letter]()
        torch.mm(self.h[:self.sampled], self.w["lm_head"], out=self.logits)
