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

The parameters a model names in `fp32_parameter_names()` (the decays' A_log, dt_bias: bf16
would move exp(A_log) by ~1%) stay out of FSDP (its ignored_params): whole and fp32 on every
rank, on CUDA too; their gradients are summed by `sum_replicated_gradients` (one all-reduce),
and `clip_grad_norm` clips both kinds together. They are a few values per head and layer.

A model built on the meta device (Linear-Llama3 is, by the trainer) gets its memory after FSDP
has sharded it, and `materialize` fills each rank's shards with the values its constructor
would have drawn, so no rank ever holds the whole model.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._composable import checkpoint
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

DATA_PARALLEL = ("shard", "replicate")


def apply_activation_checkpointing(blocks) -> None:
    """Keep only each block's input in the forward and recompute the block in the backward
    (non-reentrant; parameter names unchanged, so checkpoints load with or without it). A block
    that communicates repeats its collectives in the recompute, on every rank alike."""
    for block in blocks:
        checkpoint(block)


def apply_compile(blocks) -> None:
    """torch.compile each block in place (`Module.compile`: parameter names unchanged, so
    checkpoints load with or without it). The ops trace whole (lasp2.ops compile with
    fullgraph=True); a block's graph breaks only where a sequence-parallel method communicates,
    and those pieces run eagerly. One compiled graph per block's shapes (and per layer type)."""
    for block in blocks:
        block.compile()


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on CUDA; fp32 throughout elsewhere."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def fp32_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the model keeps in fp32 under mixed precision (its fp32_parameter_names)."""
    names = set(model.fp32_parameter_names()) if hasattr(model, "fp32_parameter_names") else set()
    return [p for n, p in model.named_parameters() if n in names]


def apply_data_parallel(model: torch.nn.Module, blocks, mesh, mode: str, device: torch.device,
                        param_dtype: torch.dtype | None = None) -> None:
    """Shard or replicate `model` over the 1-D `mesh` (the flattened dp x sp mesh): one FSDP2
    unit per block, then the root, but for `fp32_parameters(model)`, which stay whole. Gradients
    are summed over the mesh (see the module's doc). param_dtype: the dtype FSDP computes in
    (None: bf16 on CUDA, fp32 elsewhere)."""
    if mode not in DATA_PARALLEL:
        raise ValueError(f"data parallelism {mode!r}: choose one of {', '.join(DATA_PARALLEL)}")
    if mesh.ndim != 1:  # a 2-D mesh would silently mean HSDP (replicate over one axis, shard over the other)
        raise ValueError(f"data parallelism needs the flattened 1-D mesh of every rank, got {mesh}")
    wrap = fully_shard if mode == "shard" else replicate
    policy = mixed_precision(device) if param_dtype is None else MixedPrecisionPolicy(param_dtype=param_dtype,
                                                                                      reduce_dtype=torch.float32)
    kept = set(fp32_parameters(model))
    for block in blocks:
        wrap(block, mesh=mesh, mp_policy=policy, ignored_params=kept)
    wrap(model, mesh=mesh, mp_policy=policy, ignored_params=kept)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a sum (see above)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
            module.set_reduce_scatter_unused_params(True, recurse=False)  # the same buffers on every rank


def sum_replicated_gradients(model: torch.nn.Module, group) -> None:
    """Sums over `group` (every rank of the job) the gradients of the parameters FSDP leaves
    alone (`fp32_parameters`), as FSDP sums the others: one all-reduce of them all. A parameter
    without a gradient on this rank contributes zeros, so every rank hands over the same buffer."""
    params = fp32_parameters(model)
    if group is None or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ over FSDP's sharded gradients and the whole ones of the fp32
    parameters together (torch's own refuses the mix): the norm of all of them, and every
    gradient scaled by the same factor."""
    params = [p for p in model.parameters() if p.grad is not None]
    groups = [[p for p in params if isinstance(p.grad, DTensor)], [p for p in params if not isinstance(p.grad, DTensor)]]
    norms = []
    for group in groups:
        if group:
            norm = torch.nn.utils.get_total_norm([p.grad for p in group])
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:  # no gradient anywhere
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in groups:
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)  # takes the parameters
    return total


@torch.no_grad()
def materialize(model: torch.nn.Module, device: torch.device, seed: int) -> None:
    """A model built on the meta device (and sharded or not): its memory on `device`, then the
    values its constructor would have drawn after torch.manual_seed(seed) (its
    `initial_values()`), each drawn whole on the CPU and copied into this rank's shard; or, for
    a model with pretrained weights (`pretrained`, `load_pretrained()`), its shards read from
    them. A model with real tensors is left as it is."""
    if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return
    if getattr(model, "pretrained", None) is not None:
        model.load_pretrained(device)  # the loaded shards replace the meta parameters
        model.to(device)  # FSDP2 re-registers the parameters it shards
        return
    model.to_empty(device=device)
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    torch.manual_seed(seed)
    for name, value in model.initial_values():
        target = targets.pop(name)
        if isinstance(target, DTensor):
            value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
        target.copy_(value)
    if targets:
        raise RuntimeError(f"materialize: no initial value for {', '.join(sorted(targets))}")
