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


@pytest.mark.parametrize("saved,resumed,kind", [("dp2sp2", "sp2", "gated_deltanet"), ("dp2sp2", "sp4", "simple_gla"),
                                                ("sp2-replicate", "dp2", "simple_gla")])
def test_resume_on_another_mesh_continues_the_loss_curve(dist_workers, tmp_path, saved, resumed, kind):
    """Three steps on one mesh, then three more from its checkpoint on another number of processes
    or another dp x sp split (DCP reshards the sharded model and AdamW state; "-replicate": saved
    with --data-parallel replicate, resumed sharded; Gated DeltaNet: its fp32 A_log and dt_bias,
    which FSDP leaves whole, with their AdamW moments): the losses and parameters of the run that
    was never stopped, within 1e-5 (fp32 sums in another order)."""
    from tests.train.test_parity import run

    def args(path, *extra):
        mode = ["--data-parallel", "replicate"] if path.name.endswith("replicate") else []
        return [*argv(path, kind, "LLLN", "zigzag"), "--steps", "6", "--ckpt-every", "3", *mode, *extra]

    saved_mesh, resumed_mesh = saved.split("-")[0], resumed.split("-")[0]
    straight = run(dist_workers, saved_mesh, args(tmp_path / f"straight-{saved}"))
    first = run(dist_workers, saved_mesh, args(tmp_path / saved, "--stop-at", "3"))
    (tmp_path / saved).rename(tmp_path / resumed)
    second = run(dist_workers, resumed_mesh, args(tmp_path / resumed, "--resume"))
    assert first["losses"] == straight["losses"][:3] and len(second["losses"]) == 3
    worst = max(abs(a - b) / abs(b) for a, b in zip(second["losses"], straight["losses"][3:]))
    assert worst <= 1e-5, (second["losses"], straight["losses"][3:])
    for name, p in straight["params"].items():
        assert rel_err(second["params"][name], p) <= 1e-5, name


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
    from lasp2.train import parse_config, train
    from tests.train.test_parity import argv as parity_argv

    straight = _train(dist_workers, tmp_path, ["--steps", "9"], "straight")
    _train(dist_workers, tmp_path, ["--steps", "9", "--stop-at", "6"])
    newest = tmp_path / "run" / "checkpoints" / "step_0000005"
    data = sorted(newest.glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    out = io.StringIO()
    args = parse_config([*parity_argv(tmp_path / "run", "simple_gla", "LLLN", "zigzag"), "--steps", "9",
                                      "--ckpt-every", "3", "--resume"])
    resumed = train(args, ParallelDims(), stream=out)
    assert f"checkpoint step_0000005 cannot be loaded: {data} is truncated" in out.getvalue()
    assert resumed["losses"] == straight["losses"][3:]  # from the step-2 checkpoint on


def test_resuming_a_different_model_names_the_fields(dist_workers, tmp_path):
    import io

    from lasp2.distributed import ParallelDims
    from lasp2.train import ConfigError, parse_config, train
    from tests.train.test_parity import argv as parity_argv

    _train(dist_workers, tmp_path, ["--stop-at", "3"])
    args = parse_config([*parity_argv(tmp_path / "run", "gla", "LLLN", "zigzag"), "--steps", "6",
                                      "--ckpt-every", "3", "--resume"])
    with pytest.raises(ConfigError, match=r"model differs from this run's in linear_kind \('simple_gla' -> 'gla'\)"):
        train(args, ParallelDims(), stream=io.StringIO())


def test_resume_with_no_loadable_checkpoint_stops_instead_of_starting_over(dist_workers, tmp_path):
    import io

    from lasp2.distributed import ParallelDims
    from lasp2.train import ConfigError, parse_config, train
    from tests.train.test_parity import argv as parity_argv

    _train(dist_workers, tmp_path, [])
    for data in (tmp_path / "run" / "checkpoints").glob("step_*/*.distcp"):
        data.write_bytes(b"")
    args = parse_config([*parity_argv(tmp_path / "run", "simple_gla", "LLLN", "zigzag"), "--steps", "6",
                         "--ckpt-every", "3", "--resume"])
    out = io.StringIO()
    with pytest.raises(ConfigError, match="--resume: no checkpoint in .* can be loaded"):
        train(args, ParallelDims(), stream=out)
    assert "checkpoint step_0000005 cannot be loaded" in out.getvalue()
    assert "checkpoint step_0000002 cannot be loaded" in out.getvalue()
    assert (tmp_path / "run" / "checkpoints" / "step_0000005").is_dir()  # nothing overwritten
