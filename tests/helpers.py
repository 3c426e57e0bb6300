"""Inputs and comparisons shared by the tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F

DECAY_FORMS = ("none", "head", "token", "channel")


def make_inputs(kind: str, B=2, T=37, H=3, K=6, V=5, dtype=torch.float64, seed=0, strong=False) -> dict:
    """q, k, v and a log decay of the given form (None, [H], [B, T, H], [B, T, H, K]), all <= 0.

    strong=True mixes log decays of -20 with ordinary ones, to test for inf/nan and underflow.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    shape = {"none": None, "head": (H,), "token": (B, T, H), "channel": (B, T, H, K)}[kind]
    g = None
    if shape is not None:
        g = F.logsigmoid(randn(*shape) + 2.0)  # mostly mild decay, a few strong
        if strong:
            g = torch.where(torch.rand(*shape, generator=gen, dtype=torch.float64) < 0.5, torch.full_like(g, -20.0), g)
    out = {"q": randn(B, T, H, K), "k": randn(B, T, H, K), "v": randn(B, T, H, V), "g": g}
    return {name: None if t is None else t.to(dtype) for name, t in out.items()}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (the norm-ratio tolerance)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone().requires_grad_(True)
