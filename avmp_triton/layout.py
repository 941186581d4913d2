"""Byte layout inside a unit: the one place that says where each element of a KV page or an SSM
block lives. Kernels receive these offsets and strides as arguments; nothing else assumes them.

KV page (``page_tokens`` tokens, all attention layers), elements of ``kv_dtype``::

    page[layer][kv (0 = K, 1 = V)][kv_head][token][head_dim]

so one (layer, K or V, head) slice is a contiguous ``[page_tokens, head_dim]`` tile: a decode
kernel reads a whole page of one head with one 2-D load.

SSM block (one request, all Mamba layers): the ssm states of every layer, then the conv states of
every layer (the larger element type first, so both stay aligned without padding)::

    ssm_state[layer][d_inner][d_state]          ssm_dtype  (Mamba2: d_inner = heads x head_dim)
    conv_state[layer][d_conv - 1][conv_channels] conv_dtype (oldest input first; token-major so
                                                             a block of channels loads coalesced)

Every offset is in bytes from the start of the unit; element strides are in elements.
"""
from __future__ import annotations

import dataclasses

from avmp_triton.spec import HybridModelSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVPageLayout:
    page_tokens: int
    num_kv_heads: int
    head_dim: int
    elem_bytes: int
    # element strides inside a page
    stride_layer: int
    stride_kv: int
    stride_head: int
    stride_token: int

    def elem_offset(self, layer: int, kv: int, head: int, token: int, dim: int = 0) -> int:
        return (layer * self.stride_layer + kv * self.stride_kv + head * self.stride_head
                + token * self.stride_token + dim)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SSMBlockLayout:
    d_inner: int
    d_state: int
    conv_channels: int
    conv_width: int              # stored past inputs per channel: d_conv - 1
    ssm_layer_bytes: int
    conv_layer_bytes: int
    ssm_base: int                # byte offset of layer 0's ssm state
    conv_base: int               # byte offset of layer 0's conv state

    def ssm_offset(self, layer: int) -> int:
        """Byte offset of ``layer``'s ssm state ``[d_inner, d_state]`` inside the block."""
        return self.ssm_base + layer * self.ssm_layer_bytes

    def conv_offset(self, layer: int) -> int:
        """Byte offset of ``layer``'s conv state ``[d_conv - 1, conv_channels]`` inside the block."""
        return self.conv_base + layer * self.conv_layer_bytes


def kv_page_layout(spec: HybridModelSpec, page_tokens: int | None = None) -> KVPageLayout:
    t = spec.page_tokens if page_tokens is None else page_tokens
    d = spec.head_dim
    st_token = d
    st_head = t * d
    st_kv = spec.num_kv_heads * st_head
    return KVPageLayout(page_tokens=t, num_kv_heads=spec.num_kv_heads, head_dim=d,
                        elem_bytes=spec.kv_dtype.itemsize, stride_layer=2 * st_kv, stride_kv=st_kv,
                        stride_head=st_head, stride_token=st_token)


def ssm_block_layout(spec: HybridModelSpec) -> SSMBlockLayout:
    ssm_layer = spec.ssm_state_bytes_per_layer
    conv_layer = spec.conv_state_bytes_per_layer
    n = spec.num_mamba_layers
    if spec.ssm_dtype.itemsize >= spec.conv_dtype.itemsize:
        ssm_base, conv_base = 0, n * ssm_layer
    else:
        conv_base, ssm_base = 0, n * conv_layer
    return SSMBlockLayout(d_inner=spec.d_inner, d_state=spec.d_state, conv_channels=spec.conv_channels,
                          conv_width=spec.d_conv - 1, ssm_layer_bytes=ssm_layer, conv_layer_bytes=conv_layer,
                          ssm_base=ssm_base, conv_base=conv_base)
