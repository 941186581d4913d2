"""Tensor-parallel shards of a hybrid model, cut as vLLM shards them, for a runner on each rank.

``shard_model(hf_model)`` returns this rank's transformers model: attention q heads split over the
ranks and KV heads split too (replicated when there are fewer KV heads than ranks: vLLM's
``QKVParallelLinear``), o_proj split by its input columns; the Mamba2 mixer's in_proj split per
part (z, x, B, C, dt: heads, and the groups of B and C, so the gated norm's groups stay whole on a
rank), its conv channels, A, D and dt_bias with them, out_proj split by input columns; the MLP's
up_proj by rows, down_proj by columns; embeddings and lm_head split over the vocabulary, padded to
a multiple of the ranks (vLLM's ``VocabParallelEmbedding`` / ``ParallelLMHead``). Norms are
replicated. The shard carries a ``TensorParallel`` as ``tp_shard``; a ``HybridRunner`` built on it
all-reduces each mixer's output (the one collective per mixer), sums the embedding over ranks and
gathers the logits, so every rank samples from the same full logits.

Every rank runs the same scheduler on the same requests, so the allocators stay identical without
any broadcast; ``check_replicas=True`` verifies that every step (a debug mode,
``avmp_triton.memory.replica``). The arena of a rank holds its shard of every unit: the SSM block
shrinks with the Mamba heads, a KV page with the KV heads.

Nemotron-H only for now (``SHARDABLE``), without biases (its checkpoints have none).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

SHARDABLE = ("nemotron_h",)


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
    if config.model_type not in SHARDABLE:
        raise ValueError(f"tensor parallelism supports {SHARDABLE}, got model_type {config.model_type!r}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    cut = _Cut(config, rank, world)
    shard_cfg = cut.config()
    with torch.device("meta"):
        shard = type(hf_model)(shard_cfg)
    state = {name: cut.param(name, t) for name, t in hf_model.state_dict().items()}
    shard.load_state_dict(state, assign=True)
    shard.eval()
    # the logical model's vocabulary: prompts, EOS and logits are the full model's
    shard.config.vocab_size = config.vocab_size
    shard.tp_shard = TensorParallel(rank, world, group, config.vocab_size, cut.vocab_part, check_replicas)
    return shard


class _Cut:
    """Which slice of each full parameter a rank holds."""

    def __init__(self, config, rank: int, world: int):
        self.c, self.rank, self.world = config, rank, world
        c = config
        if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False) or getattr(c, "use_bias", False):
            raise ValueError("tensor parallelism here shards bias-free projections (Nemotron-H checkpoints have none)")
        for name, n in (("num_attention_heads", c.num_attention_heads), ("mamba_num_heads", c.mamba_num_heads),
                        ("n_groups", c.n_groups), ("intermediate_size", c.intermediate_size)):
            if n % world:
                raise ValueError(f"{name}={n} does not split over {world} ranks")
        kv = c.num_key_value_heads
        if kv % world and world % kv:
            raise ValueError(f"num_key_value_heads={kv} neither splits over nor divides {world} ranks")
        self.kv_local = max(1, kv // world)
        self.head_dim = c.head_dim
        self.vocab_part = -(-c.vocab_size // world)
        self.d_inner = c.mamba_num_heads * c.mamba_head_dim
        self.gn = c.n_groups * c.ssm_state_size

    def config(self):
        c, w = self.c, self.world
        shard = type(c).from_dict(c.to_dict())
        shard.num_attention_heads = c.num_attention_heads // w
        shard.num_key_value_heads = self.kv_local
        shard.head_dim = c.head_dim   # explicit: it must not follow hidden_size / heads
        shard.mamba_num_heads = c.mamba_num_heads // w
        shard.n_groups = c.n_groups // w
        shard.intermediate_size = c.intermediate_size // w
        shard.vocab_size = self.vocab_part
        return shard

    def _part(self, n: int) -> slice:
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def param(self, name: str, t: torch.Tensor) -> torch.Tensor:
        leaf = name.rsplit(".", 2)
        key = ".".join(leaf[-2:]) if len(leaf) > 1 else name
        if name.endswith("embeddings.weight") or name == "lm_head.weight":
            return self._vocab_rows(t)
        rows = {"q_proj.weight": lambda: t[self._part(t.shape[0])],
                "k_proj.weight": lambda: self._kv_rows(t), "v_proj.weight": lambda: self._kv_rows(t),
                "up_proj.weight": lambda: t[self._part(t.shape[0])],
                "in_proj.weight": lambda: self._in_proj(t),
                "conv1d.weight": lambda: self._conv(t), "conv1d.bias": lambda: self._conv(t),
                "mixer.A_log": lambda: t[self._part(t.shape[0])], "mixer.D": lambda: t[self._part(t.shape[0])],
                "mixer.dt_bias": lambda: t[self._part(t.shape[0])]}
        cols = ("o_proj.weight", "down_proj.weight", "out_proj.weight")
        if key in rows:
            return rows[key]().contiguous()
        if key in cols:
            return t[:, self._part(t.shape[1])].contiguous()
        if key == "norm.weight" and ".mixer." in name:   # the gated norm over this rank's channels
            return t[self._part(t.shape[0])].contiguous()
        return t   # the pre-norms and the final norm are replicated

    def _kv_rows(self, t: torch.Tensor) -> torch.Tensor:
        first = self.rank * self.c.num_key_value_heads // self.world
        return t[first * self.head_dim:(first + self.kv_local) * self.head_dim]

    def _vocab_rows(self, t: torch.Tensor) -> torch.Tensor:
        lo = self.rank * self.vocab_part
        part = t[lo:lo + self.vocab_part]
        if part.shape[0] < self.vocab_part:   # the last rank's padding rows: never looked up, logits cut off
            part = torch.cat([part, part.new_zeros(self.vocab_part - part.shape[0], t.shape[1])])
        return part.contiguous()

    def _xbc(self, t: torch.Tensor) -> list[torch.Tensor]:
        """This rank's x channels, then its groups of B and of C, from rows laid out x | B | C."""
        x, B, C = t.split([self.d_inner, self.gn, self.gn])
        return [x[self._part(self.d_inner)], B[self._part(self.gn)], C[self._part(self.gn)]]

    def _in_proj(self, t: torch.Tensor) -> torch.Tensor:
        H = self.c.mamba_num_heads
        z, xbc, dt = t.split([self.d_inner, self.d_inner + 2 * self.gn, H])
        return torch.cat([z[self._part(self.d_inner)], *self._xbc(xbc), dt[self._part(H)]])

    def _conv(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._xbc(t))
