"""Feature maps phi applied to queries and keys before linear attention: o = phi(q) (sum phi(k)^T v).

Each is a plain function of a [..., D] tensor, differentiable by autograd.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def identity_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = x (basic linear attention)."""
    return x


def elu_plus_one_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1, positive everywhere (Katharopoulos et al.)."""
    return F.elu(x) + 1.0


def relu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = max(x, 0)."""
    return F.relu(x)


def silu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = x * sigmoid(x)."""
    return F.silu(x)


def taylor_feature_map(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Based's second-order Taylor map: [..., D] -> [..., 1 + D + D^2] with

        phi(q) . phi(k) = 1 + s (q . k) + (s (q . k))^2 / 2   ~ exp(s q . k),

    via phi(x) = [1, sqrt(s) x, s vec(x x^T) / sqrt(2)]; s defaults to 1 / sqrt(D).
    """
    d = x.shape[-1]
    s = 1.0 / math.sqrt(d) if scale is None else float(scale)
    ones = x.new_ones(*x.shape[:-1], 1)
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return torch.cat([ones, math.sqrt(s) * x, (s / math.sqrt(2.0)) * outer], dim=-1)


def rebased_feature_map(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Rebased's map: normalise over D (zero mean, unit variance), apply the learnable affine
    weight, bias [D], then square: phi(x) = (weight * norm(x) + bias) ** 2."""
    normed = F.layer_norm(x, x.shape[-1:], eps=eps)
    return (normed * weight + bias) ** 2


FEATURE_MAPS = {
    "identity": identity_feature_map,
    "elu_plus_one": elu_plus_one_feature_map,
    "relu": relu_feature_map,
    "silu": silu_feature_map,
    "taylor": taylor_feature_map,
}
