"""`python -m lasp2_bench convergence`: the paper's convergence study (its Tables 2 and 4) at small
scale. Every linear kind, pure and at the hybrid ratios 1/8, 1/4 and 1/2, and a pure softmax
baseline, each trained by the project's trainer under sequence parallelism (`torchrun` over --sp
ranks: LASP-2 for the linear layers, all-gather K/V for the softmax ones, i.e. LASP-2H for the
hybrids) on the built-in corpus with the same seed, tokens and schedule.

Each configuration trains in its own run directory under --runs; its final validation loss,
validation curve and wall time go into convergence.csv, rewritten after every configuration. A
configuration already in the CSV is skipped and one stopped part-way resumes from its last
checkpoint, so the study can run in pieces (--kinds, --ratios, --seeds pick a piece; a second
seed gives the spread that tells differences from noise). The table (convergence.md, laid out like
the paper's Table 4, the paper's losses beside ours) and the plot (convergence.png, validation loss
against tokens) are drawn from every row in the CSV.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

from lasp2 import report
from lasp2.model import LINEAR_KINDS, pattern_for_ratio

from .machine import read_csv, write_csv

RATIOS = ("0", "1/8", "1/4", "1/2")
SOFTMAX = "softmax"  # the baseline's row: every layer softmax attention (ratio 1)
# The paper's losses (1B parameters, 50B tokens; Table 2 for pure and 1/4, Table 4 for the ratio
# ablation, where the two tables differ both are given). Not reported: 1/8, and every kind the
# paper did not train.
PAPER = {
    ("basic", "0"): "2.892", ("basic", "1/4"): "2.824", ("basic", "1/2"): "2.775",
    ("lightning", "0"): "2.848–2.862", ("lightning", "1/4"): "2.750–2.758", ("lightning", "1/2"): "2.742",
    ("retention", "0"): "2.855–2.867", ("retention", "1/4"): "2.758–2.759", ("retention", "1/2"): "2.748",
    ("gla", "0"): "2.845", ("gla", "1/4"): "2.754", ("gla", "1/2"): "2.753",
    ("based", "0"): "2.754", ("based", "1/4"): "2.751",
    ("rebased", "0"): "2.845", ("rebased", "1/4"): "2.787",
    (SOFTMAX, "1"): "2.759",
}
PAPER_KINDS = ("basic", "lightning", "retention", "gla", "based", "rebased")
# The settings every configuration of one study shares: rows of other settings in the same CSV
# (an earlier piece with other flags) are kept but neither reused nor tabled with these.
SETTINGS = ("preset", "sp", "steps", "seq_len", "batch_size", "lr", "warmup", "val_every", "val_batches")
# What makes two rows the same experiment: a row is reused only when all of these match.
KEY = ("kind", "ratio", "seed") + SETTINGS
FIELDS = ["kind", "ratio", "pattern", "seed", *SETTINGS, "tokens", "status", "val_loss", "train_loss", "wall_s",
          "tokens_per_s", "curve", "run_dir"]


def add_arguments(p) -> None:
    p.add_argument("--kinds", nargs="+", default=list(LINEAR_KINDS) + [SOFTMAX], choices=list(LINEAR_KINDS) + [SOFTMAX],
                   help="linear kinds, and 'softmax' for the baseline (default: all)")
    p.add_argument("--ratios", nargs="+", default=list(RATIOS), choices=list(RATIOS),
                   help="shares of softmax layers for each linear kind (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of weights and data order (default: %(default)s)")
    p.add_argument("--preset", default="tiny", help="model preset; 8 layers or more so that 1/8 has a softmax layer "
                   "(default: %(default)s)")
    p.add_argument("--sp", type=int, default=2, help="sequence-parallel ranks per configuration (default: %(default)s)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per configuration (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=20, help="(default: %(default)s)")
    p.add_argument("--val-every", type=int, default=25, help="steps between validation losses (default: %(default)s)")
    p.add_argument("--val-batches", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--runs", type=Path, default=Path("runs") / "convergence",
                   help="where each configuration's run directory (checkpoints, metrics) goes (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one configuration may take (default: %(default)s)")


def configurations(kinds, ratios, seeds) -> list[dict]:
    """(kind, ratio, pattern, seed) of each run: every linear kind at every ratio, the softmax
    baseline once per seed."""
    runs = []
    for seed in seeds:
        for kind in kinds:
            for ratio in (["1"] if kind == SOFTMAX else ratios):
                runs.append({"kind": kind, "ratio": ratio, "pattern": pattern_for_ratio(ratio), "seed": seed})
    return runs


def run_name(run: dict) -> str:
    return f"{run['kind']}-{run['ratio'].replace('/', 'of')}-seed{run['seed']}"


def settings_of(args) -> dict:
    return {name: getattr(args, name) for name in SETTINGS}


def study_name(args) -> str:
    """The folder under --runs of the run directories of these settings."""
    return (f"{args.preset}-sp{args.sp}-{args.steps}x{args.batch_size}x{args.seq_len}-lr{args.lr}-warmup{args.warmup}"
            f"-val{args.val_every}x{args.val_batches}")


def same_settings(rows: list[dict], args) -> list[dict]:
    """The rows trained with these arguments' settings (any kind, ratio, seed)."""
    wanted = {name: str(value) for name, value in settings_of(args).items()}
    return [r for r in rows if all(str(r.get(name, "")) == value for name, value in wanted.items())]


def trainer_command(run: dict, args, run_dir: Path, resume: bool) -> list[str]:
    """The trainer's own command line for one configuration (torchrun over --sp ranks)."""
    launch = [sys.executable, "-m", "lasp2.train"] if args.sp == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.sp), "-m", "lasp2.train"]
    kind = "basic" if run["kind"] == SOFTMAX else run["kind"]  # no linear layer in the baseline
    flags = ["--preset", args.preset, "--linear-kind", kind, "--hybrid", run["ratio"], "--sp", str(args.sp),
             "--sp-linear", "lasp2", "--sp-softmax", "allgather", "--seq-len", str(args.seq_len),
             "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--lr", str(args.lr),
             "--warmup", str(args.warmup), "--val-every", str(args.val_every), "--val-batches", str(args.val_batches),
             "--seed", str(run["seed"]), "--ckpt-every", str(args.val_every * 4), "--log-every", str(args.val_every),
             "--out", str(run_dir)]
    return launch + flags + (["--resume"] if resume else [])


def _row_key(row: dict) -> tuple:
    return tuple(str(row.get(k, "")) for k in KEY)


def read_metrics(run_dir: Path) -> tuple[list[tuple[int, float]], list[float], list[float]]:
    """(validation losses by step, training losses, tokens/s per step) from a run's metrics, each
    step once (the trainer's reader: a resumed run's last record of a step)."""
    train, val = report.read_metrics(run_dir / "metrics.jsonl")
    return list(val.items()), [r["loss"] for r in train.values()], [r["tokens_per_s"] for r in train.values()]


def _stop(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM (torchrun passes it on to its workers, which run in sessions of their own), then
    SIGKILL after grace_s."""
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_one(run: dict, args, stream, earlier_wall_s: float = 0.0) -> dict:
    """Trains one configuration (resuming its checkpoint if it has one) and returns its row;
    earlier_wall_s: the time earlier, unfinished invocations spent on it."""
    run_dir = args.runs / study_name(args) / run_name(run)
    tokens_per_step = args.batch_size * args.seq_len
    row = dict(run, **settings_of(args), tokens=args.steps * tokens_per_step, run_dir=str(run_dir))
    resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    run_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with (run_dir / "train.log").open("a") as log:
        process = subprocess.Popen(trainer_command(run, args, run_dir, resume), stdout=log, stderr=subprocess.STDOUT)
        try:
            code = process.wait(args.timeout)
            status = "ok" if code == 0 else f"failed (exit {code}, see {run_dir}/train.log)"
        except subprocess.TimeoutExpired:
            _stop(process)
            status = f"timed out after {args.timeout:.0f} s (rerun to resume from its last checkpoint)"
        except BaseException:  # Ctrl-C: stop the ranks too, keep the checkpoints for a resume
            _stop(process)
            raise
    row["wall_s"] = round(earlier_wall_s + time.perf_counter() - began, 1)
    if status == "ok":
        try:
            val, train, rates = read_metrics(run_dir)
            row["val_loss"] = round(val[-1][1], 4)
            row["train_loss"] = round(statistics.fmean(train[-10:]), 4)  # the last 10 steps, less noisy than one
            row["tokens_per_s"] = round(statistics.median(rates))
            row["curve"] = " ".join(f"{(step + 1) * tokens_per_step}:{loss:.4f}" for step, loss in val)
        except (OSError, IndexError, statistics.StatisticsError) as exc:
            status = f"failed (no usable metrics in {run_dir}: {exc!r})"
    row["status"] = status
    stream.write(f"{run_name(run):28s} {status.split(' (')[0]:8s} val {row.get('val_loss', float('nan')):.4f} "
                 f"({row['wall_s']:.0f} s{', resumed' if resume else ''})\n")
    stream.flush()
    return row


def run(args, out: Path, stream=sys.stdout) -> list[dict]:
    """Runs every configuration not already in out/convergence.csv; returns all rows."""
    csv_path = out / "convergence.csv"
    rows = read_csv(csv_path) if csv_path.exists() else []
    todo = configurations(args.kinds, args.ratios, args.seeds)
    stream.write(f"{len(todo)} configurations: {args.preset}, sp {args.sp}, {args.steps} steps x {args.batch_size} x "
                 f"{args.seq_len} tokens; runs under {args.runs}\n")
    for r in todo:
        probe = _row_key(dict(r, **settings_of(args)))
        earlier = [old for old in rows if _row_key(old) == probe]
        if any(old["status"] == "ok" for old in earlier):
            stream.write(f"{run_name(r):28s} done earlier, skipped\n")
            continue
        new = run_one(r, args, stream, sum(float(old["wall_s"] or 0) for old in earlier))
        rows = [old for old in rows if _row_key(old) != _row_key(new)] + [new]
        write_csv(csv_path, rows, FIELDS)
    return rows


def _losses_by_seed(rows: list[dict]) -> dict[tuple[str, str], dict[int, float]]:
    """(kind, ratio) -> {seed: final validation loss} of the completed rows."""
    losses = {}
    for r in rows:
        if r["status"] == "ok":
            losses.setdefault((r["kind"], r["ratio"]), {})[int(r["seed"])] = float(r["val_loss"])
    return losses


def _first_seed(by_seed: dict[tuple[str, str], dict[int, float]]) -> int:
    """The study's first seed (the one every configuration has): seeds also draw other validation
    batches, so only losses of one seed compare."""
    return min((min(seeds) for seeds in by_seed.values()), default=0)


def table(rows: list[dict]) -> str:
    """Markdown, laid out like the paper's Table 4: a row per module, a column per ratio; each cell
    ours (the first seed; other seeds after a slash) and the paper's in brackets."""
    by_seed = _losses_by_seed(rows)
    first_seed = _first_seed(by_seed)

    def cell(kind, ratio):
        seeds = by_seed.get((kind, ratio), {})
        text = " / ".join(f"{seeds[s]:.3f}" for s in sorted(seeds, key=lambda s: (s != first_seed, s)))
        paper = PAPER.get((kind, ratio))
        return " ".join(part for part in (text, f"({paper})" if paper else "") if part)

    lines = ["| module | pure (0) | 1/8 | 1/4 | 1/2 |", "|---|---:|---:|---:|---:|"]
    for kind in [k for k in LINEAR_KINDS if any(key[0] == k for key in by_seed)]:
        lines.append(f"| {kind} | " + " | ".join(cell(kind, ratio) for ratio in RATIOS) + " |")
    if (SOFTMAX, "1") in by_seed:
        lines.append(f"| softmax (Llama 3) | {cell(SOFTMAX, '1')} | | | |")
    return "\n".join(lines)


def findings(rows: list[dict]) -> list[str]:
    """Which of the paper's orderings hold in these rows (the first seed): each hybrid against its
    pure model, the rank order of the paper's modules, pure and at 1/4; and, where configurations
    ran with more seeds, the spread of each and whether each hybrid-minus-pure gap keeps its sign."""
    by_seed = _losses_by_seed(rows)
    seed = _first_seed(by_seed)
    losses = {key: seeds[seed] for key, seeds in by_seed.items() if seed in seeds}
    lines = []
    repeated = {key: seeds for key, seeds in by_seed.items() if len(seeds) > 1}
    if repeated:
        spread = {key: max(s.values()) - min(s.values()) for key, s in repeated.items()}
        lines.append("seed spread (max - min; other validation batches too): " + ", ".join(
            f"{k} {r} {v:.3f}" for (k, r), v in sorted(spread.items())))
        gaps = []
        for (k, r), seeds in sorted(repeated.items()):
            pure = by_seed.get((k, "0"), {})
            common = sorted(set(seeds) & set(pure))
            if r not in ("0", "1") and len(common) > 1:
                gaps.append(f"{k} {r} " + " / ".join(f"{seeds[s] - pure[s]:+.3f}" for s in common))
        if gaps:
            lines.append("hybrid - pure by seed: " + ", ".join(gaps))
    for ratio in RATIOS[1:]:
        pairs = [(k, losses[(k, "0")], losses[(k, ratio)]) for k in LINEAR_KINDS if (k, "0") in losses and (k, ratio) in losses]
        if pairs:
            better = [k for k, pure, hybrid in pairs if hybrid < pure]
            worse = [f"{k} ({hybrid - pure:+.3f})" for k, pure, hybrid in pairs if hybrid >= pure]
            lines.append(f"hybrid {ratio} beats pure for {len(better)}/{len(pairs)} kinds"
                         + (f"; not for {', '.join(worse)}" if worse else ""))
    for ratio in ("0", "1/4"):
        ours = sorted((losses[(k, ratio)], k) for k in PAPER_KINDS if (k, ratio) in losses)
        paper = sorted((float(PAPER[(k, ratio)].split("–")[0]), k) for k in PAPER_KINDS if (k, ratio) in losses)
        if len(ours) > 1:
            lines.append(f"rank order at {ratio}, best first: ours {' < '.join(k for _, k in ours)}; "
                         f"paper {' < '.join(k for _, k in paper)}")
    if (SOFTMAX, "1") in losses:
        base = losses[(SOFTMAX, "1")]
        linear = [(f"{k} {r}", v) for (k, r), v in sorted(losses.items()) if k != SOFTMAX]
        above = [name for name, v in linear if v >= base]
        lines.append(f"softmax baseline {base:.3f}; {len(linear) - len(above)}/{len(linear)} linear configurations "
                     f"below it" + (f"; not {', '.join(above)}" if above else ""))
    return lines


def plot(rows: list[dict], path: Path, title: str) -> str:
    """Validation loss against tokens: a panel per linear kind, a line per ratio, the softmax
    baseline dashed in each. Returns why nothing was drawn, or "" once path is written."""
    from .plots import NO_MATPLOTLIB, pyplot

    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    curves = {}
    for r in sorted(rows, key=lambda r: int(r["seed"])):
        if r["status"] == "ok" and r.get("curve"):
            points = [tuple(float(x) for x in p.split(":")) for p in r["curve"].split()]
            curves.setdefault((r["kind"], r["ratio"]), points)  # the lowest seed's curve, as in the table
    kinds = [k for k in LINEAR_KINDS if any(key[0] == k for key in curves)]
    if not kinds and (SOFTMAX, "1") not in curves:
        return "no configuration has completed"
    cols = min(5, max(1, len(kinds)))
    rows_n = -(-max(1, len(kinds)) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 3.0 * rows_n), squeeze=False, sharey=True)
    for ax, kind in zip(axes.flat, kinds or [SOFTMAX]):
        for ratio in sorted({r for k, r in curves if k == kind}, key=Fraction):
            xs, ys = zip(*curves[(kind, ratio)])
            ax.plot([x / 1e6 for x in xs], ys, marker=".", label="pure" if ratio == "0" else ratio)
        if (SOFTMAX, "1") in curves and kind != SOFTMAX:
            xs, ys = zip(*curves[(SOFTMAX, "1")])
            ax.plot([x / 1e6 for x in xs], ys, "k--", linewidth=1, label="softmax")
        ax.set_title(kind)
        ax.set_xlabel("M tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(kinds or [SOFTMAX]):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("validation loss")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""
