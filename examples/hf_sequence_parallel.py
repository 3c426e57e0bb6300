"""A Hugging Face Qwen3-Next (a tiny one, built from a config) trained sequence-parallel on two
CPU processes, each step's loss printed next to the unmodified model's on one process.

    torchrun --nproc_per_node 2 examples/hf_sequence_parallel.py      # needs pip install "lasp2[hf]"
"""
import copy

import torch
import torch.distributed as dist
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

from lasp2.data import batch_for_step, load_tokens
from lasp2.integrations.transformers import parallelize, shard_batch
from lasp2.parallel import SequenceParallel


def main():
    dist.init_process_group("gloo")  # "nccl" with one GPU per rank
    torch.set_num_threads(1)
    rank = dist.get_rank()
    config = Qwen3NextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                             linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_expert_intermediate_size=32, full_attention_interval=4)  # 3 GDN : 1 attention
    torch.manual_seed(0)
    alone = Qwen3NextForCausalLM(config)  # the one-process reference (run on rank 0)
    sp = SequenceParallel(dist.group.WORLD, layout="zigzag")
    model = parallelize(copy.deepcopy(alone), sp)  # the same weights, sequence-parallel
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-6) for m in (model, alone)]
    tokens = load_tokens(None, None, 0.01, 257).train  # the built-in corpus, bytes
    for step in range(8):
        ids = batch_for_step(tokens, seed=0, step=step, batch_size=1, seq_len=256)[:, :-1]
        out = model(**shard_batch(sp, ids, labels=ids))
        optimizers[0].zero_grad()
        out.loss.backward()
        for p in model.parameters():  # the ranks' gradients add up to the whole sequence's
            dist.all_reduce(p.grad)
        optimizers[0].step()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)  # each rank holds its share of the mean
        if rank == 0:
            ref = alone(ids, labels=ids)
            optimizers[1].zero_grad()
            ref.loss.backward()
            optimizers[1].step()
            print(f"step {step}: loss {loss.item():.6f} on 2 ranks, {ref.loss.item():.6f} on one process")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
