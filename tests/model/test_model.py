import dataclasses
from pathlib import Path

import pytest
import torch

from lasp2.model import LINEAR_KINDS, PRESETS, LinearLlama, ModelConfig, count_parameters, pattern_for_ratio


def tiny(kind="basic", pattern="LLLN", **kw):
    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, linear_kind=kind,
                       layer_pattern=pattern, feature_dim=4, gate_rank=4, **kw)


@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_every_variant_trains_and_is_causal(kind):
    torch.manual_seed(0)
    model = LinearLlama(tiny(kind)).double()
    tokens = torch.randint(0, 64, (2, 24))
    logits = model(tokens)
    assert logits.shape == (2, 24, 64)
    changed = tokens.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % 64  # change the future
    assert torch.allclose(model(changed)[:, :15], logits[:, :15], rtol=0, atol=1e-12)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_layer_pattern_and_hybrid_ratios():
    assert tiny(pattern="LLLN").replace(num_layers=8).layer_types() == "LLLNLLLN"
    assert [pattern_for_ratio(r) for r in ("0", "1/8", "1/4", "1/2", "1")] == ["L", "LLLLLLLN", "LLLN", "LN", "N"]
    with pytest.raises(ValueError, match="2/3"):
        pattern_for_ratio("2/3")
    with pytest.raises(ValueError, match="layer_pattern"):
        tiny(pattern="LLX")


def _closed_form_parameters(cfg) -> int:
    """Linear-Llama3's parameters written out from the architecture: untied embedding and head,
    per block two RMSNorms and a SwiGLU MLP; a linear layer has q, k, v, an output gate and o
    at full width plus a per-head RMSNorm; a softmax layer q and o at full width, k and v at the
    KV heads' width."""
    hidden, d, heads, kv = cfg.hidden_size, cfg.dim_per_head, cfg.num_heads, cfg.num_kv_heads
    linear = 5 * hidden * heads * d + d
    softmax = 2 * hidden * heads * d + 2 * hidden * kv * d
    block = 2 * hidden + 3 * hidden * cfg.ffn_hidden
    layers = sum(block + (linear if t == "L" else softmax) for t in cfg.layer_types())
    return 2 * cfg.vocab_size * hidden + hidden + layers


def _short(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def test_preset_sizes_are_exact_and_the_readme_prints_them():
    counts = {name: count_parameters(cfg) for name, cfg in PRESETS.items()}
    assert counts == {"debug": 3_475_904, "tiny": 1_837_376, "0.3b": 537_429_760, "1b": 1_632_701_952, "8b": 9_036_897_280}
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name, cfg in PRESETS.items():
        assert counts[name] == _closed_form_parameters(cfg), name
        byte_vocab = count_parameters(dataclasses.replace(cfg, vocab_size=256))
        assert byte_vocab == _closed_form_parameters(dataclasses.replace(cfg, vocab_size=256)), name
        llama_vocab = "—" if cfg.vocab_size == 256 else _short(counts[name])
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}`"))
        assert row.endswith(f"| {llama_vocab} | {_short(byte_vocab)} |"), (row, llama_vocab, _short(byte_vocab))