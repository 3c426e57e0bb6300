"""Count the collectives a piece of code issues, and the bytes each hands over, as the
dispatcher sees them.

    with count_collectives() as log:
        out = lasp2_linear_attn(q, k, v, group=g)
        out.sum().backward()
    log.count("all_gather"), log.bytes_sent()

Every torch.distributed call reaches the dispatcher as a c10d op (`_allgather_base_`, `send`,
`recv_`, `alltoall_base_`, batched point-to-point too), whichever Python function issued it, so
nothing is patched and the library calls torch as it likes. The ops of an autograd backward run
inside the block are seen too. Meant for tests and benchmarks: every op of the block passes
through Python while counting.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# c10d op -> (kind, index of the argument this rank hands over; None: it sends nothing)
_OPS = {
    "_allgather_base_": ("all_gather", 1),
    "allgather_": ("all_gather", 1),
    "allgather_into_tensor_coalesced_": ("all_gather", 1),
    "_reduce_scatter_base_": ("reduce_scatter", 1),
    "reduce_scatter_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "alltoall_base_": ("all_to_all", 1),
    "alltoall_": ("all_to_all", 1),
    "allreduce_": ("all_reduce", 0),
    "allreduce_coalesced_": ("all_reduce", 0),
    "broadcast_": ("broadcast", 0),
    "send": ("send", 0),
    "recv_": ("recv", None),
    "recv_any_source_": ("recv", None),
    "barrier": ("barrier", None),
}


@dataclass
class CollectiveCall:
    kind: str  # all_gather | reduce_scatter | all_to_all | all_reduce | broadcast | send | recv | barrier
    bytes_sent: int  # what this rank hands to the call (a send: the message; a receive: 0)
    group: str | None = None  # the process group's name (ProcessGroup.group_name)


@dataclass
class CollectiveLog:
    calls: list[CollectiveCall] = field(default_factory=list)

    def on(self, group) -> "CollectiveLog":
        """The calls issued on one process group (e.g. a sequence-parallel group, apart from the
        data-parallel collectives of FSDP)."""
        return CollectiveLog([c for c in self.calls if c.group == group.group_name])

    def count(self, *kinds: str) -> int:
        """Calls of the given kinds (all calls if none given)."""
        return sum(1 for c in self.calls if not kinds or c.kind in kinds)

    def bytes_sent(self, *kinds: str) -> int:
        return sum(c.bytes_sent for c in self.calls if not kinds or c.kind in kinds)

    def kinds(self) -> list[str]:
        return [c.kind for c in self.calls]

    def rows(self, *kinds: str) -> list[tuple[str, int]]:
        """[(kind, bytes)] in the order issued."""
        return [(c.kind, c.bytes_sent) for c in self.calls if not kinds or c.kind in kinds]


def _nbytes(arg) -> int:
    if isinstance(arg, torch.Tensor):
        return arg.numel() * arg.element_size()
    if isinstance(arg, (list, tuple)):
        return sum(_nbytes(a) for a in arg)
    return 0


def _group_name(args) -> str | None:
    for arg in args:  # the process group reaches the dispatcher as a boxed ScriptObject
        if isinstance(arg, torch.ScriptObject) and "ProcessGroup" in str(arg._type()):
            return dist.ProcessGroup.unbox(arg).group_name
    return None


class _Counter(TorchDispatchMode):
    def __init__(self, log: CollectiveLog):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            kind, sent = _OPS.get(func._opname, (func._opname, None))
            self.log.calls.append(CollectiveCall(kind, 0 if sent is None else _nbytes(args[sent]), _group_name(args)))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_collectives():
    """Within the block, record every collective and point-to-point call into the log."""
    log = CollectiveLog()
    with _Counter(log):
        yield log
