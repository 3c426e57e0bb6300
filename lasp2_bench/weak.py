"""`python -m lasp2_bench attn --weak C`: what sequence parallelism costs over the single-device
op at equal tokens per rank, forward and backward apart, for every decay form.

W ranks each hold C tokens and run a method over the group ("sp"); in the same number of
processes, W independent single-device runs of C tokens each run side by side ("alone"), so
that both sides share the machine (memory bandwidth, caches) the same way and the ratio shows
only the method's own extra work and waiting. One thread per rank; each pass is timed on every
rank between barriers and the slowest rank counts; medians of --repeats after --warmup.
"""
from __future__ import annotations

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

from .machine import free_port, sync

DECAYS = ("none", "head", "token", "channel")
FIELDS = ["method", "policy", "decay", "world", "tokens_per_rank", "sp_fwd_ms", "alone_fwd_ms", "fwd_ratio", "sp_bwd_ms",
          "alone_bwd_ms", "bwd_ratio", "heap"]


def _inputs(decay: str, C: int, H: int, D: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, C, H, D, generator=gen) for _ in range(3))
    shape = {"none": None, "head": (H,), "token": (1, C, H), "channel": (1, C, H, D)}[decay]
    g = None if shape is None else torch.nn.functional.logsigmoid(torch.randn(*shape, generator=gen) + 3.0)
    return [t if t is None else t.requires_grad_() for t in (q, k, v, g)]


def _time_passes(fns, inputs, group, repeats: int, warmup: int):
    """[(forward ms, backward ms)] per fn: medians over repeats of the slowest rank's time per pass.
    The fns take turns within each repeat, starting one further along each time, so that drift in
    the machine's speed and the allocator's state left by the previous fn hit them alike."""
    do = torch.ones(1, inputs[0].shape[1], inputs[0].shape[2], inputs[2].shape[3])
    times = [([], []) for _ in fns]
    for i in range(warmup + repeats):
        turn = [(i + j) % len(fns) for j in range(len(fns))]
        for fn, (fwd, bwd) in ((fns[j], times[j]) for j in turn):
            for t in inputs:
                if t is not None:
                    t.grad = None
            dist.barrier(group)
            start = time.perf_counter()
            o = fn(*inputs)
            forward = time.perf_counter() - start
            dist.barrier(group)
            start = time.perf_counter()
            o.backward(do)
            backward = time.perf_counter() - start
            slowest = torch.tensor([forward, backward], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
            if i >= warmup:
                fwd.append(slowest[0].item())
                bwd.append(slowest[1].item())
    return [(1e3 * statistics.median(fwd), 1e3 * statistics.median(bwd)) for fwd, bwd in times]


def _accepts(spec, decay: str, H: int, world: int) -> bool:
    try:
        spec.check_rules(spec.name, decay, H, H, world)
    except ValueError:
        return False
    return True


def _under(policy_name, fn):
    """fn run under a device policy (its backward keeps the policy its forward ran under)."""
    from lasp2.ops import policy

    def call(*args):
        with policy(policy_name):
            return fn(*args)

    return call


def _worker(rank, world, port, methods, decays, C, H, D, repeats, warmup, out_path, policies):
    from lasp2.ops import chunk_linear_attn
    from lasp2.parallel import LINEAR_METHODS

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=900))
    group = dist.group.WORLD
    rows = []
    for decay in decays:
        inputs = _inputs(decay, C, H, D, seed=rank)
        usable = [(m, p) for m in methods if _accepts(LINEAR_METHODS[m], decay, H, world) for p in policies]
        fns = [lambda q, k, v, g: chunk_linear_attn(q, k, v, g)[0]]
        fns += [_under(p, lambda q, k, v, g, fn=LINEAR_METHODS[m].fn: fn(q, k, v, g, group=group)) for m, p in usable]
        alone, *measured = _time_passes(fns, inputs, group, repeats, warmup)
        for (method, policy), sp in zip(usable, measured):
            rows.append(dict(method=method, policy=policy, decay=decay, world=world, tokens_per_rank=C, sp_fwd_ms=sp[0],
                             alone_fwd_ms=alone[0], fwd_ratio=sp[0] / alone[0], sp_bwd_ms=sp[1], alone_bwd_ms=alone[1],
                             bwd_ratio=sp[1] / alone[1]))
            if rank == 0:
                r = rows[-1]
                print(f"  W={world} {method:9s} {policy:4s} {decay:8s} fwd {r['sp_fwd_ms']:8.1f} / {r['alone_fwd_ms']:8.1f} ms = "
                      f"{r['fwd_ratio']:.2f}   bwd {r['sp_bwd_ms']:8.1f} / {r['alone_bwd_ms']:8.1f} ms = {r['bwd_ratio']:.2f}",
                      flush=True)
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))
    dist.destroy_process_group()


# glibc settings that keep freed memory in the heap: without them every large temporary is
# mapped afresh and page-faulted in, a cost that depends on what ran before and swamps the
# methods' own differences (see benchmarks/README.md, bench_ops).
HEAP_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
               "MALLOC_TOP_PAD_": "1073741824"}


def run(worlds, methods, decays, C: int, H: int = 8, D: int = 64, repeats: int = 7, warmup: int = 1,
        heap: bool = False, policies=("cpu",)) -> list[dict]:
    """heap: start the ranks with HEAP_MALLOC (glibc reads it when a process starts); policies:
    the device policies each method runs under, side by side."""
    rows = []
    saved = {name: os.environ.get(name) for name in HEAP_MALLOC}
    if heap:
        os.environ.update(HEAP_MALLOC)
    try:
        for world in worlds:
            with tempfile.TemporaryDirectory() as tmp:
                out_path = os.path.join(tmp, "rows.json")
                mp.spawn(_worker, args=(world, free_port(), methods, decays, C, H, D, repeats, warmup, out_path,
                                        tuple(policies)),
                         nprocs=world, join=True)
                rows += [dict(r, heap=heap) for r in json.loads(Path(out_path).read_text())]
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return rows


def print_table(rows, stream) -> None:
    head = (f"{'method':9s} {'policy':6s} {'decay':8s} {'W':>2s} {'C':>6s} {'fwd sp ms':>10s} {'alone':>8s} {'ratio':>6s} "
            f"{'bwd sp ms':>10s} {'alone':>8s} {'ratio':>6s}")
    heap = " freed memory kept in the heap;" if rows and rows[0].get("heap") else ""
    stream.write(f"\nsequence parallel vs the same tokens per rank alone, side by side (one thread per rank;{heap} "
                 "medians, slowest rank)\n")
    stream.write(head + "\n" + "-" * len(head) + "\n")
    for r in rows:
        stream.write(f"{r['method']:9s} {r.get('policy', 'cpu'):6s} {r['decay']:8s} {r['world']:2d} {r['tokens_per_rank']:6d} {r['sp_fwd_ms']:10.1f} "
                     f"{r['alone_fwd_ms']:8.1f} {r['fwd_ratio']:6.2f} {r['sp_bwd_ms']:10.1f} {r['alone_bwd_ms']:8.1f} "
                     f"{r['bwd_ratio']:6.2f}\n")

