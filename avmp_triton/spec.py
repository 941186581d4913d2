"""Model cache specs: the exact byte sizes of a hybrid model's KV pages and SSM blocks."""
from __future__ import annotations

import dataclasses
import types

import torch


# What the kernels can read: the attention kernels (decode, KV append, prefill) take K/V in these
# dtypes and pages of a power-of-two number of tokens; the Mamba kernels take these state dtypes.
KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn)   # fp8: with kv_scale
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A bound on absurd sizes, not a guarantee: on an H200 the decode kernel loads a whole page per step,
# and its tl.dot path (GQA groups of >= 4 query heads) runs out of shared memory from 128 tokens
# (fp32, head dim 256) up, and at 1024 for every head dim and dtype measured; smaller groups ran at 2048.
MAX_PAGE_TOKENS = 1024


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def check_cache_dtypes(spec: "HybridModelSpec") -> None:
    """TypeError naming a KV, conv or SSM dtype that no kernel reads."""
    for f, ok in (("kv_dtype", KV_DTYPES), ("conv_dtype", STATE_DTYPES), ("ssm_dtype", STATE_DTYPES)):
        dt = getattr(spec, f)
        if not isinstance(dt, torch.dtype):
            raise TypeError(f"{f} must be a torch.dtype, got {dt!r}")
        if dt not in ok:
            raise TypeError(f"{f} {dt} is not supported by the kernels; supported: "
                            f"{', '.join(str(d) for d in ok)}")


def check_page_tokens(page_tokens) -> None:
    """ValueError unless ``page_tokens`` is a page size the attention kernels serve."""
    if (not isinstance(page_tokens, int) or isinstance(page_tokens, bool) or page_tokens < 1
            or page_tokens & (page_tokens - 1) or page_tokens > MAX_PAGE_TOKENS):
        raise ValueError(f"page_tokens must be a power of two in [1, {MAX_PAGE_TOKENS}] (pages the attention kernels "
                         f"read), got {page_tokens!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HybridModelSpec:
    """Per-request cache geometry of a hybrid Mamba-Transformer model.

    Attention layers keep K and V for every token; Mamba layers keep, per request, a conv state
    of ``d_conv - 1`` past inputs for each conv channel (the part the next step needs, as vLLM
    stores it) and an ssm state.

    Mamba1: conv channels = d_inner; ssm state = [d_inner, d_state].
    Mamba2: conv channels = d_inner + 2 * n_groups * d_state (x, B and C go through the conv);
    ssm state = [mamba_num_heads, mamba_head_dim, d_state] with d_inner = heads * head_dim.

    An attention-free model (pure Mamba1 or Mamba2) has ``num_attn_layers=0``; its
    ``num_kv_heads`` and ``head_dim`` may then be 0 (the readers give 0), and its KV cache is empty:
    ``kv_bytes_per_token == kv_page_bytes == 0``. With attention layers both must be positive.
    """

    name: str = "custom"
    # attention
    num_attn_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: torch.dtype = torch.bfloat16
    # mamba
    num_mamba_layers: int
    mamba_version: int  # 1 or 2
    d_inner: int
    d_state: int
    d_conv: int = 4
    mamba_num_heads: int = 0  # Mamba2 only
    mamba_head_dim: int = 0  # Mamba2 only
    n_groups: int = 1  # Mamba2 only
    conv_dtype: torch.dtype = torch.bfloat16
    ssm_dtype: torch.dtype = torch.bfloat16
    page_tokens: int = 16

    def __post_init__(self) -> None:
        for f in ("num_attn_layers", "num_mamba_layers"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{f} must be a non-negative int, got {v!r}")
        for f in ("d_inner", "d_state", "d_conv", "n_groups"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        # An attention-free model (pure Mamba) has no K/V heads to describe: 0 is allowed there only.
        least = 1 if self.num_attn_layers else 0
        for f in ("num_kv_heads", "head_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < least:
                raise ValueError(f"{f} must be an int >= {least} with num_attn_layers={self.num_attn_layers}, "
                                 f"got {v!r}")
        if self.num_attn_layers + self.num_mamba_layers == 0:
            raise ValueError("a hybrid spec needs at least one attention or Mamba layer")
        if self.mamba_version not in (1, 2):
            raise ValueError(f"mamba_version must be 1 or 2, got {self.mamba_version!r}")
        if self.mamba_version == 2:
            if self.mamba_num_heads < 1 or self.mamba_head_dim < 1:
                raise ValueError(
                    f"Mamba2 needs mamba_num_heads and mamba_head_dim >= 1, got "
                    f"{self.mamba_num_heads!r} and {self.mamba_head_dim!r}")
            if self.mamba_num_heads * self.mamba_head_dim != self.d_inner:
                raise ValueError(
                    f"Mamba2 d_inner ({self.d_inner}) must equal mamba_num_heads * mamba_head_dim "
                    f"({self.mamba_num_heads} * {self.mamba_head_dim})")
            if self.mamba_num_heads % self.n_groups:
                raise ValueError(f"mamba_num_heads ({self.mamba_num_heads}) must be a multiple of n_groups ({self.n_groups})")
        check_page_tokens(self.page_tokens)
        check_cache_dtypes(self)

    # --- attention ---
    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all attention layers (0 without any)."""
        return self.num_attn_layers * 2 * self.num_kv_heads * self.head_dim * self.kv_dtype.itemsize

    @property
    def kv_page_bytes(self) -> int:
        """One KV page: ``page_tokens`` tokens, all attention layers, K and V."""
        return self.kv_bytes_per_token * self.page_tokens

    # --- mamba ---
    @property
    def conv_channels(self) -> int:
        if self.mamba_version == 1:
            return self.d_inner
        return self.d_inner + 2 * self.n_groups * self.d_state

    @property
    def conv_state_bytes_per_layer(self) -> int:
        return self.conv_channels * (self.d_conv - 1) * self.conv_dtype.itemsize

    @property
    def ssm_state_bytes_per_layer(self) -> int:
        return self.d_inner * self.d_state * self.ssm_dtype.itemsize

    @property
    def ssm_state_raw_bytes(self) -> int:
        """Conv + ssm state of all Mamba layers of one request, unpadded."""
        return self.num_mamba_layers * (self.conv_state_bytes_per_layer + self.ssm_state_bytes_per_layer)

    @property
    def ssm_block_bytes(self) -> int:
        """One SSM block: the raw state rounded up to 16 bytes, nothing more."""
        return _round_up(self.ssm_state_raw_bytes, 16)

    # --- construction from a transformers config ---
    @classmethod
    def from_hf_config(
        cls,
        config,
        *,
        kv_dtype: torch.dtype | None = None,
        conv_dtype: torch.dtype | None = None,
        ssm_dtype: torch.dtype | None = None,
        page_tokens: int = 16,
    ) -> "HybridModelSpec":
        """Build a spec from a transformers config object, or from a config.json dict with a
        "model_type" key (made into transformers' config class for that type, so its defaults and
        derived fields such as ``layers_block_type`` apply), dispatching on the model type.

        Supported: jamba, bamba, nemotron_h, granitemoehybrid, zamba2, falcon_h1, qwen3_next, and
        the attention-free mamba (Mamba1) and mamba2, whose specs have no attention layers.
        Each dtype left as None follows ``config.dtype`` (``torch_dtype`` on older configs) and
        falls back to bf16. NemotronH's ``mamba_ssm_cache_dtype`` is not applied: transformers'
        own cache ignores it; pass ``ssm_dtype=torch.float32`` to model a serving engine that honours it.

        Raises:
            TypeError: ``config`` is neither a dict nor an object with a ``model_type``.
            ValueError: an unsupported model type (the supported ones are listed), or a config
                that lacks a field the geometry needs (named, with the model type).
        """
        model_type = _model_type(config)
        reader = _HF_READERS.get(model_type)
        if reader is None:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(_HF_READERS))}")
        if isinstance(config, dict):
            config = _config_from_dict(config, model_type)
        geometry = reader(_Fields(config, model_type))
        default = _config_dtype(config)
        name = getattr(config, "_name_or_path", "") or f"hf:{model_type}"
        return cls(
            name=name,
            kv_dtype=default if kv_dtype is None else kv_dtype,
            conv_dtype=default if conv_dtype is None else conv_dtype,
            ssm_dtype=default if ssm_dtype is None else ssm_dtype,
            page_tokens=page_tokens,
            **geometry,
        )


# --- transformers config readers ---------------------------------------------------------------
# Each returns the geometry fields of HybridModelSpec (no dtypes, name or page size). Attribute
# names are those of the transformers 5.x config classes.

# Layer-type spellings: current transformers names, the legacy ones, and Nemotron-H's pattern chars.
_ATTN_TYPES = frozenset({"full_attention", "attention", "*"})
_MAMBA_TYPES = frozenset({"linear_attention", "mamba", "M", "m"})


def _model_type(config) -> str:
    if isinstance(config, dict):
        model_type = config.get("model_type")
        if not isinstance(model_type, str) or not model_type:
            raise ValueError(f"the config dict has no \"model_type\" (got {model_type!r}); supported: "
                             f"{', '.join(sorted(_HF_READERS))}")
        return model_type
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise TypeError(f"from_hf_config needs a transformers config object or a config.json dict with "
                        f"\"model_type\", got {type(config).__name__} without a model_type")
    return model_type


def _config_from_dict(config: dict, model_type: str):
    try:
        import transformers
    except ImportError:
        raise ImportError("reading a config.json dict needs transformers (pip install transformers), which "
                          "supplies the config class's defaults and derived fields") from None
    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return transformers.AutoConfig.for_model(model_type, **fields)
    except ValueError as e:  # a transformers release without this model's config class
        raise ValueError(f"transformers {transformers.__version__} cannot build a {model_type!r} config: {e}") from None


class _Fields:
    """A config's attributes for the readers: a missing (or None) one is a ValueError naming it and
    the model type, not an AttributeError from deep inside a reader."""

    def __init__(self, config, model_type: str):
        self._config = config
        self._model_type = model_type

    def get(self, name: str, default=None):
        value = getattr(self._config, name, None)
        return default if value is None else value

    def __getattr__(self, name: str):
        value = self.get(name)
        if value is None:
            raise ValueError(f"the {self._model_type} config has no field {name!r} (or it is None); the cache "
                             f"geometry needs it")
        return value


def _config_dtype(config) -> torch.dtype:
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt.removeprefix("torch."), None)
    if isinstance(dt, torch.dtype) and dt.is_floating_point:
        return dt
    return torch.bfloat16


def _count(kinds, wanted: frozenset) -> int:
    return sum(1 for t in kinds if t in wanted)


def _attn_head_dim(config) -> int:
    # The modeling code uses config.head_dim when present, else hidden_size // num_attention_heads.
    return config.get("head_dim") or config.hidden_size // config.num_attention_heads


def _mamba2(*, heads: int, head_dim: int, d_state: int, n_groups: int, d_conv: int,
            d_inner: int | None = None) -> dict:
    return dict(
        mamba_version=2, mamba_num_heads=heads, mamba_head_dim=head_dim,
        d_inner=heads * head_dim if d_inner is None else d_inner,
        d_state=d_state, n_groups=n_groups, d_conv=d_conv)


def _attn(config, num_layers: int) -> dict:
    return dict(num_attn_layers=num_layers, num_kv_heads=config.num_key_value_heads,
                head_dim=_attn_head_dim(config))


def _read_jamba(c) -> dict:
    kinds = c.layers_block_type  # from attn_layer_period / attn_layer_offset
    return dict(
        **_attn(c, _count(kinds, _ATTN_TYPES)),
        num_mamba_layers=_count(kinds, _MAMBA_TYPES), mamba_version=1,
        d_inner=c.mamba_expand * c.hidden_size, d_state=c.mamba_d_state, d_conv=c.mamba_d_conv)


def _read_bamba_like(c, kinds) -> dict:
    # Bamba and GraniteMoeHybrid: Mamba2 mixer of width mamba_expand * hidden_size.
    return dict(
        **_attn(c, _count(kinds, _ATTN_TYPES)), num_mamba_layers=_count(kinds, _MAMBA_TYPES),
        **_mamba2(heads=c.mamba_n_heads, head_dim=c.mamba_d_head, d_state=c.mamba_d_state,
                  n_groups=c.mamba_n_groups, d_conv=c.mamba_d_conv,
                  d_inner=int(c.mamba_expand * c.hidden_size)))


def _read_bamba(c) -> dict:
    return _read_bamba_like(c, c.layers_block_type)  # from attn_layer_indices


def _read_granite(c) -> dict:
    return _read_bamba_like(c, c.layer_types)


def _read_nemotron_h(c) -> dict:
    kinds = c.layers_block_type  # from hybrid_override_pattern; MLP/MoE layers hold no cache
    return dict(
        **_attn(c, _count(kinds, _ATTN_TYPES)), num_mamba_layers=_count(kinds, _MAMBA_TYPES),
        **_mamba2(heads=c.mamba_num_heads, head_dim=c.mamba_head_dim, d_state=c.ssm_state_size,
                  n_groups=c.n_groups, d_conv=c.conv_kernel))


def _read_zamba2(c) -> dict:
    # Every layer has a Mamba2 mixer; each "hybrid" layer also invokes one of the shared attention
    # blocks, and every invocation keeps its own KV cache.
    kinds = c.layers_block_type
    hybrid = sum(1 for t in kinds if t in ("hybrid", "g"))
    return dict(
        num_attn_layers=hybrid, num_kv_heads=c.num_key_value_heads, head_dim=c.attention_head_dim,
        num_mamba_layers=len(kinds),
        **_mamba2(heads=c.n_mamba_heads, head_dim=c.mamba_headdim, d_state=c.mamba_d_state,
                  n_groups=c.mamba_ngroups, d_conv=c.mamba_d_conv,
                  d_inner=int(c.mamba_expand * c.hidden_size)))


def _read_falcon_h1(c) -> dict:
    # Attention and Mamba2 run in parallel in every layer.
    d_inner = c.get("mamba_d_ssm") or int(c.mamba_expand * c.hidden_size)
    return dict(
        **_attn(c, c.num_hidden_layers), num_mamba_layers=c.num_hidden_layers,
        **_mamba2(heads=c.mamba_n_heads, head_dim=c.mamba_d_head, d_state=c.mamba_d_state,
                  n_groups=c.mamba_n_groups, d_conv=c.mamba_d_conv, d_inner=d_inner))


def _read_qwen3_next(c) -> dict:
    # Gated DeltaNet as Mamba2: value heads x value dim is the state's row space, key dim its
    # columns, key heads the groups, so conv channels = 2 * key_dim + value_dim as in the model.
    kinds = c.layer_types
    return dict(
        **_attn(c, _count(kinds, _ATTN_TYPES)), num_mamba_layers=_count(kinds, _MAMBA_TYPES),
        **_mamba2(heads=c.linear_num_value_heads, head_dim=c.linear_value_head_dim,
                  d_state=c.linear_key_head_dim, n_groups=c.linear_num_key_heads,
                  d_conv=c.linear_conv_kernel_dim))


# Pure Mamba models: no attention layer, so no KV heads to describe (see HybridModelSpec).
_NO_ATTN = dict(num_attn_layers=0, num_kv_heads=0, head_dim=0)


def _read_mamba(c) -> dict:
    # MambaConfig derives intermediate_size = expand * hidden_size unless config.json gives it;
    # the mixer's width is intermediate_size either way.
    return dict(**_NO_ATTN, num_mamba_layers=c.num_hidden_layers, mamba_version=1,
                d_inner=c.intermediate_size, d_state=c.state_size, d_conv=c.conv_kernel)


def _read_mamba2(c) -> dict:
    # The mixer is int(expand * hidden_size) wide and views that as num_heads x head_dim.
    # Mamba2Config refuses a config where they differ; an object that skipped its validation is
    # refused here, before the spec would blame d_inner for it.
    width = int(c.expand * c.hidden_size)
    if width != c.num_heads * c.head_dim:
        raise ValueError(f"the mamba2 config's expand * hidden_size ({c.expand} * {c.hidden_size} = {width}) "
                         f"is not num_heads * head_dim ({c.num_heads} * {c.head_dim}); the mixer needs them equal")
    return dict(**_NO_ATTN, num_mamba_layers=c.num_hidden_layers,
                **_mamba2(heads=c.num_heads, head_dim=c.head_dim, d_state=c.state_size, n_groups=c.n_groups,
                          d_conv=c.conv_kernel))


_HF_READERS = {
    "jamba": _read_jamba,
    "bamba": _read_bamba,
    "nemotron_h": _read_nemotron_h,
    "granitemoehybrid": _read_granite,
    "zamba2": _read_zamba2,
    "falcon_h1": _read_falcon_h1,
    "qwen3_next": _read_qwen3_next,
    "mamba": _read_mamba,
    "mamba2": _read_mamba2,
}


# --- presets -------------------------------------------------------------------------------------
# Numbers from each model's HuggingFace config.json (keys named per preset). All dtypes are bf16:
# the configs either say bfloat16 or give no dtype, except where noted.

_PRESET_LIST = (
    # ai21labs/AI21-Jamba-1.5-Mini: num_hidden_layers=32, attn_layer_period=8, attn_layer_offset=4
    # -> 4 attention / 28 Mamba1 layers; num_key_value_heads=8, head_dim = hidden_size 4096 /
    # num_attention_heads 32 = 128; d_inner = mamba_expand 2 * 4096; mamba_d_state=16, mamba_d_conv=4.
    HybridModelSpec(name="jamba-1.5-mini", num_attn_layers=4, num_kv_heads=8, head_dim=128,
        num_mamba_layers=28, mamba_version=1, d_inner=8192, d_state=16, d_conv=4),
    # ai21labs/AI21-Jamba-1.5-Large: num_hidden_layers=72 with attn_layer_period=8, offset=4
    # -> 9 attention / 63 Mamba1 layers; hidden_size=8192, num_attention_heads=64 -> head_dim 128,
    # num_key_value_heads=8 (all also in the Jamba-1.5 paper, arXiv 2408.12570, sec. 2);
    # mamba_expand=2 (d_inner 16384), mamba_d_state=16, mamba_d_conv=4 as in every Jamba config.
    HybridModelSpec(name="jamba-1.5-large", num_attn_layers=9, num_kv_heads=8, head_dim=128,
        num_mamba_layers=63, mamba_version=1, d_inner=16384, d_state=16, d_conv=4),
    # nvidia/Nemotron-H-8B-Base-8K: hybrid_override_pattern
    # "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-" (52 layers: 24 M, 4 *, 24 MLP);
    # num_key_value_heads=8, head_dim 128 (4096 / 32); mamba_num_heads=128, mamba_head_dim=64,
    # ssm_state_size=128, n_groups=8, conv_kernel=4. NemotronHConfig defaults
    # mamba_ssm_cache_dtype to "float32" (used by vLLM, not by transformers' cache); this preset
    # keeps bf16 like the weights: use dataclasses.replace(..., ssm_dtype=torch.float32) for fp32.
    HybridModelSpec(name="nemotron-h-8b", num_attn_layers=4, num_kv_heads=8, head_dim=128,
        num_mamba_layers=24, mamba_version=2, d_inner=8192, mamba_num_heads=128,
        mamba_head_dim=64, d_state=128, n_groups=8, d_conv=4),
    # Zyphra/Zamba2-2.7B: num_hidden_layers=54, all with a Mamba2 mixer; layers_block_type has 9
    # "hybrid" layers (hybrid_layer_ids 6,12,18,24,30,36,42,47,51) that invoke one of
    # num_mem_blocks=2 shared attention blocks, each invocation with its own KV -> 9 KV layers;
    # num_attention_heads=32, num_key_value_heads=32, attention_head_dim = 2*2560/32 = 160;
    # mamba_expand=2 (d_inner 5120), n_mamba_heads=80, mamba_headdim=64, mamba_d_state=64,
    # mamba_ngroups=1, mamba_d_conv=4. bf16 as transformers' Zamba2 docs load the models (the
    # original Zamba2-2.7B-instruct config said torch_dtype float32).
    HybridModelSpec(name="zamba2-2.7b", num_attn_layers=9, num_kv_heads=32, head_dim=160,
        num_mamba_layers=54, mamba_version=2, d_inner=5120, mamba_num_heads=80,
        mamba_head_dim=64, d_state=64, n_groups=1, d_conv=4),
    # ibm-granite/granite-4.0-h-small: num_hidden_layers=40, layer_types 36 "mamba" / 4
    # "attention"; num_key_value_heads=8, head_dim 128 (4096 / 32); mamba_expand=2 (d_inner 8192),
    # mamba_n_heads=128, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_d_conv=4.
    HybridModelSpec(name="granite-4.0-h-small", num_attn_layers=4, num_kv_heads=8, head_dim=128,
        num_mamba_layers=36, mamba_version=2, d_inner=8192, mamba_num_heads=128,
        mamba_head_dim=64, d_state=128, n_groups=1, d_conv=4),
    # tiiuae/Falcon-H1-7B-Instruct (same geometry as -Base): num_hidden_layers=44, each layer has
    # attention and Mamba2 in parallel; num_key_value_heads=2, head_dim=128 (explicit key; not
    # 3072/12); mamba_d_ssm=3072, mamba_n_heads=24, mamba_d_head=128, mamba_d_state=256,
    # mamba_n_groups=1, mamba_d_conv=4.
    HybridModelSpec(name="falcon-h1-7b", num_attn_layers=44, num_kv_heads=2, head_dim=128,
        num_mamba_layers=44, mamba_version=2, d_inner=3072, mamba_num_heads=24,
        mamba_head_dim=128, d_state=256, n_groups=1, d_conv=4),
    # Qwen/Qwen3-Next-80B-A3B-Instruct: num_hidden_layers=48, full_attention_interval=4 -> 12
    # full-attention / 36 Gated DeltaNet layers; num_key_value_heads=2, head_dim=256. The DeltaNet
    # state is modelled as Mamba2: mamba_num_heads = linear_num_value_heads 32, mamba_head_dim =
    # linear_value_head_dim 128 (d_inner 4096), d_state = linear_key_head_dim 128, n_groups =
    # linear_num_key_heads 16, d_conv = linear_conv_kernel_dim 4; so conv channels =
    # 4096 + 2*16*128 = 2*key_dim + value_dim and the state is [32, 128, 128] as in the model.
    HybridModelSpec(name="qwen3-next-80b-a3b", num_attn_layers=12, num_kv_heads=2, head_dim=256,
        num_mamba_layers=36, mamba_version=2, d_inner=4096, mamba_num_heads=32,
        mamba_head_dim=128, d_state=128, n_groups=16, d_conv=4),
    # ibm-fms/Bamba-9B: num_hidden_layers=32, attn_layer_indices [9, 18, 27] -> 3 attention / 29
    # Mamba2; num_key_value_heads=8, head_dim 128 (4096 / 32); mamba_expand=2 (d_inner 8192),
    # mamba_n_heads=128, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_d_conv=4.
    HybridModelSpec(name="bamba-9b", num_attn_layers=3, num_kv_heads=8, head_dim=128,
        num_mamba_layers=29, mamba_version=2, d_inner=8192, mamba_num_heads=128,
        mamba_head_dim=64, d_state=128, n_groups=1, d_conv=4),
)

# Read-only so a caller cannot swap a preset out from under others.
PRESETS = types.MappingProxyType({p.name: p for p in _PRESET_LIST})


class UnknownPresetError(KeyError, ValueError):
    """An unknown preset name; catchable as KeyError or ValueError."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> HybridModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(
            f"unknown preset {name!r}; valid names: {', '.join(list_presets())}") from None
