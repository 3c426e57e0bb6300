"""Fine-tuning a pretrained Hugging Face model (--hf-model) and writing it back (--export-hf,
`python -m lasp2.export`): with learning rate 0 the exported files equal the pretrained ones bit
for bit (names, dtypes, values), on one process and sharded over two; a few steps at sp 2 and
dp 2 x sp 2 give the losses and exported weights of one process; the exported directory's logits
are the trained model's; a chat record's loss counts exactly its assistant tokens; bad input
stops in one line."""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from tests.dist_workers import MESH_SHAPES  # noqa: E402
from tests.helpers import rel_err  # noqa: E402
from tests.parallel.cases import train_job  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "configs" / "qwen3_next_tiny.json"
MESHES = {"single": (0,), **{name: ranks for name, (ranks, _, _) in MESH_SHAPES.items()}}


def pretrained(directory: Path, dtype=torch.bfloat16, **changes) -> Path:
    """A tiny Qwen3-Next (3 Gated DeltaNet + 1 softmax layer, MoE) saved by save_pretrained."""
    config = transformers.AutoConfig.from_pretrained(CONFIG)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(1)
    transformers.AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(directory)
    return directory


def run(dist_workers, mesh: str, args: list[str]) -> dict:
    sp = "1" if mesh == "single" else str(MESH_SHAPES[mesh][2])
    return dist_workers.run(train_job, MESHES[mesh], [*args, "--sp", sp], mesh, timeout=300)[0]


def files(directory: Path) -> dict:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def steps(source: Path, out: Path, lr: str, count: int = 4) -> list[str]:
    return ["--hf-model", str(source), "--steps", str(count), "--seq-len", "48", "--batch-size", "4", "--lr", lr,
            "--warmup", "1", "--min-lr", "0", "--val-every", str(count), "--val-batches", "1", "--ckpt-every",
            str(count), "--out", str(out / "run"), "--export-hf", str(out / "export"), "--seed", "3"]


@pytest.mark.parametrize("mesh", ["single", "sp2"])
def test_learning_rate_zero_exports_the_pretrained_files_exactly(dist_workers, tmp_path, mesh):
    source = pretrained(tmp_path / "pretrained")
    run(dist_workers, mesh, steps(source, tmp_path, "0", count=2))
    want, got = files(source), files(tmp_path / "export")
    assert sorted(got) == sorted(want)  # the checkpoint's own names (per-expert MoE weights), not the fused ones
    assert all(got[k].dtype == want[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)
    saved = json.loads((tmp_path / "export" / "config.json").read_text())
    assert saved["dtype"] == "bfloat16" and saved["model_type"] == "qwen3_next"


def test_steps_across_ranks_equal_one_process(dist_workers, tmp_path):
    """fp32 weights, lr 5e-5: sp 2 and dp 2 x sp 2 against one process; then the exported
    directory's logits against the trained model, and `lasp2.export` of the run's checkpoint,
    sharded over two ranks, against the end-of-run export."""
    source = pretrained(tmp_path / "pretrained", torch.float32)
    single = run(dist_workers, "single", steps(source, tmp_path / "single", "5e-5"))
    assert single["losses"][-1] < single["losses"][0]  # it trains
    want = files(tmp_path / "single" / "export")
    flat = torch.cat([want[k].flatten() for k in sorted(want)])
    for mesh in ("sp2", "dp2sp2"):
        got = run(dist_workers, mesh, steps(source, tmp_path / mesh, "5e-5"))
        assert max(abs(a - b) / b for a, b in zip(got["losses"], single["losses"])) < 1e-5, mesh
        exported = files(tmp_path / mesh / "export")
        assert rel_err(torch.cat([exported[k].flatten() for k in sorted(want)]), flat) < 1e-5, mesh
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "export").eval()
    trained = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(source)).eval()
    trained.load_state_dict({k.removeprefix("model."): v for k, v in single["params"].items()}, strict=False)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained(ids).logits)
    dist_workers.run(export_job, (0, 1), str(tmp_path / "single" / "run"), str(tmp_path / "again"))
    again = files(tmp_path / "again")
    assert sorted(again) == sorted(want) and all(torch.equal(again[k], want[k]) for k in want)


def export_job(group, run_dir, out):
    from lasp2.distributed import ParallelDims
    from lasp2.export import export
    from tests.dist_workers import mesh_of

    export(Path(run_dir), Path(out), ParallelDims(*mesh_of("dp2")))


WORDS = ["<unk>", "</s>", "<user>", "<assistant>", "<system>", "hi", "there", "hello", "you", "how", "are", "fine",
         "thanks", "be", "brief", "ok"]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")
CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                     {"role": "assistant", "content": "hello you"}, {"role": "user", "content": "how are you"},
                     {"role": "assistant", "content": "fine thanks"}]}


def word_tokenizer(directory: Path, words=WORDS, template=TEMPLATE) -> Path:
    """A word-level tokenizer (one id per word) with a chat template and </s> as its eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "unk_token": "<unk>"}
    if template is not None:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_a_chat_records_loss_counts_exactly_its_assistant_tokens(tmp_path):
    """Rendered: "<system> be brief </s> <user> hi there </s> <assistant> hello you </s> <user> how
    are you </s> <assistant> fine thanks </s> ", then the record's end (</s>, the eos). The
    assistant messages' tokens are "hello you </s>" and "fine thanks </s>": 6 targets of 22
    tokens; the <assistant> headers belong to the prompt. The loss of a row holding the record is
    the mean cross-entropy of exactly those 6 predictions."""
    import torch.nn.functional as F

    from lasp2.data import load_tokens
    from lasp2.distributed import ParallelDims
    from lasp2.parallel import SequenceParallel
    from lasp2.train import make_batch, parse_config, sequence_loss

    tok = word_tokenizer(tmp_path / "tok")
    data_file = tmp_path / "chat.jsonl"
    data_file.write_text("\n".join(json.dumps(CHAT) for _ in range(4)) + "\n")
    data = load_tokens(str(data_file), str(tok), 0.25, 22, documents=True)
    record = [4, 13, 14, 1, 2, 5, 6, 1, 3, 7, 8, 1, 2, 9, 10, 8, 1, 3, 11, 12, 1, 1]
    labelled = [0] * 9 + [1, 1, 1] + [0] * 6 + [1, 1, 1, 0]
    assert data.train[:22].tolist() == record and data.train_labelled[:22].tolist() == labelled
    assert data.end_token == 1 and data.vocab_size == len(WORDS)  # the eos ends a record: no new id
    config = parse_config(["--data", str(data_file), "--tokenizer", str(tok), "--packing", "documents",
                           "--seq-len", "21", "--batch-size", "1", "--layout", "contiguous"])
    batch = make_batch(data, "train", 0, 0, config.data)
    rows, _, skip = batch
    assert rows[0].tolist() == record and int((~skip).sum()) == 6
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(len(WORDS), 16), torch.nn.Linear(16, len(WORDS)))
    loss = sequence_loss(lambda tokens, positions, ctx: model(tokens), SequenceParallel(None), ParallelDims(), batch,
                         config.data)
    logits = model(torch.tensor(record[:-1]))
    targets = [i for i in range(21) if labelled[i + 1]]
    want = F.cross_entropy(logits[targets], torch.tensor(record)[[i + 1 for i in targets]])
    assert torch.allclose(loss, want, rtol=1e-6), (loss, want)


def test_plain_chat_format_without_a_template(tmp_path):
    from lasp2.data import load_tokens

    data_file = tmp_path / "chat.jsonl"
    data_file.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"},
                                                  {"role": "assistant", "content": "4"}]}) + "\n" + '{"text": "x"}\n')
    data = load_tokens(str(data_file), None, 0.0, 1, documents=True)
    ids = data.train.tolist() + data.val.tolist()
    assert ids.count(256) == 2  # each record ends with a new id (bytes have no eos)
    assert bytes(i for i in ids if i < 256) == b"<|user|>\n2+2?\n<|assistant|>\n4\nx"
    marks = data.train_labelled.tolist() + data.val_labelled.tolist()
    chat = ids.index(256)
    assert bytes(t for t, m in zip(ids[:chat], marks) if m) == b"4\n"  # the reply; its header is the prompt's
    assert marks[chat:] == [0, 1, 0]  # the record's end, then the text record (all of it), its end


BAD = [
    ("no_weights", "no weights (model.safetensors or model.safetensors.index.json)"),
    ("vocab", "its vocab_size 8 is smaller than the tokenizer's 16 token ids"),
    ("no_assistant", "line 1: a chat record without an assistant message has nothing to learn"),
    ("not_hf", "--export-hf"),
]


@pytest.mark.parametrize("case, message", BAD)
def test_bad_input_is_one_line(capsys, tmp_path, case, message):
    from lasp2.train import main

    args = ["--steps", "1", "--seq-len", "16", "--batch-size", "1", "--out", str(tmp_path / "run")]
    if case == "no_weights":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text(CONFIG.read_text())
        args += ["--hf-model", str(tmp_path / "empty")]
    elif case == "vocab":
        args += ["--hf-model", str(pretrained(tmp_path / "small", vocab_size=8)), "--tokenizer",
                 str(word_tokenizer(tmp_path / "tok"))]
    elif case == "no_assistant":
        (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
        args += ["--data", str(tmp_path / "chat.jsonl"), "--hf-model", str(pretrained(tmp_path / "model"))]
    else:
        args += ["--export-hf", str(tmp_path / "out")]
    capsys.readouterr()  # what making the fixtures printed
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_resuming_with_another_model_is_one_line(dist_workers, capsys, tmp_path):
    from lasp2.train import main

    first, second = pretrained(tmp_path / "first"), pretrained(tmp_path / "second")
    run(dist_workers, "single", steps(first, tmp_path, "1e-4", count=2))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*steps(second, tmp_path, "1e-4", count=3), "--resume"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"the run started from --hf-model {first.resolve()}, this one gives {second.resolve()}" in err


def test_readme_quick_start(tmp_path):
    """The README's fine-tuning commands, on a small corpus instead of the built-in one."""
    import re
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    assert "examples/make_tiny_pretrained.py tiny-qwen3-next" in readme
    assert "--hf-model tiny-qwen3-next" in readme and "--export-hf tiny-qwen3-next-ft" in readme
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(p.read_text() for p in sorted((ROOT / "lasp2").glob("*.py"))))
    made = subprocess.run([sys.executable, str(ROOT / "examples" / "make_tiny_pretrained.py"), "tiny"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    trained = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "lasp2.train", "--sp", "2", "--hf-model", "tiny", "--steps", "6", "--seq-len", "128",
                              "--batch-size", "4", "--val-every", "6", "--val-batches", "1", "--data", str(corpus),
                              "--export-hf", "tiny-ft"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+) \|", trained.stdout)]
    assert losses and losses[-1] < losses[0], trained.stdout
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tiny-ft")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-ft")
    out = model.generate(tok("def main(", return_tensors="pt").input_ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == len(tok("def main(").input_ids) + 4 and tok.decode(out[0]).startswith("def main(")


def test_chat_data_across_ranks_equals_one_process(dist_workers, tmp_path):
    """Chat records packed into rows, the assistant-only labels sharded with the tokens: sp 2's
    losses are one process's."""
    tok = word_tokenizer(tmp_path / "tok")
    lines = [CHAT, {"text": "hello you how are you"}, {"messages": CHAT["messages"][:3]}] * 6
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    source = pretrained(tmp_path / "model", torch.float32)
    data = ["--data", str(tmp_path / "chat.jsonl"), "--tokenizer", str(tok), "--packing", "documents",
            "--val-fraction", "0.2", "--seq-len", "32"]  # the last --seq-len given wins
    single = run(dist_workers, "single", [*steps(source, tmp_path / "single", "5e-5", count=3), *data])
    sp2 = run(dist_workers, "sp2", [*steps(source, tmp_path / "sp2", "5e-5", count=3), *data])
    assert max(abs(a - b) / b for a, b in zip(sp2["losses"], single["losses"])) < 1e-5


def test_resuming_with_the_same_model_continues_and_any_checkpoint_exports(dist_workers, tmp_path):
    from lasp2.distributed import ParallelDims
    from lasp2.export import export

    source = pretrained(tmp_path / "model")
    run(dist_workers, "single", steps(source, tmp_path, "1e-4", count=2))
    first = files(tmp_path / "export")
    resumed = run(dist_workers, "single", [*steps(source, tmp_path, "1e-4", count=4), "--resume"])
    assert len(resumed["losses"]) == 2  # steps 2 and 3 only
    export(tmp_path / "run" / "checkpoints" / "step_0000001", tmp_path / "first", ParallelDims())  # the earlier one
    again = files(tmp_path / "first")
    assert sorted(again) == sorted(first) and all(torch.equal(again[k], first[k]) for k in first)
    assert not all(torch.equal(v, first[k]) for k, v in files(tmp_path / "export").items())  # the later one differs


def test_exporting_a_linear_llama_run_is_one_line(capsys, tmp_path):
    from lasp2.export import main as export_main
    from lasp2.train import main

    main(["--steps", "1", "--seq-len", "16", "--batch-size", "1", "--ckpt-every", "1", "--val-every", "1",
          "--val-batches", "1", "--out", str(tmp_path / "run")])
    capsys.readouterr()
    assert export_main([str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"python -m lasp2.export: {tmp_path / 'run'}: a Linear-Llama3 run; only --hf-model and "
                   f"--hf-config runs have a Hugging Face format"), err
