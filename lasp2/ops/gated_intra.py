"""Intra-chunk scores for per-channel (GLA) decay, by binary splitting; exact under strong decay.

    A_ij = sum_k q_ik k_jk exp(G_ik - G_jk)   for j <= i inside a chunk of c = 2^L tokens.

Per-channel gates do not factor into one stable matmul, so the chunk is split recursively: at
block size b, each pair of sibling blocks (L then R) contributes

    A[R, L] = (q_R * exp(sum of g from R's start to i)) @ (k_L * exp(sum of g after j to L's end))^T

Both factors are exp of sums of non-positive terms, each <= 1, and their product is exactly
exp(G_i - G_j), so nothing overflows however strong the decay. Every pair (i > j) is covered at
exactly one level (where i and j part); the diagonal is q_i . k_i. Work per level: one batched
matmul and a few element-wise passes over half the tokens; log2(c) levels.
Shapes: q, k, g [..., c, K]; scores [..., c, c].
"""
from __future__ import annotations

import torch

from .scan import exclusive_cumsum, reverse_cumsum


def _halves(x: torch.Tensor, b: int):
    """[..., c, D] -> (left, right) views [..., P, b, D] of the sibling blocks of size b."""
    pairs = x.view(*x.shape[:-2], -1, 2, b, x.shape[-1])
    return pairs[..., 0, :, :], pairs[..., 1, :, :]


def _pair_blocks(scores: torch.Tensor, b: int) -> torch.Tensor:
    """[..., c, c] -> view [..., P, b, b]: rows of each pair's right block, columns of its left."""
    c = scores.shape[-1]
    n_pairs = c // (2 * b)
    grid = scores.view(*scores.shape[:-2], n_pairs, 2, b, n_pairs, 2, b)
    same_pair = torch.diagonal(grid, dim1=-6, dim2=-3)  # [..., 2, b, 2, b, P]
    return same_pair[..., 1, :, 0, :, :].movedim(-1, -3)


def _level_factors(g: torch.Tensor):
    """Yields (b, right_in, left_out) for b = 1, 2, 4, ..., c/2, where for each pair of sibling
    blocks of size b, right_in [..., P, b, K] = exp(sum of g from the right block's start to i)
    and left_out [..., P, b, K] = exp(sum of g after j to the left block's end).

    Built bottom-up by multiplication (one exp in all): a token's prefix factor within a block of
    2b is its prefix factor within its block of b, times exp(total of the left sibling) if it
    sits in the right half; suffixes likewise. All factors are <= 1. The yielded tensors are
    views that the next step updates, so use them before advancing.
    """
    c = g.shape[-2]
    prefix = torch.exp(g)  # within blocks of 1: exp(g_i)
    suffix = torch.ones_like(g)  # within blocks of 1: nothing after j
    b = 1
    while b < c:
        left_prefix, right_prefix = _halves(prefix, b)
        left_suffix, _ = _halves(suffix, b)
        yield b, right_prefix, left_suffix
        left_suffix.mul_(right_prefix[..., -1:, :])  # + the whole right block
        right_prefix.mul_(left_prefix[..., -1:, :])  # + the whole left block
        b *= 2


def channel_scores(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A [..., c, c] (zero above the diagonal) for per-token, per-channel log decays g."""
    scores = g.new_zeros(*q.shape[:-1], q.shape[-2])  # in g's (the compute) dtype, whatever q's
    scores.diagonal(dim1=-2, dim2=-1).copy_((q.to(g.dtype) * k).sum(dim=-1))
    for b, right_in, left_out in _level_factors(g):
        q_right, k_left = _halves(q, b)[1] * right_in, _halves(k, b)[0] * left_out
        _pair_blocks(scores, b).copy_(q_right @ k_left.transpose(-1, -2))
    return scores


def channel_score_grads(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, d_scores: torch.Tensor):
    """Given dL/dA [..., c, c] (entries above the diagonal ignored), -> (A, dq, dk, dg): the
    scores again (the caller needs them for dv) and the gradients [..., c, K].

    dg_t collects, per level, sum_{i >= t in t's right block} of q'_i dq'_i and
    sum_{j < t in t's left block} of k'_j dk'_j (q', k' the scaled blocks): sums, no differences.
    """
    scores = g.new_zeros(*q.shape[:-1], q.shape[-2])
    scores.diagonal(dim1=-2, dim2=-1).copy_((q.to(g.dtype) * k).sum(dim=-1))
    d_diag = d_scores.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    dq, dk, dg = d_diag * k, d_diag * q, torch.zeros_like(g)
    for b, right_in, left_out in _level_factors(g):
        q_right, k_left = _halves(q, b)[1] * right_in, _halves(k, b)[0] * left_out
        _pair_blocks(scores, b).copy_(q_right @ k_left.transpose(-1, -2))
        d_block = _pair_blocks(d_scores, b)
        dq_right = d_block @ k_left  # dL/dq'_R
        dk_left = d_block.transpose(-1, -2) @ q_right  # dL/dk'_L
        _halves(dq, b)[1].addcmul_(dq_right, right_in)
        _halves(dk, b)[0].addcmul_(dk_left, left_out)
        dg_left, dg_right = _halves(dg, b)
        dg_right += reverse_cumsum(q_right * dq_right, dim=-2)
        dg_left += exclusive_cumsum(k_left * dk_left, dim=-2)
    return scores, dq, dk, dg
