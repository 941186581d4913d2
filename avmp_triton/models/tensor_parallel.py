"""Tensor-parallel shards of a hybrid model, cut as vLLM shards them, for a runner on each rank.

``shard_model(hf_model)`` returns this rank's transformers model: attention q heads split over the
ranks and KV heads split too (replicated when there are fewer KV heads than ranks: vLLM's
``QKVParallelLinear``), o_proj split by its input columns; the Mamba2 mixer's in_proj split per
part (z, x, B, C, dt: heads, and the groups of B and C, so the gated norm's groups stay whole on a
rank), its conv channels, A, D and dt_bias with them, out_proj split by input columns; the MLP's
up_proj (and gate_proj) by rows, down_proj by columns; embeddings and lm_head split over the vocabulary, padded to
a multiple of the ranks (vLLM's ``VocabParallelEmbedding`` / ``ParallelLMHead``). Norms are
replicated. The shard carries a ``TensorParallel`` as ``tp_shard``; a ``HybridRunner`` built on it
all-reduces each mixer's output (the one collective per mixer), sums the embedding over ranks and
gathers the logits, so every rank samples from the same full logits.

Every rank runs the same scheduler on the same requests, so the allocators stay identical without
any broadcast; ``check_replicas=True`` verifies that every step (a debug mode,
``avmp_triton.memory.replica``). The arena of a rank holds its shard of every unit: the SSM block
shrinks with the Mamba heads, a KV page with the KV heads.

Nemotron-H, Bamba and Jamba (``SHARDABLE``). A row-parallel bias is kept on rank 0 only, so the sum
adds it once. Jamba's Mamba1 mixer splits its d_inner channels; its x_proj reads them, so its
output (dt, B, C) is all-reduced inside the mixer, as vLLM's ``RowParallelLinear`` does there; a
MoE's experts are each cut as an MLP, the router replicated.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclasses.dataclass
class TensorParallel:
    """One rank's place in a tensor-parallel group and the collectives its runner makes."""
    rank: int
    world: int
    group: object
    vocab_size: int          # the model's, before padding
    vocab_part: int          # rows of embedding / lm_head on each rank (the padded vocab / world)
    check_replicas: bool = False

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        local = ids - self.rank * self.vocab_part
        mine = (local >= 0) & (local < self.vocab_part)
        h = F.embedding(torch.where(mine, local, 0), weight)
        return self.reduce(h * mine.unsqueeze(-1).to(h.dtype))

    def logits(self, h: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        part = F.linear(h, lm_head).float().contiguous()
        parts = [torch.empty_like(part) for _ in range(self.world)]
        dist.all_gather(parts, part, group=self.group)
        return torch.cat(parts, dim=-1)[..., :self.vocab_size]


class AllReduced:
    """A mixer whose output projection holds this rank's input columns: the rank's partial sum,
    all-reduced, is the full output."""

    def __init__(self, mixer, tp: TensorParallel):
        self.mixer, self.tp = mixer, tp

    def __call__(self, x: torch.Tensor, batch=None) -> torch.Tensor:
        return self.tp.reduce(self.mixer(x, batch).contiguous())


def shard_model(hf_model: torch.nn.Module, group=None, *, check_replicas: bool = False) -> torch.nn.Module:
    """This rank's shard of ``hf_model`` (every rank passes the same full model) in the process
    group ``group`` (default: the world). The shard's config keeps the model's vocab_size."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised torch.distributed process group")
    config = hf_model.config
    if config.model_type not in FAMILIES:
        raise ValueError(f"tensor parallelism supports {SHARDABLE}, got model_type {config.model_type!r}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    cut = _Cut(config, rank, world)
    shard_cfg = cut.config()
    with torch.device("meta"):
        shard = type(hf_model)(shard_cfg)
    state = {name: cut.param(name, t) for name, t in hf_model.state_dict().items()}
    shard.load_state_dict(state, assign=True)
    _copy_unsaved_buffers(hf_model, shard)
    shard.eval()
    # the logical model's vocabulary: prompts, EOS and logits are the full model's
    shard.config.vocab_size = config.vocab_size
    shard.tp_shard = TensorParallel(rank, world, group, config.vocab_size, cut.vocab_part, check_replicas)
    return shard


def _copy_unsaved_buffers(full: torch.nn.Module, shard: torch.nn.Module) -> None:
    """Buffers outside the state dict (RoPE's inv_freq) are still on the meta device: the full
    model's, which do not depend on the head counts, take their place."""
    full_buffers = dict(full.named_buffers())
    for name, buf in list(shard.named_buffers()):
        if buf.is_meta:
            src = full_buffers.get(name)
            if src is None or src.shape != buf.shape:
                raise ValueError(f"buffer {name!r} of the shard has no full-model counterpart of shape {tuple(buf.shape)}")
            module, _, leaf = name.rpartition(".")
            shard.get_submodule(module).register_buffer(leaf, src.clone(), persistent=False)


@dataclasses.dataclass(frozen=True)
class _Family:
    """A family's config names for what the cut splits, and its Mamba module's name in a layer.
    Mamba2 families split heads and groups; Mamba1 (no heads) splits the d_inner channels."""
    d_state: str
    mixer: str
    mamba_heads: str | None = None
    groups: str | None = None
    mamba_head_dim: str | None = None
    expand: str | None = None   # a config that derives d_inner as expand * hidden_size
    expand_int: bool = False    # transformers' module keeps expand * hidden_size unrounded: it must stay an int


FAMILIES = {
    "nemotron_h": _Family("ssm_state_size", "mixer", "mamba_num_heads", "n_groups", "mamba_head_dim"),
    "bamba": _Family("mamba_d_state", "mamba", "mamba_n_heads", "mamba_n_groups", "mamba_d_head", "mamba_expand"),
    "jamba": _Family("mamba_d_state", "mamba", expand="mamba_expand", expand_int=True),
}
SHARDABLE = tuple(FAMILIES)
_COLUMN = {"q_proj", "up_proj", "gate_proj", "dt_proj"}     # output rows split: weight rows, bias
_ROW = {"o_proj", "down_proj", "out_proj", "x_proj"}         # input columns split: the bias is added once
_PER_HEAD = {"A_log", "D", "dt_bias"}


class _Cut:
    """Which slice of each full parameter a rank holds."""

    def __init__(self, config, rank: int, world: int):
        self.c, self.rank, self.world = config, rank, world
        self.f = f = FAMILIES[config.model_type]
        c = config
        split = [("num_attention_heads", c.num_attention_heads), ("intermediate_size", c.intermediate_size)]
        if f.mamba_heads:
            self.heads, self.groups = getattr(c, f.mamba_heads), getattr(c, f.groups)
            split += [(f.mamba_heads, self.heads), (f.groups, self.groups)]
            self.d_inner = self.heads * getattr(c, f.mamba_head_dim)
            self.gn = self.groups * getattr(c, f.d_state)
        else:
            self.heads = self.groups = None
            self.d_inner, self.gn = getattr(c, f.expand) * c.hidden_size, 0
            split += [(f.expand, getattr(c, f.expand)) if f.expand_int else ("d_inner", self.d_inner)]
        for name, n in split:
            if n % world:
                raise ValueError(f"{name}={n} does not split over {world} ranks")
        kv = c.num_key_value_heads
        if kv % world and world % kv:
            raise ValueError(f"num_key_value_heads={kv} neither splits over nor divides {world} ranks")
        self.kv_local = max(1, kv // world)
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.vocab_part = -(-c.vocab_size // world)

    def config(self):
        c, w, f = self.c, self.world, self.f
        shard = type(c).from_dict(c.to_dict())
        shard.num_attention_heads = c.num_attention_heads // w
        shard.num_key_value_heads = self.kv_local
        shard.head_dim = self.head_dim   # explicit: it must not follow hidden_size / heads
        if f.mamba_heads:
            setattr(shard, f.mamba_heads, self.heads // w)
            setattr(shard, f.groups, self.groups // w)
        expand = getattr(c, f.expand) if f.expand else None
        if expand is not None and expand % w == 0:
            setattr(shard, f.expand, expand // w)
        elif expand is not None:   # a fraction (Bamba's module rounds it); the config's int-only validator would refuse it
            object.__setattr__(shard, f.expand, expand / w)
        shard.intermediate_size = c.intermediate_size // w
        shard.vocab_size = self.vocab_part
        return shard

    def _part(self, n: int) -> slice:
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def param(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Copies, not views: a view of the full weight would keep all of it alive on every rank."""
        parts = name.split(".")
        leaf, module = parts[-1], parts[-2] if len(parts) > 1 else ""
        if name.endswith("embeddings.weight") or name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            return self._vocab_rows(t)
        if module == "experts":   # a MoE's experts stacked [E, ...]: each expert cut as an MLP
            return self._experts(leaf, t)
        if module in _COLUMN or (leaf in _PER_HEAD and module == self.f.mixer):
            return t[self._part(t.shape[0])].clone()
        if module in ("k_proj", "v_proj"):
            return self._kv_rows(t).clone()
        if module == "in_proj":
            return self._in_proj(t).clone()
        if module == "conv1d":
            return torch.cat(self._xbc(t)) if self.heads else t[self._part(self.d_inner)].clone()
        if module in _ROW:
            if leaf == "bias":   # added once, after the all-reduce sums the ranks' parts
                return t.clone() if self.rank == 0 else torch.zeros_like(t)
            return t[:, self._part(t.shape[1])].clone()
        if module == "norm" and len(parts) > 2 and parts[-3] == self.f.mixer:   # the gated norm, whole groups
            return t[self._part(t.shape[0])].clone()
        return t   # the pre-norms and the final norm are replicated

    def _kv_rows(self, t: torch.Tensor) -> torch.Tensor:
        first = self.rank * self.c.num_key_value_heads // self.world
        return t[first * self.head_dim:(first + self.kv_local) * self.head_dim]

    def _vocab_rows(self, t: torch.Tensor) -> torch.Tensor:
        lo = self.rank * self.vocab_part
        part = t[lo:lo + self.vocab_part]
        if part.shape[0] < self.vocab_part:   # the last rank's padding rows: never looked up, logits cut off
            part = torch.cat([part, part.new_zeros(self.vocab_part - part.shape[0], t.shape[1])])
        return part.clone()

    def _xbc(self, t: torch.Tensor) -> list[torch.Tensor]:
        """This rank's x channels, then its groups of B and of C, from rows laid out x | B | C."""
        x, B, C = t.split([self.d_inner, self.gn, self.gn])
        return [x[self._part(self.d_inner)], B[self._part(self.gn)], C[self._part(self.gn)]]

    def _in_proj(self, t: torch.Tensor) -> torch.Tensor:
        if not self.heads:   # Mamba1: x | z
            x, z = t.split([self.d_inner, self.d_inner])
            return torch.cat([x[self._part(self.d_inner)], z[self._part(self.d_inner)]])
        z, xbc, dt = t.split([self.d_inner, self.d_inner + 2 * self.gn, self.heads])
        return torch.cat([z[self._part(self.d_inner)], *self._xbc(xbc), dt[self._part(self.heads)]])

    def _experts(self, leaf: str, t: torch.Tensor) -> torch.Tensor:
        if leaf == "gate_up_proj":   # [E, gate | up, hidden]
            gate, up = t.chunk(2, dim=1)
            part = self._part(gate.shape[1])
            return torch.cat([gate[:, part], up[:, part]], dim=1)
        if leaf == "down_proj":      # [E, hidden, intermediate]
            return t[:, :, self._part(t.shape[2])].clone()
        raise ValueError(f"no rule to cut the experts' {leaf!r}")
