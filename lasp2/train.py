"""Train Linear-Llama3 with data x sequence parallelism: one readable loop.

    python -m lasp2.train                                             # one process
    torchrun --standalone --nproc_per_node 2 -m lasp2.train --sp 2    # 2 sequence-parallel ranks

Every rank holds the whole model. Each step draws a global batch from (seed, step), gives each
data-parallel rank its rows, shifts labels on the whole sequence, then shards each sequence
over the sequence-parallel ranks (so the last token of one shard predicts the first of the
next). The loss is the mean over every token of the global batch: each rank contributes
sum(its token losses) / (tokens in the global batch), and gradients are summed over all
dp x sp ranks, which is the gradient of that mean whatever dp and sp are.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint
from .data import DataError, batch_for_step, load_tokens, packed_batch_for_step
from .distributed import ConfigError, ParallelDims, init_parallel, reduce_gradients, shutdown, sum_over_ranks
from .model import DELTA_KINDS, LINEAR_KINDS, PRESETS, LinearLlama, count_parameters, pattern_for_ratio, preset
from .parallel import DELTA_METHODS, LINEAR_METHODS, SOFTMAX_METHODS, SequenceParallel
from .parallel.layout import LAYOUTS, Layout
from .report import MetricsLog, Progress, plot_losses


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineErrors(prog="lasp2-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = "(default: %(default)s)"
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="debug", choices=list(PRESETS), help=f"model size {d}")
    m.add_argument("--linear-kind", default="basic", choices=LINEAR_KINDS, help=f"linear-attention variant {d}")
    shape = m.add_mutually_exclusive_group()
    shape.add_argument("--pattern", default="LLLN", help=f"layer types repeated to the depth, L linear, N softmax {d}")
    shape.add_argument("--hybrid", default=None, help="share of softmax layers instead of --pattern: 0, 1/8, 1/4, 1/2 or 1")
    m.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block (default: off)")
    m.add_argument("--hf-config", default=None, help="train a Hugging Face model from this local config.json (or its "
                   "directory) instead of Linear-Llama3; needs pip install 'lasp2[hf]' (default: none)")
    par = p.add_argument_group("parallelism")
    par.add_argument("--sp", type=int, default=1, help=f"sequence-parallel ranks; dp = processes / sp {d}")
    par.add_argument("--sp-linear", default="lasp2", choices=list(LINEAR_METHODS), help=f"method for linear layers {d}")
    par.add_argument("--sp-softmax", default="allgather", choices=list(SOFTMAX_METHODS), help=f"method for softmax layers {d}")
    par.add_argument("--layout", default="zigzag", choices=LAYOUTS, help=f"how sequences are split over sp ranks {d}")
    par.add_argument("--chunk-size", type=int, default=64, help=f"chunk length of the linear-attention kernels {d}")
    data = p.add_argument_group("data")
    data.add_argument("--data", default=None, help="text file or directory, or .npy/.bin tokens (default: the Python standard library's sources)")
    data.add_argument("--tokenizer", default=None, help="local tokenizers JSON file or directory (default: bytes, vocab 256)")
    data.add_argument("--packing", default="none", choices=["none", "documents"],
                      help="none: windows of the token stream; documents: rows of whole documents, each ended by an "
                           "end-of-document token, attention and positions per document (default: %(default)s)")
    data.add_argument("--doc-sep", default=None,
                      help="with --packing documents: the string between documents of a text corpus (default: each "
                           "file is one), or the token id that ends each document of a .npy/.bin corpus")
    data.add_argument("--seq-len", type=int, default=256, help=f"tokens per sequence {d}")
    data.add_argument("--batch-size", type=int, default=8, help=f"sequences per step, over all data-parallel ranks {d}")
    data.add_argument("--val-fraction", type=float, default=0.01, help=f"tail of the corpus held out {d}")
    data.add_argument("--val-every", type=int, default=50, help=f"steps between validation losses {d}")
    data.add_argument("--val-batches", type=int, default=4, help=f"batches per validation loss {d}")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=150, help=f"optimizer steps; the schedule spans them {d}")
    opt.add_argument("--stop-at", type=int, default=None, help="end this session after this many steps (checkpointed), "
                     "e.g. to fit a time limit; continue later with --resume (default: run to --steps)")
    opt.add_argument("--lr", type=float, default=2e-3, help=f"peak learning rate {d}")
    opt.add_argument("--min-lr", type=float, default=1e-6, help=f"learning rate at the end of the cosine {d}")
    opt.add_argument("--warmup", type=int, default=20, help=f"steps of linear warmup {d}")
    opt.add_argument("--weight-decay", type=float, default=0.1, help=f"AdamW weight decay on matrices {d}")
    opt.add_argument("--clip", type=float, default=1.0, help=f"gradient-norm clip {d}")
    opt.add_argument("--grad-accum", type=int, default=1,
                     help=f"micro-batches per optimizer step, each batch-size / dp / grad-accum rows {d}")
    opt.add_argument("--adam-eps", type=float, default=1e-8, help=f"AdamW epsilon {d}")
    opt.add_argument("--seed", type=int, default=0, help=f"seed of the weights and of the data order {d}")
    run = p.add_argument_group("run")
    run.add_argument("--out", default=None, help="run directory (default: runs/<preset>-<kind>-<pattern>)")
    run.add_argument("--ckpt-every", type=int, default=50, help=f"steps between checkpoints, 0 for none {d}")
    run.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    run.add_argument("--log-every", type=int, default=10, help=f"progress lines when not on a terminal {d}")
    run.add_argument("--list-presets", action="store_true", help="print every preset's parameter count and exit")
    return p


def model_config(args, vocab_size: int):
    try:
        pattern = pattern_for_ratio(args.hybrid) if args.hybrid is not None else args.pattern
    except ValueError as exc:
        raise ConfigError(f"--hybrid {args.hybrid}: {exc}") from None
    if not pattern or set(pattern) - {"L", "N"}:
        raise ConfigError(f"--pattern {pattern}: use the letters L (linear) and N (softmax), e.g. LLLN")
    return preset(args.preset, vocab_size=vocab_size, layer_pattern=pattern, linear_kind=args.linear_kind,
                  checkpointing=args.checkpointing)


def check_args(args, dims: ParallelDims, cfg) -> None:
    """Every configuration error, named by its flag, before anything is trained."""
    slots = Layout(args.layout, args.sp).n_slots
    if args.seq_len < 1 or args.seq_len % slots:
        raise ConfigError(f"--seq-len {args.seq_len} must be a positive multiple of {slots} "
                          f"(the {args.layout} layout over --sp {args.sp} cuts each sequence into {slots} equal slots)")
    if args.batch_size < 1 or args.batch_size % dims.dp:
        raise ConfigError(f"--batch-size {args.batch_size} must be a positive multiple of dp = {dims.dp}")
    if args.grad_accum < 1 or (args.batch_size // dims.dp) % args.grad_accum:
        raise ConfigError(f"--grad-accum {args.grad_accum} must divide the {args.batch_size // dims.dp} rows each "
                          f"data-parallel rank takes of --batch-size {args.batch_size}")
    if args.doc_sep is not None and args.packing != "documents":
        raise ConfigError(f"--doc-sep {args.doc_sep!r} separates documents for --packing documents; "
                          f"it means nothing with --packing {args.packing}")
    for flag, value in (("--steps", args.steps), ("--chunk-size", args.chunk_size), ("--val-every", args.val_every)):
        if value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1")
    if cfg is None:  # a Hugging Face model: its mixers' rules are checked when it is parallelized
        return
    # The methods' own rules (decay forms, heads), stated once in their specs.
    layer_types = set(cfg.layer_types())
    delta = cfg.linear_kind in DELTA_KINDS
    linear_methods = DELTA_METHODS if delta else LINEAR_METHODS
    if "L" in layer_types and args.sp_linear not in linear_methods:  # argparse allows any linear method
        raise ConfigError(f"--sp-linear {args.sp_linear} has no delta-rule form for --linear-kind {cfg.linear_kind} "
                          f"(choose one of {', '.join(DELTA_METHODS)})")
    heads = (cfg.value_heads, cfg.num_heads) if delta else (cfg.num_heads, cfg.num_heads)
    for layer, flag, methods, name, decay, (num_heads, kv_heads) in (
            ("L", "--sp-linear", linear_methods, args.sp_linear, cfg.decay_form, heads),
            ("N", "--sp-softmax", SOFTMAX_METHODS, args.sp_softmax, "none", (cfg.num_heads, cfg.num_kv_heads))):
        if layer in layer_types:
            spec = methods[name]
            try:
                spec.check_rules(f"{flag} {spec.name}", decay, num_heads, kv_heads, args.sp)
            except ValueError as exc:
                raise ConfigError(f"{exc} (--linear-kind {cfg.linear_kind}, --preset {args.preset}, --sp {args.sp})") from None
    if delta and "L" in layer_types and args.seq_len // slots < cfg.conv_size - 1:
        raise ConfigError(f"--seq-len {args.seq_len} leaves {args.seq_len // slots} tokens per slot, fewer than the "
                          f"{cfg.conv_size - 1} the short convolution of --linear-kind {cfg.linear_kind} reads before each")


def lr_at(step: int, args) -> float:
    """Linear warmup to --lr, then a cosine down to --min-lr at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - 1 - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, args):
    """AdamW(0.9, 0.95); weight decay on matrices and embeddings, none on norms, biases, gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=args.adam_eps)


def make_batch(tokens, starts, end_token, seed: int, step: int, args):
    """(rows [B, T+1], each row's cu_seqlens or None, the labels to skip [B, T] or None): a
    function of (seed, step) alone. Packed rows skip the label of every end-of-document token
    (it would predict the next document's first token), the row's last included."""
    if args.packing == "documents":
        rows, documents = packed_batch_for_step(tokens, starts, seed, step, args.batch_size, args.seq_len)
        return rows, documents, rows[:, :-1] == end_token
    return batch_for_step(tokens, seed, step, args.batch_size, args.seq_len), None, None


def _nll(model, inputs, labels, positions, ctx, device):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(inputs, positions, ctx)  # [b, T/sp, vocab]
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)


def sequence_loss(model, sp, dims, batch, args, part: int = 0, parts: int = 1):
    """This rank's share of the mean token loss of the global batch ([B, T+1] rows, their
    documents or None), from the `part`-th of `parts` equal slices of its rows (micro-batches
    of gradient accumulation; the mean stays over every token of the global batch)."""
    tokens, documents, skip = batch
    rows = args.batch_size // dims.dp // parts
    first = dims.dp_rank * (args.batch_size // dims.dp) + part * rows
    mine = tokens[first:first + rows].to(dims.device)
    if documents is None:
        inputs, labels = sp.shard(mine[:, :-1]), sp.shard(mine[:, 1:])  # shift first, then shard
        positions = sp.positions(args.seq_len, dims.device)  # global positions, for RoPE
        return _nll(model, inputs, labels, positions, sp, dims.device) / (args.batch_size * args.seq_len)
    # Packed rows, one at a time (documents are given per row, B = 1); positions restart.
    counted = args.batch_size * args.seq_len - int(skip.sum())  # over the global batch
    total = 0.0
    for i in range(rows):
        cu = documents[first + i].to(dims.device)
        labels = mine[i:i + 1, 1:].masked_fill(skip[first + i:first + i + 1].to(dims.device), -100)
        positions = sp.positions(args.seq_len, dims.device, cu_seqlens=cu)
        total = total + _nll(model, sp.shard(mine[i:i + 1, :-1]), sp.shard(labels), positions, sp.with_documents(cu),
                             dims.device)
    return total / counted


def train_step(model, optimizer, sp, dims, data, step, args) -> float:
    batch = make_batch(data.train, data.train_starts, data.end_token, args.seed, step, args)
    optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    for part in range(args.grad_accum):  # micro-batches: their gradients add up to the batch's
        micro = sequence_loss(model, sp, dims, batch, args, part, args.grad_accum)
        micro.backward()
        loss = loss + micro.detach()
    reduce_gradients(model.parameters(), dims)  # sum over dp x sp: the gradient of the global mean
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    optimizer.step()
    return sum_over_ranks(loss, dims).item()


@torch.no_grad()
def evaluate(model, sp, dims, data, args) -> float:
    losses = [sequence_loss(model, sp, dims, make_batch(data.val, data.val_starts, data.end_token, args.seed + 1, i,
                                                        args), args)
              for i in range(args.val_batches)]
    return sum_over_ranks(torch.stack(losses).mean(), dims).item()


def describe(model) -> dict:
    """The fields that define the model's parameters (saved with each checkpoint, compared on
    resume): Linear-Llama3's configuration, or the Hugging Face model's config."""
    config = model.cfg if hasattr(model, "cfg") else model.model.config
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config.to_diff_dict()
    fields = {k: v for k, v in fields.items() if k not in ("checkpointing", "_attn_implementation")}
    return json.loads(json.dumps(fields))  # as the checkpoint's JSON holds it (tuples become lists)


def build_model(args, cfg, vocab_size: int, sp):
    """(model, a line describing it, the run's default name): Linear-Llama3 from cfg, or with
    --hf-config a Hugging Face model parallelized over sp (its mixers run through lasp2)."""
    if cfg is not None:
        return LinearLlama(cfg), f"{args.preset} (pattern {cfg.layer_pattern}, linear {cfg.linear_kind})", \
            f"{args.preset}-{cfg.linear_kind}-{cfg.layer_pattern}"
    try:
        from .integrations.transformers import causal_lm_from_config
    except ImportError as exc:
        raise ConfigError(f"--hf-config {args.hf_config}: {exc}") from None
    try:
        model = causal_lm_from_config(args.hf_config, vocab_size, sp)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--hf-config {args.hf_config}: {exc}") from None
    model_type = model.model.config.model_type
    return model, f"Hugging Face {model_type} ({args.hf_config})", f"hf-{model_type}"


def train(args, dims: ParallelDims, stream=sys.stdout) -> dict:
    """Runs the configured training; returns {"losses": [...], "val_loss": ..., "run_dir": ...}."""
    data = load_tokens(args.data, args.tokenizer, args.val_fraction, args.seq_len + 1,
                       documents=args.packing == "documents", doc_sep=args.doc_sep)
    cfg = None if args.hf_config else model_config(args, data.vocab_size)
    check_args(args, dims, cfg)
    delta = args.sp_linear if cfg is not None and cfg.linear_kind in DELTA_KINDS else "lasp2"  # either family
    sp = SequenceParallel(dims.sp_group, linear=args.sp_linear, softmax=args.sp_softmax, layout=args.layout,
                          chunk_size=args.chunk_size, delta=delta)
    torch.manual_seed(args.seed)
    model, about, name = build_model(args, cfg, data.vocab_size, sp)
    model = model.to(dims.device)
    run_dir = Path(args.out or f"runs/{name}")
    optimizer = make_optimizer(model, args)
    progress, start = Progress(args.steps, dims.is_main, args.log_every, stream), 0
    resume_from = checkpoint.usable(run_dir, dims.rank, progress.note) if args.resume else None
    if resume_from is not None:
        differ = checkpoint.model_differences(checkpoint.saved_state(resume_from).get("model"), describe(model))
        if differ:
            raise ConfigError(f"--resume {resume_from}: the checkpoint's model differs from this run's in "
                              + ", ".join(differ))
        start = checkpoint.load(resume_from, model, optimizer, dims)["step"] + 1
    elif dims.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    metrics = MetricsLog(run_dir / "metrics.jsonl", dims.is_main)
    progress.note(
        f"model {about}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | data {data.description}: {len(data.train) / 1e6:.2f}M train, {len(data.val) / 1e3:.0f}k val tokens, "
        f"vocab {data.vocab_size} | dp {dims.dp} x sp {dims.sp} ({args.sp_linear} + {args.sp_softmax}, {args.layout}) on "
        f"{dims.device.type}" + (f" | resumed from {resume_from.name}" if resume_from else "")
    )
    losses, val_loss = [], None
    last = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
    for step in range(start, last):
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)  # the schedule is a function of the step, restored with it
        loss = train_step(model, optimizer, sp, dims, data, step, args)
        tokens_per_s = args.batch_size * args.seq_len / (time.perf_counter() - began)
        losses.append(loss)
        metrics.write(step=step, loss=loss, lr=lr_at(step, args), tokens_per_s=tokens_per_s)
        progress.update(step, loss, tokens_per_s)
        if (step + 1) % args.val_every == 0 or step + 1 == last:
            val_loss = evaluate(model, sp, dims, data, args)
            metrics.write(step=step, val_loss=val_loss)
        if args.ckpt_every and ((step + 1) % args.ckpt_every == 0 or step + 1 == last):
            checkpoint.save(run_dir, step, model, optimizer, dims, {"args": vars(args), "model": describe(model)})
    if dims.is_main and (run_dir / "metrics.jsonl").is_file():
        plotted = plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png", about)
        plot = "loss.png" if plotted else "no loss.png (matplotlib is not installed: pip install lasp2[bench])"
        progress.note(f"final loss {losses[-1] if losses else float('nan'):.4f}, validation {val_loss:.4f}; "
                      f"wrote {run_dir}/metrics.jsonl, {plot}, checkpoints/")
    return {"losses": losses, "val_loss": val_loss, "run_dir": run_dir, "model": model}


def list_presets(stream=sys.stdout) -> None:
    for name, cfg in PRESETS.items():
        hybrid = cfg.replace(layer_pattern="LLLN")
        stream.write(f"{name:6s} {cfg.num_layers:3d} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads: "
                     f"{count_parameters(hybrid) / 1e6:9.2f}M parameters (vocab {cfg.vocab_size}), "
                     f"{count_parameters(hybrid.replace(vocab_size=256)) / 1e6:9.2f}M with the byte vocabulary\n")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_presets:
        list_presets()
        return 0
    dims = None
    try:
        dims = init_parallel(args.sp)
        train(args, dims)
    except (ConfigError, DataError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    finally:
        if dims is not None:
            shutdown(dims)
    return 0


if __name__ == "__main__":
    sys.exit(main())
