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
