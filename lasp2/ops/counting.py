"""Count what a piece of code costs a GPU beyond its arithmetic, on any device: the host reads
(each one a device-to-host sync on a GPU, which stalls the CPU until every queued kernel has
run), the aten ops (each roughly one kernel launch) and the memory it leaves allocated.

    with count_dispatch() as log:
        o = chunk_linear_attn(q, k, v, g)[0]
        o.sum().backward()
    log.host_reads, log.op_count()

    with count_memory() as held:
        o = chunk_linear_attn(q, k, v, g)[0]     # what the forward keeps for the backward
    held.bytes - o.nbytes

Host reads are caught where they happen: the Tensor methods that hand a value to Python
(`item`, `tolist`, `__bool__`, `__int__`, `__float__`, `__index__`; `tolist` never reaches the
dispatcher) and the aten ops whose result size or value the host must know (`nonzero`,
`equal`, `masked_select`, `unique`, a bare `_local_scalar_dense`). Ops run by an autograd
backward inside the block are seen too. Meant for tests and benchmarks: every op of the block
passes through Python while counting.
"""
from __future__ import annotations

import contextlib
import gc
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READ_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
HOST_READ_OPS = ("_local_scalar_dense", "nonzero", "equal", "masked_select", "_unique", "_unique2", "unique_dim",
                 "unique_consecutive", "nonzero_static")


@dataclass
class DispatchLog:
    host_reads: list[str] = field(default_factory=list)  # what read each value, in order
    ops: Counter = field(default_factory=Counter)  # aten op name -> calls

    def op_count(self) -> int:
        """Aten ops dispatched (views and metadata ops included; collectives excluded)."""
        return sum(self.ops.values())


class _MethodReads(TorchFunctionMode):
    def __init__(self, log: DispatchLog):
        super().__init__()
        self.log, self.depth = log, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name not in HOST_READ_METHODS:
            return func(*args, **(kwargs or {}))
        if self.depth == 0:
            self.log.host_reads.append(f"Tensor.{name}")
        self.depth += 1  # the _local_scalar_dense underneath is the same read
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.depth -= 1


class _OpReads(TorchDispatchMode):
    def __init__(self, log: DispatchLog, methods: _MethodReads):
        super().__init__()
        self.log, self.methods = log, methods

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._opname
        if func.namespace == "aten":
            self.log.ops[name] += 1
            if name in HOST_READ_OPS and self.methods.depth == 0:
                self.log.host_reads.append(f"aten.{name}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_dispatch():
    """Within the block, record every host read and every aten op into the log."""
    log = DispatchLog()
    methods = _MethodReads(log)
    with methods, _OpReads(log, methods):
        yield log


@dataclass
class HeldMemory:
    bytes: int = 0  # the storages the block made that are still alive at its end


class _Births(TorchDispatchMode):
    """Every storage the block's ops make, with weak references to the tensors that use it. An
    address whose tensors are all gone may be handed out again: memory at it is then new."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, list] = {}  # address -> [made by the block, bytes, weak refs to its tensors]

    def _note(self, t: torch.Tensor, made: bool) -> None:
        if t.device.type == "meta":
            return
        ptr = t.untyped_storage().data_ptr()
        entry = self.storages.get(ptr)
        if entry is None or not any(ref() is not None for ref in entry[2]):
            entry = self.storages[ptr] = [made, t.untyped_storage().nbytes(), []]
        entry[2].append(weakref.ref(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in (*args, *kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(t, torch.Tensor):
                    self._note(t, made=False)
        out = func(*args, **kwargs)
        for t in (out if isinstance(out, (list, tuple)) else (out,)):
            if isinstance(t, torch.Tensor):
                self._note(t, made=True)
        return out

    def alive_bytes(self) -> int:
        return sum(nbytes for made, nbytes, refs in self.storages.values()
                   if made and any(ref() is not None for ref in refs))


@contextlib.contextmanager
def count_memory():
    """Within the block, every storage its ops make (as the dispatcher sees them, on any
    device): at the end, `bytes` is the size of those still alive, i.e. the block's outputs and
    whatever its autograd graph keeps for the backward (saved tensors and ctx attributes alike).
    Memory made before the block and freed inside it does not count."""
    held = HeldMemory()
    births = _Births()
    with births:
        yield held
    gc.collect()
    held.bytes = births.alive_bytes()
