"""lasp2's chunked ops next to every installed pure-PyTorch peer on the same recurrence, inputs and
machine, in one run: fwd and fwd+bwd medians, the peer / lasp2 ratio, % of the same-run matmul
roofline, and whether the outputs agree.

    python benchmarks/bench_peers.py                     # T=8K, B=1, H=8, K=V=64, fp32, every recurrence
    python benchmarks/bench_peers.py --T 2048 --repeats 3 --recurrences token gated_deltanet
    python benchmarks/bench_peers.py --recurrences none head token --groups 1   # as a Mamba2 layer calls SSD

Recurrences and their peers (transformers 5.24's own PyTorch paths; `pip install "lasp2[bench]"`
or transformers alone):
  none            no decay                     transformers' mamba2_chunk_scan with A = 0
  head            a constant decay per head    mamba2_chunk_scan with dt = 1 (lightning, retention)
  token           a decay per head and token   mamba2_chunk_scan (SimpleGLA / Mamba2's SSD)
  channel         a gate per key channel (GLA) FLA's naive chunk_gla (needs fla, triton, packaging)
  deltanet        the delta rule               transformers' torch_chunk_gated_delta_rule with g = 0
  gated_deltanet  the gated delta rule         torch_chunk_gated_delta_rule (Qwen3-Next)
  kda             per-channel gated delta      transformers' chunk_kimi_delta_attention (Kimi Linear)
A peer that is not installed is skipped with a line saying so. Every op gets the same raw inputs
and computes what its layer would from them (SSD: v = x dt and log decay A dt; the delta rule:
L2-normalised keys, scale K^-1/2), at chunk 64. --groups G (SSD rows only) hands B and C over as
a Mamba2 layer does, [B, T, G, N] with G groups shared by the heads: each op expands them over the
heads inside the timing (transformers' repeat_interleave; lasp2 an expand, a view for one group,
which its chunked layout copies), and the gradient sums back over the heads. The ops take turns within each repeat; times are
medians of --repeats after --warmup. The roofline is lasp2's chunked FLOPs (bench_ops.py) over the
fp32 matmul rate measured in this run, the same FLOPs for every op of a row. Writes a CSV and a
bar chart (with matplotlib) under benchmarks/results/<date>-<device>/ or --out.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_ops import forward_flops, matmul_flops_per_s
from lasp2.ops import chunk_delta_rule, chunk_linear_attn
from lasp2_bench.machine import results_dir

RECURRENCES = ("none", "head", "token", "channel", "deltanet", "gated_deltanet", "kda")
CHUNK = 64
AGREE = 1e-3  # relative difference of the outputs (different fp32 algorithms of the same math)


def inputs_for(recurrence: str, B: int, T: int, H: int, D: int, groups: int | None = None) -> dict:
    """Raw inputs as a layer hands them over (leaves that require grad); groups: SSD's B and C
    (k and q here) with that many groups shared by the heads."""
    gen = torch.Generator().manual_seed(0)
    grouped = groups is not None and recurrence in ("none", "head", "token")
    q, k = (torch.randn(B, T, groups if grouped else H, D, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, D, generator=gen)
    x = dict(q=q, k=k, v=v)
    if recurrence in ("none", "head", "token"):  # SSD: v = x dt, log decay A dt
        x["dt"] = torch.ones(B, T, H) if recurrence != "token" else F.softplus(torch.randn(B, T, H, generator=gen) - 2)
        x["A"] = torch.zeros(H) if recurrence == "none" else -torch.linspace(0.02, 0.3, H)
    elif recurrence == "channel":
        x["g"] = F.logsigmoid(torch.randn(B, T, H, D, generator=gen) + 3) / 16
    else:
        x["k"] = F.normalize(k, dim=-1)
        x["beta"] = torch.rand(B, T, H, generator=gen)
        if recurrence == "gated_deltanet":
            x["g"] = -0.1 * torch.rand(B, T, H, generator=gen)
        elif recurrence == "kda":
            x["g"] = -0.1 * torch.rand(B, T, H, D, generator=gen)
    return {name: t.requires_grad_() for name, t in x.items()}


def lasp2_op(recurrence: str):
    """lasp2's op on the raw inputs -> o [B, T, H, V]."""
    if recurrence in ("none", "head", "token"):
        def ssd(x):
            decay = None if recurrence == "none" else x["A"] if recurrence == "head" else x["A"] * x["dt"]
            heads = x["v"].shape[2]
            q, k = (t.unsqueeze(3).expand(*t.shape[:3], heads // t.shape[2], t.shape[3]).flatten(2, 3)
                    for t in (x["q"], x["k"]))  # group g serves heads g·H/G ..; a view for one group
            return chunk_linear_attn(q, k, x["v"] * x["dt"][..., None], decay, scale=1.0, chunk_size=CHUNK)[0]
        return ssd
    if recurrence == "channel":
        return lambda x: chunk_linear_attn(x["q"], x["k"], x["v"], x["g"], chunk_size=CHUNK)[0]
    return lambda x: chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], x.get("g"), scale=x["q"].shape[-1] ** -0.5,
                                      chunk_size=CHUNK)[0]


def peers_for(recurrence: str) -> tuple[dict, list[str]]:
    """({peer name: fn(inputs) -> o}, [lines for peers that are not installed])."""
    found, missing = {}, []
    if recurrence in ("none", "head", "token"):
        try:
            from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan
        except ImportError:
            missing.append("transformers mamba2_chunk_scan: transformers is not installed")
        else:  # B = k, C = q, x = v; A a scalar per head, dt per token
            found["hf mamba2_chunk_scan"] = lambda x: mamba2_chunk_scan(x["v"], x["dt"], x["A"], x["k"], x["q"], CHUNK)
    elif recurrence == "channel":
        try:
            from fla.ops.gla.naive import naive_recurrent_gla  # noqa: F401  (FLA's reference; imports triton)
            from fla.ops.gla.naive import naive_chunk_gla
        except ImportError as exc:
            missing.append(f"FLA naive_chunk_gla: {exc} (pip install flash-linear-attention triton packaging)")
        else:
            found["fla naive_chunk_gla"] = lambda x: naive_chunk_gla(x["q"], x["k"], x["v"], x["g"])[0]
    elif recurrence in ("deltanet", "gated_deltanet"):
        try:
            from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule
        except ImportError:
            missing.append("transformers torch_chunk_gated_delta_rule: transformers is not installed")
        else:
            found["hf torch_chunk_gated_delta_rule"] = lambda x: torch_chunk_gated_delta_rule(
                x["q"], x["k"], x["v"], x["g"] if "g" in x else torch.zeros_like(x["beta"]), x["beta"], CHUNK)[0]
    elif recurrence == "kda":
        try:
            from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention
        except ImportError:
            missing.append("transformers chunk_kimi_delta_attention: transformers is not installed")
        else:
            found["hf chunk_kimi_delta_attention"] = lambda x: chunk_kimi_delta_attention(
                x["q"], x["k"], x["v"], x["g"], x["beta"], CHUNK)[0]
    return found, missing


def time_ops(ops: dict, x: dict, warmup: int, repeats: int) -> dict:
    """{name: (fwd s, fwd+bwd s)} medians; the ops take turns within each repeat."""
    do = torch.randn_like(x["v"])
    fwd, both = {n: [] for n in ops}, {n: [] for n in ops}
    for i in range(warmup + repeats):
        for name, op in ops.items():
            with torch.no_grad():
                start = time.perf_counter()
                op(x)
                elapsed = time.perf_counter() - start
            for t in x.values():
                t.grad = None
            start = time.perf_counter()
            op(x).backward(do)
            if i >= warmup:
                fwd[name].append(elapsed)
                both[name].append(time.perf_counter() - start)
    return {n: (statistics.median(fwd[n]), statistics.median(both[n])) for n in ops}


def roofline_form(recurrence: str) -> str:
    return {"head": "head", "token": "token", "channel": "channel"}.get(recurrence, recurrence)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--D", type=int, default=64, help="K = V")
    p.add_argument("--recurrences", nargs="+", default=list(RECURRENCES), choices=RECURRENCES)
    p.add_argument("--groups", type=int, default=None,
                   help="SSD rows: B and C in this many groups, expanded over the heads inside the timing")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results/<date>-<device>)")
    args = p.parse_args()
    device = torch.device("cpu")
    peak = matmul_flops_per_s(device, 2, 5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, B={args.B} T={args.T} H={args.H} "
          f"K=V={args.D}, chunk {CHUNK}; fp32 matmul {peak / 1e9:.1f} GFLOP/s (this run)")
    head = f"{'recurrence':15s} {'op':32s} {'fwd ms':>8s} {'f+b ms':>8s} {'f+b %roof':>9s} {'peer/lasp2':>10s} {'agree':>8s}"
    print(head + "\n" + "-" * len(head))
    rows = []
    for recurrence in args.recurrences:
        peers, missing = peers_for(recurrence)
        for line in missing:
            print(f"{recurrence:15s} skipped {line}")
        x = inputs_for(recurrence, args.B, args.T, args.H, args.D, args.groups)
        ops = {"lasp2": lasp2_op(recurrence), **peers}
        with torch.no_grad():
            ours = ops["lasp2"](x)
            agree = {n: ((op(x) - ours).norm() / ours.norm()).item() for n, op in ops.items()}
        times = time_ops(ops, x, args.warmup, args.repeats)
        flops = 3 * forward_flops(roofline_form(recurrence), args.B, args.T, args.H, args.D, args.D)
        for name, (fwd, both) in times.items():
            row = dict(recurrence=recurrence, op=name, T=args.T, groups=args.groups, fwd_ms=fwd * 1e3, fwd_bwd_ms=both * 1e3,
                       fwd_bwd_roofline=flops / peak / both, ratio_to_lasp2=both / times["lasp2"][1],
                       relative_difference=agree[name], matmul_gflops=peak / 1e9)
            rows.append(row)
            print(f"{recurrence:15s} {name:32s} {fwd * 1e3:8.1f} {both * 1e3:8.1f} {100 * row['fwd_bwd_roofline']:8.0f}% "
                  f"{row['ratio_to_lasp2']:10.2f} {agree[name]:8.1e}" + ("" if agree[name] <= AGREE else "  DIFFERS"))
    out = args.out or results_dir(device)
    out.mkdir(parents=True, exist_ok=True)
    name = "peers.csv" if args.groups is None else f"peers-groups{args.groups}.csv"
    with (out / name).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out / name}" + (f", {name[:-4]}.png" if plot(rows, out / f"{name[:-4]}.png", args.T) else ""))


def plot(rows, path: Path, T: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    recurrences = list(dict.fromkeys(r["recurrence"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(recurrences) + 2, 4))
    for i, recurrence in enumerate(recurrences):
        mine = [r for r in rows if r["recurrence"] == recurrence]
        width = 0.8 / len(mine)
        for j, r in enumerate(mine):
            ax.bar(i + (j - (len(mine) - 1) / 2) * width, r["fwd_bwd_ms"], width,
                   color="tab:blue" if r["op"] == "lasp2" else "tab:gray")
            ax.text(i + (j - (len(mine) - 1) / 2) * width, r["fwd_bwd_ms"], r["op"].split()[0], ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(range(len(recurrences)), recurrences)
    ax.set_ylabel("fwd+bwd ms (median)")
    ax.set_title(f"lasp2 (blue) and pure-PyTorch peers, T={T}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()
