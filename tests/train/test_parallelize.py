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


KINDS_WITH_EVERY_KIND_OF_TENSOR = ("basic", "lightning", "gla", "rebased", "gated_deltanet", "kda")  # buffers, biases, gains, A_log


@pytest.mark.parametrize("kind", KINDS_WITH_EVERY_KIND_OF_TENSOR)
def test_a_model_built_on_the_meta_device_materializes_to_the_eager_weights(kind):
    """The debug preset: built on the meta device (nothing allocated), then materialized from
    the seed, every parameter and buffer equals the eagerly built model's bit for bit, and the
    RNG stream goes on the same."""
    from lasp2.model import preset
    from lasp2.parallelize import materialize

    cfg = preset("debug", vocab_size=256, linear_kind=kind)
    torch.manual_seed(3)
    eager, after_eager = LinearLlama(cfg), torch.rand(4)
    with torch.device("meta"):
        model = LinearLlama(cfg)
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    materialize(model, torch.device("cpu"), seed=3)
    assert torch.equal(torch.rand(4), after_eager)
    want = {**dict(eager.named_parameters()), **dict(eager.named_buffers())}
    got = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert want.keys() == got.keys()
    assert all(torch.equal(got[n], want[n]) for n in want), [n for n in want if not torch.equal(got[n], want[n])]


def _materialize_job(group, mode, kind):
    from torch.distributed.tensor import DTensor

    from lasp2.model import preset
    from lasp2.parallelize import materialize
    from tests.dist_workers import mesh_of

    _, flat = mesh_of("dp2")
    with torch.device("meta"):
        model = LinearLlama(preset("debug", vocab_size=256, linear_kind=kind))
    apply_data_parallel(model, model.blocks, flat, mode, torch.device("cpu"))
    materialize(model, torch.device("cpu"), seed=3)
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    return local, {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["shard", "replicate"])
@pytest.mark.parametrize("kind", ["gla", "kda"])
def test_a_sharded_meta_model_materializes_each_rank_s_shard_of_the_eager_weights(dist_workers, kind, mode):
    """Built on the meta device, sharded over 2 ranks, then materialized: each rank holds about
    half the parameters (sharded) and together they are the eager model's, bit for bit."""
    from lasp2.model import preset

    torch.manual_seed(3)
    eager = dict(LinearLlama(preset("debug", vocab_size=256, linear_kind=kind)).named_parameters())
    total = sum(p.numel() for p in eager.values())
    for rank, (local, got) in dist_workers.run(_materialize_job, (0, 1), mode, kind).items():
        assert all(torch.equal(got[n], p) for n, p in eager.items()), rank
        assert local < 0.51 * total if mode == "shard" else local == total


def _fp32_gates_job(group, family):
    """One forward of a model sharded over 2 ranks that computes in bf16 (FSDP's mixed precision,
    forced on the CPU): the dtype of the decay parameters and of a projection, as the mixer
    sees them."""
    from lasp2.integrations.transformers import CausalLM, parallelize
    from lasp2.parallel import SequenceParallel
    from tests.dist_workers import mesh_of

    _, flat = mesh_of("dp2")
    torch.manual_seed(0)
    if family == "linear-llama":
        model = LinearLlama(tiny("gated_deltanet"))
        mixers = [m for m in model.modules() if type(m).__name__ == "DeltaRuleAttention"]
        names = ("A_log", "dt_bias", "q")
    else:
        from tests.integrations.test_transformers import build

        model = CausalLM(parallelize(build(family), SequenceParallel(None)))
        mixers = [m for m in model.modules() if type(m).__name__.startswith("SPQwen3NextGatedDeltaNet")]
        names = ("A_log", "dt_bias", "in_proj_qkvz")
    apply_data_parallel(model, model.blocks, flat, "shard", torch.device("cpu"), param_dtype=torch.bfloat16)
    seen = []

    def look(module, args):
        seen.append([str(getattr(module, n).dtype if n in ("A_log", "dt_bias") else getattr(module, n).weight.dtype)
                     for n in names])

    for m in mixers:
        m.register_forward_pre_hook(look)
    tokens = torch.randint(0, 64, (1, 8))
    if family == "linear-llama":
        model(tokens)
    else:
        model(tokens, torch.arange(8), None)
    return seen


@pytest.mark.parametrize("family", ["linear-llama", "qwen3_next"])
def test_mixed_precision_keeps_the_decay_parameters_fp32(dist_workers, family):
    """FSDP casts every parameter it manages to bf16; A_log and dt_bias stay out of it, whole and
    fp32, so the gate is formed from unrounded values (the projections do compute in bf16)."""
    if family != "linear-llama":
        pytest.importorskip("transformers")
    for rank, seen in dist_workers.run(_fp32_gates_job, (0, 1), family).items():
        assert seen and all(dtypes == ["torch.float32", "torch.float32", "torch.bfloat16"] for dtypes in seen), seen


def _clip_job(group, max_norm):
    from torch.distributed.tensor import DTensor

    from lasp2.parallelize import clip_grad_norm, sum_replicated_gradients
    from tests.dist_workers import mesh_of

    _, flat = mesh_of("dp2")
    torch.manual_seed(0)
    model = LinearLlama(tiny("gated_deltanet"))
    apply_data_parallel(model, model.blocks, flat, "shard", torch.device("cpu"))
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(flat.get_local_rank()))
    model(tokens).square().mean().backward()
    sum_replicated_gradients(model, flat.get_group())
    total = clip_grad_norm(model, max_norm)
    return float(total), {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                          for n, p in model.named_parameters()}


@pytest.mark.parametrize("max_norm", [1e-3, 1e3], ids=["clipped", "unclipped"])
def test_gradients_are_summed_and_clipped_like_one_process(dist_workers, max_norm):
    """Sharded gradients and the whole ones of the fp32 parameters: their sum over the ranks and
    one norm over both kinds, clipped together, equal torch's clip_grad_norm_ on one process."""
    torch.manual_seed(0)
    reference = LinearLlama(tiny("gated_deltanet"))
    for rank in range(2):
        tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(rank))
        reference(tokens).square().mean().backward()
    want_total = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm))
    for rank, (total, grads) in dist_workers.run(_clip_job, (0, 1), max_norm).items():
        assert abs(total - want_total) <= 1e-5 * want_total, (total, want_total)
        for name, p in reference.named_parameters():
            assert torch.allclose(grads[name], p.grad, rtol=1e-5, atol=1e-9), (rank, name)
