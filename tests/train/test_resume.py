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
