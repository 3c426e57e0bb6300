"""Parallelism applied from outside the model: activation checkpointing recomputes each block
with the same gradients; FSDP2 shards (or replicates) over the flattened mesh and sums gradients."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lasp2.model import LinearLlama
from lasp2.parallelize import apply_activation_checkpointing, apply_data_parallel
from tests.model.test_model import tiny


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_activation_checkpointing_recomputes_with_the_same_gradients():
    torch.manual_seed(0)
    plain = LinearLlama(tiny("gla")).double()
    checkpointed = LinearLlama(tiny("gla")).double()
    checkpointed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(checkpointed.blocks)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in checkpointed.named_parameters()]  # names kept
    tokens = torch.randint(0, 64, (2, 20))
    matmuls = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        loss = model(tokens).square().mean()
        with _CountMatmuls() as counter:
            loss.backward()
        matmuls[name] = counter.count
    for (n, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-14), n
    assert matmuls["checkpointed"] > matmuls["plain"], matmuls  # the blocks' forwards ran again in the backward


def _shard_job(group, mesh_name, mode):
    from torch.distributed.tensor import DTensor

    from tests.dist_workers import mesh_of

    _, flat = mesh_of(mesh_name)
    torch.manual_seed(0)
    model = LinearLlama(tiny("basic"))
    whole = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_data_parallel(model, model.blocks, flat, mode, torch.device("cpu"))
    local = sum(p.to_local().numel() for p in model.parameters())
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    assert all(isinstance(p, DTensor) for p in model.parameters())
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(flat.get_local_rank()))
    model(tokens).sum().backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    return {"local": local, "same": all(torch.equal(full[n], whole[n]) for n in whole), "grads": grads, "whole": whole}


@pytest.mark.parametrize("mode", ["shard", "replicate"])
def test_data_parallel_shards_or_replicates_and_sums_gradients(dist_workers, mode):
    """dp 2 x sp 2 flattened to 4 ranks: each rank holds a quarter of the parameters (shard) or
    all of them (replicate); each gradient is the sum of the ranks' own (their losses add up)."""
    results = dist_workers.run(_shard_job, (0, 1, 2, 3), "dp2sp2", mode)
    total = sum(p.numel() for p in results[0]["whole"].values())
    torch.manual_seed(0)
    reference = LinearLlama(tiny("basic"))
    for rank in range(4):
        reference(torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(rank))).sum().backward()
    for rank, got in results.items():
        assert got["same"]
        if mode == "shard":
            assert total / 4 <= got["local"] < total / 4 + 4 * 64, (got["local"], total)  # dim-0 shards, padded
        else:
            assert got["local"] == total
        for name, p in reference.named_parameters():
            assert torch.allclose(got["grads"][name], p.grad, rtol=1e-5, atol=1e-6), (rank, name)


def _refusals(group):
    from tests.dist_workers import mesh_of

    mesh, flat = mesh_of("dp2sp2")
    said = []
    for m, mode in ((mesh, "shard"), (flat, "hsdp")):
        try:
            apply_data_parallel(LinearLlama(tiny("basic")), [], m, mode, torch.device("cpu"))
        except ValueError as exc:
            said.append(str(exc))
    return said


def test_data_parallel_refuses_a_2d_mesh_and_an_unknown_mode(dist_workers):
    """A 2-D (dp, sp) mesh would mean HSDP (shard over one axis, replicate over the other)."""
    two_d, unknown = dist_workers.run(_refusals, (0, 1, 2, 3))[0]
    assert two_d.startswith("data parallelism needs the flattened 1-D mesh of every rank, got DeviceMesh((dp=2, sp=2)")
    assert unknown == "data parallelism 'hsdp': choose one of shard, replicate"


def test_mixed_precision_is_bf16_compute_fp32_reduction_on_cuda_only():
    from lasp2.parallelize import mixed_precision

    cuda = mixed_precision(torch.device("cuda", 0))
    assert (cuda.param_dtype, cuda.reduce_dtype) == (torch.bfloat16, torch.float32)
    cpu = mixed_precision(torch.device("cpu"))
    assert (cpu.param_dtype, cpu.reduce_dtype) == (None, None)  # the parameters' own dtype: fp32


class _Branching(torch.nn.Module):
    """One block of two layers; the second runs only when asked (a rank-dependent branch, like
    an expert no token of this rank is routed to)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)

    def forward(self, x, use_second: bool):
        x = self.first(x)
        return self.second(x) if use_second else x


class _OneBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Branching()])

    def forward(self, x, use_second: bool):
        return self.blocks[0](x, use_second)


def _unused_job(group, mode):
    from tests.dist_workers import mesh_of

    _, flat = mesh_of("sp3")
    rank = flat.get_local_rank()
    torch.manual_seed(0)
    model = _OneBlock()
    apply_data_parallel(model, model.blocks, flat, mode, torch.device("cpu"))
    ((rank + 1) * model(torch.ones(1, 3), use_second=rank == 1).sum()).backward()
    return [p.grad.full_tensor() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["shard", "replicate"])
def test_a_parameter_unused_on_some_ranks_gets_the_sum_of_the_others(dist_workers, mode):
    """Three ranks; the block's second layer runs on rank 1 only: its gradient is rank 1's (times
    2), the first layer's the sum of all three; the collectives still match (no hang)."""
    results = dist_workers.run(_unused_job, (0, 1, 2), mode, timeout=60)
    torch.manual_seed(0)
    reference = _OneBlock()
    for rank in range(3):
        ((rank + 1) * reference(torch.ones(1, 3), use_second=rank == 1).sum()).backward()
    for rank, grads in results.items():
        for got, p in zip(grads, reference.parameters()):
            assert torch.allclose(got, p.grad, atol=1e-6), (rank, got, p.grad)
