"""Checkpoints with torch.distributed.checkpoint, written atomically.

A save writes everything into <run>/checkpoints/step_NNNNNNN.tmp/ (model and optimizer shards
through DCP, each rank's RNG state, the trainer state as JSON), waits for every rank, then
renames the directory to step_NNNNNNN/ and replaces the `latest` pointer. A crash at any point
leaves either the previous checkpoint as latest or a .tmp directory that is never loaded.

The state dicts are sharded (FSDP2's DTensors, or whole tensors when replicated) and DCP
reshards on load, so a run may resume on another number of processes or another dp x sp split;
the RNG states then cannot follow the ranks and each rank reseeds from (seed, step, rank).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .distributed import ParallelDims, barrier

TRAINER_STATE = "trainer.json"


def dcp_kwargs(dims: ParallelDims) -> dict:
    # Within a larger process group (e.g. test ranks) a one-process run must not involve the others.
    return {"process_group": dims.world_group} if dims.world_group is not None else {"no_dist": True}


def save(run_dir: Path, step: int, model, optimizer, dims: ParallelDims, trainer_state: dict) -> Path:
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / (final.name + ".tmp")
    if dims.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(dims)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), **dcp_kwargs(dims))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_rank{dims.rank}.pt")
    if dims.is_main:
        state = {"step": step, "world": dims.world, **trainer_state}
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
    barrier(dims)
    if dims.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
    barrier(dims)
    return final


def _complete(root: Path) -> list[Path]:
    """The run's renamed checkpoint directories holding a trainer state, oldest first."""
    return sorted(p for p in root.glob("step_*") if p.suffix != ".tmp" and (p / TRAINER_STATE).is_file())


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file() and (root / pointer.read_text().strip() / TRAINER_STATE).is_file():
        return root / pointer.read_text().strip()
    complete = _complete(root)
    return complete[-1] if complete else None


def problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be loaded (a missing or truncated file, named), or None.
    Reads DCP's metadata and checks that every byte range it lists is on disk, and that every
    saving rank's RNG file is there; the same answer on every rank (a shared file system), so no
    rank loads what another refuses."""
    path = Path(path)
    for name in (TRAINER_STATE, ".metadata"):
        if not (path / name).is_file():
            return f"{path / name} is missing"
    try:
        world = int(json.loads((path / TRAINER_STATE).read_text()).get("world", 1))
    except (ValueError, TypeError):
        return f"{path / TRAINER_STATE} cannot be read"
    for rank in range(world):
        if not (path / f"rng_rank{rank}.pt").is_file():
            return f"{path / f'rng_rank{rank}.pt'} is missing"
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # a truncated or garbled metadata file
        return f"{path / '.metadata'} cannot be read ({type(exc).__name__})"
    needed = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size < size:
            return f"{file} is truncated ({file.stat().st_size} of {size} bytes)"
    return None


def usable(run_dir: Path, warn) -> Path | None:
    """The newest checkpoint that can be loaded; each newer one that cannot is reported with
    `warn(line)` naming its broken file. None when there is none."""
    for candidate in reversed(_complete(Path(run_dir) / "checkpoints")):
        why = problem(candidate)
        if why is None:
            return candidate
        warn(f"checkpoint {candidate.name} cannot be loaded: {why}; trying the one before it")
    return None


def saved_state(path: Path) -> dict:
    """The trainer state a checkpoint holds (step, world, config, model), without loading the weights."""
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def is_hugging_face(state: dict) -> bool:
    """Whether a checkpoint's run trained a Hugging Face model (--hf-model or --hf-config)."""
    chosen = state["config"]["model"]
    return bool(chosen.get("hf_model") or chosen.get("hf_config"))


def model_differences(saved: dict | None, current: dict) -> list[str]:
    """'field (saved -> now)' for every model field that differs between a checkpoint's model
    description and this run's."""
    if saved is None:
        return []
    return [f"{key} ({saved.get(key)!r} -> {current.get(key)!r})" for key in sorted(set(saved) | set(current))
            if saved.get(key) != current.get(key)]


def load(path: Path, model, optimizer, dims: ParallelDims, seed: int, warn) -> dict:
    """Restores model and optimizer (resharded by DCP to this run's ranks) and, when the run has
    as many processes as the one that saved, this rank's RNG state; otherwise every rank reseeds
    from (seed, step, rank) and `warn` says so. Returns the trainer state (step, ...)."""
    state = saved_state(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(path), **dcp_kwargs(dims))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    saved_world = int(state.get("world", 1))
    if saved_world == dims.world:
        rng = torch.load(Path(path) / f"rng_rank{dims.rank}.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        torch.manual_seed(hash((seed, state["step"], dims.rank)) % 2**63)
        warn(f"{Path(path).name} was saved by {saved_world} processes and this run has {dims.world}: model and "
             f"optimizer resharded, random streams reseeded from (seed, step, rank)")
    return state
