"""Loss parity: the same seed gives the same per-step losses and final parameters whatever the
data x sequence parallelism (fp32, 10 steps of a small Linear-Llama3).

Two fp32 runs of the same math differ by rounding (sums taken in another order), and early
AdamW steps move each weight by about +-lr whatever the size of its gradient, so tiny
differences can grow: on one process, chunk size 16 instead of 64 (the same math) already moves
a pure-retention model by 3e-5 within 10 steps at lr 1e-4. So every case first measures that
control and requires it below a third of the bound; only then does "within 1e-5" tell a
correct sequence-parallel run from a wrong one. A sweep over variants, patterns and learning
rates (in the note of this test's commit) found the sequence-parallel differences always of the
control's size; the cases below use lr 5e-5 and, per variant, the pattern whose control is
smallest (pure gated models are the most sensitive), and the loss still falls by 0.45-0.8.

"Parameters within 1e-5" is the whole parameter vector. Tensor by tensor the bound is 1e-4:
the zero-initialised decay-gate biases of SimpleGLA and GLA are ten tiny AdamW updates each and
move by up to 3e-5 under rounding-sized gradient noise while the whole vector moves by 1e-6.
"""
import pytest
import torch

from lasp2.model import LINEAR_KINDS
from tests.dist_workers import MESH_SHAPES
from tests.helpers import rel_err
from tests.parallel.cases import train_job

TOL = 1e-5
PER_TENSOR_TOL = 1e-4
MESHES = {"single": (0,), **{name: ranks for name, (ranks, _, _) in MESH_SHAPES.items()}}  # name -> ranks


def argv(tmp_path, kind, pattern, layout, extra=()):
    return ["--steps", "10", "--seq-len", "48", "--batch-size", "4", "--linear-kind", kind, "--pattern", pattern,
            "--layout", layout, "--lr", "5e-5", "--warmup", "3", "--val-every", "5", "--val-batches", "1",
            "--ckpt-every", "0", "--out", str(tmp_path), "--seed", "3", *extra]


def run(dist_workers, mesh, args):
    """Rank 0's result of the trainer on `mesh` ("sp2", ...; "sp2-replicate": --data-parallel
    replicate instead of the default shard; "-ac": with activation checkpointing; "-compile":
    torch.compile per block)."""
    mesh, *options = mesh.split("-")
    extra = ["--sp", "1" if mesh == "single" else str(MESH_SHAPES[mesh][2])]
    extra += ["--checkpointing"] if "ac" in options else []
    extra += ["--compile"] if "compile" in options else []
    extra += ["--data-parallel", "replicate"] if "replicate" in options else []
    return dist_workers.run(train_job, MESHES[mesh], [*args, *extra], mesh, timeout=300)[0]


def _flat(params):
    return torch.cat([p.flatten() for _, p in sorted(params.items())])


def differences(got, ref):
    """(worst per-step loss, validation loss, whole parameter vector, worst tensor), relative."""
    assert len(got["losses"]) == len(ref["losses"]) == 10
    loss = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"]))
    val = abs(got["val_loss"] - ref["val_loss"]) / abs(ref["val_loss"])
    whole = rel_err(_flat(got["params"]), _flat(ref["params"]))
    tensor = max(rel_err(got["params"][n], p) for n, p in ref["params"].items())
    return loss, val, whole, tensor


_ONE_PROCESS: dict = {}  # the single-process runs, kept for the cases that compare against the same one


def one_process(dist_workers, args):
    """run(dist_workers, "single", args), computed once per command line (the --out folder aside)."""
    key = tuple("<out>" if i and args[i - 1] == "--out" else a for i, a in enumerate(args))
    if key not in _ONE_PROCESS:
        _ONE_PROCESS[key] = run(dist_workers, "single", args)
    return _ONE_PROCESS[key]


def check_case(dist_workers, tmp_path, kind, pattern, runs, extra=()):
    ref = one_process(dist_workers, argv(tmp_path / "single", kind, pattern, "zigzag", extra))
    assert ref["losses"][-1] < ref["losses"][0] - 0.2, ref["losses"]  # it trains
    control = one_process(dist_workers, argv(tmp_path / "control", kind, pattern, "zigzag", [*extra, "--chunk-size", "16"]))
    loss, val, whole, tensor = differences(control, ref)
    assert max(loss, val, whole) < TOL / 3 and tensor < PER_TENSOR_TOL / 3, ("setting too chaotic", loss, val, whole, tensor)
    for mesh, layout in runs:
        loss, val, whole, tensor = differences(run(dist_workers, mesh, argv(tmp_path / f"{mesh}-{layout}", kind, pattern, layout, extra)), ref)
        what = f"{kind} {pattern} {mesh} {layout}"
        assert loss <= TOL and val <= TOL, f"{what}: losses differ by {loss:.1e} (validation {val:.1e})"
        assert whole <= TOL, f"{what}: parameter vector differs by {whole:.1e}"
        assert tensor <= PER_TENSOR_TOL, f"{what}: a parameter tensor differs by {tensor:.1e}"


ALL_MESHES = [("sp2", "contiguous"), ("sp2", "zigzag"), ("dp2sp2", "zigzag"), ("dp2sp2", "contiguous")]


@pytest.mark.parametrize("pattern,kind", [("L", "lightning"), ("LLLN", "gla")], ids=["pure-lightning", "hybrid-gla"])
def test_parity_over_meshes_and_layouts(dist_workers, tmp_path, pattern, kind):
    check_case(dist_workers, tmp_path, kind, pattern, ALL_MESHES)


SHARD_AND_REPLICATE = {"L": [("dp2", "zigzag"), ("sp2-replicate", "zigzag"), ("dp2sp2-replicate", "contiguous")],
                       "LLLN": [("dp4", "contiguous"), ("dp2-replicate", "zigzag"), ("sp2-replicate", "contiguous"),
                                ("dp2sp2-ac", "zigzag")]}


@pytest.mark.parametrize("pattern,kind", [("L", "lightning"), ("LLLN", "gla")], ids=["pure-lightning", "hybrid-gla"])
def test_parity_of_sharded_and_replicated_data_parallelism(dist_workers, tmp_path, pattern, kind):
    """FSDP2 sharding (the default, above, at sp = 2 and dp = 2 x sp = 2) and replication against
    one process: sp = 1 with dp = 2 and 4 sharded, replicated at dp = 2, sp = 2, dp = 2 x sp = 2;
    sharded dp = 2 x sp = 2 with activation checkpointing (its recompute repeats the attention's
    collectives and FSDP's gathers)."""
    check_case(dist_workers, tmp_path, kind, pattern, SHARD_AND_REPLICATE[pattern])


VARIANT_PATTERNS = {"basic": "LLLN", "retention": "LLLN", "simple_gla": "LLLN", "based": "L", "rebased": "L",
                    "deltanet": "LLLN", "gated_deltanet": "LLLN", "kda": "LLLN"}


def test_every_linear_variant_has_a_parity_case():
    assert set(VARIANT_PATTERNS) | {"lightning", "gla"} == set(LINEAR_KINDS)


# KDA's loss falls more slowly at lr 5e-5 (its output gate starts at one half).
VARIANT_EXTRA = {"kda": ["--lr", "2e-4"]}


@pytest.mark.parametrize("kind", list(VARIANT_PATTERNS))
def test_parity_of_every_linear_variant(dist_workers, tmp_path, kind):
    check_case(dist_workers, tmp_path, kind, VARIANT_PATTERNS[kind], [("sp2", "zigzag"), ("sp2", "contiguous")],
               VARIANT_EXTRA.get(kind, ()))


@pytest.mark.parametrize("linear,softmax", [("lasp1", "ring"), ("ulysses", "ulysses"), ("ring", "allgather"),
                                            ("allgather", "ring"), ("allscan", "allgather"), ("logscan", "ring")])
def test_parity_of_other_methods(dist_workers, tmp_path, linear, softmax):
    check_case(dist_workers, tmp_path, "simple_gla", "LLLN", [("sp2", "zigzag")],
               ["--sp-linear", linear, "--sp-softmax", softmax])


@pytest.mark.parametrize("method", ["lasp2", "lasp1", "ulysses", "auto"])
def test_parity_of_delta_rule_methods(dist_workers, tmp_path, method):
    check_case(dist_workers, tmp_path, "gated_deltanet", "LLLN", [("sp2", "zigzag"), ("dp2sp2", "contiguous")],
               ["--sp-linear", method])


def test_parity_of_compiled_blocks(dist_workers, tmp_path):
    """--compile: every block compiled (its graph broken where the methods communicate), with
    activation checkpointing, at sp 2: the eager single process's losses and parameters."""
    check_case(dist_workers, tmp_path, "basic", "LN", [("sp2-compile-ac", "zigzag")])


@pytest.fixture(scope="module")
def documents_corpus(tmp_path_factory):
    """400 short text files (1-14 words): rows of 48 tokens hold several whole documents."""
    import random

    root = tmp_path_factory.mktemp("documents")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards hex the jolly kangaroo".split()
    for i in range(400):
        (root / f"{i:04d}.txt").write_text(" ".join(rng.choice(words) for _ in range(rng.randint(1, 14))) + ".")
    return root


@pytest.mark.parametrize("kind", ["simple_gla", "gated_deltanet"])
def test_parity_of_packed_documents(dist_workers, tmp_path, documents_corpus, kind):
    """A rank's packed rows run as one packed sequence (the default --packed-rows batched)."""
    check_case(dist_workers, tmp_path, kind, "LLLN", [("sp2", "zigzag"), ("sp2", "contiguous"), ("dp2sp2", "zigzag")],
               ["--packing", "documents", "--data", str(documents_corpus)])


@pytest.mark.parametrize("kind", ["simple_gla", "gated_deltanet"])
def test_parity_of_balanced_packed_documents(dist_workers, tmp_path, documents_corpus, kind):
    """--balance: each call's documents in the planner's order over its slot table, at sp 2 and
    dp 2 x sp 2 (and with activation checkpointing), against one process (where there is
    nothing to balance)."""
    check_case(dist_workers, tmp_path, kind, "LLLN", [("sp2", "zigzag"), ("dp2sp2", "contiguous"), ("sp2-ac", "zigzag")],
               ["--packing", "documents", "--data", str(documents_corpus), "--balance"])


def test_packed_rows_batched_equal_one_at_a_time(dist_workers, tmp_path, documents_corpus):
    """Rows concatenated into one packed sequence (their documents shifted into place) train as
    the rows run one at a time, at sp 2 (the calls differ: one per layer instead of one per row)."""
    extra = ["--packing", "documents", "--data", str(documents_corpus)]
    batched = run(dist_workers, "sp2", argv(tmp_path / "batched", "simple_gla", "LLLN", "zigzag", extra))
    one = run(dist_workers, "sp2", argv(tmp_path / "one", "simple_gla", "LLLN", "zigzag", [*extra, "--packed-rows", "one"]))
    loss, val, whole, tensor = differences(one, batched)
    assert loss <= TOL and val <= TOL and whole <= TOL and tensor <= PER_TENSOR_TOL, (loss, val, whole, tensor)


@pytest.fixture(scope="module")
def hf_config(tmp_path_factory):
    """A tiny Qwen3-Next config.json (3 Gated DeltaNet layers : 1 gated attention, MoE); its
    vocabulary covers bytes and the end-of-document token."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf") / "config.json"
    transformers.Qwen3NextConfig(
        vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
        shared_expert_intermediate_size=8, full_attention_interval=4).to_json_file(path)
    return path


@pytest.mark.parametrize("packing", ["rows", "packed", "balanced"])
def test_parity_of_a_hugging_face_model(dist_workers, tmp_path, hf_config, documents_corpus, packing):
    extra = ["--hf-config", str(hf_config), "--adam-eps", "1e-6", "--lr", "1e-3"]
    if packing != "rows":
        extra += ["--packing", "documents", "--data", str(documents_corpus)]
    if packing == "balanced":
        extra += ["--balance"]
    # -ac: each block's recompute must see the call's documents (and, balanced, its slot table)
    check_case(dist_workers, tmp_path, "basic", "LLLN", [("sp2", "zigzag"), ("dp2sp2", "contiguous"), ("sp2-ac", "zigzag")],
               extra)


@pytest.mark.parametrize("mesh", ["single", "sp2", "dp2sp2"])
def test_gradient_accumulation_equals_the_whole_batch_in_one_step(dist_workers, tmp_path, mesh):
    """--grad-accum 2 (two micro-batches of half the rows) against the same global batch in one
    micro-batch, pure lightning (the least chaotic control of the sweep above): 1e-5."""
    ref = one_process(dist_workers, argv(tmp_path / "one", "lightning", "L", "zigzag"))
    got = run(dist_workers, mesh, argv(tmp_path / mesh, "lightning", "L", "zigzag", ["--grad-accum", "2"]))
    loss, val, whole, tensor = differences(got, ref)
    assert max(loss, val, whole) <= TOL and tensor <= PER_TENSOR_TOL, (loss, val, whole, tensor)
