"""Packed documents across two ranks: three documents in one row of 12 tokens, the middle one
spanning both ranks. Each rank passes its shard and the same global cu_seqlens; every document
is computed as if alone, compared here with each document run on its own.

    torchrun --nproc_per_node 2 examples/packed_documents.py
"""
import torch
import torch.distributed as dist

from lasp2 import chunk_linear_attn, lasp2_linear_attn


def main():
    dist.init_process_group("gloo")  # "nccl" with one GPU per rank
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()

    cu_seqlens = torch.tensor([0, 3, 10, 12])  # documents of 3, 7 and 2 tokens; 3..9 crosses ranks
    torch.manual_seed(0)  # every rank draws the same packed row, then keeps its shard
    T, H, K, V = 12, 2, 4, 4
    q, k, v = torch.randn(1, T, H, K), torch.randn(1, T, H, K), torch.randn(1, T, H, V)
    log_decay = torch.nn.functional.logsigmoid(torch.randn(1, T, H) + 2)
    C = T // world
    mine = slice(rank * C, (rank + 1) * C)
    o_r = lasp2_linear_attn(q[:, mine], k[:, mine], v[:, mine], log_decay[:, mine], group=dist.group.WORLD,
                            cu_seqlens=cu_seqlens)

    bounds = cu_seqlens.tolist()  # the reference: each document alone on one device
    o_ref = torch.cat([chunk_linear_attn(q[:, a:b], k[:, a:b], v[:, a:b], log_decay[:, a:b])[0]
                       for a, b in zip(bounds, bounds[1:])], dim=1)
    err = ((o_r - o_ref[:, mine]).norm() / o_ref[:, mine].norm()).item()
    print(f"rank {rank}/{world}: tokens {mine.start}-{mine.stop - 1} of documents {bounds}, "
          f"relative difference from each document alone {err:.1e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
