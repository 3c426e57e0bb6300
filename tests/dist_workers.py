"""A pool of gloo ranks, forked once per test session, that run test jobs on chosen sub-groups.

Starting ranks costs seconds, so the pool starts 6 ranks once and creates every group the tests
use (ranks {0}, {0,1}, {0,1,2}, {0,1,2,3}, {0,...,5}, {1,3}, ...) and the trainer's dp x sp meshes. `run(fn, ranks, *args)` sends a job to
every rank; ranks in `ranks` call fn(group, *args) with that group, the others skip it. Each
rank's result (or its exception) comes back to the test process, which asserts.

A job that fails on some rank or outlives its timeout marks the pool broken (a collective may
be half done), and the next job starts a fresh pool; process groups time out after 60 s, so a
mismatch surfaces as an error, never a hang.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import queue
import socket
import traceback

import torch
import torch.distributed as dist

WORLD_SIZE = 6
# (2, 3) and (0, 2) complete a 2 x 2 dp x sp mesh with (0, 1) and (1, 3).
GROUP_RANKS = ((0,), (0, 1), (0, 1, 2), (0, 1, 2, 3), (0, 1, 2, 3, 4, 5), (1, 3), (2, 3), (0, 2))
_GROUPS: dict = {}  # in a worker: every group above, by its ranks


# The trainer's dp x sp meshes, by name: (global ranks, dp, sp). Built at start-up by every rank
# (a DeviceMesh and its flattened axis are created collectively over the whole pool).
MESH_SHAPES = {"sp2": ((0, 1), 1, 2), "dp2": ((0, 1), 2, 1), "sp3": ((0, 1, 2), 1, 3), "dp2sp2": ((0, 1, 2, 3), 2, 2),
               "sp4": ((0, 1, 2, 3), 1, 4), "dp4": ((0, 1, 2, 3), 4, 1)}
_MESHES: dict = {}  # in a worker: name -> (mesh, flattened mesh)


def group_of(ranks) -> object:
    """Inside a job: the process group of the given global ranks (created at start-up)."""
    return _GROUPS[tuple(ranks)]


def mesh_of(name: str) -> tuple:
    """Inside a job: the (dp, sp) DeviceMesh named in MESH_SHAPES and its flattened mesh."""
    return _MESHES[name]
GROUP_TIMEOUT_S = 60


class RankError(Exception):
    """A job raised on one or more ranks; `.errors` maps rank -> (exception, traceback text)."""

    def __init__(self, errors: dict):
        self.errors = errors
        lines = [f"rank {r}: {type(e).__name__}: {e}\n{tb}" for r, (e, tb) in sorted(errors.items())]
        super().__init__("\n".join(lines))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, jobs, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
    )
    groups = {ranks: dist.new_group(list(ranks)) for ranks in GROUP_RANKS}
    _GROUPS.update(groups)
    from lasp2.distributed import mesh_for

    _MESHES.update({name: mesh_for("cpu", ranks, dp, sp) for name, (ranks, dp, sp) in MESH_SHAPES.items()})
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, ranks, args = job
        if rank not in ranks:
            results.put((rank, "skip", None))
            continue
        try:
            results.put((rank, "ok", fn(groups[tuple(ranks)], *args)))
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the test
            try:
                results.put((rank, "error", (exc, traceback.format_exc())))
            except Exception:  # an exception that does not pickle
                results.put((rank, "error", (RuntimeError(repr(exc)), traceback.format_exc())))
    dist.destroy_process_group()


class DistWorkers:
    def __init__(self):
        self._procs = []

    def _start(self) -> None:
        ctx = mp.get_context("fork")  # forking costs ~0.1 s; spawning re-imports torch per rank
        port = _free_port()
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(WORLD_SIZE)]
        self._procs = [
            ctx.Process(target=_worker, args=(r, port, self._jobs[r], self._results), daemon=True)
            for r in range(WORLD_SIZE)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn, ranks, *args, timeout: float = 120.0) -> dict:
        """Run fn(group, *args) on the group `ranks`; returns {group rank: result}."""
        ranks = tuple(ranks)
        assert ranks in GROUP_RANKS, f"no group {ranks}; add it to GROUP_RANKS"
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        for jobs in self._jobs:
            jobs.put((fn, ranks, args))
        outcomes = {}
        try:
            for _ in range(WORLD_SIZE):
                rank, status, payload = self._results.get(timeout=timeout)
                outcomes[rank] = (status, payload)
        except queue.Empty:
            self.close()
            raise TimeoutError(f"job {fn.__name__} on ranks {ranks} did not finish in {timeout} s") from None
        errors = {r: p for r, (s, p) in outcomes.items() if s == "error"}
        if errors:
            self.close()  # a collective may be half done: start afresh for the next job
            raise RankError(errors)
        return {ranks.index(r): p for r, (s, p) in outcomes.items() if s == "ok"}

    def close(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        self._procs = []
