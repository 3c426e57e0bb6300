"""LASP-2 on two CPU processes; compares every rank's shard with the single-device result.

    torchrun --nproc_per_node 2 examples/lasp2_torchrun.py
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lasp2 import chunk_linear_attn, lasp2_linear_attn


def main():
    dist.init_process_group("gloo")  # "nccl" with one GPU per rank
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # every rank draws the same full sequence, then keeps its shard
    B, T, H, K, V = 1, 4096, 4, 64, 64
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    log_decay = F.logsigmoid(torch.randn(B, T, H) + 4)  # SimpleGLA-style per-token gates
    C = T // world
    mine = slice(rank * C, (rank + 1) * C)
    q_r, k_r, v_r, g_r = (x[:, mine].clone().requires_grad_() for x in (q, k, v, log_decay))

    o_r = lasp2_linear_attn(q_r, k_r, v_r, g_r, scale=K**-0.5, group=dist.group.WORLD)
    o_r.square().mean().backward()  # one all-gather forward, one backward

    o_ref, _ = chunk_linear_attn(q, k, v, log_decay, scale=K**-0.5)
    err = ((o_r - o_ref[:, mine]).norm() / o_ref[:, mine].norm()).item()
    print(f"rank {rank}/{world}: tokens {mine.start}-{mine.stop - 1}, output {tuple(o_r.shape)}, "
          f"relative difference from one device {err:.1e}, |dq| {q_r.grad.norm():.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
