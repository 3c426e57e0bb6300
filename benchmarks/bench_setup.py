"""Peak host memory per rank of setting up a training run: the trainer's own train() with
--stop-at 0 (load the data, build the model, apply activation checkpointing and FSDP, give it
its weights, make the optimizer), on W freshly spawned gloo ranks of this machine.

    python benchmarks/bench_setup.py                          # the 1b preset at sp 2
    python benchmarks/bench_setup.py --preset 0.3b --sp 2 -- --linear-kind gated_deltanet

Each rank reports its RSS high-water mark (VmHWM) and the wall time of the setup; the table
gives every rank's and the model's parameter bytes (fp32) for scale. Extra trainer flags go
after `--`.
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b")
    p.add_argument("--sp", type=int, default=2)
    p.add_argument("--world", type=int, default=None, help="ranks (default: --sp)")
    p.add_argument("trainer_flags", nargs="*", help="more trainer flags, after --")
    args = p.parse_args()
    world = args.world or args.sp
    argv = ["--preset", args.preset, *args.trainer_flags]
    cfg = preset(args.preset, vocab_size=256, layer_pattern="LLLN")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, free_port(), args.sp, argv, tmp), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    params = count_parameters(cfg)
    print(f"torch {torch.__version__}: setting up --preset {args.preset} ({params / 1e6:.0f}M parameters, "
          f"{4 * params / 2**30:.2f} GiB in fp32) on {world} ranks, sp {args.sp} {' '.join(args.trainer_flags)}")
    for r, got in enumerate(ranks):
        print(f"rank {r}: peak RSS {got['peak'] / 2**30:.2f} GiB, setup {got['seconds']:.1f} s")


if __name__ == "__main__":
    main()
