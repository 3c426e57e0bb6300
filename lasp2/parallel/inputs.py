"""Input checks for the sequence-parallel linear-attention methods (before any collective)."""
from __future__ import annotations

from ..ops.checks import LinearAttnShape, check_linear_attn_inputs
from ..ops.chunk import chunk_linear_attn, effective_chunk_size
from .comm import checked_across_group, group_rank_size

# What every rank of a group must agree on (validate=True compares these).
LINEAR_ATTN_FIELDS = ("batch", "num_heads", "key_dim", "value_dim", "decay form", "dtype", "causal", "scale")


def _describe(shape: LinearAttnShape, causal: bool, scale) -> tuple:
    scale = 1.0 if scale is None else float(scale)
    return (shape.batch, shape.num_heads, shape.key_dim, shape.value_dim, shape.decay, shape.dtype, causal, scale)


def check_parallel_inputs(fn, q, k, v, log_decay, *, scale, causal, group, chunk_size, validate):
    """-> (shape, chunk_size). Local checks always run before any collective; with validate=True
    one small all-gather then makes every rank agree on LINEAR_ATTN_FIELDS, so that a mismatch
    raises the same ValueError on every rank instead of hanging a collective."""

    def check():
        shape = check_linear_attn_inputs(fn, q, k, v, log_decay, causal=causal, scale=scale)
        return shape, effective_chunk_size(chunk_size, shape.decay, fn)

    if not validate or group_rank_size(group)[1] == 1:
        return check()
    return checked_across_group(
        fn, group, check, LINEAR_ATTN_FIELDS, lambda checked: _describe(checked[0], causal, scale)
    )


def run_linear_method(fn, causal_impl, bidirectional_impl, q, k, v, log_decay, *, scale, causal, group, chunk_size,
                      validate):
    """The shared body of every sequence-parallel linear-attention function: check (before any
    collective), fall back to the single-device op for group=None or a group of one, then call
    causal_impl.apply(q, k, v, log_decay, decay_kind, scale, chunk_size, group) or
    bidirectional_impl.apply(q, k, v, scale, group)."""
    shape, chunk_size = check_parallel_inputs(
        fn, q, k, v, log_decay, scale=scale, causal=causal, group=group, chunk_size=chunk_size, validate=validate
    )
    if group_rank_size(group)[1] == 1:
        return chunk_linear_attn(q, k, v, log_decay, scale=scale, causal=causal, chunk_size=chunk_size)[0]
    scale = 1.0 if scale is None else float(scale)
    if not causal:
        return bidirectional_impl.apply(q, k, v, scale, group)
    return causal_impl.apply(q, k, v, log_decay, shape.decay, scale, chunk_size, group)
