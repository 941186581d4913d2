"""Launchers of the kernels that read the arena through the handle table (attention, Mamba)."""
from avmp_triton.ops._host_checks import KIND_KV, KIND_SSM, check_handles  # noqa: F401
from avmp_triton.ops.mamba_prefill import (  # noqa: F401
    causal_conv1d_prefill,
    mamba1_prefill_launch_config,
    mamba1_scan_prefill,
    mamba2_scan_prefill,
)
from avmp_triton.ops.paged_attention import (  # noqa: F401
    DecodeConfig,
    decode_config,
    decode_workspace,
    decode_workspace_numel,
    kv_append,
    kv_append_arena,
    paged_decode_attention,
    paged_decode_attention_arena,
)
from avmp_triton.ops.paged_prefill import (  # noqa: F401
    paged_prefill_attention,
    paged_prefill_attention_arena,
    prefill_launch_config,
)
from avmp_triton.ops.mamba_state import (  # noqa: F401
    MambaStateOps,
    causal_conv1d_update,
    conv1d_launch_config,
    mamba1_launch_config,
    mamba1_state_update,
    mamba2_launch_config,
    mamba2_state_update,
)
