"""`python -m lasp2_bench generate`: long prompts prefilled across ranks, then decoded from O(1) states.

For each model and prompt length, W ranks (freshly spawned, gloo on CPU; NCCL with one GPU a rank)
run `lasp2` generation (greedy) and report: the prefill's seconds, the median seconds per decoded
token, and what one rank holds while decoding (the softmax layers' KV cache, its 1/W shard; the
recurrent states and convolution tails, O(1) in the prompt), its peak memory. At W = 1 the same
Hugging Face model also runs transformers' own `generate` (its own cache) in the same process,
timed the same way (prefill: the first token; per token: the rest), with its cache's bytes, and
the tokens are compared.

Models: "qwen3-next" (examples/configs/qwen3_next_tiny.json: 3 Gated DeltaNet + 1 softmax layer,
hidden 64) and "linear-llama3" (the debug preset, Gated DeltaNet, LLLN: hidden 256). Prints a table,
writes generate.csv.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .machine import free_port, peak_memory_bytes, reset_peak_memory, start_rank, sync

MODELS = ("qwen3-next", "linear-llama3")
FIELDS = ["model", "impl", "world", "prompt", "new_tokens", "status", "prefill_s", "decode_ms_per_token",
          "kv_cache_bytes", "state_bytes", "conv_bytes", "peak_mb", "same_tokens"]
CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "qwen3_next_tiny.json"


def add_arguments(p) -> None:
    p.add_argument("--model", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--world", type=int, nargs="+", default=[1, 2])
    p.add_argument("--T", type=int, nargs="+", default=[1024, 4096], help="prompt lengths (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' generate at W = 1")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])


def build(name: str, device: torch.device):
    """(the model, whether it is a Hugging Face one), seeded."""
    torch.manual_seed(0)
    if name == "qwen3-next":
        from transformers import AutoConfig, AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(CONFIG)).to(device).eval(), True
    from lasp2.model import LinearLlama, preset

    return LinearLlama(preset("debug", linear_kind="gated_deltanet")).to(device).eval(), False


def _lasp2(name, sp, ids, new_tokens, device):
    import lasp2

    model, hf = build(name, device)
    if hf:
        from lasp2.integrations.transformers import generate, parallelize

        return generate(parallelize(model, sp), sp, ids, new_tokens, return_dict=True)
    return lasp2.generate(model, sp, ids, new_tokens, return_dict=True)


def _cache_bytes(cache) -> tuple[int, int, int]:
    """(keys + values, recurrent states, conv states) bytes of a transformers cache."""
    kv = states = conv = 0
    for layer in getattr(cache, "layers", []):
        for attr, value in vars(layer).items():
            tensors = list(value.values()) if isinstance(value, dict) else [value]
            size = sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))
            if attr in ("keys", "values"):
                kv += size
            elif "conv" in attr:
                conv += size
            elif "recurrent" in attr:
                states += size
    return kv, states, conv


def transformers_row(name, ids, new_tokens, device, want) -> dict:
    """transformers' own generate on one process: prefill = the first token, then per token."""
    model, _ = build(name, device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    reset_peak_memory(device)
    sync(device)
    began = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **kwargs)
    sync(device)
    prefill = time.perf_counter() - began
    began = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, return_dict_in_generate=True, **kwargs)
    sync(device)
    per_token = (time.perf_counter() - began - prefill) / max(1, new_tokens - 1)
    kv, states, conv = _cache_bytes(out.past_key_values)
    return {"impl": "transformers", "status": "ok", "prefill_s": prefill, "decode_ms_per_token": 1e3 * per_token,
            "kv_cache_bytes": kv, "state_bytes": states, "conv_bytes": conv, "peak_mb": peak_memory_bytes(device) / 2**20,
            "same_tokens": bool(torch.equal(out.sequences.cpu(), want.cpu()))}


def _worker(rank, world, port, configs, new_tokens, with_transformers, out_path, use_cuda):
    from lasp2.parallel import SequenceParallel

    device = start_rank(rank, world, port, use_cuda)
    sp = SequenceParallel(dist.group.WORLD if world > 1 else None, layout="zigzag")
    rows = []
    for name, T in configs:
        base = {"model": name, "world": world, "prompt": T, "new_tokens": new_tokens}
        ids = torch.randint(3, 250, (1, T), generator=torch.Generator().manual_seed(T)).to(device)
        reset_peak_memory(device)
        out = _lasp2(name, sp, ids, new_tokens, device)
        peak = torch.tensor([peak_memory_bytes(device) / 2**20], device=device)
        if world > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        rows.append({**base, "impl": "lasp2", "status": "ok", "prefill_s": out.prefill_seconds,
                     "decode_ms_per_token": 1e3 * statistics.median(out.step_seconds[1:] or out.step_seconds),
                     "kv_cache_bytes": out.cache.kv_cache, "state_bytes": out.cache.states,
                     "conv_bytes": out.cache.conv, "peak_mb": float(peak), "sequences": out.sequences.tolist()})
        if world == 1 and with_transformers and name == "qwen3-next":
            rows.append({**base, **transformers_row(name, ids, new_tokens, device, out.sequences)})
        if rank == 0:
            print(f"  W={world} {name} T={T}: prefill {out.prefill_seconds:.2f} s", flush=True)
    if rank == 0:
        Path(out_path).write_text("\n".join(json.dumps(r) for r in rows))
    dist.destroy_process_group()


def run(args) -> list[dict]:
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    configs = [(name, T) for name in args.model for T in sorted(args.T)]
    rows = []
    for world in args.world:
        with tempfile.TemporaryDirectory() as tmp:
            out_path = os.path.join(tmp, "rows.jsonl")
            mp.spawn(_worker, args=(world, free_port(), configs, args.new_tokens, not args.no_transformers, out_path,
                                    use_cuda), nprocs=world, join=True)
            rows += [json.loads(line) for line in Path(out_path).read_text().splitlines()]
    # greedy tokens against the one-rank lasp2 run of the same model and prompt
    one = {(r["model"], r["prompt"]): r["sequences"] for r in rows if r["impl"] == "lasp2" and r["world"] == 1}
    for r in rows:
        if r["impl"] == "lasp2":
            seqs = r.pop("sequences")
            r["same_tokens"] = seqs == one[(r["model"], r["prompt"])] if (r["model"], r["prompt"]) in one else ""
    return rows


def print_table(rows, stream) -> None:
    head = (f"{'model':14s} {'impl':12s} {'W':>2s} {'prompt':>7s} {'prefill s':>10s} {'ms/token':>9s} "
            f"{'KV bytes':>11s} {'state bytes':>11s} {'conv bytes':>10s} {'peak MB':>8s} {'same':>5s}")
    stream.write(head + "\n" + "-" * len(head) + "\n")
    for r in rows:
        stream.write(f"{r['model']:14s} {r['impl']:12s} {r['world']:2d} {r['prompt']:7d} {r['prefill_s']:10.3f} "
                     f"{r['decode_ms_per_token']:9.2f} {r['kv_cache_bytes']:11d} {r['state_bytes']:11d} "
                     f"{r['conv_bytes']:10d} {r['peak_mb']:8.0f} {str(r['same_tokens']):>5s}\n")

