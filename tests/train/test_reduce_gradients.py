"""Gradient reduction hands every rank the same buffer, whichever gradients each rank produced."""
import torch
import torch.distributed as dist

from lasp2.distributed import ParallelDims, reduce_gradients


def _reduce(group, used_by):
    """Two parameters; `b` gets a gradient only on the ranks in used_by; `c` on none."""
    rank = dist.get_rank(group)
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    loss = (rank + 1) * a.sum() + ((rank + 1) * 10 * b.sum() if rank in used_by else 0)
    loss.backward()
    reduce_gradients([a, b, c], ParallelDims(dp=dist.get_world_size(group), world_group=group))
    return [None if p.grad is None else p.grad.tolist() for p in (a, b, c)]


def test_a_parameter_unused_on_some_ranks_does_not_split_the_all_reduce(dist_workers):
    results = dist_workers.run(_reduce, (0, 1, 2), (1,), timeout=30)
    for rank in range(3):
        a, b, c = results[rank]
        assert a == [6.0] * 3  # 1 + 2 + 3
        assert b == [20.0] * 3  # only rank 1 used it
        assert c is None  # no rank used it: no gradient, so the optimizer skips it
