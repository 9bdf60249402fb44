"""Which folders count as checkpoints, and how damage is reported (one process, real DCP files)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from harness.checkpoint import StartPoint, check_checkpoint, complete_checkpoints, is_due, start_point
from harness.config import CheckpointConfig, ConfigError, load_config
from harness.validation import validate


def _write(path) -> None:
    dcp.save({"w": torch.arange(1000.0), "step": 3}, checkpoint_id=str(path))


@pytest.fixture
def root(tmp_path):
    for step in (2, 4):
        _write(tmp_path / f"step_{step:07d}")
    _write(tmp_path / "step_0000006.tmp")  # a save that never got renamed
    (tmp_path / "step_0000008").write_text("a file, not a folder")
    (tmp_path / "notes").mkdir()
    return tmp_path


def test_only_renamed_folders_count_and_the_newest_is_resumed(root):
    assert [step for step, _ in complete_checkpoints(str(root))] == [2, 4]
    older, newest = str(root / "step_0000002"), str(root / "step_0000004")
    assert start_point(CheckpointConfig(), str(root)) == StartPoint(newest, weights_only=False)
    assert start_point(CheckpointConfig(resume_from=older), str(root)) == StartPoint(older, weights_only=False)
    assert start_point(CheckpointConfig(), str(root / "empty")) is None


def test_a_fine_tune_takes_weights_until_it_has_checkpoints_of_its_own(root, tmp_path_factory):
    other = str(root / "step_0000002")
    fine_tune = CheckpointConfig(resume_from=other, load_weights_only=True)
    own = tmp_path_factory.mktemp("own")
    assert start_point(fine_tune, str(own)) == StartPoint(other, weights_only=True)
    _write(own / "step_0000001")
    assert start_point(fine_tune, str(own)) == StartPoint(str(own / "step_0000001"), weights_only=False)


def test_due_every_n_steps_and_at_the_end():
    assert [s for s in range(1, 11) if is_due(3, s, 10)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if is_due(None, s, 10)] == [10]


@pytest.mark.parametrize("damage, expected", [
    (lambda p: (p / ".metadata").unlink(), "no .metadata file"),
    (lambda p: (p / ".metadata").write_bytes(b"\x80garbage"), "unreadable .metadata"),
    (lambda p: (p / "__0_0.distcp").unlink(), "data file __0_0.distcp is missing"),
    (lambda p: (p / "__0_0.distcp").write_bytes(b"\0" * 10), "data file __0_0.distcp is truncated"),
], ids=["no-metadata", "bad-metadata", "missing-data", "truncated-data"])
def test_damage_is_named(root, damage, expected):
    newest = root / "step_0000004"
    check_checkpoint(str(newest))
    damage(newest)
    with pytest.raises(ValueError, match=expected):
        check_checkpoint(str(newest))
    with pytest.raises(ConfigError) as error:
        validate(load_config(None, [f"--checkpoint.dir={root}"]), 1)
    message = str(error.value)
    assert message.startswith(f"checkpoint.dir={root}: checkpoint step_0000004 is corrupt") and "\n" not in message
    assert "; delete it" in message
