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


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = LinearLlama(tiny("gla")).double()
    b = LinearLlama(tiny("gla", checkpointing=True)).double()
    b.load_state_dict(a.state_dict())
    tokens = torch.randint(0, 64, (2, 20))
    for m in (a, b):
        m(tokens).square().mean().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-14), n


def test_layer_pattern_and_hybrid_ratios():
    assert tiny(pattern="LLLN").replace(num_layers=8).layer_types() == "LLLNLLLN"
    assert [pattern_for_ratio(r) for r in ("0", "1/8", "1/4", "1/2", "1")] == ["L", "LLLLLLLN", "LLLN", "LN", "N"]
    with pytest.raises(ValueError, match="2/3"):
        pattern_for_ratio("2/3")
    with pytest.raises(ValueError, match="layer_pattern"):
        tiny(pattern="LLX")


def test_preset_sizes():
    counts = {name: count_parameters(cfg) for name, cfg in PRESETS.items()}
    assert 1e6 < counts["debug"] < 1e7
    # 16 layers, hidden 2048, 16 heads: 1.1B in the blocks, plus 0.53B of untied 128256-token embeddings
    assert 1.5e9 < counts["1b"] < 1.7e9
    # Llama 3 8B is 8.0B; its linear layers carry full-width q, k, v and an output gate (no GQA)
    assert 8.5e9 < counts["8b"] < 9.5e9
