"""Resume: 6 steps straight equal 3 steps, a stop, and 3 resumed steps (losses and parameters)."""
import pytest

from tests.helpers import rel_err
from tests.parallel.cases import train_job
from tests.train.test_parity import MESHES, argv


@pytest.mark.parametrize("mesh,packing", [("single", False), ("sp2", False), ("sp2", True)],
                         ids=["single", "sp2", "sp2-packed"])
def test_resume_equals_straight_run(dist_workers, tmp_path, mesh, packing):
    sp = ["--sp", "1" if mesh == "single" else "2"]
    common = ["--steps", "6", "--ckpt-every", "3", *sp]
    if packing:  # rows of whole files of the built-in corpus, drawn from (seed, step)
        common += ["--packing", "documents"]
    straight = dist_workers.run(train_job, MESHES[mesh], [*argv(tmp_path / "a", "simple_gla", "LLLN", "zigzag"),
                                                          *common], mesh)[0]
    first = dist_workers.run(train_job, MESHES[mesh], [*argv(tmp_path / "b", "simple_gla", "LLLN", "zigzag"), *common,
                                                       "--stop-at", "3"], mesh)[0]
    assert (tmp_path / "b" / "checkpoints" / "step_0000002").is_dir()
    second = dist_workers.run(train_job, MESHES[mesh], [*argv(tmp_path / "b", "simple_gla", "LLLN", "zigzag"), *common,
                                                        "--resume"], mesh)[0]
    assert len(first["losses"]) == 3 and len(second["losses"]) == 3
    assert first["losses"] + second["losses"] == straight["losses"]
    for name, p in straight["params"].items():
        assert rel_err(second["params"][name], p) == 0.0, name


def test_half_written_checkpoint_is_ignored(tmp_path):
    from lasp2 import checkpoint

    (tmp_path / "checkpoints" / "step_0000009.tmp").mkdir(parents=True)
    assert checkpoint.latest(tmp_path) is None
    (tmp_path / "checkpoints" / "step_0000004").mkdir()
    (tmp_path / "checkpoints" / "step_0000004" / "trainer.json").write_text('{"step": 4}')
    assert checkpoint.latest(tmp_path).name == "step_0000004"


def _train(dist_workers, tmp_path, extra, name="run"):
    from tests.train.test_parity import argv as parity_argv

    args = [*parity_argv(tmp_path / name, "simple_gla", "LLLN", "zigzag"), "--steps", "6", "--ckpt-every", "3", *extra]
    return dist_workers.run(train_job, MESHES["single"], args, "single")[0]


def test_a_truncated_checkpoint_falls_back_to_the_one_before(dist_workers, tmp_path):
    """The newest checkpoint's data file cut short: resuming names the file and continues from
    the previous checkpoint, with the losses of the uninterrupted run."""
    import io

    from lasp2.distributed import ParallelDims
    from lasp2.train import build_parser, train
    from tests.train.test_parity import argv as parity_argv

    straight = _train(dist_workers, tmp_path, ["--steps", "9"], "straight")
    _train(dist_workers, tmp_path, ["--steps", "9", "--stop-at", "6"])
    newest = tmp_path / "run" / "checkpoints" / "step_0000005"
    data = sorted(newest.glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    out = io.StringIO()
    args = build_parser().parse_args([*parity_argv(tmp_path / "run", "simple_gla", "LLLN", "zigzag"), "--steps", "9",
                                      "--ckpt-every", "3", "--resume"])
    resumed = train(args, ParallelDims(), stream=out)
    assert f"checkpoint step_0000005 cannot be loaded: {data} is truncated" in out.getvalue()
    assert resumed["losses"] == straight["losses"][3:]  # from the step-2 checkpoint on


def test_resuming_a_different_model_names_the_fields(dist_workers, tmp_path):
    import io

    from lasp2.distributed import ParallelDims
    from lasp2.train import ConfigError, build_parser, train
    from tests.train.test_parity import argv as parity_argv

    _train(dist_workers, tmp_path, ["--stop-at", "3"])
    args = build_parser().parse_args([*parity_argv(tmp_path / "run", "gla", "LLLN", "zigzag"), "--steps", "6",
                                      "--ckpt-every", "3", "--resume"])
    with pytest.raises(ConfigError, match=r"model differs from this run's in linear_kind \('simple_gla' -> 'gla'\)"):
        train(args, ParallelDims(), stream=io.StringIO())
