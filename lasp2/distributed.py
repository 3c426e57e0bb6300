"""Process groups for training: a validated dp x sp layout of the ranks, from torchrun or given.

Ranks form a DeviceMesh with named axes ("dp", "sp"): sequences are split over "sp", batches
over "dp", and every rank holds the whole model, so gradients are reduced over all dp x sp
ranks. A single process (no torchrun) is dp = sp = 1 with no process group at all.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class ConfigError(ValueError):
    """A bad command-line configuration; the message names the flag."""


@dataclass
class ParallelDims:
    dp: int = 1
    sp: int = 1
    rank: int = 0
    dp_rank: int = 0
    world_group: object = None  # every rank of the run (gradient reduction); None: one process
    dp_group: object = None
    sp_group: object = None  # the sequence-parallel group; None when sp == 1
    device: torch.device = torch.device("cpu")

    @property
    def world(self) -> int:
        return self.dp * self.sp

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_dims(world: int, sp: int) -> int:
    """-> dp; raises ConfigError unless sp divides the number of processes."""
    if sp < 1 or world % sp:
        raise ConfigError(f"--sp {sp} must be a positive divisor of the number of processes ({world}); "
                          f"dp = processes / sp must be whole")
    return world // sp


def init_parallel(sp: int, timeout_s: int = 600) -> ParallelDims:
    """From the environment torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK): NCCL on CUDA, gloo on CPU."""
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
    mesh = dist.device_mesh.init_device_mesh(device.type, (dp, sp), mesh_dim_names=("dp", "sp"))
    return ParallelDims(
        dp=dp, sp=sp, rank=dist.get_rank(), dp_rank=mesh.get_local_rank("dp"), world_group=dist.group.WORLD,
        dp_group=mesh.get_group("dp") if dp > 1 else None, sp_group=mesh.get_group("sp") if sp > 1 else None,
        device=device,
    )


def reduce_gradients(params, dims: ParallelDims) -> None:
    """Sums every gradient over all dp x sp ranks, in one flat buffer (one all-reduce).

    The buffer holds every trainable parameter in order, zeros where this rank produced no
    gradient, plus one flag per parameter counting the ranks that did: every rank hands the same
    buffer to the all-reduce even when a parameter went unused on some of them (it then gets
    the sum of the ranks that used it); a parameter no rank used keeps no gradient."""
    if dims.world_group is None:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    used = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = _flatten_dense_tensors(grads + [used])
    dist.all_reduce(flat, group=dims.world_group)
    *reduced, used = _unflatten_dense_tensors(flat, grads + [used])
    for p, g, n in zip(params, reduced, used.tolist()):
        if p.grad is not None:
            p.grad.copy_(g)
        elif n > 0:
            p.grad = g.to(dtype=p.dtype, copy=True)


def sum_over_ranks(value: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    if dims.world_group is not None:
        value = value.clone()
        dist.all_reduce(value, group=dims.world_group)
    return value


def barrier(dims: ParallelDims) -> None:
    if dims.world_group is not None:
        dist.barrier(group=dims.world_group)


def shutdown(dims: ParallelDims) -> None:
    if dims.world_group is not None and dist.is_initialized():
        dist.destroy_process_group()
