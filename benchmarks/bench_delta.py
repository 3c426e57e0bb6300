"""Speed of chunk_delta_rule (fwd+bwd) next to Hugging Face transformers' own pure-PyTorch
`torch_chunk_gated_delta_rule` (Qwen3-Next) on the same inputs, in the same run.

    python benchmarks/bench_delta.py                  # B=1, H=8, K=V=64, T in {2K, 8K}, fp32, Gated DeltaNet
    python benchmarks/bench_delta.py --gate none --T 8192

transformers is optional (`pip install transformers`): without it only lasp2's column is timed.
The two take turns within each repeat; times are medians of --repeats after --warmup. Both get
the same q, k (L2-normalised), v, beta, gate; lasp2 with scale K^-1/2, which HF applies inside.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from lasp2.ops import chunk_delta_rule


def hf_chunk_gated_delta_rule():
    try:
        from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule
    except ImportError:
        return None
    return torch_chunk_gated_delta_rule


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--gate", default="token", choices=["none", "token"], help="none (DeltaNet) or per head (GDN)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    hf = hf_chunk_gated_delta_rule()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32, B={args.B} H={args.H} K=V={args.D}, "
          f"gate {args.gate}; transformers {'found' if hf else 'not installed'}")
    print(f"{'T':>6s} {'lasp2 fwd+bwd s':>16s} {'HF fwd+bwd s':>13s} {'HF / lasp2':>10s}")
    for T in args.T:
        gen = torch.Generator().manual_seed(0)
        shape = (args.B, T, args.H, args.D)
        q, v = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
        k = torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)
        beta = torch.rand(args.B, T, args.H, generator=gen)
        g = -0.1 * torch.rand(args.B, T, args.H, generator=gen) if args.gate == "token" else torch.zeros(args.B, T, args.H)
        leaves = [t.requires_grad_() for t in (q, k, v, beta, g)]
        fns = {"lasp2": lambda: chunk_delta_rule(q, k, v, beta, g if args.gate == "token" else None,
                                                 scale=args.D ** -0.5)[0]}
        if hf is not None:
            fns["hf"] = lambda: hf(q, k, v, g, beta)[0]
        times = {name: [] for name in fns}
        for i in range(args.warmup + args.repeats):
            for name, fn in fns.items():
                for t in leaves:
                    t.grad = None
                start = time.perf_counter()
                fn().float().sum().backward()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        ours = statistics.median(times["lasp2"])
        theirs = statistics.median(times["hf"]) if hf is not None else float("nan")
        print(f"{T:6d} {ours:16.3f} {theirs:13.3f} {theirs / ours:10.2f}")


if __name__ == "__main__":
    main()
