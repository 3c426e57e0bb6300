"""Packed rows for the benchmarks: documents of random lengths (a fixed seed) filling a row."""
from __future__ import annotations

import torch


def packed_offsets(T: int, documents: int, device=None) -> torch.Tensor:
    """cu_seqlens [documents + 1] (int64) of `documents` documents of random lengths filling T
    tokens; the same on every rank and every run."""
    if not 1 <= documents <= T:
        raise ValueError(f"packed_offsets: {documents} documents do not fit {T} tokens (1 <= documents <= T)")
    cuts = torch.randperm(T - 1, generator=torch.Generator().manual_seed(0))[:documents - 1] + 1
    return torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([T])]).to(device)
