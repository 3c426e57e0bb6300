"""`python -m lasp2_bench model`: full training steps (forward, backward, gradient reduction,
AdamW) of a preset Linear-Llama3, pure ("L") and 1/4-hybrid ("LLLN"), under each linear method,
with the trainer's data parallelism over the ranks: FSDP2 sharding or replication
(--data-parallel, both to compare what sharding saves), optionally activation checkpointing.

Every configuration runs on --sp freshly spawned ranks (so each peak is its own): tokens/s is
batch x seq_len over the slowest rank's median step after one warm-up step; memory is the
largest rank's peak (CUDA max allocated; CPU RSS high-water). Each rank may hold at most --mem-gb
(CPU: an address-space limit set from what the rank holds after building the model), so a
configuration that does not fit fails with an allocation error instead of taking the machine
down (a rank the kernel kills for memory also counts as out of memory); with --max-seq the length is
doubled from the first --seq-len until that happens or the next step is estimated to exceed
--budget-seconds, giving each method's longest sequence. Bytes and calls are the attention
collectives of one forward+backward on the busiest rank, next to the README formula. The CSV is
rewritten after every configuration, so a sweep stopped part-way keeps what it measured, and
--append adds a sweep run in pieces to an existing one.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lasp2.distributed import ParallelDims, mesh_for
from lasp2.model import count_parameters, preset
from lasp2.parallel import LINEAR_METHODS, SOFTMAX_METHODS, Problem, SequenceParallel, count_collectives
from lasp2.parallel.counting import CollectiveLog
from lasp2.parallelize import DATA_PARALLEL, clip_grad_norm, materialize, sum_replicated_gradients
from lasp2.run_config import ModelChoice, OptimChoice, ParallelChoice
from lasp2.train import apply_parallelism, build_model, make_optimizer
from .machine import describe, free_port, peak_memory_bytes, reset_peak_memory, sync

FIELDS = ["preset", "pattern", "linear", "softmax", "sp", "data_parallel", "checkpointing", "compile", "seq_len", "batch",
          "status", "step_s", "compile_s", "tokens_per_s", "peak_mb", "bytes_per_rank", "formula_bytes", "calls_per_rank", "dp_bytes_per_rank",
          "params_m"]
KEY = ("preset", "pattern", "linear", "softmax", "sp", "data_parallel", "checkpointing", "compile", "batch", "seq_len")


def add_arguments(p) -> None:
    p.add_argument("--preset", default="debug", help="model preset (default: %(default)s)")
    p.add_argument("--patterns", nargs="+", default=["L", "LLLN"], help="layer patterns (default: %(default)s)")
    p.add_argument("--linear", nargs="+", default=list(LINEAR_METHODS), choices=list(LINEAR_METHODS))
    p.add_argument("--softmax", default="allgather", choices=list(SOFTMAX_METHODS), help="(default: %(default)s)")
    p.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag"], help="(default: %(default)s)")
    p.add_argument("--sp", type=int, default=2, help="sequence-parallel ranks (default: %(default)s)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[4096], help="(default: %(default)s)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="steps per configuration, the first a warm-up (default: %(default)s)")
    p.add_argument("--max-seq", action="store_true", help="double the length until out of memory or time")
    p.add_argument("--mem-gb", type=float, default=None, help="per-rank memory limit in GB (default: 90%% of RAM / sp)")
    p.add_argument("--budget-seconds", type=float, default=120, help="longest step to attempt (default: %(default)s)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each block, as the trainer's --compile (an untimed step at each length "
                        "compiles first; its seconds are the compile_s column)")
    p.add_argument("--data-parallel", nargs="+", default=["shard"], choices=list(DATA_PARALLEL),
                   help="FSDP2 over the ranks: shard and/or replicate the parameters, gradients and AdamW state "
                        "(default: %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--append", action="store_true",
                   help="merge into an existing model-<preset>.csv in --out (same pattern, method, sp and length: replaced), "
                        "so a sweep can run in pieces")


def _return_freed_memory() -> None:
    """glibc keeps freed heap pages resident; hand them back so that they do not count as held."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _limit_address_space(limit_bytes: int) -> None:
    """CPU ranks: let the process grow to about `limit_bytes` resident. RLIMIT_AS counts address
    space, which runs ahead of resident memory (shared libraries, reserved heaps), so the room
    left is the limit minus what is resident now, added to what is mapped now."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    mapped, resident = (int(status[k].split()[0]) * 1024 for k in ("VmSize", "VmRSS"))
    resource.setrlimit(resource.RLIMIT_AS, (mapped + max(0, limit_bytes - resident), resource.RLIM_INFINITY))


def _formula_bytes(cfg, linear, softmax, seq_len, sp, batch, slots, dtype_bytes) -> int:
    """The methods' spec formulas summed over the model's layers."""
    key_dim = cfg.feature_dim if cfg.linear_kind in ("based", "rebased") else cfg.dim_per_head
    if cfg.linear_kind == "based":  # the 2nd-order Taylor map widens q and k to 1 + f + f^2
        key_dim = 1 + key_dim + key_dim ** 2
    layer = dict(B=batch, N=seq_len, W=sp, S=slots, H=cfg.num_heads, V=cfg.dim_per_head, dtype_bytes=dtype_bytes,
                 decay_bytes=4)  # log decays are computed in fp32
    total = 0
    for kind in cfg.layer_types():
        if kind == "L":
            total += LINEAR_METHODS[linear].bytes_per_rank(Problem(**layer, K=key_dim, decay=cfg.decay_form))
        else:
            total += SOFTMAX_METHODS[softmax].bytes_per_rank(Problem(**layer, K=cfg.dim_per_head, Hkv=cfg.num_kv_heads))
    return total


def _worker(rank, world, port, conf, args, mem_gb, out_path, use_cuda):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.cuda.set_per_process_memory_fraction(min(1.0, mem_gb * 2**30 / torch.cuda.get_device_properties(device).total_memory))
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    group = dist.group.WORLD if world > 1 else None
    dims = ParallelDims(*mesh_for(device.type, range(world), 1, world), device=device) if world > 1 else ParallelDims()
    cfg = preset(args.preset, vocab_size=256, layer_pattern=conf["pattern"])
    # As the trainer: built on the meta device, parallelized, then each rank's shards materialized.
    model = build_model(ModelChoice(preset=args.preset), cfg, cfg.vocab_size, None, device)[0]
    apply_parallelism(model, dims, ParallelChoice(data_parallel=conf["data_parallel"],
                                                  activation_checkpointing=args.checkpointing, compile=args.compile))
    materialize(model, device, seed=0)
    optimizer = make_optimizer(model, OptimChoice(lr=1e-4))
    # Its own group over the same ranks, so that its collectives are told apart from FSDP's (with
    # dp = 1 the trainer's mesh puts both on one group; on NCCL that serialises FSDP's prefetch
    # with the attention's collectives, which this benchmark therefore may overlap where the
    # trainer does not).
    sp_group = dist.new_group(list(range(world))) if world > 1 else None
    sp = SequenceParallel(sp_group, linear=conf["linear"], softmax=args.softmax, layout=args.layout)
    B = args.batch

    def train_step(T: int):
        tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(1))
        inputs, labels = sp.shard(tokens[:, :-1]).to(device), sp.shard(tokens[:, 1:]).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda and world == 1):  # else FSDP's policy
            logits = model(inputs, sp.positions(T, device), sp)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum") / (B * T)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sum_replicated_gradients(model, dims.world_group)  # as the trainer
        clip_grad_norm(model, 1.0)
        optimizer.step()

    # A short step first: the threads torch and gloo start lazily must exist before the limit (a
    # thread started under it aborts the process with no error to report).
    train_step(32 * world)
    if not use_cuda:
        _return_freed_memory()  # what setting up left freed, among others
        _limit_address_space(int(mem_gb * 2**30))
    T, compile_s = conf["seq_len"], None
    if args.compile:  # the blocks compile for this length before the timed steps
        sync(device)
        start = time.perf_counter()
        train_step(T)
        sync(device)
        compile_s = time.perf_counter() - start
    reset_peak_memory(device)
    times, log = [], None
    for step in range(args.steps):
        sync(device)
        start = time.perf_counter()
        # Counting passes every op through Python: only the first step, which the median skips.
        with count_collectives() if step == 0 else contextlib.nullcontext() as counted:
            train_step(T)
        log = log or counted
        sync(device)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        if group is not None:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    attention = log.on(sp_group) if world > 1 else log  # the sequence-parallel collectives; FSDP's apart
    data_parallel = log.on(dims.world_group) if world > 1 else CollectiveLog()  # FSDP's gathers and reductions
    stats = torch.tensor([peak_memory_bytes(device), attention.bytes_sent(), attention.count(), data_parallel.bytes_sent()],
                         dtype=torch.float64, device=device)
    if group is not None:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if rank == 0:
        step_s = statistics.median(times[1:] or times)
        Path(out_path).write_text(json.dumps(dict(status="ok", step_s=step_s, compile_s=compile_s, tokens_per_s=B * T / step_s,
                                                  peak_mb=stats[0].item() / 2**20, bytes_per_rank=int(stats[1]),
                                                  calls_per_rank=int(stats[2]), dp_bytes_per_rank=int(stats[3]))))
    dist.destroy_process_group()


def run_one(conf, args, mem_gb, use_cuda) -> dict:
    cfg = preset(args.preset, vocab_size=256, layer_pattern=conf["pattern"])
    slots = 1 if args.layout == "contiguous" else 2
    row = dict(preset=args.preset, softmax=args.softmax, sp=args.sp, batch=args.batch, params_m=count_parameters(cfg) / 1e6,
               checkpointing=args.checkpointing, compile=args.compile,
               formula_bytes=_formula_bytes(cfg, conf["linear"], args.softmax, conf["seq_len"], args.sp, args.batch, slots,
                                             dtype_bytes=2 if use_cuda else 4), **conf)
    # A rank killed by a signal other than an allocation failure (a gloo transport abort, seen once
    # in a long sweep and not reproducible) says nothing about the method: run it once more and
    # keep the first failure in the printed log.
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            out_path = os.path.join(tmp, "row.json")
            try:
                mp.spawn(_worker, args=(args.sp, free_port(), conf, args, mem_gb, out_path, use_cuda), nprocs=args.sp,
                         join=True)
            except Exception as exc:  # a rank died: out of memory, or a refused configuration
                text = str(exc)
                # SIGKILL: the kernel's OOM killer (the ranks together outgrew the machine)
                oom = any(s in text for s in ("allocate", "out of memory", "OutOfMemory", "std::bad_alloc", "MemoryError",
                                              "signal SIGKILL"))
                reason = "out of memory" if oom else text.strip().splitlines()[-1][:120]
                if attempt == 1 and not oom and "terminated with signal" in text:
                    print(f"  {conf['pattern']:5s} {conf['linear']:9s} T={conf['seq_len']:7d} {reason}; running it again", flush=True)
                    continue
                return {**row, "status": reason}
            return {**row, **json.loads(Path(out_path).read_text())}


def memory_limit_gb(args, use_cuda: bool) -> float:
    """--mem-gb, or 90% of the GPU's memory (CUDA) or of the RAM shared by the --sp ranks."""
    if args.mem_gb is not None:
        return args.mem_gb
    total = (torch.cuda.get_device_properties(0).total_memory if use_cuda
             else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return 0.9 * total / 2**30 / (1 if use_cuda else args.sp)


def run(args, on_row=None) -> tuple[list[dict], dict]:
    """All configurations; `on_row(rows)` after each one (the CLI rewrites its CSV there, so a
    sweep stopped part-way keeps what it measured)."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    mem_gb = memory_limit_gb(args, use_cuda)
    modes = args.data_parallel if args.sp > 1 else ["none"]  # one process: nothing to shard or replicate
    rows = []
    for pattern in args.patterns:
        for linear in args.linear:
            for mode in modes:
                lengths = sorted(args.seq_len)
                while lengths:
                    T = lengths.pop(0)
                    row = run_one(dict(pattern=pattern, linear=linear, data_parallel=mode, seq_len=T), args, mem_gb,
                                  use_cuda)
                    rows.append(row)
                    if on_row is not None:
                        on_row(rows)
                    print(f"  {pattern:5s} {linear:9s} {mode:9s} T={T:7d} "
                          + (f"{row['tokens_per_s']:9.0f} tok/s {row['peak_mb']:8.0f} MB" if row["status"] == "ok"
                             else row["status"]), flush=True)
                    if args.max_seq and not lengths and row["status"] == "ok":
                        growth = 4 if linear in ("ring", "allgather") else 2.2 if "N" in pattern else 2
                        if row["step_s"] * growth <= args.budget_seconds:
                            lengths.append(2 * T)
    return rows, describe(device)


_INTS = ("sp", "seq_len", "batch", "bytes_per_rank", "formula_bytes", "calls_per_rank", "dp_bytes_per_rank")
_FLOATS = ("step_s", "compile_s", "tokens_per_s", "peak_mb", "params_m")


def typed(r: dict) -> dict:
    """A row read back from a CSV (strings) with its numbers as numbers; rows written before the
    data_parallel, checkpointing and compile columns existed were replicated, without
    checkpointing, eager."""
    r = dict(r)
    for k in _INTS + _FLOATS:
        if r.get(k) not in (None, ""):
            r[k] = (int if k in _INTS else float)(r[k])
    if r.get("data_parallel") in (None, ""):
        r["data_parallel"] = "replicate" if r["sp"] > 1 else "none"
    r["checkpointing"] = str(r.get("checkpointing")) == "True"
    r["compile"] = str(r.get("compile")) == "True"
    return r


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows read back from a CSV followed by `new`; a new row replaces an old one with the same KEY."""
    def key(r):
        return tuple(r[k] for k in KEY)

    new = [typed(r) for r in new]
    replaced = {key(r) for r in new}
    return [r for r in map(typed, old) if key(r) not in replaced] + new


def setting(r: dict) -> tuple:
    return r["pattern"], r["linear"], r["data_parallel"], r["checkpointing"], r["compile"]


def longest_fitting(rows, mem_gb) -> dict:
    """(pattern, linear, data_parallel, checkpointing, compile) -> (longest length that ran, shortest
    length that ran out of memory or None, length at which the line through the last two peaks
    reaches mem_gb or None)."""
    rows = [typed(r) for r in rows]
    out = {}
    for key in {setting(r) for r in rows}:
        mine = [r for r in rows if setting(r) == key]
        ok = sorted((r["seq_len"], r["peak_mb"]) for r in mine if r["status"] == "ok")
        oom = min((r["seq_len"] for r in mine if r["status"] == "out of memory"), default=None)
        reach = None
        if len(ok) >= 2 and ok[-1][1] > ok[-2][1]:
            slope = (ok[-1][1] - ok[-2][1]) / (ok[-1][0] - ok[-2][0])
            reach = int(ok[-1][0] + (mem_gb * 1024 - ok[-1][1]) / slope)
        out[key] = (ok[-1][0] if ok else None, oom, reach)
    return out


def print_table(rows, stream) -> None:
    head = (f"{'pattern':8s} {'linear':10s} {'sp':>2s} {'dp mode':9s} {'AC':2s} {'C':1s} {'seq_len':>8s} {'step s':>8s} "
            f"{'tok/s':>8s} {'peak MB':>8s} {'MB sent':>8s} {'formula':>8s} {'calls':>5s} {'dp MB':>8s}")
    stream.write(head + "\n" + "-" * len(head) + "\n")
    for r in map(typed, rows):
        lead = (f"{r['pattern']:8s} {r['linear']:10s} {r['sp']:2d} {r['data_parallel']:9s} "
                f"{'y' if r['checkpointing'] else 'n':2s} {'y' if r['compile'] else 'n':1s} {r['seq_len']:8d} ")
        if r["status"] != "ok":
            stream.write(lead + r["status"] + "\n")
            continue
        dp_mb = r.get("dp_bytes_per_rank")
        stream.write(lead + f"{r['step_s']:8.2f} {r['tokens_per_s']:8.0f} {r['peak_mb']:8.0f} {r['bytes_per_rank'] / 2**20:8.2f} "
                     f"{r['formula_bytes'] / 2**20:8.2f} {r['calls_per_rank']:5d} "
                     + (f"{dp_mb / 2**20:8.1f}" if isinstance(dp_mb, int) else f"{'':8s}") + "\n")
