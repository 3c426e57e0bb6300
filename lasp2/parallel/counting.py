"""Count the collectives a piece of code issues, by wrapping the `torch.distributed` functions.

    with count_collectives() as log:
        out = lasp2_linear_attn(q, k, v, group=g)
    log.count("all_gather_single"), log.bytes_sent()

Only calls made through the `torch.distributed` module attributes are seen (every method in
this package calls them that way). Not thread safe; meant for tests and benchmarks.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# function name -> (position, keyword) of the tensor this rank sends; None: nothing sent.
_SENT_TENSOR = {
    "all_gather_into_tensor": (1, "input_tensor"),
    "all_gather_single": (1, "input_tensor"),
    "reduce_scatter_single": (1, "input"),
    "all_gather": (1, "tensor"),
    "all_reduce": (0, "tensor"),
    "reduce_scatter_tensor": (1, "input"),
    "all_to_all_single": (1, "input"),
    "broadcast": (0, "tensor"),
    "send": (0, "tensor"),
    "isend": (0, "tensor"),
    "recv": None,
    "irecv": None,
    "barrier": None,
    "batch_isend_irecv": None,  # counted per op below
}
P2P_NAMES = ("send", "isend", "recv", "irecv", "batch_isend_irecv")


@dataclass
class CollectiveCall:
    name: str
    bytes_sent: int  # size of the tensor this rank contributes (or sends point to point)
    group_size: int
    async_op: bool = False


@dataclass
class CollectiveLog:
    calls: list[CollectiveCall] = field(default_factory=list)

    def count(self, *names: str) -> int:
        """Calls of the given functions (all calls if none given)."""
        return sum(1 for c in self.calls if not names or c.name in names)

    def bytes_sent(self, *names: str) -> int:
        return sum(c.bytes_sent for c in self.calls if not names or c.name in names)

    def names(self) -> list[str]:
        return [c.name for c in self.calls]


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _group_size(kwargs) -> int:
    group = kwargs.get("group")
    return dist.get_world_size(group) if group is not None else dist.get_world_size()


@contextlib.contextmanager
def count_collectives():
    """Within the block, record every torch.distributed communication call into the log."""
    log = CollectiveLog()
    originals = {name: getattr(dist, name) for name in _SENT_TENSOR if hasattr(dist, name)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            where = _SENT_TENSOR[name]
            if name == "batch_isend_irecv":
                for op in args[0]:
                    sent = _nbytes(op.tensor) if op.op is c10d.isend else 0
                    log.calls.append(CollectiveCall("isend" if sent else "irecv", sent, dist.get_world_size(op.group)))
            else:
                tensor = None
                if where is not None:
                    pos, key = where
                    tensor = args[pos] if len(args) > pos else kwargs.get(key)
                log.calls.append(CollectiveCall(name, _nbytes(tensor), _group_size(kwargs), bool(kwargs.get("async_op"))))
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield log
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
