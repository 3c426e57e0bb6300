"""Launches per layer call under policy("cuda"): for every op and method, every form, W = 2, rows
and packed documents, the aten ops of one forward and backward grow at most 1.5x for 8x the
tokens (C = 32 -> 256 -> 2048 at chunk 8, the chunk counts of C = 256 -> 16384 at chunk 64),
counted on real gloo ranks with CPU tensors. And `lasp2_bench launches`, which counts on meta
tensors over torch's fake process group, finds exactly what real ranks run."""
import pytest

from lasp2_bench import launches

TOKENS = (32, 256, 2048)
SMALL = dict(H=2, D=4, chunk_size=8)
CASES = [(family, form, method) for family in launches.FORMS for method in launches.methods(family)
         for form in launches.FORMS[family] if launches.accepts(family, form, method, SMALL["H"], 2)]


def counts_on_ranks(group, cases, tokens, policy, packed, layout="contiguous"):
    return {(family, form, method, C): launches.layer_ops(family, form, method, C, group=group, layout=layout,
                                                          policy=policy, packed=packed, device="cpu", **SMALL)
            for family, form, method in cases for C in tokens}


@pytest.mark.parametrize("packed,layout", [(False, "contiguous"), (True, "zigzag")], ids=["rows", "packed-zigzag"])
def test_launches_do_not_grow_with_the_tokens_under_the_cuda_policy(dist_workers, packed, layout):
    results = dist_workers.run(counts_on_ranks, (0, 1), CASES, TOKENS, "cuda", packed, layout)
    worst = {}
    for key in results[0]:
        family, form, method, C = key
        if C == TOKENS[0]:
            continue
        ops = max(r[key] for r in results.values())
        before = max(r[(family, form, method, C // 8)] for r in results.values())
        worst[(family, form, method, C)] = ops / before
    too_many = {k: round(v, 2) for k, v in worst.items() if v > 1.5}
    assert not too_many, too_many


def test_the_cpu_policy_grows_where_the_cuda_policy_does_not(dist_workers):
    """The CPU's cache-sized tiles and loops do grow (the reason for the CUDA policy): the delta
    rule's chunk loop at least doubles per 8x tokens."""
    cases = [("delta", "gated_deltanet", "lasp2"), ("linear", "token", "op")]
    results = dist_workers.run(counts_on_ranks, (0, 1), cases, (32, 256), "cpu", False)
    assert results[0][("delta", "gated_deltanet", "lasp2", 256)] > 2 * results[0][("delta", "gated_deltanet", "lasp2", 32)]


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("policy", ["cpu", "cuda"])
def test_the_benchmark_counts_on_meta_what_real_ranks_run(dist_workers, policy, packed):
    """Compared under the CUDA policy (a fixed schedule) for every case, and under the CPU
    policy for the methods whose schedule does not poll. Within 2 ops: with packed documents
    the batch's offsets are copied once to the inputs' device, which CPU inputs skip and meta
    ones (like a GPU's) do not; gloo runs a reduce-scatter as a split and a copy of its own,
    which dispatch as aten ops (NCCL's and the fake group's do not). torch's fused attention
    (scaled_dot_product_attention: the softmax op, all-gather and Ulysses) has no meta kernel and
    runs unfused there: more ops, the same for every length (an upper bound)."""
    cases = CASES if policy == "cuda" else [c for c in CASES if c[2] in ("op", "allgather", "ulysses", "sp")]
    real = dist_workers.run(counts_on_ranks, (0, 1), cases, (64,), policy, packed)
    for rank in (0, 1):
        with launches.fake_group(rank, 2) as group:
            for (family, form, method, C), ops in real[rank].items():
                fake = launches.layer_ops(family, form, method, C, group=group, policy=policy, packed=packed,
                                          device="meta", **SMALL)
                if family == "softmax" and method != "ring":
                    assert fake >= ops, (rank, family, form, method, fake, ops)
                else:
                    assert abs(fake - ops) <= 2, (rank, family, form, method, fake, ops)
