"""Hugging Face models made sequence-parallel by `parallelize`: the loss summed over the ranks and
every parameter's gradient (summed over the ranks) equal the unmodified model's on one process;
the ranks' logits are the model's; packed documents (restarting position_ids) equal each document
run alone; state dicts load both ways; an unsupported model raises."""
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.helpers import rel_err, run_example  # noqa: E402

TOL = 1e-5
T = 24


def qwen3_next_config():
    return transformers.Qwen3NextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=8, shared_expert_intermediate_size=8, full_attention_interval=4)


def olmo_hybrid_config():
    return transformers.OlmoHybridConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, layer_types=["linear_attention"] * 3 + ["full_attention"], pad_token_id=0,
        eos_token_id=1)


def kimi_linear_config():
    return transformers.KimiLinearConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=8,
        v_head_dim=8, linear_head_dim=8, linear_num_heads=4, num_local_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=8, layer_types=["linear_attention"] * 3 + ["full_attention"], pad_token_id=0,
        bos_token_id=1, eos_token_id=2)


def minimax_config():
    return transformers.MiniMaxConfig(
        vocab_size=64, hidden_size=32, intermediate_size=8, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, block_size=8,
        layer_types=["linear_attention"] * 3 + ["full_attention"], pad_token_id=0, bos_token_id=1, eos_token_id=2)


def mamba2_config():
    return transformers.Mamba2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, state_size=8, n_groups=2,
        expand=2, conv_kernel=4, chunk_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def bamba_config():
    return transformers.BambaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=2, mamba_expand=2,
        mamba_d_conv=4, mamba_chunk_size=8, attn_layer_indices=[3], pad_token_id=0, bos_token_id=1, eos_token_id=2)


def nemotron_h_config():
    return transformers.NemotronHConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
        conv_kernel=4, chunk_size=8, hybrid_override_pattern="M-M*", pad_token_id=0, bos_token_id=1, eos_token_id=2)


def granite_config():
    return transformers.GraniteMoeHybridConfig(
        vocab_size=64, hidden_size=32, intermediate_size=8, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=2, mamba_expand=2,
        mamba_d_conv=4, mamba_chunk_size=8, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=8,
        layer_types=["mamba", "mamba", "mamba", "attention"], pad_token_id=0, bos_token_id=1, eos_token_id=2)


def qwen3_5_config():
    return transformers.Qwen3_5TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_conv_kernel_dim=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"])


def qwen3_5_moe_config():
    return transformers.Qwen3_5MoeTextConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=8,
        layer_types=["linear_attention"] * 3 + ["full_attention"])


FAMILIES = {"qwen3_next": (qwen3_next_config, "Qwen3NextForCausalLM"),
            "qwen3_5": (qwen3_5_config, "Qwen3_5ForCausalLM"),
            "qwen3_5_moe": (qwen3_5_moe_config, "Qwen3_5MoeForCausalLM"),
            "olmo_hybrid": (olmo_hybrid_config, "OlmoHybridForCausalLM"),
            "kimi_linear": (kimi_linear_config, "KimiLinearForCausalLM"),
            "minimax": (minimax_config, "MiniMaxForCausalLM"),
            "mamba2": (mamba2_config, "Mamba2ForCausalLM"),
            "bamba": (bamba_config, "BambaForCausalLM"),
            "nemotron_h": (nemotron_h_config, "NemotronHForCausalLM"),
            "granitemoehybrid": (granite_config, "GraniteMoeHybridForCausalLM")}


def build(family):
    config_fn, cls = FAMILIES[family]
    torch.manual_seed(0)
    return getattr(transformers, cls)(config_fn()).float()


def batch(seed=1):
    return torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def reference(family, documents=None):
    """The unmodified model on one process: loss, logits and every gradient; with `documents`
    (offsets), each document run alone (its own positions), losses joined as one mean."""
    model = build(family)
    ids = batch()
    if documents is None:
        out = model(ids, labels=ids)
        loss, logits = out.loss, out.logits
    else:
        total, count, logits = 0.0, 0, []
        for a, b in zip(documents, documents[1:]):
            out = model(ids[:, a:b])
            total = total + torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, a + 1:b], reduction="sum")
            count += b - a - 1
            logits.append(out.logits)
        loss, logits = total / count, torch.cat(logits, dim=1)
    loss.backward()
    return float(loss.detach()), logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def sp_run(group, family, layout, documents=None):
    from lasp2.integrations.transformers import parallelize, shard_batch
    from lasp2.parallel import SequenceParallel, positions

    sp = SequenceParallel(group, layout=layout)
    model = parallelize(build(family), sp)
    ids = batch()
    position_ids = None
    if documents is not None:
        position_ids = torch.cat([torch.arange(b - a) for a, b in zip(documents, documents[1:])])[None]
    return _summed_over_ranks(model, model(**shard_batch(sp, ids, labels=ids, position_ids=position_ids)), group,
                              positions(T, group, layout))


def _summed_over_ranks(model, out, group, positions) -> dict:
    """Backward of a rank's loss; the loss and every gradient summed over the group."""
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        torch.distributed.all_reduce(g, group=group)
        grads[name] = g
    loss = out.loss.detach().clone()
    torch.distributed.all_reduce(loss, group=group)
    return {"loss": float(loss), "logits": out.logits.detach(), "grads": grads, "positions": positions}


def check(results, ref):
    """Loss and logits within TOL relative; the gradient vector within TOL relative, and every
    parameter's gradient within TOL of the vector's norm (the strong-decay gates' gradients are
    ~1e-8 of the others: relative to themselves they are fp32 rounding)."""
    ref_loss, ref_logits, ref_grads = ref
    for rank, got in results.items():
        assert abs(got["loss"] - ref_loss) / ref_loss < TOL, (rank, got["loss"], ref_loss)
        assert rel_err(got["logits"], ref_logits[:, got["positions"]]) < TOL, rank
    grads = results[0]["grads"]
    scale = torch.cat([g.flatten() for g in ref_grads.values()]).norm()
    whole = rel_err(torch.cat([grads[n].flatten() for n in ref_grads]), torch.cat([g.flatten() for g in ref_grads.values()]))
    worst = max(float((grads[n] - g).norm() / scale) for n, g in ref_grads.items())
    assert whole < TOL and worst < TOL, (whole, worst)
    return whole


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_parallel_model_equals_the_unmodified_one(dist_workers, family, world, layout):
    check(dist_workers.run(sp_run, tuple(range(world)), family, layout), reference(family))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_documents_equal_each_document_alone(dist_workers, family, layout):
    documents = (0, 5, 13, 14, 24)  # boundaries inside and at the edges of the ranks' shards
    check(dist_workers.run(sp_run, (0, 1), family, layout, documents), reference(family, documents))


def sp_run_rows(group, family, layout, row_documents):
    """sp_run with the batch cut into rows [R, T / R], each with its documents: shard_batch runs
    them as one packed sequence."""
    from lasp2.integrations.transformers import parallelize, shard_batch
    from lasp2.parallel import SequenceParallel, positions

    sp = SequenceParallel(group, layout=layout)
    model = parallelize(build(family), sp)
    ids = batch().view(len(row_documents), -1)
    position_ids = torch.stack([torch.cat([torch.arange(b - a) for a, b in zip(docs, docs[1:])]) for docs in row_documents])
    return _summed_over_ranks(model, model(**shard_batch(sp, ids, labels=ids, position_ids=position_ids)), group,
                              positions(T, group, layout))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_rows_run_as_one_packed_sequence(dist_workers, family):
    """Two packed rows of 12 tokens ([2, 12], documents 0-5-12 and 0-1-12): the same as one row of
    24 with documents 0-5-12-13-24, each document alone (W = 2, zigzag)."""
    results = dist_workers.run(sp_run_rows, (0, 1), family, "zigzag", [(0, 5, 12), (0, 1, 12)])
    check(results, reference(family, (0, 5, 12, 13, 24)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_state_dicts_load_both_ways(family):
    from lasp2.integrations.transformers import parallelize
    from lasp2.parallel import SequenceParallel

    plain, parallel = build(family), parallelize(build(family), SequenceParallel(None))
    with torch.no_grad():
        for p in parallel.parameters():
            p.add_(0.01)
    assert list(plain.state_dict()) == list(parallel.state_dict())
    plain.load_state_dict(parallel.state_dict())
    parallel.load_state_dict(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), parallel.state_dict().values()))


def test_an_unsupported_model_raises_naming_it():
    from lasp2.integrations.transformers import parallelize
    from lasp2.parallel import SequenceParallel

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM \(model_type 'llama'\) is not supported; supported: "):
        parallelize(model, SequenceParallel(None))


def adamw_steps(group, family, steps=2):
    """`steps` AdamW steps on the same batch: sequence-parallel when `group` spans ranks (the
    gradients summed over them), else the unmodified model."""
    from lasp2.integrations.transformers import parallelize, shard_batch
    from lasp2.parallel import SequenceParallel

    model, ids = build(family), batch()
    sp = SequenceParallel(group) if group is not None else None
    if sp is not None:
        model = parallelize(model, sp)
    # eps 1e-6: Adam moves a weight by ~lr whatever its gradient's size, so with eps 1e-8 the
    # strong-decay gates' ~1e-8 gradients, whose rounding differs between any two correct runs,
    # would decide the comparison
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(**shard_batch(sp, ids, labels=ids)) if sp is not None else model(ids, labels=ids)
        out.loss.backward()
        if sp is not None:
            for p in model.parameters():
                torch.distributed.all_reduce(p.grad, group=group)
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_adamw_steps_give_equal_parameters(dist_workers, family):
    want = adamw_steps(None, family)
    got = dist_workers.run(adamw_steps, (0, 1), family)[0]
    flat = torch.cat([want[n].flatten() for n in want])
    assert rel_err(torch.cat([got[n].flatten() for n in want]), flat) < TOL


def test_readme_hf_example_trains_as_one_process():
    import re

    done = run_example("hf_sequence_parallel.py", timeout=240)
    pairs = [(float(a), float(b)) for a, b in re.findall(r"loss ([0-9.]+) on 2 ranks, ([0-9.]+) on one process",
                                                           done.stdout)]
    assert len(pairs) == 8 and all(abs(a - b) / b < 1e-5 for a, b in pairs), done.stdout
    assert pairs[-1][1] < pairs[0][1] - 0.5  # it trains


ROWS = ((0, 5, 13, 14, 24), (0, 9, 10, 20, 24))  # two packed rows, the same length, other documents


def packed_rows_step(group, family, checkpointing):
    """Two packed rows through the parallelized model one at a time (as the trainer runs them),
    their losses summed, one backward; each decoder layer checkpointed by torch's composable
    checkpoint ("torch", the trainer's), by transformers' own ("hf"), or not at all. -> the loss
    summed over the ranks and every gradient summed over them."""
    from torch.distributed._composable import checkpoint

    from lasp2.integrations.transformers import parallelize, shard_batch
    from lasp2.parallel import SequenceParallel

    sp = SequenceParallel(group, layout="zigzag")
    model = parallelize(build(family), sp)
    if checkpointing == "torch":
        for layer in model.base_model.layers:
            checkpoint(layer)
    elif checkpointing == "hf":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss = 0.0
    for seed, row in enumerate(ROWS):
        ids = batch(seed + 2)
        position_ids = torch.cat([torch.arange(b - a) for a, b in zip(row, row[1:])])[None]
        loss = loss + model(**shard_batch(sp, ids, labels=ids, position_ids=position_ids)).loss
    loss.backward()
    total = loss.detach().clone()
    torch.distributed.all_reduce(total, group=group)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.distributed.all_reduce(grads, group=group)
    return float(total), grads


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_rows_under_activation_checkpointing_equal_without(dist_workers, family):
    """The documents travel with each decoder layer's call, so the backward's recompute of the
    first row uses the first row's documents (they once came from module state, which held the
    last row's)."""
    plain = dist_workers.run(packed_rows_step, (0, 1), family, "none")[0]
    # torch's composable checkpoint (the trainer's) for every family; transformers' own wraps the
    # same decoder-layer call, checked once
    for checkpointing in ("torch", "hf") if family == "qwen3_next" else ("torch",):
        loss, grads = dist_workers.run(packed_rows_step, (0, 1), family, checkpointing)[0]
        assert abs(loss - plain[0]) <= 1e-5 * abs(plain[0]), (checkpointing, loss, plain[0])
        assert rel_err(grads, plain[1]) < 1e-5, checkpointing


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pretrained_files_load_into_a_meta_model_and_write_back_the_same(tmp_path, family):
    """`lasp2.integrations.pretrained`: a save_pretrained directory (each family's own checkpoint
    names: per-expert MoE weights, renamed modules) loads into the model built on the meta device
    (the same state and logits as the model that saved it), and is written back with the same
    names, dtypes and values. The reference: transformers' own from_pretrained, in fp32."""
    from safetensors.torch import load_file

    from lasp2.integrations.pretrained import load_weights, save_pretrained

    original = build(family).to(torch.bfloat16)
    original.save_pretrained(tmp_path / "source")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(original.config, dtype=torch.float32)
    load_weights(model, tmp_path / "source")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "source", dtype=torch.float32)
    want = reference.state_dict()
    assert sorted(model.state_dict()) == sorted(want)
    assert all(torch.equal(t, want[n]) for n, t in model.state_dict().items())
    ids = batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    save_pretrained(model, tmp_path / "out", source=tmp_path / "source")
    files, written = load_file(tmp_path / "source" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(written) == sorted(files)
    assert all(written[k].dtype == torch.bfloat16 and torch.equal(written[k], files[k]) for k in files)
