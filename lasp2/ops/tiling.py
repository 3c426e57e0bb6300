"""Query tiling for the quadratic attention pieces: bound their memory by one tile of scores
(the device policy's `tile_scores`).

Each tile is computed under activation checkpointing, so autograd keeps only the tile's inputs
and recomputes its scores in the backward; outputs are concatenated along the token axis.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .policy import policy_for


def over_query_tiles(fn, query_args, key_args, n_keys: int, batch_heads: int):
    """fn(*query_args, *key_args) -> tensor or tuple of tensors indexed [B, C, ...]; query_args
    are indexed by query along dim 1 ([B, C, ...]) or dim 0 when 1-D (positions), or None."""
    n_queries = query_args[0].shape[1]
    tile = max(1, policy_for(query_args[0].device).tile_scores // max(1, n_keys * batch_heads))
    if tile >= n_queries:
        return fn(*query_args, *key_args)
    pieces = []
    for start in range(0, n_queries, tile):
        stop = min(n_queries, start + tile)
        sliced = [None if a is None else (a[start:stop] if a.dim() == 1 else a[:, start:stop]) for a in query_args]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(fn, *sliced, *key_args, use_reentrant=False))
        else:
            pieces.append(fn(*sliced, *key_args))
    if isinstance(pieces[0], tuple):
        return tuple(torch.cat(parts, dim=1) for parts in zip(*pieces))
    return torch.cat(pieces, dim=1)
