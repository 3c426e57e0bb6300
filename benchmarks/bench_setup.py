"""Peak host memory per rank of setting up a training run: the trainer's own train() with
--stop-at 0 (load the data, build the model, apply activation checkpointing and FSDP, give it
its weights, make the optimizer), on W freshly spawned gloo ranks of this machine.

    python benchmarks/bench_setup.py                          # the 1b preset at sp 2
    python benchmarks/bench_setup.py --preset 0.3b --sp 2 -- --linear-kind gated_deltanet
    python benchmarks/bench_setup.py --hf-model /tmp/qwen3-next-1b   # a pretrained 1.09B Qwen3-Next-style model

Each rank reports its RSS high-water mark (VmHWM) and the wall time of the setup; the table
gives every rank's and the model's parameter bytes (fp32) for scale. Extra trainer flags go
after `--`. With --hf-model DIR the run fine-tunes that save_pretrained directory (each rank
reading its shards); a DIR that does not exist is first made: a Qwen3-Next-style config of
1.09B parameters (hidden 1536, 12 layers, 9 Gated DeltaNet and 3 softmax, 16 experts, the
151936-token vocabulary), randomly initialised and saved in bf16 (2.2 GB).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lasp2.distributed import ParallelDims, mesh_for
from lasp2.model import count_parameters, preset
from lasp2.train import parse_config, train
from lasp2_bench.machine import free_port, peak_memory_bytes


def _rank(rank, world, port, sp, argv, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=1800))
    dims = ParallelDims(*mesh_for("cpu", range(world), world // sp, sp))
    start = time.perf_counter()
    train(parse_config([*argv, "--sp", str(sp), "--stop-at", "0", "--out", str(Path(out_dir) / "run")]), dims,
          stream=open(os.devnull, "w"))
    seconds = time.perf_counter() - start
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"peak": peak_memory_bytes(torch.device("cpu")),
                                                            "seconds": seconds}))
    dist.destroy_process_group()


QWEN3_NEXT_1B = dict(vocab_size=151936, hidden_size=1536, num_hidden_layers=12, num_attention_heads=12,
                     num_key_value_heads=2, head_dim=128, linear_num_key_heads=8, linear_num_value_heads=16,
                     linear_key_head_dim=128, linear_value_head_dim=128, num_experts=16, num_experts_per_tok=4,
                     moe_intermediate_size=512, shared_expert_intermediate_size=512, intermediate_size=4096,
                     layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 3)


def hf_model(directory: Path) -> int:
    """The parameters of the save_pretrained directory's model (made first when missing)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not directory.exists():
        config = AutoConfig.from_pretrained(Path(__file__).resolve().parents[1] / "examples" / "configs" /
                                            "qwen3_next_tiny.json")
        for key, value in QWEN3_NEXT_1B.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    return sum(p.numel() for p in model.parameters())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-model", type=Path, default=None, help="fine-tune this save_pretrained directory instead")
    p.add_argument("--preset", default="1b")
    p.add_argument("--sp", type=int, default=2)
    p.add_argument("--world", type=int, default=None, help="ranks (default: --sp)")
    p.add_argument("trainer_flags", nargs="*", help="more trainer flags, after --")
    args = p.parse_args()
    world = args.world or args.sp
    if args.hf_model is not None:
        params, what = hf_model(args.hf_model), f"--hf-model {args.hf_model}"
        argv = ["--hf-model", str(args.hf_model), *args.trainer_flags]
    else:
        params, what = count_parameters(preset(args.preset, vocab_size=256, layer_pattern="LLLN")), f"--preset {args.preset}"
        argv = ["--preset", args.preset, *args.trainer_flags]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, free_port(), args.sp, argv, tmp), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    print(f"torch {torch.__version__}: setting up {what} ({params / 1e6:.0f}M parameters, "
          f"{4 * params / 2**30:.2f} GiB in fp32) on {world} ranks, sp {args.sp} {' '.join(args.trainer_flags)}")
    for r, got in enumerate(ranks):
        print(f"rank {r}: peak RSS {got['peak'] / 2**30:.2f} GiB, setup {got['seconds']:.1f} s")


if __name__ == "__main__":
    main()
