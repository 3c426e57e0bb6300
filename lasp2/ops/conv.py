"""The short causal depthwise convolution that opens Gated DeltaNet, KDA and Mamba2 layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .documents import documents

ACTIVATIONS = (None, "silu")


def check_conv_inputs(fn: str, x, weight, bias, activation) -> int:
    """x [B, T, D], weight [D, w], bias [D] or None; returns w."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{fn}: x must be [B, T, D], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"{fn}: weight must be [D, w] with D = {x.shape[2]} (x's channels), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (x.shape[2],):
        raise ValueError(f"{fn}: bias must be [D] = ({x.shape[2]},), got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return weight.shape[1]


def causal_conv1d(x, weight, bias=None, *, activation="silu", halo=None, cu_seqlens=None, doc_positions=None):
    """out_t = act(bias + sum_j weight[:, j] * x_{t - (w-1) + j}) per channel, x_{<0} = halo.

    Args:
        x: [B, T, D]; weight: [D, w] (the last tap multiplies the current token); bias: [D] or None.
        activation: "silu" or None.
        halo: [B, w-1, D], the w-1 inputs before x (None: zeros, the start of a sequence).
        cu_seqlens: None, or [N + 1] int64 offsets of documents packed in one row (B = 1): a
            token reads no input of an earlier document (as if each document began with zeros).
        doc_positions: instead of cu_seqlens, each token's position within its document [T]
            (for a shard of a packed row: the halo's inputs count as earlier positions).
    Returns:
        [B, T, D] in x's dtype.
    """
    fn = "causal_conv1d"
    w = check_conv_inputs(fn, x, weight, bias, activation)
    b, t, d = x.shape
    if halo is None:
        halo = x.new_zeros(b, w - 1, d)
    elif tuple(halo.shape) != (b, w - 1, d):
        raise ValueError(f"causal_conv1d: halo must be [B, w-1, D] = {(b, w - 1, d)}, got {tuple(halo.shape)}")
    if cu_seqlens is not None:
        doc_positions = documents(cu_seqlens, fn, t, b).positions(x.device)
    padded = torch.cat([halo.to(x.dtype), x], dim=1)  # [B, w-1+T, D]
    if doc_positions is None:
        out = F.conv1d(padded.transpose(1, 2), weight.to(x.dtype).unsqueeze(1),
                       None if bias is None else bias.to(x.dtype), groups=d).transpose(1, 2)
    else:  # tap j reaches w-1-j tokens back: only within the token's own document
        out = x.new_zeros(b, t, d) if bias is None else bias.to(x.dtype).expand(b, t, d)
        for j in range(w):
            back = w - 1 - j
            inside = (doc_positions >= back).to(x.dtype).view(1, t, 1)
            out = out + weight[:, j].to(x.dtype) * padded[:, j:j + t] * inside
    return F.silu(out) if activation == "silu" else out
