"""Generation with Linear-Llama3: the prompt prefilled across the ranks, then O(1)-state decoding.

    import lasp2
    tokens = lasp2.generate(model, sp, input_ids, max_new_tokens=64)      # [B, T + 64], every rank

The command `python -m lasp2.generate --resume <run dir> --prompt "..." --max-new-tokens N`
(one process, or torchrun for several ranks) loads a trainer checkpoint and prints the text.
How prefill and decoding work across ranks: `lasp2.parallel.decoding`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from .data import load_tokenizer, tokenizer_of_run
from .model import LinearLlama
from .ops.sampling import token_chooser
from .parallel import SequenceParallel
from .parallel.decoding import generate_tokens


def generate(model, sp, input_ids, max_new_tokens: int, *, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None, eos_token_id: int | None = None,
             pad_token_id: int | None = None, ragged_tail: bool = False, return_dict: bool = False):
    """Continue `input_ids` [B, T] (the same on every rank of `sp`; None: one device) by
    `max_new_tokens` tokens with a Linear-Llama3 model (`lasp2.model.LinearLlama`, whole on every
    rank): the prompt is prefilled across the ranks, each softmax layer's KV cache kept sharded,
    then each token decoded from the recurrent states. Greedy unless do_sample (temperature,
    top_k, seed: the same draw on every rank). eos_token_id: stop once every row produced it
    (finished rows are filled with pad_token_id, default eos). ragged_tail: a prompt whose length
    the layout cannot shard runs its last tokens as decoding steps (otherwise ValueError).

    Returns [B, T + n] tokens, the same on every rank; return_dict=True: a
    `lasp2.parallel.decoding.Generation` (the tokens, each step's logits, timings, cache bytes).
    """
    sp = SequenceParallel(None) if sp is None else sp
    if not callable(getattr(model, "forward", None)) or not hasattr(model, "blocks"):
        raise ValueError(f"generate: expected a Linear-Llama3 model (lasp2.model.LinearLlama), got {type(model).__name__}"
                         f"; Hugging Face models: lasp2.integrations.transformers.generate")
    choose = token_chooser(do_sample=do_sample, temperature=temperature, top_k=top_k, seed=seed,
                           device=input_ids.device)

    def forward(tokens, positions, ctx, logits_at):
        return model(tokens, positions, ctx, logits_at=logits_at)

    return generate_tokens(forward, sp, input_ids, max_new_tokens, choose, eos_token_id=eos_token_id,
                           pad_token_id=pad_token_id, ragged_tail=ragged_tail, return_dict=return_dict)


# ---- the command: a trainer checkpoint, a prompt, the continuation -----------------------------


class _Text:
    """The run's tokenizer: bytes (no --tokenizer) or its tokenizer.json."""

    def __init__(self, tokenizer: str | None):
        self._tok = load_tokenizer(tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8")) if self._tok is None else self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace") if self._tok is None \
            else self._tok.decode(ids)


def load_model(run_dir: Path, sp, device: torch.device):
    """(the model of a run's newest loadable checkpoint, whole on this rank, in fp32, its
    trainer state). Linear-Llama3 from the saved configuration, or a Hugging Face model from its
    saved config parallelized over `sp`."""
    import torch.distributed.checkpoint as dcp

    from . import checkpoint
    from .model import ModelConfig

    path = checkpoint.usable(run_dir, lambda line: print(line, file=sys.stderr))
    if path is None:
        raise ValueError(f"--resume {run_dir}: no loadable checkpoint in {run_dir / 'checkpoints'}")
    state = checkpoint.saved_state(path)
    if checkpoint.is_hugging_face(state):
        from .integrations.transformers import causal_lm_from_saved

        model = causal_lm_from_saved(path, state, sp)
    else:
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        model = LinearLlama(ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["model"].items()
                                           if k in names}))
    weights = {"model": model.state_dict()}
    dcp.load(weights, checkpoint_id=str(path), no_dist=True)  # every rank reads the whole model
    model.load_state_dict(weights["model"])
    model = model if isinstance(model, LinearLlama) else model.model  # the Hugging Face model itself
    return model.to(device).eval(), state, path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lasp2.generate", description=(
        "Continue a prompt with a trained model: prefilled across the ranks (torchrun), decoded from O(1) states."))
    parser.add_argument("--resume", required=True, type=Path, help="the run directory (its newest loadable checkpoint)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag"])
    parser.add_argument("--stats", action="store_true", help="also print prefill and decode times and cache bytes")
    args = parser.parse_args(argv)
    from .distributed import run_command

    def continue_prompt(dims):  # every rank shares the prompt
        sp = SequenceParallel(dims.sp_group, layout=args.layout)
        model, state, path = load_model(args.resume, sp, dims.device)
        text = _Text(tokenizer_of_run(state["config"]["data"].get("tokenizer"), state.get("hf_model")))
        ids = torch.tensor([text.encode(args.prompt)], device=dims.device)
        if not isinstance(model, LinearLlama):  # a Hugging Face model
            from .integrations.transformers import generate as hf_generate

            out = hf_generate(model, sp, ids, args.max_new_tokens, do_sample=args.do_sample,
                              temperature=args.temperature, top_k=args.top_k, seed=args.seed, ragged_tail=True,
                              return_dict=True)
        else:
            out = generate(model, sp, ids, args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                           top_k=args.top_k, seed=args.seed, ragged_tail=True, return_dict=True)
        if dims.is_main:
            print(args.prompt + text.decode(out.sequences[0, ids.shape[1]:].tolist()))
            if args.stats:
                per_token = sum(out.step_seconds[1:]) / max(1, len(out.step_seconds) - 1)
                print(json.dumps({"checkpoint": str(path), "ranks": dims.sp, "prompt_tokens": ids.shape[1],
                                  "new_tokens": len(out.step_seconds), "prefill_s": round(out.prefill_seconds, 4),
                                  "decode_s_per_token": round(per_token, 5),
                                  "cache_bytes": dataclasses.asdict(out.cache)}), file=sys.stderr)

    return run_command("python -m lasp2.generate", continue_prompt)
