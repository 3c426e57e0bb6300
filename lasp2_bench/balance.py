"""`python -m lasp2_bench balance`: how evenly packed documents load the sequence-parallel ranks.

For batches of documents drawn from a heavy-tailed length distribution (lognormal, as web and
code corpora are, and the built-in corpus's file lengths), W·C tokens a batch, the slowest rank
over the mean under three placements: the documents as drawn, contiguous slots; as drawn,
zigzag; the planner's order and slot table (`lasp2.parallel.balance`). Two figures each:
    estimated  from the cost model (`balance.LayerCosts` of a 1/4 hybrid: per token of its
               linear layers, per visible (query, key) pair of its softmax layers);
    measured   one softmax layer's forward + backward on each rank's slots, as the all-gather
               method computes them (each slot's queries against the keys from its first
               document's start to its end, under the documents' mask), timed rank by rank in
               one process, so W = 8 runs on this machine; its imbalance is that of the
               quadratic part alone (the linear layers' tokens are equal per rank by construction).
Prints a table, writes balance.csv and balance.png.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from lasp2.ops.documents import documents
from lasp2.ops.softmax_attn import sdpa, visibility
from lasp2.parallel.balance import LayerCosts, named_layout_costs, plan_placement
from lasp2.parallel.layout import Layout
from .machine import write_csv
from .plots import NO_MATPLOTLIB, pyplot

PLACEMENTS = ("contiguous", "zigzag", "planner")
# A 1/4 hybrid of the 1b preset's shape: 12 linear and 4 softmax layers, 16 heads of 128.
COSTS = LayerCosts.for_model(linear_layers=12, softmax_layers=4, heads=16, head_dim=128, rate=1e14)


def add_arguments(p) -> None:
    p.add_argument("--world", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--tokens-per-rank", type=int, default=8192, help="C: a batch holds W·C tokens (default: %(default)s)")
    p.add_argument("--batches", type=int, default=6, help="batches drawn per distribution and W (default: %(default)s)")
    p.add_argument("--measure", type=int, default=2, help="of them, how many are timed rank by rank (default: %(default)s)")
    p.add_argument("--H", type=int, default=4, help="heads of the timed softmax layer (default: %(default)s)")
    p.add_argument("--D", type=int, default=32, help="head dim of the timed softmax layer (default: %(default)s)")


def corpus_lengths() -> np.ndarray:
    """The built-in corpus's document (file) lengths in tokens, as `--packing documents` cuts it."""
    from lasp2.data import load_tokens

    data = load_tokens(None, None, 0.01, 1, documents=True)
    return np.diff(np.append(data.train_starts, len(data.train)))


def draw(source, total: int, rng) -> list[int]:
    """Documents until `total` tokens, the last one cut to fit (as a packed batch ends)."""
    lengths = []
    while sum(lengths) < total:
        n = int(rng.lognormal(7.0, 1.4)) if isinstance(source, str) else int(source[rng.integers(len(source))])
        lengths.append(max(1, n))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def placements(lengths, world: int):
    """{name: (document order, layout, estimated rank costs)} for the three placements."""
    plan = plan_placement(lengths, world, COSTS)
    out = {name: (list(range(len(lengths))), Layout(name, world), named_layout_costs(lengths, name, world, COSTS))
           for name in ("contiguous", "zigzag")}
    out["planner"] = (list(plan.order), plan.layout, plan.cost)
    return out


def measured_rank_seconds(lengths, order, layout: Layout, H: int, D: int) -> list[float]:
    """Each rank's softmax fwd+bwd on its slots (the all-gather method's local work), timed."""
    ordered = [lengths[i] for i in order]
    total = sum(ordered)
    docs = documents(torch.tensor(np.concatenate([[0], np.cumsum(ordered)])), "balance", total)
    doc_ids = docs.ids(torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    k_all, v_all = (torch.randn(1, total, H, D, generator=gen) for _ in range(2))
    slot_len = total // layout.n_slots
    seconds = []
    for rank in range(layout.world):
        work = []
        for slot in layout.slots(rank):
            start = docs.start_of(slot * slot_len)
            end = (slot + 1) * slot_len
            q_pos = torch.arange(slot * slot_len, end)
            k_pos = torch.arange(start, end)
            mask = visibility(q_pos, k_pos, True, doc_ids[q_pos], doc_ids[k_pos])
            q = torch.randn(1, slot_len, H, D, generator=gen, requires_grad=True)
            k, v = (t[:, start:end].clone().requires_grad_() for t in (k_all, v_all))
            work.append((q, k, v, mask))

        def run():
            for q, k, v, mask in work:
                sdpa(q, k, v, scale=D**-0.5, mask=mask).sum().backward()

        run()  # warm-up
        times = []
        for _ in range(3):
            began = time.perf_counter()
            run()
            times.append(time.perf_counter() - began)
        seconds.append(statistics.median(times))
    return seconds


def imbalance(costs) -> float:
    return max(costs) / (sum(costs) / len(costs))


def run(args, out: Path, stream) -> list[dict]:
    sources = {"lognormal (median 1.1K, sigma 1.4)": "lognormal", "built-in corpus files": corpus_lengths()}
    rows = []
    stream.write(f"{'lengths':36s} {'W':>2s} {'placement':>10s} {'estimated':>10s} {'measured':>9s} {'slots/rank':>10s}\n")
    for label, source in sources.items():
        for world in args.world:
            rng = np.random.default_rng([world, len(label)])
            est = {p: [] for p in PLACEMENTS}
            meas = {p: [] for p in PLACEMENTS}
            slots = []
            for b in range(args.batches):
                lengths = draw(source, world * args.tokens_per_rank, rng)
                for name, (order, layout, cost) in placements(lengths, world).items():
                    est[name].append(imbalance(cost))
                    if name == "planner":
                        slots.append(layout.slots_per_rank)
                    if b < args.measure:
                        meas[name].append(imbalance(measured_rank_seconds(lengths, order, layout, args.H, args.D)))
            for name in PLACEMENTS:
                row = dict(lengths=label, world=world, placement=name, estimated=statistics.mean(est[name]),
                           estimated_worst=max(est[name]), measured=statistics.mean(meas[name]) if meas[name] else None,
                           slots_per_rank=statistics.median(slots) if name == "planner" else
                           (1 if name == "contiguous" else 2))
                rows.append(row)
                measured = "-" if row["measured"] is None else f"{row['measured']:.2f}"
                stream.write(f"{label:36s} {world:2d} {name:>10s} {row['estimated']:10.2f} {measured:>9s} "
                             f"{row['slots_per_rank']:10g}\n")
            stream.flush()
    write_csv(out / "balance.csv", rows, list(rows[0]))
    plt = pyplot()
    if plt is None:
        stream.write(f"no balance.png ({NO_MATPLOTLIB})\n")
        return rows
    fig, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources), 3.4), sharey=True)
    for ax, label in zip(axes, sources):
        width = 0.13
        for i, name in enumerate(PLACEMENTS):
            mine = [r for r in rows if r["lengths"] == label and r["placement"] == name]
            xs = np.arange(len(mine))
            ax.bar(xs + (2 * i - 2.5) * width, [r["estimated"] for r in mine], width, label=f"{name} (estimated)")
            ax.bar(xs + (2 * i - 1.5) * width, [r["measured"] or 0 for r in mine], width, label=f"{name} (measured)",
                   alpha=0.6)
        ax.set_xticks(np.arange(len(args.world)), [f"W = {w}" for w in args.world])
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("slowest rank / mean")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "balance.png", dpi=110)
    plt.close(fig)
    return rows
