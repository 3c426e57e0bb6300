"""Linear-Llama3 generation across ranks (`lasp2.generate`): for every linear kind in a hybrid
(LLLN), W = 1, 2, 3, both layouts, in fp64, the greedy tokens and every step's logits equal a
single-device reference that runs the whole sequence again for each new token (no states, no
cache), and every rank returns the same."""
import pytest
import torch

from lasp2.model import LINEAR_KINDS, LinearLlama, ModelConfig
from tests.helpers import rel_err

T, NEW = 24, 6


def tiny(kind: str) -> LinearLlama:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, layer_pattern="LLLN",
                      linear_kind=kind, feature_dim=8, gate_rank=8, init_std=0.2)
    return LinearLlama(cfg).double().eval()


def prompt():
    return torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def whole_sequence_reference(kind: str):
    """Greedy decoding by running the whole sequence through the model for every new token."""
    model, ids, logits = tiny(kind), prompt(), []
    for _ in range(NEW):
        last = model(ids)[:, -1]
        logits.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    return ids, torch.stack(logits, dim=1)


def sp_generate(group, kind, layout):
    import lasp2
    from lasp2.parallel import SequenceParallel

    sp = SequenceParallel(group, layout=layout, chunk_size=8)
    return lasp2.generate(tiny(kind), sp, prompt(), NEW, return_dict=True)


@pytest.mark.parametrize("world, layout", [(1, "contiguous"), (2, "contiguous"), (2, "zigzag"), (3, "zigzag")])
@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_generation_equals_the_whole_sequence_reference(dist_workers, kind, world, layout):
    tokens, logits = whole_sequence_reference(kind)
    results = dist_workers.run(sp_generate, tuple(range(world)), kind, layout)
    for rank, out in results.items():
        assert torch.equal(out.sequences, tokens), (rank, out.sequences, tokens)
        assert rel_err(out.logits, logits) < 1e-10, rank
        assert torch.equal(out.logits, results[0].logits), rank


def test_a_model_that_is_not_linear_llama_is_refused():
    import lasp2

    with pytest.raises(ValueError, match=r"expected a Linear-Llama3 model .* lasp2.integrations.transformers.generate"):
        lasp2.generate(torch.nn.Linear(2, 2), None, prompt(), 2)
