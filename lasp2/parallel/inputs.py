"""The one validator every sequence-parallel function calls first, before any collective.

It checks the local inputs, the method's rules from its spec and the layout, and with
validate=True also the values (a positive log decay) and that every rank of the group agrees
(one small all-gather), so that ranks that differ all raise instead of hanging. It returns what
the method body needs: the checked shape, the scale as a float, the chunk length, the layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.checks import (LinearAttnShape, SoftmaxAttnShape, check_chunk_size, check_linear_attn_inputs,
                          check_softmax_attn_inputs, compute_dtype)
from ..ops.chunk import effective_chunk_size
from ..ops.delta_checks import DeltaRuleShape, check_delta_rule_inputs
from ..ops.documents import Documents, documents, reset_log_decay
from .comm import checked_across_group, group_rank_size
from .layout import Layout, as_layout

LINEAR_FIELDS = ("batch", "num_heads", "key_dim", "value_dim", "decay form", "dtype", "causal", "scale")
DELTA_FIELDS = ("batch", "key_heads", "value_heads", "key_dim", "value_dim", "decay form", "dtype", "scale")
SOFTMAX_FIELDS = ("batch", "num_heads", "num_kv_heads", "head_dim", "value_dim", "dtype", "causal", "scale")
DOCUMENT_FIELDS = ("number of cu_seqlens offsets", "cu_seqlens")


@dataclass(frozen=True)
class PackedShard:
    """Packed documents seen from one rank: the row's `documents` (offsets on the host too), the
    global position of each of its tokens [C] (shard order), `resets` [1, C] (True where a
    document starts) and the document of every global position [T]. Built once per batch, rank
    and shard length (kept on the Documents), so a model's layers share it."""

    documents: Documents
    positions: torch.Tensor
    resets: torch.Tensor
    doc_ids: torch.Tensor


@dataclass(frozen=True)
class Call:
    """A checked call: shape (LinearAttnShape or SoftmaxAttnShape), the scale as a float, the
    chunk length (linear), the layout over the group, this rank's index and the group size, and
    the packed documents (None: one sequence per row)."""

    shape: LinearAttnShape | SoftmaxAttnShape | DeltaRuleShape
    scale: float
    chunk_size: int
    layout: Layout
    rank: int
    world: int
    packed: PackedShard | None = None

    @property
    def documents(self) -> Documents | None:
        """The packed row's documents, checked (None: one sequence per row)."""
        return None if self.packed is None else self.packed.documents

    def linear_decay(self, log_decay, dtype: torch.dtype):
        """(log decay, its form) as the linear-attention kernels take them: with packed documents
        the resets folded in (`ops.documents.reset_log_decay`: the form becomes per token, or
        stays per channel)."""
        if self.packed is None:
            return log_decay, self.shape.decay
        return reset_log_decay(log_decay, self.shape.decay, self.packed.resets[0], self.shape.num_heads,
                               self.shape.key_dim, compute_dtype(dtype))


def _packed_shard(fn: str, cu_seqlens, lay: Layout, rank: int, local_len: int, batch: int, device):
    """Checks the global cu_seqlens against this rank's shard (every rank holds T / W tokens)
    and places its tokens among the documents; no host read when given `Documents`."""
    if cu_seqlens is None:
        return None
    docs = documents(cu_seqlens, fn, batch=batch)
    total = local_len * lay.world
    if docs.seq_len != total:
        raise ValueError(f"{fn}: cu_seqlens ends at {docs.seq_len}, but {lay.world} ranks of {local_len} tokens hold "
                         f"{total}: with cu_seqlens every rank passes an equal shard of the packed row")

    def make():
        positions = lay.local_positions(rank, local_len // lay.slots_per_rank, device)
        return PackedShard(docs, positions, docs.starts(device)[positions][None], docs.ids(device))

    return docs.memo(("shard", lay, rank, local_len, str(device)), make)


def _documents_code(packed: PackedShard | None) -> tuple:
    """(number of offsets, a polynomial hash of them modulo a prime below 2^31, exact in float64):
    ranks that pass different cu_seqlens differ here but for a ~1e-9 chance (for validate=True)."""
    if packed is None:
        return (0, 0)
    code = 0
    for offset in packed.documents.offsets:
        code = (code * 1_000_003 + offset + 1) % 2_147_483_647
    return (len(packed.documents.offsets), code)


def _layout(fn: str, world: int, layout, local_len: int) -> Layout:
    lay = as_layout(layout, world, fn)
    lay.check_local_length(local_len, fn)
    return lay


def _checked(spec, fn: str, group, validate: bool, check, fields, describe, device):
    """check() locally; with validate=True (and more than one rank) also compare describe(...)
    across the group, in a tensor on `device` (the inputs')."""
    fields = fields + (("local length",) if spec.equal_shards else ())
    full = (lambda checked: describe(checked) + ((checked[0].seq_len,) if spec.equal_shards else ()))
    if not validate or group_rank_size(group)[1] == 1:
        return check()
    return checked_across_group(fn, group, check, fields, full, device)


def check_linear_call(spec, q, k, v, log_decay, *, scale, causal, group, chunk_size, validate, layout,
                      cu_seqlens=None) -> Call:
    """Checks a linear-attention call of `spec`'s method; raises TypeError/ValueError naming the
    value and the rule."""
    fn = spec.fn.__name__
    rank, world = group_rank_size(group)

    def check():
        shape = check_linear_attn_inputs(fn, q, k, v, log_decay, causal=causal, scale=scale, check_values=validate)
        spec.check_rules(fn, shape.decay, shape.num_heads, shape.num_heads, world)
        lay = _layout(fn, world, layout, shape.seq_len)
        effective_chunk_size(chunk_size, shape.decay, fn)  # raises on a bad chunk_size, before any collective
        if cu_seqlens is not None and not causal and world > 1:
            raise ValueError(f"{fn}: cu_seqlens needs causal=True (bidirectional packed documents are not split "
                             f"across ranks)")
        return shape, _packed_shard(fn, cu_seqlens, lay, rank, shape.seq_len, shape.batch, q.device)

    def describe(checked):
        s = checked[0]
        return (s.batch, s.num_heads, s.key_dim, s.value_dim, s.decay, s.dtype, causal, _scale(scale, 1.0),
                *_documents_code(checked[1]))

    shape, packed = _checked(spec, fn, group, validate, check, LINEAR_FIELDS + DOCUMENT_FIELDS, describe, q.device)
    return Call(shape, _scale(scale, 1.0), effective_chunk_size(chunk_size, shape.decay, fn),
                as_layout(layout, world, fn), rank, world, packed)


def check_delta_call(spec, q, k, v, beta, log_decay, *, scale, group, chunk_size, validate, layout,
                     cu_seqlens=None) -> Call:
    """Checks a delta-rule call of `spec`'s method (grouped value heads, gates none, per head or
    per key channel); raises TypeError/ValueError naming the value and the rule."""
    fn = spec.fn.__name__
    rank, world = group_rank_size(group)

    def check():
        shape = check_delta_rule_inputs(fn, q, k, v, beta, log_decay, scale=scale, check_values=validate)
        spec.check_rules(fn, shape.decay, shape.value_heads, shape.key_heads, world)
        lay = _layout(fn, world, layout, shape.seq_len)
        check_chunk_size(chunk_size, fn)  # before any collective
        return shape, _packed_shard(fn, cu_seqlens, lay, rank, shape.seq_len, shape.batch, q.device)

    def describe(checked):
        s = checked[0]
        return (s.batch, s.key_heads, s.value_heads, s.key_dim, s.value_dim, s.decay, s.dtype, _scale(scale, 1.0),
                *_documents_code(checked[1]))

    shape, packed = _checked(spec, fn, group, validate, check, DELTA_FIELDS + DOCUMENT_FIELDS, describe, q.device)
    return Call(shape, _scale(scale, 1.0), chunk_size, as_layout(layout, world, fn), rank, world, packed)


def check_softmax_call(spec, q, k, v, *, scale, causal, group, validate, layout, cu_seqlens=None) -> Call:
    """Checks a softmax-attention call of `spec`'s method (GQA: fewer key/value heads)."""
    fn = spec.fn.__name__
    rank, world = group_rank_size(group)

    def check():
        shape = check_softmax_attn_inputs(fn, q, k, v, causal=causal, scale=scale)
        spec.check_rules(fn, "none", shape.num_heads, shape.num_kv_heads, world)
        lay = _layout(fn, world, layout, shape.seq_len)
        return shape, _packed_shard(fn, cu_seqlens, lay, rank, shape.seq_len, shape.batch, q.device)

    def describe(checked):
        s = checked[0]
        return (s.batch, s.num_heads, s.num_kv_heads, s.head_dim, s.value_dim, s.dtype, causal,
                _scale(scale, s.head_dim**-0.5), *_documents_code(checked[1]))

    shape, packed = _checked(spec, fn, group, validate, check, SOFTMAX_FIELDS + DOCUMENT_FIELDS, describe, q.device)
    return Call(shape, _scale(scale, shape.head_dim**-0.5), 0, as_layout(layout, world, fn), rank, world, packed)


def wire_dtype(q: torch.Tensor, log_decay=None) -> torch.dtype:
    """The dtype K/V blocks travel in: the inputs', promoted with the log decay's."""
    return q.dtype if log_decay is None else torch.promote_types(q.dtype, log_decay.dtype)


def _scale(scale, default: float) -> float:
    return default if scale is None else float(scale)
