"""`python -m lasp2_bench project`: the α–β cost model of lasp2_bench.costs, checked two ways.

1. --calibrate ATTN_CSV: predicts every measured `attn` row (W > 1) from that run's own
   calibration (the group's all-gather and point-to-point α/β, the per-rank matmul rate, and
   the share of it each kernel reached on one rank) and prints predicted vs measured.
2. Against the paper (always): Linear-Llama3-1B (the `1b` preset, pure basic linear attention),
   batch 1, SP = all GPUs, DGX-A100 nodes. Two unknowns (a fixed per-step overhead and the
   model FLOP utilisation) are fitted to the two 16-GPU cells of the paper's scalability table;
   the other cells and the LASP-1 / Ring gains are predictions. Every assumption is printed.
3. The state-passing exchanges at scale (always): LASP-2's all-gather, LASP-1's chain, allscan's
   pipelined chain and logscan's recursive doubling, 8 to 256 GPUs, against ZeCO's measured
   collective times (arXiv 2507.01004: two cells fit the network, two are predictions), and where
   each wins as W, the state and the network vary (exchanges.csv, exchanges.png).
"""
from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

from lasp2.model import count_parameters, preset
from lasp2.parallel import DELTA_METHODS, LINEAR_METHODS, SOFTMAX_METHODS, Problem
from lasp2.parallel import cost as costs
from .machine import read_csv, write_csv
from .plots import NO_MATPLOTLIB, pyplot

# The paper's scalability table (LASP-2, basic LA, 1B): (GPUs, tokens, tokens/s).
PAPER_CELLS = [(16, 2048, 1254), (16, 262144, 135635), (64, 131072, 67344), (64, 1048576, 442221), (128, 2097152, 769030)]
FIT_CELLS = PAPER_CELLS[:2]
# LASP-2's throughput gain over each baseline, 64 GPUs: (tokens, baseline, gain).
PAPER_GAINS = [(524288, "lasp1", 0.073), (524288, "ring", 0.178), (2097152, "lasp1", 0.152), (2097152, "ring", 0.366)]

A100 = dict(peak_flops=312e12, ranks_per_node=8, alpha_intra=10e-6, beta_intra=0.8 * 300e9, alpha_inter=20e-6,
            beta_inter=0.8 * 25e9, grad_bytes=2, state_bytes=4)
ASSUMPTIONS = [
    "A100 bf16 dense peak 312 TFLOP/s; FLOPs = 6 x matmul parameters per token (embedding lookup excluded, output "
    "head included) + the attention kernels' matmul FLOPs (chunk 64, K = V = 128, 16 heads, x3 for fwd+bwd)",
    "NVSwitch: 300 GB/s per GPU per direction, 80% achieved, alpha 10 us; InfiniBand HDR 200 Gb/s per GPU "
    "(25 GB/s), 80% achieved, alpha 20 us; 8 GPUs per node; a ring collective runs at its slowest link",
    "LASP-2 states travel in fp32 (B*H*K*V*4 bytes = 1 MiB per rank per layer and pass); gradients are "
    "all-reduced once per step in bf16 over all ranks (ring: 2(W-1) steps of P*2/W bytes)",
    "LASP-2 overlaps its all-gather with the intra-chunk compute; LASP-1's W-1 dependent hops per pass lie on "
    "the last rank's critical path, overlapped only with its intra-chunk compute",
    "Ring Attention as the paper describes its linear-attention baseline: masked (Q K^T) V per travelling K/V "
    "block (quadratic; backward recomputes, x3.5), each hop overlapped with a block's compute",
    "fitted: a fixed per-step overhead (optimizer, launches, data) and one model FLOP utilisation, from the "
    "two 16-GPU cells; every other figure is a prediction",
]


def add_arguments(p) -> None:
    p.add_argument("--calibrate", type=Path, default=None, metavar="ATTN_CSV",
                   help="an attn.csv (with attn-calibration.json beside it) to predict and compare")


# ---- this machine: predicted vs measured attention layers -------------------------------------------


def calibrate_local(attn_csv: Path, stream) -> list[dict]:
    calib = {c["world"]: c for c in json.loads(attn_csv.with_name(attn_csv.stem + "-calibration.json").read_text())}
    out = []
    for r in read_csv(attn_csv):
        world = int(r["world"])
        if r["status"] != "ok" or world == 1 or world not in calib:
            continue
        c = calib[world]
        net = costs.Network(c["allgather_alpha"], c["allgather_beta"], c["allgather_alpha"], c["allgather_beta"], world,
                            p2p_alpha=c["p2p_alpha"], p2p_beta=c["p2p_beta"])
        layer = Problem(B=1, N=int(r["T"]), W=world, S=1 if r["layout"] == "contiguous" else 2, H=8, K=64, V=64)
        spec = (LINEAR_METHODS if r["family"] == "linear" else SOFTMAX_METHODS)[r["method"]]
        pred = costs.layer_time(spec, layer, net, c["rate_" + costs.kernel(spec)])
        measured = float(r["median_ms"]) / 1e3
        out.append(dict(family=r["family"], method=r["method"], world=world, T=int(r["T"]), measured_s=measured,
                        predicted_s=pred["seconds"], comm_s=pred["comm_s"], ratio=pred["seconds"] / measured))
    stream.write(f"\nthis machine ({attn_csv}): predicted from the run's own calibration vs measured\n")
    stream.write(f"{'family':8s} {'method':10s} {'W':>2s} {'T':>7s} {'measured s':>11s} {'predicted s':>12s} {'comm s':>9s} {'pred/meas':>9s}\n")
    for o in out:
        stream.write(f"{o['family']:8s} {o['method']:10s} {o['world']:2d} {o['T']:7d} {o['measured_s']:11.3f} "
                     f"{o['predicted_s']:12.3f} {o['comm_s']:9.4f} {o['ratio']:9.2f}\n")
    if out:
        errs = sorted(abs(o["ratio"] - 1) for o in out)
        stream.write(f"median |pred/meas - 1| = {errs[len(errs) // 2]:.0%}, worst {errs[-1]:.0%} over {len(out)} rows\n")
    return out


# ---- the paper's cluster ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _model_terms() -> dict:
    cfg = preset("1b", layer_pattern="L", linear_kind="basic")
    params = count_parameters(cfg)
    return {"cfg": cfg, "params": params, "dense_flops_per_token": 6 * (params - cfg.vocab_size * cfg.hidden_size)}


def step_seconds(method: str, N: int, W: int, hw: dict, overhead: float, mfu: float, hop_extra: float = 0.0) -> dict:
    """Predicted seconds of one training step (batch 1, SP = W) and its parts."""
    terms = _model_terms()
    cfg, rate = terms["cfg"], hw["peak_flops"] * mfu
    net = costs.Network(hw["alpha_intra"], hw["beta_intra"], hw["alpha_inter"], hw["beta_inter"], hw["ranks_per_node"],
                        p2p_alpha=hw["alpha_intra"] + hop_extra)
    if hop_extra:
        net = replace(net, alpha_inter=hw["alpha_inter"] + hop_extra)
    layer = Problem(B=1, N=N, W=W, H=cfg.num_heads, K=cfg.dim_per_head, V=cfg.dim_per_head,
                    dtype_bytes=hw["state_bytes"], state_bytes=hw["state_bytes"])
    attn = costs.layer_time(LINEAR_METHODS[method], layer, net, rate)
    dense = terms["dense_flops_per_token"] * layer.C / rate
    alpha, beta = net.link(W)
    allreduce = 2 * (W - 1) * (alpha + terms["params"] * hw["grad_bytes"] / W / beta)
    total = overhead + dense + cfg.num_layers * attn["seconds"] + allreduce
    return {"seconds": total, "tokens_per_s": N / total, "attn_comm_s": cfg.num_layers * attn["comm_s"],
            "allreduce_s": allreduce, "compute_s": dense + cfg.num_layers * attn["compute_s"]}


def fit_overhead_mfu(hw: dict) -> tuple[float, float]:
    """(overhead, mfu) with which the model reproduces both fit cells exactly: for a given MFU
    the overhead follows from the first cell; bisect the MFU on the second (log scale)."""
    (w1, n1, tps1), (w2, n2, tps2) = FIT_CELLS

    def overhead_for(mfu):
        return n1 / tps1 - step_seconds("lasp2", n1, w1, hw, 0.0, mfu)["seconds"]

    lo, hi = 1e-3, 1e3
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        t2 = step_seconds("lasp2", n2, w2, hw, overhead_for(mid), mid)["seconds"]
        lo, hi = (lo, mid) if t2 < n2 / tps2 else (mid, hi)
    return overhead_for(lo), lo


def _gain(baseline: str, N: int, W: int, hw, overhead, mfu, hop_extra=0.0) -> float:
    ours = step_seconds("lasp2", N, W, hw, overhead, mfu)["seconds"]
    return step_seconds(baseline, N, W, hw, overhead, mfu, hop_extra)["seconds"] / ours - 1


def fit_hop_latency(hw, overhead, mfu, target=0.152, N=2097152, W=64) -> float:
    """Extra seconds per LASP-1 hop that make the model give the paper's gain at 2048K."""
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _gain("lasp1", N, W, hw, overhead, mfu, mid) < target else (lo, mid)
    return (lo + hi) / 2


def project_paper(stream, out: Path) -> list[dict]:
    hw = A100
    overhead, mfu = fit_overhead_mfu(hw)
    terms = _model_terms()
    stream.write("\nprojection to the paper's cluster (Linear-Llama3-1B, basic LA, batch 1, SP = GPUs)\nassumptions:\n")
    for a in ASSUMPTIONS:
        stream.write(f"  - {a}\n")
    stream.write(f"model: {terms['params'] / 1e9:.2f}B parameters, {terms['dense_flops_per_token'] / 1e9:.1f} GFLOP/token dense\n")
    stream.write(f"fitted: overhead {overhead:.3f} s/step, MFU {mfu:.1%} of the 1b preset's FLOPs\n")
    if mfu > 1:
        stream.write(f"  (above 100%: the paper's model does at most {1 / mfu:.0%} of this preset's FLOPs per token; its FFN "
                     "and vocabulary sizes are not stated, so read the MFU as a fitted seconds-per-token)\n")
    stream.write("\n")
    rows = []
    stream.write(f"{'GPUs':>4s} {'tokens':>8s} {'paper tok/s':>12s} {'model tok/s':>12s} {'error':>7s}  role\n")
    for W, N, tps in PAPER_CELLS:
        pred = step_seconds("lasp2", N, W, hw, overhead, mfu)["tokens_per_s"]
        role = "fit" if (W, N, tps) in FIT_CELLS else "predicted"
        rows.append(dict(kind="throughput", gpus=W, tokens=N, method="lasp2", paper=tps, model=pred, error=pred / tps - 1, role=role))
        stream.write(f"{W:4d} {N // 1024:7d}K {tps:12.0f} {pred:12.0f} {pred / tps - 1:+7.1%}  {role}\n")
    hop_extra = fit_hop_latency(hw, overhead, mfu)
    stream.write("\nLASP-2's gain over the baselines, 64 GPUs (paper vs model):\n")
    stream.write(f"{'tokens':>8s} {'baseline':>9s} {'paper':>7s} {'model':>9s} {'model, hop +{:.2f} ms'.format(hop_extra * 1e3):>20s}\n")
    for N, baseline, gain in PAPER_GAINS:
        plain = _gain(baseline, N, 64, hw, overhead, mfu)
        tuned = _gain(baseline, N, 64, hw, overhead, mfu, hop_extra) if baseline == "lasp1" else plain
        rows.append(dict(kind="gain", gpus=64, tokens=N, method=baseline, paper=gain, model=plain, error=plain - gain,
                         role="predicted"))
        if baseline == "lasp1":
            rows.append(dict(kind="gain_hop_fitted", gpus=64, tokens=N, method=baseline, paper=gain, model=tuned,
                             error=tuned - gain, role="fit" if N == 2097152 else "predicted"))
        stream.write(f"{N // 1024:7d}K {baseline:>9s} {gain:+7.1%} {plain:+9.1%} {tuned:+20.1%}\n")
    stream.write(f"(the last column adds {hop_extra * 1e3:.2f} ms to every LASP-1 hop, fitted to the paper's +15.2% at 2048K;"
                 " its 512K figure is a prediction)\n")
    table = []
    stream.write(f"\nprojected tokens/s, 64 GPUs:\n{'tokens':>8s} " + " ".join(f"{m:>12s}" for m in ("lasp2", "lasp1", "ring")) + "\n")
    for N in (2048, 8192, 32768, 131072, 524288, 1048576, 2097152):
        tps = {m: step_seconds(m, N, 64, hw, overhead, mfu)["tokens_per_s"] for m in ("lasp2", "lasp1", "ring")}
        table.append(dict(tokens=N, **tps))
        stream.write(f"{N // 1024:7d}K " + " ".join(f"{tps[m]:12.0f}" for m in ("lasp2", "lasp1", "ring")) + "\n")
    write_csv(out / "paper.csv", rows, ["kind", "gpus", "tokens", "method", "paper", "model", "error", "role"])
    write_csv(out / "paper-64gpu-table.csv", table, ["tokens", "lasp2", "lasp1", "ring"])
    plt = pyplot()
    if plt is None:
        stream.write(f"no paper.png ({NO_MATPLOTLIB})\n")
        return rows
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [t["tokens"] for t in sorted({t["tokens"]: t for t in table}.values(), key=lambda t: t["tokens"])]
    for m in ("lasp2", "lasp1", "ring"):
        ax.plot(xs, [next(t[m] for t in table if t["tokens"] == x) for x in xs], marker=".", label=f"model {m}, 64 GPUs")
    for W, N, tps in PAPER_CELLS:
        ax.scatter([N], [tps], marker="x", color="k")
        ax.annotate(f"paper {W} GPUs", (N, tps), fontsize=6)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per sequence")
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "paper.png", dpi=110)
    plt.close(fig)
    return rows


# ---- the exchanges at scale ------------------------------------------------------------------------

# ZeCO's measured collective times (1B GLA, H100): (method, GPUs, seconds).
ZECO_CELLS = [("lasp2", 8, 0.375e-3), ("lasp2", 256, 8.514e-3), ("allscan", 8, 0.226e-3), ("allscan", 256, 2.165e-3)]
ZECO_ALPHA = 5e-6  # s per message: NCCL's small-message latency (assumed)
# The layers whose exchanges are compared: (label, family, Problem fields), B = 1, fp32 states.
LAYERS = [("GLA-1B layer (H=4, K=256, V=512, diagonal)", "linear", dict(H=4, K=256, V=512, decay="channel")),
          ("KDA layer (H=32, K=V=128, dense K x K)", "delta", dict(H=32, Hkv=32, K=128, V=128, decay="channel")),
          ("small linear layer (H=16, K=V=64, scalar)", "linear", dict(H=16, K=64, V=64, decay="token"))]
SCALE_W = (2, 4, 8, 16, 32, 64, 128, 256)
EXCHANGES = ("lasp2", "lasp1", "allscan", "logscan")
ZECO_ASSUMPTIONS = [
    "ZeCO's 1B GLA as FLA configures GLA: hidden 2048, 4 heads, K = 256, V = 512 per head (expand_k 0.5, "
    "expand_v 1), B = 1: a state of 524,288 fp32 values (2 MiB) and K decays per head per layer",
    "one 'collective' = one layer's forward exchange: LASP-2's all-gather of (M, A), All-Scan's pipelined chain, "
    "which we model as allscan with P = 8 column blocks (ZeCO's block count is not stated)",
    "H100 nodes of 8 GPUs; one message step costs alpha = 5 us (NCCL's small-message latency) plus bytes / beta",
    "fitted from LASP-2's two cells: a fixed overhead per collective (launch and host synchronisation) and one "
    "effective bandwidth for every link (NCCL's ring runs at its slowest link); All-Scan's two cells are predictions",
]


def zeco_network() -> tuple[costs.Network, dict]:
    """The network that reproduces ZeCO's two LASP-2 cells exactly: t(W) = overhead + (W − 1)·(α +
    b / β), two equations in overhead and 1 / β."""
    label, family, fields = LAYERS[0]
    b = LINEAR_METHODS["lasp2"].calls(Problem(B=1, N=2 * 8, W=2, **fields))[0][0][1]  # one rank's (M, A) bytes
    (_, w1, t1), (_, w2, t2) = ZECO_CELLS[:2]
    per_step = (t2 - t1) / (w2 - w1)  # α + b / β
    beta = b / (per_step - ZECO_ALPHA)
    overhead = t1 - (w1 - 1) * per_step
    net = costs.Network(ZECO_ALPHA, beta, ZECO_ALPHA, beta, ranks_per_node=8, overhead=overhead)
    return net, {"overhead_s": overhead, "beta": beta, "payload_bytes": b}


def forward_exchange_seconds(spec, x: Problem, net: costs.Network) -> float:
    """One layer's forward exchange (what ZeCO times as one collective)."""
    forward_only = replace(spec, plan=replace(spec.plan, backward=()))
    return costs.comm_seconds(forward_only, x, net)


def project_exchanges(stream, out: Path) -> list[dict]:
    net, fitted = zeco_network()
    stream.write("\nthe state-passing exchanges at scale: ZeCO's measured collective times (arXiv 2507.01004)\nassumptions:\n")
    for a in ZECO_ASSUMPTIONS:
        stream.write(f"  - {a}\n")
    stream.write(f"fitted: overhead {fitted['overhead_s'] * 1e3:.3f} ms per collective, beta {fitted['beta'] / 1e9:.1f} GB/s "
                 f"({fitted['payload_bytes'] / 2**20:.2f} MiB per rank)\n")
    stream.write(f"{'exchange':>10s} {'GPUs':>5s} {'ZeCO ms':>8s} {'model ms':>9s} {'error':>7s}  role\n")
    rows = []
    _, _, fields = LAYERS[0]
    for i, (method, W, measured) in enumerate(ZECO_CELLS):
        model = forward_exchange_seconds(LINEAR_METHODS[method], Problem(B=1, N=16384 * W, W=W, **fields), net)
        role = "fit" if i < 2 else "predicted"
        name = "All-Scan" if method == "allscan" else "LASP-2"
        rows.append(dict(kind="zeco", layer=LAYERS[0][0], network="ZeCO-fitted H100", W=W, method=method,
                         seconds=model, measured=measured, error=model / measured - 1, role=role))
        stream.write(f"{name:>10s} {W:5d} {measured * 1e3:8.3f} {model * 1e3:9.3f} {model / measured - 1:+7.1%}  {role}\n")
    networks = {"ZeCO-fitted H100": net, "NVLink + IB (A100 figures)": costs.NVLINK_IB,
                "slow IB (beta 5 GB/s)": replace(costs.NVLINK_IB, beta_inter=5e9)}
    for net_name, network in networks.items():
        for label, family, fields in LAYERS:
            methods = LINEAR_METHODS if family == "linear" else DELTA_METHODS
            stream.write(f"\n{label}, {net_name}: ms per layer, forward + backward exchanges "
                         f"(MB through the busiest rank)\n{'W':>4s} " + " ".join(f"{m:>17s}" for m in EXCHANGES)
                         + f" {'fastest':>9s}\n")
            for W in SCALE_W:
                x = Problem(B=1, N=16384 * W, W=W, **fields)
                best, seconds = costs.choose_exchange(methods, x, network)
                cells = []
                for m in EXCHANGES:
                    sent = methods[m].bytes_per_rank(x)
                    through = sent * (x.W - 1) if m == "lasp2" else sent  # an all-gather brings W − 1 slots
                    rows.append(dict(kind="scale", layer=label, network=net_name, W=W, method=m, seconds=seconds[m],
                                     measured=None, error=None, role="fastest" if m == best else "",
                                     bytes_through=through))
                    cells.append(f"{seconds[m] * 1e3:8.3f} ({through / 1e6:6.1f})")
                stream.write(f"{W:4d} " + " ".join(f"{c:>17s}" for c in cells) + f" {best:>9s}\n")
    write_csv(out / "exchanges.csv", rows, ["kind", "layer", "network", "W", "method", "seconds", "measured", "error", "role",
                                            "bytes_through"])
    plt = pyplot()
    if plt is None:
        stream.write(f"no exchanges.png ({NO_MATPLOTLIB})\n")
        return rows
    fig, axes = plt.subplots(len(networks), len(LAYERS), figsize=(4 * len(LAYERS), 3.2 * len(networks)), sharex=True)
    for i, net_name in enumerate(networks):
        for j, (label, _, _) in enumerate(LAYERS):
            ax = axes[i][j]
            for m in EXCHANGES:
                mine = [r for r in rows if r["kind"] == "scale" and r["network"] == net_name and r["layer"] == label
                        and r["method"] == m]
                ax.plot([r["W"] for r in mine], [r["seconds"] * 1e3 for r in mine], marker=".", label=m)
            if i == 0 and j == 0:  # one forward exchange, measured by ZeCO (x) and modelled (+)
                for r in rows[:len(ZECO_CELLS)]:
                    ax.scatter([r["W"]], [r["measured"] * 1e3], marker="x", color="k")
                    ax.scatter([r["W"]], [r["seconds"] * 1e3], marker="+", color="k")
                    ax.annotate(f"ZeCO {'All-Scan' if r['method'] == 'allscan' else 'LASP-2'} fwd (x), model (+)",
                                (r["W"], r["measured"] * 1e3), fontsize=5)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{label.split(' (')[0]}, {net_name}", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("ms per layer (fwd+bwd)")
            if i == len(networks) - 1:
                ax.set_xlabel("GPUs (W)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "exchanges.png", dpi=110)
    plt.close(fig)
    return rows


def run(args, out: Path, stream) -> None:
    if args.calibrate is not None:
        local = calibrate_local(args.calibrate, stream)
        write_csv(out / "local.csv", local, ["family", "method", "world", "T", "measured_s", "predicted_s", "comm_s", "ratio"])
    project_paper(stream, out)
    project_exchanges(stream, out)
    stream.write(f"wrote {out}\n")
