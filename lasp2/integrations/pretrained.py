"""A `save_pretrained` directory in and out of a sharded run (transformers' own file conventions).

Loading reads each rank's share only: the model is built on the meta device, sharded by FSDP2,
given memory, and transformers' loader (`convert_and_load_state_dict_in_model`, the one
`from_pretrained` runs) fills it from the safetensors files opened lazily: for a sharded
(DTensor) parameter it reads just this rank's slice of the file ("shard on read"), and it applies
the model's checkpoint conversions (e.g. per-expert MoE weights fused into one tensor). Writing
gathers one decoder layer at a time to rank 0, reverts those conversions
(`revert_weight_conversion`, as `save_pretrained` does), casts each tensor back to the dtype it
had in the source files, and writes safetensors shards with their index, the config and the
tokenizer files: a directory `AutoModelForCausalLM.from_pretrained` loads.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# what a directory may hold beside the weights that a loader of the exported one wants too
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
MAX_SHARD_BYTES = 2 * 2**30
SEQUENTIAL_LOAD = "HF_DEACTIVATE_ASYNC_LOAD"
# safetensors' dtype names
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def weight_files(directory) -> list[Path]:
    """The safetensors files of a `save_pretrained` directory (its index's, or the one file);
    ValueError naming the directory when it has none."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory}: no config.json (expected a directory that save_pretrained wrote)")
    if (directory / INDEX).is_file():
        names = sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise ValueError(f"{directory}: {INDEX} lists {missing[0]}, which is missing")
        return [directory / n for n in names]
    if (directory / WEIGHTS).is_file():
        return [directory / WEIGHTS]
    raise ValueError(f"{directory}: no weights ({WEIGHTS} or {INDEX}); only safetensors checkpoints are read")


def source_dtypes(directory) -> dict[str, torch.dtype]:
    """{name in the files: its dtype} (read from the headers, no tensor loaded)."""
    dtypes = {}
    for file in weight_files(directory):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                dtypes[key] = DTYPES[f.get_slice(key).get_dtype()]
    return dtypes


def compute_buffers(model) -> None:
    """The non-persistent buffers of a model given memory by `to_empty` (rotary frequencies: not
    in any file), computed as the model's own initialisation computes them."""
    for module in model.modules():
        if any(name in module._non_persistent_buffers_set for name, _ in module.named_buffers(recurse=False)):
            model._init_weights(module)


@torch.no_grad()
def load_weights(model, directory, device=None) -> None:
    """Fill `model` (a transformers PreTrainedModel, sharded by FSDP2 or whole) from the
    safetensors files of `directory`, each rank reading its parameters' shards. On a model built
    on the meta device, the loaded tensors take the parameters' places (on `device`: nothing is
    allocated before, so a rank holds its shards once) and the tensors no file holds (the
    non-persistent buffers: rotary frequencies) get memory there and are computed as the model's
    own initialisation does. Raises ValueError naming missing or mis-shaped weights."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    files = weight_files(directory)
    device = torch.device("cpu") if device is None else torch.device(device)
    from transformers.utils import logging as hf_logging

    # pread, not mmap: only the slices read are in memory (a mapped file's pages count in a rank's
    # memory once touched)
    opened = [safe_open(file, framework="pt", device="cpu", backend="pread") for file in files]
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per rank would interleave with the trainer's lines
    # transformers' switch for reading one tensor at a time: its thread pool would hold tensors
    # read ahead beside the loaded ones (0.8 GB more for a 1B model, and no faster here)
    sequential = os.environ.get(SEQUENTIAL_LOAD)
    os.environ[SEQUENTIAL_LOAD] = "1"
    try:
        lazy = {key: f.get_slice(key) for f in opened for key in f.keys()}
        config = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model), device_map={"": device})
        info, _ = convert_and_load_state_dict_in_model(model, lazy, config)
    finally:
        for f in opened:
            f.__exit__(None, None, None)
        if bars:
            hf_logging.enable_progress_bar()
        if sequential is None:
            del os.environ[SEQUENTIAL_LOAD]
        else:
            os.environ[SEQUENTIAL_LOAD] = sequential
    for module in model.modules():  # what no file holds: on `device`, then computed
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)
    compute_buffers(model)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    buffers = {name for name, _ in model.named_buffers()}
    missing = sorted(set(info.missing_keys) - tied - buffers)
    problems = ([f"missing {', '.join(missing[:3])}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")]
                if missing else [])
    problems += [f"{name} is {tuple(got)} in the files, {tuple(want)} in the model"
                 for name, got, want in sorted(info.mismatched_keys)][:3]
    if problems:
        raise ValueError(f"{directory}: its weights do not fit the model its config.json builds: {'; '.join(problems)}")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor whole on this rank (a DTensor all-gathered: every rank of its mesh takes part)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _groups(names) -> list[list[str]]:
    """State-dict names in groups that hold one decoder layer each (the rest: one group), so that
    every checkpoint conversion finds all of its pieces in one group."""
    layers: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        key = ".".join(parts[:parts.index("layers") + 2]) if "layers" in parts else ""
        layers.setdefault(key, []).append(name)
    return list(layers.values())


@torch.no_grad()
def save_pretrained(model, out_dir, *, source=None, tokenizer=None, group=None, rank: int = 0) -> None:
    """Write `model` (a transformers PreTrainedModel, sharded by FSDP2 over `group` or whole) as a
    `save_pretrained` directory: rank 0 receives one decoder layer at a time (every rank of the
    group takes part in each gather), reverts the checkpoint conversions, casts each tensor to its
    dtype in `source`'s files (a pretrained directory; else the model's config dtype, or fp32),
    and writes safetensors shards of at most MAX_SHARD_BYTES with their index, then the config and
    the tokenizer files of `tokenizer` (a directory or tokenizer.json; default: `source`'s)."""
    from transformers.core_model_loading import revert_weight_conversion

    out_dir = Path(out_dir)
    main = rank == 0
    dtypes = source_dtypes(source) if source is not None else {}
    default = getattr(model.config, "dtype", None) or torch.float32
    default = getattr(torch, default) if isinstance(default, str) else default
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    shard, shard_bytes, shards, weight_map, total = {}, 0, [], {}, 0
    for names in _groups(state):
        gathered = {n: _whole(state[n]) for n in names if n not in tied}
        if not main:
            continue
        for key, value in revert_weight_conversion(model, {n: t.cpu() for n, t in gathered.items()}).items():
            value = value.to(dtypes.get(key, default))
            if shard and shard_bytes + value.nbytes > MAX_SHARD_BYTES:
                shards.append(shard)
                shard, shard_bytes = {}, 0
            shard[key] = value.contiguous()
            shard_bytes += value.nbytes
            total += value.nbytes
    if main:
        shards.append(shard)
        names = [WEIGHTS] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                    for i in range(len(shards))]
        for name, part in zip(names, shards):
            save_file(part, str(out_dir / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in part})
        if len(shards) > 1:
            (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2, sort_keys=True))
        _write_config(model.config, source, out_dir)
        _copy_tokenizer(tokenizer or source, out_dir)
    if group is not None:
        dist.barrier(group=group)


def _write_config(config, source, out_dir: Path) -> None:
    """The model's config, with the source's dtype (the weights are written in it) and its
    generation config when it has one."""
    if source is not None:
        saved = json.loads((Path(source) / "config.json").read_text())
        dtype = saved.get("dtype", saved.get("torch_dtype"))
        config = copy.deepcopy(config)
        config.dtype = dtype
        if (Path(source) / "generation_config.json").is_file():
            shutil.copy(Path(source) / "generation_config.json", out_dir / "generation_config.json")
    config.save_pretrained(out_dir)


def _copy_tokenizer(tokenizer, out_dir: Path) -> None:
    if tokenizer is None:
        return
    tokenizer = Path(tokenizer)
    if tokenizer.is_file():
        shutil.copy(tokenizer, out_dir / "tokenizer.json")
        return
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, out_dir / name)
