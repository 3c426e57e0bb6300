"""Process-group helpers shared by the sequence-parallel methods.

Conventions: `group=None` means *no* sequence parallelism (one device, no communication), not
the default world group; pass `dist.group.WORLD` explicitly for that. A rank's place in the
sequence is `dist.get_rank(group)`; peers are addressed by `dist.get_global_rank(group, r)`.
gloo cannot read GPU memory (it aborts the process), so GPU tensors on a gloo group travel
through host memory; NCCL groups take them directly. Every tensor handed over is contiguous.
"""
from __future__ import annotations

import zlib
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ..ops.checks import DECAY_KINDS

# torch 2.13 renamed all_gather_into_tensor and reduce_scatter_tensor (now deprecated).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_KNOWN_STRINGS = DECAY_KINDS + ("contiguous", "zigzag")


def group_rank_size(group) -> tuple[int, int]:
    """(this rank's index in the group, group size); (0, 1) for group=None."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _Staged:
    """A tensor as the backend can take it (contiguous; on the host for GPU tensors on gloo),
    and the copy back into the caller's tensor once a receiving call completes."""

    def __init__(self, tensor: torch.Tensor, group):
        self.tensor = tensor
        on_host = tensor.device.type != "cpu" and dist.get_backend(group) == "gloo"
        self.wire = tensor.detach().to("cpu").contiguous() if on_host else tensor.contiguous()

    def copy_back(self) -> torch.Tensor:
        if self.wire is not self.tensor:
            self.tensor.copy_(self.wire)
        return self.tensor


class Work:
    """The handle of a started call: wait() completes it and copies staged results back."""

    def __init__(self, works, staged_outputs=()):
        self._works = [w for w in works if w is not None]
        self._outputs = staged_outputs

    def is_completed(self) -> bool:
        """True once the communication has finished (wait() then returns at once)."""
        return all(work.is_completed() for work in self._works)

    def wait(self):
        for work in self._works:
            work.wait()
        for out in self._outputs:
            out.copy_back()
        return True


def _run(fn, out: torch.Tensor, inp: torch.Tensor, group, async_op: bool, **kwargs) -> Work:
    staged_out, staged_in = _Staged(out, group), _Staged(inp, group)
    work = Work([fn(staged_out.wire, staged_in.wire, group=group, async_op=True, **kwargs)], [staged_out])
    if not async_op:
        work.wait()
    return work


def all_gather_async(flat: torch.Tensor, group):
    """Starts an all-gather of a 1-D tensor; returns (output [W * n] in rank order, Work)."""
    out = flat.new_empty(dist.get_world_size(group) * flat.numel())
    return out, _run(_all_gather, out, flat, group, async_op=True)


def all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """[n, ...] from every rank -> [W * n, ...] in rank order."""
    out = x.new_empty(dist.get_world_size(group) * x.shape[0], *x.shape[1:])
    _run(_all_gather, out, x, group, async_op=False)
    return out


def reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """[W * n, ...] on every rank -> this rank's [n, ...] block, summed over ranks."""
    out = x.new_empty(x.shape[0] // dist.get_world_size(group), *x.shape[1:])
    _run(_reduce_scatter, out, x, group, async_op=False)
    return out


def all_to_all_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """[W * n, ...]: block j goes to rank j; returns [W * n, ...] with block j from rank j."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _run(dist.all_to_all_single, out, x, group, async_op=False)
    return out


def isend(tensor: torch.Tensor, group, group_rank: int, tag: int = 0) -> Work:
    """Starts sending to the rank with index `group_rank` in `group`."""
    staged = _Staged(tensor, group)
    work = dist.isend(staged.wire, dst=dist.get_global_rank(group, group_rank), group=group, tag=tag)
    return Work([work])


def irecv(like: torch.Tensor, group, group_rank: int, tag: int = 0):
    """Starts receiving a tensor shaped like `like` from index `group_rank`; -> (out, Work)."""
    staged = _Staged(torch.empty_like(like, memory_format=torch.contiguous_format), group)
    work = dist.irecv(staged.wire, src=dist.get_global_rank(group, group_rank), group=group, tag=tag)
    return staged.tensor, Work([work], [staged])


def broadcast(tensor: torch.Tensor, group, group_rank: int) -> torch.Tensor:
    """`tensor` of the rank with index `group_rank` in `group`, on every rank (copied into each
    rank's `tensor`, which is returned)."""
    staged = _Staged(tensor, group)
    dist.broadcast(staged.wire, src=dist.get_global_rank(group, group_rank), group=group)
    return staged.copy_back()


def exchange_batch(sends, receives, group):
    """Starts point-to-point transfers as one batch_isend_irecv (NCCL groups them, so their
    order between a pair of ranks does not matter): sends [(tensor, group_rank, tag)], receives
    [(like, group_rank, tag)]; returns (the received tensors, Work)."""
    staged_sends = [(_Staged(t, group), peer, tag) for t, peer, tag in sends]
    staged_recvs = [(_Staged(torch.empty_like(like, memory_format=torch.contiguous_format), group), peer, tag)
                    for like, peer, tag in receives]
    ops = [dist.P2POp(dist.isend, st.wire, dist.get_global_rank(group, peer), group, tag) for st, peer, tag in staged_sends]
    ops += [dist.P2POp(dist.irecv, st.wire, dist.get_global_rank(group, peer), group, tag) for st, peer, tag in staged_recvs]
    works = dist.batch_isend_irecv(ops) if ops else []
    return [st.tensor for st, _, _ in staged_recvs], Work(works, [st for st, _, _ in staged_recvs])


def ring_exchange(x: torch.Tensor, group, tag: int = 0):
    """Starts sending x to the next rank of the ring and receiving the previous rank's;
    returns (received, Work). One batch_isend_irecv; streams in flight together use different tags."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    nxt, prev = dist.get_global_rank(group, (rank + 1) % world), dist.get_global_rank(group, (rank - 1) % world)
    send = _Staged(x, group)
    recv = _Staged(torch.empty_like(x, memory_format=torch.contiguous_format), group)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, send.wire, nxt, group, tag),
                                    dist.P2POp(dist.irecv, recv.wire, prev, group, tag)])
    return recv.tensor, Work(works, [recv])


def checked_across_group(fn: str, group, check: Callable[[], object], fields: Sequence[str], describe: Callable,
                         device: torch.device):
    """Runs the local input check, then compares the inputs' description across the group with
    one small all-gather, so that every rank raises the same error instead of some hanging. The
    description travels as a float64 tensor on `device`, the inputs' (NCCL takes only GPU
    tensors; gloo stages GPU tensors through the host).

    `check()` returns the checked shape or raises TypeError/ValueError; `describe(shape)` returns
    one value per name in `fields` (int, float, bool, str or torch.dtype), all of which must
    agree between ranks. A rank whose own check failed re-raises its error; the others raise a
    ValueError naming it.
    """
    try:
        shape, error = check(), None
    except (TypeError, ValueError) as exc:
        shape, error = None, exc
    row = [0.0] * (1 + len(fields))
    if shape is not None:
        row = [1.0] + [_encode(value) for value in describe(shape)]
    rows = all_gather_dim0(torch.tensor(row, dtype=torch.float64, device=device), group).view(-1, len(row)).tolist()
    if error is not None:
        raise error
    bad = [r for r, values in enumerate(rows) if values[0] == 0.0]
    if bad:
        raise ValueError(f"{fn}: rank(s) {bad} of the group rejected their inputs (see the error raised there)")
    mine = describe(shape)
    for i, name in enumerate(fields):
        codes = [values[i + 1] for values in rows]
        if len(set(codes)) > 1:
            shown = ", ".join(f"rank {r}: {_decode(code, mine[i])}" for r, code in enumerate(codes))
            raise ValueError(f"{fn}: {name} differs between ranks of the group ({shown}); every rank must pass the same {name}")
    return shape


def _encode(value) -> float:
    if isinstance(value, torch.dtype):
        return float(_DTYPE_CODES[value])
    if isinstance(value, str):
        return float(zlib.crc32(value.encode()))
    return float(value)


def _decode(code: float, example):
    """Readable form of another rank's code, using this rank's value to know its type."""
    if isinstance(example, torch.dtype):
        return next((str(d) for d, c in _DTYPE_CODES.items() if c == code), code)
    if isinstance(example, str):
        return next((kind for kind in _KNOWN_STRINGS if zlib.crc32(kind.encode()) == code), f"<code {int(code)}>")
    if isinstance(example, bool):
        return bool(code)
    return int(code) if float(code).is_integer() else code
