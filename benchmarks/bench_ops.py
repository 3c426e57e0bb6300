"""Speed of chunk_linear_attn and chunk_delta_rule next to an ideal matmul-bound implementation
("% of roofline").

    python benchmarks/bench_ops.py                    # B=1, H=8, K=V=64, T in {2K, 8K, 32K}, fp32
    python benchmarks/bench_ops.py --T 8192 --forms none --repeats 9
    python benchmarks/bench_ops.py --T 2048 8192 --forms deltanet gated_deltanet kda
    python benchmarks/bench_ops.py --T 8192 --documents 16   # + the same row packed as 16 documents
    python benchmarks/bench_ops.py --T 8192 --policy cpu cuda --compile   # each device policy, eager and compiled

The ideal time is FLOPs / (fp32 matmul throughput measured in the same run on a large square
matmul). FLOPs are those of the chunked algorithm at chunk 64, counted as matmuls only: per
token and head 2*64*(K+V) (intra-chunk QK^T and AV) + 4*K*V (state update and readout) in the
forward, and twice that in the backward (fwd+bwd = 3x forward). The delta rule (forms deltanet,
gated_deltanet, kda: `chunk_delta_rule` with no gate, a gate per head, a gate per key channel)
counts per token and head 2*64*(4K+2V) (the q.k and k.k scores, W, U, Qe = Q - PW, PU) +
2*64^2/3 (the triangular inverse) + 6*K*V (the state carried and read out), also at chunk 64
(KDA runs chunks of 16, so its share of the roofline is lower). Times are medians of --repeats
runs after --warmup runs. --policy runs each op under the given device policies
(`lasp2.ops.policy`); --compile also times it compiled (torch.compile(fullgraph=True), the
default inductor backend), with the seconds its first forward and fwd+bwd took to compile.
--matmuls-alone replays the batched matmuls of one eager fwd+bwd (every bmm / baddbmm / mm /
addmm with its operands' shapes, strides and dtypes, on fresh tensors) and times them alone: the
share of the time spent in matmuls, and the ceiling, the % of roofline the op would reach if
everything else were free (64 x 64 batched matmuls run well below a large square one).
Prints a table and writes a CSV under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lasp2_bench.documents import packed_offsets
from lasp2_bench.machine import cpu_name
from lasp2.ops import chunk_delta_rule, chunk_linear_attn, policy
from torch.utils._python_dispatch import TorchDispatchMode

DELTA_GATES = {"deltanet": None, "gated_deltanet": "token", "kda": "channel"}
FORMS = ("none", "head", "token", "channel", *DELTA_GATES)
REFERENCE_CHUNK = 64


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, warmup, repeats) -> tuple[float, float, float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def matmul_flops_per_s(device, warmup, repeats) -> float:
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    t, _, _ = median_time(lambda: a @ b, device, warmup, repeats)
    return 2 * n**3 / t


def forward_flops(form, B, T, H, K, V) -> float:
    L = REFERENCE_CHUNK
    if form in DELTA_GATES:
        return B * H * T * (2 * L * (4 * K + 2 * V) + 2 * L * L / 3 + 6 * K * V)
    return B * H * T * (2 * L * (K + V) + 4 * K * V)


def make_inputs(form, B, T, H, K, V, device, dtype):
    """The op's tensor arguments in order, leaves that require grad."""
    q, k, v = (torch.randn(B, T, H, d, device=device, dtype=dtype) for d in (K, K, V))
    gate = DELTA_GATES.get(form, form)
    shape = {None: None, "none": None, "head": (H,), "token": (B, T, H), "channel": (B, T, H, K)}[gate]
    g = None if shape is None else F.logsigmoid(torch.randn(*shape, device=device) + 3)
    if form in DELTA_GATES:  # L2-normalised keys and beta in (0, 1), as the layers make them
        inputs = (q, F.normalize(k.float(), dim=-1).to(dtype), v, torch.rand(B, T, H, device=device, dtype=dtype), g)
    else:
        inputs = (q, k, v, g)
    return [None if t is None else t.requires_grad_() for t in inputs]


MATMULS = (torch.ops.aten.bmm, torch.ops.aten.baddbmm, torch.ops.aten.mm, torch.ops.aten.addmm)


class _RecordMatmuls(TorchDispatchMode):
    """Records every matmul as (op, its arguments with each tensor as (shape, stride, dtype))."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in MATMULS:
            describe = lambda a: ("tensor", a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a  # noqa: E731
            self.calls.append((func, [describe(a) for a in args], {n: describe(a) for n, a in kwargs.items()}))
        return func(*args, **kwargs)


def matmuls_alone(fwd_bwd, device, warmup, repeats) -> tuple[float, float, float]:
    """The matmuls one call of fwd_bwd issues, replayed alone on fresh tensors: (median, min, max)."""
    with _RecordMatmuls() as log:
        fwd_bwd()

    def make(a):
        if not (isinstance(a, tuple) and a and a[0] == "tensor"):
            return a
        return torch.empty_strided(a[1], a[2], dtype=a[3], device=device).normal_()

    replay = [(func, [make(a) for a in args], {n: make(a) for n, a in kwargs.items()}) for func, args, kwargs in log.calls]
    return median_time(lambda: [func(*args, **kwargs) for func, args, kwargs in replay], device, warmup, repeats)


def bench(form, B, T, H, K, V, device, dtype, warmup, repeats, cu_seqlens=None, compiled=False, alone=False):
    """((fwd median, min, max), (fwd+bwd median, min, max), seconds to compile or None, fwd+bwd's
    matmuls alone (median, min, max) or None); alone: also time the matmuls alone (eager)."""
    inputs = make_inputs(form, B, T, H, K, V, device, dtype)
    op = chunk_delta_rule if form in DELTA_GATES else chunk_linear_attn
    kw = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}

    def run(*args):
        return op(*args, **kw)[0]

    if compiled:
        torch._dynamo.reset()
        run = torch.compile(run, fullgraph=True)
    do = torch.randn(B, T, H, V, device=device, dtype=dtype)

    def fwd_bwd():
        for t in inputs:
            if t is not None:
                t.grad = None
        run(*inputs).backward(do)

    compile_s = None
    if compiled:  # the first calls trace and compile (forward without grad; forward + backward)
        start = time.perf_counter()
        with torch.no_grad():
            run(*inputs)
        fwd_bwd()
        sync(device)
        compile_s = time.perf_counter() - start
    with torch.no_grad():
        fwd = median_time(lambda: run(*inputs), device, warmup, repeats)
    fb = median_time(fwd_bwd, device, warmup, repeats)
    return fwd, fb, compile_s, matmuls_alone(fwd_bwd, device, warmup, repeats) if alone and not compiled else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 32768], help="sequence lengths")
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS, help="log-decay forms")
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=8)
    parser.add_argument("--K", type=int, default=64)
    parser.add_argument("--V", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="input dtype (states are fp32 either way); the roofline stays fp32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--documents", type=int, default=0,
                        help="also time each row packed as this many documents (cu_seqlens; B must be 1)")
    parser.add_argument("--policy", nargs="+", default=[None], choices=["cpu", "cuda"],
                        help="device policies to run under (default: the device's own)")
    parser.add_argument("--compile", action="store_true", help="also time each op compiled (torch.compile, fullgraph)")
    parser.add_argument("--matmuls-alone", action="store_true",
                        help="also time each eager fwd+bwd's matmuls alone (share of the time, roofline ceiling)")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default benchmarks/results/ops-<date>-<device>.csv)")
    args = parser.parse_args()
    device = torch.device(args.device)

    peak = matmul_flops_per_s(device, args.warmup, args.repeats)
    name = device_name(device)
    print(f"device {name}, torch {torch.__version__}, threads {torch.get_num_threads()}, inputs {args.dtype}, "
          f"fp32 matmul {peak / 1e9:.1f} GFLOP/s (median, measured now)")
    header = f"{'decay':14s} {'policy':6s} {'mode':8s} {'T':>6s} {'fwd ms':>9s} {'fwd %roof':>9s} {'fwd+bwd ms':>11s} " \
             f"{'f+b %roof':>9s} {'compile s':>9s}"
    if args.matmuls_alone:
        header += f" {'matmuls ms':>10s} {'in matmuls':>10s} {'ceiling':>8s}"
    if args.documents:
        header += f" {'packed f+b ms':>13s} {'packed/plain':>12s}"
    print(header)
    print("-" * len(header))
    rows = []
    dtype = getattr(torch, args.dtype)
    for form in args.forms:
        for T in args.T:
            for chosen in args.policy:
                for compiled in (False, True) if args.compile else (False,):
                    with policy(chosen or device.type):
                        (f_med, f_min, f_max), (fb_med, fb_min, fb_max), compile_s, alone = bench(
                            form, args.B, T, args.H, args.K, args.V, device, dtype, args.warmup, args.repeats,
                            compiled=compiled, alone=args.matmuls_alone)
                    flops = forward_flops(form, args.B, T, args.H, args.K, args.V)
                    f_roof, fb_roof = flops / peak / f_med, 3 * flops / peak / fb_med
                    mode = "compiled" if compiled else "eager"
                    shown = "-" if compile_s is None else f"{compile_s:.1f}"
                    line = (f"{form:14s} {chosen or device.type:6s} {mode:8s} {T:6d} {f_med * 1e3:9.1f} "
                            f"{100 * f_roof:8.0f}% {fb_med * 1e3:11.1f} {100 * fb_roof:8.0f}% {shown:>9s}")
                    matmul_ms = ceiling = None
                    if args.matmuls_alone:
                        matmul_ms = None if alone is None else alone[0] * 1e3
                        ceiling = None if alone is None else 3 * flops / peak / alone[0]
                        line += (f" {'-':>10s} {'-':>10s} {'-':>8s}" if alone is None else
                                 f" {matmul_ms:10.1f} {100 * alone[0] / fb_med:9.0f}% {100 * ceiling:7.0f}%")
                    packed_ms = None
                    if args.documents:
                        with policy(chosen or device.type):
                            _, (packed_med, _, _), _, _ = bench(form, args.B, T, args.H, args.K, args.V, device, dtype,
                                                             args.warmup, args.repeats,
                                                             packed_offsets(T, args.documents, device), compiled)
                        packed_ms = packed_med * 1e3
                        line += f" {packed_ms:13.1f} {packed_med / fb_med:12.2f}"
                    print(line, flush=True)
                    rows.append(dict(documents=args.documents, packed_fwd_bwd_ms_median=packed_ms, decay=form,
                                     policy=chosen or device.type, mode=mode, compile_s=compile_s, dtype=args.dtype,
                                     T=T, B=args.B, H=args.H, K=args.K, V=args.V, device=name,
                                     fwd_ms_median=f_med * 1e3, fwd_ms_min=f_min * 1e3, fwd_ms_max=f_max * 1e3,
                                     fwd_bwd_ms_median=fb_med * 1e3, fwd_bwd_ms_min=fb_min * 1e3,
                                     fwd_bwd_ms_max=fb_max * 1e3, fwd_roofline=f_roof, fwd_bwd_roofline=fb_roof,
                                     matmul_gflops=peak / 1e9, fwd_bwd_matmuls_alone_ms=matmul_ms,
                                     matmul_ceiling_roofline=ceiling))
    out = args.out or Path(__file__).parent / "results" / f"ops-{datetime.date.today()}-{device.type}-{args.dtype}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
