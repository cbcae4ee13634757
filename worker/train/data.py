"""Training and held-out vectors drawn from activation caches, in a seeded, resumable order."""

from __future__ import annotations

import math

import numpy as np
import torch

from clipscope.activation_cache import ActivationCache


class VectorSource:
    """The SAE input vectors of a set of images: ``len(image_rows) * tokens_per_image`` rows of width d.

    Resident: all rows copied once to ``device`` as fp16. Otherwise rows are gathered from the
    memory-mapped cache batch by batch.
    """

    def __init__(self, cache: ActivationCache, image_rows: np.ndarray, device: str, resident: bool):
        self.cache, self.device = cache, device
        self.image_rows = np.asarray(image_rows, dtype=np.int64)
        self.t = cache.tokens_per_image
        self.d = cache.d
        acts = cache.activations()
        if resident:
            rows = np.ascontiguousarray(acts[self.image_rows]).reshape(-1, self.d)
            self.resident = torch.from_numpy(rows).to(device)
        else:
            self.resident = None
            self.acts = acts

    def __len__(self) -> int:
        return len(self.image_rows) * self.t

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 ``[len(rows), d]`` on the device."""
        if self.resident is not None:
            return self.resident[rows.to(self.resident.device)].float()
        r = rows.cpu().numpy()
        picked = self.acts[self.image_rows[r // self.t], r % self.t]
        return torch.from_numpy(np.asarray(picked)).to(self.device).float()

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """Up to ``n`` rows chosen with a fixed seed (for initialisation and held-out metrics)."""
        g = torch.Generator().manual_seed(seed)
        rows = torch.randperm(len(self), generator=g)[: min(n, len(self))].sort().values
        return self.gather(rows)


class EpochOrder:
    """Step ``s`` reads a fixed slice of a per-epoch permutation seeded by ``(seed, epoch)``.

    The order is a pure function of the step, so a resumed run reads exactly the batches an
    uninterrupted one would. The last batch of an epoch may be short (ceil division, as the
    study's 1,184 steps per Food-101 epoch).
    """

    def __init__(self, n: int, batch_size: int, epochs: float, seed: int, device: str):
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.steps_per_epoch = math.ceil(n / batch_size)
        self.total_steps = max(1, math.ceil(epochs * self.steps_per_epoch))
        self._epoch, self._perm = -1, None

    def rows(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g).to(self.device), epoch
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]


def split_images(n_images: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train image rows, held-out image rows): a seeded split by image, so no image is on both sides."""
    perm = np.random.default_rng(seed).permutation(n_images)
    n_hold = int(round(n_images * holdout_fraction))
    if holdout_fraction > 0:
        n_hold = max(1, n_hold)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])
