"""`python -m lasp2_bench attn`: one attention layer, forward + backward, under every
sequence-parallel method, over W ranks and global sequence lengths.

Each W runs on W freshly spawned processes (gloo on CPU; NCCL with one GPU per rank when the
machine has W GPUs, so W=1 on a one-GPU machine). Time is the slowest rank's fwd+bwd, median of
--repeats after --warmup, with min and max. Bytes are the largest any rank hands to
torch.distributed in one fwd+bwd (`count_collectives`) next to its spec's formula; calls are
that rank's count; memory is the largest rank's peak (CUDA max allocated, CPU RSS high-water).
A configuration whose estimated time (its own time at the previous length scaled by
(T/T_prev)^2 for quadratic methods, T/T_prev otherwise; at the first length FLOPs at half the
measured rate) exceeds --budget-seconds, or whose working set exceeds --mem-gb, is skipped with
its estimate. Each W also measures the group's α/β and, at W=1, the kernels' share of the matmul
rate, which `project --calibrate` uses.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lasp2.parallel import DELTA_METHODS, LINEAR_METHODS, SOFTMAX_METHODS, Problem, count_collectives, shard
from lasp2.parallel import cost as costs
from .calibrate import measure_kernels, measure_network
from .documents import packed_offsets
from .machine import describe, free_port, matmul_rate, peak_memory_bytes, reset_peak_memory, start_rank, sync

FIELDS = ["family", "method", "world", "T", "layout", "status", "median_ms", "min_ms", "max_ms", "bytes_per_rank",
          "formula_bytes", "calls_per_rank", "steps_formula", "peak_mb", "est_seconds", "threads"]


def add_arguments(p) -> None:
    p.add_argument("--world", type=int, nargs="+", default=[2, 4], help="ranks (default: %(default)s)")
    p.add_argument("--T", type=int, nargs="+", default=[4096, 16384, 65536, 262144], help="global lengths (default: %(default)s)")
    p.add_argument("--linear", nargs="*", default=list(LINEAR_METHODS), choices=list(LINEAR_METHODS))
    p.add_argument("--softmax", nargs="*", default=list(SOFTMAX_METHODS), choices=list(SOFTMAX_METHODS))
    p.add_argument("--delta", nargs="*", default=[], choices=list(DELTA_METHODS),
                   help="delta-rule methods (Gated DeltaNet: L2-normalised keys, a gate per head); default none")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--documents", type=int, default=0,
                   help="pack each row as this many documents of random lengths (cu_seqlens; B must be 1)")
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads of the softmax layers (default: %(default)s)")
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--layout", default="contiguous", choices=["contiguous", "zigzag"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores / W, at least 1)")
    p.add_argument("--budget-seconds", type=float, default=300, help="skip a configuration estimated to take longer")
    p.add_argument("--mem-gb", type=float, default=8.0, help="skip a configuration estimated to need more per rank")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--weak", type=int, default=None, metavar="C",
                   help="instead: each linear method at C tokens per rank, forward and backward apart, every decay "
                        "form, against W independent single-device runs of C tokens side by side (CPU, one thread "
                        "per rank; --repeats, --warmup)")
    p.add_argument("--policy", nargs="+", default=["cpu"], choices=["cpu", "cuda"],
                   help="with --weak: the device policies to run each method under, side by side (the CUDA one "
                        "enqueues all local work before waiting for the exchange; lasp2.ops.policy)")
    p.add_argument("--heap", action="store_true",
                   help="with --weak: start the ranks with glibc keeping freed memory in the heap, so that page "
                        "faults of fresh mappings do not blur the comparison")


def spec_of(family, method):
    return {"linear": LINEAR_METHODS, "softmax": SOFTMAX_METHODS, "delta": DELTA_METHODS}[family][method]


def _estimate(spec, layer, rate, last, device):
    """(seconds per fwd+bwd, bytes of the largest live tensors per rank)."""
    if last is not None:
        seconds = last[1] * (layer.N / last[0]) ** (2 if spec.quadratic else 1)
    else:
        seconds = sum(costs.flops(spec, layer)) / (rate / 2)
    per_token = layer.B * layer.H * (layer.K + layer.V) * 4
    live = 8 * layer.C * per_token
    if spec.compute == "sdpa_bottom_right" and layer.W > 1 and device.type != "cuda":
        live += layer.B * layer.C * layer.N  # the CPU kernels' [C, N] boolean mask
    if spec.compute in ("left_product", "sdpa_bottom_right"):  # the whole sequence's keys and values on each rank
        live += 8 * layer.N * per_token
    elif spec.compute == "sdpa_causal":  # whole sequences of H/W heads
        live += 8 * layer.N * per_token // layer.W
    return seconds, live


def _step_fn(family, method, T, args, group, device):
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    full = [torch.randn(args.B, T, args.H, args.D, generator=gen) for _ in range(3)]
    if family == "softmax":
        full[1], full[2] = full[1][:, :, : args.kv_heads], full[2][:, :, : args.kv_heads]
    extra = []
    if family == "delta":  # Gated DeltaNet's inputs: unit keys, beta in (0, 1), a gate per head
        full[1] = torch.nn.functional.normalize(full[1], dim=-1)
        extra = [torch.rand(args.B, T, args.H, generator=gen), -0.1 * torch.rand(args.B, T, args.H, generator=gen)]
    q, k, v, *extra = (shard(x, group, args.layout).to(device, dtype).requires_grad_() for x in full + extra)
    fn = spec_of(family, method).fn
    kw = {"cu_seqlens": packed_offsets(T, args.documents, device)} if args.documents else {}

    def step():
        for t in (q, k, v, *extra):
            t.grad = None
        o = fn(q, k, v, *extra, group=group, layout=args.layout, **kw)
        o.backward(torch.ones_like(o))

    return step


def _max_over_ranks(values, group, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def run_config(family, method, T, world, group, device, args, rate, last):
    spec = spec_of(family, method)
    # Packed documents: LASP-2 and LASP-1 run linear attention's resets as per-token decays.
    resets_travel = args.documents and family == "linear" and method in ("lasp2", "lasp1")
    layer = Problem(B=args.B, N=T, W=world, S=1 if args.layout == "contiguous" else 2, H=args.H, K=args.D, V=args.D,
                    Hkv=args.kv_heads if family == "softmax" else None, dtype_bytes=getattr(torch, args.dtype).itemsize,
                    decay="token" if family == "delta" or resets_travel else "none")
    est_s, live = _estimate(spec, layer, rate, last, device)
    row = dict(family=family, method=method, world=world, T=T, layout=args.layout, documents=args.documents,
               est_seconds=round(est_s, 3),
               formula_bytes=spec.bytes_per_rank(layer), steps_formula=spec.sequential_steps(layer),
               threads=torch.get_num_threads())
    if est_s * (args.warmup + args.repeats) > args.budget_seconds or live > args.mem_gb * 2**30:
        return {**row, "status": f"skipped (est. {est_s:.0f} s/iter, {live / 2**30:.1f} GB/rank)"}
    step = _step_fn(family, method, T, args, group, device)
    reset_peak_memory(device)
    with count_collectives() as log:
        step()
    times = []
    for i in range(args.warmup + args.repeats):
        dist.barrier(group)
        start = time.perf_counter()
        step()
        sync(device)
        elapsed = _max_over_ranks([time.perf_counter() - start], group, device)[0]  # the slowest rank sets the pace
        if i >= args.warmup:
            times.append(elapsed)
    sent, calls, peak = log.bytes_sent(), log.count(), peak_memory_bytes(device)
    all_sent = [0.0] * world
    all_sent[dist.get_rank(group)] = float(sent)
    all_sent = _max_over_ranks(all_sent, group, device)
    busiest = max(range(world), key=lambda r: all_sent[r])
    calls_busy = _max_over_ranks([calls if dist.get_rank(group) == busiest else 0], group, device)[0]
    return {**row, "status": "ok", "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "max_ms": 1e3 * max(times), "bytes_per_rank": int(all_sent[busiest]), "calls_per_rank": int(calls_busy),
            "peak_mb": _max_over_ranks([peak / 2**20], group, device)[0]}


def _worker(rank, world, port, configs, args, out_path, use_cuda):
    device = start_rank(rank, world, port, use_cuda, args.threads, timeout_s=900)
    group = dist.group.WORLD
    rate = matmul_rate(device)
    calib = {"family": "calibration", "method": "network", "world": world, "status": "ok", "threads": torch.get_num_threads(),
             "rate": rate, **measure_network(group, device), **measure_kernels(device)}
    rows, last = [calib], {}
    for family, method, T in configs:  # lengths ascend per method: extrapolate from the last one
        row = run_config(family, method, T, world, group, device, args, rate, last.get((family, method)))
        if row["status"] == "ok":
            last[(family, method)] = (T, row["median_ms"] / 1e3)
        rows.append(row)
        if rank == 0:
            print(f"  W={world} {family:7s} {method:9s} T={T:7d} " + (f"{row['median_ms']:10.1f} ms" if row["status"] == "ok"
                                                                     else row["status"]), flush=True)
    if rank == 0:
        Path(out_path).write_text("\n".join(json.dumps(r) for r in rows))
    dist.destroy_process_group()


def spawn(world, configs, args, use_cuda) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.jsonl")
        mp.spawn(_worker, args=(world, free_port(), configs, args, out_path, use_cuda), nprocs=world, join=True)
        return [json.loads(line) for line in Path(out_path).read_text().splitlines()]


def run(args) -> tuple[list[dict], dict]:
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    if use_cuda and max(args.world) > torch.cuda.device_count():
        raise SystemExit(f"--world {max(args.world)} needs that many GPUs; this machine has {torch.cuda.device_count()}")
    rows = []
    configs = ([("linear", m, T) for m in args.linear for T in sorted(args.T)]
               + [("softmax", m, T) for m in args.softmax for T in sorted(args.T)]
               + [("delta", m, T) for m in args.delta for T in sorted(args.T)])
    for world in args.world:
        rows += spawn(world, configs, args, use_cuda)
    return rows, describe(device)


def print_table(rows, stream) -> None:
    head = (f"{'family':8s} {'method':10s} {'W':>2s} {'T':>7s} {'median ms':>10s} {'min':>9s} {'max':>9s} "
            f"{'MB/rank':>9s} {'formula':>9s} {'calls':>5s} {'peak MB':>8s}")
    stream.write(head + "\n" + "-" * len(head) + "\n")
    for r in rows:
        if r["family"] == "calibration":
            continue
        lead = f"{r['family']:8s} {r['method']:10s} {r['world']:2d} {r['T']:7d} "
        if r["status"] != "ok":
            stream.write(lead + r["status"] + "\n")
            continue
        stream.write(lead + f"{r['median_ms']:10.1f} {r['min_ms']:9.1f} {r['max_ms']:9.1f} {r['bytes_per_rank'] / 2**20:9.3f} "
                     f"{r['formula_bytes'] / 2**20:9.3f} {r['calls_per_rank']:5d} {r['peak_mb']:8.0f}\n")
