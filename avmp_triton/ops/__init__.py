"""The ops that read and write a ``PagedCache``: ``op(inputs..., cache, *, layer=, out=, config=)``,
each a ``torch.ops.avmp.*`` custom op; one launch-config dataclass per family."""
from avmp_triton.memory.cache import PagedCache
from avmp_triton.ops._args import check_attn_head_dim
from avmp_triton.ops._host_checks import KIND_KV, KIND_SSM, check_handles
from avmp_triton.ops.mamba_prefill import (
    MambaPrefillConfig,
    causal_conv1d_prefill,
    conv1d_prefill_launch_config,
    mamba1_prefill_launch_config,
    mamba1_scan_prefill,
    mamba2_prefill_launch_config,
    mamba2_scan_prefill,
)
from avmp_triton.ops.mamba_state import (
    MambaStateConfig,
    causal_conv1d_update,
    conv1d_launch_config,
    mamba1_launch_config,
    mamba1_state_update,
    mamba2_launch_config,
    mamba2_state_update,
)
from avmp_triton.ops.paged_attention import (
    DecodeConfig,
    decode_config,
    decode_workspace,
    decode_workspace_numel,
    kv_append,
    paged_decode_attention,
)
from avmp_triton.ops.paged_prefill import PrefillConfig, paged_prefill_attention, prefill_launch_config, resolve_pages

__all__ = [
    "DecodeConfig", "KIND_KV", "KIND_SSM", "MambaPrefillConfig", "MambaStateConfig", "PagedCache", "PrefillConfig",
    "causal_conv1d_prefill", "causal_conv1d_update", "check_attn_head_dim", "check_handles", "conv1d_launch_config",
    "conv1d_prefill_launch_config", "decode_config", "decode_workspace", "decode_workspace_numel", "kv_append",
    "mamba1_launch_config", "mamba1_prefill_launch_config", "mamba1_scan_prefill", "mamba1_state_update",
    "mamba2_launch_config", "mamba2_prefill_launch_config", "mamba2_scan_prefill", "mamba2_state_update",
    "paged_decode_attention", "paged_prefill_attention", "prefill_launch_config", "resolve_pages",
]
