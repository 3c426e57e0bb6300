"""The trainer's configuration, typed: built once from the command line (`from_args`) and handed
out by section, each function taking the values it needs. Frozen: nothing changes it later."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelChoice:
    """Which model: a Linear-Llama3 preset, its linear variant and layer pattern (L linear, N
    softmax; from --pattern or --hybrid), or a Hugging Face config.json."""

    preset: str = "debug"
    linear_kind: str = "basic"
    pattern: str = "LLLN"
    hybrid: str | None = None
    hf_config: str | None = None
    hf_model: str | None = None  # a save_pretrained directory: its config, weights and tokenizer


@dataclass(frozen=True)
class ParallelChoice:
    """How the job splits the work: sequence parallelism (methods, layout, chunk length), data
    parallelism over every rank (shard or replicate), activation checkpointing and
    torch.compile per block."""

    sp: int = 1
    sp_linear: str = "lasp2"
    sp_softmax: str = "allgather"
    sp_network: str | None = None  # JSON of the links' α and β, for --sp-linear auto
    layout: str = "zigzag"
    chunk_size: int = 64
    data_parallel: str = "shard"
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass(frozen=True)
class DataChoice:
    """The corpus and how batches are cut from it."""

    path: str | None = None
    tokenizer: str | None = None
    vocab_size: int | None = None
    packing: str = "none"
    packed_rows: str = "batched"  # --packing documents: a rank's rows in one call, or one call per row
    balance: bool = False  # --packing documents, batched: the planner's document order and slot table
    doc_sep: str | None = None
    seq_len: int = 256
    batch_size: int = 8
    val_fraction: float = 0.01
    val_every: int = 50
    val_batches: int = 4


@dataclass(frozen=True)
class OptimChoice:
    """The optimizer, its schedule and how many steps it takes."""

    steps: int = 150
    stop_at: int | None = None
    lr: float = 2e-3
    min_lr: float = 1e-6
    warmup: int = 20
    weight_decay: float = 0.1
    clip: float = 1.0
    grad_accum: int = 1
    adam_eps: float = 1e-8


@dataclass(frozen=True)
class RunChoice:
    """Where the run lives and how it reports and saves."""

    out: str | None = None
    ckpt_every: int = 50
    resume: bool = False
    log_every: int = 10
    export_hf: str | None = None  # a Hugging Face directory written at the end of the run


@dataclass(frozen=True)
class RunConfig:
    model: ModelChoice = ModelChoice()
    parallel: ParallelChoice = ParallelChoice()
    data: DataChoice = DataChoice()
    optim: OptimChoice = OptimChoice()
    run: RunChoice = RunChoice()
    seed: int = 0  # of the weights and of the data order

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunConfig":
        """From the trainer's parsed command line (lasp2.train.build_parser): each field of each
        section is the flag of the same name (`data.path` is --data)."""
        values = vars(args)
        renamed = {"path": "data", "activation_checkpointing": "checkpointing"}

        def section(kind):
            return kind(**{f.name: values[renamed.get(f.name, f.name)] for f in dataclasses.fields(kind)})

        return cls(model=section(ModelChoice), parallel=section(ParallelChoice), data=section(DataChoice),
                   optim=section(OptimChoice), run=section(RunChoice), seed=args.seed)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
