"""Measurements that feed the cost model: the α and β of this process group's collectives, and
the fraction of the matmul rate each kind of attention kernel reaches on one rank."""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from lasp2.ops import chunk_linear_attn
from lasp2.ops.left_product import left_product_linear_attn
from lasp2.ops.softmax_attn import attention_block, sdpa, softmax_attn
from lasp2.parallel.cost import CHUNK
from .machine import sync

SMALL, LARGE = 4 * 1024, 16 * 2**20  # bytes per rank


def _timed(fn, device, repeats=5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fit(t_small: float, t_large: float, steps: int, small: float, large: float) -> tuple[float, float]:
    """α, β from the times of `steps` sequential messages of `small` and `large` bytes."""
    beta = (large - small) * steps / max(t_large - t_small, 1e-9)
    alpha = max(t_small / steps - small / beta, 0.0)
    return alpha, beta


def measure_network(group, device) -> dict:
    """α (s) and β (bytes/s) of a ring all-gather and of one neighbour exchange on `group`;
    every rank must call it. Returns {} for a group of one."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world == 1:
        return {}
    out = {}

    def gather(nbytes):
        x = torch.zeros(nbytes // 4, device=device)
        buf = torch.empty(world * x.numel(), device=device)
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        return lambda: all_gather(buf, x, group=group)

    def exchange(nbytes):
        x, y = torch.zeros(nbytes // 4, device=device), torch.empty(nbytes // 4, device=device)
        nxt, prv = (dist.get_global_rank(group, (rank + s) % world) for s in (1, -1))
        return lambda: [w.wait() for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, nxt, group),
                                                                  dist.P2POp(dist.irecv, y, prv, group)])]

    for name, make, steps in (("allgather", gather, world - 1), ("p2p", exchange, 1)):
        t_small, t_large = (_timed(make(n), device) for n in (SMALL, LARGE))
        times = torch.tensor([t_small, t_large], dtype=torch.float64, device=device)
        dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
        out[f"{name}_alpha"], out[f"{name}_beta"] = _fit(*times.tolist(), steps, SMALL, LARGE)
    return out


def measure_kernels(device, H=8, D=64, T=4096, q_len=1024) -> dict:
    """FLOP/s one rank reaches in fwd+bwd (FLOPs as lasp2_bench.costs counts them), measured
    while the other ranks of the run measure too: the chunked linear op over T tokens, and the
    quadratic kernels for q_len queries against T keys (masked left product; a softmax block
    with log-sum-exp as Ring uses; SDPA with a mask as the all-gather path uses; causal SDPA over
    T as Ulysses uses, which skips the masked half)."""
    gen = torch.Generator().manual_seed(0)

    def leafs(*shapes):
        return [torch.randn(*s, generator=gen).to(device).requires_grad_() for s in shapes]

    def fwd_bwd(op, *xs):
        def run():
            out = op(*xs)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(torch.ones_like(out))
        return run

    q, k, v = leafs((1, T, H, D), (1, T, H, D), (1, T, H, D))
    q_short = leafs((1, q_len, H, D))[0]
    q_pos, k_pos = torch.arange(T - q_len, T, device=device), torch.arange(T, device=device)
    quad = 3.5 * H * q_len * T * 2 * 2 * D
    kernels = {
        "chunk": (lambda a, b, c: chunk_linear_attn(a, b, c)[0], (q, k, v), 3.0 * H * T * (2 * CHUNK * 2 * D + 4 * D * D)),
        "left_product": (lambda a, b, c: left_product_linear_attn(a, b, c, q_pos, k_pos, causal=True, scale=1.0),
                         (q_short, k, v), quad),
        "softmax_block": (lambda a, b, c: attention_block(a, b, c, q_pos, k_pos, causal=True, scale=0.125),
                          (q_short, k, v), quad),
        "sdpa_masked": (lambda a, b, c: sdpa(a, b, c, scale=0.125, causal=True), (q_short, k, v), quad),
        "sdpa_causal": (lambda a, b, c: softmax_attn(a, b, c, causal=True), (q, k, v), 3.5 * H * T * T * 2 * 2 * D / 2),
    }
    return {f"rate_{name}": flops / _timed(fwd_bwd(op, *xs), device) for name, (op, xs, flops) in kernels.items()}
