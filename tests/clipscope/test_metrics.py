import numpy as np
import torch

from clipscope.sae.metrics import FiringTracker, ReconstructionStats
from clipscope.sae.model import SparseCode


def _numpy_evr(x: np.ndarray, x_hat: np.ndarray) -> float:
    """The README's definition, written independently: 1 - sum_i Var(x_i - x_hat_i) / sum_i Var(x_i)."""
    return 1.0 - np.var(x - x_hat, axis=0).sum() / np.var(x, axis=0).sum()


def test_evr_mse_equal_numpy_when_streamed_in_uneven_chunks():
    rng = np.random.default_rng(0)
    # anisotropic data with a large mean, so a wrong formula (no centring, per-sample variance) differs
    x = rng.normal(3.0, 1.0, size=(1000, 24)) * np.linspace(0.1, 4, 24)
    x_hat = x + rng.normal(0, 0.5, size=x.shape) + 0.3
    stats = ReconstructionStats(24)
    for lo, hi in [(0, 7), (7, 500), (500, 1000)]:
        stats.update(torch.tensor(x[lo:hi], dtype=torch.float32), torch.tensor(x_hat[lo:hi], dtype=torch.float32))
    assert abs(stats.evr() - _numpy_evr(x, x_hat)) < 1e-5
    assert abs(stats.mse() - np.mean((x - x_hat) ** 2)) < 1e-4
    # a constant offset in the reconstruction does not change EVR (variances are centred) ...
    assert abs(_numpy_evr(x, x_hat) - _numpy_evr(x, x_hat - 0.3)) < 1e-12
    # ... but does change MSE
    assert stats.mse() > np.mean((x - (x_hat - 0.3)) ** 2) + 0.05


def test_l0_is_the_mean_count_of_positive_values():
    code = SparseCode(torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.5]]), 8)
    stats = ReconstructionStats(2)
    stats.update(torch.zeros(2, 2), torch.zeros(2, 2) + 1, code)
    assert stats.l0() == 1.5


def test_firing_tracker_counts_samples_since_each_latent_fired():
    tracker = FiringTracker(d_sae=4, dead_after=5)
    fire = lambda idx, val: SparseCode(torch.tensor(idx), torch.tensor(val), 4)  # noqa: E731
    tracker.update(fire([[0], [1], [1]], [[1.0], [0.0], [2.0]]))  # latent 0 and 1 fire; a 0-value does not count
    assert tracker.since_fired.tolist() == [0, 0, 3, 3]
    tracker.update(fire([[0], [0]], [[1.0], [1.0]]))
    assert tracker.since_fired.tolist() == [0, 2, 5, 5]
    assert tracker.dead_mask().tolist() == [False, False, True, True]
    assert tracker.dead_fraction() == 0.5
