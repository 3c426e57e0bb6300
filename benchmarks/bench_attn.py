"""One attention layer, forward + backward, under every sequence-parallel method, on W ranks.

    python benchmarks/bench_attn.py                      # W in {2, 4}, T in {4K, 16K, 64K}, H=8, D=64, fp32
    python benchmarks/bench_attn.py --world 2 --T 4096 --repeats 3

Each configuration runs on W processes (gloo on CPU, NCCL with one GPU per rank when CUDA has
enough devices); time is the slowest rank's fwd+bwd, median of --repeats after --warmup, with
min and max. Bytes and calls are what rank 0 hands to torch.distributed in one fwd+bwd,
counted by wrapping it (lasp2.parallel.count_collectives). A configuration whose estimated
time exceeds --budget-seconds (its own time at the previous length scaled by (T/T_prev)^2 for
the quadratic methods and T/T_prev for the others; at the first length, matmul FLOPs at the
measured rate shared by the ranks) or whose memory exceeds --mem-gb is skipped, and the
estimate is printed instead.
Prints a table and writes a CSV under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lasp2.parallel import LINEAR_METHODS, SOFTMAX_METHODS, count_collectives, shard

CHUNK = 64


def quadratic(family, method) -> bool:
    return not (family == "linear" and method in ("lasp2", "lasp1", "ulysses"))


def estimate(family, method, T, W, B, H, D):
    """(fp32 matmul FLOPs of fwd+bwd on one rank, bytes of its largest temporaries). The
    quadratic pieces run in query tiles of 2^25 scores (lasp2.ops.tiling), except the all-gather
    softmax path, which hands SDPA a [C, T] mask."""
    C = T // W
    if not quadratic(family, method):
        return 3 * B * H * C * (2 * CHUNK * 2 * D + 4 * D * D), 8 * B * H * C * D * 4
    flops = 3.5 * 2 * B * H * C * T * 2 * D  # scores and values, recomputed blocks
    return flops, (B * C * T if (family, method) == ("softmax", "allgather") else 6 * 2**25 * 4)


def worker(rank, world, port, configs, args, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    group = dist.group.WORLD
    rows, last = [], {}
    for family, method, T in configs:  # lengths ascend per method: extrapolate from the last one
        row = run_config(family, method, T, world, group, device, args, last.get((family, method)))
        if row["status"] == "ok":
            last[(family, method)] = (T, row["median_ms"] / 1e3)
        rows.append(row)
        dist.barrier()
    if rank == 0:
        Path(out_path).write_text("\n".join(json.dumps(r) for r in rows))
    dist.destroy_process_group()


def make_shard(family, T, args, group, device):
    gen = torch.Generator().manual_seed(0)
    H, D, B = args.H, args.D, args.B
    full = [torch.randn(B, T, H, D, generator=gen) for _ in range(3)]
    if family == "softmax":
        full[1], full[2] = full[1][:, :, : args.kv_heads], full[2][:, :, : args.kv_heads]
    return [shard(x, group, args.layout).to(device).requires_grad_() for x in full]


def run_config(family, method, T, world, group, device, args, last=None):
    flops, mem = estimate(family, method, T, world, args.B, args.H, args.D)
    est_s = flops / (args.rate / world)
    if last is not None:  # measured at a shorter length: scale that instead
        est_s = last[1] * (T / last[0]) ** (2 if quadratic(family, method) else 1)
    row = dict(family=family, method=method, world=world, T=T, layout=args.layout, est_seconds=est_s,
               est_gb=mem / 2**30)
    if est_s * (args.warmup + args.repeats) > args.budget_seconds or mem > args.mem_gb * 2**30:
        return {**row, "status": f"skipped (est. {est_s:.0f} s/iter, {mem / 2**30:.1f} GB/rank)"}
    q, k, v = make_shard(family, T, args, group, device)
    fn = LINEAR_METHODS[method] if family == "linear" else SOFTMAX_METHODS[method]
    kwargs = dict(group=group, layout=args.layout)

    def step():
        for t in (q, k, v):
            t.grad = None
        o = fn(q, k, v, **kwargs)
        o.backward(torch.ones_like(o))

    with count_collectives() as log:
        step()
    times = []
    for i in range(args.warmup + args.repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        if i >= args.warmup:
            times.append(elapsed.item())
    return {**row, "status": "ok", "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "max_ms": 1e3 * max(times), "bytes_per_rank": log.bytes_sent(), "calls_per_rank": log.count()}


def measured_rate() -> float:
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * n**3 / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--T", type=int, nargs="+", default=[4096, 16384, 65536], help="global sequence lengths")
    parser.add_argument("--linear", nargs="+", default=list(LINEAR_METHODS), choices=list(LINEAR_METHODS))
    parser.add_argument("--softmax", nargs="+", default=list(SOFTMAX_METHODS), choices=list(SOFTMAX_METHODS))
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads of the softmax layers")
    parser.add_argument("--D", type=int, default=64)
    parser.add_argument("--layout", default="contiguous", choices=["contiguous", "zigzag"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-seconds", type=float, default=300, help="skip a configuration estimated to take longer")
    parser.add_argument("--mem-gb", type=float, default=4.0, help="skip a configuration estimated to need more per rank")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.rate = measured_rate()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, fp32 matmul {args.rate / 1e9:.1f} GFLOP/s "
          f"(one process), B={args.B} H={args.H} D={args.D} layout={args.layout}")
    configs = [("linear", m, T) for m in args.linear for T in args.T] + [("softmax", m, T) for m in args.softmax for T in args.T]
    rows = []
    for world in args.world:
        with tempfile.TemporaryDirectory() as tmp:
            out_path = os.path.join(tmp, "rows.jsonl")
            port = 29000 + (os.getpid() % 1000)
            mp.spawn(worker, args=(world, port, configs, args, out_path), nprocs=world, join=True)
            rows += [json.loads(line) for line in Path(out_path).read_text().splitlines()]
    header = f"{'family':8s} {'method':10s} {'W':>2s} {'T':>6s} {'fwd+bwd ms':>11s} {'min':>9s} {'max':>9s} {'MB sent/rank':>12s} {'calls':>5s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["status"] == "ok":
            print(f"{r['family']:8s} {r['method']:10s} {r['world']:2d} {r['T']:6d} {r['median_ms']:11.1f} {r['min_ms']:9.1f} "
                  f"{r['max_ms']:9.1f} {r['bytes_per_rank'] / 2**20:12.2f} {r['calls_per_rank']:5d}")
        else:
            print(f"{r['family']:8s} {r['method']:10s} {r['world']:2d} {r['T']:6d} {r['status']}")
    out = args.out or Path(__file__).parent / "results" / f"attn-{datetime.date.today()}-{args.layout}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["family", "method", "world", "T", "layout", "status", "median_ms", "min_ms", "max_ms",
              "bytes_per_rank", "calls_per_rank", "est_seconds", "est_gb"]
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
