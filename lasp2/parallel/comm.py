"""Process-group helpers shared by the sequence-parallel methods.

Conventions: `group=None` means *no* sequence parallelism (one device, no communication), not
the default world group; pass `dist.group.WORLD` explicitly for that. A rank's place in the
sequence is `dist.get_rank(group)`; peers are addressed by `dist.get_global_rank(group, r)`.
Every call goes through the `torch.distributed` module attribute so it can be counted.
"""
from __future__ import annotations

import zlib
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from ..ops.checks import DECAY_KINDS

# torch 2.13 renamed all_gather_into_tensor and reduce_scatter_tensor (now deprecated).
ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_KNOWN_STRINGS = DECAY_KINDS + ("contiguous", "zigzag")


def group_rank_size(group) -> tuple[int, int]:
    """(this rank's index in the group, group size); (0, 1) for group=None."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _via_host(tensor: torch.Tensor, group) -> bool:
    """gloo cannot read GPU memory for these calls (it aborts the process), so GPU tensors on a
    gloo group travel through host memory; NCCL groups take them directly."""
    return tensor.device.type != "cpu" and dist.get_backend(group) == "gloo"


class _CopyBackOnWait:
    """The work handle of a host-staged collective: wait() also copies the result back."""

    def __init__(self, work, host_out: torch.Tensor, out: torch.Tensor):
        self._work, self._host_out, self._out = work, host_out, out

    def wait(self):
        self._work.wait()
        self._out.copy_(self._host_out)
        return True


class _Done:
    """The handle of a collective that already finished."""

    def wait(self):
        return True


def _start(fn_name: str, out: torch.Tensor, inp: torch.Tensor, group, async_op: bool, **kwargs):
    """Runs torch.distributed.<fn_name>(out, inp), through host memory for GPU tensors on gloo;
    returns a handle whose wait() also puts the result into `out`."""
    fn = getattr(dist, fn_name)
    if _via_host(inp, group):
        host_out = torch.empty(out.shape, dtype=out.dtype)
        work = fn(host_out, inp.cpu(), group=group, async_op=True, **kwargs)
        handle = _CopyBackOnWait(work, host_out, out)
    else:
        handle = fn(out, inp.contiguous(), group=group, async_op=True, **kwargs)
    if async_op:
        return handle
    handle.wait()
    return _Done()


def all_gather_dim0(x: torch.Tensor, group, async_op: bool = False):
    """[n, ...] from every rank -> ([W * n, ...] in rank order, handle)."""
    out = x.new_empty(dist.get_world_size(group) * x.shape[0], *x.shape[1:])
    return out, _start(ALL_GATHER, out, x, group, async_op)


def all_gather_async(flat: torch.Tensor, group):
    """Starts an all-gather of a 1-D tensor; returns (output [W * n], handle). Call wait()."""
    return all_gather_dim0(flat, group, async_op=True)


def reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """[W * n, ...] on every rank -> this rank's [n, ...] block, summed over ranks."""
    out = x.new_empty(x.shape[0] // dist.get_world_size(group), *x.shape[1:])
    _start(REDUCE_SCATTER, out, x, group, async_op=False)
    return out


def all_to_all_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """[W * n, ...]: block j goes to rank j; returns [W * n, ...] with block j from rank j."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _start("all_to_all_single", out, x, group, async_op=False)
    return out


def ring_exchange(x: torch.Tensor, group, tag: int = 0):
    """Starts sending x to the next rank of the ring and receiving the previous rank's;
    returns (received, handle). One batch_isend_irecv with one isend and one irecv; streams
    that are in flight together use different tags."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    nxt, prev = dist.get_global_rank(group, (rank + 1) % world), dist.get_global_rank(group, (rank - 1) % world)
    host = _via_host(x, group)
    send = x.cpu() if host else x.contiguous()
    recv = torch.empty_like(send)
    # P2POp insists on the library's own isend/irecv (not a wrapped attribute); the call that
    # communicates, and is counted, is batch_isend_irecv.
    ops = [dist.P2POp(c10d.isend, send, nxt, group, tag), dist.P2POp(c10d.irecv, recv, prev, group, tag)]
    works = dist.batch_isend_irecv(ops)
    out = torch.empty_like(x) if host else recv
    return out, _RingHandle(works, recv if host else None, out)


class _RingHandle:
    def __init__(self, works, host_recv, out):
        self._works, self._host_recv, self._out = works, host_recv, out

    def wait(self):
        for work in self._works:
            work.wait()
        if self._host_recv is not None:
            self._out.copy_(self._host_recv)
        return True


def send_to(tensor: torch.Tensor, group, group_rank: int) -> None:
    """Blocking send to the rank with index `group_rank` in `group`."""
    tensor = tensor.cpu() if _via_host(tensor, group) else tensor.contiguous()
    dist.send(tensor, dst=dist.get_global_rank(group, group_rank), group=group)


def recv_from(like: torch.Tensor, group, group_rank: int) -> torch.Tensor:
    """Blocking receive of a tensor shaped like `like` from index `group_rank` in `group`."""
    host = _via_host(like, group)
    out = torch.empty(like.shape, dtype=like.dtype, device="cpu" if host else like.device)
    dist.recv(out, src=dist.get_global_rank(group, group_rank), group=group)
    return out.to(like.device) if host else out


def checked_across_group(fn: str, group, check: Callable[[], object], fields: Sequence[str], describe: Callable):
    """Runs the local input check, then compares the inputs' description across the group with
    one small all-gather, so that every rank raises the same error instead of some hanging.

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
    gathered, work = all_gather_async(torch.tensor(row, dtype=torch.float64), group)
    work.wait()
    rows = gathered.view(-1, len(row)).tolist()
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
