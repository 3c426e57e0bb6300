"""Train Linear-Llama3 (or a Hugging Face model) with data x sequence parallelism: one readable loop.

    python -m lasp2.train                                             # one process
    torchrun --standalone --nproc_per_node 2 -m lasp2.train --sp 2    # 2 sequence-parallel ranks

Each step draws a global batch from (seed, step), gives each data-parallel rank its rows, shifts
labels on the whole sequence, then shards each sequence over the sequence-parallel ranks (so the
last token of one shard predicts the first of the next). The loss is the mean over every token
of the global batch: each rank contributes sum(its token losses) / (tokens in the global batch),
and FSDP2 sums the gradients over all dp x sp ranks, which is the gradient of that mean whatever
dp and sp are. With more than one process the parameters, gradients and AdamW moments are
sharded over every rank (--data-parallel shard, the default) or replicated.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint
from .data import DataError, batch_for_step, check_ids, load_tokens, packed_batch_for_step, tokenizer_of_run
from .distributed import ConfigError, ParallelDims, init_parallel, shutdown, sum_over_ranks
from .model import DELTA_KINDS, LINEAR_KINDS, PRESETS, LinearLlama, count_parameters, pattern_for_ratio, preset
from .parallel import DELTA_METHODS, LINEAR_METHODS, SOFTMAX_METHODS, SequenceParallel
from .parallel.balance import LayerCosts, Placement, named_layout_costs, plan_placement
from .parallel.cost import LOOPBACK, NVLINK_IB, network_from_json, rates_from_json
from .parallel.registry import AUTO
from .parallel.layout import LAYOUTS, Layout, as_layout
from .parallelize import (DATA_PARALLEL, apply_activation_checkpointing, apply_compile, apply_data_parallel,
                          clip_grad_norm, fp32_parameters, materialize, sum_replicated_gradients)
from .report import MetricsLog, Progress, plot_losses
from .run_config import DataChoice, ModelChoice, OptimChoice, ParallelChoice, RunConfig


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
    hf = m.add_mutually_exclusive_group()
    hf.add_argument("--hf-config", default=None, help="train a freshly initialised Hugging Face model from this local "
                    "config.json (or its directory) instead of Linear-Llama3; needs pip install 'lasp2[hf]' (default: none)")
    hf.add_argument("--hf-model", default=None, metavar="DIR",
                    help="fine-tune a pretrained Hugging Face model: a local directory save_pretrained wrote (config, "
                         "safetensors); each rank reads only its shards; its tokenizer.json is the run's unless "
                         "--tokenizer says otherwise (default: none)")
    par = p.add_argument_group("parallelism")
    par.add_argument("--sp", type=int, default=1, help=f"sequence-parallel ranks; dp = processes / sp {d}")
    par.add_argument("--sp-linear", default="lasp2", choices=[*LINEAR_METHODS, AUTO],
                     help=f"method for linear (and delta-rule) layers; auto: the cost model picks per layer shape {d}")
    par.add_argument("--sp-network", default=None, metavar="JSON",
                     help="the sp links' figures for --sp-linear auto: {\"alpha\": s, \"beta\": bytes/s}, or the "
                          "attn-calibration.json `python -m lasp2_bench attn` writes (default: NVLink/InfiniBand "
                          "figures on NCCL, this host's loopback on gloo)")
    par.add_argument("--sp-softmax", default="allgather", choices=list(SOFTMAX_METHODS), help=f"method for softmax layers {d}")
    par.add_argument("--layout", default="zigzag", choices=LAYOUTS, help=f"how sequences are split over sp ranks {d}")
    par.add_argument("--chunk-size", type=int, default=64, help=f"chunk length of the linear-attention kernels {d}")
    par.add_argument("--data-parallel", default="shard", choices=DATA_PARALLEL,
                     help="with more than one process: shard parameters, gradients and optimizer state over every "
                          "rank (FSDP2) or replicate them (default: %(default)s)")
    par.add_argument("--checkpointing", action="store_true",
                     help="activation checkpointing: recompute each block in the backward (default: off)")
    par.add_argument("--compile", action="store_true",
                     help="torch.compile each block; graphs break only at the sequence-parallel collectives (default: off)")
    data = p.add_argument_group("data")
    data.add_argument("--data", default=None, help="text file or directory, or .npy/.bin tokens (default: the Python standard library's sources)")
    data.add_argument("--tokenizer", default=None, help="local tokenizers JSON file or directory (default: bytes, vocab 256)")
    data.add_argument("--vocab-size", type=int, default=None,
                      help="the model's vocabulary: needed for a .npy/.bin corpus without --tokenizer (its tokens are "
                           "not scanned); for text, at least the tokenizer's (default: the tokenizer's)")
    data.add_argument("--packing", default="none", choices=["none", "documents"],
                      help="none: windows of the token stream; documents: rows of whole documents, each ended by an "
                           "end-of-document token, attention and positions per document (default: %(default)s)")
    data.add_argument("--packed-rows", default="batched", choices=["batched", "one"],
                      help="with --packing documents: batched runs a rank's rows as one packed sequence, one call "
                           "per layer (FLA's cu_seqlens); one runs them a row at a time (default: %(default)s)")
    data.add_argument("--balance", action="store_true",
                      help="with --packing documents (batched rows): every call's documents run in the planner's "
                           "order over its slot table (lasp2.parallel.balance), so that the softmax layers' work "
                           "per rank evens out; off by default: pure linear models gain nothing, and more slots "
                           "per rank mean more state-passing messages")
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
    run.add_argument("--export-hf", default=None, metavar="DIR",
                     help="at the end, write the model as a Hugging Face directory (config, safetensors in the source's "
                          "names and dtypes, tokenizer) that AutoModelForCausalLM.from_pretrained loads; a --hf-config or "
                          "--hf-model run (default: none)")
    run.add_argument("--log-every", type=int, default=10, help=f"progress lines when not on a terminal {d}")
    run.add_argument("--list-presets", action="store_true", help="print every preset's parameter count and exit")
    return p


def parse_config(argv=None) -> RunConfig:
    """The run configuration from a command line (the trainer's flags)."""
    return RunConfig.from_args(build_parser().parse_args(argv))


def model_config(choice: ModelChoice, vocab_size: int):
    try:
        pattern = pattern_for_ratio(choice.hybrid) if choice.hybrid is not None else choice.pattern
    except ValueError as exc:
        raise ConfigError(f"--hybrid {choice.hybrid}: {exc}") from None
    if not pattern or set(pattern) - {"L", "N"}:
        raise ConfigError(f"--pattern {pattern}: use the letters L (linear) and N (softmax), e.g. LLLN")
    return preset(choice.preset, vocab_size=vocab_size, layer_pattern=pattern, linear_kind=choice.linear_kind)


def check_config(config: RunConfig, dp: int, cfg) -> None:
    """Every configuration error, named by its flag, before anything is trained (dp: the
    data-parallel size; cfg: the Linear-Llama3 configuration, None for a Hugging Face model)."""
    par, data, optim = config.parallel, config.data, config.optim
    slots = Layout(par.layout, par.sp).n_slots
    if data.seq_len < 1 or data.seq_len % slots:
        raise ConfigError(f"--seq-len {data.seq_len} must be a positive multiple of {slots} "
                          f"(the {par.layout} layout over --sp {par.sp} cuts each sequence into {slots} equal slots)")
    if data.batch_size < 1 or data.batch_size % dp:
        raise ConfigError(f"--batch-size {data.batch_size} must be a positive multiple of dp = {dp}")
    if optim.grad_accum < 1 or (data.batch_size // dp) % optim.grad_accum:
        raise ConfigError(f"--grad-accum {optim.grad_accum} must divide the {data.batch_size // dp} rows each "
                          f"data-parallel rank takes of --batch-size {data.batch_size}")
    if data.balance and (data.packing != "documents" or data.packed_rows != "batched"):
        raise ConfigError(f"--balance places packed documents: it needs --packing documents with --packed-rows batched "
                          f"(got --packing {data.packing}, --packed-rows {data.packed_rows})")
    if data.packed_rows != "batched" and data.packing != "documents":
        raise ConfigError(f"--packed-rows {data.packed_rows} chooses how packed rows run; it means nothing with "
                          f"--packing {data.packing}")
    if data.doc_sep is not None and data.packing != "documents":
        raise ConfigError(f"--doc-sep {data.doc_sep!r} separates documents for --packing documents; "
                          f"it means nothing with --packing {data.packing}")
    for flag, value in (("--steps", optim.steps), ("--chunk-size", par.chunk_size), ("--val-every", data.val_every)):
        if value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1")
    if cfg is None:  # a Hugging Face model: its mixers' rules are checked when it is parallelized
        return
    # The methods' own rules (decay forms, heads), stated once in their specs.
    layer_types = set(cfg.layer_types())
    delta = cfg.linear_kind in DELTA_KINDS
    linear_methods = DELTA_METHODS if delta else LINEAR_METHODS
    if "L" in layer_types and par.sp_linear not in linear_methods and par.sp_linear != AUTO:  # argparse allows any
        raise ConfigError(f"--sp-linear {par.sp_linear} has no delta-rule form for --linear-kind {cfg.linear_kind} "
                          f"(choose one of {', '.join(DELTA_METHODS)})")
    heads = (cfg.value_heads, cfg.num_heads) if delta else (cfg.num_heads, cfg.num_heads)
    for layer, flag, methods, name, decay, (num_heads, kv_heads) in (
            ("L", "--sp-linear", linear_methods, par.sp_linear, cfg.decay_form, heads),
            ("N", "--sp-softmax", SOFTMAX_METHODS, par.sp_softmax, "none", (cfg.num_heads, cfg.num_kv_heads))):
        if layer in layer_types and name != AUTO:  # auto picks among methods that express every form
            spec = methods[name]
            try:
                spec.check_rules(f"{flag} {spec.name}", decay, num_heads, kv_heads, par.sp)
            except ValueError as exc:
                raise ConfigError(f"{exc} (--linear-kind {cfg.linear_kind}, --preset {config.model.preset}, "
                                  f"--sp {par.sp})") from None
    if delta and "L" in layer_types and data.seq_len // slots < cfg.conv_size - 1:
        raise ConfigError(f"--seq-len {data.seq_len} leaves {data.seq_len // slots} tokens per slot, fewer than the "
                          f"{cfg.conv_size - 1} the short convolution of --linear-kind {cfg.linear_kind} reads before each")


def lr_at(step: int, optim: OptimChoice) -> float:
    """Linear warmup to --lr, then a cosine down to --min-lr at the last step."""
    if step < optim.warmup:
        return optim.lr * (step + 1) / optim.warmup
    progress = (step - optim.warmup) / max(1, optim.steps - 1 - optim.warmup)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, optim: OptimChoice):
    """AdamW(0.9, 0.95); weight decay on matrices and embeddings, none on norms, biases, gains
    and the fp32 decay parameters (A_log, dt_bias; whole on every rank, in a group of their own).
    Sharded (FSDP), each rank's AdamW holds the moments of its own shards only. The fused kernel
    updates each tensor in place (the multi-tensor one allocates a temporary the size of every
    parameter at once, which decides whether a large model fits)."""
    kept = fp32_parameters(model)
    kept_ids = {id(p) for p in kept}
    others = [p for p in model.parameters() if id(p) not in kept_ids]
    decay = [p for p in others if p.dim() >= 2]
    rest = [p for p in others if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": rest, "weight_decay": 0.0},
              {"params": kept, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(0.9, 0.95), eps=optim.adam_eps, fused=True)


def make_batch(data, part: str, seed: int, step: int, choice: DataChoice):
    """(rows [B, T+1], each row's cu_seqlens or None, the labels to skip [B, T] or None) from the
    `part` ("train" or "val") of the corpus: a function of (seed, step) alone. Packed rows skip
    the label of every end-of-document token (it would predict the next document's first token),
    the row's last included; chat data also every label whose token is not a target (not an
    assistant message's)."""
    tokens, starts = (data.train, data.train_starts) if part == "train" else (data.val, data.val_starts)
    labelled = data.train_labelled if part == "train" else data.val_labelled
    if choice.packing == "documents":
        rows, documents = packed_batch_for_step(tokens, starts, seed, step, choice.batch_size, choice.seq_len)
        skip = rows[:, :-1] == data.end_token
    else:
        rows, documents, skip = batch_for_step(tokens, seed, step, choice.batch_size, choice.seq_len), None, None
    if labelled is not None:  # chat data: the same windows of the mask (drawn alike); a label counts if its target is
        targets = (packed_batch_for_step(labelled, starts, seed, step, choice.batch_size, choice.seq_len)[0]
                   if choice.packing == "documents" else
                   batch_for_step(labelled, seed, step, choice.batch_size, choice.seq_len))[:, 1:] == 0
        skip = targets if skip is None else skip | targets
    return check_ids(rows, data.vocab_size, f"--data {choice.path or '(built-in)'}, {part} batch {step}"), documents, skip


def _nll(model, inputs, labels, positions, ctx, autocast: bool):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(inputs, positions, ctx)  # [b, T/sp, vocab]
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)


class Balancer:
    """--balance: the planner's costs for this model (`lasp2.parallel.balance`), and the
    placement of the last packed call, which the progress line and the metrics report."""

    def __init__(self, model, cfg, sp, network, device: torch.device, rates: dict):
        linear, softmax, heads, head_dim, value_dim = _layer_mix(model, cfg)
        # FLOP/s of the kernels: as calibrated (--sp-network with `lasp2_bench attn`'s calibration), else assumed
        rate = rates.get("rate_chunk", 1e14 if device.type == "cuda" else 1e10)
        state_bytes = heads * head_dim * value_dim * 4
        beta = (network or (NVLINK_IB if device.type == "cuda" else LOOPBACK)).link(sp.world)[1]
        # a slot's summary reaches the other W − 1 ranks, forward and backward, in every state-passing layer
        slot_seconds = linear * 2 * (sp.world - 1) * state_bytes / beta
        self.costs = LayerCosts.for_model(linear, softmax, heads, head_dim, rate, slot_seconds,
                                          rates.get("rate_sdpa_masked"))
        self.last: Placement | None = None
        self.unplanned: tuple[float, ...] = ()  # the last call's rank costs in its given order and --layout

    def place(self, sp, inputs, labels, cu):
        """The call's documents in the planner's order over its slot table: (context, inputs,
        labels, cu_seqlens), the tokens permuted document by document; unchanged when the given
        order and --layout are estimated no slower."""
        lengths = (cu[1:] - cu[:-1]).tolist()
        plan = plan_placement(lengths, sp.world, self.costs, total=int(cu[-1]))
        self.unplanned = named_layout_costs(lengths, sp.layout, sp.world, self.costs)
        if max(self.unplanned) <= max(plan.cost):
            self.last = Placement(tuple(range(len(lengths))), as_layout(sp.layout, sp.world), self.unplanned)
            return sp, inputs, labels, cu
        starts = cu[:-1].tolist()
        order = torch.cat([torch.arange(starts[i], starts[i] + lengths[i]) for i in plan.order]).to(inputs.device)
        reordered = torch.tensor([0] + [lengths[i] for i in plan.order]).cumsum(0)
        self.last = plan
        return sp.with_layout(plan.layout), inputs[:, order], labels[:, order], reordered

    def detail(self) -> str:
        if self.last is None:
            return ""
        unplanned = max(self.unplanned) / (sum(self.unplanned) / len(self.unplanned))
        return f" | slowest rank {self.last.imbalance:.2f}x the mean ({unplanned:.2f}x unplanned)"


def _layer_mix(model, cfg) -> tuple[int, int, int, int, int]:
    """(linear or delta layers, softmax layers, heads, key dim, value dim) of Linear-Llama3's
    config, or of a Hugging Face model's (its `layer_types`; full attention counts as softmax)."""
    if cfg is not None:
        types = cfg.layer_types()
        return types.count("L"), types.count("N"), cfg.num_heads, cfg.dim_per_head, cfg.dim_per_head
    config = model.model.config
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
    softmax = sum("full" in t or t == "attention" for t in types)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return len(types) - softmax, softmax, heads, head_dim, head_dim


def sequence_loss(model, sp, dims, batch, choice: DataChoice, part: int = 0, parts: int = 1, balancer=None):
    """This rank's share of the mean token loss of the global batch ([B, T+1] rows, their
    documents or None), from the `part`-th of `parts` equal slices of its rows (micro-batches
    of gradient accumulation; the mean stays over every token of the global batch). balancer:
    --balance's `Balancer` (packed rows, batched)."""
    tokens, documents, skip = batch
    rows = choice.batch_size // dims.dp // parts
    first = dims.dp_rank * (choice.batch_size // dims.dp) + part * rows
    mine = tokens[first:first + rows].to(dims.device)
    # One CUDA process computes in bf16 by autocast; several by FSDP's mixed-precision policy.
    autocast = dims.device.type == "cuda" and dims.world == 1
    counted = choice.batch_size * choice.seq_len - (0 if skip is None else int(skip.sum()))  # over the global batch
    counted = max(counted, 1)  # a batch without a target (a chat cut to its prompt) adds nothing
    labels = mine[:, 1:] if skip is None else mine[:, 1:].masked_fill(skip[first:first + rows].to(dims.device), -100)
    if documents is None:
        inputs, labels = sp.shard(mine[:, :-1]), sp.shard(labels)  # shift (and mask) first, then shard
        positions = sp.positions(choice.seq_len, dims.device)  # global positions, for RoPE
        return _nll(model, inputs, labels, positions, sp, autocast) / counted
    # Packed rows (B = 1 per call, documents as cu_seqlens; positions restart at each document):
    # batched, the rank's rows concatenated into one packed sequence, each row's documents
    # shifted to its place; one, a call per row.
    calls = [range(rows)] if choice.packed_rows == "batched" else [[i] for i in range(rows)]
    total = 0.0
    for members in calls:
        T = choice.seq_len * len(members)
        cu = concatenated_documents([documents[first + i] for i in members], choice.seq_len)
        inputs, row_labels = (t[list(members)].reshape(1, T) for t in (mine[:, :-1], labels))
        ctx = sp
        if balancer is not None and sp.world > 1:
            ctx, inputs, row_labels, cu = balancer.place(sp, inputs, row_labels, cu)
        cu = cu.to(dims.device)
        positions = ctx.positions(T, dims.device, cu_seqlens=cu)
        total = total + _nll(model, ctx.shard(inputs), ctx.shard(row_labels), positions, ctx.with_documents(cu),
                             autocast)
    return total / counted


def concatenated_documents(offsets: list[torch.Tensor], seq_len: int) -> torch.Tensor:
    """Rows of seq_len tokens, each with its documents' offsets [0, ..., seq_len], as one packed
    sequence: the offsets of every document of every row, in row order."""
    shifted = [row[:-1] + i * seq_len for i, row in enumerate(offsets)]
    return torch.cat(shifted + [offsets[0].new_tensor([len(offsets) * seq_len])])


def train_step(model, optimizer, sp, dims, data, step: int, config: RunConfig, balancer=None) -> float:
    batch = make_batch(data, "train", config.seed, step, config.data)
    optimizer.zero_grad(set_to_none=True)
    loss, parts = 0.0, config.optim.grad_accum
    replicated = dims.world > 1 and config.parallel.data_parallel == "replicate"
    for part in range(parts):  # micro-batches: their gradients add up to the batch's
        if replicated:  # whole gradients are kept anyway: all-reduce them once, after the last micro-batch
            model.set_requires_gradient_sync(part == parts - 1)
        micro = sequence_loss(model, sp, dims, batch, config.data, part, parts, balancer)
        micro.backward()  # with more than one process, FSDP sums the gradients over dp x sp here
        loss = loss + micro.detach()
    sum_replicated_gradients(model, dims.world_group)  # the fp32 decay parameters FSDP leaves whole
    clip_grad_norm(model, config.optim.clip)
    optimizer.step()
    return sum_over_ranks(loss, dims).item()


@torch.no_grad()
def evaluate(model, sp, dims, data, config: RunConfig, balancer=None) -> float:
    losses = [sequence_loss(model, sp, dims, make_batch(data, "val", config.seed + 1, i, config.data), config.data,
                            balancer=balancer) for i in range(config.data.val_batches)]
    return sum_over_ranks(torch.stack(losses).mean(), dims).item()


def describe(model) -> dict:
    """The fields that define the model's parameters (saved with each checkpoint, compared on
    resume): Linear-Llama3's configuration, or the Hugging Face model's config."""
    config = model.cfg if hasattr(model, "cfg") else model.model.config
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config.to_diff_dict()
    fields = {k: v for k, v in fields.items() if k != "_attn_implementation"}
    # as the checkpoint's JSON holds it (tuples become lists, a torch dtype its name)
    return json.loads(json.dumps(fields, default=lambda value: str(value).removeprefix("torch.")))


def model_type(model) -> str:
    """"linear_llama", or the Hugging Face model's model_type (what rebuilds it from `describe`)."""
    return "linear_llama" if hasattr(model, "cfg") else model.model.config.model_type


def build_model(choice: ModelChoice, cfg, vocab_size: int, sp, device: torch.device):
    """(model, a line describing it, the run's default name): Linear-Llama3 from cfg, built on
    the meta device (nothing allocated: `parallelize.materialize` gives it memory and weights
    once FSDP has sharded it), or with --hf-config a Hugging Face model parallelized over sp (its
    mixers run through lasp2), built on the CPU and moved to `device`, or with --hf-model a
    pretrained one, built on the meta device (materialize reads each rank's shards). Each has
    `blocks`, the units that activation checkpointing and FSDP wrap."""
    if cfg is not None:
        with torch.device("meta"):
            model = LinearLlama(cfg)
        return model, f"{choice.preset} (pattern {cfg.layer_pattern}, linear {cfg.linear_kind})", \
            f"{choice.preset}-{cfg.linear_kind}-{cfg.layer_pattern}"
    flag, path = ("--hf-model", choice.hf_model) if choice.hf_model else ("--hf-config", choice.hf_config)
    try:
        from .integrations.transformers import causal_lm_from_config, causal_lm_from_pretrained
    except ImportError as exc:
        raise ConfigError(f"{flag} {path}: {exc}") from None
    try:
        model = (causal_lm_from_pretrained(path, vocab_size, sp) if choice.hf_model else
                 causal_lm_from_config(path, vocab_size, sp).to(device))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{flag} {path}: {exc}") from None
    kind = model.model.config.model_type
    return model, f"Hugging Face {kind} ({path}{', pretrained' if choice.hf_model else ''})", f"hf-{kind}"


def model_source(config: RunConfig) -> str | None:
    """The pretrained directory a run starts from (resolved), recorded with its checkpoints."""
    return None if config.model.hf_model is None else str(Path(config.model.hf_model).resolve())


def apply_parallelism(model, dims: ParallelDims, choice: ParallelChoice) -> str:
    """Activation checkpointing, torch.compile per block, then FSDP2 over the flattened dp x sp
    mesh (one process: none), in torchtitan's order; returns a few words saying what was applied."""
    applied = []
    if choice.activation_checkpointing:
        apply_activation_checkpointing(model.blocks)
        applied.append("activation checkpointing")
    if choice.compile:
        apply_compile(model.blocks)
        applied.append("compiled blocks")
    if dims.world > 1:
        apply_data_parallel(model, model.blocks, dims.flat_mesh, choice.data_parallel, dims.device)
        applied.append(f"{'sharded' if choice.data_parallel == 'shard' else 'replicated'} over {dims.world} ranks")
    return ", ".join(applied) or "one process"


def train(config: RunConfig, dims: ParallelDims, stream=None) -> dict:
    """Runs the configured training; returns {"losses": [...], "val_loss": ..., "run_dir": ..., "model": ...}."""
    choice = config.data
    tokenizer = tokenizer_of_run(choice.tokenizer, config.model.hf_model)
    data = load_tokens(choice.path, tokenizer, choice.val_fraction, choice.seq_len + 1,
                       documents=choice.packing == "documents", doc_sep=choice.doc_sep, vocab_size=choice.vocab_size)
    hf = config.model.hf_config or config.model.hf_model
    cfg = None if hf else model_config(config.model, data.vocab_size)
    if config.run.export_hf and not hf:
        raise ConfigError(f"--export-hf {config.run.export_hf} writes a Hugging Face model: it needs --hf-model or "
                          f"--hf-config (Linear-Llama3 has no Hugging Face format)")
    check_config(config, dims.dp, cfg)
    par = config.parallel
    delta = par.sp_linear if cfg is not None and cfg.linear_kind in DELTA_KINDS else "lasp2"  # either family
    network = None if par.sp_network is None else network_from_json(Path(par.sp_network).read_text(), dims.sp)
    sp = SequenceParallel(dims.sp_group, linear=par.sp_linear, softmax=par.sp_softmax, layout=par.layout,
                          chunk_size=par.chunk_size, delta=delta, network=network)
    torch.manual_seed(config.seed)
    model, about, name = build_model(config.model, cfg, data.vocab_size, sp, dims.device)
    n_params = sum(p.numel() for p in model.parameters())
    run_dir = Path(config.run.out or f"runs/{name}")
    progress, start = Progress(config.optim.steps, dims.is_main, config.run.log_every, stream or sys.stdout), 0
    resume_from = checkpoint.usable(run_dir, progress.note) if config.run.resume else None
    if resume_from is None and config.run.resume and checkpoint.latest(run_dir) is not None:
        raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} can be loaded (see above); "
                          f"not starting over on top of them")
    if resume_from is not None:  # before any weight is read
        saved = checkpoint.saved_state(resume_from)
        started_from = saved.get("hf_model")
        if started_from != model_source(config):
            raise ConfigError(f"--resume {resume_from}: the run started from --hf-model {started_from}, this one gives "
                              f"{model_source(config)}")
        differ = checkpoint.model_differences(saved.get("model"), describe(model))
        if differ:
            raise ConfigError(f"--resume {resume_from}: the checkpoint's model differs from this run's in "
                              + ", ".join(differ))
    applied = apply_parallelism(model, dims, par)
    materialize(model, dims.device, config.seed)  # a meta-device model: this rank's shards, the seed's or pretrained weights
    optimizer = make_optimizer(model, config.optim)
    if resume_from is not None:
        start = checkpoint.load(resume_from, model, optimizer, dims, config.seed, progress.note)["step"] + 1
    elif dims.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    metrics = MetricsLog(run_dir / "metrics.jsonl", dims.is_main)
    progress.note(
        f"model {about}: {n_params / 1e6:.2f}M parameters | data {data.description}: {len(data.train) / 1e6:.2f}M "
        f"train, {len(data.val) / 1e3:.0f}k val tokens, vocab {data.vocab_size} | dp {dims.dp} x sp {dims.sp} "
        f"({par.sp_linear} + {par.sp_softmax}, {par.layout}; {applied}) on {dims.device.type}"
        + (f" | resumed from {resume_from.name}" if resume_from else "")
    )
    losses, val_loss, optim, said = [], None, config.optim, set()
    rates = {} if par.sp_network is None else rates_from_json(Path(par.sp_network).read_text())
    balancer = Balancer(model, cfg, sp, network, dims.device, rates) if choice.balance else None
    last = optim.steps if optim.stop_at is None else min(optim.steps, optim.stop_at)
    for step in range(start, last):
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, optim)  # the schedule is a function of the step, restored with it
        loss = train_step(model, optimizer, sp, dims, data, step, config, balancer)
        tokens_per_s = choice.batch_size * choice.seq_len / (time.perf_counter() - began)
        losses.append(loss)
        placed = {} if balancer is None or balancer.last is None else {
            "rank_cost_s": list(balancer.last.cost), "imbalance": balancer.last.imbalance,
            "unplanned_rank_cost_s": list(balancer.unplanned),
            "slots_per_rank": balancer.last.layout.slots_per_rank}
        metrics.write(step=step, loss=loss, lr=lr_at(step, optim), tokens_per_s=tokens_per_s, **placed)
        progress.update(step, loss, tokens_per_s, "" if balancer is None else balancer.detail())
        for shape, (_, why) in sp.decisions.items():  # --sp-linear auto: what it picked, once per layer shape
            if shape not in said:
                progress.note(f"--sp-linear auto: {why}")
                said.add(shape)
        if (step + 1) % choice.val_every == 0 or step + 1 == last:
            val_loss = evaluate(model, sp, dims, data, config, balancer)
            metrics.write(step=step, val_loss=val_loss)
        if config.run.ckpt_every and ((step + 1) % config.run.ckpt_every == 0 or step + 1 == last):
            checkpoint.save(run_dir, step, model, optimizer, dims, {"config": config.as_dict(), "model": describe(model),
                                                                    "model_type": model_type(model),
                                                                    "hf_model": model_source(config)})
    if config.run.export_hf:
        from .integrations.pretrained import save_pretrained

        save_pretrained(model.model, config.run.export_hf, source=config.model.hf_model, tokenizer=tokenizer,
                        group=dims.world_group, rank=dims.rank)
        progress.note(f"wrote the model to {config.run.export_hf} (AutoModelForCausalLM.from_pretrained loads it)")
    if dims.is_main and (run_dir / "metrics.jsonl").is_file():
        plotted = plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png", about)
        plot = "loss.png" if plotted else "no loss.png (matplotlib is not installed: pip install lasp2[bench])"
        summary = (f"final loss {losses[-1]:.4f}, validation {val_loss:.4f}" if losses else
                   f"nothing left to train (resumed at step {start} of {last})")
        progress.note(f"{summary}; wrote {run_dir}/metrics.jsonl, {plot}, checkpoints/")
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
    config, dims = RunConfig.from_args(args), None
    try:
        dims = init_parallel(config.parallel.sp)
        train(config, dims)
    except (ConfigError, DataError) as exc:  # every rank stops; rank 0 says why in one line
        main_rank = dims.is_main if dims is not None else os.environ.get("RANK", "0") == "0"
        parser.exit(2, f"{parser.prog}: error: {exc}\n" if main_rank else None)
    finally:
        if dims is not None:
            shutdown(dims)
    return 0


if __name__ == "__main__":
    sys.exit(main())
