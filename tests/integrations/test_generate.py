"""Generation across ranks (`lasp2.integrations.transformers.generate`): the prompt prefilled over
W ranks, then decoded from the O(1) states and the sharded KV cache, gives the unmodified model's
own `generate(do_sample=False)` tokens on one process, every decoded step's logits within 1e-5,
the same on every rank, for every family `parallelize` supports, W = 1, 2, 3, both layouts. Sampling draws the same
tokens on every rank; eos stops; bad input raises before any collective."""
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.helpers import rel_err, run_example  # noqa: E402
from tests.integrations.test_transformers import build  # noqa: E402

GENERATING = ["qwen3_next", "qwen3_5", "qwen3_5_moe", "olmo_hybrid", "kimi_linear", "minimax", "mamba2", "bamba",
              "nemotron_h", "granitemoehybrid"]
T, NEW = 24, 8


def prompt(seed=1, rows=2):
    return torch.randint(3, 64, (rows, T), generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def reference(family):
    """transformers' own greedy generation on one process: tokens and each step's logits."""
    model = build(family).eval()
    model.generation_config.eos_token_id = None  # all NEW tokens
    ids = prompt()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, dim=1)


def sp_generate(group, family, layout, options=None):
    from lasp2.integrations.transformers import generate, parallelize
    from lasp2.parallel import SequenceParallel, count_collectives

    sp = SequenceParallel(group, layout=layout)
    model = parallelize(build(family), sp)
    with count_collectives() as log:
        out = generate(model, sp, prompt(), NEW, return_dict=True, **(options or {}))
    return out, log.rows()


SETUPS = [(1, "contiguous"), (2, "contiguous"), (2, "zigzag"), (3, "contiguous"), (3, "zigzag")]


@pytest.mark.parametrize("world, layout", SETUPS)
@pytest.mark.parametrize("family", GENERATING)
def test_greedy_generation_equals_the_unmodified_models(dist_workers, family, world, layout):
    tokens, logits = reference(family)
    results = dist_workers.run(sp_generate, tuple(range(world)), family, layout)
    for rank, (out, _) in results.items():
        assert torch.equal(out.sequences, tokens), (rank, out.sequences, tokens)
        for step in range(NEW):
            assert rel_err(out.logits[:, step], logits[:, step]) < 1e-5, (rank, step)
        assert torch.equal(out.logits, results[0][0].logits), rank  # bitwise the same on every rank


@pytest.mark.parametrize("family", ["qwen3_next", "mamba2"])
def test_collectives_and_cache_bytes(dist_workers, family):
    """W = 2, zigzag. Prefill: the model's own collectives plus one broadcast of the last logits;
    each decoded token: one all-gather per softmax layer (B·Hq·(Dv + 1) fp32 values) and one
    broadcast of the chosen tokens; none for a model without softmax layers but that broadcast.
    The KV cache a rank holds is its half of the prompt's plus its share of the decoded tokens;
    the states do not grow with the prompt."""
    results = dist_workers.run(sp_generate, (0, 1), family, "zigzag")
    config = build(family).config
    softmax = getattr(config, "layer_types", None)
    n_softmax = 0 if family == "mamba2" else sum(t == "full_attention" for t in softmax)
    for rank, (out, calls) in results.items():
        gathers_of_decoding = [c for c in calls if c[0] == "all_gather"][-(NEW - 1) * n_softmax:] if n_softmax else []
        broadcasts = [c for c in calls if c[0] == "broadcast"]
        assert len(broadcasts) == 1 + NEW, (rank, calls)  # the prompt's last logits, then each chosen token
        if n_softmax:
            hq, dv = config.num_attention_heads, config.head_dim
            assert all(size == 2 * hq * (dv + 1) * 4 for _, size in gathers_of_decoding), gathers_of_decoding
        # the cache: each softmax layer keeps T/2 prompt tokens and every other decoded one
        owned = len([i for i in range(NEW - 1) if i % 2 == rank])
        if n_softmax:
            per_token = 2 * 2 * config.num_key_value_heads * config.head_dim * 4  # B 2, keys + values, fp32
            assert out.cache.kv_cache == n_softmax * (T // 2 + owned) * per_token, (rank, out.cache)
        else:
            assert out.cache.kv_cache == 0
        assert out.cache.states > 0 and out.cache.conv > 0


def sp_cache_bytes(group, family, length):
    from lasp2.integrations.transformers import generate, parallelize
    from lasp2.parallel import SequenceParallel

    sp = SequenceParallel(group, layout="zigzag")
    out = generate(parallelize(build(family), sp), sp, torch.randint(3, 64, (1, length)), 2, return_dict=True)
    return out.cache


def test_states_do_not_grow_with_the_prompt(dist_workers):
    short = dist_workers.run(sp_cache_bytes, (0, 1), "qwen3_next", 24)[0]
    long = dist_workers.run(sp_cache_bytes, (0, 1), "qwen3_next", 96)[0]
    assert (short.states, short.conv) == (long.states, long.conv)
    assert long.kv_cache - short.kv_cache == (96 - 24) // 2 * 2 * 2 * 8 * 4  # half the prompt's KV: Hkv 2, D 8


@pytest.mark.parametrize("family", ["qwen3_next", "bamba"])
def test_sampling_draws_the_same_tokens_on_every_rank(dist_workers, family):
    kwargs = {"do_sample": True, "temperature": 0.8, "top_k": 10, "seed": 3}
    one = dist_workers.run(sp_generate, (0,), family, "contiguous", kwargs)[0][0].sequences
    three = dist_workers.run(sp_generate, (0, 1, 2), family, "zigzag", kwargs)
    for rank, (out, _) in three.items():
        assert torch.equal(out.sequences, one), rank
    greedy, _ = reference(family)
    assert not torch.equal(one, greedy)  # it did sample


def test_eos_stops_like_transformers(dist_workers):
    tokens, _ = reference("qwen3_next")
    eos = int(tokens[0, T + 2])  # row 0's third new token
    model = build("qwen3_next").eval()
    ids = prompt()
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)
    options = {"eos_token_id": eos, "pad_token_id": 0}
    for rank, (out, _) in dist_workers.run(sp_generate, (0, 1), "qwen3_next", "zigzag", options).items():
        assert torch.equal(out.sequences, want), (rank, out.sequences, want)


def sp_ragged(group, length):
    from lasp2.integrations.transformers import generate, parallelize
    from lasp2.parallel import SequenceParallel

    sp = SequenceParallel(group, layout="zigzag")
    ids = torch.randint(3, 64, (1, length), generator=torch.Generator().manual_seed(5))
    return generate(parallelize(build("kimi_linear"), sp), sp, ids, 4, ragged_tail=True)


def test_a_ragged_prompt_runs_its_tail_as_decoding_steps(dist_workers):
    """27 tokens over 2 zigzag ranks (4 slots): 24 prefilled, 3 stepped."""
    model = build("kimi_linear").eval()
    ids = torch.randint(3, 64, (1, 27), generator=torch.Generator().manual_seed(5))
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    for rank, got in dist_workers.run(sp_ragged, (0, 1), 27).items():
        assert torch.equal(got, want), rank


def refused(group, case):
    from lasp2.integrations.transformers import generate, parallelize
    from lasp2.parallel import SequenceParallel, count_collectives

    sp = SequenceParallel(group, layout="zigzag", delta="ulysses" if case == "method" else "lasp2")
    model = build("qwen3_next")
    ids = prompt(rows=1)
    kwargs = {}
    if case == "unprepared":
        pass
    else:
        model = parallelize(model, sp)
    if case == "ragged":
        ids = ids[:, :22]
    if case == "padding":
        kwargs["attention_mask"] = torch.ones_like(ids).index_fill(1, torch.tensor([0]), 0)
    if case == "sampling":
        kwargs.update(do_sample=True, temperature=0.0)
    with count_collectives() as log:
        try:
            generate(model, sp, ids, 2, **kwargs)
        except ValueError as exc:
            return str(exc), log.count()
    return None, log.count()


@pytest.mark.parametrize("case, message", [
    ("unprepared", r"Qwen3NextForCausalLM was not prepared by parallelize\(model, sp\)"),
    ("ragged", r"a prompt of 22 tokens cannot be sharded over 2 ranks in the zigzag layout: its length must be a "
               r"multiple of 4 \(ragged_tail=True runs"),
    ("padding", r"padded prompts are not supported \(attention_mask has zeros\)"),
    ("sampling", r"temperature must be a number > 0, got 0.0"),
    ("method", r"the prefill needs each delta layer's final state, which 'ulysses' cannot return; use a "
               r"state-passing method \(lasp2, lasp1, allscan, logscan or auto\)"),
])
def test_bad_input_raises_before_any_collective(dist_workers, case, message):
    import re

    for rank, (error, calls) in dist_workers.run(refused, (0, 1), case).items():
        assert error is not None and re.search(message, error), (rank, error)
        assert calls == 0, rank


def test_the_example_generates_transformers_tokens_on_two_ranks():
    done = run_example("generate_long_prompt.py")
    assert "transformers' generate on one process: the same 24 tokens" in done.stdout, done.stdout
    assert done.stdout.count("KiB of KV cache") == 2
