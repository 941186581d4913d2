"""HybridModelSpec: derived sizes, validation, presets and construction from transformers configs."""
import dataclasses
import re
import types

import pytest
import torch

from avmp_triton.spec import HybridModelSpec, PRESETS, get_preset, list_presets

MiB = 1 << 20


def _same_geometry(spec: HybridModelSpec, preset_name: str) -> None:
    """Every field but the name matches the preset, so every derived size does too."""
    preset = get_preset(preset_name)
    assert dataclasses.replace(spec, name=preset.name) == preset
    assert spec.kv_page_bytes == preset.kv_page_bytes
    assert spec.ssm_block_bytes == preset.ssm_block_bytes


# --- derived sizes, by hand ----------------------------------------------------------------------

def test_mamba1_sizes_by_hand():
    s = HybridModelSpec(num_attn_layers=2, num_kv_heads=2, head_dim=4, num_mamba_layers=1,
                        mamba_version=1, d_inner=5, d_state=3, d_conv=4)
    assert s.kv_bytes_per_token == 2 * 2 * 2 * 4 * 2  # layers * (K, V) * heads * dim * bf16
    assert s.kv_page_bytes == 64 * 16
    assert s.conv_channels == 5
    assert s.conv_state_bytes_per_layer == 5 * 3 * 2  # d_conv - 1 stored columns
    assert s.ssm_state_bytes_per_layer == 5 * 3 * 2
    assert s.ssm_state_raw_bytes == 60
    assert s.ssm_block_bytes == 64  # rounded up to 16


def test_mamba2_sizes_by_hand():
    s = HybridModelSpec(num_attn_layers=1, num_kv_heads=1, head_dim=8, kv_dtype=torch.float16,
                        num_mamba_layers=2, mamba_version=2, d_inner=8, mamba_num_heads=4,
                        mamba_head_dim=2, n_groups=2, d_state=3, d_conv=3,
                        conv_dtype=torch.float32, ssm_dtype=torch.float32, page_tokens=4)
    assert s.kv_bytes_per_token == 1 * 2 * 1 * 8 * 2
    assert s.kv_page_bytes == 32 * 4
    assert s.conv_channels == 8 + 2 * 2 * 3  # x, B and C
    assert s.conv_state_bytes_per_layer == 20 * 2 * 4
    assert s.ssm_state_bytes_per_layer == 4 * 2 * 3 * 4  # [heads, head_dim, d_state] fp32
    assert s.ssm_state_raw_bytes == 2 * (160 + 96)
    assert s.ssm_block_bytes == 512


# --- validation ----------------------------------------------------------------------------------

_OK = dict(num_attn_layers=1, num_kv_heads=1, head_dim=8, num_mamba_layers=1, mamba_version=1,
           d_inner=8, d_state=4)


@pytest.mark.parametrize("field, bad", [
    ("num_attn_layers", -1), ("num_mamba_layers", -3), ("num_kv_heads", 0), ("head_dim", -8),
    ("d_inner", 0), ("d_state", 0), ("d_conv", 0), ("n_groups", 0), ("page_tokens", 0),
    ("head_dim", 2.5), ("mamba_version", 3),
])
def test_bad_values_are_named_in_the_error(field, bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        HybridModelSpec(**{**_OK, field: bad})


def test_attention_free_spec_has_an_empty_kv_cache():
    s = HybridModelSpec(num_attn_layers=0, num_kv_heads=0, head_dim=0, num_mamba_layers=3, mamba_version=1,
                        d_inner=5, d_state=3, d_conv=4)
    assert s.kv_bytes_per_token == s.kv_page_bytes == 0
    assert s.ssm_state_raw_bytes == 3 * 60 and s.ssm_block_bytes == 192
    # head fields left as they were (an ablation of a hybrid spec) count for nothing either
    assert HybridModelSpec(**{**_OK, "num_attn_layers": 0}).kv_page_bytes == 0


@pytest.mark.parametrize("layers, field, bad", [
    (1, "num_kv_heads", 0), (1, "head_dim", 0), (0, "num_kv_heads", -1), (0, "head_dim", -2), (0, "head_dim", 1.5),
])
def test_attention_fields_may_be_zero_only_without_attention(layers, field, bad):
    with pytest.raises(ValueError, match=rf"{field} must be an int >= {1 if layers else 0} with "
                                         rf"num_attn_layers={layers}, got {re.escape(repr(bad))}"):
        HybridModelSpec(**{**_OK, "num_attn_layers": layers, field: bad})


def test_no_layers_at_all_is_rejected():
    with pytest.raises(ValueError, match="at least one"):
        HybridModelSpec(**{**_OK, "num_attn_layers": 0, "num_mamba_layers": 0})


def test_mamba2_head_checks():
    m2 = {**_OK, "mamba_version": 2, "d_inner": 8}
    with pytest.raises(ValueError, match="mamba_num_heads"):
        HybridModelSpec(**m2)  # no heads given
    with pytest.raises(ValueError, match=r"\(8\).*3 \* 2"):
        HybridModelSpec(**m2, mamba_num_heads=3, mamba_head_dim=2)
    with pytest.raises(ValueError, match=r"\(4\).*\(3\)"):
        HybridModelSpec(**m2, mamba_num_heads=4, mamba_head_dim=2, n_groups=3)


def test_dtype_must_be_a_torch_dtype():
    with pytest.raises(TypeError, match="'bf16'"):
        HybridModelSpec(**_OK, kv_dtype="bf16")


@pytest.mark.parametrize("page_tokens", [3, 12, 48, 544, 2048, 1 << 20, True])
def test_page_tokens_the_attention_kernels_cannot_read_are_rejected(page_tokens):
    with pytest.raises(ValueError, match=rf"page_tokens must be a power of two in \[1, 1024\].*got {page_tokens!r}$"):
        HybridModelSpec(**_OK, page_tokens=page_tokens)


@pytest.mark.parametrize("page_tokens", [1, 2, 16, 64, 1024])
def test_power_of_two_page_tokens_are_accepted(page_tokens):
    assert HybridModelSpec(**_OK, page_tokens=page_tokens).kv_page_bytes == page_tokens * 2 * 8 * 2


@pytest.mark.parametrize("field, dtype", [
    ("kv_dtype", torch.float64), ("kv_dtype", torch.int8), ("kv_dtype", torch.float8_e5m2),
    ("conv_dtype", torch.float64), ("conv_dtype", torch.int32), ("conv_dtype", torch.float8_e4m3fn),
    ("ssm_dtype", torch.float64), ("ssm_dtype", torch.uint8), ("ssm_dtype", torch.float8_e4m3fn),
])
def test_dtypes_no_kernel_reads_are_rejected(field, dtype):
    with pytest.raises(TypeError, match=rf"{field} {dtype} is not supported") as info:
        HybridModelSpec(**_OK, **{field: dtype})
    assert "torch.bfloat16" in str(info.value)  # and the supported ones are listed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_kernel_dtype_is_accepted(dtype):
    s = HybridModelSpec(**_OK, kv_dtype=dtype, conv_dtype=dtype, ssm_dtype=dtype)
    assert s.kv_bytes_per_token == 2 * 8 * dtype.itemsize


def test_fp8_kv_pages_are_accepted_beside_wider_states():
    s = HybridModelSpec(**_OK, kv_dtype=torch.float8_e4m3fn)
    assert s.kv_bytes_per_token == 2 * 8


# --- presets -------------------------------------------------------------------------------------

REQUIRED = ["jamba-1.5-mini", "jamba-1.5-large", "nemotron-h-8b", "zamba2-2.7b",
            "granite-4.0-h-small", "falcon-h1-7b", "qwen3-next-80b-a3b"]


def test_required_presets_exist():
    assert set(REQUIRED) <= set(list_presets())
    assert list_presets() == sorted(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_consistent(name):
    p = get_preset(name)
    assert p.name == name
    assert p.kv_page_bytes > 0 and p.ssm_block_bytes > 0
    assert p.ssm_block_bytes % 16 == 0
    # Rebuilding from the fields re-runs validation.
    assert HybridModelSpec(**{f.name: getattr(p, f.name) for f in dataclasses.fields(p)}) == p


def test_jamba_mini_known_sizes():
    p = get_preset("jamba-1.5-mini")
    assert 8.2 * MiB <= p.ssm_block_bytes <= 8.4 * MiB
    assert p.ssm_block_bytes == 28 * (8192 * 3 * 2 + 8192 * 16 * 2)
    assert p.kv_page_bytes == 4 * 2 * 8 * 128 * 2 * 16


def test_nemotron_h_8b_known_size():
    p = get_preset("nemotron-h-8b")
    assert 49 * MiB <= p.ssm_block_bytes <= 51 * MiB
    assert p.ssm_block_bytes == 24 * ((8192 + 2 * 8 * 128) * 3 * 2 + 8192 * 128 * 2)


def test_qwen3_next_models_gated_deltanet_state():
    p = get_preset("qwen3-next-80b-a3b")
    key_dim, value_dim = 16 * 128, 32 * 128
    assert p.conv_channels == 2 * key_dim + value_dim
    assert p.ssm_state_bytes_per_layer == 32 * 128 * 128 * 2  # [v_heads, k_dim, v_dim] bf16


def test_presets_are_read_only():
    with pytest.raises(TypeError):
        PRESETS["x"] = get_preset("jamba-1.5-mini")
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_preset("jamba-1.5-mini").d_state = 1


def test_unknown_preset_lists_valid_names():
    with pytest.raises(KeyError) as info:
        get_preset("jamba-2")
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "'jamba-2'" in msg
    for name in list_presets():
        assert name in msg


# --- from_hf_config, one transformers config class at a time -------------------------------------

transformers = pytest.importorskip("transformers")


def test_jamba_mini_config():
    cfg = transformers.JambaConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        attn_layer_period=8, attn_layer_offset=4, mamba_d_state=16, mamba_d_conv=4,
        mamba_expand=2, dtype="bfloat16")
    _same_geometry(HybridModelSpec.from_hf_config(cfg), "jamba-1.5-mini")


def test_jamba_large_config():
    cfg = transformers.JambaConfig(
        hidden_size=8192, num_hidden_layers=72, num_attention_heads=64, num_key_value_heads=8,
        attn_layer_period=8, attn_layer_offset=4, mamba_d_state=16, mamba_d_conv=4,
        mamba_expand=2, dtype="bfloat16")
    _same_geometry(HybridModelSpec.from_hf_config(cfg), "jamba-1.5-large")


def test_bamba_config():
    cfg = transformers.BambaConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        attn_layer_indices=[9, 18, 27], mamba_n_heads=128, mamba_d_head=64, mamba_d_state=128,
        mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2)
    _same_geometry(HybridModelSpec.from_hf_config(cfg), "bamba-9b")


def test_nemotron_h_config():
    cfg = transformers.NemotronHConfig(
        hybrid_override_pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        mamba_num_heads=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4,
        dtype="bfloat16")
    spec = HybridModelSpec.from_hf_config(cfg)
    _same_geometry(spec, "nemotron-h-8b")
    # The MLP-only layers of the pattern hold no cache.
    assert spec.num_attn_layers + spec.num_mamba_layers == 28 < cfg.num_hidden_layers


def test_granite_moe_hybrid_config():
    layer_types = ["attention" if i % 10 == 5 else "mamba" for i in range(40)]
    cfg = transformers.GraniteMoeHybridConfig(
        hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
        layer_types=layer_types, mamba_n_heads=128, mamba_d_head=64, mamba_d_state=128,
        mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, dtype="bfloat16")
    _same_geometry(HybridModelSpec.from_hf_config(cfg), "granite-4.0-h-small")


def test_zamba2_config():
    hybrid_ids = [6, 12, 18, 24, 30, 36, 42, 47, 51]
    cfg = transformers.Zamba2Config(
        hidden_size=2560, num_hidden_layers=54, num_attention_heads=32, num_key_value_heads=32,
        layers_block_type=["hybrid" if i in hybrid_ids else "mamba" for i in range(54)],
        num_mem_blocks=2, n_mamba_heads=80, mamba_d_state=64, mamba_ngroups=1, mamba_d_conv=4,
        mamba_expand=2, dtype="bfloat16")
    spec = HybridModelSpec.from_hf_config(cfg)
    _same_geometry(spec, "zamba2-2.7b")
    # One KV cache per shared-block invocation, not per shared block.
    assert spec.num_attn_layers == len(cfg.hybrid_layer_ids) == 9
    assert cfg.num_mem_blocks == 2


def test_falcon_h1_config():
    cfg = transformers.FalconH1Config(
        hidden_size=3072, num_hidden_layers=44, num_attention_heads=12, num_key_value_heads=2,
        head_dim=128, mamba_d_ssm=3072, mamba_n_heads=24, mamba_d_head=128, mamba_d_state=256,
        mamba_n_groups=1, mamba_d_conv=4, dtype="bfloat16")
    spec = HybridModelSpec.from_hf_config(cfg)
    _same_geometry(spec, "falcon-h1-7b")
    assert spec.num_attn_layers == spec.num_mamba_layers == 44


@pytest.mark.skipif(not hasattr(transformers, "Qwen3NextConfig"), reason="no Qwen3Next")
def test_qwen3_next_config():
    cfg = transformers.Qwen3NextConfig(
        hidden_size=2048, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2,
        head_dim=256, full_attention_interval=4, linear_conv_kernel_dim=4, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
        dtype="bfloat16")
    _same_geometry(HybridModelSpec.from_hf_config(cfg), "qwen3-next-80b-a3b")


def test_dtypes_follow_config_then_arguments():
    cfg = transformers.JambaConfig(num_hidden_layers=8, dtype="float16")
    spec = HybridModelSpec.from_hf_config(cfg, ssm_dtype=torch.float32, page_tokens=32)
    assert (spec.kv_dtype, spec.conv_dtype, spec.ssm_dtype) == (torch.float16, torch.float16, torch.float32)
    assert spec.page_tokens == 32
    assert spec.num_attn_layers == 1 and spec.num_mamba_layers == 7


def test_dtype_defaults_to_bf16():
    cfg = transformers.JambaConfig(num_hidden_layers=8)
    assert cfg.dtype is None
    spec = HybridModelSpec.from_hf_config(cfg)
    assert spec.kv_dtype == spec.conv_dtype == spec.ssm_dtype == torch.bfloat16


def test_unsupported_model_type():
    with pytest.raises(ValueError, match="'llama'") as info:
        HybridModelSpec.from_hf_config(transformers.LlamaConfig())
    for supported in ("jamba", "bamba", "nemotron_h", "granitemoehybrid", "zamba2", "falcon_h1", "mamba", "mamba2"):
        assert supported in str(info.value)


# --- from_hf_config: config.json dicts, incomplete configs, wrong types ---------------------------

JAMBA_MINI_JSON = {  # the keys of ai21labs/AI21-Jamba-1.5-Mini's config.json that matter, as json.load gives them
    "architectures": ["JambaForCausalLM"], "model_type": "jamba", "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "attn_layer_period": 8, "attn_layer_offset": 4,
    "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2, "torch_dtype": "bfloat16",
}


def test_config_json_dict_is_accepted():
    spec = HybridModelSpec.from_hf_config(dict(JAMBA_MINI_JSON))
    _same_geometry(spec, "jamba-1.5-mini")
    assert spec.kv_dtype == torch.bfloat16


def test_config_json_dict_gets_the_derived_layer_kinds():
    # config.json holds hybrid_override_pattern; layers_block_type is derived from it by transformers
    cfg = {"model_type": "nemotron_h", "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
           "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
           "mamba_num_heads": 128, "mamba_head_dim": 64, "ssm_state_size": 128, "n_groups": 8, "conv_kernel": 4,
           "torch_dtype": "bfloat16"}
    _same_geometry(HybridModelSpec.from_hf_config(cfg), "nemotron-h-8b")


def test_config_dict_without_model_type():
    cfg = {k: v for k, v in JAMBA_MINI_JSON.items() if k != "model_type"}
    with pytest.raises(ValueError, match='the config dict has no "model_type"') as info:
        HybridModelSpec.from_hf_config(cfg)
    assert "jamba" in str(info.value) and "unsupported model_type" not in str(info.value)


def test_unsupported_model_type_in_a_dict_is_named_with_the_supported_ones():
    with pytest.raises(ValueError, match="unsupported model_type 'mixtral'") as info:
        HybridModelSpec.from_hf_config({**JAMBA_MINI_JSON, "model_type": "mixtral"})
    for supported in ("jamba", "bamba", "nemotron_h", "granitemoehybrid", "zamba2", "falcon_h1", "qwen3_next"):
        assert supported in str(info.value)


@pytest.mark.parametrize("config, field, model_type", [
    (types.SimpleNamespace(model_type="jamba"), "layers_block_type", "jamba"),
    (types.SimpleNamespace(model_type="jamba", layers_block_type=["attention", "mamba"], num_key_value_heads=8,
                           hidden_size=64, num_attention_heads=4), "mamba_expand", "jamba"),
    (types.SimpleNamespace(model_type="nemotron_h", layers_block_type=["M", "*"], num_key_value_heads=8,
                           head_dim=128, mamba_num_heads=None), "mamba_num_heads", "nemotron_h"),
    (types.SimpleNamespace(model_type="falcon_h1", num_hidden_layers=2, num_key_value_heads=2, head_dim=64,
                           mamba_d_ssm=None), "mamba_expand", "falcon_h1"),
    (types.SimpleNamespace(model_type="mamba", num_hidden_layers=2, state_size=16, conv_kernel=4),
     "intermediate_size", "mamba"),
    (types.SimpleNamespace(model_type="mamba2", num_hidden_layers=2, expand=2, hidden_size=64, num_heads=2,
                           head_dim=64, state_size=16, conv_kernel=4), "n_groups", "mamba2"),
])
def test_missing_field_is_named_with_the_model_type(config, field, model_type):
    with pytest.raises(ValueError, match=f"the {model_type} config has no field '{field}'"):
        HybridModelSpec.from_hf_config(config)


@pytest.mark.parametrize("config", [object(), "config.json", types.SimpleNamespace(hidden_size=64),
                                    types.SimpleNamespace(model_type=None)])
def test_a_config_without_model_type_is_a_type_error(config):
    with pytest.raises(TypeError, match="transformers config object or a config.json dict") as info:
        HybridModelSpec.from_hf_config(config)
    assert type(config).__name__ in str(info.value)
    assert "unsupported model_type" not in str(info.value)


# --- from_hf_config: attention-free Mamba1 / Mamba2 ----------------------------------------------

def test_mamba_default_config():
    spec = HybridModelSpec.from_hf_config(transformers.MambaConfig())
    assert spec == HybridModelSpec(
        name="hf:mamba", num_attn_layers=0, num_kv_heads=0, head_dim=0, num_mamba_layers=32, mamba_version=1,
        d_inner=1536, d_state=16, d_conv=4)  # intermediate_size = expand 2 * hidden_size 768
    assert spec.kv_page_bytes == 0
    assert spec.ssm_block_bytes == 32 * (1536 * 3 * 2 + 1536 * 16 * 2)


def test_mamba2_default_config():
    spec = HybridModelSpec.from_hf_config(transformers.Mamba2Config())
    assert spec == HybridModelSpec(
        name="hf:mamba2", num_attn_layers=0, num_kv_heads=0, head_dim=0, num_mamba_layers=64, mamba_version=2,
        d_inner=8192, mamba_num_heads=128, mamba_head_dim=64, d_state=128, n_groups=8, d_conv=4)
    assert spec.kv_page_bytes == 0
    assert spec.conv_channels == 8192 + 2 * 8 * 128  # x, B and C, as Mamba2Mixer.conv_dim
    assert spec.ssm_block_bytes == 64 * (10240 * 3 * 2 + 128 * 64 * 128 * 2)


def test_mamba_config_json_dict():
    # a config.json that spells out intermediate_size: the mixer uses it as given
    cfg = {"model_type": "mamba", "hidden_size": 2560, "num_hidden_layers": 64, "state_size": 16, "expand": 2,
           "conv_kernel": 4, "intermediate_size": 5120, "torch_dtype": "float32"}
    spec = HybridModelSpec.from_hf_config(cfg)
    assert (spec.num_attn_layers, spec.num_mamba_layers, spec.mamba_version) == (0, 64, 1)
    assert (spec.d_inner, spec.d_state, spec.d_conv) == (5120, 16, 4)
    assert spec.conv_dtype == spec.ssm_dtype == torch.float32
    assert HybridModelSpec.from_hf_config({**cfg, "intermediate_size": 6000}).d_inner == 6000


def test_mamba2_config_json_dict_and_dtype():
    cfg = {"model_type": "mamba2", "hidden_size": 2560, "num_hidden_layers": 64, "num_heads": 80, "head_dim": 64,
           "expand": 2, "state_size": 128, "n_groups": 1, "conv_kernel": 4, "torch_dtype": "bfloat16"}
    spec = HybridModelSpec.from_hf_config(cfg, ssm_dtype=torch.float32)
    assert (spec.num_attn_layers, spec.num_mamba_layers, spec.mamba_version) == (0, 64, 2)
    assert (spec.d_inner, spec.mamba_num_heads, spec.mamba_head_dim) == (5120, 80, 64)
    assert (spec.d_state, spec.n_groups, spec.d_conv) == (128, 1, 4)
    assert (spec.conv_dtype, spec.ssm_dtype) == (torch.bfloat16, torch.float32)


def test_mamba2_width_must_match_the_heads():
    # Mamba2Config refuses this itself; an object built without its validation is refused by the reader
    cfg = types.SimpleNamespace(model_type="mamba2", num_hidden_layers=2, expand=2, hidden_size=100, num_heads=4,
                                head_dim=64, state_size=16, n_groups=1, conv_kernel=4)
    with pytest.raises(ValueError, match=r"expand \* hidden_size \(2 \* 100 = 200\) is not num_heads \* "
                                         r"head_dim \(4 \* 64\)"):
        HybridModelSpec.from_hf_config(cfg)
