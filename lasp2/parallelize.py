"""Parallelism applied to a model from outside it (torchtitan's apply_ac / apply_fsdp idea):
activation checkpointing per block, and data parallelism with torch's FSDP2 engine over the
job's flattened dp x sp mesh. The model itself knows nothing of either.

Data parallelism, one unit per block plus the root (the embedding, final norm and head):
  shard      `fully_shard`: parameters, gradients and AdamW moments are split over every rank of
             the job (dp x sp), each block's parameters all-gathered just before it runs and freed
             after; gradients reduce-scattered (torchtitan's dp_shard_cp).
  replicate  FSDP2's `replicate`: every rank holds the whole model; gradients all-reduced.
Either way the gradients are summed, not averaged: every rank's loss is its share of the global
batch's mean (its token losses over the global token count), so the sum over ranks is the
gradient of that mean whatever dp and sp are. A parameter that some ranks leave unused gets a
zero gradient there, so every rank hands the same buffers to the reduction (otherwise the
collectives would not match); one that no rank uses gets a zero gradient too (AdamW's weight
decay still moves it, where one process would skip it). On CUDA the whole model (blocks and
root) computes in bf16 from fp32 master weights and reduces in fp32 (`MixedPrecisionPolicy`);
on the CPU everything stays fp32.
"""
from __future__ import annotations

import torch
from torch.distributed._composable import checkpoint
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

DATA_PARALLEL = ("shard", "replicate")


def apply_activation_checkpointing(blocks) -> None:
    """Keep only each block's input in the forward and recompute the block in the backward
    (non-reentrant; parameter names unchanged, so checkpoints load with or without it). A block
    that communicates repeats its collectives in the recompute, on every rank alike."""
    for block in blocks:
        checkpoint(block)


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on CUDA; fp32 throughout elsewhere."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_data_parallel(model: torch.nn.Module, blocks, mesh, mode: str, device: torch.device) -> None:
    """Shard or replicate `model` over the 1-D `mesh` (the flattened dp x sp mesh): one FSDP2
    unit per block, then the root. Gradients are summed over the mesh (see the module's doc)."""
    if mode not in DATA_PARALLEL:
        raise ValueError(f"data parallelism {mode!r}: choose one of {', '.join(DATA_PARALLEL)}")
    if mesh.ndim != 1:  # a 2-D mesh would silently mean HSDP (replicate over one axis, shard over the other)
        raise ValueError(f"data parallelism needs the flattened 1-D mesh of every rank, got {mesh}")
    wrap = fully_shard if mode == "shard" else replicate
    policy = mixed_precision(device)
    for block in blocks:
        wrap(block, mesh=mesh, mp_policy=policy)
    wrap(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a sum (see above)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
            module.set_reduce_scatter_unused_params(True, recurse=False)  # the same buffers on every rank
