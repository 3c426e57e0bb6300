"""python -m lasp2.export <run dir> <out dir>: a Hugging Face run's checkpoint as a save_pretrained directory.

The newest loadable checkpoint of a `--hf-model` or `--hf-config` run (or the checkpoint given:
`<run dir>/checkpoints/step_0000049`) is read sharded over the
processes (`torchrun --nproc_per_node N -m lasp2.export ...` spreads it over N ranks; one process
works too), then written by `lasp2.integrations.pretrained.save_pretrained`: one decoder layer at
a time gathered to rank 0, in the source checkpoint's parameter names and dtypes, with the
config and the tokenizer files, so that `AutoModelForCausalLM.from_pretrained(<out dir>)` loads it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lasp2.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the trainer's run directory (its newest loadable checkpoint), or "
                        "one checkpoint directory of it")
    parser.add_argument("out_dir", type=Path, help="the Hugging Face directory to write")
    parser.add_argument("--tokenizer", default=None, help="tokenizer files to include (default: the run's)")
    args = parser.parse_args(argv)
    from .distributed import run_command

    def write(dims):
        export(args.run_dir, args.out_dir, dims, args.tokenizer)
        if dims.is_main:
            print(f"wrote {args.out_dir} (AutoModelForCausalLM.from_pretrained loads it)")

    return run_command("python -m lasp2.export", write)


def export(run_dir: Path, out_dir: Path, dims, tokenizer: str | None = None) -> None:
    """The checkpoint's model, sharded over `dims`' ranks, written to `out_dir`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from . import checkpoint
    from .parallel import SequenceParallel
    from .parallelize import apply_data_parallel

    if (run_dir / checkpoint.TRAINER_STATE).is_file():  # one checkpoint, named
        path, why = run_dir, checkpoint.problem(run_dir)
        if why is not None:
            raise ValueError(f"{run_dir}: cannot be loaded: {why}")
    else:
        path = checkpoint.usable(run_dir, lambda line: print(line, file=sys.stderr))
    if path is None:
        raise ValueError(f"{run_dir}: no loadable checkpoint in {run_dir / 'checkpoints'}")
    state = checkpoint.saved_state(path)
    if not checkpoint.is_hugging_face(state):
        raise ValueError(f"{run_dir}: a Linear-Llama3 run; only --hf-model and --hf-config runs have a Hugging Face "
                         f"format")
    from .integrations.pretrained import compute_buffers, save_pretrained
    from .integrations.transformers import causal_lm_from_saved

    model = causal_lm_from_saved(path, state, SequenceParallel(None), meta=True)
    hf = model.model
    if dims.world > 1:
        apply_data_parallel(model, model.blocks, dims.flat_mesh, "shard", dims.device)
    model.to_empty(device=dims.device)
    compute_buffers(hf)
    weights = get_model_state_dict(model)
    dcp.load({"model": weights}, checkpoint_id=str(path), **checkpoint.dcp_kwargs(dims))
    set_model_state_dict(model, weights)
    source = state.get("hf_model")
    source = source if source is not None and Path(source).is_dir() else None
    save_pretrained(hf, out_dir, source=source, tokenizer=tokenizer or state["config"]["data"].get("tokenizer"),
                    group=dims.world_group, rank=dims.rank)


if __name__ == "__main__":
    sys.exit(main())
