"""What only a real GPU can show: the CUDA paths' arithmetic, no wait for the device inside a training
step, a captured CUDA graph of the step, and preprocessing on the device. Collected only where CUDA
is (``tests/conftest.py``), skipped when named without it; ``scripts/gpu-check.sh`` runs them first
on a lent GPU machine.

The CPU suite covers the same code through its stand-ins (the GPU's paths switched on on the CPU in
``tests/clipscope/test_sparse_ops.py``, the meta device, a stand-in graph in
``tests/worker/test_graphed.py``); these tests check what the stand-ins assume.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipscope.clip.preprocess import ImagePreprocess, preprocess_descriptor
from clipscope.config import ModelConfig, TrainConfig
from clipscope.sae.dense_reference import DenseTopKSAE
from clipscope.sae.metrics import FiringTracker
from clipscope.sae.model import TopKSAE
from worker.train.graphed import GraphedStep
from worker.train.recipes import make_recipe
from worker.train.step import adam, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu-check.sh runs these on one)")

D_IN, D_SAE, K, BATCH = 64, 1024, 16, 32
CUDA = torch.device("cuda")


def side(recipe_name: str, cls=TopKSAE, capturable: bool = False, seed: int = 0):
    """An SAE (initialised from a fixed sample), its recipe, fused Adam and a tracker with some dead latents, on the GPU."""
    sae = cls(D_IN, D_SAE, K, use_b_dec=recipe_name == "topk")
    recipe = make_recipe(TrainConfig(recipe=recipe_name, auxk_k=32, l1_warmup_steps=5, lr_warmup_steps=3), 40, D_IN, D_SAE)
    recipe.initialise(sae, torch.randn(256, D_IN, generator=torch.Generator().manual_seed(seed)))
    sae.to(CUDA)
    recipe.prepare(sae)
    tracker = FiringTracker(D_SAE, dead_after=1, device=CUDA)
    tracker.since_fired[::3] = 5  # every third latent dead: AuxK has work
    return sae, recipe, adam(recipe.parameters(sae), recipe.lr_at(0), capturable=capturable), tracker


def batch(step: int, size: int = BATCH) -> torch.Tensor:
    return (torch.randn(size, D_IN, generator=torch.Generator().manual_seed(100 + step)) * 2 + 0.5).to(CUDA)


@pytest.mark.parametrize("recipe_name", ["seed", "topk"])
def test_cuda_training_steps_stay_equal_to_the_dense_reference(recipe_name):
    sparse, dense = side(recipe_name), side(recipe_name, DenseTopKSAE)
    dense[0].load_state_dict(sparse[0].state_dict())
    for step in range(6):
        for parts in (sparse, dense):
            train_step(*parts, batch(step), step, parts[1].lr_at(step))
    assert torch.equal(sparse[3].since_fired, dense[3].since_fired)
    for name in ("encoder_weight", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sparse[0], name), getattr(dense[0], name), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("recipe_name", ["seed", "topk"])
def test_a_cuda_training_step_never_waits_for_the_device(recipe_name):
    """With sync debugging set to "error", torch raises at any operation that makes the host wait for
    the GPU (a value read back, a copy from ordinary host memory, an output sized by its values)."""
    parts = side(recipe_name)
    for step in range(2):  # the first steps create Adam's state and the kept gradient buffers
        train_step(*parts, batch(step), step, parts[1].lr_at(step))
    x = [batch(step) for step in range(2, 6)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 6):
            out = train_step(*parts, x[step - 2], step, parts[1].lr_at(step))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss).item()


@pytest.mark.parametrize("recipe_name", ["seed", "topk"])
def test_the_step_captured_as_a_cuda_graph_trains_as_the_eager_one(recipe_name):
    eager, graphed_parts = side(recipe_name), side(recipe_name, capturable=True)
    graphed = GraphedStep(*graphed_parts, batch_size=BATCH)
    sizes = [BATCH, BATCH, BATCH, BATCH, 7, BATCH, BATCH, BATCH]
    for step, size in enumerate(sizes):
        x, lr = batch(step, size), eager[1].lr_at(step)
        want = train_step(*eager, x, step, lr)
        got = graphed(x, step, lr)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-6)
    assert graphed.captured and not graphed.failed, "the capture itself worked on this GPU"
    assert torch.equal(graphed_parts[3].since_fired, eager[3].since_fired)
    for name in ("encoder_weight", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(graphed_parts[0], name), getattr(eager[0], name), rtol=1e-4, atol=1e-5, msg=name)


def test_resizing_on_the_gpu_gives_the_cpus_model_input():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)).resize((w, h)) for w, h in [(512, 384), (300, 420), (512, 384)]]
    pre = ImagePreprocess(preprocess_descriptor(ModelConfig(pretrained="none", resize="torch")))
    on_gpu, on_cpu = pre(images, CUDA), pre(images, "cpu")
    assert on_gpu.device.type == "cuda"
    level = 1 / 255 / min(pre.descriptor["std"])
    assert float((on_gpu.cpu() - on_cpu).abs().max()) <= 1.01 * level


def test_the_overlap_of_two_dictionaries_on_the_gpu_is_the_cpus():
    from clipscope.matching import best_cosines, unit_atoms

    g = torch.Generator().manual_seed(0)
    a, b = unit_atoms(torch.randn(3000, 768, generator=g)), unit_atoms(torch.randn(2500, 768, generator=g))
    on_cpu = best_cosines(a, b, chunk=512)
    on_gpu = best_cosines(a.to(CUDA), b.to(CUDA), chunk=512)
    assert all(t.device.type == "cpu" for t in on_gpu), "answered on the CPU wherever it ran"
    assert torch.allclose(on_cpu[0], on_gpu[0], atol=1e-5) and torch.allclose(on_cpu[1], on_gpu[1], atol=1e-5)


def test_the_firing_table_encoded_on_the_gpu_is_the_cpus(tmp_path):
    """The explorer builds a feature's co-firing table with the analysis' SAE, which a GPU server keeps on
    its device: the table answers on the CPU, with the same firing but where the two products' rounding
    reorders an image's k-th and (k+1)-th latents (at most a few of the 4,800 entries)."""
    from clipscope.cofiring import FiringTable
    from tests.conftest import array_cache

    cache = array_cache(tmp_path, np.random.default_rng(1).standard_normal((300, 1, D_IN)).astype(np.float16))
    sae = TopKSAE(D_IN, D_SAE, K)
    sae.init_weights(generator=torch.Generator().manual_seed(0))
    on_cpu = FiringTable.from_cache(sae.eval(), cache, batch=64)
    on_gpu = FiringTable.from_cache(sae.to(CUDA).eval(), cache, batch=64)
    assert on_gpu.image_features.device.type == "cpu" and on_gpu.n_images == 300

    def entries(table):
        images = torch.repeat_interleave(torch.arange(table.n_images), table.image_offsets.diff())
        return set(zip(images.tolist(), table.image_features.tolist()))

    assert len(entries(on_cpu)) == 300 * K and len(entries(on_cpu) ^ entries(on_gpu)) <= 10


def test_the_notebook_encodes_a_precompute_set_on_the_gpu_as_on_the_cpu(tmp_path):
    import types

    from clipscope.notebook import OpenedSae
    from clipscope.storage import DataLayout
    from tests.conftest import array_cache

    cache = array_cache(tmp_path, np.random.default_rng(0).standard_normal((300, 1, D_IN)).astype(np.float16))
    sae = TopKSAE(D_IN, D_SAE, K)
    sae.init_weights(generator=torch.Generator().manual_seed(0))
    answers = []
    for device in ("cpu", "cuda"):
        s = object.__new__(OpenedSae)
        s.sae, s.device, s.cache, s.layout = sae.to(device).eval(), device, (lambda: cache), DataLayout(tmp_path / device)
        s.row = types.SimpleNamespace(precompute={"classes": [], "key": "v"}, key="x", status="ready")
        first = s.set_activations([3, 9, 3], batch_size=64).values  # the whole set encoded, each row's threshold kept
        again = s.set_activations([3, 9, 3], batch_size=64).values  # only the images the screen leaves
        assert np.array_equal(first > 0, again > 0) and np.allclose(first, again, rtol=1e-5, atol=0)
        answers.append(first)
    assert np.allclose(answers[0], answers[1], atol=1e-4)


def test_the_precompute_computes_on_the_gpu_what_it_computes_on_the_cpu(tmp_path):
    """Both passes and the neighbour search (in tiles narrower than the atoms) on each device, from one cache
    and one SAE. The encoders' products differ in rounding, so a latent tied at an image's k-th place may
    fire on one device only: counts may differ by such flips, and the rest is compared where they agree."""
    from clipscope.config import PrecomputeConfig
    from tests.conftest import array_cache
    from worker.precompute import neighbours
    from worker.precompute.stage import compute

    rng = np.random.default_rng(0)
    acts = rng.standard_normal((600, D_IN)) + rng.gamma(1.0, 1.0, (600, D_IN))
    cache = array_cache(tmp_path, acts.astype(np.float16), labels=rng.integers(0, 5, 600))
    sae = TopKSAE(D_IN, D_SAE, K)
    sae.init_weights(generator=torch.Generator().manual_seed(0))
    pc = PrecomputeConfig(top_k=12, intervals=3, per_interval=2, neighbours=5, batch_size=128, names={"enabled": False})
    real = neighbours.decoder_neighbours
    tables = []
    for device in ("cpu", "cuda"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("worker.precompute.stage.decoder_neighbours", lambda w, n: real(w, n, chunk=256, tile=384))
            tables.append(compute(sae.to(device).eval(), cache, pc, tmp_path / f"spill-{device}", device))
    cpu, gpu = tables
    assert all(t.device.type == "cpu" for t in (gpu.stats.count, gpu.top.payload, gpu.neighbour_idx)), "answered on the CPU"
    assert int((cpu.stats.count - gpu.stats.count).abs().sum()) <= 4 and int(cpu.stats.count.sum()) == 600 * K
    same = cpu.stats.count == gpu.stats.count
    assert same.float().mean() > 0.99
    torch.testing.assert_close(cpu.stats.max[same], gpu.stats.max[same], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu.top.values[same], gpu.top.values[same], rtol=1e-5, atol=1e-5)
    assert torch.equal(cpu.interval_counts[same].sum(1), gpu.interval_counts[same].sum(1))
    assert torch.equal(cpu.neighbour_idx, gpu.neighbour_idx)
    torch.testing.assert_close(cpu.neighbour_cos, gpu.neighbour_cos, rtol=0, atol=1e-5)
