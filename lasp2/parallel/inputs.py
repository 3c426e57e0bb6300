"""Input checks and dispatch shared by every sequence-parallel method (before any collective)."""
from __future__ import annotations

from ..ops.checks import DECAY_KINDS, check_linear_attn_inputs, check_softmax_attn_inputs
from ..ops.chunk import chunk_linear_attn, effective_chunk_size
from ..ops.precision import without_autocast
from ..ops.softmax_attn import softmax_attn
from .comm import checked_across_group, group_rank_size
from .layout import Layout

LINEAR_FIELDS = ("batch", "num_heads", "key_dim", "value_dim", "decay form", "dtype", "causal", "scale")
SOFTMAX_FIELDS = ("batch", "num_heads", "num_kv_heads", "head_dim", "value_dim", "dtype", "causal", "scale")


def _validated(fn, group, validate, check, fields, describe):
    """check() locally; with validate=True also compare describe(...) across the group."""
    if not validate or group_rank_size(group)[1] == 1:
        return check()
    return checked_across_group(fn, group, check, fields, describe)


def _layout(fn: str, group, layout: str, local_len: int) -> Layout:
    lay = Layout(layout, group_rank_size(group)[1]) if isinstance(layout, str) else None
    if lay is None:
        raise TypeError(f"{fn}: layout must be a string, got {type(layout).__name__}")
    lay.check_local_length(local_len, fn)
    return lay


@without_autocast
def run_linear_method(fn, impl, q, k, v, log_decay, *, scale, causal, group, chunk_size, validate, layout,
                      decays=DECAY_KINDS, equal_lengths=False, heads_check=None):
    """The shared body of every sequence-parallel linear-attention function: check (before any
    collective; `decays` lists the log-decay forms the method supports, `heads_check(shape, W)`
    may add a rule on heads), fall back to the single-device op for group=None or a group of
    one, else call impl(q, k, v, log_decay, kind=, scale=, causal=, chunk_size=, group=,
    layout=Layout)."""
    fields = LINEAR_FIELDS + (("local length",) if equal_lengths else ())

    def check():
        shape = check_linear_attn_inputs(fn, q, k, v, log_decay, causal=causal, scale=scale)
        if shape.decay not in decays:
            allowed = ", ".join(d for d in DECAY_KINDS if d in decays)
            raise ValueError(
                f"{fn}: log decay of the {shape.decay!r} form is not supported by this method (supported: "
                f"{allowed}); per-channel gates cannot be written as the masked (Q K^T) V it computes"
            )
        lay = _layout(fn, group, layout, shape.seq_len)
        if heads_check is not None:
            heads_check(shape, lay.world)
        return shape, effective_chunk_size(chunk_size, shape.decay, fn), lay

    def describe(checked):
        s = checked[0]
        described = (s.batch, s.num_heads, s.key_dim, s.value_dim, s.decay, s.dtype, causal, _scale(scale, 1.0))
        return described + ((s.seq_len,) if equal_lengths else ())

    shape, chunk_size, lay = _validated(fn, group, validate, check, fields, describe)
    if lay.world == 1:
        return chunk_linear_attn(q, k, v, log_decay, scale=scale, causal=causal, chunk_size=chunk_size)[0]
    return impl(q, k, v, log_decay, kind=shape.decay, scale=_scale(scale, 1.0), causal=causal,
                chunk_size=chunk_size, group=group, layout=lay)


@without_autocast
def run_softmax_method(fn, impl, q, k, v, *, scale, causal, group, validate, layout, heads_check=None):
    """The shared body of every sequence-parallel softmax-attention function; `heads_check(shape,
    world)` may add a method's own rule (e.g. heads divisible by W). Calls impl(q, k, v,
    scale=, causal=, group=, layout=Layout, shape=)."""

    def check():
        shape = check_softmax_attn_inputs(fn, q, k, v, causal=causal, scale=scale)
        lay = _layout(fn, group, layout, shape.seq_len)
        if heads_check is not None:
            heads_check(shape, lay.world)
        return shape, lay

    def describe(checked):
        s = checked[0]
        return (s.batch, s.num_heads, s.num_kv_heads, s.head_dim, s.value_dim, s.dtype, causal,
                _scale(scale, s.head_dim**-0.5), s.seq_len)

    shape, lay = _validated(fn, group, validate, check, SOFTMAX_FIELDS + ("local length",), describe)
    if lay.world == 1:
        return softmax_attn(q, k, v, causal=causal, scale=scale)
    return impl(q, k, v, scale=_scale(scale, shape.head_dim**-0.5), causal=causal, group=group, layout=lay, shape=shape)


def _scale(scale, default: float) -> float:
    return default if scale is None else float(scale)
