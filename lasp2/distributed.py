"""Process groups for training: the dp x sp layout of a job's ranks, validated once and kept here.

The ranks form a DeviceMesh with axes ("dp", "sp"): sequences are split over "sp" (lasp2's
collectives run on its groups) and batches over "dp". Its flattened axis "dp_sp" holds every
rank of the job; FSDP2 shards parameters over it (torchtitan's dp_shard_cp) and the gradient of
the global mean is summed over it. A single process (no torchrun) has no mesh at all. Every
group the trainer uses is derived from the mesh.
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

AXES = ("dp", "sp")
FLAT_AXIS = "dp_sp"


class ConfigError(ValueError):
    """A bad command-line configuration; the message names the flag."""


@dataclass(frozen=True)
class ParallelDims:
    """The job's (dp, sp) mesh and its flattened dp_sp mesh (both None for one process), and the
    device this rank computes on. Build meshes with `mesh_for`; the flattened one must be created
    collectively, so it is passed in rather than derived here."""

    mesh: DeviceMesh | None = None
    flat_mesh: DeviceMesh | None = None
    device: torch.device = torch.device("cpu")

    def __post_init__(self):
        if (self.mesh is None) != (self.flat_mesh is None):
            raise ValueError("ParallelDims: give both the (dp, sp) mesh and its flattened mesh, or neither")
        if self.mesh is not None:
            if self.mesh.mesh_dim_names != AXES or self.mesh.ndim != 2:
                raise ValueError(f"ParallelDims: the mesh must have the axes {AXES}, got {self.mesh.mesh_dim_names}")
            if self.flat_mesh.ndim != 1 or self.flat_mesh.size() != self.mesh.size():
                raise ValueError(f"ParallelDims: the flattened mesh must be 1-D over the {self.mesh.size()} ranks of "
                                 f"the mesh, got {self.flat_mesh}")

    @property
    def dp(self) -> int:
        return 1 if self.mesh is None else self.mesh.size(0)

    @property
    def sp(self) -> int:
        return 1 if self.mesh is None else self.mesh.size(1)

    @property
    def world(self) -> int:
        return self.dp * self.sp

    @property
    def rank(self) -> int:
        """This rank's index among the job's ranks (dp-major: rank = dp_rank * sp + sp_rank)."""
        return 0 if self.flat_mesh is None else self.flat_mesh.get_local_rank()

    @property
    def dp_rank(self) -> int:
        return 0 if self.mesh is None else self.mesh.get_local_rank("dp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def world_group(self):
        """Every rank of the job (losses summed, checkpoints coordinated); None for one process."""
        return None if self.flat_mesh is None else self.flat_mesh.get_group()

    @property
    def sp_group(self):
        """This rank's sequence-parallel group; None when sp == 1 (the single-device path)."""
        return None if self.sp == 1 else self.mesh.get_group("sp")


def check_dims(world: int, sp: int) -> int:
    """-> dp; raises ConfigError unless sp divides the number of processes."""
    if sp < 1 or world % sp:
        raise ConfigError(f"--sp {sp} must be a positive divisor of the number of processes ({world}); "
                          f"dp = processes / sp must be whole")
    return world // sp


def mesh_for(device_type: str, ranks, dp: int, sp: int) -> tuple[DeviceMesh, DeviceMesh]:
    """The (dp, sp) mesh over `ranks` (global ranks, dp-major) and its flattened dp_sp mesh.
    Collective over the default group: every process calls it, also those not in `ranks`."""
    mesh = DeviceMesh(device_type, torch.tensor(list(ranks), dtype=torch.int).view(dp, sp), mesh_dim_names=AXES)
    return mesh, mesh._flatten(FLAT_AXIS)


def init_parallel(sp: int, timeout_s: int = 600) -> ParallelDims:
    """From the environment torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK): NCCL on CUDA, gloo on
    CPU. The mesh lives on the device the parameters will live on (a CPU mesh on a CPU run, so
    FSDP keeps them there)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = check_dims(world, sp)
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda and local_rank >= torch.cuda.device_count():
        raise ConfigError(f"torchrun started more processes on this node than the {torch.cuda.device_count()} GPU(s) "
                          f"CUDA sees (local rank {local_rank}); use --nproc_per_node {torch.cuda.device_count()}, or "
                          f"CUDA_VISIBLE_DEVICES= to train on the CPU")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return ParallelDims(device=device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    mesh = init_device_mesh(device.type, (dp, sp), mesh_dim_names=AXES)
    return ParallelDims(mesh, mesh._flatten(FLAT_AXIS), device)


def sum_over_ranks(value: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """A value summed over every rank of the job (the loss shares of the global mean)."""
    if dims.world_group is not None:
        value = value.clone()
        dist.all_reduce(value, group=dims.world_group)
    return value


def barrier(dims: ParallelDims) -> None:
    if dims.world_group is not None:
        dist.barrier(group=dims.world_group)


def run_command(prog: str, body) -> int:
    """A command over every process torchrun started (one process works too): body(dims) with
    all of them in one sp group; a ValueError (the same on every rank) is one line from rank 0
    and exit status 2. Returns the status."""
    dims = init_parallel(sp=int(os.environ.get("WORLD_SIZE", "1")))
    try:
        body(dims)
    except ValueError as exc:
        if dims.is_main:
            print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown(dims)
    return 0


def shutdown(dims: ParallelDims) -> None:
    """Every rank waits for the others, then leaves the group: a gloo rank that left right after
    a broadcast it sent could close its connection before a peer had read the data (the peer
    then aborts)."""
    if dims.world_group is not None and dist.is_initialized():
        dist.barrier(group=dims.world_group)
        dist.destroy_process_group()
