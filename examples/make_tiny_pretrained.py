"""Save a tiny "pretrained" Hugging Face model with its tokenizer, to try fine-tuning on a laptop.

    .venv/bin/python examples/make_tiny_pretrained.py tiny-qwen3-next

Writes a save_pretrained directory: a tiny Qwen3-Next (examples/configs/qwen3_next_tiny.json:
3 Gated DeltaNet layers and 1 softmax layer, MoE, hidden 64) in bf16, and a byte-level BPE
tokenizer of 264 ids trained on a few of the Python standard library's files (tokenizer.json,
with <|endoftext|> as its eos in tokenizer_config.json). Then, as the README's quick start:

    .venv/bin/torchrun --standalone --nproc_per_node 2 -m lasp2.train --sp 2 --hf-model tiny-qwen3-next \\
        --steps 30 --seq-len 256 --batch-size 4 --export-hf tiny-qwen3-next-ft
"""
import json
import sys
import sysconfig
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM

CONFIG = Path(__file__).resolve().parent / "configs" / "qwen3_next_tiny.json"
EOS = "<|endoftext|>"


def tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    tok.train_from_iterator((f.read_text(errors="replace") for f in files), trainer)
    return tok


def main(out: str) -> None:
    out = Path(out)
    config = AutoConfig.from_pretrained(CONFIG)
    tok = tokenizer(config.vocab_size)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "model_max_length": 32768}, indent=1))
    print(f"wrote {out}: {sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out).parameters()) / 1e6:.2f}M "
          f"parameters (bf16), a tokenizer of {tok.get_vocab_size()} ids")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny-qwen3-next")
