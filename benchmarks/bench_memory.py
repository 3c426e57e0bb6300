"""What each single-device op keeps for its backward, with and without activation checkpointing.

    python benchmarks/bench_memory.py                       # T=8K, B=1, H=4, K=V=64, fp32 and bf16
    python benchmarks/bench_memory.py --T 2048 --ops kda softmax --policies cpu cuda

For each op, dtype and mode, the bytes a forward leaves allocated beyond its output (what its
autograd graph holds until the backward: saved tensors and anything kept on the side), measured
by torch's CPU allocator through the profiler (`lasp2.ops.counting.count_memory`), as a multiple
of the inputs' bytes and per token and head; and the fwd+bwd time (median of --repeats after
--warmup) in the same run. "checkpointed" wraps the op in torch.utils.checkpoint (non-reentrant),
whose saved-tensor hooks drop everything saved through save_for_backward until the backward
recomputes it: what remains is what an op keeps elsewhere. --policies runs each op under the
given device policies (lasp2.ops.policy; what the delta rule keeps differs). Writes memory.csv under
benchmarks/results/<date>-<device>/ or --out.
"""
from __future__ import annotations

import argparse
import csv
import gc
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lasp2.ops import chunk_delta_rule, chunk_linear_attn, policy
from lasp2.ops.conv import causal_conv1d
from lasp2.ops.counting import count_memory
from lasp2.ops.softmax_attn import softmax_attn
from lasp2_bench.machine import results_dir

OPS = ("none", "head", "token", "channel", "deltanet", "gated_deltanet", "kda", "softmax", "conv")
FIELDS = ["op", "policy", "dtype", "mode", "T", "H", "D", "inputs_mb", "held_mb", "held_over_inputs", "held_bytes_per_token_head",
          "fwd_bwd_ms"]


def op_and_inputs(op: str, B: int, T: int, H: int, D: int, dtype: torch.dtype):
    """(fn(*inputs) -> output, inputs as leaves that require grad)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = randn(B, T, H, D), randn(B, T, H, D), randn(B, T, H, D)
    if op == "softmax":
        inputs = [q, k, v]
        fn = lambda q, k, v: softmax_attn(q, k, v)  # noqa: E731
    elif op == "conv":
        inputs = [randn(B, T, 3 * H * D), randn(3 * H * D, 4)]
        fn = lambda x, w: causal_conv1d(x, w)  # noqa: E731
    elif op in ("none", "head", "token", "channel"):
        shape = {"none": None, "head": (H,), "token": (B, T, H), "channel": (B, T, H, D)}[op]
        g = None if shape is None else F.logsigmoid(torch.randn(*shape, generator=gen) + 3).to(dtype)
        inputs = [q, k, v] + ([] if g is None else [g])
        fn = lambda q, k, v, g=None: chunk_linear_attn(q, k, v, g)[0]  # noqa: E731
    else:
        k = F.normalize(k.float(), dim=-1).to(dtype)
        beta = torch.rand(B, T, H, generator=gen).to(dtype)
        shape = {"deltanet": None, "gated_deltanet": (B, T, H), "kda": (B, T, H, D)}[op]
        g = None if shape is None else (-0.1 * torch.rand(*shape, generator=gen)).to(dtype)
        inputs = [q, k, v, beta] + ([] if g is None else [g])
        fn = lambda q, k, v, beta, g=None: chunk_delta_rule(q, k, v, beta, g, scale=D ** -0.5)[0]  # noqa: E731
    return fn, [t.requires_grad_() for t in inputs]


def held_bytes(fn, inputs) -> int:
    gc.collect()
    out = None
    with count_memory() as held:
        out = fn(*inputs)
    return held.bytes - out.numel() * out.element_size()


def fwd_bwd_ms(fn, inputs, repeats: int, warmup: int) -> float:
    times = []
    for i in range(warmup + repeats):
        for t in inputs:
            t.grad = None
        start = time.perf_counter()
        fn(*inputs).float().sum().backward()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def checkpointed(fn):
    return lambda *inputs: checkpoint(fn, *inputs, use_reentrant=False)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--policies", nargs="+", default=["cpu"], choices=["cpu", "cuda"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, B={args.B} T={args.T} H={args.H} "
          f"K=V={args.D}: bytes a forward leaves allocated beyond its output, until its backward")
    head = (f"{'op':15s} {'policy':6s} {'dtype':9s} {'mode':13s} {'inputs MB':>9s} {'held MB':>8s} {'x inputs':>8s} "
            f"{'B/token/head':>12s} {'fwd+bwd ms':>10s}")
    print(head + "\n" + "-" * len(head))
    rows = []
    for op, policy_name, dtype_name in ((o, p, d) for o in args.ops for p in args.policies for d in args.dtypes):
        fn, inputs = op_and_inputs(op, args.B, args.T, args.H, args.D, getattr(torch, dtype_name))
        in_bytes = sum(t.numel() * t.element_size() for t in inputs)
        for mode, run in (("plain", fn), ("checkpointed", checkpointed(fn))):
            with policy(policy_name):
                held = held_bytes(run, inputs)
                ms = fwd_bwd_ms(run, inputs, args.repeats, args.warmup)
            row = dict(op=op, policy=policy_name, dtype=dtype_name, mode=mode, T=args.T, H=args.H, D=args.D,
                       inputs_mb=round(in_bytes / 2**20, 2), held_mb=round(held / 2**20, 2),
                       held_over_inputs=round(held / in_bytes, 3),
                       held_bytes_per_token_head=round(held / (args.B * args.T * args.H), 1), fwd_bwd_ms=round(ms, 1))
            rows.append(row)
            print(f"{op:15s} {policy_name:6s} {dtype_name:9s} {mode:13s} {row['inputs_mb']:9.1f} {row['held_mb']:8.1f} "
                  f"{row['held_over_inputs']:8.2f} {row['held_bytes_per_token_head']:12.0f} {row['fwd_bwd_ms']:10.1f}",
                  flush=True)
    out = args.out or results_dir(torch.device("cpu"))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "memory.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out / 'memory.csv'}")


if __name__ == "__main__":
    main()
