"""A long prompt prefilled across ranks, then decoded from O(1) states, beside transformers' own generate.

    .venv/bin/torchrun --standalone --nproc_per_node 2 examples/generate_long_prompt.py

A tiny Qwen3-Next (3 Gated DeltaNet layers and 1 softmax layer, examples/configs/qwen3_next_tiny.json)
continues a 4096-token prompt: every rank prefills its half (zigzag), keeps the linear layers'
final states and its half of the softmax layer's KV cache, and decodes the same tokens. Rank 0
then runs the unmodified model's `generate` on the whole prompt in one process and compares.
"""
import os
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

from lasp2.integrations.transformers import generate, parallelize
from lasp2.parallel import SequenceParallel

CONFIG = Path(__file__).resolve().parent / "configs" / "qwen3_next_tiny.json"
PROMPT_TOKENS, NEW_TOKENS = 4096, 24


def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(CONFIG)).eval()


def main():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    sp = SequenceParallel(dist.group.WORLD if world > 1 else None, layout="zigzag")
    prompt = torch.randint(3, 250, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))

    out = generate(parallelize(model(), sp), sp, prompt, NEW_TOKENS, return_dict=True)
    decode_ms = 1e3 * sum(out.step_seconds[1:]) / (len(out.step_seconds) - 1)
    print(f"rank {sp.rank}: prefill {out.prefill_seconds:.2f} s, {decode_ms:.1f} ms per token; holds "
          f"{out.cache.kv_cache / 2**10:.0f} KiB of KV cache and {(out.cache.states + out.cache.conv) / 2**10:.0f} KiB "
          f"of states; new tokens {out.sequences[0, PROMPT_TOKENS:].tolist()}", flush=True)
    if sp.rank == 0:
        want = model().generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                do_sample=False, pad_token_id=0, eos_token_id=None)
        same = torch.equal(want, out.sequences)
        print(f"transformers' generate on one process: {'the same' if same else 'DIFFERENT'} {NEW_TOKENS} tokens")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
