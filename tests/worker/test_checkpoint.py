import pytest
import torch

from clipscope.sae.model import TopKSAE
from worker.train import checkpoint
from worker.train.checkpoint import CheckpointWriter, checkpoint_dirs, load_latest


def _state(sae):
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for p in sae.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    return optimizer


def test_a_checkpoint_holds_the_state_at_save_time_though_training_goes_on(tmp_path):
    sae = TopKSAE(16, 64, 4)
    optimizer = _state(sae)
    writer = CheckpointWriter(tmp_path, {"layer": 1}, keep=2)
    weights = sae.encoder_weight.detach().clone()
    moment = optimizer.state[sae.encoder_weight]["exp_avg"].clone()
    writer.save(10, sae, {"optimizer": optimizer.state_dict()})
    with torch.no_grad():  # what the next training steps do, in place, while the write may be running
        sae.encoder_weight.add_(1.0)
    optimizer.state[sae.encoder_weight]["exp_avg"].add_(1.0)
    writer.close()
    loaded, state = load_latest(tmp_path, "cpu")
    assert state["step"] == 10
    torch.testing.assert_close(loaded.encoder_weight, weights, rtol=0, atol=0)
    saved_moment = state["optimizer"]["state"][0]["exp_avg"]
    torch.testing.assert_close(saved_moment, moment, rtol=0, atol=0)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    sae = TopKSAE(8, 32, 2)
    writer = CheckpointWriter(tmp_path, {}, keep=2)
    for step in (1, 2, 3):
        writer.save(step, sae, {})
    writer.close()
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [2, 3]


def test_a_failed_write_is_raised_in_the_training_thread_and_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    sae = TopKSAE(8, 32, 2)
    writer = CheckpointWriter(tmp_path, {}, keep=2)
    writer.save(1, sae, {})
    writer.close()

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    writer.save(2, sae, {})
    with pytest.raises(OSError, match="No space"):
        writer.close()
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [1]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]
