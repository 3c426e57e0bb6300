"""Single-device linear attention and the delta rule: references, chunked kernels and feature maps.

Nothing here touches torch.distributed. Tensors are [B, T, H, D] (batch, tokens, heads, dim).
"""
from .checks import DECAY_CHANNEL, DECAY_HEAD, DECAY_KINDS, DECAY_NONE, DECAY_TOKEN
from .chunk import chunk_linear_attn
from .delta_chunk import chunk_delta_rule
from .delta_naive import naive_recurrent_delta_rule
from .documents import Documents, documents
from .feature_maps import (
    FEATURE_MAPS,
    elu_plus_one_feature_map,
    identity_feature_map,
    rebased_feature_map,
    relu_feature_map,
    silu_feature_map,
    taylor_feature_map,
)
from .naive import naive_recurrent_linear_attn
from .policy import Policy, policy, policy_for

__all__ = [
    "DECAY_CHANNEL",
    "DECAY_HEAD",
    "DECAY_KINDS",
    "DECAY_NONE",
    "DECAY_TOKEN",
    "Documents",
    "FEATURE_MAPS",
    "Policy",
    "chunk_delta_rule",
    "chunk_linear_attn",
    "documents",
    "elu_plus_one_feature_map",
    "identity_feature_map",
    "naive_recurrent_delta_rule",
    "naive_recurrent_linear_attn",
    "policy",
    "policy_for",
    "rebased_feature_map",
    "relu_feature_map",
    "silu_feature_map",
    "taylor_feature_map",
]
