"""lasp2-bench: measure the sequence-parallel methods and project them to larger clusters.

    python -m lasp2_bench attn                       # one attention layer, every method, W in {2, 4}
    python -m lasp2_bench attn --world 2 --weak 8192 # SP at 8192 tokens per rank vs as many single-device runs
    python -m lasp2_bench model --preset debug       # full training steps: tokens/s, peak memory
    python -m lasp2_bench project                    # the cost model against the paper's 64-GPU figures
    python -m lasp2_bench convergence                # the paper's convergence study, every kind pure and hybrid
    python -m lasp2_bench project --calibrate benchmarks/results/<date>-<machine>/attn.csv
    python -m lasp2_bench launches                   # aten ops (GPU launches) per layer call, as tokens grow
    python -m lasp2_bench balance                    # packed documents over the ranks: contiguous, zigzag, planner
    python -m lasp2_bench generate                   # prefill across ranks, then decoding; transformers' generate

Each command prints a table and writes CSV, PNG and machine.json under
benchmarks/results/<date>-<machine>/ (or --out).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import attn, balance, convergence, generate, launches, model, project, weak
from .machine import describe, read_csv, results_dir, write_csv
from .plots import NO_MATPLOTLIB, lines_by_method


def _out_dir(args, device: torch.device) -> Path:
    if args.out is None:
        return results_dir(device)
    args.out.mkdir(parents=True, exist_ok=True)
    return args.out


def _device(args) -> torch.device:
    wants_cuda = getattr(args, "device", "cpu") in ("cuda", "auto") and torch.cuda.is_available()
    return torch.device("cuda", 0) if wants_cuda else torch.device("cpu")


def cmd_attn(args) -> None:
    out = _out_dir(args, _device(args))
    if args.weak is not None:
        rows = weak.run(sorted(set(args.world) - {1}), args.linear, weak.DECAYS, args.weak, H=args.H, D=args.D,
                        repeats=args.repeats, warmup=args.warmup, heap=args.heap, policies=args.policy)
        weak.print_table(rows, sys.stdout)
        name = "attn-weak-heap.csv" if args.heap else "attn-weak.csv"
        write_csv(out / name, rows, weak.FIELDS)
        (out / "machine.json").write_text(json.dumps(describe(torch.device("cpu")), indent=1))
        print(f"wrote {out}/{name}")
        return
    rows, machine = attn.run(args)
    attn.print_table(rows, sys.stdout)
    write_csv(out / "attn.csv", [r for r in rows if r["family"] != "calibration"], attn.FIELDS)
    (out / "attn-calibration.json").write_text(json.dumps([r for r in rows if r["family"] == "calibration"], indent=1))
    (out / "machine.json").write_text(json.dumps(machine, indent=1))
    ok = [r for r in rows if r["family"] != "calibration" and r["status"] == "ok"]
    for r in ok:
        r["seconds"] = r["median_ms"] / 1e3
    drawn = lines_by_method(ok, "T", "seconds", "fwd+bwd seconds (median)", out / "attn-time.png", "one layer")
    drawn &= lines_by_method(ok, "T", "peak_mb", "peak MB per rank", out / "attn-memory.png", "one layer")
    print(f"machine: {machine}\nwrote {out}/attn.csv" + (", attn-time.png, attn-memory.png" if drawn else
                                                         f" (no plots: {NO_MATPLOTLIB})"))


def cmd_model(args) -> None:
    out = _out_dir(args, _device(args))
    name = f"model-{args.preset}"
    earlier = read_csv(out / f"{name}.csv") if args.append and (out / f"{name}.csv").exists() else []

    def save(rows):
        write_csv(out / f"{name}.csv", model.merge_rows(earlier, rows), model.FIELDS)

    rows, machine = model.run(args, on_row=save)
    rows = model.merge_rows(earlier, rows)
    model.print_table(rows, sys.stdout)
    (out / "machine.json").write_text(json.dumps(machine, indent=1))
    ok = [dict(r, family=r["pattern"], method=f"{r['linear']} {r['data_parallel']}" + (" AC" if r["checkpointing"] else "")
               + (" compiled" if r["compile"] else "")) for r in rows if r["status"] == "ok"]
    drawn = lines_by_method(ok, "seq_len", "peak_mb", "peak MB per rank", out / f"{name}-memory.png", args.preset,
                            panel="sp")
    drawn &= lines_by_method(ok, "seq_len", "tokens_per_s", "tokens/s", out / f"{name}-throughput.png", args.preset,
                             panel="sp")
    mem_gb = model.memory_limit_gb(args, _device(args).type == "cuda")
    for (pattern, linear, mode, ac, compiled), (ran, oom, reach) in sorted(model.longest_fitting(rows, mem_gb).items()):
        limit = (f"out of memory at {oom}" if oom else
                 f"not run further (time); the last two peaks extrapolate to the limit at about {reach or '?'}")
        print(f"longest {pattern} {linear} {mode}{' AC' if ac else ''}{' compiled' if compiled else ''}: {ran} ran; {limit} "
              f"(limit {mem_gb:.1f} GB/rank)")
    print(f"machine: {machine}\nwrote {out}/{name}.csv" + (f", {name}-memory.png, {name}-throughput.png" if drawn
                                                          else f" (no plots: {NO_MATPLOTLIB})"))


def cmd_project(args) -> None:
    out = _out_dir(args, torch.device("cpu")) if args.out is not None else Path("benchmarks") / "results" / "projection"
    out.mkdir(parents=True, exist_ok=True)
    project.run(args, out, sys.stdout)


def cmd_convergence(args) -> None:
    out = args.out or Path("benchmarks") / "results" / f"convergence-{args.preset}"
    out.mkdir(parents=True, exist_ok=True)
    rows = convergence.same_settings(convergence.run(args, out, sys.stdout), args)  # these settings' rows only
    table, lines = convergence.table(rows), convergence.findings(rows)
    done = [r for r in rows if r["status"] == "ok"]
    wall = sum(float(r["wall_s"]) for r in done)
    about = (f"{args.preset}, sp {args.sp}, {args.steps * args.batch_size * args.seq_len / 1e6:.2f}M tokens per "
             f"configuration ({args.steps} steps x {args.batch_size} x {args.seq_len}, lr {args.lr})")
    (out / "convergence.md").write_text(
        f"Final validation loss ({about}; the paper's 1B / 50B-token losses in brackets); "
        f"{len(done)} configurations, {wall / 60:.0f} min of training in all.\n\n{table}\n\n"
        + "".join(f"- {line}\n" for line in lines))
    not_drawn = convergence.plot(rows, out / "convergence.png", f"validation loss ({about})")
    print(f"\n{table}\n\n" + "\n".join(lines))
    print(f"wrote {out}/convergence.csv, convergence.md" + (f" (no plot: {not_drawn})" if not_drawn else
                                                          ", convergence.png"))


def cmd_launches(args) -> None:
    out = _out_dir(args, torch.device("cpu"))
    rows = launches.run(tokens=args.tokens, world=args.world, policies=args.policy, layouts=args.layout,
                        packed=(False, True) if args.packed else (False,), H=args.H, D=args.D,
                        chunk_size=args.chunk_size, families=args.family)
    launches.print_table(rows, sys.stdout)
    write_csv(out / "launches.csv", rows, launches.FIELDS)
    print(f"wrote {out}/launches.csv")


def cmd_balance(args) -> None:
    out = _out_dir(args, torch.device("cpu"))
    balance.run(args, out, sys.stdout)
    print(f"wrote {out}/balance.csv, balance.png")


def cmd_generate(args) -> None:
    out = _out_dir(args, _device(args))
    rows = generate.run(args)
    generate.print_table(rows, sys.stdout)
    write_csv(out / "generate.csv", rows, generate.FIELDS)
    (out / "machine.json").write_text(json.dumps(describe(_device(args)), indent=1))
    print(f"wrote {out}/generate.csv")


# name -> (its module: add_arguments and the description, the function that runs it, its help line)
COMMANDS = {
    "attn": (attn, cmd_attn, "one attention layer under every method"),
    "model": (model, cmd_model, "training steps of a preset model under each method"),
    "project": (project, cmd_project, "the α–β cost model, calibrated here and against the paper"),
    "convergence": (convergence, cmd_convergence,
                    "the paper's convergence study at small scale, every kind pure and hybrid"),
    "launches": (launches, cmd_launches, "aten ops per layer call (GPU kernel launches) as the tokens grow"),
    "balance": (balance, cmd_balance, "packed documents over the ranks: contiguous, zigzag and the planner"),
    "generate": (generate, cmd_generate, "prefill across ranks, then O(1)-state decoding, beside transformers' generate"),
}
OUT_HELP = {"convergence": "results folder, kept across pieces of the study (default: "
                           "benchmarks/results/convergence-<preset>)"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lasp2-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, (module, _, help_line) in COMMANDS.items():
        command = sub.add_parser(name, help=help_line, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
        command.add_argument("--out", type=Path, default=None, help=OUT_HELP.get(
            name, "results folder (default: benchmarks/results/<date>-<machine>)"))
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    COMMANDS[args.command][1](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
